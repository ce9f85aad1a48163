"""Python's cyclic garbage collector in the sidecar: its collections and pauses on
`/metrics`, and the young-generation threshold the sidecar runs at.

CPython collects its youngest generation when its count of new container objects reaches
700. Under plugged load that happens every few dozen requests, and each collection walks
the whole in-flight set (plugin streams, header maps, coroutines) to find nothing: the
data path makes no reference cycles per request, refcounting frees it all. The sidecar
therefore runs at 10,000, where load runs collect almost never and serve plugged
requests faster (decision 2200); 0 keeps the interpreter's threshold.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

#: The sidecar's young-generation threshold (decision 2200); 0 keeps the interpreter's
#: (CPython: 700).
DEFAULT_YOUNG_THRESHOLD = 10_000


class CollectorWatch:
    """Sets the young-generation threshold while installed, and counts every collection
    and its pause by generation.

    The gc callback only adds to plain numbers: it can run inside any allocation, so it
    must take no lock (prometheus-client's metrics do); `/metrics` reads the numbers
    through `collect`.
    """

    def __init__(self, registry: CollectorRegistry, young_threshold: int) -> None:
        """`young_threshold` 0 leaves the interpreter's threshold alone."""
        if young_threshold < 0:
            raise ValueError(f"gc young threshold must be 0 or more, not {young_threshold}")
        self.young_threshold = young_threshold
        self.collections = [0, 0, 0]
        self.pause_seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        self._saved: tuple[int, ...] | None = None
        self._callback = self._on_collect  # one bound method, to remove the same one
        registry.register(self)

    def install(self) -> None:
        if self._saved is not None:
            return
        self._saved = gc.get_threshold()
        if self.young_threshold > 0:
            gc.set_threshold(self.young_threshold, *self._saved[1:])
        gc.callbacks.append(self._callback)

    def close(self) -> None:
        """Restore the threshold found at `install` and stop counting."""
        if self._saved is None:
            return
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        gc.set_threshold(*self._saved)
        self._saved = None

    def _on_collect(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self.collections[generation] += 1
        self.pause_seconds[generation] += time.perf_counter() - self._started

    def collect(self) -> Iterator[Any]:
        collections = CounterMetricFamily(
            "meshgate_sidecar_gc_collections", "Collections of Python's cyclic garbage "
            "collector in the sidecar, by generation (0: youngest)", labels=("generation",))
        pauses = CounterMetricFamily(
            "meshgate_sidecar_gc_pause_seconds", "Time the sidecar spent in those "
            "collections, by generation: the data path waits for them", labels=("generation",))
        for generation in range(3):
            collections.add_metric((str(generation),), self.collections[generation])
            pauses.add_metric((str(generation),), self.pause_seconds[generation])
        yield collections
        yield pauses
