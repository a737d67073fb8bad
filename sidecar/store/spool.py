"""A local durable spool in front of the configured store.

When the primary (say MongoDB) is down, a dead letter is appended to a local SQLite file
(WAL, synchronous=FULL) and ``put`` still returns: the record is on disk, so the caller
may ack the message. ``drain`` later replays the spool into the primary in order; the
primary's put is idempotent, so a crash between a replay and its spool delete duplicates
nothing. Only when the spool fails too (disk full) does ``put`` raise, and then the
caller must not ack.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import msgspec

from sidecar.store.base import DeadLetterStore, PatternKey, PutResult, StoreUnavailable
from sidecar.store.records import (
    DeadLetterRecord,
    MetricSnapshot,
    PatternRow,
    RecordFilter,
    normalise_record,
)
from sidecar.store.sqlite import connect_durable, limit_size, to_text

__all__ = ["SpoolingStore"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    spooledAt TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lastError TEXT,
    doc BLOB NOT NULL
);
"""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetterRecord)


class SpoolingStore:
    """DeadLetterStore that spools puts locally while its primary is unavailable.

    Reads, retries and metrics go to the primary (and raise StoreUnavailable when it is
    down); spooled records are not visible to them until drained. After a failure, puts go
    straight to the spool for ``retry_primary_after`` seconds instead of each waiting out
    the primary's timeout; ``drain`` always probes the primary.
    """

    def __init__(
        self,
        primary: DeadLetterStore,
        spool_path: Path | str,
        *,
        max_bytes: int | None = None,
        retry_primary_after: float = 5.0,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.primary = primary
        self.spool_path = Path(spool_path)
        self.retry_primary_after = retry_primary_after
        self.primary_available = True
        self._down_since: float | None = None
        self._last_error = ""
        self._lock = threading.Lock()
        self._closed = False
        self._conn = connect_durable(self.spool_path, "spool", busy_timeout_ms=busy_timeout_ms)
        try:
            self._conn.executescript(_SCHEMA)
            limit_size(self._conn, max_bytes)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreUnavailable(f"spool at {self.spool_path}: cannot initialise: {exc}") from exc

    @property
    def name(self) -> str:
        return self.primary.name

    # --- availability bookkeeping

    def _up(self) -> None:
        self.primary_available = True
        self._down_since = None

    def _down(self, exc: StoreUnavailable) -> None:
        self.primary_available = False
        self._down_since = time.monotonic()
        self._last_error = str(exc)

    def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the primary, keeping ``primary_available`` current."""
        try:
            result = fn(*args, **kwargs)
        except StoreUnavailable as exc:
            self._down(exc)
            raise
        self._up()
        return result

    def _skip_primary(self) -> bool:
        return (
            self._down_since is not None
            and time.monotonic() - self._down_since < self.retry_primary_after
        )

    # --- spool file

    def _spool_op(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"spool at {self.spool_path}: closed")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"spool at {self.spool_path}: {action}: {exc}") from exc

    @staticmethod
    def _row(record: DeadLetterRecord) -> tuple[str, str, bytes]:
        """A record as a spool row; raises (before anything is written) if it cannot be."""
        return record.id, to_text(datetime.now(UTC)), _encoder.encode(record)

    def _write_all(self, action: str, statement: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Every row in one transaction under synchronous=FULL: one fsync for the batch,
        and all of it on disk when this returns (or none of it)."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(statement, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        self._spool_op(action, write)

    def _append(self, rows: list[tuple[str, str, bytes]]) -> None:
        self._write_all("append", "INSERT INTO spool (id, spooledAt, doc) VALUES (?, ?, ?)", rows)

    # --- the contract, plus drain/spooled

    def put(self, record: DeadLetterRecord) -> bool:
        """True when new in the primary or spooled; raises only if the spool fails too."""
        record = normalise_record(record)  # bad input raises here, not after spooling
        cause = f"not retried for {self.retry_primary_after:g}s after: {self._last_error}"
        if not self._skip_primary():
            try:
                return self._call(self.primary.put, record)
            except StoreUnavailable as exc:
                cause = str(exc)
        self._spool([record], [self._row(record)], cause)
        return True

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        """The primary's ``put_many``; while it is unavailable the whole batch is spooled
        in one transaction (each spooled record counts as new). Raises only if the spool
        fails too."""
        results: list[PutResult] = []
        accepted: list[tuple[int, DeadLetterRecord]] = []
        for record in records:
            try:
                accepted.append((len(results), normalise_record(record)))
                results.append(True)  # spooled, unless the primary says otherwise below
            except Exception as exc:  # bad input is refused here, never spooled
                results.append(exc)
        if not accepted:
            return results
        batch = [record for _, record in accepted]
        cause = f"not retried for {self.retry_primary_after:g}s after: {self._last_error}"
        if not self._skip_primary():
            try:
                written = self._call(self.primary.put_many, batch)
            except StoreUnavailable as exc:
                cause = str(exc)
            else:
                for (index, _), result in zip(accepted, written, strict=True):
                    results[index] = result
                return results
        spooled: list[DeadLetterRecord] = []
        rows: list[tuple[str, str, bytes]] = []
        for index, record in accepted:
            try:
                rows.append(self._row(record))
                spooled.append(record)
            except Exception as exc:  # cannot be written as JSON: refused, never spooled
                results[index] = exc
        if rows:
            self._spool(spooled, rows, cause)
        return results

    def _spool(
        self, records: list[DeadLetterRecord], rows: list[tuple[str, str, bytes]], cause: str
    ) -> None:
        try:
            self._append(rows)
        except StoreUnavailable as exc:
            what = (
                f"dead letter {records[0].id!r}"
                if len(records) == 1
                else f"{len(records)} dead letters (first {records[0].id!r})"
            )
            raise StoreUnavailable(
                f"{what} not stored: primary unavailable ({cause}) and {exc}"
            ) from exc
        if len(records) == 1:
            log.warning("dead letter %r spooled locally: %s", records[0].id, cause)
        else:
            log.warning(
                "%d dead letters (first %r) spooled locally: %s",
                len(records),
                records[0].id,
                cause,
            )

    def drain(self, max_items: int = 500) -> int:
        """Replay up to ``max_items`` spooled records into the primary, oldest first.

        Each chunk goes to the primary's ``put_many`` (one transaction where it has them),
        and a record is deleted from the spool only after the primary accepted it; a
        StoreUnavailable stops the drain. A record the primary rejects for another reason,
        or one that no longer decodes (poison), is kept, its error noted, and skipped so it
        cannot block the rest. Returns how many records were moved.
        """
        moved = 0
        after = 0
        while moved < max_items:
            rows = self._read_after(after, min(100, max_items - moved))
            if not rows:
                break
            after = rows[-1][0]
            seqs: list[int] = []
            records: list[DeadLetterRecord] = []
            for seq, doc in rows:
                try:
                    records.append(_decoder.decode(doc))
                    seqs.append(seq)
                except Exception as exc:
                    self._reject(seq, exc)
            if not records:
                continue
            try:
                results = self._call(self.primary.put_many, records)
            except StoreUnavailable:
                return moved
            stored: list[int] = []
            for seq, result in zip(seqs, results, strict=True):
                if isinstance(result, Exception):
                    self._reject(seq, result)
                else:
                    stored.append(seq)
            self._delete(stored)
            moved += len(stored)
        return moved

    def _reject(self, seq: int, exc: Exception) -> None:
        log.error("spooled record seq=%d rejected by the primary: %s: %s", seq,
                  type(exc).__name__, exc)  # fmt: skip
        self._note_error(seq, f"{type(exc).__name__}: {exc}")

    def _read_after(self, after: int, n: int) -> list[tuple[int, bytes]]:
        return self._spool_op(
            "read",
            lambda c: c.execute(
                "SELECT seq, doc FROM spool WHERE seq > ? ORDER BY seq LIMIT ?", (after, n)
            ).fetchall(),
        )

    def _note_error(self, seq: int, error: str) -> None:
        self._spool_op(
            "note error",
            lambda c: c.execute(
                "UPDATE spool SET attempts = attempts + 1, lastError = ? WHERE seq = ?",
                (error, seq),
            ),
        )

    def _delete(self, seqs: list[int]) -> None:
        """Forget records the primary now holds, in one transaction."""
        if seqs:
            self._write_all("delete", "DELETE FROM spool WHERE seq = ?", [(seq,) for seq in seqs])

    def spooled(self) -> int:
        """Records waiting in the local spool."""
        return int(
            self._spool_op("count", lambda c: c.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
        )

    def get(self, id: str) -> DeadLetterRecord | None:
        return self._call(self.primary.get, id)

    def find(
        self, filter: RecordFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterRecord]:
        return self._call(self.primary.find, filter, limit=limit, offset=offset)

    def count(self, filter: RecordFilter | None = None) -> int:
        return self._call(self.primary.count, filter)

    def failure_patterns(
        self, filter: RecordFilter | None = None, *, by: PatternKey = "failureReason"
    ) -> list[PatternRow]:
        return self._call(self.primary.failure_patterns, filter, by=by)

    def oldest_newest(
        self, filter: RecordFilter | None = None
    ) -> tuple[datetime | None, datetime | None]:
        return self._call(self.primary.oldest_newest, filter)

    def signatures(self) -> set[str]:
        return self._call(self.primary.signatures)

    def begin_retry(self, id: str, token: str) -> bool:
        return self._call(self.primary.begin_retry, id, token)

    def cancel_retry(self, id: str, token: str) -> bool:
        return self._call(self.primary.cancel_retry, id, token)

    def mark_reprocessed(
        self, id: str, *, token: str | None, target_queue: str, at: datetime, tool: str
    ) -> bool:
        return self._call(
            self.primary.mark_reprocessed,
            id,
            token=token,
            target_queue=target_queue,
            at=at,
            tool=tool,
        )

    def in_flight_retries(self) -> list[DeadLetterRecord]:
        return self._call(self.primary.in_flight_retries)

    def delete(self, filter: RecordFilter) -> int:
        return self._call(self.primary.delete, filter)

    def insert_metric(self, snapshot: MetricSnapshot) -> None:
        self._call(self.primary.insert_metric, snapshot)

    def metrics(
        self, type: str, *, since: datetime | None = None, limit: int = 1000
    ) -> list[MetricSnapshot]:
        return self._call(self.primary.metrics, type, since=since, limit=limit)

    def ping(self) -> None:
        self._call(self.primary.ping)

    def close(self) -> None:
        try:
            self.primary.close()
        finally:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._conn.close()

    def store_id(self) -> str:
        """The primary's: the spool only holds records on their way to it."""
        return self._call(self.primary.store_id)

    def describe(self) -> str:
        return f"{self.primary.describe()} (spool {self.spool_path})"
