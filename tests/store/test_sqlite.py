"""SQLite backend specifics: durability settings, failure mapping, layout, threads."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from sidecar.store.base import StoreUnavailable
from sidecar.store.sqlite import SCHEMA_VERSION, SqliteStore, from_text, to_text
from tests.store.contract import at, make_record


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "dlq.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    """Shadows the contract fixture: these tests are about SQLite only."""
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_wal_and_synchronous_full_are_set(store: SqliteStore, db_path: Path) -> None:
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("busy_timeout") == 5000
    # WAL is a property of the file: any other connection sees it too.
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_indexes_exist(store: SqliteStore, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        indexed = {
            (table, conn.execute(f"PRAGMA index_info({index[1]})").fetchone()[2])
            for table in ("dead_letter", "metrics")
            for index in conn.execute(f"PRAGMA index_list({table})")
        }
    finally:
        conn.close()
    for column in (
        "failureReason",
        "originalQueue",
        "processingHost",
        "lastFailureAt",
        "signature",
        "deadLetteredAt",
    ):
        assert ("dead_letter", column) in indexed
    assert ("metrics", "type") in indexed


def test_layout_sortable_times_and_full_record(store: SqliteStore, db_path: Path) -> None:
    record = make_record("x", headers={"k": [1, 2]}, rawBody=b"\xff\x00", payload=None)
    store.put(record)
    conn = sqlite3.connect(db_path)
    try:
        last, doc = conn.execute("SELECT lastFailureAt, doc FROM dead_letter").fetchone()
    finally:
        conn.close()
    assert last == "2024-01-01T10:05:00.000000Z"
    full = msgspec.json.decode(doc)
    assert full["headers"] == {"k": [1, 2]}
    assert full["originalQueue"] == "url.to_scrape"


def test_time_text_round_trip() -> None:
    assert to_text(at(1)) == "2024-01-01T10:01:00.000000Z"
    assert from_text(to_text(at(1))) == at(1)
    assert to_text(at(0)) < to_text(at(0.001)) < to_text(at(600))


def test_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "dlq.db"
    SqliteStore(path).close()
    assert path.exists()


def test_parent_that_is_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="plain-file exists and is not a directory"):
        SqliteStore(blocker / "dlq.db")
    with pytest.raises(StoreUnavailable, match=r"cannot create directory .*plain-file/sub"):
        SqliteStore(blocker / "sub" / "dlq.db")


def test_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 512)
    with pytest.raises(StoreUnavailable, match=r"garbage\.db.*not a database"):
        SqliteStore(path)


def test_newer_schema_is_refused(db_path: Path) -> None:
    SqliteStore(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match="schema version"):
        SqliteStore(db_path)


def test_disk_full_is_unavailable_and_the_store_stays_usable(db_path: Path) -> None:
    store = SqliteStore(db_path, max_bytes=128 * 1024)
    try:
        assert store.put(make_record("small"))
        with pytest.raises(StoreUnavailable, match=r"dlq\.db: put: database or disk is full"):
            store.put(make_record("big", rawBody=b"\x01" * (512 * 1024), payload=None))
        assert store.get("big") is None
        assert store.count() == 1
        assert store.put(make_record("small-2"))
        with pytest.raises(StoreUnavailable, match="full"):
            for i in range(10_000):
                store.put(make_record(f"fill-{i}", rawBody=b"\x02" * 4096, payload=None))
        assert store.get("small") is not None
    finally:
        store.close()


def test_locked_database_is_unavailable(db_path: Path) -> None:
    store = SqliteStore(db_path, busy_timeout_ms=100)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            store.put(make_record("x"))
        blocker.execute("ROLLBACK")
        assert store.put(make_record("x"))
    finally:
        blocker.close()
        store.close()


def test_put_is_committed_when_it_returns(store: SqliteStore, db_path: Path) -> None:
    store.put(make_record("durable"))
    other = SqliteStore(db_path)
    try:
        assert other.get("durable") is not None
    finally:
        other.close()


def test_closed_store_is_unavailable(db_path: Path) -> None:
    store = SqliteStore(db_path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreUnavailable, match="closed"):
        store.put(make_record())
    with pytest.raises(StoreUnavailable, match="closed"):
        store.ping()


def test_concurrent_threads(store: SqliteStore) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                store.put(make_record(f"w{worker}-{i}", lastFailureAt=at(i)))
                store.put(make_record(f"w{worker}-{i}", lastFailureAt=at(i + 1)))
                store.find(limit=5)
                store.count()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count() == 200
    assert all(r.lastFailureAt == at(int(r.id.split("-")[1]) + 1) for r in store.find(limit=300))


def test_in_memory_store() -> None:
    store = SqliteStore(":memory:")
    try:
        assert store.put(make_record())
        assert store.count() == 1
        assert store.describe() == "sqlite :memory:"
    finally:
        store.close()


# --- the store's identity


def test_store_id_survives_reopen_and_differs_between_files(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "a.db")
    store_id = first.store_id()
    first.close()
    again = SqliteStore(tmp_path / "a.db")
    other = SqliteStore(tmp_path / "b.db")
    try:
        assert again.store_id() == store_id
        assert other.store_id() != store_id
    finally:
        again.close()
        other.close()


def test_store_from_before_store_ids_gets_one_on_first_open(db_path: Path) -> None:
    old = SqliteStore(db_path)
    old.put(make_record("kept"))
    old.close()
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TABLE sidecar_meta")  # the layout before store ids existed
    conn.commit()
    conn.close()
    upgraded = SqliteStore(db_path)
    try:
        store_id = upgraded.store_id()
        assert store_id and upgraded.get("kept") is not None
    finally:
        upgraded.close()
    reopened = SqliteStore(db_path)
    try:
        assert reopened.store_id() == store_id
    finally:
        reopened.close()


def test_threads_opening_one_fresh_file_agree_on_its_id(db_path: Path) -> None:
    start = threading.Barrier(8)
    ids: list[str] = []
    errors: list[BaseException] = []

    def open_and_read() -> None:
        try:
            start.wait(timeout=10)
            s = SqliteStore(db_path)
            try:
                ids.append(s.store_id())
            finally:
                s.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(ids) == 8 and len(set(ids)) == 1


_PRINT_STORE_ID = """
import sys, time
from sidecar.store.sqlite import SqliteStore
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
store = SqliteStore(sys.argv[1])
print(store.store_id())
store.close()
"""


def test_processes_opening_one_fresh_file_agree_on_its_id(db_path: Path) -> None:
    # All start their open at one agreed instant, after the interpreters have loaded.
    at_instant = str(time.time() + 2.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PRINT_STORE_ID, str(db_path), at_instant],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    assert len(set(outputs)) == 1 and len(outputs[0]) == 32
