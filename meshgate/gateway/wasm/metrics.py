"""Plugin-defined metrics (``proxy_define_metric`` & co.), exported to a Prometheus registry.

Envoy names a plugin's stat ``wasmcustom.<name>``; Prometheus names allow no dots, so the
exported name is ``wasmcustom_<name>`` with every other invalid character replaced by
``_``. The exact integer value is kept next to the Prometheus object because
``proxy_get_metric`` answers a u64 and Prometheus stores floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from .abi import MetricType, Status

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
# Metric ids carry their type in the low two bits, like proxy-wasm-cpp-host's, so a plugin
# that inspects ids sees the same shape as under Envoy.
_ID_STEP = 4


@dataclass(slots=True)
class _Metric:
    type: MetricType
    value: int
    prom: Counter | Gauge | Histogram
    #: For counters: how much of ``value`` the Prometheus counter already holds.
    synced: int = 0


class _SyncBeforeCollect:
    """Registered ahead of every plugin metric: a scrape first copies the exact values
    into the Prometheus counters and gauges. Plugins bump counters several times a
    request and a Prometheus ``inc`` (lock included) cost ~2-4 µs of each such host
    call under load (decision 0900); scrapes are rare."""

    def __init__(self, store: MetricStore) -> None:
        self._store = store

    def describe(self) -> list[Metric]:
        return []  # owns no names: the counters and gauges are registered themselves

    def collect(self) -> list[Metric]:
        self._store.sync()
        return []


def prometheus_name(name: str) -> str:
    return "wasmcustom_" + _INVALID.sub("_", name)


class MetricStore:
    """Metrics of all plugins of one process; ids are shared by name, as Envoy's stats are."""

    __slots__ = ("registry", "_by_name", "_metrics", "_next")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._by_name: dict[tuple[MetricType, str], int] = {}
        self._metrics: dict[int, _Metric] = {}
        self._next = {t: int(t) for t in MetricType}
        # Before any plugin metric, so the registry (which collects in registration
        # order) runs it first on every scrape.
        registry.register(_SyncBeforeCollect(self))

    def define(self, mtype: int, name: str) -> tuple[Status, int]:
        try:
            t = MetricType(mtype)
        except ValueError:
            return Status.BAD_ARGUMENT, 0
        existing = self._by_name.get((t, name))
        if existing is not None:
            return Status.OK, existing
        prom_name = prometheus_name(name)
        doc = f"proxy-wasm plugin metric {name}"
        prom: Counter | Gauge | Histogram
        try:
            if t is MetricType.COUNTER:
                prom = Counter(prom_name, doc, registry=self.registry)
            elif t is MetricType.GAUGE:
                prom = Gauge(prom_name, doc, registry=self.registry)
            else:
                prom = Histogram(prom_name, doc, registry=self.registry)
        except ValueError:
            # The same name already registered with another type: Envoy refuses too.
            return Status.BAD_ARGUMENT, 0
        mid = self._next[t]
        self._next[t] += _ID_STEP
        self._by_name[(t, name)] = mid
        self._metrics[mid] = _Metric(t, 0, prom)
        return Status.OK, mid

    def increment(self, mid: int, delta: int) -> Status:
        m = self._metrics.get(mid)
        if m is None:
            return Status.NOT_FOUND
        if m.type is MetricType.COUNTER:
            if delta < 0:
                return Status.BAD_ARGUMENT
            m.value += delta
        elif m.type is MetricType.GAUGE:
            m.value += delta
        else:
            return Status.BAD_ARGUMENT
        return Status.OK

    def record(self, mid: int, value: int) -> Status:
        m = self._metrics.get(mid)
        if m is None:
            return Status.NOT_FOUND
        if m.type is MetricType.COUNTER:
            m.value += value
        elif m.type is MetricType.GAUGE:
            m.value = value
        else:
            m.prom.observe(value)  # type: ignore[union-attr]
        return Status.OK

    def sync(self) -> None:
        """Bring the Prometheus counters and gauges up to the exact values."""
        for m in self._metrics.values():
            if m.type is MetricType.COUNTER:
                if m.value != m.synced:
                    m.prom.inc(m.value - m.synced)  # type: ignore[union-attr]
                    m.synced = m.value
            elif m.type is MetricType.GAUGE:
                m.prom.set(m.value)  # type: ignore[union-attr]

    def get(self, mid: int) -> tuple[Status, int]:
        m = self._metrics.get(mid)
        # Envoy answers BAD_ARGUMENT both for unknown ids and for histograms (observed).
        if m is None or m.type is MetricType.HISTOGRAM:
            return Status.BAD_ARGUMENT, 0
        return Status.OK, m.value
