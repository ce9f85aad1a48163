"""One instance of a plugin module in its own store: memory, exports, allocator, deadline."""

from __future__ import annotations

import ctypes
import struct
import weakref

import wasmtime

from . import callstats as _callstats
from ._rawcall import (
    COMPILED_DRIVER,
    GuestMemory,
    GuestMemoryError,
    RawFunc,
    WasmTrap,
    export_names,
    instance_export,
)
from ._rawcall import set_epoch_deadline as _set_deadline
from .abi import ABI_MARKERS

_pack_u32 = struct.Struct("<I").pack_into

#: The exports the compiled driver calls on every request, in the order of
#: ``PluginVM.calls`` (none without the compiled driver).
DRIVER_EXPORTS: tuple[str, ...] = getattr(COMPILED_DRIVER, "DRIVER_EXPORTS", ())
_DRIVER_INDEX = {name: i for i, name in enumerate(DRIVER_EXPORTS)}


class VMLoadError(Exception):
    """The module cannot become a proxy-wasm VM (no ABI marker, no memory, start trapped)."""


_EXPORT_NAMES: weakref.WeakKeyDictionary[wasmtime.Module, frozenset[str]] = (
    weakref.WeakKeyDictionary())


def module_export_names(module: wasmtime.Module) -> frozenset[str]:
    """What a module exports, by name: read once per module (a module the cache keeps in
    memory serves every push of the same binary)."""
    names = _EXPORT_NAMES.get(module)
    if names is None:
        names = _EXPORT_NAMES[module] = export_names(module)
    return names


class PluginVM:
    """A plugin instance. Callbacks go through ``call``; host functions use ``mem`` and
    ``copy_out`` (which calls the plugin's allocator).

    The CPU deadline is armed only at the outermost entry: a host function that calls back
    into the guest (the allocator) stays within the callback's budget. With an
    ``epoch_clock`` (``services.epoch_clock``), it is armed only when the clock has ticked since
    it was last armed: arming again at the same epoch sets the same deadline, and the C
    call would cost more than the rest of a small callback's Python path.
    """

    __slots__ = ("store", "deadline_ticks", "depth", "_ctx", "_ctx_address", "_clock",
                 "_holds_gil", "_armed_at", "_instance", "_export_names", "mem", "funcs",
                 "calls", "_alloc", "broken")

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module,
                 linker: wasmtime.Linker, memory_limit: int, deadline_ticks: int,
                 epoch_clock: object | None = None,
                 export_names: frozenset[str] | None = None) -> None:
        exports = export_names if export_names is not None else module_export_names(module)
        if not any(m in exports for m in ABI_MARKERS):
            raise VMLoadError("Missing or unknown Proxy-Wasm ABI version "
                              f"(no export {' or '.join(ABI_MARKERS)})")
        self.store = wasmtime.Store(engine)
        self.store.set_limits(memory_size=memory_limit)
        self.deadline_ticks = deadline_ticks
        self.depth = 0
        self._ctx = self.store._context()
        # For the compiled driver, which arms the deadline without ctypes.
        self._ctx_address = ctypes.cast(self._ctx, ctypes.c_void_p).value
        self._clock = epoch_clock
        # Compiled calls keep the GIL unless a Python thread must interrupt them.
        self._holds_gil = not getattr(epoch_clock, "needs_gil", False)
        self._armed_at = -1  # the clock's ticks when the deadline was last armed
        _set_deadline(self._ctx, deadline_ticks)
        try:
            instance = linker.instantiate(self.store, module)
        except wasmtime.Trap as exc:
            raise WasmTrap(exc.message) from exc
        self._instance = instance
        self._export_names = exports
        memory = instance_export(self.store, instance, "memory")
        if not isinstance(memory, wasmtime.Memory):
            raise VMLoadError("module exports no linear memory named 'memory'")
        self.mem = GuestMemory(self.store, memory)
        # RawFuncs are built on first use: a plugin exports dozens of functions and a
        # cached start should not pay for the ones no request calls.
        self.funcs: dict[str, RawFunc | None] = {}
        # The compiled calls of DRIVER_EXPORTS, read by index (False: not looked up yet;
        # None: not exported), so the driver finds them without a lookup by name.
        self.calls: list[object] = [False] * len(DRIVER_EXPORTS)
        self._alloc = self._func("malloc") or self._func("proxy_on_memory_allocate")
        self.broken = False

    def _func(self, name: str) -> RawFunc | None:
        try:
            return self.funcs[name]
        except KeyError:
            f = (instance_export(self.store, self._instance, name)
                 if name in self._export_names else None)
            raw = (RawFunc(self.store, f, name, self._holds_gil)
                   if isinstance(f, wasmtime.Func) else None)
            self.funcs[name] = raw
            index = _DRIVER_INDEX.get(name)
            if index is not None:
                self.calls[index] = raw.call if raw is not None else None
            return raw

    def has(self, name: str) -> bool:
        return self._func(name) is not None

    def call(self, name: str, *args: int) -> int | None:
        """Call export ``name`` (None if the plugin does not export it)."""
        func = self.funcs.get(name) or self._func(name)
        if func is None:
            return None
        # _arm_deadline inlined for the common case (the clock has not ticked since the
        # last arming): this runs for every callback of every request.
        if self.depth == 0 and (self._clock is None
                                or self._clock.ticks != self._armed_at):  # type: ignore[attr-defined]
            self._arm_deadline()
        self.depth += 1
        try:
            return func.call(*args)
        except WasmTrap:
            self.broken = True
            raise
        finally:
            self.depth -= 1

    def _arm_deadline(self) -> None:
        clock = self._clock
        if clock is None:
            _set_deadline(self._ctx, self.deadline_ticks)
            return
        # Read once: the clock's thread may bump it meanwhile; a stale read only means
        # arming once more next time (the deadline keeps its +1 tick of slack).
        ticks = clock.ticks  # type: ignore[attr-defined]
        if ticks != self._armed_at:
            _set_deadline(self._ctx, self.deadline_ticks)
            self._armed_at = ticks

    def start(self) -> None:
        """WASI reactor/command entry: ``_initialize`` then ``main``/``__main_void``, or
        ``_start``, as proxy-wasm-cpp-host does."""
        if self.has("_initialize"):
            self.call("_initialize")
            main = self._func("main")
            if main is not None and main.params == "ii":
                self.call("main", 0, 0)
            elif self.has("__main_void"):
                self.call("__main_void")
        elif self.has("_start"):
            self.call("_start")

    def copy_out(self, data: bytes, ptr_ptr: int, size_ptr: int) -> None:
        """Hand ``data`` to the plugin: allocate in its memory, copy, write pointer and size.

        Empty data writes ``(0, 0)`` without allocating, as cpp-host does. The return
        slots are bounds-checked before allocating (a bad pointer leaks nothing) and
        written once; if allocation fails they read ``(0, 0)``.
        """
        mem = self.mem
        n = len(data)
        if not n:
            mem.write_u32(ptr_ptr, 0)
            mem.write_u32(size_ptr, 0)
            return
        # Every returned buffer pays for this path plus a nested call into the guest's
        # allocator, so bounds are compared inline and the slow checks run only on a miss.
        if ptr_ptr + 4 > mem.size or size_ptr + 4 > mem.size:
            mem.check(ptr_ptr, 4)
            mem.check(size_ptr, 4)
        alloc = self._alloc
        if alloc is None:
            self._no_result(ptr_ptr, size_ptr)
            raise GuestMemoryError("plugin exports no malloc/proxy_on_memory_allocate")
        if self.depth == 0:
            self._arm_deadline()
        self.depth += 1
        try:
            ptr = alloc.call(n) or 0
        finally:
            self.depth -= 1
        if ptr == 0:
            self._no_result(ptr_ptr, size_ptr)
            raise GuestMemoryError(f"plugin allocator returned NULL for {n} bytes")
        end = ptr + n
        if end > mem.size:  # the allocator may have grown memory: remap (or refuse)
            mem.check(ptr, n)
        view = mem.view
        view[ptr:end] = data
        _pack_u32(view, ptr_ptr, ptr)
        _pack_u32(view, size_ptr, n)

    def _no_result(self, ptr_ptr: int, size_ptr: int) -> None:
        self.mem.write_u32(ptr_ptr, 0)
        self.mem.write_u32(size_ptr, 0)


if _callstats.ENABLED:
    _callstats.install(PluginVM)
