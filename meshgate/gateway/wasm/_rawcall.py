"""The one place that touches wasmtime's unchecked C API through the package's ctypes bindings.

Why this module exists (docs/decisions/0200-wasmtime-unchecked-call-path.md): with
wasmtime 50.0.1 a call into wasm through ``Func.__call__`` re-reads the function type,
converts every argument to a ``wasmtime_val_t`` and back, and a host function defined
through ``Linker.define_func`` goes through the same generic trampoline. The unchecked
entry points (``wasmtime_func_call_unchecked``, ``wasmtime_linker_define_func_unchecked``)
take a flat ``wasmtime_val_raw_t`` array that we allocate once per function and reuse, so
a crossing costs a handful of ctypes operations.

These bindings are not wasmtime-py's public API. The version is pinned in pyproject.toml
and ``tests/unit/wasm/test_rawcall.py`` exercises this module directly, so an upgrade that
changes them fails loudly there. Nothing else in meshgate imports ``wasmtime._bindings``.

Signatures are written as strings of value types: ``"i"`` for i32, ``"I"`` for i64; e.g.
``params="iIi", results="i"``. i32 values cross as *unsigned* Python ints (pointers and
sizes in wasm32 are unsigned), i64 values as signed ints.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _bindings as ffi
from wasmtime import _extern as wasmtime_extern
from wasmtime import _func as wasmtime_func

from . import callstats

try:  # the compiled crossings (decision 1000); ctypes below stays the reference path
    from . import _crossing as _compiled
except ImportError:  # pragma: no cover - only when the extension was not built
    _compiled = None
if os.environ.get("MESHGATE_WASM_CROSSING") == "ctypes":
    _compiled = None

#: Which crossing implementation calls and host functions use: "compiled" or "ctypes".
CROSSING = "compiled" if _compiled is not None else "ctypes"


def compiled_function(name: str) -> Callable[..., Any] | None:
    """The compiled crossings' function ``name``, or None where ctypes is in use (the
    caller keeps its Python reference)."""
    return getattr(_compiled, name) if _compiled is not None else None


_U32 = 0xFFFFFFFF
_log = logging.getLogger(__name__)
_VALTYPES = {"i": wasmtime.ValType.i32, "I": wasmtime.ValType.i64}

HostCallable = Callable[..., int | None]


class WasmTrap(Exception):
    """Wasm code trapped (unreachable, out-of-bounds, epoch deadline, host-raised trap).

    ``message`` is wasmtime's trap text; ``cause`` is the Python exception a host function
    raised, if that is what stopped the guest.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause


class GuestMemoryError(Exception):
    """A pointer/length pair from the plugin falls outside its linear memory."""


if _compiled is not None:
    _compiled.configure(GuestMemoryError)  # what the compiled fast paths raise

#: The compiled stream driver (decision 1100), or None: with the ctypes crossing, and
#: with the call probe on (it wraps ``PluginVM.call``, which the driver does not call).
COMPILED_DRIVER = _compiled if _compiled is not None and not callstats.ENABLED else None


class HostAbort(Exception):
    """Raised by a host function to stop the guest with a trap (e.g. WASI ``proc_exit``)."""


# A host function that raised stores its exception here so the caller of the outermost
# wasm entry can re-raise it; wasmtime only carries a trap message across the boundary.
_pending_exception: list[BaseException] = []


def summarize_trap(message: str) -> str:
    """One line from wasmtime's multi-line trap text: the cause, without the backtrace."""
    if "Caused by:" in message:
        cause = message.split("Caused by:", 1)[1].strip().splitlines()
        return cause[0].strip() if cause else message
    return message.strip().splitlines()[0] if message.strip() else message


def _trap_from_ptr(trap: Any) -> WasmTrap:
    message = summarize_trap(wasmtime.Trap._from_ptr(trap).message)
    cause = _pending_exception.pop() if _pending_exception else None
    if cause is not None:
        message = f"{message}: {cause}"
    return WasmTrap(message, cause)


def _error_from_ptr(error: Any) -> WasmTrap:
    message = summarize_trap(str(wasmtime.WasmtimeError._from_ptr(error)))
    cause = _pending_exception.pop() if _pending_exception else None
    if cause is not None:
        message = f"{cause}"
    return WasmTrap(message, cause)


class RawFunc:
    """An exported wasm function, called through ``wasmtime_func_call_unchecked``.

    The argument/result array is allocated once and reused; a ``RawFunc`` is therefore
    not re-entrant for the *same* export, which the proxy-wasm ABI never needs (the host
    never calls ``proxy_on_request_headers`` from inside ``proxy_on_request_headers``).
    ``malloc`` is the exception: the host may call it from a host function while the
    plugin is inside a callback, which is a different export with its own array.
    """

    __slots__ = ("name", "_store", "_func", "_vals", "_params", "_results", "_trap", "call")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, name: str,
                 hold_gil: bool = False) -> None:
        """``hold_gil``: the compiled call keeps the GIL while the guest runs (the VM's
        epoch clock is a C thread, ``compiled_epoch_clock``)."""
        ty = func.type(store)
        self.name = name
        self._params = "".join("I" if str(p) == "i64" else "i" for p in ty.params)
        self._results = "".join("I" if str(r) == "i64" else "i" for r in ty.results)
        self._store = store  # the context pointer below is only valid while it lives
        self._func = func._func  # keep the wasmtime_func_t struct alive
        n = max(len(self._params), len(self._results), 1)
        self._vals = (ffi.wasmtime_val_raw_t * n)()
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        # The C arguments are built once as untyped pointers: ctypes then passes them
        # as they are, where the bindings' typed prototype checks and converts each one
        # (and wraps the result in a pointer object) on every call (~0.9 µs a call).
        args = (
            ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value),
            ctypes.c_void_p(ctypes.addressof(self._func)),
            ctypes.c_void_p(ctypes.addressof(self._vals)),
            ctypes.c_size_t(n),
            ctypes.c_void_p(ctypes.addressof(self._trap)),
        )
        #: ``call(*args) -> int | None``: the compiled crossing, or a ctypes wrapper
        #: generated per signature (see ``_caller_factory``).
        if _compiled is not None:
            self.call = _compiled.WasmCall(
                _CALL_UNCHECKED_ADDRESS, args[0].value, args[1].value, args[4].value,
                self._params, self._results, (self._func, self._vals, self._trap),
                self._raise_failure, hold_gil)
        else:
            self.call = _caller_factory(self._params, self._results)(
                _CALL_UNCHECKED, *args, self._vals, self._trap, self._take_trap)

    @property
    def params(self) -> str:
        return self._params

    @property
    def results(self) -> str:
        return self._results

    def __call__(self, *args: int) -> int | None:
        return self.call(*args)  # type: ignore[no-any-return]

    def _raise_failure(self, error: int) -> None:
        """The compiled call's failure path: wasmtime returned an error or left a trap."""
        if error:
            raise _error_from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
        raise self._take_trap()

    def _take_trap(self) -> WasmTrap:
        """Turn the trap wasmtime left in our slot into an exception; reset the slot."""
        trap = ctypes.cast(self._trap, ctypes.POINTER(ffi.wasm_trap_t))
        ctypes.memset(ctypes.addressof(self._trap), 0, ctypes.sizeof(self._trap))
        return _trap_from_ptr(trap)


def compiled_epoch_clock(engine: wasmtime.Engine, interval_s: float) -> Any:
    """A C thread bumping ``engine``'s epoch every ``interval_s`` (``_epoch.h``), with the
    ``start``/``stop``/``ticks`` of ``services.EpochTicker``; None without the compiled
    crossings."""
    if _compiled is None:
        return None
    increment = ctypes.cast(ffi._wasmtime_engine_increment_epoch, ctypes.c_void_p).value
    pointer = ctypes.cast(engine.ptr(), ctypes.c_void_p).value
    arm = ctypes.cast(ffi._wasmtime_context_set_epoch_deadline, ctypes.c_void_p).value
    return _compiled.EpochClock(increment, pointer, engine, interval_s, arm)


@functools.cache
def _caller_factory(params: str, results: str) -> Any:
    """Compile, once per signature, ``RawFunc.call``: arguments stored
    straight into the reused ``wasmtime_val_raw_t`` array, one C call, one result read."""
    names = [f"a{i}" for i in range(len(params))]
    stores = "".join(
        f"        vals[{i}].{'i32' if t == 'i' else 'i64'} = {names[i]}\n"
        for i, t in enumerate(params)
    )
    if not results:
        ret = "        return None\n"
    elif results[0] == "i":
        ret = f"        return vals[0].i32 & {_U32}\n"
    else:
        ret = "        return vals[0].i64\n"
    src = (
        "def factory(c_call, ctx, func_ref, vals_ref, n, trap_ref, vals, trap, take_trap):\n"
        f"    def call({', '.join(names)}):\n"
        f"{stores}"
        "        error = c_call(ctx, func_ref, vals_ref, n, trap_ref)\n"
        "        if error:\n"
        "            raise error_from_ptr(cast(error, error_ptr))\n"
        "        if trap:\n"
        "            raise take_trap()\n"
        f"{ret}"
        "    return call\n"
    )
    namespace: dict[str, Any] = {"error_from_ptr": _error_from_ptr, "cast": ctypes.cast,
                                 "error_ptr": ctypes.POINTER(ffi.wasmtime_error_t)}
    exec(compile(src, _source_name("wasm call", params, results), "exec"),  # noqa: S102
         namespace)  # generated from the signature string only
    return namespace["factory"]


def _source_name(kind: str, params: str, results: str) -> str:
    """A file name per generated signature. cProfile keys its rows by (file, line, name):
    with every wrapper compiled as ``<string>``, one signature's row silently replaced
    the others' (decision 0800), so a profile showed only the heaviest callbacks."""
    return f"<{kind} ({params or '-'})->({results or '-'})>"


#: ``wasmtime_func_call_unchecked`` without the bindings' argument types: the caller
#: passes prebuilt ``c_void_p``/``c_size_t`` objects and gets the error pointer as an int
#: (None when the call succeeded). Like every ctypes foreign call it releases the GIL,
#: which the epoch thread needs to interrupt a runaway callback.
_CALL_UNCHECKED_ADDRESS: int = ctypes.cast(ffi._wasmtime_func_call_unchecked,
                                          ctypes.c_void_p).value or 0
_CALL_UNCHECKED = ctypes.CFUNCTYPE(ctypes.c_void_p)(_CALL_UNCHECKED_ADDRESS)


#: The C callback type wasmtime calls, with every argument as a plain int: ctypes then
#: builds no pointer objects on entry (the bindings' type makes two per host call).
_RAW_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_size_t)
_SLOT = ctypes.sizeof(ffi.wasmtime_val_raw_t)  # 16: each raw value is a union


@functools.cache
def _trampoline_factory(params: str, results: str, on_bad_memory: int) -> Any:
    """Compile, once per signature, a factory that wraps a host function in a C callback.

    The raw argument array is read in one ``unpack_from`` (i32 slots as unsigned, as
    pointers and sizes are) and the result written with one ``pack_into``, so the hot
    path is one Python call with plain ints and no per-argument ctypes objects. A
    ``GuestMemoryError`` (a bad pointer from the plugin) becomes the status
    ``on_bad_memory``; a ``WasmTrap`` from a nested call into the guest or a
    ``HostAbort`` stops the guest with a trap; any other exception is a host bug: it is
    logged and answered with INTERNAL_FAILURE rather than killing the plugin.
    """
    slots = max(len(params), len(results), 1)
    layout = "<" + "".join(f"I{_SLOT - 4}x" if t == "i" else f"q{_SLOT - 8}x" for t in params)
    call = "fn(*unpack(raw))" if params else "fn()"
    if not results:
        store, bad, internal = call, "pass", "pass"
    else:
        mask = f" & {_U32}" if results == "i" else ""
        store = f"pack(raw, 0, ({call}){mask})"
        bad = f"pack(raw, 0, {on_bad_memory})"
        internal = "pack(raw, 0, internal_error)"
    src = (
        "def factory(fn):\n"
        "    def trampoline(env, caller, a, n):\n"
        f"        raw = array_type.from_address(a)\n"
        "        try:\n"
        f"            {store}\n"
        "        except GuestMemoryError:\n"
        f"            {bad}\n"
        "        except (WasmTrap, HostAbort) as e:\n"
        "            return fail(e)\n"
        "        except Exception as e:\n"
        "            log_internal(fn, e)\n"
        f"            {internal}\n"
        "        return None\n"
        "    return callback_type(trampoline)\n"
    )
    namespace: dict[str, Any] = {
        "fail": _fail, "GuestMemoryError": GuestMemoryError, "WasmTrap": WasmTrap,
        "HostAbort": HostAbort, "log_internal": _log_internal,
        "internal_error": INTERNAL_ERROR_STATUS, "callback_type": _RAW_CALLBACK,
        "array_type": ctypes.c_char * (_SLOT * slots),
        "unpack": struct.Struct(layout).unpack_from,
        "pack": struct.Struct("<I" if results == "i" else "<q").pack_into,
    }
    exec(compile(src, _source_name("host call", params, results), "exec"),  # noqa: S102
         namespace)  # generated from the signature string only
    return namespace["factory"]


def _functype(params: str, results: str) -> wasmtime.FuncType:
    return wasmtime.FuncType([_VALTYPES[p]() for p in params], [_VALTYPES[r]() for r in results])


# proxy_status_t INTERNAL_FAILURE; WASI callers see it as an unknown errno, which is
# still an error rather than a crash.
INTERNAL_ERROR_STATUS = 10


def _log_internal(fn: HostCallable, exc: Exception) -> None:
    _log.error("host function %s failed: %r", getattr(fn, "__name__", fn), exc, exc_info=exc)


def _fail(exc: BaseException) -> int:
    """Turn an exception that must stop the guest into a wasm trap."""
    _pending_exception.append(exc)
    trap = wasmtime.Trap(f"host function raised {type(exc).__name__}")._consume()
    return ctypes.cast(trap, ctypes.c_void_p).value or 0


def _host_error(on_bad_memory: int, fn: HostCallable, exc: BaseException) -> tuple[int, int]:
    """What the compiled trampoline does when a host function raised: ``(trap, status)``,
    a trap address to stop the guest with, or 0 and the status to answer (as the
    generated ctypes trampoline does)."""
    if isinstance(exc, GuestMemoryError):
        return 0, on_bad_memory
    if isinstance(exc, (WasmTrap, HostAbort)):
        return _fail(exc), 0
    if isinstance(exc, Exception):
        _log_internal(fn, exc)
        return 0, INTERNAL_ERROR_STATUS
    return _fail(exc), 0  # KeyboardInterrupt and friends: stop the guest


_NO_FINALIZER = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))


class HostFunctionTable:
    """Host functions defined on a ``wasmtime.Linker`` through the unchecked C API.

    Keeps every ctypes callback object alive for as long as the linker is (wasmtime holds
    only a raw pointer to it).
    """

    def __init__(self, linker: wasmtime.Linker) -> None:
        self._linker = linker
        self._callbacks: list[Any] = []

    def define(self, module: str, name: str, params: str, results: str,
               fn: HostCallable, on_bad_memory: int = 6, state: object = None) -> None:
        """``state``: the ``ProxyWasmImports`` whose ``t`` is the running host, for the
        compiled fast path of ``name`` if there is one (``_fastpaths.h``); ``fn`` still
        answers every case the fast path leaves to it."""
        ty = _functype(params, results)
        fast = 0
        if callstats.ENABLED:
            fn = callstats.timed_host(f"{module}.{name}", fn)  # the probe sees every call
        elif _compiled is not None and state is not None:
            fast = _compiled.FAST_PATHS.get(name, 0)
        env: int | None = None
        if _compiled is not None:
            host = _compiled.HostFunction(fn, params, results,
                                          functools.partial(_host_error, on_bad_memory),
                                          fast, state if fast else None)
            self._callbacks.append((host, ty))
            env = host.env()
            typed = ctypes.cast(_compiled.TRAMPOLINE, ffi.wasmtime_func_unchecked_callback_t)
        else:
            cb = _trampoline_factory(params, results, on_bad_memory)(fn)
            self._callbacks.append((cb, ty))
            # Same C signature, declared with plain ints; the bindings' prototype wants its type.
            typed = ctypes.cast(cb, ffi.wasmtime_func_unchecked_callback_t)
        m, n = module.encode(), name.encode()
        error = ffi.wasmtime_linker_define_func_unchecked(
            self._linker.ptr(), m, len(m), n, len(n), ty.ptr(), typed, env, _NO_FINALIZER)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)


class GuestMemory:
    """Bounds-checked reads and writes of a plugin's linear memory.

    The engine is configured with ``memory_may_move = False`` so the base address is
    stable for the store's life; only the size grows, and we re-read it (and widen the
    view) when an access falls past the size we last saw. Accesses go through a
    ``memoryview`` over the memory: slicing and ``struct`` on it are cheaper than a ctypes
    call or object per access, and a host call makes several.
    """

    __slots__ = ("_ctx", "_mem", "_mem_ref", "base", "size", "view")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._ctx = store._context()
        self._mem = memory._memory
        self._mem_ref = ctypes.byref(self._mem)
        self.base = ctypes.addressof(ffi.wasmtime_memory_data(self._ctx, self._mem_ref).contents)
        self.size = 0
        self.view = memoryview(b"")
        self._remap()

    def _remap(self) -> None:
        self.size = ffi.wasmtime_memory_data_size(self._ctx, self._mem_ref)
        self.view = memoryview((ctypes.c_char * self.size).from_address(self.base)).cast("B")

    def _check(self, ptr: int, length: int) -> None:
        if ptr + length > self.size:
            self._remap()
            if ptr + length > self.size:
                raise GuestMemoryError(f"[{ptr}, {ptr + length}) outside memory of {self.size}")

    def read(self, ptr: int, length: int) -> bytes:
        end = ptr + length
        if end > self.size and length:  # inline test: most host calls read 1-3 strings
            self._check(ptr, length)
        return bytes(self.view[ptr:end])

    def read_str(self, ptr: int, length: int) -> str:
        """UTF-8 text at ``[ptr, ptr + length)`` (invalid bytes replaced), decoded
        straight from the view without an intermediate ``bytes``."""
        end = ptr + length
        if end > self.size and length:
            self._check(ptr, length)
        return str(self.view[ptr:end], "utf-8", "replace")

    def write(self, ptr: int, data: bytes) -> None:
        self._check(ptr, len(data))
        self.view[ptr:ptr + len(data)] = data

    def read_u32(self, ptr: int) -> int:
        self._check(ptr, 4)
        return _U32_AT.unpack_from(self.view, ptr)[0]  # type: ignore[no-any-return]

    def write_u32(self, ptr: int, value: int) -> None:
        self._check(ptr, 4)
        _U32_AT.pack_into(self.view, ptr, value & _U32)

    def write_u64(self, ptr: int, value: int) -> None:
        self._check(ptr, 8)
        _U64_AT.pack_into(self.view, ptr, value & 0xFFFFFFFFFFFFFFFF)

    def check(self, ptr: int, length: int) -> None:
        """Raise ``GuestMemoryError`` unless ``[ptr, ptr + length)`` is in memory."""
        self._check(ptr, length)


_U32_AT = struct.Struct("<I")
_U64_AT = struct.Struct("<Q")


#: ``(context, ticks)``: arm the store's epoch deadline; the raw C entry, because the
#: wrapper chain around it costs more than the call on every callback.
set_epoch_deadline = ffi._wasmtime_context_set_epoch_deadline


def instance_export(store: wasmtime.Store, instance: wasmtime.Instance,
                    name: str) -> object | None:
    """One export of ``instance`` by name, or None.

    ``Instance.exports`` wraps every export on first use, and a Rust plugin has about 30;
    a VM needs five or six at start, so looking them up one by one keeps that work off
    every plugin start (decision 1000).
    """
    item = ffi.wasmtime_extern_t()
    raw = name.encode()
    found = ffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance._instance),
                                             raw, len(raw), ctypes.byref(item))
    return wasmtime_extern.wrap_extern(item) if found else None


def export_names(module: wasmtime.Module) -> frozenset[str]:
    """The names ``module`` exports. ``Module.exports`` builds a typed object per export,
    on every push; reading the names alone takes about half as long."""
    vec = ffi.wasm_exporttype_vec_t()
    ffi.wasmtime_module_exports(module.ptr(), ctypes.byref(vec))
    try:
        names = (ffi.wasm_exporttype_name(vec.data[i]).contents for i in range(vec.size))
        return frozenset(ctypes.string_at(n.data, n.size).decode("utf-8", "replace")
                         for n in names)
    finally:
        ffi.wasm_exporttype_vec_delete(ctypes.byref(vec))


def context_pointer_value(store: wasmtime.Store) -> int:
    """Address of the store's context (tests compare it with a caller's context)."""
    return ctypes.cast(store._context(), ctypes.c_void_p).value or 0


# Re-exported so tests and the benchmark can compare against the generic path.
GENERIC_TRAMPOLINE = wasmtime_func.trampoline
