"""A real OPA server with meshgate's policies, on loopback, for tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import http
from tests.support.ports import free_port
from tests.support.stack import REPO, wait_for

OPA = REPO / ".tools" / "opa"
POLICIES = REPO / "policies"


@contextmanager
def opa_server(log_dir: Path) -> Iterator[int]:
    """A real OPA with meshgate's policy and data, on loopback."""
    port = free_port()
    log = (log_dir / "opa.log").open("ab")
    proc = subprocess.Popen(
        [str(OPA), "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error",
         str(POLICIES / "authz.rego"), str(POLICIES / "data.json")],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        wait_for(lambda: http.request(f"http://127.0.0.1:{port}/health").status == 200, 30,
                 "OPA health")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
