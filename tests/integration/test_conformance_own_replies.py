"""The proxies' own replies through a plugin, in Envoy 1.40 and the sidecar: an upstream
nobody listens on, one that answers after the route's timeout, and one that closes the
connection without answering. Envoy runs the plugin's response callbacks over its own
replies (the proxy-wasm 0.2.0 http_config example adds its header to every response);
the sidecar must answer the same status, body and plugin header. Envoy's answer is
observed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.conformance import ConformancePlanes, ConformanceUpstream, ListenerSpec, Request
from tests.support.ports import free_port
from tests.support.stack import PLUGINS

EXAMPLE = PLUGINS / "examples" / "http_config.wasm"
HEADER = "from-the-plugin"

pytestmark = [pytest.mark.envoy,
              pytest.mark.skipif(not EXAMPLE.exists(), reason="examples not built (make setup)")]


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory,
           upstream: ConformanceUpstream) -> Iterator[ConformancePlanes]:
    plugins = [{"name": "http-config", "wasm": str(EXAMPLE), "config": HEADER}]
    listeners = [ListenerSpec("down", ["http-config"], cluster="down"),
                 ListenerSpec("up", ["http-config"], route_timeout="500ms")]
    with ConformancePlanes(tmp_path_factory.mktemp("conformance-own-replies"), listeners,
                           plugins, upstream, extra_clusters={"down": free_port()}) as both:
        yield both


def assert_same_own_reply(planes: ConformancePlanes, listener: str, path: str,
                          status: int) -> None:
    envoy, sidecar = planes.send_raw(listener, Request(path))
    assert envoy.status == status, (envoy, planes.logs())
    assert sidecar.status == status, (sidecar, planes.logs())
    assert envoy.body == sidecar.body, (envoy.body, sidecar.body)
    assert envoy.headers.get("custom-header") == sidecar.headers.get("custom-header") == HEADER


def test_a_refused_connection(planes: ConformancePlanes) -> None:
    assert_same_own_reply(planes, "down", "/anything", 503)


def test_an_upstream_past_the_route_timeout(planes: ConformancePlanes,
                                            upstream: ConformanceUpstream) -> None:
    upstream.bytes_delay_s = 1.5
    try:
        assert_same_own_reply(planes, "up", "/bytes/1", 504)
    finally:
        upstream.bytes_delay_s = 0.0


def test_an_upstream_that_closes_without_answering(planes: ConformancePlanes) -> None:
    assert_same_own_reply(planes, "up", "/reset", 503)


def test_the_same_plugin_on_a_served_route(planes: ConformancePlanes) -> None:
    envoy, sidecar = planes.send("up", Request("/anything"))
    assert envoy.status == sidecar.status == 200
    assert envoy.headers.get("custom-header") == sidecar.headers.get("custom-header") == HEADER
