"""Tiny proxy-wasm plugins for the conformance suite, written in WAT and assembled at test
time (no Rust build), importing only host functions Envoy 1.40 links.

`crash_on_path_wasm()`: a plugin that
  - traps (`unreachable`) in `proxy_on_request_headers` when `:path` starts with `/crash`;
  - otherwise continues, and in `proxy_on_response_headers` adds `x-trap-plugin: alive` and
    `x-vm-requests: <n>`, where n (one digit, capped at 9) counts the requests this VM
    instance has seen, so a client can tell whether the plugin ran and whether its VM is
    the same one as before.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

_CRASH_ON_PATH = r"""
(module
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 8192))
  (global $requests (mut i32) (i32.const 0))
  (data (i32.const 1024) ":path")
  (data (i32.const 1040) "/crash")
  (data (i32.const 1056) "x-trap-plugin")
  (data (i32.const 1072) "alive")
  (data (i32.const 1088) "x-vm-requests")
  (func (export "proxy_abi_version_0_2_1"))
  ;; bump allocator; reset at the start of every request (values never outlive one call)
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7))
                               (i32.const -8)))
    (if (i32.gt_u (global.get $heap) (i32.const 131072))
      (then (global.set $heap (local.get $p)) (return (i32.const 0))))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32) (local $value i32)
    (global.set $heap (i32.const 8192))
    (global.set $requests (i32.add (global.get $requests) (i32.const 1)))
    ;; slot 0: value pointer, slot 4: value size
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 1024) (i32.const 5)
                                   (i32.const 0) (i32.const 4)))
      (then
        (local.set $value (i32.load (i32.const 0)))
        (if (i32.ge_u (i32.load (i32.const 4)) (i32.const 6))
          (then
            (if (i32.and
                  (i32.eq (i32.load (local.get $value)) (i32.load (i32.const 1040)))
                  (i32.eq (i32.load16_u (i32.add (local.get $value) (i32.const 4)))
                          (i32.load16_u (i32.const 1044))))
              (then unreachable))))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32)
    (drop (call $add_header (i32.const 2) (i32.const 1056) (i32.const 13)
                            (i32.const 1072) (i32.const 5)))
    (i32.store8 (i32.const 1104)
      (i32.add (i32.const 48)
        (select (global.get $requests) (i32.const 9)
                (i32.lt_u (global.get $requests) (i32.const 10)))))
    (drop (call $add_header (i32.const 2) (i32.const 1088) (i32.const 13)
                            (i32.const 1104) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)
"""


def crash_on_path_wasm(directory: Path, tag: str = "") -> Path:
    """Assemble the crash-on-`/crash` plugin into `directory`; returns the .wasm path.

    `tag` becomes the module's name, so plugins built with different tags have different
    sha256s (Envoy fetches and caches remote code by sha256; distinct binaries keep one
    listener's plugin from sharing another's fetch).
    """
    path = directory / f"crash_on_path{'-' + tag if tag else ''}.wasm"
    source = _CRASH_ON_PATH.replace("(module", f"(module ${tag}" if tag else "(module", 1)
    path.write_bytes(wasmtime.wat2wasm(source))
    return path
