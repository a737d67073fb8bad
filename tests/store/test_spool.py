"""The local durable spool: real SQLite spool, a primary whose availability we control.

Only the primary's availability is simulated (a wrapper around a real SqliteStore that
raises StoreUnavailable on demand); the spool file itself is real SQLite on disk.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sidecar.store.base import DeadLetterStore, PutResult, StoreUnavailable, put_each
from sidecar.store.mongo import MongoStore
from sidecar.store.records import DeadLetterRecord, RecordFilter, normalise_record
from sidecar.store.spool import SpoolingStore
from sidecar.store.sqlite import SqliteStore
from tests.store.contract import at, make_record


class FlakyPrimary:
    """A real SqliteStore that can be switched off, or fail after k more puts."""

    name = "flaky"

    def __init__(self, path: Path) -> None:
        self.inner = SqliteStore(path)
        self.down = False
        self.puts_left: int | None = None  # fail once this many more puts succeeded
        self.ack_lost_on: str | None = None  # write this id, then report failure
        self.poison: set[str] = set()
        self.put_calls = 0
        self.batches: list[int] = []  # the size of each put_many
        self.accepted: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("flaky primary: switched off")

    def put(self, record: DeadLetterRecord) -> bool:
        self.put_calls += 1
        self._check()
        if self.puts_left is not None:
            if self.puts_left == 0:
                self.down = True
                self._check()
            self.puts_left -= 1
        if record.id in self.poison:
            raise ValueError(f"poison {record.id}")
        new = self.inner.put(record)
        self.accepted.append(record.id)
        if record.id == self.ack_lost_on:
            self.ack_lost_on = None
            raise StoreUnavailable("flaky primary: reply lost after the write")
        return new

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        """Like a backend without multi-record transactions (the worst case for a drain):
        one put after another, so a failure can land after part of the batch was written."""
        self.batches.append(len(records))
        return put_each(self.put, records)

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if not callable(target) or attr in ("close", "describe"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return target(*args, **kwargs)

        return call


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[FlakyPrimary]:
    p = FlakyPrimary(tmp_path / "primary.db")
    yield p
    p.inner.close()


@pytest.fixture
def spool(primary: FlakyPrimary, tmp_path: Path) -> Iterator[SpoolingStore]:
    s = SpoolingStore(primary, tmp_path / "spool" / "spool.db", retry_primary_after=0)
    yield s
    s.close()


def records(n: int, prefix: str = "m") -> list[DeadLetterRecord]:
    return [make_record(f"{prefix}{i:03d}", lastFailureAt=at(i)) for i in range(n)]


def test_is_a_dead_letter_store(spool: SpoolingStore) -> None:
    assert isinstance(spool, DeadLetterStore)
    assert spool.name == "flaky"
    assert "spool" in spool.describe()


def test_store_id_is_the_primarys(spool: SpoolingStore, primary: FlakyPrimary) -> None:
    assert spool.store_id() == primary.inner.store_id()


def test_puts_go_to_primary_while_it_is_up(spool: SpoolingStore, primary: FlakyPrimary) -> None:
    assert spool.put(make_record("a")) is True
    assert spool.put(make_record("a")) is False  # the primary's idempotency shows through
    assert spool.spooled() == 0
    assert spool.primary_available is True
    assert spool.count() == 1


def test_puts_spool_while_primary_is_down(spool: SpoolingStore, primary: FlakyPrimary) -> None:
    primary.down = True
    for record in records(5):
        assert spool.put(record) is True  # durable locally: the caller may ack
    assert spool.spooled() == 5
    assert spool.primary_available is False
    assert primary.inner.count() == 0
    with pytest.raises(StoreUnavailable):
        spool.find()
    with pytest.raises(StoreUnavailable):
        spool.ping()
    # The spooled bytes are really on disk, in a file another connection can read.
    conn = sqlite3.connect(spool.spool_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0] == 5
    finally:
        conn.close()


def test_drain_moves_spooled_records_in_order(spool: SpoolingStore, primary: FlakyPrimary) -> None:
    primary.down = True
    batch = records(5)
    for record in batch:
        spool.put(record)
    assert spool.drain() == 0  # still down: nothing moves, nothing is lost
    assert spool.spooled() == 5

    primary.down = False
    assert spool.drain() == 5
    assert primary.accepted == [r.id for r in batch]
    assert spool.spooled() == 0
    assert spool.primary_available is True
    assert spool.count() == 5
    for record in batch:
        assert spool.get(record.id) == normalise_record(record)
    assert spool.drain() == 0


def test_repeated_failures_of_one_id_drain_to_one_record(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    spool.put(make_record("x", attemptCount=3, lastFailureAt=at(1)))
    spool.put(make_record("x", attemptCount=6, lastFailureAt=at(2)))
    primary.down = False
    assert spool.drain() == 2
    assert spool.count() == 1
    got = spool.get("x")
    assert got.attemptCount == 6 and got.lastFailureAt == at(2)


def test_crash_mid_drain_then_drain_again_yields_each_record_once(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    batch = records(10)
    for record in batch:
        spool.put(record)
    primary.down = False
    primary.puts_left = 4  # the primary dies after four records of the drained batch
    assert spool.drain() == 0  # the batch failed: all of it stays spooled
    assert spool.spooled() == 10
    assert spool.primary_available is False

    primary.down = False
    primary.puts_left = None
    assert spool.drain() == 10
    assert spool.spooled() == 0
    ids = [r.id for r in batch]
    assert primary.accepted == [*ids[:4], *ids]  # the four written twice: no-ops the 2nd time
    assert sorted(r.id for r in spool.find(limit=100)) == ids
    assert spool.count() == 10


def test_reply_lost_after_primary_write_duplicates_nothing(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    batch = records(4)
    for record in batch:
        spool.put(record)
    primary.down = False
    primary.ack_lost_on = batch[2].id  # written, but the drain sees a failure: kept in spool
    assert spool.drain() == 0
    assert spool.spooled() == 4
    assert spool.drain() == 4
    assert spool.spooled() == 0
    ids = [r.id for r in batch]
    assert primary.accepted == [*ids[:3], *ids]  # the re-puts of the first three were no-ops
    assert spool.count() == 4
    assert [r.id for r in spool.find(limit=100)] == [r.id for r in reversed(batch)]


def test_spool_survives_a_restart(primary: FlakyPrimary, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = SpoolingStore(primary, path)
    primary.down = True
    for record in records(3):
        first.put(record)
    first._conn.close()  # the process dies without a clean close
    second = SpoolingStore(primary, path)
    try:
        assert second.spooled() == 3
        primary.down = False
        assert second.drain() == 3
        assert primary.inner.count() == 3
    finally:
        second.close()


def test_drain_respects_max_items(spool: SpoolingStore, primary: FlakyPrimary) -> None:
    primary.down = True
    batch = records(250)
    for record in batch:
        spool.put(record)
    primary.down = False
    assert spool.drain(max_items=120) == 120
    assert spool.spooled() == 130
    assert primary.accepted == [r.id for r in batch[:120]]
    assert spool.drain(max_items=500) == 130
    assert primary.accepted == [r.id for r in batch]


def test_drain_hands_the_primary_a_batch_at_a_time(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    for record in records(250):
        spool.put(record)
    primary.down = False
    assert spool.drain() == 250
    # One put_many per chunk of 100 (one transaction each on SQLite and PostgreSQL), not
    # one write per record.
    assert primary.batches == [100, 100, 50]
    assert spool.spooled() == 0 and primary.inner.count() == 250


def test_a_spooled_row_that_no_longer_decodes_is_kept_and_skipped(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    batch = records(2)
    spool.put(batch[0])
    conn = sqlite3.connect(spool.spool_path)
    with conn:
        conn.execute("INSERT INTO spool (id, spooledAt, doc) VALUES ('bad', '2026-01-01', x'7b7b')")
    conn.close()
    spool.put(batch[1])
    primary.down = False
    assert spool.drain() == 2
    assert primary.accepted == [batch[0].id, batch[1].id]
    rows = sqlite3.connect(spool.spool_path).execute("SELECT id, attempts FROM spool")
    assert rows.fetchall() == [("bad", 1)]


def test_poison_record_does_not_block_the_spool(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    batch = records(3)
    for record in batch:
        spool.put(record)
    primary.down = False
    primary.poison = {batch[1].id}
    assert spool.drain() == 2
    assert spool.spooled() == 1
    row = sqlite3.connect(spool.spool_path).execute("SELECT id, attempts, lastError FROM spool")
    assert row.fetchall() == [(batch[1].id, 1, f"ValueError: poison {batch[1].id}")]
    primary.poison = set()
    assert spool.drain() == 1
    assert spool.count() == 3


def test_both_down_raises_so_the_caller_does_not_ack(primary: FlakyPrimary, tmp_path: Path) -> None:
    # A real "database or disk is full" from SQLite: the spool is capped at 64 KiB.
    spool = SpoolingStore(primary, tmp_path / "full.db", max_bytes=64 * 1024)
    try:
        primary.down = True
        assert spool.put(make_record("small")) is True
        with pytest.raises(StoreUnavailable) as info:
            spool.put(make_record("big", rawBody=b"\x00" * (256 * 1024), payload=None))
        message = str(info.value)
        assert "'big' not stored" in message
        assert "flaky primary: switched off" in message
        assert "full" in message
        assert spool.spooled() == 1
    finally:
        spool.close()


def test_spool_under_a_regular_file_fails_clearly(primary: FlakyPrimary, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailable, match=r"spool at .*not-a-dir"):
        SpoolingStore(primary, blocker / "spool.db")


def test_primary_is_skipped_for_a_while_after_failing(
    primary: FlakyPrimary, tmp_path: Path
) -> None:
    spool = SpoolingStore(primary, tmp_path / "s.db", retry_primary_after=60)
    try:
        primary.down = True
        spool.put(make_record("a"))
        spool.put(make_record("b"))
        spool.put(make_record("c"))
        assert primary.put_calls == 1  # b and c did not wait out the primary's timeout
        assert spool.spooled() == 3
        primary.down = False
        assert spool.drain() == 3  # drain always probes the primary
        assert spool.primary_available is True
        spool.put(make_record("d"))
        assert spool.spooled() == 0
        assert primary.inner.count() == 4
    finally:
        spool.close()


def test_reads_track_primary_availability(spool: SpoolingStore, primary: FlakyPrimary) -> None:
    spool.put(make_record("a"))
    primary.down = True
    for call in (
        spool.count,
        spool.signatures,
        spool.in_flight_retries,
        lambda: spool.delete(RecordFilter(ids=["a"])),
    ):
        spool.primary_available = True
        with pytest.raises(StoreUnavailable):
            call()
        assert spool.primary_available is False
    primary.down = False
    spool.ping()
    assert spool.primary_available is True
    assert spool.begin_retry("a", "t")
    assert spool.mark_reprocessed("a", token="t", target_queue="q", at=at(9), tool="cli")
    assert spool.get("a").reprocessed is True


def test_spool_in_front_of_an_unreachable_mongodb(tmp_path: Path) -> None:
    """A real MongoStore with nothing listening: puts spool instead of failing.

    No MongoDB server is reached (or faked) here; this checks the unavailable path only.
    """
    mongo = MongoStore(
        "mongodb://sidecar:hunter22@127.0.0.1:9/dlq",
        server_selection_timeout_ms=300,
        connect_timeout_ms=300,
    )
    spool = SpoolingStore(mongo, tmp_path / "s.db")
    try:
        started = time.monotonic()
        assert spool.put(make_record("a")) is True
        assert time.monotonic() - started < 10
        assert spool.spooled() == 1
        assert spool.primary_available is False
        assert spool.drain() == 0
        assert spool.spooled() == 1
    finally:
        spool.close()


def test_the_trace_id_survives_the_spool_and_older_spooled_records_drain(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    """A record spooled while the store was down keeps its trace id; one spooled by a
    sidecar from before trace ids (no ``traceId`` key) drains with None."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    primary.down = True
    spool.put(make_record("traced", traceId=trace_id))
    spool.put(make_record("older", traceId=trace_id))
    conn = sqlite3.connect(spool.spool_path)
    try:
        (doc,) = conn.execute("SELECT doc FROM spool WHERE id = 'older'").fetchone()
        older = msgspec.json.decode(doc)
        del older["traceId"]
        conn.execute("UPDATE spool SET doc = ? WHERE id = 'older'", (msgspec.json.encode(older),))
        conn.commit()
    finally:
        conn.close()
    primary.down = False
    assert spool.drain() == 2
    traced, untraced = spool.get("traced"), spool.get("older")
    assert traced is not None and traced.traceId == trace_id
    assert untraced is not None and untraced.traceId is None
