"""meshgate's sidecar as its own process, as users run it (`meshgate sidecar ...`), fed by
a `tests.support.stack.Stack`'s control server.

    with Stack(tmp_path, config) as stack, SidecarProcess(stack, "sidecar-0") as sidecar:
        http.request(f"http://127.0.0.1:{port}/")   # the port its `nodes:` entry gives it

A separate process (not the in-process `Sidecar` of tests/integration/test_sidecar_helpers)
so blocking tests can drive it and Envoy alike, and so its log is a file next to Envoy's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.ports import free_port
from tests.support.stack import REPO, Stack, wait_for

SIDECAR_CLUSTER = "meshgate-sidecar"


class SidecarProcess:
    def __init__(self, stack: Stack, node_id: str = "sidecar-0", *,
                 node_cluster: str = SIDECAR_CLUSTER, delta: bool = True,
                 log_level: str = "INFO") -> None:
        self.stack = stack
        self.node_id = node_id
        self.node_cluster = node_cluster
        self.admin_port = free_port()
        self.log_path: Path = stack.dir / f"sidecar-{node_id}.log"
        self._args = [sys.executable, "-m", "meshgate.cli", "sidecar",
                      "--xds", f"127.0.0.1:{stack.xds_port}", "--node-id", node_id,
                      "--node-cluster", node_cluster, "--admin-port", str(self.admin_port),
                      "--drain-timeout", "1", "--log-level", log_level]
        if not delta:
            self._args.append("--sotw")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SidecarProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self._args, stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, cwd=REPO)
        log.close()
        wait_for(self.ready, timeout, f"sidecar {self.node_id} /readyz")

    def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"sidecar {self.node_id} exited ({self.process.returncode}):\n"
                               + self.log()[-3000:])
        try:
            return self.admin("/readyz").startswith("ready")
        except urllib.error.HTTPError:
            return False

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
