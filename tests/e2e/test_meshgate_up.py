"""`meshgate up` as a user runs it (the main job of `make run`): the embedded demo stack
on its documented ports, the same request through Envoy and the sidecar, `meshgate
status`, then Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import http
from tests.support.stack import REPO, wait_for

PORTS = {"xds": 18000, "status": 18001, "upstream": 18080, "opa": 18181, "envoy": 10000,
         "sidecar": 10001, "envoy admin": 19901, "sidecar admin": 15000}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    busy = [f"{name} {port}" for name, port in PORTS.items() if listening(port)]
    assert not busy, f"meshgate up needs its documented ports free; in use: {busy}"
    log = (tmp_path / "up.log").open("w+b")
    process = subprocess.Popen([sys.executable, "-m", "meshgate.cli", "up"], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: b"meshgate is up" in (tmp_path / "up.log").read_bytes()
                 or process.poll() is not None, 90, "meshgate up to start")
        assert process.poll() is None, (tmp_path / "up.log").read_text()
        yield process, tmp_path / "up.log"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def test_up_serves_the_demo_through_envoy_and_sidecar_and_stops_cleanly(stack) -> None:  # type: ignore[no-untyped-def]
    process, log_path = stack
    printed = log_path.read_text()
    assert "listener ingress: envoy http://127.0.0.1:10000/  sidecar http://127.0.0.1:10001/" \
        in printed
    replies = {}
    for plane, port in (("envoy", 10000), ("sidecar", 10001)):
        ok = http.request(f"http://127.0.0.1:{port}/api/hello",
                          headers={"x-api-key": "demo-key"})
        denied = http.request(f"http://127.0.0.1:{port}/api/hello")
        replies[plane] = (ok, denied)
        assert ok.status == 200, (plane, ok.body)
        assert ok.json()["upstream"] == "demo"
        assert ok.json()["headers"]["x-meshgate-tier"] == "standard"  # from the OPA decision
        assert "x-api-key" not in ok.json()["headers"]  # credentials removed by auth
        assert ok.headers["ratelimit-limit"] == "10"
        assert denied.status == 401 and "www-authenticate" in denied.headers
    assert replies["envoy"][1].body == replies["sidecar"][1].body
    status = subprocess.run([sys.executable, "-m", "meshgate.cli", "status"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[2:] if line.strip()}
    assert set(rows) == {"envoy-0", "sidecar-0"}
    assert all(row.count("ACKED") == 5 for row in rows.values()), status.stdout
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    time.sleep(0.5)
    still = [f"{name} {port}" for name, port in PORTS.items() if listening(port)]
    assert not still, f"ports still open after Ctrl-C: {still}"
