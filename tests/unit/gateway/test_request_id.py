"""The x-request-id the sidecar generates when a client sends none."""

from __future__ import annotations

import uuid

from meshgate.gateway.proxy import request_id


def test_request_ids_are_random_uuid4_in_32_hex_digits() -> None:
    ids = {request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        assert len(rid) == 32
        parsed = uuid.UUID(hex=rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
