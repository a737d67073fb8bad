"""open_store URL parsing, credential hygiene, and MongoDB behaviour without a server.

Nothing here reaches (or fakes) a MongoDB server: the MongoDB tests check that a store is
constructed without blocking, describes itself without credentials, fails fast and cleanly
when nothing answers, and maps records to BSON documents with the real BSON codec.
"""

from __future__ import annotations

import time
from datetime import UTC
from pathlib import Path

import bson
import pytest
from bson.codec_options import CodecOptions

from sidecar.store.base import StoreUnavailable, redact_url, scrub
from sidecar.store.mongo import MongoStore, record_from_doc, record_to_doc
from sidecar.store.opening import open_store
from sidecar.store.records import normalise_record
from sidecar.store.sqlite import SqliteStore
from tests.store.contract import make_record

# --- SQLite URLs


def test_sqlite_url_three_slashes_is_relative(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///state/dlq.db")
    try:
        assert isinstance(store, SqliteStore)
        assert store.name == "sqlite"
        assert store.describe() == "sqlite state/dlq.db"
        assert (tmp_path / "state" / "dlq.db").exists()
    finally:
        store.close()


def test_sqlite_url_four_slashes_is_absolute(tmp_path: Path) -> None:
    path = tmp_path / "abs" / "dlq.db"
    for url in (f"sqlite:///{path}", f"SQLite:///{path}"):  # /abs -> sqlite:////abs
        store = open_store(url)
        try:
            assert isinstance(store, SqliteStore)
            assert store.path == path
        finally:
            store.close()


def test_plain_path_is_sqlite(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "plain.db"))
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "plain.db"
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("sqlite://host/x.db", "bad SQLite URL"),
        ("sqlite:///", "no database path"),
        ("sqlite:x.db", "bad SQLite URL"),
        ("redis://user:s3cret@cache:6379/0", "unknown dead-letter store scheme 'redis'"),
        ("mysql://db/x", "use sqlite:///path.db, a plain file path, mongodb://"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_store(url)
    assert "s3cret" not in str(info.value)


# --- credentials


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "mongodb://admin:pa%40ss@db1:27017,db2/dlq?authSource=admin",
            "mongodb://db1:27017,db2/dlq",
        ),
        ("mongodb+srv://u:p@cluster0.example.net/x", "mongodb+srv://cluster0.example.net/x"),
        ("mongodb://onlyuser@host/", "mongodb://host/"),
        ("mongodb://host/db", "mongodb://host/db"),
        ("sqlite:////var/lib/x.db", "sqlite:////var/lib/x.db"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_scrub_removes_echoed_credentials() -> None:
    url = "mongodb://alice:pa%40ss%21word@db/x"
    text = f"auth failed for alice with pa@ss!word via {url}"
    cleaned = scrub(text, url)
    assert "alice" not in cleaned
    assert "pa@ss!word" not in cleaned
    assert "pa%40ss" not in cleaned


# --- MongoDB without a server


BOGUS = "mongodb://sidecar-user:hunter2-secret@127.0.0.1:9/deadletters?authSource=admin"


def test_open_store_mongodb_is_lazy_and_describes_without_credentials() -> None:
    started = time.monotonic()
    store = open_store(BOGUS, server_selection_timeout_ms=300)
    try:
        assert time.monotonic() - started < 1.0  # constructing never waits for a server
        assert isinstance(store, MongoStore)
        assert store.name == "mongodb"
        assert store.database == "deadletters"
        description = store.describe()
        assert "127.0.0.1:9" in description and "deadletters" in description
        assert "hunter2" not in description and "sidecar-user" not in description
    finally:
        store.close()


def test_mongodb_default_database_and_srv_without_dns() -> None:
    store = MongoStore("mongodb://127.0.0.1:9")
    try:
        assert store.database == "sidecar"
    finally:
        store.close()
    started = time.monotonic()
    srv = MongoStore("mongodb+srv://u:secret-pw@cluster0.example.invalid/prod")
    try:
        assert time.monotonic() - started < 1.0  # SRV lookup is deferred to first use
        assert srv.database == "prod"
        assert "secret-pw" not in srv.describe()
    finally:
        srv.close()


@pytest.mark.parametrize(
    "url",
    ["mongodb://user:topsecret@host:notaport/db", "mongodb://user:topsecret@/db"],
)
def test_mongodb_bad_uri_is_value_error_without_credentials(url: str) -> None:
    with pytest.raises(ValueError, match="bad MongoDB URL") as info:
        open_store(url)
    assert "topsecret" not in str(info.value)


def test_unreachable_mongodb_fails_fast_with_store_unavailable() -> None:
    """No server is reached: this asserts the failure path, nothing more."""
    store = MongoStore(BOGUS, server_selection_timeout_ms=300, connect_timeout_ms=300)
    try:
        for call in (store.ping, lambda: store.put(make_record()), store.count):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert time.monotonic() - started < 5
            message = str(info.value)
            assert message.startswith("mongodb mongodb://127.0.0.1:9/deadletters")
            assert "hunter2" not in message and "sidecar-user" not in message
            assert "ServerSelectionTimeoutError" in message
    finally:
        store.close()


# --- record <-> BSON document (real BSON codec, no server)


def _bson_round_trip(doc: dict) -> dict:
    return bson.decode(bson.encode(doc), codec_options=CodecOptions(tz_aware=True, tzinfo=UTC))


def test_record_document_uses_seed_field_names() -> None:
    record = normalise_record(make_record("abc", retryToken=None, headers={"x": 1}))
    doc = record_to_doc(record)
    assert doc["_id"] == "abc" and "id" not in doc
    assert "retryToken" not in doc  # absent rather than null: sparse index
    for name in ("originalQueue", "payload", "failureReason", "errorMessage", "attemptCount"):
        assert name in doc
    assert isinstance(doc["rawBody"], bytes)
    assert record_from_doc(_bson_round_trip(doc)) == record


def test_record_document_round_trips_through_bson() -> None:
    record = normalise_record(
        make_record(
            "r",
            rawBody=b"\x00\xff",
            payload=None,
            retryToken="t",
            history=[{"at": "2024-01-01T10:00:00Z", "tool": "cli"}],
            properties={"priority": 5, "delivery_mode": 2},
        )
    )
    back = record_from_doc(_bson_round_trip(record_to_doc(record)))
    assert back == record
    assert back.lastFailureAt.tzinfo is UTC


def test_payload_that_bson_cannot_hold_falls_back_to_text() -> None:
    body = b'{"big": 123456789012345678901234567890}'
    record = normalise_record(make_record("big", rawBody=body))
    assert record.payload == {"big": 123456789012345678901234567890}
    doc = record_to_doc(record)
    assert doc["payload"] == body.decode()
    assert doc["rawBody"] == body
    bson.encode(doc)


def test_oversized_payload_is_dropped_but_raw_body_kept() -> None:
    body = b'"' + b"x" * (9 * 1024 * 1024) + b'"'
    record = normalise_record(make_record("huge", rawBody=body))
    doc = record_to_doc(record)
    assert doc["payload"] is None
    assert doc["rawBody"] == body
