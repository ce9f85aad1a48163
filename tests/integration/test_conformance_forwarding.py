"""Conformance of what the upstream receives, with no plugin (listener `bare`) and with a
plugin that never looks at bodies (listener `plugged`: the WAT plugin of
`tests.support.conformance_plugins`, which only reads `:path` and adds response headers):
the data-path differences the plugin conformance suite normalises away (see
`tests.support.conformance` and decision 0400), each pinned here as a strict expected
failure so that the day the planes agree, the marker has to go.

Envoy's side is observed through a listener meshgate's control server configured; the
sidecar's through the same listener on its `nodes:` port.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.conformance import (
    ConformancePlanes,
    ConformanceUpstream,
    ListenerSpec,
    Request,
    assert_same,
)
from tests.support.conformance_plugins import crash_on_path_wasm

pytestmark = [pytest.mark.envoy]


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory,
           upstream: ConformanceUpstream) -> Iterator[ConformancePlanes]:
    path = tmp_path_factory.mktemp("conformance-forwarding")
    plugin = {"name": "headers-only", "wasm": str(crash_on_path_wasm(path))}
    listeners = [ListenerSpec("bare", []), ListenerSpec("plugged", ["headers-only"])]
    with ConformancePlanes(path, listeners, [plugin], upstream) as both:
        yield both


def upstream_saw(planes: ConformancePlanes, upstream: ConformanceUpstream, listener: str,
                 request: Request) -> tuple[dict[str, str], dict[str, str]]:
    """The raw request headers the upstream got from Envoy, then from the sidecar."""
    before = len(upstream.seen)
    envoy, sidecar = planes.send(listener, request)
    assert_same(envoy, sidecar, f"{listener} {request.method} {request.path}")
    envoy_seen, sidecar_seen = upstream.seen[before:]
    return envoy_seen, sidecar_seen


def test_without_plugins_the_replies_agree(planes: ConformancePlanes) -> None:
    envoy, sidecar = planes.send("bare", Request("/plain", headers={"x-a": "1"}))
    assert_same(envoy, sidecar, "bare GET /plain")
    assert envoy.json()["headers"] == {"accept-encoding": "identity", "x-a": "1"}


def test_both_planes_append_the_caller_to_x_forwarded_for(
        planes: ConformancePlanes, upstream: ConformanceUpstream) -> None:
    """Both keep the client's chain and append one hop. For a loopback caller Envoy
    appends its own host address instead of 127.0.0.1 (decision 0400); for any other
    caller both append the peer address."""
    request = Request("/xff", headers={"x-forwarded-for": "203.0.113.7"})
    envoy_seen, sidecar_seen = upstream_saw(planes, upstream, "bare", request)
    envoy_hops = [h.strip() for h in envoy_seen["x-forwarded-for"].split(",")]
    sidecar_hops = [h.strip() for h in sidecar_seen["x-forwarded-for"].split(",")]
    assert envoy_hops[0] == sidecar_hops[0] == "203.0.113.7"
    assert len(envoy_hops) == len(sidecar_hops) == 2
    assert sidecar_hops[1] == "127.0.0.1"


def test_without_plugins_upstream_sees_the_clients_content_length(
        planes: ConformancePlanes, upstream: ConformanceUpstream) -> None:
    envoy_seen, sidecar_seen = upstream_saw(
        planes, upstream, "bare", Request("/body", "POST", {"content-type": "text/plain"},
                                          b"payload"))
    assert envoy_seen.get("content-length") == sidecar_seen.get("content-length") == "7"
    assert "transfer-encoding" not in sidecar_seen


def test_with_a_plugin_upstream_sees_the_clients_content_length(
        planes: ConformancePlanes, upstream: ConformanceUpstream) -> None:
    envoy_seen, sidecar_seen = upstream_saw(
        planes, upstream, "plugged", Request("/body", "POST", {"content-type": "text/plain"},
                                             b"payload"))
    assert envoy_seen.get("content-length") == "7"
    assert sidecar_seen.get("content-length") == "7", sidecar_seen
    assert "transfer-encoding" not in sidecar_seen
