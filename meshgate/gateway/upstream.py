"""Upstream clusters at run time: one pooled aiohttp session per cluster, endpoint choice.

A session outlives config versions: an EDS update that only moves endpoints keeps the
cluster's session (and its warm keep-alive connections), so updates under load cost no
reconnects. A session is closed only once no config that is still serving a request
references it (see `SessionPool.retain`).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

import aiohttp

from meshgate.gateway.resources import Cluster, Endpoint


class NoHealthyUpstream(Exception):
    """The cluster has no endpoint to send to (Envoy: 503, response flag UH)."""


def _new_session(connect_timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # Envoy's default circuit breakers allow 1024; aiohttp's 100 would queue
        keepalive_timeout=60.0,
        ttl_dns_cache=30,
        force_close=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,  # a proxy passes bytes through as the upstream sent them
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        raise_for_status=False,
        requote_redirect_url=False,
    )


class SessionPool:
    """aiohttp sessions keyed by cluster name and connect timeout."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, float], aiohttp.ClientSession] = {}

    def get(self, cluster: Cluster) -> aiohttp.ClientSession:
        key = (cluster.name, cluster.connect_timeout_s)
        session = self._sessions.get(key)
        if session is None or session.closed:
            session = self._sessions[key] = _new_session(cluster.connect_timeout_s)
        return session

    async def retain(self, keep: set[int]) -> None:
        """Close every session whose id() is not in `keep`."""
        for key, session in list(self._sessions.items()):
            if id(session) not in keep:
                del self._sessions[key]
                await session.close()

    async def close(self) -> None:
        await self.retain(set())


@dataclass
class UpstreamCluster:
    """A cluster as the data path uses it: endpoints, balancer state, session."""

    spec: Cluster
    endpoints: tuple[Endpoint, ...]
    session: aiohttp.ClientSession
    _rr: itertools.count = field(default_factory=itertools.count)
    _active: dict[Endpoint, int] = field(default_factory=dict)

    def pick(self) -> Endpoint:
        endpoints = self.endpoints
        if not endpoints:
            raise NoHealthyUpstream(self.spec.name)
        if len(endpoints) == 1:
            return endpoints[0]
        policy = self.spec.lb_policy
        if policy == "RANDOM":
            return random.choice(endpoints)
        if policy == "LEAST_REQUEST":
            # Power of two choices, Envoy's default for LEAST_REQUEST.
            a, b = random.sample(endpoints, 2)
            return a if self._active.get(a, 0) <= self._active.get(b, 0) else b
        return endpoints[next(self._rr) % len(endpoints)]

    # Requests in flight per endpoint matter to LEAST_REQUEST only; other policies skip
    # the count (hashing an Endpoint twice a request showed in the sidecar's profile).
    def started(self, endpoint: Endpoint) -> None:
        if self.spec.lb_policy == "LEAST_REQUEST":
            self._active[endpoint] = self._active.get(endpoint, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        if self.spec.lb_policy == "LEAST_REQUEST":
            self._active[endpoint] = self._active.get(endpoint, 1) - 1


async def close_later(pool: SessionPool, keep: set[int], delay_s: float) -> None:
    """Give requests of an older config time to finish, then drop unused sessions."""
    await asyncio.sleep(delay_s)
    await pool.retain(keep)
