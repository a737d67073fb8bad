"""The dead-letter store contract, its error type, and ``open_store``.

The API is synchronous on purpose: the daemon calls it through ``trio.to_thread.run_sync``
with a limiter of one per store, and both backends' drivers are blocking.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

import msgspec

from sidecar.redact import redact_url, scrub
from sidecar.store.records import (
    DeadLetterRecord,
    MetricSnapshot,
    PatternRow,
    RecordFilter,
    utc_ms,
)

__all__ = [
    "PATTERN_KEYS",
    "DeadLetterStore",
    "PatternKey",
    "PutResult",
    "StoreUnavailable",
    "apply_put",
    "apply_reprocess",
    "put_each",
    "redact_url",
    "scrub",
]

PatternKey = Literal["failureReason", "signature", "processingHost", "originalQueue"]
PATTERN_KEYS: frozenset[str] = frozenset(
    {"failureReason", "signature", "processingHost", "originalQueue"}
)


class StoreUnavailable(Exception):
    """The store cannot be reached or written; the caller must not ack on a failed put.

    Messages name the store and the cause but never credentials (see ``redact_url``).
    """


PutResult: TypeAlias = bool | Exception
"""One record's outcome in ``put_many``: what ``put`` would have returned (True when new),
or the exception with which the store refused that record alone."""


@runtime_checkable
class DeadLetterStore(Protocol):
    """One behavioural contract for every backend (SQLite, MongoDB, the spooling wrapper)."""

    name: str

    def put(self, record: DeadLetterRecord) -> bool:
        """Idempotent upsert keyed by ``id``; True when the record is new.

        A later failure of a known id (greater lastFailureAt) updates attemptCount,
        lastFailureAt, errorMessage, failureReason, signature, deadLetteredAt, failures and resets
        ``reprocessed`` (it failed again after a reprocess), keeping history and
        reprocessCount. An equal or older one changes nothing.
        """
        ...

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        """``put`` of each record in order, made durable together (one transaction and one
        disk flush where the backend has transactions): one result per record.

        Records are applied one after the other, so repeats within a batch behave exactly
        as successive puts. A record the store refuses (what ``put`` would raise other than
        StoreUnavailable) gets its exception as its result; the others are stored all the
        same. Raises StoreUnavailable when the store cannot be written: then none of the
        batch may be taken as durable (the caller puts it again; put is idempotent).
        """
        ...

    def get(self, id: str) -> DeadLetterRecord | None: ...

    def find(
        self, filter: RecordFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterRecord]:
        """Newest first: lastFailureAt descending, then id descending."""
        ...

    def count(self, filter: RecordFilter | None = None) -> int: ...

    def failure_patterns(
        self, filter: RecordFilter | None = None, *, by: PatternKey = "failureReason"
    ) -> list[PatternRow]:
        """The seed's $group: count, min firstFailureAt, max lastFailureAt; count desc, key asc."""
        ...

    def oldest_newest(
        self, filter: RecordFilter | None = None
    ) -> tuple[datetime | None, datetime | None]:
        """Min and max deadLetteredAt (the dashboard's "Oldest/Newest Message")."""
        ...

    def signatures(self) -> set[str]:
        """Distinct non-empty signatures, to seed the new-failure-pattern alert."""
        ...

    def begin_retry(self, id: str, token: str) -> bool:
        """Claim an operator retry: True when retryToken is now ``token``.

        False when the record does not exist or another token is in flight.
        """
        ...

    def cancel_retry(self, id: str, token: str) -> bool:
        """Abandon a claimed retry that was never published; True when the token was cleared."""
        ...

    def mark_reprocessed(
        self, id: str, *, token: str | None, target_queue: str, at: datetime, tool: str
    ) -> bool:
        """Record a republish; a repeat with the same token is a no-op returning False."""
        ...

    def in_flight_retries(self) -> list[DeadLetterRecord]:
        """Records with a retryToken set (a retry claimed but not yet marked)."""
        ...

    def delete(self, filter: RecordFilter) -> int: ...

    def insert_metric(self, snapshot: MetricSnapshot) -> None: ...

    def metrics(
        self, type: str, *, since: datetime | None = None, limit: int = 1000
    ) -> list[MetricSnapshot]:
        """The most recent ``limit`` snapshots at/after ``since``, returned oldest first."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    def store_id(self) -> str:
        """This store's persistent identity: a random id (uuid4 hex) created once, the
        first time the store is opened, and kept in the store itself, so every process
        opening the same store gets the same id and two stores never share one (a file
        path would not do: two hosts' SQLite files may have the same path)."""
        ...

    def close(self) -> None: ...

    def describe(self) -> str:
        """Where the store is, without credentials (for logs and the status page)."""
        ...


# --- shared semantics (SQLite applies them in Python; MongoDB mirrors them with operators)


def put_each(
    put: Callable[[DeadLetterRecord], bool], records: Sequence[DeadLetterRecord]
) -> list[PutResult]:
    """``put_many`` as one ``put`` per record: for a backend without multi-record
    transactions, and the fallback of one whose batch a refused record broke."""
    results: list[PutResult] = []
    for record in records:
        try:
            results.append(put(record))
        except StoreUnavailable:
            raise
        except Exception as exc:  # this record alone is refused
            results.append(exc)
    return results


def apply_put(existing: DeadLetterRecord, new: DeadLetterRecord) -> DeadLetterRecord | None:
    """The record after a repeated put of a known id, or None when nothing changes."""
    if new.lastFailureAt <= existing.lastFailureAt:
        return None
    return msgspec.structs.replace(
        existing,
        attemptCount=new.attemptCount,
        lastFailureAt=new.lastFailureAt,
        errorMessage=new.errorMessage,
        failureReason=new.failureReason,
        signature=new.signature,
        deadLetteredAt=new.deadLetteredAt,
        failures=new.failures,
        reprocessed=False,
    )


def history_entry(
    *, token: str | None, target_queue: str, at: datetime, tool: str
) -> dict[str, Any]:
    """One reprocess in ``history``; ``at`` is ISO text so every backend returns the same type."""
    return {
        "at": utc_ms(at).isoformat().replace("+00:00", "Z"),
        "targetQueue": target_queue,
        "tool": tool,
        "token": token,
    }


def apply_reprocess(
    existing: DeadLetterRecord,
    *,
    token: str | None,
    target_queue: str,
    at: datetime,
    tool: str,
) -> tuple[DeadLetterRecord | None, bool]:
    """What ``mark_reprocessed`` writes (None: nothing) and whether it recorded a reprocess.
    A token already recorded records nothing, but still releases its claim if a crash left
    the claim behind."""
    if token is not None and any(h.get("token") == token for h in existing.history):
        if existing.retryToken == token:
            return msgspec.structs.replace(existing, retryToken=None), False
        return None, False
    at = utc_ms(at)
    updated = msgspec.structs.replace(
        existing,
        reprocessed=True,
        reprocessedAt=at,
        reprocessTarget=target_queue,
        reprocessCount=existing.reprocessCount + 1,
        history=[
            *existing.history,
            history_entry(token=token, target_queue=target_queue, at=at, tool=tool),
        ],
        # Only our own claim is released; another operator's in-flight claim stays.
        retryToken=None if existing.retryToken == token else existing.retryToken,
    )
    return updated, True


STORE_ID_KEY = "store_id"


def new_store_id() -> str:
    """A fresh store identity; kept only if no process stored one first."""
    return uuid.uuid4().hex


# --- URLs and credentials (redact_url lives in sidecar.redact, shared with the config)


def _sqlite_path(url: str) -> str:
    """SQLAlchemy style: ``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` absolute."""
    rest = url[len("sqlite:") :]
    if not rest.startswith("///"):
        raise ValueError(
            f"bad SQLite URL {redact_url(url)!r}: expected sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = rest[3:]
    if not path:
        raise ValueError(f"bad SQLite URL {url!r}: no database path")
    return path


def parse_store_url(url: str) -> tuple[Literal["sqlite", "mongodb", "postgresql"], str]:
    """(backend, SQLite path or server URL) for a configuration URL, or ValueError naming
    what is wrong. No I/O: ``config check`` calls it so a URL that passes also opens."""
    url = url.strip()
    if not url:
        raise ValueError("empty dead-letter store URL")
    scheme, sep, _ = url.partition("://")
    if not sep:
        if url.lower().startswith("sqlite:"):
            raise ValueError(f"bad SQLite URL {url!r}: expected sqlite:///path.db")
        if ":" in url.split("/", 1)[0] and not url.startswith((".", "/", "~")):
            # "postgres:x" or "c:..." reads as a scheme, not a file name: say so.
            raise ValueError(
                f"bad dead-letter store URL {redact_url(url)!r}: use sqlite:///path.db, "
                "a plain file path, mongodb://, mongodb+srv:// or postgresql://"
            )
        return "sqlite", url
    scheme = scheme.lower()
    if scheme == "sqlite":
        return "sqlite", _sqlite_path("sqlite:" + url[len("sqlite:") :])
    if scheme in ("mongodb", "mongodb+srv"):
        return "mongodb", url
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    raise ValueError(
        f"unknown dead-letter store scheme {scheme!r} in {redact_url(url)!r}: use "
        "sqlite:///path.db, a plain file path, mongodb://, mongodb+srv:// or postgresql://"
    )
