"""Versioned, pre-serialised resources, and the wire bytes of xDS responses.

Marshal once, serve many: every resource is packed into an `Any` and serialised once;
its version is a hash of those bytes, so a restarted control server computes the same
version for the same content and never reuses a version for other content. Responses
are assembled from the cached bytes: protobuf fields concatenate, so the per-stream
nonce is appended to a shared body instead of re-serialising the whole message for each
proxy (see https://protobuf.dev/programming-guides/encoding/#last-one-wins).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from meshgate.xds import resources as r

#: gRPC's default maximum message size is 4 MiB; stay clear of it with room for headers.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024


@dataclass(frozen=True)
class VersionedResource:
    name: str
    version: str
    any_bytes: bytes = field(repr=False)
    delta_field: bytes = field(repr=False)
    """The `resources` field of a DeltaDiscoveryResponse holding this resource, encoded."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, sub-messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _str(number: int, text: str) -> bytes:
    return encode_bytes_field(number, text.encode()) if text else b""


def versioned(name: str, message: Message) -> VersionedResource:
    packed = r.pack(message)
    body = packed.SerializeToString(deterministic=True)
    version = hashlib.sha256(body).hexdigest()[:16]
    resource = _str(1, version) + encode_bytes_field(2, body) + _str(3, name)
    return VersionedResource(name, version, body, encode_bytes_field(2, resource))


def type_version(items: Iterable[VersionedResource]) -> str:
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda x: x.name):
        digest.update(f"{item.name}\0{item.version}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """All resources one kind of proxy should have, per type URL."""

    resources: Mapping[str, Mapping[str, VersionedResource]]

    @staticmethod
    def build(messages: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        return Snapshot(
            {
                type_url: {name: versioned(name, msg) for name, msg in by_name.items()}
                for type_url, by_name in messages.items()
            }
        )

    def of_type(self, type_url: str) -> Mapping[str, VersionedResource]:
        return self.resources.get(type_url, {})


class SotwBodyCache:
    """Shared SotW response bodies, keyed by type and the exact resources they carry."""

    def __init__(self, capacity: int = 512) -> None:
        self._bodies: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._capacity = capacity

    def body(self, type_url: str, version: str, items: list[VersionedResource],
             part: int = 0) -> bytes:
        key = (type_url, version, part)
        cached = self._bodies.get(key)
        if cached is not None:
            self._bodies.move_to_end(key)
            return cached
        body = _str(1, version) + b"".join(encode_bytes_field(2, i.any_bytes) for i in items)
        body += _str(4, type_url)
        self._bodies[key] = body
        if len(self._bodies) > self._capacity:
            self._bodies.popitem(last=False)
        return body


def sotw_response(body: bytes, nonce: str) -> bytes:
    return body + _str(5, nonce)


def delta_response(
    type_url: str,
    system_version: str,
    items: list[VersionedResource],
    removed: list[str],
    nonce: str,
) -> bytes:
    return (
        _str(1, system_version)
        + b"".join(i.delta_field for i in items)
        + _str(4, type_url)
        + _str(5, nonce)
        + b"".join(_str(6, name) for name in removed)
    )


def split_by_size(items: list[VersionedResource], limit: int = MAX_RESPONSE_BYTES
                  ) -> list[list[VersionedResource]]:
    """Chunks that each fit in one gRPC message (a single oversize resource stays alone)."""
    chunks: list[list[VersionedResource]] = [[]]
    size = 0
    for item in items:
        weight = len(item.delta_field)
        if chunks[-1] and size + weight > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += weight
    return chunks
