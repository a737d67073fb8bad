"""Helpers shared by the store tests (not collected: no ``test_`` prefix).

The identity rule every backend follows (tested in test_contract.py): one record per
dead-lettered message. A put whose id is known merges into that record only when it is
the same message (``records.same_message``: same originalQueue, rawBody and headers); a
different message under a taken id is stored under ``records.distinct_id`` and never
changes the first. The engine's ids (``attempts.stable_id``) already differ for different
messages; the store rule keeps that true for any writer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from sidecar.store.records import DeadLetterRecord, payload_from_body

T0 = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    """T0 plus some minutes (millisecond precision, like stored times)."""
    return T0 + timedelta(minutes=minutes)


def make_record(id: str = "msg-1", **overrides: Any) -> DeadLetterRecord:
    """A complete record shaped like the seed's example, with overrides."""
    body = overrides.pop("rawBody", None)
    if body is None:
        body = msgspec.json.encode({"jobId": id, "url": "https://example.com/page"})
    fields: dict[str, Any] = {
        "id": id,
        "originalQueue": "url.to_scrape",
        "payload": payload_from_body(body),
        "rawBody": body,
        "failureReason": "TIMEOUT",
        "errorMessage": "Request timed out after 5000ms",
        "attemptCount": 3,
        "firstFailureAt": T0,
        "lastFailureAt": at(5),
        "processingHost": "scraper-agent-1",
        "agentVersion": "1.2.3",
        "deadLetteredAt": at(5),
    }
    fields.update(overrides)
    return DeadLetterRecord(**fields)
