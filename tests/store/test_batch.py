"""``put_many``: a batch of dead letters written together, with exactly the per-record
semantics of successive ``put`` calls (identity, dedupe, later failures), on every backend.

The shared part runs against each backend of the ``store`` fixture; then what is particular
to one: SQLite's single transaction, PostgreSQL's fallback when the server aborts a batch,
and the spool's one fsync per batch.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sidecar.store.base import DeadLetterStore, StoreUnavailable
from sidecar.store.records import DeadLetterRecord, distinct_id, normalise_record
from sidecar.store.spool import SpoolingStore
from sidecar.store.sqlite import SqliteStore
from tests.store.contract import at, make_record
from tests.store.test_spool import FlakyPrimary

# A lone surrogate cannot be encoded as UTF-8: no backend can store this error message.
UNSTORABLE = "\ud800 not text"


def ids(records: list[DeadLetterRecord]) -> list[str]:
    return [r.id for r in records]


# --- the shared contract


def test_empty_batch_writes_nothing(store: DeadLetterStore) -> None:
    assert store.put_many([]) == []
    assert store.count() == 0


def test_batch_of_new_records_stores_each(store: DeadLetterStore) -> None:
    batch = [make_record(f"m{i}", lastFailureAt=at(i)) for i in range(5)]
    assert store.put_many(batch) == [True] * 5
    assert store.count() == 5
    for record in batch:
        assert store.get(record.id) == normalise_record(record)


def test_batch_results_match_successive_puts(store: DeadLetterStore) -> None:
    """Known ids, repeats, later and older failures and a different message under a taken
    id, all in one batch: the results and the stored records are those of one put each."""
    store.put(make_record("known", attemptCount=3, lastFailureAt=at(5)))
    other_body = b'{"another": "message"}'
    batch = [
        make_record("fresh"),
        make_record("known", attemptCount=3, lastFailureAt=at(5)),  # a replay: no change
        make_record("known", attemptCount=7, lastFailureAt=at(9), errorMessage="later"),
        make_record("known", attemptCount=2, lastFailureAt=at(1)),  # older: no change
        make_record("known", rawBody=other_body, errorMessage="other"),  # kept apart
    ]
    assert store.put_many(batch) == [True, False, False, False, True]
    assert store.count() == 3
    known = store.get("known")
    assert known is not None
    assert (known.attemptCount, known.lastFailureAt, known.errorMessage) == (7, at(9), "later")
    apart = store.get(distinct_id(normalise_record(batch[4])))
    assert apart is not None
    assert (apart.rawBody, apart.errorMessage) == (other_body, "other")
    assert store.get("fresh") == normalise_record(batch[0])


def test_same_message_twice_in_one_batch_is_one_record_with_its_count(
    store: DeadLetterStore,
) -> None:
    first = make_record("twice", attemptCount=3, lastFailureAt=at(1))
    again = make_record("twice", attemptCount=6, lastFailureAt=at(2), errorMessage="again")
    assert store.put_many([first, again, first]) == [True, False, False]
    assert store.count() == 1
    got = store.get("twice")
    assert got is not None
    assert (got.attemptCount, got.lastFailureAt, got.errorMessage) == (6, at(2), "again")
    assert got.firstFailureAt == first.firstFailureAt


def test_different_messages_under_one_id_in_one_batch_are_kept_apart(
    store: DeadLetterStore,
) -> None:
    c1 = make_record("shared", rawBody=b'{"id":"c1"}', errorMessage="e1", lastFailureAt=at(1))
    c2 = make_record("shared", rawBody=b'{"id":"c2"}', errorMessage="e2", lastFailureAt=at(2))
    c2_later = make_record(
        "shared", rawBody=b'{"id":"c2"}', errorMessage="e2 again", lastFailureAt=at(3)
    )
    assert store.put_many([c1, c2, c2_later, c1]) == [True, True, False, False]
    assert store.count() == 2
    first = store.get("shared")
    assert first is not None and (first.rawBody, first.errorMessage) == (b'{"id":"c1"}', "e1")
    second = store.get(distinct_id(normalise_record(c2)))
    assert second is not None
    assert (second.rawBody, second.errorMessage) == (b'{"id":"c2"}', "e2 again")


def test_a_refused_record_loses_none_of_the_others(store: DeadLetterStore) -> None:
    batch = [
        make_record("before", lastFailureAt=at(1)),
        make_record("refused", errorMessage=UNSTORABLE),
        make_record("naive", lastFailureAt=at(2).replace(tzinfo=None)),
        make_record("after", lastFailureAt=at(3)),
        make_record("before", attemptCount=9, lastFailureAt=at(4)),
    ]
    results = store.put_many(batch)
    assert results[0] is True and results[3] is True and results[4] is False
    assert isinstance(results[1], Exception), results[1]
    assert isinstance(results[2], ValueError) and "naive" in str(results[2])
    assert store.get("refused") is None and store.get("naive") is None
    assert sorted(r.id for r in store.find(limit=10)) == ["after", "before"]
    before = store.get("before")
    assert before is not None and before.attemptCount == 9


def test_a_batch_of_refused_records_only(store: DeadLetterStore) -> None:
    results = store.put_many([make_record("r1", errorMessage=UNSTORABLE), make_record("r2")])
    assert isinstance(results[0], Exception)
    assert results[1] is True
    assert ids(store.find(limit=10)) == ["r2"]


# --- SQLite: one transaction


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "dlq.db")
    yield store
    store.close()


def traced(conn: sqlite3.Connection) -> list[str]:
    """The statements ``conn`` runs from now on."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    return statements


def test_sqlite_batch_is_one_transaction_with_one_commit(sqlite_store: SqliteStore) -> None:
    statements = traced(sqlite_store._conn)
    batch = [make_record(f"m{i}", lastFailureAt=at(i)) for i in range(50)]
    batch.append(make_record("bad", errorMessage=UNSTORABLE))
    sqlite_store.put_many(batch)
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("COMMIT") == 1  # one fsync under synchronous=FULL
    assert sqlite_store.count() == 50


def test_sqlite_batch_is_all_or_nothing_when_the_disk_is_full(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "small.db", max_bytes=256 * 1024)
    try:
        batch = [
            make_record("small"),
            make_record("big", rawBody=b"\x00" * (512 * 1024), payload=None),
        ]
        with pytest.raises(StoreUnavailable, match="full"):
            store.put_many(batch)
        assert store.count() == 0  # "small" was rolled back with the batch: never acked
        assert store.put_many(batch[:1]) == [True]
    finally:
        store.close()


def test_sqlite_crash_mid_batch_leaves_none_of_it(tmp_path: Path) -> None:
    """The process dies halfway through writing a batch: the transaction never commits, so
    none of its records is in the file (and none of their messages was acked: acks follow
    the commit, and the broker delivers unacked messages again)."""
    path = tmp_path / "crash.db"
    SqliteStore(path).close()
    script = textwrap.dedent(
        f"""
        import os
        from sidecar.store.sqlite import SqliteStore
        from tests.store.contract import at, make_record

        store = SqliteStore({str(path)!r})
        store.put(make_record("committed-before"))
        real = store._put_one
        written = []

        def put_one(conn, record):
            if len(written) == 3:
                os._exit(17)  # killed mid-batch: no rollback, no commit, no cleanup
            written.append(record.id)
            return real(conn, record)

        store._put_one = put_one
        store.put_many([make_record(f"m{{i}}", lastFailureAt=at(i)) for i in range(6)])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 17, done.stderr.decode()
    store = SqliteStore(path)
    try:
        assert ids(store.find(limit=10)) == ["committed-before"]
    finally:
        store.close()


# --- PostgreSQL: a batch the server aborts is put again record by record


@pytest.mark.postgres
def test_postgres_batch_aborted_by_the_server_falls_back_to_one_per_record(
    postgres_store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses one record (a real error that aborts the real transaction): the
    batch's earlier writes roll back with it, then each record is put on its own, so the
    refusal stays with its record and the others are stored."""
    from sidecar.store.postgres import PostgresStore

    assert isinstance(postgres_store, PostgresStore)
    real = PostgresStore._insert

    def insert(self: PostgresStore, cur: Any, new: DeadLetterRecord, *args: Any) -> bool:
        if new.errorMessage == "server refuses":
            cur.execute("SELECT 1 / 0")  # division_by_zero: a data error, class 22
        return real(self, cur, new, *args)

    monkeypatch.setattr(PostgresStore, "_insert", insert)
    postgres_store.put(make_record("known", attemptCount=3, lastFailureAt=at(1)))
    batch = [
        make_record("a"),
        make_record("known", attemptCount=5, lastFailureAt=at(2)),
        make_record("refused", errorMessage="server refuses"),
        make_record("b"),
        make_record("a"),
    ]
    results = postgres_store.put_many(batch)
    assert results[0] is True and results[1] is False and results[3] is True
    assert results[4] is False
    assert isinstance(results[2], ValueError) and "cannot store this record" in str(results[2])
    assert sorted(r.id for r in postgres_store.find(limit=10)) == ["a", "b", "known"]
    known = postgres_store.get("known")
    assert known is not None and known.attemptCount == 5


# --- the spool: one transaction per batch, in front of any primary


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


def test_spool_batch_goes_to_the_primary_while_it_is_up(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    spool.put(make_record("known"))
    results = spool.put_many([make_record("known"), make_record("new"), make_record("new")])
    assert results == [False, True, False]
    assert spool.spooled() == 0
    assert primary.inner.count() == 2


def test_spool_takes_the_whole_batch_in_one_transaction_while_the_primary_is_down(
    spool: SpoolingStore, primary: FlakyPrimary
) -> None:
    primary.down = True
    statements = traced(spool._conn)
    batch = [make_record(f"m{i}", lastFailureAt=at(i)) for i in range(20)]
    batch.insert(5, make_record("naive", lastFailureAt=at(1).replace(tzinfo=None)))
    batch.insert(9, make_record("unstorable", errorMessage=UNSTORABLE))
    results = spool.put_many(batch)
    # Bad input is refused, never spooled; the rest of the batch is spooled all the same.
    assert isinstance(results[5], ValueError)
    assert isinstance(results[9], UnicodeEncodeError)
    assert [r for i, r in enumerate(results) if i not in (5, 9)] == [True] * 20
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("COMMIT") == 1
    assert spool.spooled() == 20
    primary.down = False
    assert spool.drain() == 20
    assert sorted(r.id for r in spool.find(limit=100)) == sorted(
        r.id for r in batch if r.id not in ("naive", "unstorable")
    )


def test_spool_batch_that_fits_nowhere_raises_and_spools_none_of_it(
    primary: FlakyPrimary, tmp_path: Path
) -> None:
    spool = SpoolingStore(primary, tmp_path / "full.db", max_bytes=64 * 1024)
    try:
        primary.down = True
        batch = [
            make_record("small"),
            make_record("big", rawBody=b"\x00" * (256 * 1024), payload=None),
        ]
        with pytest.raises(StoreUnavailable) as info:
            spool.put_many(batch)
        assert "2 dead letters (first 'small') not stored" in str(info.value)
        assert "flaky primary: switched off" in str(info.value)
        assert spool.spooled() == 0  # all or nothing: the caller acks none of them
    finally:
        spool.close()


def test_put_is_put_many_of_one(sqlite_store: SqliteStore) -> None:
    record = make_record("one")
    assert sqlite_store.put(record) is True
    assert sqlite_store.put(record) is False
    with pytest.raises(UnicodeEncodeError):
        sqlite_store.put(make_record("bad", errorMessage=UNSTORABLE))
    with pytest.raises(ValueError, match="naive"):
        sqlite_store.put(msgspec.structs.replace(record, lastFailureAt=at(1).replace(tzinfo=None)))
    assert ids(sqlite_store.find(limit=10)) == ["one"]
