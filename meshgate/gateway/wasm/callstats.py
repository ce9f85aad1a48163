"""Opt-in timing of the outermost calls into wasm, to compare a loaded sidecar with the bench.

``MESHGATE_WASM_CALLSTATS=FILE`` in the environment (read once, at import) makes every
outermost ``PluginVM.call`` record its wall time (``perf_counter_ns``) and the calling
thread's CPU time (``thread_time_ns``), and appends a summary to FILE at exit (``-``:
stderr), with the threads alive then. A file, because the benchmark deletes the
sidecar's log with its temporary directory. Wall well above CPU means the callback
waited for something (the GIL, the scheduler) rather than computed. Off, nothing is
wrapped (the probe swaps ``PluginVM.call`` and wraps host functions at definition), so
the hot path pays nothing for its existence (decision 0800).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

TARGET = os.environ.get("MESHGATE_WASM_CALLSTATS", "")
ENABLED = bool(TARGET)


class CallStats:
    """Totals per export name: calls, wall ns, CPU ns, and calls whose wall exceeded 1 ms."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[int]] = {}

    def add(self, name: str, wall_ns: int, cpu_ns: int) -> None:
        row = self.by_name.get(name)
        if row is None:
            row = self.by_name[name] = [0, 0, 0, 0]
        row[0] += 1
        row[1] += wall_ns
        row[2] += cpu_ns
        row[3] += wall_ns > 1_000_000

    def report(self) -> str:
        lines = [f"pid {os.getpid()} {' '.join(sys.argv[:1] + sys.argv[-4:])}",
                 "wasm outermost calls: name calls wall_us/call cpu_us/call over_1ms"]
        total = [0, 0, 0, 0]
        for name, (n, wall, cpu, slow) in sorted(self.by_name.items()):
            lines.append(f"  {name} {n} {wall / n / 1e3:.2f} {cpu / n / 1e3:.2f} {slow}")
            total = [total[0] + n, total[1] + wall, total[2] + cpu, total[3] + slow]
        if total[0]:
            n, wall, cpu, slow = total
            lines.append(f"  ALL {n} {wall / n / 1e3:.2f} {cpu / n / 1e3:.2f} {slow}")
        lines.append("threads: " + ", ".join(
            f"{t.name}(daemon={t.daemon})" for t in threading.enumerate()))
        return "\n".join(lines)


STATS = CallStats()
HOST = CallStats()  # host functions called from wasm, by import name


def timed_host(name: str, fn: Callable[..., int | None]) -> Callable[..., int | None]:
    """``fn`` timed into ``HOST`` (host functions are defined once per engine)."""
    wall_clock, cpu_clock, add = time.perf_counter_ns, time.thread_time_ns, HOST.add

    def host(*args: int) -> int | None:
        w, c = wall_clock(), cpu_clock()
        try:
            return fn(*args)
        finally:
            add(name, wall_clock() - w, cpu_clock() - c)

    return host


def install(vm_class: Any) -> None:
    """Wrap ``vm_class.call`` so outermost calls are timed (nested allocator calls are
    part of their callback's time)."""
    inner: Callable[..., int | None] = vm_class.call
    wall_clock, cpu_clock, add = time.perf_counter_ns, time.thread_time_ns, STATS.add

    def call(self: Any, name: str, *args: int) -> int | None:
        if self.depth:
            return inner(self, name, *args)
        w, c = wall_clock(), cpu_clock()
        try:
            return inner(self, name, *args)
        finally:
            add(name, wall_clock() - w, cpu_clock() - c)

    vm_class.call = call
    atexit.register(_write_report)


def _write_report() -> None:
    if TARGET == "-":
        print(STATS.report(), file=sys.stderr, flush=True)
        return
    with open(TARGET, "a") as out:
        out.write(STATS.report() + "\nhost functions:\n" + HOST.report() + "\n")
