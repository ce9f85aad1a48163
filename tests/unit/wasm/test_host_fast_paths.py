"""Behaviour kept by the host-function fast paths of decision 0900."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from meshgate.gateway.wasm.abi import MetricType, Status
from meshgate.gateway.wasm.headers import HeaderMap
from meshgate.gateway.wasm.metrics import MetricStore


def test_set_replaces_the_first_value_and_drops_later_duplicates() -> None:
    m = HeaderMap([("A", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("a", "5")])
    m.set("a", "x")
    assert m.items() == [("a", "x"), ("b", "2"), ("c", "4")]
    m.set("d", "y")
    m.set("B", "z")
    assert m.items() == [("a", "x"), ("b", "z"), ("c", "4"), ("d", "y")]


def test_scrapes_see_exact_counter_and_gauge_values_without_double_counting() -> None:
    registry = CollectorRegistry()
    store = MetricStore(registry)
    _, counter = store.define(int(MetricType.COUNTER), "hits")
    _, gauge = store.define(int(MetricType.GAUGE), "open")
    assert store.increment(counter, 2) == Status.OK
    assert store.record(gauge, 9) == Status.OK
    assert registry.get_sample_value("wasmcustom_hits_total") == 2
    assert registry.get_sample_value("wasmcustom_hits_total") == 2  # a second scrape
    store.increment(counter, 3)
    store.increment(gauge, -4)
    assert registry.get_sample_value("wasmcustom_hits_total") == 5
    assert registry.get_sample_value("wasmcustom_open") == 5
    assert store.get(counter) == (Status.OK, 5)
