"""The sidecar's Prometheus metrics, with trace-id exemplars on request latency.

Exemplars only appear in the OpenMetrics exposition; `/metrics` answers it when the
scraper asks for `application/openmetrics-text` (Prometheus does when exemplar storage
is on), and the classic text format otherwise.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

# Sub-millisecond buckets matter: a sidecar hop is a fraction of a millisecond.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "meshgate_sidecar_requests",
            "Requests answered by the sidecar",
            ("listener", "cluster", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "meshgate_sidecar_request_duration_seconds",
            "Time from request arrival to response handed to the client",
            ("listener",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.xds_responses = Counter(
            "meshgate_sidecar_xds_responses",
            "xDS responses by type and outcome (ack or nack)",
            ("type", "outcome"),
            registry=self.registry,
        )
        self.config_version = Gauge(
            "meshgate_sidecar_config_version",
            "Sequence number of the applied config snapshot (0: none yet)",
            registry=self.registry,
        )
        # How many plugged requests one event-loop pass ends: under load, more than one
        # (their closing callbacks run together, decision 1800).
        self.plugin_finish_batches = Histogram(
            "meshgate_sidecar_plugin_finish_batch_requests",
            "Plugged requests whose closing plugin callbacks ran together in one pass of "
            "the event loop",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        # How many plugged requests one event-loop pass brings to their request headers:
        # their plugins' request callbacks run together (decision 3100).
        self.plugin_request_batches = Histogram(
            "meshgate_sidecar_plugin_request_batch_requests",
            "Plugged requests whose request-headers plugin callbacks ran together in one "
            "pass of the event loop",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        # Label children cached by their values: `labels()` validates and hashes its
        # arguments under a lock on every call, several µs a request.
        self._children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}

    def observe_request(
        self, listener: str, cluster: str, status: int, seconds: float, trace_id: str | None
    ) -> None:
        """Count the request and observe its latency; `trace_id` (32 hex digits) becomes
        the latency bucket's exemplar."""
        key = (listener, cluster, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(listener, cluster, str(status))
        child.inc()
        exemplar = {"trace_id": trace_id} if trace_id else None
        latency = self._latency_children.get(listener)
        if latency is None:
            latency = self._latency_children[listener] = self.latency.labels(listener)
        latency.observe(seconds, exemplar=exemplar)

    def render(self, accept: str) -> tuple[bytes, str]:
        if "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return classic.generate_latest(self.registry), classic.CONTENT_TYPE_LATEST
