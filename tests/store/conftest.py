"""The ``store`` fixture: every contract test runs against each backend.

MongoDB is never faked: with SIDECAR_TEST_MONGO_URI set, each test gets its own database
on that server (dropped afterwards); without it, the MongoDB half is skipped, loudly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.store.base import DeadLetterStore
from sidecar.store.sqlite import SqliteStore

MONGO_ENV = "SIDECAR_TEST_MONGO_URI"
MONGO_SKIP_REASON = f"{MONGO_ENV} not set: MongoDB contract NOT run"


def _mongo_store() -> Iterator[DeadLetterStore]:
    uri = os.environ.get(MONGO_ENV)
    if not uri:
        pytest.skip(MONGO_SKIP_REASON)
    import pymongo

    from sidecar.store.mongo import MongoStore

    database = f"sidecar_test_{uuid.uuid4().hex[:16]}"
    store = MongoStore(uri, database=database, server_selection_timeout_ms=5000)
    try:
        yield store
    finally:
        store.close()
        client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        try:
            client.drop_database(database)
        finally:
            client.close()


@pytest.fixture(params=["sqlite", pytest.param("mongodb", marks=pytest.mark.mongo)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeadLetterStore]:
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        sqlite_store = SqliteStore(tmp_path / "dlq" / "dead_letter.db")
        try:
            yield sqlite_store
        finally:
            sqlite_store.close()
    else:
        yield from _mongo_store()
