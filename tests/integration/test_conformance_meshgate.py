"""Conformance: meshgate's own auth and rate-limit plugins, a few representative requests
each, through real Envoy 1.40 and the sidecar (same control server, same binaries, same
configurations), with a real OPA for the policy callout. Replies must be identical, and
so must what the upstream received (claims forwarded, credentials removed).

The full case table (`tests/cases/plugin_cases.py`) runs through each plane on its own in
other tests; this module only checks that the two planes agree on a sample of it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cases.material import ApiKey, Bearer, Jwt, Material
from tests.cases.plugin_cases import SCENARIOS
from tests.support.conformance import (
    ConformancePlanes,
    ConformanceUpstream,
    ListenerSpec,
    Observed,
    Request,
    assert_same,
)
from tests.support.opa import OPA, opa_server
from tests.support.stack import PLUGINS

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.opa,
    pytest.mark.skipif(not (PLUGINS / "auth.wasm").exists()
                       or not (PLUGINS / "rate_limit.wasm").exists(),
                       reason="plugins not built (make setup)"),
    pytest.mark.skipif(not OPA.exists(), reason="OPA not installed (make setup)"),
]

LISTENERS = {"jwt": "jwt", "opa": "opa-object", "limit": "rate-limit"}  # listener: scenario


@pytest.fixture(scope="module")
def material() -> Material:
    return Material()


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory,
           material: Material) -> Iterator[ConformancePlanes]:
    path = tmp_path_factory.mktemp("conformance-meshgate")
    plugins, listeners = [], []
    for listener, scenario in LISTENERS.items():
        (use,) = SCENARIOS[scenario]
        name = f"{use.plugin.replace('_', '-')}-{listener}"
        plugins.append({"name": name, "wasm": str(PLUGINS / f"{use.plugin}.wasm"),
                        "config": material.resolve(use.config)})
        listeners.append(ListenerSpec(listener, [name]))
    with opa_server(path) as opa_port, ConformanceUpstream() as upstream, ConformancePlanes(
            path, listeners, plugins, upstream, extra_clusters={"opa": opa_port}) as both:
        yield both


def same(planes: ConformancePlanes, material: Material, listener: str,
         request: Request) -> Observed:
    resolved = Request(request.path, request.method,
                       {k: material.resolve(v) for k, v in request.headers.items()},
                       request.body)
    envoy, sidecar = planes.send(listener, resolved)
    assert_same(envoy, sidecar, f"{listener} {request.method} {request.path}")
    return envoy


def bearer(**jwt: Any) -> dict[str, Any]:
    return {"authorization": Bearer(Jwt(**jwt))}


# -- auth: JWT and API keys -----------------------------------------------------------

def test_valid_jwt_forwards_the_subject_and_drops_the_token(planes: ConformancePlanes,
                                                             material: Material) -> None:
    reply = same(planes, material, "jwt", Request("/api/x", headers=bearer()))
    assert reply.status == 200
    seen = reply.json()["headers"]
    assert seen["x-meshgate-sub"] == "alice" and "authorization" not in seen


def test_valid_jwt_with_a_request_body(planes: ConformancePlanes, material: Material) -> None:
    reply = same(planes, material, "jwt",
                 Request("/api/items", "POST", {**bearer(), "content-type": "application/json"},
                         b'{"name": "x"}'))
    assert (reply.status, reply.json()["body_bytes"]) == (200, 13)


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "missing credentials"),
    (bearer(exp_in=-120), "token expired"),
    (bearer(claims={"aud": "someone-else"}), "audience not accepted"),
    ({"x-api-key": ApiKey("no-such-key")}, "API key not recognised"),
], ids=["missing", "expired", "wrong-audience", "unknown-api-key"])
def test_rejections_are_identical(planes: ConformancePlanes, material: Material,
                                  headers: dict[str, Any], reason: str) -> None:
    reply = same(planes, material, "jwt", Request("/api/x", headers=headers))
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith('Bearer realm="meshgate"')
    assert reply.json()["reason"] == reason


def test_api_key_accepted(planes: ConformancePlanes, material: Material) -> None:
    reply = same(planes, material, "jwt",
                 Request("/api/x", headers={"x-api-key": ApiKey("ci-bot")}))
    assert reply.status == 200
    assert reply.json()["headers"]["x-meshgate-sub"] == "ci-bot"


def _upstream_saw(base_url: str, path: str, headers: list[tuple[str, str]]) -> dict[str, str]:
    """Send `headers` as given, repeated names included (a dict cannot repeat a name)."""
    host, _, port = base_url[len("http://"):].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()[:300]
        seen: dict[str, str] = json.loads(reply.read())["headers"]
        return seen
    finally:
        conn.close()


def test_a_client_cannot_slip_forwarded_claims_past_auth_by_repeating_them(
        planes: ConformancePlanes, material: Material) -> None:
    """auth writes each forwarded-claim header once (decision 0600), so that one write
    must drop every copy the client sent, in both planes. Older Envoys replaced only the
    first copy of a repeated header; the upstream echo keeps the last value of a repeated
    name, so a later spoofed copy surviving the write would show here."""
    token = str(material.resolve(Bearer(Jwt())))
    headers = [("authorization", token), ("x-meshgate-sub", "mallory"),
               ("x-meshgate-roles", "admin"), ("x-meshgate-sub", "mallory-again"),
               ("x-meshgate-roles", "root")]
    for plane, base in (("envoy", planes.envoy_url("jwt")), ("sidecar", planes.sidecar_url("jwt"))):
        seen = _upstream_saw(base, "/api/x", headers)
        assert seen.get("x-meshgate-sub") == "alice", (plane, seen)
        assert "x-meshgate-roles" not in seen, (plane, seen)


# -- auth with an OPA callout -----------------------------------------------------------

def test_opa_allow_adds_the_policy_header(planes: ConformancePlanes,
                                          material: Material) -> None:
    reply = same(planes, material, "opa",
                 Request("/api/items", headers=bearer(claims={"roles": ["admin"]})))
    assert reply.status == 200
    assert reply.json()["headers"]["x-meshgate-tier"] == "gold"


@pytest.mark.parametrize(("path", "status"), [("/api/items", 403), ("/teapot", 418)])
def test_opa_denials_are_identical(planes: ConformancePlanes, material: Material,
                                   path: str, status: int) -> None:
    reply = same(planes, material, "opa", Request(path, headers=bearer()))
    assert reply.status == status
    assert reply.json()["error"] in {"forbidden", "teapot"}


# -- rate limit -------------------------------------------------------------------------

def test_rate_limit_counts_down_then_answers_429(planes: ConformancePlanes,
                                                 material: Material) -> None:
    statuses = []
    for _ in range(4):
        reply = same(planes, material, "limit",
                     Request("/a", headers={"x-client": "conformance-client"}))
        statuses.append(reply.status)
        assert reply.headers["ratelimit-limit"] == "3"
    assert statuses == [200, 200, 200, 429]
    assert reply.headers["retry-after"] == "60"
    assert reply.json()["rule"] == "per-client"


def test_rate_limit_without_descriptor_is_not_limited(planes: ConformancePlanes,
                                                      material: Material) -> None:
    for _ in range(4):
        reply = same(planes, material, "limit", Request("/a"))
        assert reply.status == 200 and "ratelimit-limit" not in reply.headers
