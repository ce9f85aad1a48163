"""meshgate's rate-limit and auth plugins in both data planes at once: a real Envoy 1.40
and meshgate's sidecar, both configured by one control server (ECDS), with a real OPA
running policies/authz.rego.

Every case of the shared table `tests/cases/plugin_cases.py` runs through each plane in
the same run, against the same expectations. The rate limit is also driven by
concurrent clients through an Envoy with two worker threads, whose VMs share the buckets
through shared data.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshgate.envoy import find_envoy
from meshgate.xds.bootstrap import envoy_bootstrap
from tests.cases.material import Material
from tests.cases.plugin_cases import CASES, PRESENT, SCENARIOS, Case, Expect
from tests.support import http
from tests.support.opa import OPA, opa_server
from tests.support.ports import free_port
from tests.support.stack import REPO, SIDECAR_CLUSTER, EnvoyHandle, Stack, wait_for
from tests.support.upstream import echo_upstreams

PLUGINS = REPO / "build" / "plugins"

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.opa,
    pytest.mark.skipif(
        not (PLUGINS / "auth.wasm").exists() or not (PLUGINS / "rate_limit.wasm").exists(),
        reason="plugins not built (make setup)",
    ),
    pytest.mark.skipif(not OPA.exists(), reason="OPA not installed (make setup)"),
]


# -- the parts around Envoy -----------------------------------------------------------

class _JsonHandler(BaseHTTPRequestHandler):
    def send_json(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """`handler` on a loopback port from a background thread; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def jwks_server(document: dict[str, Any]) -> Any:
    """An identity provider's JWKS endpoint: GET /.well-known/jwks.json."""
    body = json.dumps(document).encode()

    class Handler(_JsonHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/.well-known/jwks.json":
                self.send_error(404)
                return
            self.send_json(body)

    return serve(Handler)


def slow_server(delay_s: float) -> Any:
    """An OPA stand-in that answers allow, but only after `delay_s` seconds."""

    class Handler(_JsonHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("content-length", "0")))
            time.sleep(delay_s)
            self.send_json(b'{"result": true}')

    return serve(Handler)


def mesh_config(material: Material, upstream: dict[str, int]) -> dict[str, Any]:
    """One listener per scenario, running that scenario's plugins in order."""
    listeners, plugins = [], []
    for scenario, uses in SCENARIOS.items():
        names = []
        for use in uses:
            name = f"{scenario}.{use.plugin}"
            plugins.append({"name": name, "wasm": str(PLUGINS / f"{use.plugin}.wasm"),
                            "config": material.resolve(use.config)})
            names.append(name)
        listeners.append({"name": scenario, "port": free_port(), "plugins": names,
                          "routes": [{"prefix": "/", "cluster": "echo", "timeout": "5s"}]})
    clusters = [{"name": name, "endpoints": [f"127.0.0.1:{port}"], "connect_timeout": "0.25s"}
                for name, port in upstream.items()]
    sidecar_ports = {item["name"]: free_port() for item in listeners}
    nodes = [{"cluster": SIDECAR_CLUSTER, "listeners": list(sidecar_ports),
              "ports": sidecar_ports}]
    return {"listeners": listeners, "clusters": clusters, "plugins": plugins, "nodes": nodes}


@dataclass
class PluginStack:
    stack: Stack
    material: Material
    envoy: EnvoyHandle

    def send(self, scenario: str, case: Case, plane: str = "envoy") -> http.Reply:
        req = case.request
        headers = {k: str(v) for k, v in self.material.resolve(req.headers).items()}
        return http.request(self.stack.url(scenario, plane) + req.path, method=req.method,
                            headers=headers, body=req.body or None)


@pytest.fixture(scope="module")
def plugin_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginStack]:
    tmp = tmp_path_factory.mktemp("plugins-envoy")
    material = Material()
    with echo_upstreams("echo") as echo, opa_server(tmp) as opa, \
            jwks_server(material.jwks()) as jwks, slow_server(2.0) as slow:
        upstream = {"echo": echo["echo"], "opa": opa, "opa-down": free_port(), "jwks": jwks,
                    "opa-slow": slow}
        with Stack(tmp, mesh_config(material, upstream)) as stack:
            envoy = stack.start_envoy("envoy-plugins")
            stack.start_sidecar("sidecar-plugins")
            yield PluginStack(stack, material, envoy)


# -- checking a reply against the table ----------------------------------------------

def check(reply: http.Reply, expect: Expect) -> None:
    seen = f"{reply.status} {reply.headers} {reply.body[:400]!r}"
    assert reply.status == expect.status, seen
    for name, want in expect.headers.items():
        if want is None:
            assert name not in reply.headers, seen
        elif want == PRESENT:
            assert name in reply.headers, seen
        else:
            assert reply.headers.get(name) == want, seen
    if expect.body_json is not None:
        body = reply.json()
        for key, want in expect.body_json.items():
            assert body.get(key) == want, seen
    if expect.upstream_headers:
        upstream_saw = reply.json()["headers"]
        for name, want in expect.upstream_headers.items():
            if want is None:
                assert name not in upstream_saw, seen
            elif want == PRESENT:
                assert name in upstream_saw, seen
            else:
                assert upstream_saw.get(name) == want, seen


@pytest.mark.parametrize("plane", ["envoy", "sidecar"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plugin_case(plugin_stack: PluginStack, case: Case, plane: str) -> None:
    reply = None
    for _ in range(case.repeat):
        reply = plugin_stack.send(case.scenario, case, plane)
    assert reply is not None
    check(reply, case.expect)


# -- beyond the table: Envoy specifics ---------------------------------------------------

def start_envoy_with_workers(stack: Stack, node_id: str, workers: int) -> EnvoyHandle:
    """Like Stack.start_envoy, with several worker threads (one plugin VM per worker)."""
    admin_port = free_port()
    path = stack.dir / f"envoy-{node_id}.json"
    path.write_text(json.dumps(envoy_bootstrap(
        node_id=node_id, node_cluster="envoy", xds_host="127.0.0.1", xds_port=stack.xds_port,
        admin_port=admin_port, delta=False)))
    log_path = stack.dir / f"envoy-{node_id}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [find_envoy(), "-c", str(path), "--concurrency", str(workers), "-l", "warning",
             "--use-dynamic-base-id", "--base-id-path", str(stack.dir / f"{node_id}.base-id"),
             "--drain-time-s", "1"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    envoy = stack.envoys[node_id] = EnvoyHandle(node_id, "envoy", proc, admin_port, log_path)
    wait_for(lambda: envoy.admin("/ready").strip() == "LIVE", 30, f"{node_id} ready")
    stack.wait_converged()
    return envoy


def test_concurrent_clients_across_workers_share_one_bucket(tmp_path: Path) -> None:
    """24 requests from 8 concurrent clients over 2 Envoy workers: exactly `burst` pass."""
    material = Material()
    config = {"rules": [{"name": "shared", "rate": {"tokens": 1, "per_seconds": 3600},
                         "burst": 5}]}
    with echo_upstreams("echo") as echo:
        port = free_port()
        mesh = {
            "listeners": [{"name": "limited", "port": port, "plugins": ["limit"],
                           "routes": [{"prefix": "/", "cluster": "echo"}]}],
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{echo['echo']}"]}],
            "plugins": [{"name": "limit", "wasm": str(PLUGINS / "rate_limit.wasm"),
                         "config": material.resolve(config)}],
        }
        with Stack(tmp_path, mesh) as stack:
            start_envoy_with_workers(stack, "envoy-workers", 2)
            url = f"http://127.0.0.1:{port}/x"
            deadline = time.monotonic() + 30

            def client(_: int) -> list[tuple[int, str]]:
                out = []
                for _ in range(3):
                    assert time.monotonic() < deadline
                    r = http.request(url, timeout=5)
                    out.append((r.status, r.headers.get("ratelimit-remaining", "")))
                return out

            with ThreadPoolExecutor(8) as pool:
                results = [x for batch in pool.map(client, range(8)) for x in batch]
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 5, results
    assert statuses.count(429) == 19, results
    # Each allowed request saw a distinct remaining count: no token was spent twice.
    assert sorted(rem for s, rem in results if s == 200) == ["0", "1", "2", "3", "4"]


def test_bad_configuration_is_refused_with_field_and_reason(tmp_path: Path) -> None:
    """Envoy NACKs a plugin whose on_configure fails; the plugin's log names the field."""
    with echo_upstreams("echo") as echo:
        port = free_port()
        mesh = {
            "listeners": [{"name": "bad", "port": port, "plugins": ["limit"],
                           "routes": [{"prefix": "/", "cluster": "echo"}]}],
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{echo['echo']}"]}],
            "plugins": [{"name": "limit", "wasm": str(PLUGINS / "rate_limit.wasm"),
                         "config": {"rules": [{"name": "r", "rate": {"tokens": 0}}]}}],
        }
        with Stack(tmp_path, mesh) as stack:
            envoy = stack.start_envoy("envoy-bad", wait=False)
            wait_for(lambda: "rules[0].rate.tokens" in envoy.log(), 30, "the plugin's error log")
            log = envoy.log()
    assert "invalid configuration: rules[0].rate.tokens: must be an integer from 1" in log


def test_metrics_count_allowed_and_limited(plugin_stack: PluginStack) -> None:
    case = next(c for c in CASES if c.name == "rate-limit/over-burst-is-429")
    fresh = Case(case.name, case.scenario,
                 type(case.request)(path="/m", headers={"x-client": "c-metrics"}), case.expect)
    before = plugin_stack.envoy.stats("wasmcustom.meshgate_rate_limit")
    statuses = [plugin_stack.send("rate-limit", fresh).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    after = plugin_stack.envoy.stats("wasmcustom.meshgate_rate_limit")

    def delta(name: str) -> int:
        key = f"wasmcustom.meshgate_rate_limit.{name}"
        return after.get(key, 0) - before.get(key, 0)

    assert delta("allowed") >= 3 and delta("limited") >= 2, after
    assert delta("rule.per-client.limited") == 2, after
