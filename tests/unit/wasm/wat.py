"""Small proxy-wasm test plugins written in WAT, so the host's tests need no Rust build.

``plugin(...)`` assembles a module that imports every ``env`` host function (as
``$proxy_log`` etc.), exports the ABI marker, a bump allocator as ``malloc``, the
lifecycle callbacks (bodies given as WAT snippets), and, for every import, a
``call_<name>`` export that forwards its arguments so tests can drive one host function
at a time from inside a real callback context.

Strings: pass ``strings={"hello": b"..."}`` and write ``@hello`` (address) and ``#hello``
(length) inside snippets.
"""

from __future__ import annotations

import re

from meshgate.gateway.wasm.imports import ENV_SIGNATURES
from meshgate.gateway.wasm.wasi import WASI_SIGNATURES

STRINGS_BASE = 1024
HEAP_BASE = 32768
#: Scratch slots the snippets use for return pointers (0..255 are free for tests).
SLOT_PTR, SLOT_SIZE, SLOT_CAS = 0, 4, 8

_T = {"i": "i32", "I": "i64"}


def _sig(params: str, results: str) -> str:
    p = " ".join(f"(param {_T[c]})" for c in params)
    r = " ".join(f"(result {_T[c]})" for c in results)
    return f"{p} {r}".strip()


def _escape(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def plugin(*, on_request_headers: str = "(i32.const 0)",
           on_request_body: str = "(i32.const 0)",
           on_request_trailers: str = "(i32.const 0)",
           on_response_headers: str = "(i32.const 0)",
           on_response_body: str = "(i32.const 0)",
           on_vm_start: str = "(i32.const 1)",
           on_configure: str = "(i32.const 1)",
           on_context_create: str = "",
           on_log: str = "", on_done: str = "(i32.const 1)", on_delete: str = "",
           on_tick: str = "", on_queue_ready: str = "",
           on_http_call_response: str = "",
           initialize: str = "",
           strings: dict[str, bytes] | None = None,
           abi_marker: str = "proxy_abi_version_0_2_1",
           wasi: bool = True, extra: str = "", memory_pages: int = 2) -> str:
    strings = strings or {}
    offsets: dict[str, tuple[int, int]] = {}
    data = []
    pos = STRINGS_BASE
    for name, value in strings.items():
        offsets[name] = (pos, len(value))
        data.append(f'(data (i32.const {pos}) "{_escape(value)}")')
        pos += len(value) + 8 - len(value) % 8
    assert pos < HEAP_BASE

    def sub(snippet: str) -> str:
        snippet = re.sub(r"@(\w+)", lambda m: f"(i32.const {offsets[m.group(1)][0]})", snippet)
        return re.sub(r"#(\w+)", lambda m: f"(i32.const {offsets[m.group(1)][1]})", snippet)

    imports = [f'(import "env" "{n}" (func ${n} {_sig(p, r)}))' for n, p, r in ENV_SIGNATURES]
    if wasi:
        imports += [f'(import "wasi_snapshot_preview1" "{n}" (func $wasi_{n} {_sig(p, r)}))'
                    for n, p, r, _ in WASI_SIGNATURES]
    forwards = []
    for n, p, r, prefix in ([(n, p, r, "") for n, p, r in ENV_SIGNATURES]
                            + ([(n, p, r, "wasi_") for n, p, r, _ in WASI_SIGNATURES]
                               if wasi else [])):
        args = " ".join(f"(local.get {i})" for i in range(len(p)))
        forwards.append(f'(func (export "call_{prefix}{n}") {_sig(p, r)} '
                        f"(call ${prefix}{n} {args}))")
    marker = f'(func (export "{abi_marker}"))' if abi_marker else ""
    return f"""
(module
  {' '.join(imports)}
  (memory (export "memory") {memory_pages})
  (global $heap (mut i32) (i32.const {HEAP_BASE}))
  {' '.join(data)}
  {marker}
  (func $malloc (export "malloc") (param $n i32) (result i32) (local $p i32) (local $need i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7))
                               (i32.const -8)))
    (local.set $need (i32.sub (i32.shr_u (i32.add (global.get $heap) (i32.const 65535))
                                         (i32.const 16)) (memory.size)))
    (if (i32.gt_s (local.get $need) (i32.const 0))
      (then (if (i32.eq (memory.grow (local.get $need)) (i32.const -1))
        (then (global.set $heap (local.get $p)) (return (i32.const 0))))))
    (local.get $p))
  (func (export "_initialize") {sub(initialize)})
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    {sub(on_context_create)})
  (func (export "proxy_on_vm_start") (param $ctx i32) (param $size i32) (result i32)
    {sub(on_vm_start)})
  (func (export "proxy_on_configure") (param $ctx i32) (param $size i32) (result i32)
    {sub(on_configure)})
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32) {sub(on_request_headers)})
  (func (export "proxy_on_request_body") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32) {sub(on_request_body)})
  (func (export "proxy_on_request_trailers") (param $ctx i32) (param $n i32)
    (result i32) {sub(on_request_trailers)})
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32) {sub(on_response_headers)})
  (func (export "proxy_on_response_body") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32) {sub(on_response_body)})
  (func (export "proxy_on_log") (param $ctx i32) {sub(on_log)})
  (func (export "proxy_on_done") (param $ctx i32) (result i32) {sub(on_done)})
  (func (export "proxy_on_delete") (param $ctx i32) {sub(on_delete)})
  (func (export "proxy_on_tick") (param $ctx i32) {sub(on_tick)})
  (func (export "proxy_on_queue_ready") (param $ctx i32) (param $q i32) {sub(on_queue_ready)})
  (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32)
    (param $nh i32) (param $body i32) (param $nt i32) {sub(on_http_call_response)})
  {' '.join(forwards)}
  {sub(extra)}
)
"""


def log_info(name: str) -> str:
    """Snippet: ``proxy_log(INFO, @name, #name)``, dropping the status."""
    return f"(drop (call $proxy_log (i32.const 2) @{name} #{name}))"
