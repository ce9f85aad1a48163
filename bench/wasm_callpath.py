"""Benchmark: one crossing into wasm and one host-function call from wasm, generic vs unchecked.

Run: .venv/bin/python bench/wasm_callpath.py
Prints µs per crossing for wasmtime-py's generic path (``Func.__call__``,
``Linker.define_func``) and for meshgate's unchecked path (``_rawcall``), and their ratio,
all measured in the same run.
"""

from __future__ import annotations

import time

import wasmtime

from meshgate.gateway.wasm._rawcall import HostFunctionTable, RawFunc

WAT = """
(module
  (import "env" "host" (func $host (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "noop") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "call_host") (param i32) (result i32) (local $i i32) (local $acc i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get 0)))
      (local.set $acc (i32.add (local.get $acc) (call $host (local.get $i) (i32.const 1))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $acc)))
"""


def _per_call_us(fn, n: int) -> float:
    fn(min(n, 100))  # warm up
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n * 1e6


def main(n: int = 50_000) -> None:
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, WAT)
    i32 = wasmtime.ValType.i32()
    host_ty = wasmtime.FuncType([i32, i32], [i32])

    # generic path
    store_g = wasmtime.Store(engine)
    linker_g = wasmtime.Linker(engine)
    linker_g.define_func("env", "host", host_ty, lambda a, b: a + b)
    inst_g = linker_g.instantiate(store_g, module)
    noop_g = inst_g.exports(store_g)["noop"]
    host_loop_g = inst_g.exports(store_g)["call_host"]

    # unchecked path
    store_u = wasmtime.Store(engine)
    linker_u = wasmtime.Linker(engine)
    table = HostFunctionTable(linker_u)
    table.define("env", "host", "ii", "i", lambda a, b: a + b)
    inst_u = linker_u.instantiate(store_u, module)
    noop_u = RawFunc(store_u, inst_u.exports(store_u)["noop"], "noop")
    host_loop_u = RawFunc(store_u, inst_u.exports(store_u)["call_host"], "call_host")

    def generic_calls(k: int) -> None:
        for i in range(k):
            noop_g(store_g, i, 1)

    def raw_calls(k: int) -> None:
        call = noop_u.call
        for i in range(k):
            call(i, 1)

    call_g = _per_call_us(generic_calls, n)
    call_u = _per_call_us(raw_calls, n)
    host_g = _per_call_us(lambda k: host_loop_g(store_g, k), n)
    host_u = _per_call_us(lambda k: host_loop_u.call(k), n)
    print(f"call into wasm   : Func.__call__ {call_g:7.2f} µs  unchecked {call_u:6.2f} µs"
          f"  ratio {call_g / call_u:5.1f}x")
    print(f"host fn from wasm: define_func   {host_g:7.2f} µs  unchecked {host_u:6.2f} µs"
          f"  ratio {host_g / host_u:5.1f}x")


if __name__ == "__main__":
    main()
