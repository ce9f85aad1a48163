"""The sidecar's hold on Python's garbage collector: threshold set and restored, and every
collection counted on /metrics."""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from meshgate.gateway.collector import CollectorWatch
from meshgate.gateway.metrics import SidecarMetrics


@pytest.fixture
def threshold() -> Iterator[tuple[int, ...]]:
    saved = gc.get_threshold()
    yield saved
    gc.set_threshold(*saved)


def scraped(metrics: SidecarMetrics, name: str) -> dict[str, float]:
    text = metrics.render("text/plain")[0].decode()
    return {g: float(v) for g, v in re.findall(rf'{name}_total{{generation="(\d)"}} (\S+)', text)}


def test_the_young_threshold_holds_while_installed_and_is_restored(
    threshold: tuple[int, ...],
) -> None:
    watch = CollectorWatch(CollectorRegistry(), 12_345)
    watch.install()
    assert gc.get_threshold() == (12_345, *threshold[1:])
    watch.close()
    assert gc.get_threshold() == threshold
    watch.close()  # a second close changes nothing
    assert gc.get_threshold() == threshold


def test_threshold_zero_leaves_the_interpreters(threshold: tuple[int, ...]) -> None:
    watch = CollectorWatch(CollectorRegistry(), 0)
    watch.install()
    try:
        assert gc.get_threshold() == threshold
    finally:
        watch.close()


def test_a_negative_threshold_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="gc young threshold must be 0 or more, not -1"):
        CollectorWatch(CollectorRegistry(), -1)


def test_collections_and_their_pauses_reach_metrics_by_generation(
    threshold: tuple[int, ...],
) -> None:
    metrics = SidecarMetrics()
    watch = CollectorWatch(metrics.registry, 10_000)
    watch.install()
    try:
        before = scraped(metrics, "meshgate_sidecar_gc_collections")
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        after = scraped(metrics, "meshgate_sidecar_gc_collections")
        pauses = scraped(metrics, "meshgate_sidecar_gc_pause_seconds")
    finally:
        watch.close()
    assert after["0"] - before["0"] >= 1
    assert after["2"] - before["2"] == 2
    assert pauses["2"] > 0
    gc.collect(2)  # closed: no longer counted
    assert scraped(metrics, "meshgate_sidecar_gc_collections")["2"] == after["2"]


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "must be 0 or more, not -1"), ("1e3", "not a whole number: '1e3'")])
def test_the_sidecar_command_refuses_a_bad_threshold_by_name(
    value: str, message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    from meshgate.gateway.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--xds", "127.0.0.1:1", "--node-id", "n", "--gc-young-threshold", value])
    assert exit_info.value.code == 2
    assert f"argument --gc-young-threshold: {message}" in capsys.readouterr().err
