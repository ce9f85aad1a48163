"""The compiled record-span check (`_spanmatch.h`) accepts exactly what the pattern in
meshgate/otel/wasi_tracing.py accepts, and captures the same digits (decision 1100).

Inputs: well-formed arguments in many shapes, every one-byte deletion, duplication and
replacement of a few of them, and cases picked for the grammar's corners. Seeded, so a
failure reproduces.
"""

from __future__ import annotations

import json
import random

import pytest

from meshgate.otel import wasi_tracing

compiled = pytest.importorskip("meshgate.gateway.wasm._crossing").match_record_span
reference = wasi_tracing._match_with_pattern

CORNERS = [
    b'{"name":"a","start_unix_nanos":0,"end_unix_nanos":0}',
    b'{"name":"a","start_unix_nanos":01,"end_unix_nanos":1}',
    b'{"name":"a","start_unix_nanos":-0,"end_unix_nanos":-12}',
    b'{"name":"a","start_unix_nanos":-,"end_unix_nanos":1}',
    b'{"name":"a","start_unix_nanos":1.5,"end_unix_nanos":2}',
    b' \t\r\n{ "name" : "a" , "kind" : "server" , "start_unix_nanos" : 1 ,'
    b' "end_unix_nanos" : 2 , "attributes" : { } , "status" : { "code" : "ok" } } \n',
    b'{"name":"a","kind":"sideways","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a","kinds":"server","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"attributes":{"x":1,}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"attributes":{"x":null}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"attributes":{"x":1e}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"attributes":{"x":-1.25E+7}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"attributes":{"x":truex}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"status":{"code":"ok",}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2,"status":{"code":"error",'
    b'"message":"x"}}',
    b'{"name":"a\\u00e9\\n\\"","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a\\u00g9","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a\\x","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"caf\xc3\xa9","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a\x7f","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a\x00","start_unix_nanos":1,"end_unix_nanos":2}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2}}',
    b'{"name":"a","start_unix_nanos":1,"end_unix_nanos":2',
    b'{"name":"a","end_unix_nanos":2,"start_unix_nanos":1}',
    b"",
    b"{}",
]


def well_formed(rng: random.Random) -> bytes:
    """A record-span argument as a plugin might write it, in one of many shapes."""
    def ws() -> str:
        return rng.choice(["", "", " ", "\n  ", "\t", "\r\n"])

    def text() -> str:
        return "".join(rng.choice(["a", "Z", "0", ".", " ", "\\n", '\\"', "\\u00e9", "/",
                                   "\\\\", "\x7f"]) for _ in range(rng.randrange(6)))

    def value() -> str:
        return rng.choice([f'"{text()}"', str(rng.randrange(-10**6, 10**6)), "true", "false",
                           f"{rng.random() * 100:.3f}", "1e9", "-2.5E-3", "0"])

    parts = [f'"name"{ws()}:{ws()}"{text()}"']
    if rng.random() < 0.5:
        kind = rng.choice(["internal", "server", "client", "producer", "consumer"])
        parts.append(f'"kind"{ws()}:{ws()}"{kind}"')
    start = rng.randrange(-5, 2**64)
    parts.append(f'"start_unix_nanos"{ws()}:{ws()}{start}')
    parts.append(f'"end_unix_nanos"{ws()}:{ws()}{start + rng.randrange(-3, 10**9)}')
    if rng.random() < 0.6:
        pairs = [f'"{text()}"{ws()}:{ws()}{value()}' for _ in range(rng.randrange(4))]
        parts.append(f'"attributes"{ws()}:{ws()}{{{ws()}{f"{ws()},{ws()}".join(pairs)}{ws()}}}')
    if rng.random() < 0.5:
        code = rng.choice(["unset", "ok", "error"])
        message = f'{ws()},{ws()}"message"{ws()}:{ws()}"{text()}"' if rng.random() < 0.5 else ""
        parts.append(f'"status"{ws()}:{ws()}{{{ws()}"code"{ws()}:{ws()}"{code}"{message}{ws()}}}')
    return f"{ws()}{{{ws()}{f'{ws()},{ws()}'.join(parts)}{ws()}}}{ws()}".encode()


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(len(data)):
        out.append(data[:i] + data[i + 1:])  # deletion
        out.append(data[:i] + data[i:i + 1] + data[i:])  # duplication
        out.append(data[:i] + bytes([rng.choice(b'{}[]",:.-+eE0129 \\ux\x00\xff')])
                   + data[i + 1:])  # replacement
    return out


def test_the_corners_agree() -> None:
    for case in CORNERS:
        assert compiled(case) == reference(case), case


def test_generated_arguments_and_their_mutations_agree() -> None:
    rng = random.Random(1100)
    accepted = checked = 0
    for _ in range(300):
        base = well_formed(rng)
        json.loads(base)  # the generator writes valid JSON
        assert compiled(base) == reference(base) != None, base  # noqa: E711
        for case in [base, *mutations(base, rng)]:
            ours, theirs = compiled(case), reference(case)
            assert ours == theirs, case
            accepted += ours is not None
            checked += 1
    # Both answers occur in number: the comparison is not all "None == None".
    assert checked > 100_000 and 0.05 < accepted / checked < 0.95


def test_record_span_answers_the_same_with_either_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = wasi_tracing.WasiTracing(TracerProvider())
    assert wasi_tracing._FAST_RECORD is compiled
    cases = [*CORNERS, b'{"name":"a","start_unix_nanos":5,"end_unix_nanos":4}']
    statuses = [tracer.record_span(case, None)[0] for case in cases]
    monkeypatch.setattr(wasi_tracing, "_FAST_RECORD", reference)
    assert [tracer.record_span(case, None)[0] for case in cases] == statuses
