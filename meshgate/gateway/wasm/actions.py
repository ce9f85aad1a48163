"""What a stream callback tells the data path to do next, and the plugin's identity."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PluginSpec:
    """A plugin as the control plane describes it. ``sha256`` is computed from ``wasm``.

    ``environment`` is the VM's WASI environment (Envoy's
    ``vm_config.environment_variables``); the host's own environment is never exposed.
    """

    name: str
    wasm: bytes = field(repr=False)
    configuration: bytes = b""
    root_id: str = ""
    vm_id: str = ""
    vm_configuration: bytes = b""
    fail_open: bool = False
    environment: tuple[tuple[str, str], ...] = ()
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.wasm).hexdigest())


class PluginLoadError(Exception):
    """The plugin cannot be loaded; the message names plugin, sha256 prefix and cause."""


@dataclass(frozen=True)
class Continue:
    """Carry on with the (possibly modified) headers/body/trailers."""


@dataclass(frozen=True)
class StopAndBuffer:
    """A body callback wants the whole body: buffer this chunk and call again with the
    accumulated body when more arrives (Envoy's StopIterationAndBuffer)."""


@dataclass(frozen=True)
class LocalReply:
    """Answer the client with this response instead of going upstream.

    ``headers`` are the reply's regular headers after the plugin's own
    ``on_response_headers`` ran over the reply (no pseudo-headers; no content-length,
    which the data path sets from ``body``). The data path must not call the same
    stream's response callbacks again.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    details: str


@dataclass(frozen=True)
class ResetStream:
    """The plugin closed the stream (``proxy_close_stream``): reset it without a reply."""


StreamAction = Continue | StopAndBuffer | LocalReply | ResetStream

CONTINUE = Continue()
STOP_AND_BUFFER = StopAndBuffer()
