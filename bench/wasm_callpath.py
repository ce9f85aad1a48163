"""Benchmark: one crossing into wasm and one host-function call from wasm.

Run: PYTHONPATH=. .venv/bin/python bench/wasm_callpath.py
Prints µs per crossing for wasmtime-py's generic path (``Func.__call__``,
``Linker.define_func``), for meshgate's unchecked path through ctypes, and for its compiled
crossings (``_crossing``, decision 1000), with the ratios, all measured in the same run
(the ctypes figures in a child process started with ``MESHGATE_WASM_CROSSING=ctypes``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import wasmtime

from meshgate.gateway.wasm._rawcall import CROSSING, HostFunctionTable, RawFunc

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
    if "--json" in sys.argv:
        print(json.dumps({"call": call_u, "host": host_u}))
        return
    env = {**os.environ, "MESHGATE_WASM_CROSSING": "ctypes"}
    child = subprocess.run([sys.executable, __file__, "--json"], env=env, check=True,
                           capture_output=True, text=True)
    ctypes_us = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"crossing in this process: {CROSSING}")
    for label, generic, viactypes, ours in (
        ("call into wasm   ", call_g, ctypes_us["call"], call_u),
        ("host fn from wasm", host_g, ctypes_us["host"], host_u),
    ):
        print(f"{label}: Func/define_func {generic:7.2f} µs  ctypes unchecked {viactypes:5.2f} µs"
              f"  {CROSSING} {ours:5.2f} µs  generic/{CROSSING} {generic / ours:6.1f}x"
              f"  ctypes/{CROSSING} {viactypes / ours:5.1f}x")


if __name__ == "__main__":
    main()
