"""Dead-letter record functions shared by every store backend: payload decoding, required fields
and the canonical form each backend writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import msgspec
import pytest

from sidecar.store import records as r

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
T0_MS = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))


def make(**overrides: Any) -> r.DeadLetterRecord:
    fields: dict[str, Any] = {
        "id": "m1",
        "originalQueue": "q",
        "payload": {"jobId": "abc"},
        "rawBody": b'{"jobId": "abc"}',
        "failureReason": "TIMEOUT",
        "errorMessage": "took too long",
        "attemptCount": 3,
        "firstFailureAt": T0,
        "lastFailureAt": T0,
        "processingHost": "host-1",
        "agentVersion": "1.0",
        "deadLetteredAt": T0,
    }
    fields.update(overrides)
    return r.DeadLetterRecord(**fields)


# --- payload_from_body ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b'{"jobId": "abc", "n": [1, 2]}', {"jobId": "abc", "n": [1, 2]}),
        (b"[1, 2]", [1, 2]),
        (b'"text"', "text"),
        (b"42", 42),
        (b"null", None),
        (b"plain text, not JSON", "plain text, not JSON"),
        (b"", ""),
        ("caf\u00e9 {".encode(), "caf\u00e9 {"),
        (b"\xff\xfe not utf-8", None),
    ],
)
def test_payload_is_json_then_text_then_none(body, payload):
    assert r.payload_from_body(body) == payload


# --- missing_fields ------------------------------------------------------------------------


def test_a_complete_record_misses_nothing():
    assert r.missing_fields(make()) == []
    assert r.missing_fields(msgspec.to_builtins(make())) == []


def test_required_fields_are_the_seeds():
    assert r.REQUIRED_FIELDS == (
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


def test_a_null_payload_is_legitimate_but_an_absent_one_is_not():
    assert r.missing_fields(make(payload=None)) == []
    document = msgspec.to_builtins(make())
    del document["payload"]
    assert r.missing_fields(document) == ["payload"]


@pytest.mark.parametrize("name", ["id", "originalQueue", "failureReason", "processingHost"])
@pytest.mark.parametrize("value", ["", "   ", None, 5])
def test_routing_fields_must_be_non_empty_text(name, value):
    document = msgspec.to_builtins(make())
    document[name] = value
    assert r.missing_fields(document) == [name]


def test_other_fields_may_be_empty_but_not_null():
    assert r.missing_fields(make(errorMessage="", agentVersion="")) == []
    document = msgspec.to_builtins(make())
    document["errorMessage"] = None
    document["attemptCount"] = None
    assert r.missing_fields(document) == ["errorMessage", "attemptCount"]


def test_a_stored_document_uses_underscore_id_for_id():
    document = msgspec.to_builtins(make())
    document["_id"] = document.pop("id")
    assert r.missing_fields(document) == []
    del document["_id"]
    assert r.missing_fields(document) == ["id"]
    # An explicit id wins over _id.
    assert r.missing_fields({**msgspec.to_builtins(make()), "_id": ""}) == []


def test_every_absent_field_is_named_in_order():
    assert r.missing_fields({}) == list(r.REQUIRED_FIELDS)


def test_a_record_object_with_an_empty_id_is_missing_it():
    assert r.missing_fields(make(id="", processingHost=" ")) == ["processingHost", "id"]


# --- utc_ms --------------------------------------------------------------------------------


def test_times_are_utc_truncated_to_milliseconds():
    assert r.utc_ms(T0) == T0_MS
    local = T0.astimezone(PLUS2)
    converted = r.utc_ms(local)
    assert converted == T0_MS
    assert converted.tzinfo is UTC
    assert converted.hour == 12
    assert r.utc_ms(T0_MS) == T0_MS
    assert r.utc_ms(T0.replace(microsecond=999999)).microsecond == 999000


class _ZoneLike(tzinfo):
    """A zone whose offset depends on the date, like a ZoneInfo: no offset without one."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None if dt is None else timedelta(hours=2)

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "ZONE"


class _NoOffset(_ZoneLike):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


def test_a_zone_with_date_dependent_offsets_is_aware():
    local = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=_ZoneLike())
    assert r.utc_ms(local) == T0_MS


def test_a_zone_without_an_offset_is_naive_and_refused():
    with pytest.raises(ValueError, match="must be timezone-aware"):
        r.utc_ms(datetime(2024, 5, 1, 12, 0, tzinfo=_NoOffset()))


def test_a_naive_time_is_refused():
    with pytest.raises(ValueError, match=r"naive datetime .* must be timezone-aware"):
        r.utc_ms(datetime(2024, 5, 1, 12, 0))


# --- normalise_record ----------------------------------------------------------------------


def test_normalising_converts_every_time_and_document():
    record = make(
        firstFailureAt=T0.astimezone(PLUS2),
        lastFailureAt=T0 + timedelta(seconds=1),
        deadLetteredAt=T0 + timedelta(seconds=2),
        reprocessedAt=T0.astimezone(PLUS2),
        payload={"when": T0, "n": (1, 2)},
        headers={"x": (1, 2), "at": T0},
        properties={"message_id": "m1", "expiration": (3,)},
        history=[{"at": T0, "ids": (1,)}],
        rawBody=bytearray(b"raw"),
    )
    out = r.normalise_record(record)
    assert out.firstFailureAt == T0_MS and out.firstFailureAt.tzinfo is UTC
    assert out.lastFailureAt == T0_MS + timedelta(seconds=1)
    assert out.deadLetteredAt == T0_MS + timedelta(seconds=2)
    assert out.reprocessedAt == T0_MS and out.reprocessedAt.tzinfo is UTC
    # JSON-safe: tuples become lists, datetimes their ISO text, as every backend returns them.
    iso = msgspec.json.decode(msgspec.json.encode(T0))
    assert out.payload == {"when": iso, "n": [1, 2]}
    assert out.headers == {"x": [1, 2], "at": iso}
    assert out.properties == {"message_id": "m1", "expiration": [3]}
    assert out.history == [{"at": iso, "ids": [1]}]
    assert type(out.rawBody) is bytes and out.rawBody == b"raw"
    # Everything else is kept as it was.
    assert (out.id, out.originalQueue, out.attemptCount, out.errorMessage) == (
        "m1",
        "q",
        3,
        "took too long",
    )


def test_normalising_keeps_an_absent_reprocess_time_absent():
    assert r.normalise_record(make()).reprocessedAt is None


def test_normalising_refuses_naive_times():
    with pytest.raises(ValueError):
        r.normalise_record(make(lastFailureAt=datetime(2024, 1, 1)))


# --- normalise_filter and normalise_metric -------------------------------------------------


def test_no_filter_is_the_match_everything_filter():
    assert r.normalise_filter(None) == r.RecordFilter()


def test_filter_bounds_are_truncated_like_stored_times():
    flt = r.RecordFilter(queue="q", since=T0.astimezone(PLUS2), until=T0 + timedelta(hours=1))
    out = r.normalise_filter(flt)
    assert out.since == T0_MS and out.since.tzinfo is UTC
    assert out.until == T0_MS + timedelta(hours=1)
    assert out.queue == "q"
    only_until = r.normalise_filter(r.RecordFilter(until=T0))
    assert (only_until.since, only_until.until) == (None, T0_MS)
    only_since = r.normalise_filter(r.RecordFilter(since=T0))
    assert (only_since.since, only_since.until) == (T0_MS, None)


def test_metrics_are_normalised():
    snapshot = r.MetricSnapshot(
        type="dlq_size", queue="q", count=3, timestamp=T0.astimezone(PLUS2), labels={"a": 1}
    )
    out = r.normalise_metric(snapshot)  # type: ignore[arg-type]
    assert out.timestamp == T0_MS and out.timestamp.tzinfo is UTC
    assert out.count == 3.0 and type(out.count) is float
    assert out.labels == {"a": "1"}
    assert (out.type, out.queue) == ("dlq_size", "q")
