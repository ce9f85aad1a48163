"""Real Envoy 1.40 fed by meshgate's control server over ADS, SotW and delta."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import http
from tests.support.ports import free_port
from tests.support.stack import Stack, wait_for
from tests.support.upstream import echo_upstreams

pytestmark = pytest.mark.envoy


def mesh(port: int, generation: int, upstreams: dict[str, int],
         address: str = "127.0.0.1") -> dict[str, Any]:
    """Generation N routes /api to cluster `backend-N` through route config rules named
    for N, so successive generations rename clusters and routes."""
    name = f"backend-{generation}"
    return {
        "listeners": [{
            "name": "ingress",
            "address": address,
            "port": port,
            "routes": [
                {"name": f"api-{generation}", "prefix": "/api", "cluster": name,
                 "timeout": "5s"},
                {"name": f"rest-{generation}", "prefix": "/", "cluster": name},
            ],
        }],
        "clusters": [{"name": name, "endpoints": [f"127.0.0.1:{upstreams[name]}"]}],
    }


class Traffic:
    """Requests in a loop from a thread while the config changes; every one must pass."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                reply = http.request(self.url, timeout=5)
                self.results.append((reply.status, reply.headers.get("x-upstream", "")))
            except OSError as exc:
                self.results.append((0, repr(exc)))
            time.sleep(0.005)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_config_changes_are_make_before_break(tmp_path: Path, delta: bool) -> None:
    port = free_port()
    names = [f"backend-{g}" for g in range(4)]
    with echo_upstreams(*names) as upstreams, Stack(tmp_path, mesh(port, 0, upstreams)) as stack:
        stack.start_envoy("envoy-0", delta=delta)
        assert http.request(stack.url("ingress") + "/api/x").headers["x-upstream"] == "backend-0"
        for generation in (1, 2, 3):
            with Traffic(stack.url("ingress") + "/api/during") as traffic:
                time.sleep(0.2)
                stack.update(mesh(port, generation, upstreams))
                time.sleep(0.3)
            failures = [r for r in traffic.results if r[0] != 200]
            assert traffic.results and not failures, failures[:5]
            after = [http.request(stack.url("ingress") + "/api/after") for _ in range(5)]
            assert {(r.status, r.headers["x-upstream"]) for r in after} == {
                (200, f"backend-{generation}")}
        proxy = stack.proxy_status("envoy-0")
        assert proxy["xds"] == ("delta" if delta else "sotw")
        assert proxy["types"]["CDS"]["resources"] == ["backend-3"]
        assert proxy["types"]["RDS"]["resources"] == ["ingress.routes"]


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_nacked_config_is_reported_not_resent_and_old_config_keeps_serving(
    tmp_path: Path, delta: bool
) -> None:
    port = free_port()
    with echo_upstreams("backend-0", "backend-1") as upstreams, \
            Stack(tmp_path, mesh(port, 0, upstreams)) as stack:
        stack.start_envoy("envoy-0", delta=delta)
        good_lds = stack.proxy_status("envoy-0")["types"]["LDS"]["version_acked"]
        # Schema-valid, but Envoy refuses a listener whose address is not an IP.
        stack.update(mesh(port, 0, upstreams, address="not-an-ip"), wait=False)
        nacked = wait_for(
            lambda: stack.proxy_status("envoy-0")["types"]["LDS"].get("last_nack"), 20,
            "Envoy's NACK of the listener")
        assert "not-an-ip" in nacked["error"]
        lds = stack.proxy_status("envoy-0")["types"]["LDS"]
        assert lds["state"] == "NACKED" and lds["version_acked"] in (good_lds, "")
        responses = lds["responses"]
        time.sleep(3)
        assert stack.proxy_status("envoy-0")["types"]["LDS"]["responses"] == responses
        # The old listener keeps serving.
        reply = http.request(stack.url("ingress") + "/api/still")
        assert (reply.status, reply.headers["x-upstream"]) == (200, "backend-0")
        from meshgate.cli import main
        assert main(["status", "--server", f"http://127.0.0.1:{stack.http_port}"]) == 0
        stack.update(mesh(port, 1, upstreams))
        lds = stack.proxy_status("envoy-0")["types"]["LDS"]
        assert lds["state"] == "ACKED" and lds["version_acked"] == lds["version_sent"]
        reply = http.request(stack.url("ingress") + "/api/fixed")
        assert (reply.status, reply.headers["x-upstream"]) == (200, "backend-1")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_control_server_restart(tmp_path: Path, delta: bool) -> None:
    port = free_port()
    with echo_upstreams("backend-0", "backend-1") as upstreams, \
            Stack(tmp_path, mesh(port, 0, upstreams)) as stack:
        envoy = stack.start_envoy("envoy-0", delta=delta)
        before = {t: s["version_acked"]
                  for t, s in stack.proxy_status("envoy-0")["types"].items()}
        stack.stop_server()
        for _ in range(10):
            reply = http.request(stack.url("ingress") + "/api/meanwhile")
            assert (reply.status, reply.headers["x-upstream"]) == (200, "backend-0")
        stack.start_server()
        stack.wait_converged()

        def acked() -> dict[str, str]:
            return {t: s["version_acked"]
                    for t, s in stack.proxy_status("envoy-0")["types"].items()}

        # Envoy asks for routes only once it has the listeners again: every type
        # converged may still be fewer types than before.
        wait_for(lambda: acked().keys() == before.keys(), 20, "Envoy to ask for every type again")
        assert acked() == before  # same content, same versions, from a fresh process
        stack.update(mesh(port, 1, upstreams))
        changed = stack.proxy_status("envoy-0")["types"]
        assert all(changed[t]["version_acked"] != before[t] for t in ("CDS", "EDS", "RDS"))
        reply = http.request(stack.url("ingress") + "/api/new")
        assert (reply.status, reply.headers["x-upstream"]) == (200, "backend-1")
        assert envoy.process.poll() is None


def test_invalid_config_change_is_rejected_and_last_good_config_serves(tmp_path: Path) -> None:
    port = free_port()
    with echo_upstreams("backend-0") as upstreams, \
            Stack(tmp_path, mesh(port, 0, upstreams)) as stack:
        stack.start_envoy("envoy-0")
        generation = stack.status()["config"]["generation"]
        url = stack.url("ingress")
        bad = mesh(free_port(), 0, upstreams)
        bad["listeners"][0]["port"] = 99999
        stack.update(bad, wait=False)
        rejected = wait_for(lambda: stack.status()["config"]["last_rejected"], 10,
                            "the rejection")
        assert "listeners[0].port: 99999 is greater than the maximum of 65535" in rejected["error"]
        assert stack.status()["config"]["generation"] == generation
        reply = http.request(url + "/api/ok")
        assert (reply.status, reply.headers["x-upstream"]) == (200, "backend-0")
