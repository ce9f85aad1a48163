from meshgate.gateway.wasm import CONTINUE, HeaderMap

from .wat import plugin


async def test_noop_plugin_continues(load):
    host = await load(plugin())
    stream = host.new_stream()
    headers = HeaderMap([(":method", "GET"), (":path", "/")])
    assert await stream.request_headers(headers, True) == CONTINUE
    stream.finish()
