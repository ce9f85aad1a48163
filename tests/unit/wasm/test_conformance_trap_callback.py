"""A trap in the stream's `proxy_on_context_create` is logged under that callback's name,
as Envoy does (`Function: proxy_on_context_create failed: ...`): the proxy-wasm 0.2.0
hello_world example panics there (found by tests/integration/test_conformance_failure.py).
"""

from __future__ import annotations

import logging

import pytest

from meshgate.gateway.wasm import HeaderMap, LocalReply

from .wat import plugin


@pytest.mark.parametrize("fail_open", [False, True])
async def test_trap_in_stream_context_create_names_that_callback(load, caplog,
                                                                 fail_open: bool) -> None:
    caplog.set_level(logging.INFO, logger="meshgate.gateway.wasm")
    wat = plugin(on_context_create="(if (i32.ne (local.get $ctx) (i32.const 1)) "
                                   "(then unreachable))")
    host = await load(wat, name="no-http-context", fail_open=fail_open)
    action = await host.new_stream().request_headers(
        HeaderMap([(":method", "GET"), (":path", "/")]), True)
    if not fail_open:
        assert action == LocalReply(503, [], b"", "wasm_fail_stream")
    lines = [r.getMessage() for r in caplog.records if "trapped" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"plugin 'no-http-context' (sha256 {host.spec.sha256[:12]}) "
                               "trapped in proxy_on_context_create: ")
