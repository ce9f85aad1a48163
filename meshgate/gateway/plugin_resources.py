"""ECDS `TypedExtensionConfig` (wasm HTTP filter) → a plugin description, and its binary.

meshgate's control server ships each plugin as an ECDS resource named
`meshgate.plugin.<name>` whose payload is `envoy.extensions.filters.http.wasm.v3.Wasm`.
The binary itself is not in the resource: `vm_config.code.remote` gives an HTTP URL and
the sha256 the bytes must have, exactly as Envoy fetches remote wasm code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import aiohttp
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as wasm_filter_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import any_pb2, wrappers_pb2

from meshgate.gateway.resources import WASM_FILTER_TYPE, UnsupportedConfig

STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
BYTES_VALUE_TYPE = "type.googleapis.com/google.protobuf.BytesValue"
SUPPORTED_RUNTIMES = ("envoy.wasm.runtime.v8", "envoy.wasm.runtime.wasmtime", "")
MAX_PLUGIN_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PluginResource:
    """One wasm HTTP filter as the control server described it."""

    resource_name: str
    name: str
    root_id: str
    vm_id: str
    url: str
    sha256: str
    configuration: bytes = field(repr=False)
    vm_configuration: bytes = field(repr=False)
    fail_open: bool


def _any_bytes(value: any_pb2.Any, where: str) -> bytes:
    if not value.type_url:
        return b""
    if value.type_url == STRING_VALUE_TYPE:
        text = wrappers_pb2.StringValue()
        value.Unpack(text)
        return text.value.encode()
    if value.type_url == BYTES_VALUE_TYPE:
        data = wrappers_pb2.BytesValue()
        value.Unpack(data)
        return data.value
    raise UnsupportedConfig(f"{where}: configuration of type {value.type_url} is not supported")


def decode_plugin(raw: extension_pb2.TypedExtensionConfig) -> PluginResource:
    where = f"plugin resource '{raw.name}'"
    if raw.typed_config.type_url != WASM_FILTER_TYPE:
        raise UnsupportedConfig(
            f"{where}: type {raw.typed_config.type_url!r} is not supported ({WASM_FILTER_TYPE} is)"
        )
    wasm = wasm_filter_pb2.Wasm()
    raw.typed_config.Unpack(wasm)
    config = wasm.config
    vm = config.vm_config
    if vm.runtime not in SUPPORTED_RUNTIMES:
        raise UnsupportedConfig(f"{where}: wasm runtime {vm.runtime!r} is not supported")
    if vm.code.WhichOneof("specifier") != "remote":
        raise UnsupportedConfig(f"{where}: vm_config.code must be remote (an HTTP URL + sha256)")
    remote = vm.code.remote
    if not remote.sha256 or not remote.http_uri.uri:
        raise UnsupportedConfig(f"{where}: vm_config.code.remote needs http_uri.uri and sha256")
    return PluginResource(
        resource_name=raw.name,
        name=config.name or raw.name.removeprefix("meshgate.plugin."),
        root_id=config.root_id,
        vm_id=vm.vm_id,
        url=remote.http_uri.uri,
        sha256=remote.sha256.lower(),
        configuration=_any_bytes(config.configuration, f"{where} configuration"),
        vm_configuration=_any_bytes(vm.configuration, f"{where} vm_config.configuration"),
        fail_open=_fail_open(config),
    )


def _fail_open(config: wasm_pb2.PluginConfig) -> bool:
    if config.failure_policy == wasm_pb2.FAIL_OPEN:
        return True
    if config.failure_policy == wasm_pb2.UNSPECIFIED:
        return config.fail_open
    return False  # FAIL_CLOSED, and FAIL_RELOAD which the sidecar treats as closed


class PluginBinaryCache:
    """Plugin binaries by sha256: fetched once, verified, kept while any config uses them."""

    def __init__(self) -> None:
        self._by_sha: dict[str, bytes] = {}

    async def fetch(self, plugin: PluginResource, timeout_s: float = 10.0) -> bytes:
        cached = self._by_sha.get(plugin.sha256)
        if cached is not None:
            return cached
        where = f"plugin '{plugin.name}' ({plugin.url})"
        data = await _download(plugin.url, timeout_s, where)
        digest = hashlib.sha256(data).hexdigest()
        if digest != plugin.sha256:
            raise UnsupportedConfig(
                f"{where}: sha256 mismatch: expected {plugin.sha256}, got {digest}"
            )
        self._by_sha[digest] = data
        return data

    def retain(self, sha256s: set[str]) -> None:
        for sha in set(self._by_sha) - sha256s:
            del self._by_sha[sha]


async def _download(url: str, timeout_s: float, where: str) -> bytes:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise UnsupportedConfig(f"{where}: fetch answered HTTP {resp.status}")
                data = bytearray()
                # read(n) returns what has arrived, not n bytes: loop to the end.
                async for chunk in resp.content.iter_any():
                    data += chunk
                    if len(data) > MAX_PLUGIN_BYTES:
                        break
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UnsupportedConfig(f"{where}: fetch failed: {exc!r}") from exc
    if len(data) > MAX_PLUGIN_BYTES:
        raise UnsupportedConfig(f"{where}: binary larger than {MAX_PLUGIN_BYTES} bytes")
    return bytes(data)
