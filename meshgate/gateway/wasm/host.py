"""``PluginHost``: one plugin's VM, its root context and its failure policy.

The host owns the linker (import table) for the plugin's lifetime and one VM at a time.
A trap marks the VM dead; the next stream boots a fresh one (``_initialize``,
``on_context_create(1, 0)``, ``on_vm_start``, ``on_configure``), so one bad request does
not take the plugin down for good.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import wasmtime

from ._rawcall import HostFunctionTable, WasmTrap
from .abi import LogLevel, Status, StreamType
from .actions import PluginLoadError, PluginSpec
from .context import (
    ROOT_CONTEXT_ID,
    Buffer,
    Context,
    HttpCallResponse,
    LocalReplyRequest,
    RootContext,
    StreamContext,
    StreamInfo,
)
from .headers import HeaderMap
from .imports import ENV_SIGNATURES, ProxyWasmImports, define_env
from .properties import PluginIdentity
from .services import ForeignCall, HostServices
from .stream import HttpStream
from .vm import PluginVM, VMLoadError, module_export_names
from .wasi import WASI_SIGNATURES, WasiImports, define_wasi

log = logging.getLogger("meshgate.gateway.wasm")

_PY_LEVEL = {0: 5, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR,
             5: logging.CRITICAL}
# Envoy's http_call tokens advance by 4 (observed 4, 8, ...); we keep the same shape.
_TOKEN_STEP = 4
_CONNECT_FAILURE_BODY = (b"upstream connect error or disconnect/reset before headers. "
                         b"reset reason: connection failure")
_TIMEOUT_BODY = b"upstream request timeout"


def _synthetic_reply(status: int, body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    return ([(":status", str(status)), ("content-length", str(len(body))),
             ("content-type", "text/plain")], body)


class PluginHost:
    """A loaded plugin. Create with ``await PluginHost.create(spec, services)``."""

    # Slots: the compiled driver and fast paths read vm, root, _effective and _imports on
    # every callback, at the slot's offset (_attrs.h).
    __slots__ = ("spec", "services", "module", "module_exports", "module_from_cache",
                 "identity", "environment", "plugin_log", "vm", "root", "generation",
                 "streams", "_effective", "_next_context_id", "_next_token", "_pending_calls",
                 "_tasks", "_tick_task", "_tick_period_ms", "_loop", "_closed", "_imports",
                 "_linker")

    def __init__(self, spec: PluginSpec, services: HostServices, module: wasmtime.Module,
                 from_cache: bool) -> None:
        self.spec = spec
        self.services = services
        self.module = module
        self.module_exports = module_export_names(module)  # once, not per VM (re)start
        self.module_from_cache = from_cache
        self.identity = PluginIdentity(spec.name, spec.root_id, spec.vm_id,
                                       services.node_id, services.node_cluster)
        self.environment = list(spec.environment)
        self.plugin_log = logging.getLogger(f"meshgate.plugin.{spec.name}")
        self.vm: PluginVM = None  # type: ignore[assignment]  # set by _boot
        self.root = RootContext(spec.vm_configuration, spec.configuration)
        self.generation = 0
        self.streams: dict[int, StreamContext] = {}
        self._effective: Context = self.root
        self._next_context_id = ROOT_CONTEXT_ID + 1
        self._next_token = 0
        self._pending_calls: dict[int, tuple[int, int]] = {}  # token -> (context id, gen)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self._tick_period_ms = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._imports = _shared_imports(services)
        self._linker = self._imports.linker

    # -- loading --------------------------------------------------------------------------
    @classmethod
    async def create(cls, spec: PluginSpec, services: HostServices) -> PluginHost:
        """Compile (or load from the module cache), instantiate and configure the plugin.

        Raises ``PluginLoadError`` naming the plugin, its sha256 prefix and the cause.
        """
        services.start()
        cache = services.module_cache
        try:
            module = cache.cached(services.engine, spec.sha256)
            cached = module is not None
            if module is None:
                module = await asyncio.to_thread(
                    cache.compile, services.engine, spec.sha256, spec.wasm)
        except wasmtime.WasmtimeError as exc:
            raise _load_error(spec, f"not a valid wasm module: {exc}") from exc
        _check_imports(spec, module)
        host = cls(spec, services, module, cached)
        host._loop = asyncio.get_running_loop()
        host._boot()
        return host

    def _boot(self) -> None:
        """Start a fresh VM: entry points, root context, on_vm_start, on_configure."""
        self._imports.activate(self)
        self.generation += 1
        self.streams.clear()
        self._pending_calls.clear()
        self._next_context_id = ROOT_CONTEXT_ID + 1
        self.root = RootContext(self.spec.vm_configuration, self.spec.configuration)
        self._effective = self.root
        try:
            self.vm = PluginVM(self.services.engine, self.module, self._linker,
                               self.services.memory_limit_bytes, self.services.deadline_ticks,
                               self.services.epoch_clock, self.module_exports)
            self.vm.start()
            self._invoke(self.root, "proxy_on_context_create", ROOT_CONTEXT_ID, 0)
            if self._invoke(self.root, "proxy_on_vm_start", ROOT_CONTEXT_ID,
                            len(self.spec.vm_configuration)) == 0:
                raise _load_error(self.spec, "proxy_on_vm_start returned false")
            self.root.configuring = True
            try:
                ok = self._invoke(self.root, "proxy_on_configure", ROOT_CONTEXT_ID,
                                  len(self.spec.configuration))
            finally:
                self.root.configuring = False
            if ok == 0:
                raise _load_error(self.spec, "proxy_on_configure returned false")
        except VMLoadError as exc:
            raise _load_error(self.spec, str(exc)) from exc
        except WasmTrap as exc:
            raise _load_error(self.spec, f"trapped while starting: {exc.message}") from exc
        except wasmtime.WasmtimeError as exc:
            raise _load_error(self.spec, f"instantiation failed: {exc}") from exc

    def _ensure_vm(self) -> bool:
        """Boot a new VM if the last one trapped; False if that fails too."""
        if self.vm is not None and not self.vm.broken:
            return True
        try:
            self._boot()
            log.info("plugin '%s' (sha256 %s) VM recreated", self.spec.name,
                     self.spec.sha256[:12])
            return True
        except PluginLoadError as exc:
            log.error("%s", exc)
            if self.vm is not None:
                self.vm.broken = True
            return False

    # -- streams --------------------------------------------------------------------------
    def new_stream(self, info: StreamInfo | None = None) -> HttpStream:
        """A stream context for one request. Drive it, then ``finish()`` it."""
        alive = self._ensure_vm()
        ctx = StreamContext(self._next_context_id, info or StreamInfo(), self.root)
        self._number(ctx)
        return HttpStream(self, ctx, self.generation if alive else -1)

    def _number(self, ctx: StreamContext) -> None:
        """``ctx`` takes the live VM's next context id and is one of its streams."""
        ctx.id = self._next_context_id
        self._next_context_id += 1
        self.streams[ctx.id] = ctx

    def move_to_live_vm(self, ctx: StreamContext) -> bool:
        """A stream context no callback has run for, opened on a VM that has trapped
        since: numbered on the live VM (started if need be), as ``new_stream`` numbers a
        new one. False if no VM can be started."""
        if not self._ensure_vm():
            return False
        if self.streams.get(ctx.id) is ctx:  # still under the trapped VM's numbering
            del self.streams[ctx.id]
        ctx.root = self.root
        self._number(ctx)
        return True

    def _invoke(self, ctx: Context, export: str, *args: int) -> int | None:
        """Call a plugin callback with ``ctx`` as the current (and effective) context."""
        imports = self._imports
        if imports.env.t is not self:
            imports.activate(self)
        self._effective = ctx
        try:
            return self.vm.call(export, *args)
        finally:
            self._effective = self.root

    def _invoke_each(self, ctx: Context,
                     calls: tuple[tuple[str, tuple[int, ...]], ...]) -> int | None:
        """``_invoke`` for several callbacks in a row, in one activation (a stream's first
        callback after its context creation; its three closing callbacks). Returns the
        last result; a trap stops the row and carries the callback's name (``callback``).
        """
        imports = self._imports
        if imports.env.t is not self:
            imports.activate(self)
        self._effective = ctx
        call = self.vm.call
        result = None
        try:
            for export, args in calls:
                try:
                    result = call(export, *args)
                except WasmTrap as exc:
                    exc.callback = export  # type: ignore[attr-defined]
                    raise
            return result
        finally:
            self._effective = self.root

    def _invoke_all(self, ctx: Context, exports: tuple[str, ...],
                    args: tuple[int, ...]) -> int | None:
        """``_invoke_each`` with the same arguments for every callback; the reference for
        the compiled driver's ``invoke_all``."""
        return self._invoke_each(ctx, tuple((export, args) for export in exports))

    def trapped(self, callback: str, exc: WasmTrap) -> None:
        """The one log line per trap; the VM is recreated for the next stream."""
        self.vm.broken = True
        log.error("plugin '%s' (sha256 %s) trapped in %s: %s", self.spec.name,
                  self.spec.sha256[:12], callback, exc.message)

    # -- ImportTarget: what host functions ask of the plugin host ---------------------------
    @property
    def effective(self) -> Context:
        return self._effective

    @property
    def log_level(self) -> LogLevel:
        level = self.plugin_log.getEffectiveLevel()
        for wasm_level, py_level in sorted(_PY_LEVEL.items()):
            if level <= py_level:
                return LogLevel(wasm_level)
        return LogLevel.CRITICAL

    def log(self, level: int, message: str) -> None:
        self.plugin_log.log(_PY_LEVEL.get(level, logging.INFO), "%s", message)

    def set_effective_context(self, context_id: int) -> Status:
        if context_id == ROOT_CONTEXT_ID:
            self._effective = self.root
            return Status.OK
        ctx = self.streams.get(context_id)
        if ctx is None:
            return Status.BAD_ARGUMENT
        self._effective = ctx
        return Status.OK

    def done(self) -> Status:
        return Status.NOT_FOUND

    def continue_stream(self, stream: StreamType) -> Status:
        ctx = self._effective
        if not isinstance(ctx, StreamContext):
            return Status.BAD_ARGUMENT
        if stream not in (StreamType.HTTP_REQUEST, StreamType.HTTP_RESPONSE):
            return Status.BAD_ARGUMENT
        ctx.continued = True
        ctx.wake()
        return Status.OK

    def close_stream(self, stream: StreamType) -> Status:
        ctx = self._effective
        if not isinstance(ctx, StreamContext):
            return Status.BAD_ARGUMENT
        ctx.reset_requested = True
        ctx.wake()
        return Status.OK

    def send_local_response(self, reply: LocalReplyRequest) -> Status:
        ctx = self._effective
        if not isinstance(ctx, StreamContext):
            return Status.BAD_ARGUMENT
        if ctx.local_reply is None:
            ctx.local_reply = reply
        ctx.wake()
        return Status.OK

    def register_queue(self, name: bytes) -> int:
        return self.services.shared_queues.register(self.spec.vm_id, name, self._queue_ready)

    def call_foreign(self, name: str, args: bytes) -> tuple[Status, bytes]:
        fn = self.services.foreign_functions.get(name)
        if fn is None:
            return Status.NOT_FOUND, b""
        ctx = self._effective
        # What a foreign function sees is constant for a stream: built on its first
        # foreign call and kept on the context (a frozen dataclass costs ~1.5 µs to build).
        call = ctx.foreign_call
        if call is None:
            info = ctx.info if isinstance(ctx, StreamContext) else None
            call = ctx.foreign_call = ForeignCall(
                self.spec.name, info.traceparent if info else None,
                info.tracestate if info else None, info.span if info else None)
        return fn(args, call)

    # -- ticks ------------------------------------------------------------------------------
    def set_tick_period(self, period_ms: int) -> None:
        self._tick_period_ms = period_ms
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None
        if period_ms and self._loop is not None and not self._closed:
            self._tick_task = self._loop.create_task(self._tick_loop(period_ms, self.generation))

    async def _tick_loop(self, period_ms: int, generation: int) -> None:
        while not self._closed and self.generation == generation:
            await asyncio.sleep(period_ms / 1000)
            if self.vm.broken or self.generation != generation:
                return
            try:
                self._invoke(self.root, "proxy_on_tick", ROOT_CONTEXT_ID)
            except WasmTrap as exc:
                self.trapped("proxy_on_tick", exc)
                return

    # -- shared queues ------------------------------------------------------------------
    def _queue_ready(self, qid: int) -> None:
        # Never re-enter a VM from inside another VM's host call: deliver on the loop.
        if self._loop is not None and not self._closed:
            self._loop.call_soon(self._deliver_queue_ready, qid, self.generation)

    def _deliver_queue_ready(self, qid: int, generation: int) -> None:
        if self._closed or self.vm.broken or generation != self.generation:
            return
        try:
            self._invoke(self.root, "proxy_on_queue_ready", ROOT_CONTEXT_ID, qid)
        except WasmTrap as exc:
            self.trapped("proxy_on_queue_ready", exc)

    # -- http calls ---------------------------------------------------------------------
    def http_call(self, cluster: str, headers: list[tuple[str, str]], body: bytes,
                  trailers: list[tuple[str, str]], timeout_ms: int) -> tuple[Status, int]:
        names = {k.lower() for k, _ in headers}
        if not {":method", ":path", ":authority"} <= names:
            return Status.BAD_ARGUMENT, 0
        dispatcher = self.services.http_dispatcher
        if dispatcher is None or not dispatcher.has_cluster(cluster) or self._loop is None:
            return Status.BAD_ARGUMENT, 0
        self._next_token += _TOKEN_STEP
        token = self._next_token
        self._pending_calls[token] = (self._effective.id, self.generation)
        task = self._loop.create_task(self._run_http_call(
            token, cluster, headers, body, trailers, timeout_ms / 1000))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Status.OK, token

    async def _run_http_call(self, token: int, cluster: str, headers: list[tuple[str, str]],
                             body: bytes, trailers: list[tuple[str, str]],
                             timeout_s: float) -> None:
        dispatcher = self.services.http_dispatcher
        assert dispatcher is not None
        try:
            r_headers, r_body, r_trailers = await asyncio.wait_for(
                dispatcher(cluster, headers, body, trailers, timeout_s), timeout_s or None)
        except TimeoutError:
            (r_headers, r_body), r_trailers = _synthetic_reply(504, _TIMEOUT_BODY), []
        except Exception as exc:  # the upstream is unreachable: answer as Envoy's router
            log.info("plugin '%s' http_call to %s failed: %r", self.spec.name, cluster, exc)
            (r_headers, r_body), r_trailers = _synthetic_reply(503, _CONNECT_FAILURE_BODY), []
        self.deliver_http_call_response(token, r_headers, r_body, r_trailers)

    def deliver_http_call_response(self, token: int, headers: list[tuple[str, str]],
                                   body: bytes, trailers: list[tuple[str, str]]) -> None:
        """Run ``proxy_on_http_call_response`` on the ROOT context, as Envoy 1.40 does."""
        origin = self._pending_calls.pop(token, None)
        if origin is None or self._closed or origin[1] != self.generation or self.vm.broken:
            return
        self.root.call_response = HttpCallResponse(HeaderMap(headers), Buffer(body),
                                                   HeaderMap(trailers))
        try:
            self._invoke(self.root, "proxy_on_http_call_response", ROOT_CONTEXT_ID, token,
                         len(headers), len(body), len(trailers))
        except WasmTrap as exc:
            self.trapped("proxy_on_http_call_response", exc)
            stream = self.streams.get(origin[0])
            if stream is not None:
                stream.failed = True
                stream.wake()
        finally:
            self.root.call_response = None

    # -- shutdown -----------------------------------------------------------------------
    async def close(self) -> None:
        """Stop ticks and pending calls, then run the root's on_done/on_delete."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        if self._tick_task is not None:
            tasks.append(self._tick_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.vm is not None and not self.vm.broken:
            try:
                self._invoke(self.root, "proxy_on_done", ROOT_CONTEXT_ID)
                self._invoke(self.root, "proxy_on_delete", ROOT_CONTEXT_ID)
            except WasmTrap as exc:
                self.trapped("proxy_on_done", exc)


class _SharedImports:
    """The import table linked once per engine, dispatching to the running plugin host.

    Defining ~90 host functions costs milliseconds; doing it once per engine instead of
    once per plugin keeps a cached plugin start near the instantiation cost. Only one
    plugin runs at a time on the event loop's thread and no host function enters another
    plugin's VM synchronously, so "the running host" is well defined: every entry into a
    VM (``_boot``, ``_invoke``) activates its host first.
    """

    # Slotted: the compiled driver reads `env` and `wasi` on every callback that
    # switches plugins (through the attribute cache, which serves slots only).
    __slots__ = ("linker", "_table", "env", "wasi")

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.linker = wasmtime.Linker(engine)
        table = HostFunctionTable(self.linker)
        self._table = table  # keeps the C callbacks alive with the linker
        self.env = ProxyWasmImports(None)  # type: ignore[arg-type]
        self.wasi = WasiImports(None)  # type: ignore[arg-type]
        define_env(table, self.env)
        define_wasi(table, self.wasi)

    def activate(self, host: PluginHost) -> None:
        # The compiled driver does the same inline (_driver.h, enter_host).
        self.env.t = host
        self.wasi.t = host


def _shared_imports(services: HostServices) -> _SharedImports:
    if services.host_imports is None:
        services.host_imports = _SharedImports(services.engine)
    imports = services.host_imports
    assert isinstance(imports, _SharedImports)
    return imports


def _load_error(spec: PluginSpec, cause: str) -> PluginLoadError:
    return PluginLoadError(f"plugin '{spec.name}' (sha256 {spec.sha256[:12]}): {cause}")


_KNOWN_IMPORTS = {("env", name) for name, _, _ in ENV_SIGNATURES} | {
    (module, name) for module in ("wasi_snapshot_preview1", "wasi_unstable")
    for name, _, _, _ in WASI_SIGNATURES
}


_IMPORTS_CHECKED: set[str] = set()


def _check_imports(spec: PluginSpec, module: wasmtime.Module) -> None:
    """Refuse unknown imports up front with a readable message (Envoy refuses them too)."""
    if spec.sha256 in _IMPORTS_CHECKED:
        return
    for imp in module.imports:
        if (imp.module, imp.name) not in _KNOWN_IMPORTS:
            raise _load_error(spec, f"unknown import {imp.module}.{imp.name}")
    _IMPORTS_CHECKED.add(spec.sha256)
