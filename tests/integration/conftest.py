"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.conformance import ConformanceUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[ConformanceUpstream]:
    """The conformance suite's controllable upstream, one per test module."""
    with ConformanceUpstream() as server:
        yield server
