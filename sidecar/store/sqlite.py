"""SQLite dead-letter store: the embedded default, durable before the caller acks.

Each row keeps the whole record as msgspec JSON (``doc``) so nothing is lost, plus copies
of the fields that are filtered, grouped or sorted on, each indexed. Every mutation is a
read-modify-write of the whole record inside one ``BEGIN IMMEDIATE`` transaction, so the
columns and ``doc`` never disagree.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from sidecar.store.base import (
    PATTERN_KEYS,
    STORE_ID_KEY,
    PatternKey,
    PutResult,
    StoreUnavailable,
    apply_put,
    apply_reprocess,
    new_store_id,
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

__all__ = ["SqliteStore", "connect_durable", "from_text", "limit_size", "to_text"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letter (
    id TEXT PRIMARY KEY,
    originalQueue TEXT NOT NULL,
    failureReason TEXT NOT NULL,
    errorMessage TEXT NOT NULL,
    signature TEXT NOT NULL,
    processingHost TEXT NOT NULL,
    attemptCount INTEGER NOT NULL,
    firstFailureAt TEXT NOT NULL,
    lastFailureAt TEXT NOT NULL,
    deadLetteredAt TEXT NOT NULL,
    reprocessed INTEGER NOT NULL,
    retryToken TEXT,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_failureReason ON dead_letter (failureReason);
CREATE INDEX IF NOT EXISTS dead_letter_originalQueue ON dead_letter (originalQueue);
CREATE INDEX IF NOT EXISTS dead_letter_processingHost ON dead_letter (processingHost);
CREATE INDEX IF NOT EXISTS dead_letter_lastFailureAt ON dead_letter (lastFailureAt, id);
CREATE INDEX IF NOT EXISTS dead_letter_signature ON dead_letter (signature);
CREATE INDEX IF NOT EXISTS dead_letter_deadLetteredAt ON dead_letter (deadLetteredAt);
CREATE INDEX IF NOT EXISTS dead_letter_retryToken ON dead_letter (retryToken)
    WHERE retryToken IS NOT NULL;
CREATE TABLE IF NOT EXISTS metrics (
    type TEXT NOT NULL,
    queue TEXT NOT NULL,
    count REAL NOT NULL,
    timestamp TEXT NOT NULL,
    labels TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_type_timestamp ON metrics (type, timestamp);
CREATE TABLE IF NOT EXISTS sidecar_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_COLUMNS = (
    "id, originalQueue, failureReason, errorMessage, signature, processingHost, attemptCount,"
    " firstFailureAt, lastFailureAt, deadLetteredAt, reprocessed, retryToken, doc"
)
_UPSERT = f"""
INSERT INTO dead_letter ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    originalQueue = excluded.originalQueue,
    failureReason = excluded.failureReason,
    errorMessage = excluded.errorMessage,
    signature = excluded.signature,
    processingHost = excluded.processingHost,
    attemptCount = excluded.attemptCount,
    firstFailureAt = excluded.firstFailureAt,
    lastFailureAt = excluded.lastFailureAt,
    deadLetteredAt = excluded.deadLetteredAt,
    reprocessed = excluded.reprocessed,
    retryToken = excluded.retryToken,
    doc = excluded.doc
"""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetterRecord)
_labels_decoder = msgspec.json.Decoder(dict[str, str])


def to_text(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC text, so SQL string order is time order."""
    return utc_ms(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def from_text(value: str) -> datetime:
    """Inverse of ``to_text``: an aware UTC datetime."""
    return datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=UTC)


def _icontains(haystack: str | None, needle: str | None) -> int:
    """Unicode-aware case-insensitive substring (SQLite's own lower() is ASCII-only)."""
    if haystack is None or needle is None:
        return 0
    return int(needle.lower() in haystack.lower())


def connect_durable(
    path: Path | str, what: str, *, busy_timeout_ms: int = 5000
) -> sqlite3.Connection:
    """Open a SQLite file for durable writes: WAL, synchronous=FULL, busy timeout.

    synchronous=FULL makes a commit reach the disk before it returns, which is what lets the
    caller ack the RabbitMQ message afterwards. Raises StoreUnavailable naming ``what``.
    """
    memory = str(path) == ":memory:"
    parent = Path(path).parent
    if not memory and parent.exists() and not parent.is_dir():
        raise StoreUnavailable(f"{what} at {path}: {parent} exists and is not a directory")
    try:
        if not memory:
            parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(
            f"{what} at {path}: cannot create directory {parent}: {exc.strerror or exc}"
        ) from exc
    try:
        conn = sqlite3.connect(
            str(path),
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
            check_same_thread=False,  # worker threads call us; self._lock serialises access
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"{what} at {path}: cannot open: {exc}") from exc
    try:
        mode = _switch_to_wal(conn, busy_timeout_ms / 1000)
        if mode != "wal" and not memory:
            log.warning("%s at %s: journal_mode is %r, not WAL", what, path, mode)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"{what} at {path}: cannot configure: {exc}") from exc
    return conn


def _switch_to_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock: on a
    fresh file SQLite reports "database is locked" at once, without waiting out the busy
    timeout, when processes open it together."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def limit_size(conn: sqlite3.Connection, max_bytes: int | None) -> None:
    """Cap the file size; past it writes fail as "database or disk is full"."""
    if max_bytes is None:
        return
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={max(1, int(max_bytes) // int(page_size))}")


def _rollback(conn: sqlite3.Connection) -> None:
    """Best-effort rollback; the original error is the one worth reporting."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.warning("sqlite rollback failed: %s", exc)


def _is_unavailable(exc: sqlite3.Error) -> bool:
    """Disk full, locked, I/O error, corrupt file: the store, not the caller, is at fault."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


class SqliteStore:
    """DeadLetterStore on one SQLite file; thread-safe through a single lock."""

    name = "sqlite"

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout_ms: int = 5000,
        max_bytes: int | None = None,
    ) -> None:
        self.path = path if str(path) == ":memory:" else Path(path)
        self._lock = threading.RLock()
        self._closed = False
        self._conn = connect_durable(self.path, "sqlite store", busy_timeout_ms=busy_timeout_ms)
        try:
            self._conn.create_function("sidecar_icontains", 2, _icontains, deterministic=True)
            self._conn.executescript(_SCHEMA)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"sqlite store at {self.path}: schema version {version} is newer than "
                    f"this sidecar understands ({SCHEMA_VERSION})"
                )
            self._store_id = self._own_store_id(self._conn)
            limit_size(self._conn, max_bytes)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreUnavailable(
                f"sqlite store at {self.path}: cannot initialise: {exc}"
            ) from exc
        except StoreUnavailable:
            self._conn.close()
            raise

    # --- plumbing

    @staticmethod
    def _own_store_id(conn: sqlite3.Connection) -> str:
        """The id kept in the file, created by whichever process opens it first: an insert
        that keeps an existing row, then a read, so two processes opening a fresh file at
        once agree on one id."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO sidecar_meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                (STORE_ID_KEY, new_store_id()),
            )
            row = conn.execute(
                "SELECT value FROM sidecar_meta WHERE key = ?", (STORE_ID_KEY,)
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return str(row[0])

    @contextmanager
    def _guard(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and turn SQLite's environmental errors into StoreUnavailable."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"sqlite store at {self.path}: closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                if _is_unavailable(exc):
                    raise StoreUnavailable(f"sqlite store at {self.path}: {action}: {exc}") from exc
                raise

    @contextmanager
    def _tx(self, action: str) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (fsynced) before returning."""
        with self._guard(action) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    @staticmethod
    def _load(conn: sqlite3.Connection, id: str) -> DeadLetterRecord | None:
        row = conn.execute("SELECT doc FROM dead_letter WHERE id = ?", (id,)).fetchone()
        return None if row is None else _decoder.decode(row[0])

    @staticmethod
    def _write(conn: sqlite3.Connection, r: DeadLetterRecord) -> None:
        conn.execute(
            _UPSERT,
            (
                r.id,
                r.originalQueue,
                r.failureReason,
                r.errorMessage,
                r.signature,
                r.processingHost,
                r.attemptCount,
                to_text(r.firstFailureAt),
                to_text(r.lastFailureAt),
                to_text(r.deadLetteredAt),
                int(r.reprocessed),
                r.retryToken,
                _encoder.encode(r),
            ),
        )

    @staticmethod
    def _where(flt: RecordFilter | None) -> tuple[str, list[Any]]:
        f = normalise_filter(flt)
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("originalQueue", f.queue),
            ("failureReason", f.reason),
            ("processingHost", f.host),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if f.since is not None:
            clauses.append("lastFailureAt >= ?")
            params.append(to_text(f.since))
        if f.until is not None:
            clauses.append("lastFailureAt < ?")
            params.append(to_text(f.until))
        if f.pattern is not None:
            clauses.append(
                "(sidecar_icontains(failureReason, ?) OR sidecar_icontains(errorMessage, ?)"
                " OR sidecar_icontains(signature, ?))"
            )
            params.extend([f.pattern] * 3)
        if f.reprocessed is not None:
            clauses.append("reprocessed = ?")
            params.append(int(f.reprocessed))
        if f.ids is not None:
            clauses.append("id IN (SELECT value FROM json_each(?))")
            params.append(msgspec.json.encode(list(f.ids)).decode())
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    # --- the contract

    def put(self, record: DeadLetterRecord) -> bool:
        (result,) = self.put_many([record])
        if isinstance(result, Exception):
            raise result
        return result

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        """One ``BEGIN IMMEDIATE`` transaction, so one fsync for the whole batch; each
        record under its own savepoint, so a record SQLite refuses is undone alone."""
        results: list[PutResult] = []
        normalised: list[tuple[int, DeadLetterRecord]] = []
        for record in records:
            try:
                normalised.append((len(results), normalise_record(record)))
                results.append(False)  # replaced below
            except Exception as exc:  # a naive time, a document that is not JSON
                results.append(exc)
        if not normalised:
            return results
        with self._tx("put") as conn:
            for index, new in normalised:
                conn.execute("SAVEPOINT put_one")
                try:
                    results[index] = self._put_one(conn, new)
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and _is_unavailable(exc):
                        raise  # the file, not the record: the whole batch fails
                    conn.execute("ROLLBACK TO put_one")
                    results[index] = exc
                conn.execute("RELEASE put_one")
        return results

    def _put_one(self, conn: sqlite3.Connection, new: DeadLetterRecord) -> bool:
        existing = self._load(conn, new.id)
        if existing is not None and not same_message(existing, new):
            # Another message holds this id: keep both (records.distinct_id).
            new = msgspec.structs.replace(new, id=distinct_id(new))
            existing = self._load(conn, new.id)
        if existing is None:
            self._write(conn, new)
            return True
        merged = apply_put(existing, new)
        if merged is not None:
            self._write(conn, merged)
        return False

    def get(self, id: str) -> DeadLetterRecord | None:
        with self._guard("get") as conn:
            return self._load(conn, id)

    def ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids starting with ``prefix`` (for ``dlq show`` on a shortened id), in id order.

        A range on the primary key, so the cost does not grow with the store.
        """
        sql = (
            "SELECT id FROM dead_letter WHERE id >= ? AND id < ? AND substr(id, 1, ?) = ?"
            " ORDER BY id LIMIT ?"
        )
        with self._guard("ids_with_prefix") as conn:
            rows = conn.execute(
                sql, [prefix, prefix + "\U0010ffff", len(prefix), prefix, limit]
            ).fetchall()
        return [str(row[0]) for row in rows]

    def find(
        self, filter: RecordFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterRecord]:
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        where, params = self._where(filter)
        sql = (
            f"SELECT doc FROM dead_letter{where}"
            " ORDER BY lastFailureAt DESC, id DESC LIMIT ? OFFSET ?"
        )
        with self._guard("find") as conn:
            rows = conn.execute(sql, [*params, limit, offset]).fetchall()
        return [_decoder.decode(row[0]) for row in rows]

    def count(self, filter: RecordFilter | None = None) -> int:
        where, params = self._where(filter)
        with self._guard("count") as conn:
            return int(
                conn.execute(f"SELECT COUNT(*) FROM dead_letter{where}", params).fetchone()[0]
            )

    def failure_patterns(
        self, filter: RecordFilter | None = None, *, by: PatternKey = "failureReason"
    ) -> list[PatternRow]:
        if by not in PATTERN_KEYS:
            raise ValueError(f"cannot group failure patterns by {by!r}")
        where, params = self._where(filter)
        sql = (
            f"SELECT {by}, COUNT(*), MIN(firstFailureAt), MAX(lastFailureAt)"
            f" FROM dead_letter{where} GROUP BY {by} ORDER BY 2 DESC, 1 ASC"
        )
        with self._guard("failure_patterns") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            PatternRow(key, int(n), from_text(first), from_text(last))
            for key, n, first, last in rows
        ]

    def oldest_newest(
        self, filter: RecordFilter | None = None
    ) -> tuple[datetime | None, datetime | None]:
        where, params = self._where(filter)
        sql = f"SELECT MIN(deadLetteredAt), MAX(deadLetteredAt) FROM dead_letter{where}"
        with self._guard("oldest_newest") as conn:
            oldest, newest = conn.execute(sql, params).fetchone()
        return (
            None if oldest is None else from_text(oldest),
            None if newest is None else from_text(newest),
        )

    def signatures(self) -> set[str]:
        with self._guard("signatures") as conn:
            rows = conn.execute(
                "SELECT DISTINCT signature FROM dead_letter WHERE signature != ''"
            ).fetchall()
        return {row[0] for row in rows}

    def begin_retry(self, id: str, token: str) -> bool:
        with self._tx("begin_retry") as conn:
            existing = self._load(conn, id)
            if existing is None or existing.retryToken not in (None, token):
                return False
            if existing.retryToken is None:
                self._write(conn, msgspec.structs.replace(existing, retryToken=token))
            return True

    def cancel_retry(self, id: str, token: str) -> bool:
        with self._tx("cancel_retry") as conn:
            existing = self._load(conn, id)
            if existing is None or existing.retryToken != token:
                return False
            self._write(conn, msgspec.structs.replace(existing, retryToken=None))
            return True

    def mark_reprocessed(
        self, id: str, *, token: str | None, target_queue: str, at: datetime, tool: str
    ) -> bool:
        with self._tx("mark_reprocessed") as conn:
            existing = self._load(conn, id)
            if existing is None:
                return False
            updated, recorded = apply_reprocess(
                existing, token=token, target_queue=target_queue, at=at, tool=tool
            )
            if updated is not None:
                self._write(conn, updated)
            return recorded

    def in_flight_retries(self) -> list[DeadLetterRecord]:
        with self._guard("in_flight_retries") as conn:
            rows = conn.execute(
                "SELECT doc FROM dead_letter WHERE retryToken IS NOT NULL"
                " ORDER BY lastFailureAt DESC, id DESC"
            ).fetchall()
        return [_decoder.decode(row[0]) for row in rows]

    def delete(self, filter: RecordFilter) -> int:
        where, params = self._where(filter)
        with self._tx("delete") as conn:
            return conn.execute(f"DELETE FROM dead_letter{where}", params).rowcount

    def insert_metric(self, snapshot: MetricSnapshot) -> None:
        m = normalise_metric(snapshot)
        with self._tx("insert_metric") as conn:
            conn.execute(
                "INSERT INTO metrics (type, queue, count, timestamp, labels)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    m.type,
                    m.queue,
                    m.count,
                    to_text(m.timestamp),
                    _encoder.encode(m.labels).decode(),
                ),
            )

    def metrics(
        self, type: str, *, since: datetime | None = None, limit: int = 1000
    ) -> list[MetricSnapshot]:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        sql = "SELECT type, queue, count, timestamp, labels FROM metrics WHERE type = ?"
        params: list[Any] = [type]
        if since is not None:
            sql += " AND timestamp >= ?"
            params.append(to_text(since))
        sql += " ORDER BY timestamp DESC, rowid DESC LIMIT ?"
        params.append(limit)
        with self._guard("metrics") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            MetricSnapshot(
                type=t,
                queue=q,
                count=float(c),
                timestamp=from_text(ts),
                labels=_labels_decoder.decode(labels),
            )
            for t, q, c, ts, labels in reversed(rows)
        ]

    def ping(self) -> None:
        with self._guard("ping") as conn:
            conn.execute("SELECT 1 FROM dead_letter LIMIT 1").fetchall()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def store_id(self) -> str:
        return self._store_id

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def pragma(self, name: str) -> Any:
        """Read one PRAGMA (for health checks and tests: journal_mode, synchronous)."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"bad pragma name {name!r}")
        with self._guard("pragma") as conn:
            row = conn.execute(f"PRAGMA {name}").fetchone()
        return None if row is None else row[0]
