"""Endpoint choice per cluster policy (the sidecar's answer to Envoy's lb_policy)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from meshgate.gateway.resources import Cluster, Endpoint
from meshgate.gateway.upstream import UpstreamCluster

A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


def cluster(policy: str, *endpoints: Endpoint) -> UpstreamCluster:
    session: Any = None  # endpoint choice never touches the session
    return UpstreamCluster(Cluster("c", 1.0, "c", policy), endpoints, session)


def test_round_robin_cycles_through_the_endpoints() -> None:
    c = cluster("ROUND_ROBIN", A, B, C)
    assert [c.pick() for _ in range(6)] == [A, B, C, A, B, C]


def test_least_request_avoids_the_endpoint_with_requests_in_flight() -> None:
    c = cluster("LEAST_REQUEST", A, B)
    for _ in range(3):
        c.started(A)
    assert Counter(c.pick() for _ in range(50)) == Counter({B: 50})
    for _ in range(3):
        c.finished(A)
    c.started(B)
    assert Counter(c.pick() for _ in range(50)) == Counter({A: 50})
