"""The ``store`` fixture: every contract test runs against each backend.

- SQLite: a real file per test.
- PostgreSQL: the real server at SIDECAR_TEST_POSTGRES_URL (default: the local one on
  127.0.0.1:5432), one uniquely named database per test run and one schema per test, both
  dropped afterwards. Unreachable: every PostgreSQL case is skipped with the reason.
- MongoDB: the real server at SIDECAR_TEST_MONGO_URI, one database per test; without it
  the MongoDB cases are skipped, loudly, and never reported as passed.
- "mongomock (fake)": MongoStore's own code over mongomock's in-process imitation of
  pymongo. It exercises the backend's logic; it proves nothing about a real server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from sidecar.store.base import DeadLetterStore
from sidecar.store.sqlite import SqliteStore

MONGO_ENV = "SIDECAR_TEST_MONGO_URI"
MONGO_SKIP_REASON = f"{MONGO_ENV} not set: MongoDB contract NOT run"
POSTGRES_ENV = "SIDECAR_TEST_POSTGRES_URL"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
MONGOMOCK_ID = "mongomock (fake)"


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


def fake_mongo_store(monkeypatch: pytest.MonkeyPatch) -> DeadLetterStore:
    """A MongoStore whose client is mongomock's (a fake: no server, no wire protocol)."""
    mongomock = pytest.importorskip("mongomock", reason="mongomock is not installed")
    from bson.codec_options import CodecOptions

    import sidecar.store.mongo
    from sidecar.store.mongo import MongoStore

    class FakeClient(mongomock.MongoClient):  # type: ignore[misc]
        def get_database(self, name: str | None = None, **kwargs: Any) -> Any:
            # mongomock refuses an explicit tzinfo; tz_aware alone gives the same UTC values.
            if kwargs.get("codec_options") is not None:
                kwargs["codec_options"] = CodecOptions(tz_aware=True)
            return super().get_database(name, **kwargs)

    monkeypatch.setattr(sidecar.store.mongo, "MongoClient", FakeClient)
    return MongoStore("mongodb://mongomock.invalid:27017", database="sidecar_fake")


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server for this test run; its URL."""
    import psycopg
    from psycopg import sql

    admin_url = os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT
    name = f"sidecar_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.skip(
            f"PostgreSQL at {admin_url} unreachable ({str(exc).strip().splitlines()[0]}): "
            f"PostgreSQL contract NOT run; set {POSTGRES_ENV}"
        )
    try:
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            pytest.skip(
                f"cannot create a test database on {admin_url} ({str(exc).strip()}): "
                f"PostgreSQL contract NOT run; set {POSTGRES_ENV} to a role that may"
            )
        yield _with_path(admin_url, name)
    finally:
        try:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        finally:
            admin.close()


def _with_path(url: str, database: str, query: str = "") -> str:
    """``url`` (a postgresql:// URL) naming another database, with an optional query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database), query, ""))


def postgres_url_with_schema(url: str, schema: str) -> str:
    """The database URL with a search_path, as an operator would write it for a schema."""
    database = unquote(urlsplit(url).path.lstrip("/"))
    return _with_path(url, database, "options=" + quote(f"-c search_path={schema}", safe=""))


@pytest.fixture
def postgres_schema(postgres_database: str) -> Iterator[str]:
    """A unique, empty schema name in the test database; dropped after the test."""
    import psycopg
    from psycopg import sql

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(postgres_database, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def postgres_store(postgres_database: str, postgres_schema: str) -> Iterator[DeadLetterStore]:
    from sidecar.store.postgres import PostgresStore

    store = PostgresStore(postgres_database, schema=postgres_schema)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mongodb", marks=pytest.mark.mongo),
        pytest.param(MONGOMOCK_ID, marks=pytest.mark.fake),
    ]
)
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DeadLetterStore]:
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        sqlite_store = SqliteStore(tmp_path / "dlq" / "dead_letter.db")
        try:
            yield sqlite_store
        finally:
            sqlite_store.close()
    elif request.param == "postgresql":
        yield request.getfixturevalue("postgres_store")
    elif request.param == MONGOMOCK_ID:
        fake = fake_mongo_store(monkeypatch)
        try:
            yield fake
        finally:
            fake.close()
    else:
        yield from _mongo_store()
