"""Real parts on loopback for integration tests: meshgate's control server (as a
subprocess, `meshgate serve`), real Envoy proxies bootstrapped from it, a demo upstream.

    with Stack(tmp_path, config) as stack:          # config: a meshgate.yaml as a dict
        stack.start_envoy("envoy-0", delta=False)
        reply = http.request(stack.url("ingress") + "/api")
        stack.update(new_config)                      # rewrites the file; live reload
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from meshgate.envoy import find_envoy
from meshgate.xds.bootstrap import envoy_bootstrap
from tests.support.ports import distinct_free_ports

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "build" / "plugins"


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class EnvoyHandle:
    def __init__(self, node_id: str, node_cluster: str, process: subprocess.Popen[bytes],
                 admin_port: int, log_path: Path) -> None:
        self.node_id = node_id
        self.node_cluster = node_cluster
        self.process = process
        self.admin_port = admin_port
        self.log_path = log_path

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def stats(self, prefix: str = "") -> dict[str, int]:
        out = {}
        for line in self.admin(f"/stats?filter={prefix}").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def warm(self) -> bool:
        stats = self.stats("warming")
        return (stats.get("listener_manager.total_listeners_warming", 1) == 0
                and stats.get("cluster_manager.warming_clusters", 1) == 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SidecarHandle:
    def __init__(self, node_id: str, process: subprocess.Popen[bytes], admin_port: int,
                 log_path: Path) -> None:
        self.node_id = node_id
        self.process = process
        self.admin_port = admin_port
        self.log_path = log_path

    def admin(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        EnvoyHandle.stop(self)  # type: ignore[arg-type]


SIDECAR_CLUSTER = "meshgate-sidecar"


def config_ports(config: dict[str, Any]) -> set[int]:
    """The loopback ports a meshgate.yaml names: listeners, per-node ports, endpoints."""
    ports = {int(item["port"]) for item in config.get("listeners", []) if "port" in item}
    for node in config.get("nodes", []):
        ports.update(int(p) for p in node.get("ports", {}).values())
    for cluster in config.get("clusters", []):
        ports.update(int(str(e).rsplit(":", 1)[1]) for e in cluster.get("endpoints", [])
                     if ":" in str(e))
    return ports


class Stack:
    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.dir = tmp_path
        self.config_path = tmp_path / "meshgate.yaml"
        self.config = config
        # Two different ports, and none the config names: a probed port is free again, and
        # the listeners' ports are bound only once the proxies start.
        self.xds_port, self.http_port = distinct_free_ports(2, avoid=config_ports(config))
        self.server: subprocess.Popen[bytes] | None = None
        self.envoys: dict[str, EnvoyHandle] = {}
        self.sidecars: dict[str, SidecarHandle] = {}
        self._write(config)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        self.start_server()
        return self

    def __exit__(self, *exc: object) -> None:
        for sidecar in self.sidecars.values():
            sidecar.stop()
        for envoy in self.envoys.values():
            envoy.stop()
        self.stop_server()

    def start_server(self) -> None:
        log = (self.dir / "control-server.log").open("ab")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "meshgate.cli", "serve", "--config", str(self.config_path),
             "--xds-port", str(self.xds_port), "--http-port", str(self.http_port)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO,
        )
        log.close()
        wait_for(lambda: self._get("/healthz") == b"ok\n", 20, "control server health")

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def restart_server(self) -> None:
        self.stop_server()
        self.start_server()

    def _spare_port(self) -> int:
        """A free port that none of this stack's servers or configured listeners use."""
        taken = config_ports(self.config) | {self.xds_port, self.http_port}
        taken.update(h.admin_port for h in [*self.envoys.values(), *self.sidecars.values()])
        return distinct_free_ports(1, avoid=taken)[0]

    def server_log(self) -> str:
        return (self.dir / "control-server.log").read_text(errors="replace")

    def start_envoy(self, node_id: str = "envoy-0", *, node_cluster: str = "envoy",
                    delta: bool = False, wait: bool = True,
                    extra_args: tuple[str, ...] = ()) -> EnvoyHandle:
        admin_port = self._spare_port()
        bootstrap = envoy_bootstrap(node_id=node_id, node_cluster=node_cluster,
                                    xds_host="127.0.0.1", xds_port=self.xds_port,
                                    admin_port=admin_port, delta=delta)
        path = self.dir / f"envoy-{node_id}.json"
        path.write_text(json.dumps(bootstrap))
        log_path = self.dir / f"envoy-{node_id}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            [find_envoy(), "-c", str(path), "--concurrency", "1", "-l", "warning",
             "--use-dynamic-base-id", "--base-id-path", str(self.dir / f"{node_id}.base-id"),
             "--drain-time-s", "1", *extra_args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()
        envoy = self.envoys[node_id] = EnvoyHandle(node_id, node_cluster, process, admin_port,
                                                   log_path)
        if wait:
            wait_for(lambda: envoy.admin("/ready").strip() == "LIVE", 30, f"{node_id} ready")
            self.wait_converged()
        return envoy

    def start_sidecar(self, node_id: str = "sidecar-0", *, delta: bool = True,
                      wait: bool = True) -> SidecarHandle:
        """meshgate's sidecar as a user starts it, in node cluster `meshgate-sidecar`."""
        admin_port = self._spare_port()
        log_path = self.dir / f"sidecar-{node_id}.log"
        argv = [sys.executable, "-m", "meshgate.cli", "sidecar", "--xds",
                f"127.0.0.1:{self.xds_port}", "--node-id", node_id, "--node-cluster",
                SIDECAR_CLUSTER, "--admin-port", str(admin_port),
                "--module-cache", str(self.dir / "wasm-modules")]
        with log_path.open("ab") as log:
            process = subprocess.Popen(argv + ([] if delta else ["--sotw"]), cwd=REPO,
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        sidecar = self.sidecars[node_id] = SidecarHandle(node_id, process, admin_port, log_path)
        if wait:
            wait_for(lambda: sidecar.admin("/readyz")[0] == 200, 60, f"{node_id} ready")
            self.wait_converged()
        return sidecar

    # -- config ---------------------------------------------------------------------------

    def _write(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, self.config_path)

    def update(self, config: dict[str, Any], *, wait: bool = True) -> None:
        """Write a new meshgate.yaml and wait until every proxy ACKed it and is warm."""
        generation = self.status()["config"]["generation"]
        self.config = config
        self._write(config)
        if wait:
            wait_for(lambda: self.status()["config"]["generation"] > generation, 20,
                     "the control server to load the new config")
            self.wait_converged()

    def write_raw(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # -- observation ----------------------------------------------------------------------

    def _get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return bytes(response.read())

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self._get("/status")))

    def proxy_status(self, node_id: str) -> dict[str, Any]:
        return next(p for p in self.status()["proxies"] if p["node_id"] == node_id)

    def wait_converged(self, timeout: float = 30.0, allow_nack: bool = False) -> None:
        def converged() -> bool:
            proxies = {p["node_id"]: p for p in self.status()["proxies"]}
            if any(node_id not in proxies for node_id in [*self.envoys, *self.sidecars]):
                return False
            ok = {"ACKED", "NACKED"} if allow_nack else {"ACKED"}
            synced = all(t["state"] in ok for p in proxies.values() for t in p["types"].values())
            return synced and all(e.warm() for e in self.envoys.values())

        wait_for(converged, timeout, "every proxy to ACK the config and finish warming")

    def url(self, listener: str, plane: str = "envoy") -> str:
        """Where `listener` answers on Envoy, or on the sidecar (its `nodes:` port)."""
        item = next(x for x in self.config["listeners"] if x["name"] == listener)
        port = item["port"]
        if plane == "sidecar":
            for node in self.config.get("nodes", []):
                if node.get("cluster") == SIDECAR_CLUSTER and listener in node["listeners"]:
                    port = node.get("ports", {}).get(listener, port)
                    break
        return f"http://127.0.0.1:{port}"
