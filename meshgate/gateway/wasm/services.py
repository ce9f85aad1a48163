"""``HostServices``: what every plugin of one sidecar process shares.

One wasmtime engine (so compiled modules and the epoch clock are shared), the shared-data
store, shared queues, the metrics registry, the ``http_call`` dispatcher the data path
supplies, foreign functions, the module cache directory and the failure-containment knobs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import wasmtime
from prometheus_client import CollectorRegistry

from ._rawcall import compiled_epoch_clock
from .abi import Status
from .metrics import MetricStore
from .shared import SharedDataStore, SharedQueues

log = logging.getLogger("meshgate.gateway.wasm")

Headers = list[tuple[str, str]]
HttpCallResult = tuple[Headers, bytes, Headers]


class HttpCallDispatcher(Protocol):
    """Sends a plugin's ``proxy_http_call`` upstream; supplied by the data path.

    ``headers`` include the pseudo-headers (``:method``, ``:path``, ``:authority``); the
    result's headers include ``:status``. Raising means the call failed (the host then
    synthesises the reply Envoy would); the host applies ``timeout_s`` itself.
    """

    def __call__(self, cluster: str, headers: Headers, body: bytes, trailers: Headers,
                 timeout_s: float) -> Awaitable[HttpCallResult]: ...

    def has_cluster(self, name: str) -> bool: ...


class ForeignCall(NamedTuple):
    """What a foreign function sees besides its argument bytes.

    A named tuple: built once per stream that calls a foreign function (every plugged
    request's `record-span`), where a frozen dataclass cost 1.5 µs against 0.7 µs."""

    plugin_name: str
    #: The W3C trace context of the stream the call came from, if any.
    traceparent: str | None
    tracestate: str | None
    #: Opaque per-stream value from ``StreamInfo.span`` (e.g. an OpenTelemetry span).
    span: Any


#: A foreign function answers a status and result bytes; Envoy's ``NotFound`` for unknown
#: names is produced by the host, not by these.
ForeignFunction = Callable[[bytes, ForeignCall], tuple[Status, bytes]]


def _compress(args: bytes, _call: ForeignCall) -> tuple[Status, bytes]:
    return Status.OK, zlib.compress(args)


def _uncompress(args: bytes, _call: ForeignCall) -> tuple[Status, bytes]:
    try:
        return Status.OK, zlib.decompress(args)
    except zlib.error:
        return Status.SERIALIZATION_FAILURE, b""


def _accept(_args: bytes, _call: ForeignCall) -> tuple[Status, bytes]:
    return Status.OK, b""


def envoy_foreign_functions() -> dict[str, ForeignFunction]:
    """The Envoy foreign functions that make sense without Envoy's internals.

    ``compress``/``uncompress`` are zlib as in Envoy; ``clear_route_cache`` and
    ``declare_property`` are accepted and have no effect (the sidecar has no route cache
    and keeps properties untyped).
    """
    return {
        "compress": _compress,
        "uncompress": _uncompress,
        "clear_route_cache": _accept,
        "declare_property": _accept,
    }


class EpochTicker:
    """A daemon thread that bumps the engine's epoch every ``interval_s``: the clock of the
    ctypes crossings. With the compiled ones, a C thread does it (``epoch_clock``).

    The per-callback CPU deadline is a number of these ticks; wasm running past it traps
    with an "interrupt". The thread only touches the engine's atomic epoch counter and
    ``ticks``, a plain count of its bumps: a VM that armed its deadline at the same
    ``ticks`` would arm the same deadline again, so it skips the C call (see
    ``PluginVM.call``).
    """

    __slots__ = ("engine", "interval_s", "ticks", "_stop", "_thread")
    #: Calls into wasm must release the GIL for this thread to interrupt them.
    needs_gil = True

    def __init__(self, engine: wasmtime.Engine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.ticks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wasm-epoch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.engine.increment_epoch()
            self.ticks += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def epoch_clock(engine: wasmtime.Engine, interval_s: float) -> Any:
    """The engine's epoch clock: a C thread where the compiled crossings are in use (it
    needs no GIL, so calls into wasm keep it: decision 1500), else an ``EpochTicker``."""
    clock = compiled_epoch_clock(engine, interval_s)
    return clock if clock is not None else EpochTicker(engine, interval_s)


def make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    # A linear memory that never moves lets GuestMemory keep its base address.
    config.memory_may_move = False
    return wasmtime.Engine(config)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's feature flags as Linux lists them ("" where it does not). wasmtime
    compiles for the features it finds and refuses a module compiled for others, so
    sidecars on different CPUs sharing one cache directory must not share its files."""
    try:
        with cpuinfo.open() as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm64
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def engine_fingerprint(features: str) -> str:
    return hashlib.sha256(
        f"wasmtime={wasmtime.__dict__.get('__version__', '50.0.1')};epoch=1;may_move=0;"
        f"{platform.machine()};{platform.system()};cpu={features}".encode()
    ).hexdigest()[:16]


ENGINE_FINGERPRINT = engine_fingerprint(cpu_features())


class ModuleCache:
    """Serialised compiled modules on disk, keyed by the binary's sha256 and the engine
    (wasmtime's version and settings, the platform and the CPU's features).

    A file that fails to deserialise (other wasmtime build, truncated write) is treated as
    a miss and overwritten.
    """

    #: Modules kept in memory, most recently used last: a push that changes only a
    #: plugin's configuration reuses its module without reading the disk again.
    MEMO_SIZE = 8

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memo: OrderedDict[tuple[wasmtime.Engine, str], wasmtime.Module] = OrderedDict()

    def _remember(self, engine: wasmtime.Engine, sha256: str, module: wasmtime.Module) -> None:
        key = (engine, sha256)
        self._memo[key] = module
        self._memo.move_to_end(key)
        while len(self._memo) > self.MEMO_SIZE:
            self._memo.popitem(last=False)

    def forget(self) -> None:
        """Drop the in-memory modules (the disk cache stays)."""
        self._memo.clear()

    def _path(self, sha256: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{sha256}-{ENGINE_FINGERPRINT}.cwasm"

    def load(self, engine: wasmtime.Engine, sha256: str, wasm: bytes) -> tuple[wasmtime.Module,
                                                                               bool]:
        """Return the module and whether it came from the cache."""
        module = self.cached(engine, sha256)
        if module is not None:
            return module, True
        return self.compile(engine, sha256, wasm), False

    def cached(self, engine: wasmtime.Engine, sha256: str) -> wasmtime.Module | None:
        """The cached module, or None. Cheap (in memory, or a mapped file): the sidecar
        calls it on the event loop, where a thread hop would cost as much again."""
        module = self._memo.get((engine, sha256))
        if module is not None:
            self._memo.move_to_end((engine, sha256))
            return module
        path = self._path(sha256)
        if path is not None and path.exists():
            try:
                module = wasmtime.Module.deserialize_file(engine, str(path))
            except (wasmtime.WasmtimeError, OSError) as exc:
                log.warning("module cache entry %s unusable, recompiling: %s", path, exc)
                return None
            self._remember(engine, sha256, module)
            return module
        return None

    def compile(self, engine: wasmtime.Engine, sha256: str, wasm: bytes) -> wasmtime.Module:
        """Compile (seconds for a large plugin: run it off the event loop) and cache."""
        path = self._path(sha256)
        module = wasmtime.Module(engine, wasm)
        if path is not None:
            self._store(path, module)
        self._remember(engine, sha256, module)
        return module

    @staticmethod
    def _store(path: Path, module: wasmtime.Module) -> None:
        """Write `module` to `path` atomically. The files are native code that this
        process will run, so the directory is made private to its user. A directory that
        cannot be written costs the next start a compile, not this plugin its load."""
        tmp = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(module.serialize())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("module cache %s not writable, the module stays in memory only: %s",
                        path.parent, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


@dataclass(slots=True)
class HostServices:
    """Everything the plugins of one process share. Create one per sidecar; ``close()`` it.

    Slotted, as the stores below: the compiled host functions read them on every call,
    through an attribute cache that only slots can use (``_attrs.h``).

    ``http_dispatcher`` is supplied by the data path; without one every ``proxy_http_call``
    answers BAD_ARGUMENT (no cluster is known), as Envoy does for an unknown cluster.
    """

    http_dispatcher: HttpCallDispatcher | None = None
    module_cache_dir: Path | None = None
    #: CPU time one callback may take before it is interrupted (epoch deadline).
    callback_deadline_s: float = 0.5
    #: Linear-memory cap per VM; growing past it fails inside the plugin (usually a trap).
    memory_limit_bytes: int = 64 * 1024 * 1024
    #: How long a stream paused by a plugin waits for continue/local reply.
    pause_timeout_s: float = 60.0
    node_id: str = ""
    node_cluster: str = ""
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    foreign_functions: dict[str, ForeignFunction] = field(default_factory=envoy_foreign_functions)
    epoch_interval_s: float = 0.01
    shared_data: SharedDataStore = field(default_factory=SharedDataStore)
    shared_queues: SharedQueues = field(default_factory=SharedQueues)
    engine: wasmtime.Engine = field(default_factory=make_engine)
    #: The proxy-wasm import table, linked once per engine by the plugin host.
    host_imports: Any = field(default=None, init=False, repr=False)
    metrics: MetricStore = field(init=False, repr=False)
    module_cache: ModuleCache = field(init=False, repr=False)
    _ticker: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = MetricStore(self.metrics_registry)
        self.module_cache = ModuleCache(self.module_cache_dir)
        self._ticker = epoch_clock(self.engine, self.epoch_interval_s)

    @property
    def deadline_ticks(self) -> int:
        # +1: the current epoch may be about to tick the moment a callback starts.
        return max(1, round(self.callback_deadline_s / self.epoch_interval_s)) + 1

    @property
    def epoch_clock(self) -> Any:
        """The thread that bumps the engine's epoch (``epoch_clock``); VMs read its
        ``ticks``."""
        return self._ticker

    def start(self) -> None:
        """Start the epoch clock (idempotent; ``PluginHost.create`` calls it)."""
        self._ticker.start()

    def close(self) -> None:
        self._ticker.stop()

    def has_cluster(self, name: str) -> bool:
        return self.http_dispatcher is not None and self.http_dispatcher.has_cluster(name)
