"""The dead-letter store's behavioural contract, run against every backend."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from sidecar.store.base import DeadLetterStore
from sidecar.store.records import (
    DeadLetterRecord,
    MetricSnapshot,
    PatternRow,
    RecordFilter,
    distinct_id,
    missing_fields,
    normalise_record,
)
from tests.store.contract import T0, at, make_record

# --- put / get


def test_store_satisfies_protocol(store: DeadLetterStore) -> None:
    assert isinstance(store, DeadLetterStore)
    assert store.name in ("sqlite", "mongodb", "postgresql")
    assert store.describe()


def test_store_id_is_a_uuid_hex_kept_across_calls(store: DeadLetterStore) -> None:
    store_id = store.store_id()
    assert re.fullmatch(r"[0-9a-f]{32}", store_id), store_id
    store.put(make_record("after-id"))
    assert store.store_id() == store_id


def test_put_get_round_trips_every_field(store: DeadLetterStore) -> None:
    plus2 = timezone(timedelta(hours=2))
    payload = {
        "jobId": "abc123",
        "url": "https://example.com/page",
        "nested": {"list": [1, 2.5, "three", None, True], "empty": {}},
        "unicode": "héllo \u2603",
    }
    record = make_record(
        "abc123",
        rawBody=msgspec.json.encode(payload),
        payload=payload,
        failureReason="NETWORK_ERROR",
        errorMessage="read ECONNRESET",
        attemptCount=4,
        firstFailureAt=datetime(2024, 1, 1, 12, 0, 0, 123000, tzinfo=plus2),
        lastFailureAt=datetime(2024, 1, 1, 10, 5, 0, 456000, tzinfo=UTC),
        processingHost="scraper-agent-7",
        agentVersion="2.0.0-rc1",
        agentName="scraper",
        routingKey="url.to_scrape",
        exchange="webloom",
        headers={"x-death": [{"count": 3, "queue": "url.to_scrape"}], "x-trace": "t-1"},
        properties={
            "content_type": "application/json",
            "correlation_id": "corr-9",
            "priority": 5,
            "delivery_mode": 2,
        },
        signature="network_error:read econnreset",
        deadLetteredAt=datetime(2024, 1, 1, 10, 5, 1, tzinfo=UTC),
        reprocessed=True,
        reprocessedAt=datetime(2024, 1, 1, 11, 0, tzinfo=UTC),
        reprocessCount=1,
        reprocessTarget="url.to_scrape",
        retryToken="tok-0",
        history=[{"at": "2024-01-01T11:00:00Z", "targetQueue": "url.to_scrape", "tool": "cli"}],
    )
    assert store.put(record) is True
    got = store.get("abc123")
    assert got == record
    assert type(got.rawBody) is bytes and got.rawBody == record.rawBody
    assert got.payload == payload
    for name in ("firstFailureAt", "lastFailureAt", "deadLetteredAt", "reprocessedAt"):
        value = getattr(got, name)
        assert value.utcoffset() == timedelta(0), name
    assert got.firstFailureAt == datetime(2024, 1, 1, 10, 0, 0, 123000, tzinfo=UTC)


def test_binary_body_keeps_exact_bytes_and_null_payload(store: DeadLetterStore) -> None:
    body = bytes(range(256))
    store.put(make_record("bin", rawBody=body, payload=None))
    got = store.get("bin")
    assert got is not None
    assert got.rawBody == body
    assert got.payload is None
    assert got.headers == {} and got.properties == {} and got.history == []


def test_times_are_truncated_to_milliseconds_on_every_backend(store: DeadLetterStore) -> None:
    fine = datetime(2024, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)
    store.put(make_record("ms", firstFailureAt=fine, lastFailureAt=fine, deadLetteredAt=fine))
    got = store.get("ms")
    assert got is not None
    assert got.firstFailureAt == fine.replace(microsecond=123000)
    assert got.lastFailureAt == got.deadLetteredAt == fine.replace(microsecond=123000)


def test_naive_datetimes_are_refused(store: DeadLetterStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.put(make_record("naive", lastFailureAt=datetime(2024, 1, 1, 10, 5)))
    assert store.get("naive") is None


def test_get_unknown_id_is_none(store: DeadLetterStore) -> None:
    assert store.get("nope") is None


# --- idempotent put


def test_put_same_id_twice_keeps_one_record(store: DeadLetterStore) -> None:
    record = make_record("dup")
    assert store.put(record) is True
    assert store.put(record) is False
    assert store.count() == 1
    assert store.get("dup") == normalise_record(record)


def test_later_failure_of_known_id_updates_it(store: DeadLetterStore) -> None:
    store.put(make_record("dup", attemptCount=3, lastFailureAt=at(5), deadLetteredAt=at(5)))
    later = make_record(
        "dup",
        attemptCount=6,
        firstFailureAt=at(8),
        lastFailureAt=at(10),
        deadLetteredAt=at(10),
        errorMessage="Request timed out after 9000ms",
        failureReason="TIMEOUT_HARD",
        signature="timeout:hard",
        payload={"changed": True},
        processingHost="scraper-agent-2",
    )
    assert store.put(later) is False
    got = store.get("dup")
    assert got is not None
    assert store.count() == 1
    assert got.attemptCount == 6
    assert got.lastFailureAt == at(10)
    assert got.deadLetteredAt == at(10)
    assert got.errorMessage == "Request timed out after 9000ms"
    assert got.failureReason == "TIMEOUT_HARD"
    assert got.signature == "timeout:hard"
    # The first failure and the original message are kept.
    assert got.firstFailureAt == T0
    assert got.payload == make_record("dup").payload
    assert got.processingHost == "scraper-agent-1"
    assert store.count(RecordFilter(reason="TIMEOUT_HARD")) == 1
    assert store.count(RecordFilter(reason="TIMEOUT")) == 0


# --- identity: one record per dead-lettered message (see tests/store/contract.py)


def test_different_messages_sharing_an_id_are_two_records(store: DeadLetterStore) -> None:
    """Regression: producers reuse message_ids; c2's body used to vanish into c1's record."""
    c1 = make_record("same-1", rawBody=b'{"id":"c1"}', errorMessage="e1", lastFailureAt=at(1))
    c2 = make_record("same-1", rawBody=b'{"id":"c2"}', errorMessage="e2", lastFailureAt=at(2))
    assert store.put(c1) is True
    assert store.put(c2) is True
    assert store.count() == 2
    first = store.get("same-1")
    assert first is not None
    assert (first.rawBody, first.errorMessage, first.lastFailureAt) == (b'{"id":"c1"}', "e1", at(1))
    second = store.get(distinct_id(normalise_record(c2)))
    assert second is not None
    assert (second.rawBody, second.errorMessage) == (b'{"id":"c2"}', "e2")
    assert second.payload == {"id": "c2"}


def test_other_headers_or_queue_make_another_message(store: DeadLetterStore) -> None:
    base = make_record("m", headers={"tenant": "a"})
    assert store.put(base) is True
    assert store.put(make_record("m", headers={"tenant": "b"})) is True
    assert store.put(make_record("m", headers={"tenant": "a"}, originalQueue="other")) is True
    assert store.count() == 3


def test_the_same_message_dead_lettered_twice_stays_one_record(store: DeadLetterStore) -> None:
    c1 = make_record("same-1", rawBody=b'{"id":"c1"}', lastFailureAt=at(1))
    c2 = make_record("same-1", rawBody=b'{"id":"c2"}', lastFailureAt=at(2))
    store.put(c1)
    store.put(c2)
    # A redelivery after a crash writes each again; a later failure updates its own record.
    assert store.put(c1) is False
    assert store.put(c2) is False
    c2_later = make_record(
        "same-1", rawBody=b'{"id":"c2"}', lastFailureAt=at(9), errorMessage="again"
    )
    assert store.put(c2_later) is False
    assert store.count() == 2
    got = store.get(distinct_id(normalise_record(c2)))
    assert got is not None and got.errorMessage == "again"
    first = store.get("same-1")
    assert first is not None and first.rawBody == b'{"id":"c1"}'


def test_older_or_equal_failure_changes_nothing(store: DeadLetterStore) -> None:
    store.put(make_record("dup", attemptCount=5, lastFailureAt=at(10), deadLetteredAt=at(10)))
    before = store.get("dup")
    assert store.put(make_record("dup", attemptCount=2, lastFailureAt=at(1))) is False
    assert store.put(make_record("dup", attemptCount=9, lastFailureAt=at(10))) is False
    assert store.get("dup") == before


def test_put_after_reprocess_resets_reprocessed_keeps_history(store: DeadLetterStore) -> None:
    store.put(make_record("again"))
    assert store.mark_reprocessed("again", token="t1", target_queue="q", at=at(20), tool="cli")
    # A replay of the same failure (e.g. a spool drained twice) is not a new failure.
    assert store.put(make_record("again")) is False
    assert store.get("again").reprocessed is True
    # It failed again after the reprocess.
    assert store.put(make_record("again", lastFailureAt=at(30), attemptCount=3)) is False
    got = store.get("again")
    assert got is not None
    assert got.reprocessed is False
    assert got.reprocessCount == 1
    assert len(got.history) == 1
    assert got.reprocessedAt == at(20)
    assert got.lastFailureAt == at(30)


# --- find / count


@pytest.fixture
def populated(store: DeadLetterStore) -> DeadLetterStore:
    """Six records across queues, reasons, hosts and times."""
    rows = [
        ("a", "url.to_scrape", "TIMEOUT", "Request timed out after 5000ms", "h1", 1, "timeout"),
        ("b", "url.to_scrape", "NETWORK_ERROR", "read ECONNRESET", "h2", 2, "net:econnreset"),
        ("c", "html.raw", "TIMEOUT", "Request timed out after 7000ms", "h1", 3, "timeout"),
        ("d", "html.raw", "VALIDATION_FAILED", "missing field url", "h3", 4, "validation:url"),
        ("e", "html.parsed", "RATE_LIMITED", "429 retry in 30s (a.b)", "h2", 5, ""),
        ("f", "url.to_scrape", "TIMEOUT", "Request timed out after 5000ms", "h2", 6, "timeout"),
    ]
    for id_, queue, reason, message, host, minute, signature in rows:
        store.put(
            make_record(
                id_,
                originalQueue=queue,
                failureReason=reason,
                errorMessage=message,
                processingHost=host,
                firstFailureAt=at(minute - 0.5),
                lastFailureAt=at(minute),
                deadLetteredAt=at(minute + 0.25),
                signature=signature,
            )
        )
    store.mark_reprocessed("c", token=None, target_queue="html.raw", at=at(10), tool="cli")
    return store


def ids(records: list[DeadLetterRecord]) -> list[str]:
    return [r.id for r in records]


def test_find_is_newest_first(populated: DeadLetterStore) -> None:
    assert ids(populated.find()) == ["f", "e", "d", "c", "b", "a"]


def test_find_ties_on_time_break_by_id_descending(store: DeadLetterStore) -> None:
    for id_ in ("x2", "x1", "x3"):
        store.put(make_record(id_, lastFailureAt=at(1)))
    store.put(make_record("y", lastFailureAt=at(0)))
    assert ids(store.find()) == ["x3", "x2", "x1", "y"]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (RecordFilter(queue="url.to_scrape"), ["f", "b", "a"]),
        (RecordFilter(reason="TIMEOUT"), ["f", "c", "a"]),
        (RecordFilter(host="h2"), ["f", "e", "b"]),
        (RecordFilter(queue="html.raw", reason="TIMEOUT"), ["c"]),
        (RecordFilter(since=at(3)), ["f", "e", "d", "c"]),
        (RecordFilter(until=at(3)), ["b", "a"]),
        (RecordFilter(since=at(2), until=at(5)), ["d", "c", "b"]),
        (RecordFilter(pattern="econnreset"), ["b"]),  # errorMessage, any case
        (RecordFilter(pattern="timed OUT"), ["f", "c", "a"]),
        (RecordFilter(pattern="validation:"), ["d"]),  # signature
        (RecordFilter(pattern="rate_lim"), ["e"]),  # failureReason
        (RecordFilter(pattern="(a.b)"), ["e"]),  # taken literally, not as a regex
        (RecordFilter(pattern="a.c"), []),
        (RecordFilter(reprocessed=True), ["c"]),
        (RecordFilter(reprocessed=False), ["f", "e", "d", "b", "a"]),
        (RecordFilter(ids=["a", "d", "zz"]), ["d", "a"]),
        (RecordFilter(ids=[]), []),
        (RecordFilter(queue="nowhere"), []),
        (RecordFilter(), ["f", "e", "d", "c", "b", "a"]),
    ],
)
def test_find_and_count_filters(
    populated: DeadLetterStore, flt: RecordFilter, expected: list[str]
) -> None:
    assert ids(populated.find(flt)) == expected
    assert populated.count(flt) == len(expected)


def test_filter_times_in_other_zones_compare_as_instants(populated: DeadLetterStore) -> None:
    minus5 = timezone(timedelta(hours=-5))
    assert ids(populated.find(RecordFilter(since=at(5).astimezone(minus5)))) == ["f", "e"]


def test_paging(populated: DeadLetterStore) -> None:
    assert ids(populated.find(limit=2)) == ["f", "e"]
    assert ids(populated.find(limit=2, offset=2)) == ["d", "c"]
    assert ids(populated.find(limit=2, offset=4)) == ["b", "a"]
    assert populated.find(limit=2, offset=6) == []
    assert populated.find(limit=0) == []
    assert ids(populated.find(RecordFilter(reason="TIMEOUT"), limit=1, offset=1)) == ["c"]
    with pytest.raises(ValueError):
        populated.find(limit=-1)


def test_count(populated: DeadLetterStore) -> None:
    assert populated.count() == 6
    assert populated.count(None) == 6
    assert populated.count(RecordFilter(host="h1")) == 2


# --- aggregations


def test_failure_patterns_by_reason_like_the_seed(populated: DeadLetterStore) -> None:
    assert populated.failure_patterns() == [
        PatternRow("TIMEOUT", 3, at(0.5), at(6)),
        PatternRow("NETWORK_ERROR", 1, at(1.5), at(2)),
        PatternRow("RATE_LIMITED", 1, at(4.5), at(5)),
        PatternRow("VALIDATION_FAILED", 1, at(3.5), at(4)),
    ]


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (
            "processingHost",
            [("h2", 3, 1.5, 6), ("h1", 2, 0.5, 3), ("h3", 1, 3.5, 4)],
        ),
        (
            "originalQueue",
            [("url.to_scrape", 3, 0.5, 6), ("html.raw", 2, 2.5, 4), ("html.parsed", 1, 4.5, 5)],
        ),
        (
            "signature",
            [
                ("timeout", 3, 0.5, 6),
                ("", 1, 4.5, 5),
                ("net:econnreset", 1, 1.5, 2),
                ("validation:url", 1, 3.5, 4),
            ],
        ),
    ],
)
def test_failure_patterns_by_each_key(
    populated: DeadLetterStore, by: str, expected: list[tuple[str, int, float, float]]
) -> None:
    rows = populated.failure_patterns(by=by)  # type: ignore[arg-type]
    assert rows == [PatternRow(k, n, at(first), at(last)) for k, n, first, last in expected]
    for row in rows:
        assert row.firstOccurrence.utcoffset() == timedelta(0)


def test_failure_patterns_with_filter_and_bad_key(populated: DeadLetterStore) -> None:
    assert populated.failure_patterns(RecordFilter(host="h2")) == [
        PatternRow("NETWORK_ERROR", 1, at(1.5), at(2)),
        PatternRow("RATE_LIMITED", 1, at(4.5), at(5)),
        PatternRow("TIMEOUT", 1, at(5.5), at(6)),
    ]
    assert populated.failure_patterns(RecordFilter(queue="nowhere")) == []
    with pytest.raises(ValueError):
        populated.failure_patterns(by="errorMessage")  # type: ignore[arg-type]


def test_oldest_newest(store: DeadLetterStore) -> None:
    assert store.oldest_newest() == (None, None)
    store.put(make_record("one", deadLetteredAt=at(3)))
    assert store.oldest_newest() == (at(3), at(3))


def test_oldest_newest_populated(populated: DeadLetterStore) -> None:
    assert populated.oldest_newest() == (at(1.25), at(6.25))
    assert populated.oldest_newest(RecordFilter(queue="html.raw")) == (at(3.25), at(4.25))
    assert populated.oldest_newest(RecordFilter(queue="nowhere")) == (None, None)


def test_signatures_are_distinct_and_non_empty(populated: DeadLetterStore) -> None:
    assert populated.signatures() == {"timeout", "net:econnreset", "validation:url"}


def test_signatures_empty_store(store: DeadLetterStore) -> None:
    assert store.signatures() == set()


# --- operator retries


def test_begin_retry_claims(store: DeadLetterStore) -> None:
    assert store.begin_retry("missing", "t1") is False
    store.put(make_record("r"))
    assert store.in_flight_retries() == []
    assert store.begin_retry("r", "t1") is True
    assert store.begin_retry("r", "t1") is True  # same token: idempotent
    assert store.begin_retry("r", "t2") is False  # another retry is in flight
    assert store.get("r").retryToken == "t1"
    assert ids(store.in_flight_retries()) == ["r"]


def test_cancel_retry(store: DeadLetterStore) -> None:
    store.put(make_record("r"))
    store.begin_retry("r", "t1")
    assert store.cancel_retry("r", "t2") is False
    assert store.cancel_retry("missing", "t1") is False
    assert store.cancel_retry("r", "t1") is True
    assert store.get("r").retryToken is None
    assert store.in_flight_retries() == []
    assert store.begin_retry("r", "t2") is True


def test_mark_reprocessed_is_idempotent_per_token(store: DeadLetterStore) -> None:
    store.put(make_record("r"))
    assert store.begin_retry("r", "t1")
    assert store.mark_reprocessed("r", token="t1", target_queue="q1", at=at(20), tool="cli")
    got = store.get("r")
    assert got is not None
    assert got.reprocessed is True
    assert got.reprocessedAt == at(20)
    assert got.reprocessTarget == "q1"
    assert got.reprocessCount == 1
    assert got.retryToken is None
    assert got.history == [
        {"at": "2024-01-01T10:20:00Z", "targetQueue": "q1", "tool": "cli", "token": "t1"}
    ]
    assert store.in_flight_retries() == []

    # The same token again (a retried call after a lost reply) does nothing.
    assert not store.mark_reprocessed("r", token="t1", target_queue="q9", at=at(25), tool="x")
    assert store.get("r") == got

    # A new retry is recorded on top.
    assert store.begin_retry("r", "t2")
    assert store.mark_reprocessed("r", token="t2", target_queue="q2", at=at(30), tool="api")
    got = store.get("r")
    assert got.reprocessCount == 2
    assert got.reprocessTarget == "q2"
    assert [h["token"] for h in got.history] == ["t1", "t2"]
    assert [h["tool"] for h in got.history] == ["cli", "api"]


def test_mark_reprocessed_without_token_and_unknown_id(store: DeadLetterStore) -> None:
    assert not store.mark_reprocessed("missing", token=None, target_queue="q", at=at(1), tool="t")
    store.put(make_record("r"))
    assert store.mark_reprocessed("r", token=None, target_queue="q", at=at(1), tool="t")
    assert store.mark_reprocessed("r", token=None, target_queue="q", at=at(2), tool="t")
    assert store.get("r").reprocessCount == 2


def test_mark_reprocessed_keeps_another_operators_claim(store: DeadLetterStore) -> None:
    store.put(make_record("r"))
    assert store.begin_retry("r", "theirs")
    assert store.mark_reprocessed("r", token="mine", target_queue="q", at=at(1), tool="t")
    assert store.get("r").retryToken == "theirs"
    assert ids(store.in_flight_retries()) == ["r"]


def test_mark_reprocessed_repeat_releases_a_leftover_claim(store: DeadLetterStore) -> None:
    store.put(make_record("r"))
    store.mark_reprocessed("r", token="t1", target_queue="q", at=at(1), tool="t")
    # A crash-recovery path re-claims with the same token, then re-marks.
    assert store.begin_retry("r", "t1")
    assert not store.mark_reprocessed("r", token="t1", target_queue="q", at=at(1), tool="t")
    assert store.get("r").retryToken is None
    assert store.get("r").reprocessCount == 1


def test_in_flight_retries_lists_only_claimed(populated: DeadLetterStore) -> None:
    populated.begin_retry("a", "ta")
    populated.begin_retry("d", "td")
    assert ids(populated.in_flight_retries()) == ["d", "a"]
    assert {r.retryToken for r in populated.in_flight_retries()} == {"ta", "td"}


# --- delete


def test_delete_by_filter(populated: DeadLetterStore) -> None:
    assert populated.delete(RecordFilter(reason="TIMEOUT", host="h1")) == 2
    assert ids(populated.find()) == ["f", "e", "d", "b"]
    assert populated.delete(RecordFilter(ids=["zz"])) == 0
    assert populated.delete(RecordFilter(reprocessed=False, pattern="econnreset")) == 1
    assert populated.delete(RecordFilter()) == 3
    assert populated.count() == 0


# --- metrics


def test_metrics_insert_and_query(store: DeadLetterStore) -> None:
    for minute, n in ((2, 20), (0, 0), (1, 10), (3, 30)):
        store.insert_metric(
            MetricSnapshot(type="dlq_size", queue="dead_letter", count=n, timestamp=at(minute))
        )
    store.insert_metric(
        MetricSnapshot(
            type="dlq_growth",
            queue="dead_letter",
            count=1.5,
            timestamp=at(1),
            labels={"agent": "scraper"},
        )
    )
    got = store.metrics("dlq_size")
    assert [m.count for m in got] == [0.0, 10.0, 20.0, 30.0]  # oldest first
    assert [m.timestamp for m in got] == [at(0), at(1), at(2), at(3)]
    assert all(m.queue == "dead_letter" and m.type == "dlq_size" for m in got)
    assert [m.count for m in store.metrics("dlq_size", since=at(2))] == [20.0, 30.0]
    # limit keeps the most recent, still oldest first
    assert [m.count for m in store.metrics("dlq_size", limit=2)] == [20.0, 30.0]
    assert store.metrics("dlq_size", limit=0) == []
    assert store.metrics("dlq_growth") == [
        MetricSnapshot(
            type="dlq_growth",
            queue="dead_letter",
            count=1.5,
            timestamp=at(1),
            labels={"agent": "scraper"},
        )
    ]
    assert store.metrics("unknown") == []


def test_metric_timestamps_are_aware_utc_ms(store: DeadLetterStore) -> None:
    ts = datetime(2024, 1, 1, 12, 0, 0, 987654, tzinfo=timezone(timedelta(hours=2)))
    store.insert_metric(MetricSnapshot(type="dlq_size", queue="q", count=1, timestamp=ts))
    (got,) = store.metrics("dlq_size")
    assert got.timestamp == datetime(2024, 1, 1, 10, 0, 0, 987000, tzinfo=UTC)
    assert got.timestamp.utcoffset() == timedelta(0)


# --- completeness (used by the chaos test)


def test_stored_records_have_all_required_fields(populated: DeadLetterStore) -> None:
    for record in populated.find(limit=100):
        assert missing_fields(record) == []


def test_missing_fields() -> None:
    assert missing_fields(make_record()) == []
    assert missing_fields(make_record(payload=None)) == []  # non-UTF-8 body
    assert missing_fields(make_record(originalQueue="", processingHost=" ")) == [
        "originalQueue",
        "processingHost",
    ]
    assert missing_fields(make_record(failureReason="", id="")) == ["failureReason", "id"]
    doc = msgspec.to_builtins(make_record())
    assert missing_fields(doc) == []
    doc["_id"] = doc.pop("id")  # a raw MongoDB document
    assert missing_fields(doc) == []
    del doc["payload"], doc["attemptCount"], doc["_id"]
    assert missing_fields(doc) == ["payload", "attemptCount", "id"]
    assert missing_fields({"attemptCount": None, "payload": None})[:3] == [
        "originalQueue",
        "failureReason",
        "errorMessage",
    ]


def test_failure_history_round_trips_and_follows_the_latest_failure(
    store: DeadLetterStore,
) -> None:
    first = [
        {"attempt": n, "reason": "NETWORK_ERROR", "error": f"reset {n}",
         "at": f"2024-01-01T10:0{n}:00Z", "host": "h1", "agentVersion": "1.0"}
        for n in (1, 2, 3)
    ]  # fmt: skip
    store.put(make_record("hist", failures=first, lastFailureAt=at(5), deadLetteredAt=at(5)))
    assert store.get("hist").failures == first
    # Retried from the DLQ and failed again: the new record carries the whole journey.
    journey = [*first, {**first[0], "at": "2024-01-01T10:20:00Z", "error": "again"}]
    store.put(make_record("hist", failures=journey, lastFailureAt=at(20), deadLetteredAt=at(20)))
    assert store.get("hist").failures == journey
    # A replay of an older failure does not roll the history back.
    store.put(make_record("hist", failures=first, lastFailureAt=at(5), deadLetteredAt=at(5)))
    assert store.get("hist").failures == journey
    assert store.get("other") is None and make_record("other").failures == []


# --- the trace id


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _forget_trace_id(store: DeadLetterStore, id: str) -> None:
    """Rewrite a stored record as a sidecar without trace ids wrote it: no ``traceId`` key
    in its document at all (not even null)."""
    if store.name == "sqlite":
        with store._tx("test") as conn:  # type: ignore[attr-defined]
            (doc,) = conn.execute("SELECT doc FROM dead_letter WHERE id = ?", (id,)).fetchone()
            older = msgspec.json.decode(doc)
            del older["traceId"]
            conn.execute(
                "UPDATE dead_letter SET doc = ? WHERE id = ?", (msgspec.json.encode(older), id)
            )
    elif store.name == "postgresql":
        with store._tx("test") as cur:  # type: ignore[attr-defined]
            cur.execute(
                "UPDATE dead_letter SET doc = doc - 'traceId', doc_exact = NULL WHERE id = %s",
                (id,),
            )
            assert cur.rowcount == 1
    else:
        result = store._records.update_one(  # type: ignore[attr-defined]
            {"_id": id}, {"$unset": {"traceId": ""}}
        )
        assert result.modified_count == 1


def test_trace_id_round_trips_and_defaults_to_none(store: DeadLetterStore) -> None:
    store.put(make_record("traced", traceId=TRACE_ID))
    store.put(make_record("untraced"))
    traced, untraced = store.get("traced"), store.get("untraced")
    assert traced is not None and traced.traceId == TRACE_ID
    assert untraced is not None and untraced.traceId is None
    assert {r.id: r.traceId for r in store.find()} == {"traced": TRACE_ID, "untraced": None}


def test_records_written_before_trace_ids_still_read(store: DeadLetterStore) -> None:
    record = make_record("older", traceId=TRACE_ID)
    store.put(record)
    _forget_trace_id(store, "older")
    got = store.get("older")
    assert got == normalise_record(msgspec.structs.replace(record, traceId=None))
    assert [r.id for r in store.find(RecordFilter(queue=record.originalQueue))] == ["older"]
    # And a later failure of the same message still merges into them (not a new record).
    later = msgspec.structs.replace(record, lastFailureAt=at(9), attemptCount=5)
    assert store.put(later) is False
    merged = store.get("older")
    assert merged is not None and merged.attemptCount == 5
    assert store.count() == 1
