"""The crossing layer (``_rawcall``) alone: calls into wasm and host functions, through
whichever crossing this process uses (compiled by default; tests/run_all.sh runs these
again with MESHGATE_WASM_CROSSING=ctypes)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime

from meshgate.gateway.wasm._rawcall import (
    CROSSING,
    GuestMemoryError,
    HostAbort,
    HostFunctionTable,
    RawFunc,
    WasmTrap,
    compiled_epoch_clock,
)
from meshgate.gateway.wasm.services import HostServices

WAT = """
(module
  (import "host" "f32" (func $f32 (param i32 i32) (result i32)))
  (import "host" "f64" (func $f64 (param i64) (result i64)))
  (import "host" "none" (func $none (param i32)))
  (memory (export "memory") 1)
  (func (export "call_f32") (param i32 i32) (result i32) (call $f32 (local.get 0) (local.get 1)))
  (func (export "call_f64") (param i64) (result i64) (call $f64 (local.get 0)))
  (func (export "call_none") (param i32) (call $none (local.get 0)))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "neg64") (param i64) (result i64) (i64.sub (i64.const 0) (local.get 0)))
  (func (export "boom") unreachable))
"""
SPIN = '(module (func (export "spin") (loop (br 0))))'

HostFns = dict[str, Callable[..., int | None]]


def instance(fns: HostFns, hold_gil: bool = False) -> Callable[[str], RawFunc]:
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    table = HostFunctionTable(linker)
    table.define("host", "f32", "ii", "i", fns["f32"], on_bad_memory=6)
    table.define("host", "f64", "I", "I", fns["f64"])
    table.define("host", "none", "i", "", fns["none"])
    store = wasmtime.Store(engine)
    exports = linker.instantiate(store, wasmtime.Module(engine, WAT)).exports(store)
    kept.append((table, store))  # wasmtime holds raw pointers to both
    return lambda name: RawFunc(store, exports[name], name, hold_gil)


kept: list[object] = []


def plain(seen: list[tuple[int, ...]]) -> HostFns:
    def f32(a: int, b: int) -> int:
        seen.append((a, b))
        return a + b

    def f64(a: int) -> int:
        seen.append((a,))
        return a * 2

    def none(a: int) -> None:
        seen.append((a,))

    return {"f32": f32, "f64": f64, "none": none}


def test_the_compiled_crossing_is_built_and_used() -> None:
    # The editable install compiles it; losing it silently would cost ~1 µs a crossing.
    expected = "ctypes" if os.environ.get("MESHGATE_WASM_CROSSING") == "ctypes" else "compiled"
    assert CROSSING == expected


def test_arguments_and_results_cross_with_their_wasm_types() -> None:
    seen: list[tuple[int, ...]] = []
    func = instance(plain(seen))
    assert func("add")(2, 3) == 5
    assert func("add")(0xFFFFFFFF, 1) == 0  # i32 wraps, and crosses unsigned
    assert func("add")(0xFFFFFFFF, 0) == 0xFFFFFFFF
    assert func("neg64")(5) == -5  # i64 crosses signed
    assert func("call_f32")(0x80000000, 7) == 0x80000007
    assert func("call_f64")(-21) == -42
    assert func("call_none")(9) is None
    assert seen == [(0x80000000, 7), (-21,), (9,)]


def test_host_functions_run_under_calls_that_keep_or_release_the_gil() -> None:
    """A host function called from a guest call that keeps the GIL skips taking it; one
    called from a call nested inside it that releases the GIL must take it again."""
    seen: list[tuple[int, ...]] = []
    fns = plain(seen)
    released = instance(fns, hold_gil=False)
    fns["f32"] = lambda a, b: released("call_f64")(a) + b  # nested, GIL released
    kept = instance(fns, hold_gil=True)
    assert kept("call_f32")(20, 2) == 42
    assert kept("call_none")(7) is None
    assert seen == [(20,), (7,)]


def test_a_wrong_argument_count_is_a_type_error_not_a_crash() -> None:
    func = instance(plain([]))
    with pytest.raises(TypeError):
        func("add")(1)


def test_a_trap_in_the_guest_raises_and_the_function_stays_usable() -> None:
    func = instance(plain([]))
    with pytest.raises(WasmTrap) as trap:
        func("boom")()
    assert "unreachable" in trap.value.message
    assert func("add")(1, 1) == 2


def test_a_bad_guest_pointer_answers_the_configured_status() -> None:
    fns = plain([])

    def bad(a: int, b: int) -> int:
        raise GuestMemoryError("outside memory")

    fns["f32"] = bad
    assert instance(fns)("call_f32")(1, 2) == 6


def test_a_host_bug_is_logged_and_answered_internal_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fns = plain([])

    def buggy(a: int, b: int) -> int:
        raise KeyError("oops")

    fns["f32"] = buggy
    with caplog.at_level(logging.ERROR):
        assert instance(fns)("call_f32")(1, 2) == 10
    assert "host function buggy failed" in caplog.text


def test_a_host_abort_stops_the_guest_with_the_cause() -> None:
    fns = plain([])

    def abort(a: int) -> None:
        raise HostAbort("proc_exit(3)")

    fns["none"] = abort
    with pytest.raises(WasmTrap) as trap:
        instance(fns)("call_none")(1)
    assert isinstance(trap.value.cause, HostAbort)
    assert "proc_exit(3)" in trap.value.message


def test_a_result_of_the_wrong_type_is_a_host_bug_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fns = plain([])
    fns["f32"] = lambda a, b: "not an int"  # type: ignore[assignment,return-value]
    with caplog.at_level(logging.ERROR):
        assert instance(fns)("call_f32")(1, 2) == 10


def test_an_epoch_deadline_interrupts_a_spinning_guest() -> None:
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    spin = wasmtime.Instance(store, wasmtime.Module(engine, SPIN), []).exports(store)["spin"]
    # Another thread bumps the epoch while the guest spins: the call must release the GIL.
    timer = threading.Timer(0.05, engine.increment_epoch)
    timer.start()
    with pytest.raises(WasmTrap):
        RawFunc(store, spin, "spin")()
    timer.join()


@pytest.mark.skipif(CROSSING != "compiled", reason="the C epoch clock comes with the compiled "
                    "crossings; the ctypes ones use services.EpochTicker")
def test_the_c_epoch_clock_interrupts_a_guest_that_keeps_the_gil() -> None:
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    clock = compiled_epoch_clock(engine, 0.005)
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(3)
    spin = wasmtime.Instance(store, wasmtime.Module(engine, SPIN), []).exports(store)["spin"]
    clock.start()
    try:
        started = time.monotonic()
        with pytest.raises(WasmTrap, match="interrupt"):
            RawFunc(store, spin, "spin", hold_gil=True)()
        assert 0.01 <= time.monotonic() - started < 2.0  # three ticks of 5 ms, then the trap
        assert clock.ticks >= 3 and clock.running
    finally:
        clock.stop()
    stopped_at = clock.ticks
    time.sleep(0.03)
    assert clock.ticks == stopped_at and not clock.running
    clock.stop()  # idempotent


def test_host_services_run_the_epoch_clock_that_fits_the_crossings(tmp_path: Path) -> None:
    """The compiled crossings keep the GIL, so their clock must not need it; the ctypes
    ones release it for a Python thread. Either way `close()` stops the clock."""
    services = HostServices(module_cache_dir=tmp_path, epoch_interval_s=0.005)
    clock = services.epoch_clock
    assert getattr(clock, "needs_gil", False) == (CROSSING == "ctypes")
    services.start()
    deadline = time.monotonic() + 2.0
    while clock.ticks < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert clock.ticks >= 3
    services.close()
    stopped_at = clock.ticks
    time.sleep(0.03)
    assert clock.ticks == stopped_at
