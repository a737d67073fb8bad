"""PostgreSQL dead-letter store: one store shared by every sidecar of a fleet.

Each row keeps the whole record as JSONB (``doc``), so fields added to records later pass
through untouched, beside indexed columns for what is filtered, grouped and sorted on.
Every mutation is a read-modify-write of the whole record under ``SELECT ... FOR UPDATE``
in one transaction, so any number of sidecars may write at once without losing an update
or storing an id twice, and the columns never disagree with ``doc``.

Hostile text: PostgreSQL text and JSONB cannot hold NUL characters, which an agent's error
message or a message header may well contain. Columns get U+FFFD in their place (they only
serve queries); when the document itself has one, or a number JSONB would rewrite (it
stores decimals: 1e300 comes back as an integer), its exact msgspec JSON is kept in
``doc_exact`` and read back from there, so a record comes back as it was stored.

The connection is opened lazily, like MongoDB's client: constructing a store never blocks,
so a sidecar starts (and spools) while the database is down. Every wait is bounded
(connect timeout, statement and lock timeouts).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from sidecar.store.base import (
    PATTERN_KEYS,
    STORE_ID_KEY,
    PatternKey,
    PutResult,
    StoreUnavailable,
    apply_put,
    apply_reprocess,
    new_store_id,
    put_each,
    redact_url,
    scrub,
)
from sidecar.store.records import (
    DeadLetterRecord,
    MetricSnapshot,
    PatternRow,
    RecordFilter,
    distinct_id,
    normalise_filter,
    normalise_metric,
    normalise_record,
    same_message,
    utc_ms,
)

__all__ = ["PostgresStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
# Serialises schema creation between sidecars starting at once: concurrent
# CREATE ... IF NOT EXISTS can still collide on the catalog's unique indexes.
_SCHEMA_LOCK_KEY = 0x51DECA7

# COLLATE "C": ids, keys and ties order by code point on every server, as in SQLite and
# MongoDB, whatever locale the database was created with.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letter (
    id TEXT COLLATE "C" PRIMARY KEY,
    original_queue TEXT COLLATE "C" NOT NULL,
    failure_reason TEXT COLLATE "C" NOT NULL,
    error_message TEXT COLLATE "C" NOT NULL,
    signature TEXT COLLATE "C" NOT NULL,
    processing_host TEXT COLLATE "C" NOT NULL,
    attempt_count BIGINT NOT NULL,
    first_failure_at TIMESTAMPTZ NOT NULL,
    last_failure_at TIMESTAMPTZ NOT NULL,
    dead_lettered_at TIMESTAMPTZ NOT NULL,
    reprocessed BOOLEAN NOT NULL,
    retry_token TEXT COLLATE "C",
    doc JSONB NOT NULL,
    doc_exact BYTEA
);
CREATE INDEX IF NOT EXISTS dead_letter_failure_reason ON dead_letter (failure_reason);
CREATE INDEX IF NOT EXISTS dead_letter_original_queue ON dead_letter (original_queue);
CREATE INDEX IF NOT EXISTS dead_letter_processing_host ON dead_letter (processing_host);
CREATE INDEX IF NOT EXISTS dead_letter_last_failure_at ON dead_letter (last_failure_at, id);
CREATE INDEX IF NOT EXISTS dead_letter_signature ON dead_letter (signature);
CREATE INDEX IF NOT EXISTS dead_letter_dead_lettered_at ON dead_letter (dead_lettered_at);
CREATE INDEX IF NOT EXISTS dead_letter_retry_token ON dead_letter (retry_token)
    WHERE retry_token IS NOT NULL;
CREATE TABLE IF NOT EXISTS metrics (
    seq BIGSERIAL PRIMARY KEY,
    type TEXT COLLATE "C" NOT NULL,
    queue TEXT COLLATE "C" NOT NULL,
    count DOUBLE PRECISION NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    labels JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_type_ts ON metrics (type, ts);
CREATE TABLE IF NOT EXISTS sidecar_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sidecar_meta (
    key TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_UPSERT = """
INSERT INTO dead_letter (id, original_queue, failure_reason, error_message, signature,
    processing_host, attempt_count, first_failure_at, last_failure_at, dead_lettered_at,
    reprocessed, retry_token, doc, doc_exact)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT (id) DO UPDATE SET
    original_queue = excluded.original_queue,
    failure_reason = excluded.failure_reason,
    error_message = excluded.error_message,
    signature = excluded.signature,
    processing_host = excluded.processing_host,
    attempt_count = excluded.attempt_count,
    first_failure_at = excluded.first_failure_at,
    last_failure_at = excluded.last_failure_at,
    dead_lettered_at = excluded.dead_lettered_at,
    reprocessed = excluded.reprocessed,
    retry_token = excluded.retry_token,
    doc = excluded.doc,
    doc_exact = excluded.doc_exact
"""

_PATTERN_COLUMNS: dict[str, str] = {
    "failureReason": "failure_reason",
    "signature": "signature",
    "processingHost": "processing_host",
    "originalQueue": "original_queue",
}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetterRecord)
_labels_decoder = msgspec.json.Decoder(dict[str, str])
# JSONB cannot hold a NUL character, and stores numbers as decimals: a float with a
# positive exponent (1e300) comes back as an integer. Documents with either keep an exact
# copy. A match inside a string is harmless: it only costs the copy.
_JSONB_LOSSY = re.compile(rb"\\u0000|[0-9][eE]\+?[0-9]")
_INT64_MAX = 2**63 - 1


def _text(value: str) -> str:
    """A column value PostgreSQL accepts: NUL cannot be stored in text."""
    return value.replace("\x00", "\ufffd")


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _doc_columns(record: DeadLetterRecord) -> tuple[str, bytes | None]:
    """(JSONB text, exact bytes or None): the exact JSON is kept only when JSONB would not
    give the same record back."""
    exact = _encoder.encode(record)
    if _JSONB_LOSSY.search(exact) is None:
        return exact.decode(), None
    cleaned = msgspec.json.encode(_strip_nul(msgspec.json.decode(exact)))
    return cleaned.decode(), exact


def _bigint(value: int) -> int:
    """A BIGINT column's copy of a count (the document keeps the exact value)."""
    return max(-_INT64_MAX, min(value, _INT64_MAX))


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {_text(k): _strip_nul(v) for k, v in value.items()}
    return value


def _scrub(text: str, url: str) -> str:
    """``scrub`` that survives a URL urllib cannot split (it raises on a broken IPv6 host)."""
    try:
        return scrub(text, url)
    except ValueError:
        return "(details withheld: they may echo the malformed URL)"


def _connection_lost(exc: BaseException | None) -> bool:
    """The connection died (not a timeout, a lock wait or a refused statement)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate or ""
    return not state or state.startswith(("08", "57P"))


def _record(doc: str, exact: bytes | None) -> DeadLetterRecord:
    return _decoder.decode(exact if exact is not None else doc)


class PostgresStore:
    """DeadLetterStore on PostgreSQL via psycopg 3: one connection, one lock, short waits."""

    name = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        connect_timeout_s: int = 5,
        statement_timeout_ms: int = 20000,
        lock_timeout_ms: int = 10000,
    ) -> None:
        """``schema`` (created when missing) holds the tables; else the URL's search_path."""
        scheme, sep, rest = url.partition("://")
        if sep:  # libpq only knows the lower-case scheme
            url = scheme.lower() + sep + rest
        self._url = url
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(
                f"bad PostgreSQL URL {redact_url(url) if sep else '(conninfo)'!r}: "
                f"{_scrub(str(exc), url)}"
            ) from None
        if schema is not None and (not schema or "\x00" in schema or len(schema) > 63):
            raise ValueError(f"bad PostgreSQL schema name {schema!r}")
        self.schema = schema
        self.database = str(params.get("dbname") or params.get("user") or "")
        # Described from the parsed parameters: a keyword/value conninfo string
        # ("host=... password=...") would pass through redact_url untouched.
        self._where_text = f"{params.get('host') or 'local socket'}:{params.get('port') or 5432}"
        self._connect_timeout = str(int(params.get("connect_timeout") or connect_timeout_s))
        self._statement_timeout_ms = int(statement_timeout_ms)
        self._lock_timeout_ms = int(lock_timeout_ms)
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        self._store_id: str | None = None

    # --- plumbing

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._url,
            connect_timeout=self._connect_timeout,
            application_name="sidecar",
            autocommit=False,
        )
        try:
            with conn.cursor() as cur:
                # Durable before put returns (a role or database may have turned it off),
                # times in UTC, and no statement or lock wait holds a worker thread forever.
                cur.execute("SET synchronous_commit = on")
                cur.execute("SET TIME ZONE 'UTC'")
                cur.execute(
                    sql.SQL("SET statement_timeout = {}").format(
                        sql.Literal(self._statement_timeout_ms)
                    )
                )
                cur.execute(
                    sql.SQL("SET lock_timeout = {}").format(sql.Literal(self._lock_timeout_ms))
                )
                # First, so that sidecars starting together create the schema one by one.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                if self.schema is not None:
                    cur.execute(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                            sql.Identifier(self.schema)
                        )
                    )
                    cur.execute(
                        sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema))
                    )
                cur.execute(_SCHEMA)
                cur.execute("SELECT max(version) FROM sidecar_schema")
                row = cur.fetchone()
                version = None if row is None else row[0]
                if version is None:
                    cur.execute(
                        "INSERT INTO sidecar_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
                    )
                elif version > SCHEMA_VERSION:
                    raise StoreUnavailable(
                        f"{self.describe()}: schema version {version} is newer than this "
                        f"sidecar understands ({SCHEMA_VERSION})"
                    )
                # Kept if a store id exists (this schema predates it, or another
                # sidecar created it first): every sidecar of the store reads the same one.
                cur.execute(
                    "INSERT INTO sidecar_meta (key, value) VALUES (%s, %s)"
                    " ON CONFLICT (key) DO NOTHING",
                    (STORE_ID_KEY, new_store_id()),
                )
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _tx(self, action: str) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on the shared connection, committed before returning.

        Driver and server errors become StoreUnavailable (credentials scrubbed) and drop
        the connection, so the next call starts on a fresh one.
        """
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{self.describe()}: closed")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                conn = self._conn
                try:
                    with conn.cursor() as cur:
                        yield cur
                    conn.commit()
                except BaseException:
                    if not conn.closed:
                        conn.rollback()
                    raise
            except psycopg.DataError as exc:
                # The record, not the store, is at fault: retrying or spooling cannot help.
                raise ValueError(
                    f"{self.describe()}: {action}: cannot store this record: "
                    f"{_scrub(str(exc).strip(), self._url)}"
                ) from exc
            except psycopg.Error as exc:
                self._drop()
                raise StoreUnavailable(
                    f"{self.describe()}: {action}: {type(exc).__name__}: "
                    f"{_scrub(str(exc).strip(), self._url)}"
                ) from exc

    def _call(self, action: str, fn: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``fn`` in one transaction; once more on a fresh connection when a reused one
        turns out dead (a server restart, a failover, an idle timeout), so such a blip does
        not send dead letters to the spool. Safe because the contract's calls are
        idempotent; a put replayed after a lost commit reply reports the record as not new."""
        reused = self._conn is not None and not self._conn.closed
        try:
            with self._tx(action) as cur:
                return fn(cur)
        except StoreUnavailable as exc:
            if not (reused and _connection_lost(exc.__cause__)):
                raise
            log.info("%s: %s: connection lost, retrying on a new one", self.describe(), action)
        with self._tx(action) as cur:
            return fn(cur)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as exc:  # the original error is the one worth reporting
                log.warning("%s: close failed: %s", self.describe(), exc)

    @staticmethod
    def _load(cur: psycopg.Cursor[Any], id: str, *, lock: bool) -> DeadLetterRecord | None:
        query = "SELECT doc::text, doc_exact FROM dead_letter WHERE id = %s"
        cur.execute(query + (" FOR UPDATE" if lock else ""), (_text(id),))
        row = cur.fetchone()
        return None if row is None else _record(row[0], row[1])

    @staticmethod
    def _write(cur: psycopg.Cursor[Any], r: DeadLetterRecord) -> None:
        doc, exact = _doc_columns(r)
        cur.execute(
            _UPSERT,
            (
                _text(r.id),
                _text(r.originalQueue),
                _text(r.failureReason),
                _text(r.errorMessage),
                _text(r.signature),
                _text(r.processingHost),
                _bigint(r.attemptCount),
                r.firstFailureAt,
                r.lastFailureAt,
                r.deadLetteredAt,
                r.reprocessed,
                None if r.retryToken is None else _text(r.retryToken),
                doc,
                exact,
            ),
        )

    @staticmethod
    def _where(flt: RecordFilter | None) -> tuple[sql.Composable, list[Any]]:
        f = normalise_filter(flt)
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in (
            ("original_queue", f.queue),
            ("failure_reason", f.reason),
            ("processing_host", f.host),
        ):
            if value is not None:
                clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(_text(value))
        if f.since is not None:
            clauses.append(sql.SQL("last_failure_at >= %s"))
            params.append(f.since)
        if f.until is not None:
            clauses.append(sql.SQL("last_failure_at < %s"))
            params.append(f.until)
        if f.pattern is not None:
            # strpos, not LIKE: the pattern is a literal substring, "%" and "_" included.
            clauses.append(
                sql.SQL(
                    "(strpos(lower(failure_reason), lower(%s)) > 0"
                    " OR strpos(lower(error_message), lower(%s)) > 0"
                    " OR strpos(lower(signature), lower(%s)) > 0)"
                )
            )
            params.extend([_text(f.pattern)] * 3)
        if f.reprocessed is not None:
            clauses.append(sql.SQL("reprocessed = %s"))
            params.append(f.reprocessed)
        if f.ids is not None:
            clauses.append(sql.SQL("id = ANY(%s::text[])"))
            params.append([_text(i) for i in f.ids])
        if not clauses:
            return sql.SQL(""), params
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), params

    # --- the contract

    def _insert(
        self, cur: psycopg.Cursor[Any], new: DeadLetterRecord, doc: str, exact: bytes | None
    ) -> bool:
        """Insert ``new`` unless its id is taken; whether it was inserted."""
        cur.execute(
            "INSERT INTO dead_letter (id, original_queue, failure_reason, error_message,"
            " signature, processing_host, attempt_count, first_failure_at,"
            " last_failure_at, dead_lettered_at, reprocessed, retry_token, doc, doc_exact)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            (
                _text(new.id),
                _text(new.originalQueue),
                _text(new.failureReason),
                _text(new.errorMessage),
                _text(new.signature),
                _text(new.processingHost),
                _bigint(new.attemptCount),
                new.firstFailureAt,
                new.lastFailureAt,
                new.deadLetteredAt,
                new.reprocessed,
                None if new.retryToken is None else _text(new.retryToken),
                doc,
                exact,
            ),
        )
        return cur.fetchone() is not None

    def _put_one(
        self, cur: psycopg.Cursor[Any], new: DeadLetterRecord, doc: str, exact: bytes | None
    ) -> bool:
        # Insert first: of several sidecars putting one id at once, exactly one wins
        # and the others wait for its commit, then merge under the row lock below.
        candidate, columns = new, (doc, exact)
        while True:
            if self._insert(cur, candidate, *columns):
                return True
            existing = self._load(cur, candidate.id, lock=True)
            if existing is None:  # deleted between the two statements: store it again
                self._write(cur, candidate)
                return True
            if candidate is new and not same_message(existing, new):
                # Another message holds this id: keep both (records.distinct_id).
                candidate = msgspec.structs.replace(new, id=distinct_id(new))
                columns = _doc_columns(candidate)
                continue
            merged = apply_put(existing, candidate)
            if merged is not None:
                self._write(cur, merged)
            return False

    def put(self, record: DeadLetterRecord) -> bool:
        new = normalise_record(record)
        doc, exact = _doc_columns(new)  # before the transaction: a bad record fails alone
        return self._call("put", lambda cur: self._put_one(cur, new, doc, exact))

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        """All in one transaction (one commit, so one WAL flush). A record the server
        refuses aborts that transaction: then the batch is put again one record per
        transaction, so the refusal stays with its record and the others are stored."""
        results: list[PutResult] = []
        prepared: list[tuple[int, DeadLetterRecord, str, bytes | None]] = []
        for record in records:
            try:
                new = normalise_record(record)
                prepared.append((len(results), new, *_doc_columns(new)))
                results.append(False)  # replaced below
            except Exception as exc:  # a naive time, a document that is not JSON
                results.append(exc)
        if not prepared:
            return results
        # Rows are locked in id order, the same in every sidecar, so two batches sharing
        # ids wait for each other instead of deadlocking. The sort is stable: repeats of
        # one id keep their order.
        prepared.sort(key=lambda item: item[1].id)

        def run(cur: psycopg.Cursor[Any]) -> list[bool]:
            return [self._put_one(cur, new, doc, exact) for _, new, doc, exact in prepared]

        try:
            written: list[PutResult] = list(self._call("put", run))
        except StoreUnavailable:
            raise
        except Exception:
            written = put_each(self.put, [records[index] for index, *_ in prepared])
        for (index, *_), result in zip(prepared, written, strict=True):
            results[index] = result
        return results

    def get(self, id: str) -> DeadLetterRecord | None:
        return self._call("get", lambda cur: self._load(cur, id, lock=False))

    def _rows(
        self, action: str, query: str | sql.SQL | sql.Composed, params: Sequence[Any] = ()
    ) -> list[tuple[Any, ...]]:
        def run(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(query, params)
            return cur.fetchall()

        return self._call(action, run)

    def find(
        self, filter: RecordFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterRecord]:
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        where, params = self._where(filter)
        query = sql.SQL(
            "SELECT doc::text, doc_exact FROM dead_letter{}"
            " ORDER BY last_failure_at DESC, id DESC LIMIT %s OFFSET %s"
        ).format(where)
        rows = self._rows("find", query, [*params, limit, offset])
        return [_record(doc, exact) for doc, exact in rows]

    def count(self, filter: RecordFilter | None = None) -> int:
        where, params = self._where(filter)
        query = sql.SQL("SELECT count(*) FROM dead_letter{}").format(where)
        ((n,),) = self._rows("count", query, params)
        return int(n)

    def failure_patterns(
        self, filter: RecordFilter | None = None, *, by: PatternKey = "failureReason"
    ) -> list[PatternRow]:
        if by not in PATTERN_KEYS:
            raise ValueError(f"cannot group failure patterns by {by!r}")
        column = sql.Identifier(_PATTERN_COLUMNS[by])
        where, params = self._where(filter)
        query = sql.SQL(
            "SELECT {col}, count(*), min(first_failure_at), max(last_failure_at)"
            " FROM dead_letter{where} GROUP BY {col} ORDER BY 2 DESC, 1 ASC"
        ).format(col=column, where=where)
        rows = self._rows("failure_patterns", query, params)
        return [PatternRow(key, int(n), _utc(first), _utc(last)) for key, n, first, last in rows]

    def oldest_newest(
        self, filter: RecordFilter | None = None
    ) -> tuple[datetime | None, datetime | None]:
        where, params = self._where(filter)
        query = sql.SQL(
            "SELECT min(dead_lettered_at), max(dead_lettered_at) FROM dead_letter{}"
        ).format(where)
        ((oldest, newest),) = self._rows("oldest_newest", query, params)
        return (
            None if oldest is None else _utc(oldest),
            None if newest is None else _utc(newest),
        )

    def signatures(self) -> set[str]:
        query = "SELECT DISTINCT signature FROM dead_letter WHERE signature <> ''"
        return {row[0] for row in self._rows("signatures", query)}

    def begin_retry(self, id: str, token: str) -> bool:
        def run(cur: psycopg.Cursor[Any]) -> bool:
            existing = self._load(cur, id, lock=True)
            if existing is None or existing.retryToken not in (None, token):
                return False
            if existing.retryToken is None:
                self._write(cur, msgspec.structs.replace(existing, retryToken=token))
            return True

        return self._call("begin_retry", run)

    def cancel_retry(self, id: str, token: str) -> bool:
        def run(cur: psycopg.Cursor[Any]) -> bool:
            existing = self._load(cur, id, lock=True)
            if existing is None or existing.retryToken != token:
                return False
            self._write(cur, msgspec.structs.replace(existing, retryToken=None))
            return True

        return self._call("cancel_retry", run)

    def mark_reprocessed(
        self, id: str, *, token: str | None, target_queue: str, at: datetime, tool: str
    ) -> bool:
        def run(cur: psycopg.Cursor[Any]) -> bool:
            existing = self._load(cur, id, lock=True)
            if existing is None:
                return False
            updated, recorded = apply_reprocess(
                existing, token=token, target_queue=target_queue, at=at, tool=tool
            )
            if updated is not None:
                self._write(cur, updated)
            return recorded

        return self._call("mark_reprocessed", run)

    def in_flight_retries(self) -> list[DeadLetterRecord]:
        rows = self._rows(
            "in_flight_retries",
            "SELECT doc::text, doc_exact FROM dead_letter WHERE retry_token IS NOT NULL"
            " ORDER BY last_failure_at DESC, id DESC",
        )
        return [_record(doc, exact) for doc, exact in rows]

    def delete(self, filter: RecordFilter) -> int:
        where, params = self._where(filter)

        def run(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(sql.SQL("DELETE FROM dead_letter{}").format(where), params)
            return int(cur.rowcount)

        return self._call("delete", run)

    def insert_metric(self, snapshot: MetricSnapshot) -> None:
        m = normalise_metric(snapshot)
        labels = _encoder.encode({_text(k): _text(v) for k, v in m.labels.items()}).decode()

        def run(cur: psycopg.Cursor[Any]) -> None:
            cur.execute(
                "INSERT INTO metrics (type, queue, count, ts, labels)"
                " VALUES (%s, %s, %s, %s, %s::jsonb)",
                (_text(m.type), _text(m.queue), m.count, m.timestamp, labels),
            )

        # Not idempotent: a replay after a lost commit reply could store a point twice,
        # which a sampled metric series tolerates better than a gap.
        self._call("insert_metric", run)

    def metrics(
        self, type: str, *, since: datetime | None = None, limit: int = 1000
    ) -> list[MetricSnapshot]:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        query = "SELECT type, queue, count, ts, labels::text FROM metrics WHERE type = %s"
        params: list[Any] = [_text(type)]
        if since is not None:
            query += " AND ts >= %s"
            params.append(utc_ms(since))
        query += " ORDER BY ts DESC, seq DESC LIMIT %s"
        params.append(limit)
        rows = self._rows("metrics", query, params)
        return [
            MetricSnapshot(
                type=t,
                queue=q,
                count=float(c),
                timestamp=_utc(ts),
                labels=_labels_decoder.decode(labels),
            )
            for t, q, c, ts, labels in reversed(rows)
        ]

    def ping(self) -> None:
        self._rows("ping", "SELECT 1 FROM dead_letter LIMIT 1")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._drop()

    def store_id(self) -> str:
        if self._store_id is None:

            def run(cur: psycopg.Cursor[Any]) -> str:
                cur.execute("SELECT value FROM sidecar_meta WHERE key = %s", (STORE_ID_KEY,))
                row = cur.fetchone()
                if row is None:  # the connection's schema set-up creates it
                    raise StoreUnavailable(f"{self.describe()}: no store id in sidecar_meta")
                return str(row[0])

            self._store_id = self._call("store id", run)
        return self._store_id

    def describe(self) -> str:
        schema = f", schema {self.schema}" if self.schema else ""
        return f"postgresql {self._where_text} (database {self.database}{schema})"
