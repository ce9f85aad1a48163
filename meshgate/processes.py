"""Child processes of `meshgate up`: output to a log file, readiness over HTTP, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ChildProcess:
    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL)

    async def wait_http(self, url: str, timeout: float = 30.0,
                        accept: Callable[[bytes], bool] = lambda _: True) -> None:
        """Wait until `url` answers 2xx with a body `accept` likes, or the process dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process is not None and self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            with contextlib.suppress(OSError):
                if accept(await asyncio.to_thread(_get, url)):
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=1) as response:
        return bytes(response.read())
