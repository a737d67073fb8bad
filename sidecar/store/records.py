"""Dead-letter record types shared by every store backend.

Field names follow the "DLQ Structure" of the source design (camelCase, as stored in
MongoDB) so that a record in SQLite, in MongoDB and on the wire has one vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from sidecar import limits

__all__ = [
    "REQUIRED_FIELDS",
    "DeadLetterRecord",
    "MetricSnapshot",
    "PatternRow",
    "RecordFilter",
    "distinct_id",
    "missing_fields",
    "normalise_filter",
    "normalise_metric",
    "normalise_record",
    "payload_from_body",
    "same_message",
    "utc_ms",
]


class DeadLetterRecord(msgspec.Struct, kw_only=True):
    """One dead-lettered message: the seed's fields plus what a faithful republish needs."""

    id: str
    originalQueue: str
    payload: Any
    rawBody: bytes
    failureReason: str
    errorMessage: str
    attemptCount: int
    firstFailureAt: datetime
    lastFailureAt: datetime
    processingHost: str
    agentVersion: str
    agentName: str = ""
    routingKey: str = ""
    exchange: str = ""
    headers: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    signature: str = ""
    deadLetteredAt: datetime
    reprocessed: bool = False
    reprocessedAt: datetime | None = None
    reprocessCount: int = 0
    reprocessTarget: str | None = None
    retryToken: str | None = None
    history: list[dict[str, Any]] = []
    # Each charged failure on the way here (attempt, reason, error, at, host, agentVersion),
    # oldest first and bounded (see sidecar.attempts); ``history`` is the reprocess log.
    failures: list[dict[str, Any]] = []
    # The W3C trace id (32 lower-case hex) of the message's ``traceparent``, so a dead letter
    # can be found from its trace; None when the message carried none (and in older records).
    traceId: str | None = None


class RecordFilter(msgspec.Struct, kw_only=True):
    """Selects records; every set field must match (AND).

    ``since`` is inclusive and ``until`` exclusive, both on ``lastFailureAt``, so adjacent
    windows never count a record twice. ``pattern`` is a case-insensitive substring of
    failureReason, errorMessage or signature. ``ids=[]`` matches nothing.
    """

    queue: str | None = None
    reason: str | None = None
    host: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    pattern: str | None = None
    reprocessed: bool | None = None
    ids: list[str] | None = None


class PatternRow(msgspec.Struct):
    """One row of the seed's failure-pattern aggregation ($group by a key)."""

    key: str
    count: int
    firstOccurrence: datetime
    lastOccurrence: datetime


class MetricSnapshot(msgspec.Struct, kw_only=True):
    """A point of the seed's ``db.metrics`` collection (e.g. type "dlq_size")."""

    type: str
    queue: str
    count: float
    timestamp: datetime
    labels: dict[str, str] = {}


REQUIRED_FIELDS: tuple[str, ...] = (
    "originalQueue",
    "payload",
    "failureReason",
    "errorMessage",
    "attemptCount",
    "firstFailureAt",
    "lastFailureAt",
    "processingHost",
    "agentVersion",
    "id",
)

# A record whose one of these is "" cannot be routed back or attributed: treat as missing.
_NON_EMPTY: frozenset[str] = frozenset({"id", "originalQueue", "failureReason", "processingHost"})
# payload=None is legitimate (a body that is not UTF-8); only its absence is a defect.
_NULLABLE: frozenset[str] = frozenset({"payload"})


def payload_from_body(body: bytes) -> Any:
    """Decode a body for humans and queries; ``rawBody`` keeps the exact bytes anyway.

    JSON value when the body is valid UTF-8 JSON nested at most ``limits.MAX_NESTING``
    levels, else the UTF-8 text, else None. The depth is checked before decoding: a deep body
    would exhaust the stack of the decoder and of every store that re-encodes it.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if limits.json_nesting_exceeds(text):
        return text
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return text


def _unusable(name: str, value: Any) -> bool:
    """A present field that still cannot be relied on."""
    if value is None:
        return name not in _NULLABLE
    return name in _NON_EMPTY and (not isinstance(value, str) or not value.strip())


def missing_fields(record: DeadLetterRecord | Mapping[str, Any]) -> list[str]:
    """Names of REQUIRED_FIELDS absent (or unusable) in a record or a raw stored document.

    Used by the chaos tests to assert that no dead letter was stored without its fields;
    a raw MongoDB document's ``_id`` stands for ``id``.
    """
    missing: list[str] = []
    for name in REQUIRED_FIELDS:
        if isinstance(record, Mapping):
            key = "_id" if name == "id" and "id" not in record else name
            present, value = key in record, record.get(key)
        else:
            present, value = hasattr(record, name), getattr(record, name, None)
        if not present or _unusable(name, value):
            missing.append(name)
    return missing


def same_message(a: DeadLetterRecord, b: DeadLetterRecord) -> bool:
    """Whether two records (normalised) are the same dead-lettered message: same queue,
    same bytes, same publisher headers. Failure details may differ (a later failure)."""
    return (
        a.originalQueue == b.originalQueue
        and bytes(a.rawBody) == bytes(b.rawBody)
        and a.headers == b.headers
    )


def distinct_id(record: DeadLetterRecord) -> str:
    """The id under which a record is kept when its id is already taken by a different
    message (``same_message`` false): the id plus a digest of queue, headers and body, so a
    repeat of this message lands on the same record again.

    The DLQ identity rule every backend follows: one record per dead-lettered message. A
    put of a known id merges into it only when it is the same message; a different message
    under that id is stored under ``distinct_id`` and never overwrites the first."""
    digest = hashlib.sha256()
    digest.update(record.originalQueue.encode("utf-8", "surrogatepass"))
    digest.update(b"\0")
    digest.update(msgspec.json.encode(record.headers, order="sorted"))
    digest.update(b"\0")
    digest.update(bytes(record.rawBody))
    return f"{record.id}~{digest.hexdigest()[:16]}"


def utc_ms(value: datetime) -> datetime:
    """Aware UTC datetime truncated to milliseconds.

    BSON dates hold milliseconds; truncating in the store layer for every backend keeps
    the contract identical (what you get back equals what was stored, on any backend).
    Naive datetimes are refused: guessing their zone would silently shift failure times.
    """
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"naive datetime {value!r}: dead-letter times must be timezone-aware")
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so every backend stores (and returns) the same values."""
    return msgspec.json.decode(msgspec.json.encode(value))


def normalise_record(record: DeadLetterRecord) -> DeadLetterRecord:
    """Canonical form written by every backend: UTC ms datetimes, JSON-safe documents."""
    return msgspec.structs.replace(
        record,
        firstFailureAt=utc_ms(record.firstFailureAt),
        lastFailureAt=utc_ms(record.lastFailureAt),
        deadLetteredAt=utc_ms(record.deadLetteredAt),
        reprocessedAt=None if record.reprocessedAt is None else utc_ms(record.reprocessedAt),
        payload=_json_safe(record.payload),
        headers=_json_safe(record.headers),
        properties=_json_safe(record.properties),
        history=_json_safe(record.history),
        failures=_json_safe(record.failures),
        rawBody=bytes(record.rawBody),
    )


def normalise_filter(flt: RecordFilter | None) -> RecordFilter:
    """Filter bounds truncated like stored times, so both backends compare the same values."""
    if flt is None:
        return RecordFilter()
    return msgspec.structs.replace(
        flt,
        since=None if flt.since is None else utc_ms(flt.since),
        until=None if flt.until is None else utc_ms(flt.until),
    )


def normalise_metric(snapshot: MetricSnapshot) -> MetricSnapshot:
    """Canonical metric: UTC ms timestamp, float count, str labels."""
    return msgspec.structs.replace(
        snapshot,
        timestamp=utc_ms(snapshot.timestamp),
        count=float(snapshot.count),
        labels={str(k): str(v) for k, v in snapshot.labels.items()},
    )
