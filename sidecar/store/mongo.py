"""MongoDB dead-letter store, in the seed's own shape (collections dead_letter and metrics).

Documents use the seed's field names with ``_id`` = record id. Writes are acknowledged by
a majority with journaling before ``put`` returns, so the caller may ack the message.
The client connects lazily: constructing a store never blocks, and indexes are created by
the first call that reaches the server.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import bson
import msgspec
from bson.codec_options import CodecOptions
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.errors import (
    ConfigurationError,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from pymongo.write_concern import WriteConcern

from sidecar.store.base import (
    PATTERN_KEYS,
    STORE_ID_KEY,
    PatternKey,
    PutResult,
    StoreUnavailable,
    history_entry,
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

__all__ = ["MongoStore", "record_from_doc", "record_to_doc"]

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "sidecar"
# BSON's hard limit is 16 MiB; leave room for the insert command around the document.
_MAX_DOC_BYTES = 16 * 1024 * 1024 - 64 * 1024

_UPDATED_ON_REFAIL = (
    "attemptCount",
    "lastFailureAt",
    "errorMessage",
    "failureReason",
    "signature",
    "deadLetteredAt",
    "failures",
)


def record_to_doc(record: DeadLetterRecord) -> dict[str, Any]:
    """A normalised record as a BSON-encodable document (``_id`` = id, no ``id`` field).

    If the decoded payload cannot be BSON (an integer past 64 bits, a NUL in a key) or the
    document would pass the 16 MiB limit, the payload falls back to the body's text, then to
    None: ``rawBody`` always keeps the exact bytes, so nothing needed for republish is lost.
    """
    doc: dict[str, Any] = msgspec.to_builtins(record, builtin_types=(bytes, datetime))
    doc["_id"] = doc.pop("id")
    if doc.get("retryToken") is None:
        doc.pop("retryToken", None)  # absent, not null: keeps the sparse index small
    try:
        fallbacks: list[Any] = [record.rawBody.decode("utf-8"), None]
    except UnicodeDecodeError:
        fallbacks = [None]
    while True:
        try:
            if len(bson.encode(doc)) <= _MAX_DOC_BYTES:
                return doc
            problem = "document too large"
        except (InvalidDocument, OverflowError) as exc:
            problem = str(exc)
        if not fallbacks:
            raise ValueError(f"dead letter {record.id!r} cannot be stored in MongoDB: {problem}")
        log.warning(
            "dead letter %r: payload not storable as BSON (%s); simplified", record.id, problem
        )
        doc["payload"] = fallbacks.pop(0)


def record_from_doc(doc: Mapping[str, Any]) -> DeadLetterRecord:
    """Inverse of ``record_to_doc``; unknown extra fields are ignored."""
    data = dict(doc)
    data["id"] = data.pop("_id")
    return msgspec.convert(data, DeadLetterRecord)


def _uri_option_names(url: str) -> set[str]:
    """Lower-cased option names given in the URI (they win over our defaults)."""
    try:
        return {k.lower() for k, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    except ValueError:
        return set()


class MongoStore:
    """DeadLetterStore on MongoDB via pymongo (thread-safe: pymongo's client is)."""

    name = "mongodb"

    def __init__(
        self,
        url: str,
        *,
        database: str | None = None,
        server_selection_timeout_ms: int = 2000,
        connect_timeout_ms: int = 2000,
        socket_timeout_ms: int = 20000,
        write_timeout_ms: int = 10000,
        write_concern: WriteConcern | None = None,
    ) -> None:
        """Options given in the URL win over these keyword defaults.

        Every wait is bounded (server selection, connect, socket reads, majority write
        acknowledgement), so a worker thread never hangs on a sick server. pymongo's
        ``timeoutMS`` is deliberately not defaulted: when set it replaces the short server
        selection timeout, making every call against a down server wait that long.
        """
        self._url = url
        given = _uri_option_names(url)
        kwargs: dict[str, Any] = {"connect": False, "appname": "sidecar"}
        for option, value in (
            ("serverSelectionTimeoutMS", server_selection_timeout_ms),
            ("connectTimeoutMS", connect_timeout_ms),
            ("socketTimeoutMS", socket_timeout_ms),
        ):
            if option.lower() not in given:
                kwargs[option] = value
        try:
            self._client: MongoClient[dict[str, Any]] = MongoClient(url, **kwargs)
            db_name = database or self._client.get_default_database(DEFAULT_DATABASE).name
        except (ConfigurationError, ValueError, TypeError) as exc:
            raise ValueError(
                f"bad MongoDB URL {redact_url(url)!r}: {scrub(str(exc), url)}"
            ) from exc
        self.database = db_name
        codec: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, tzinfo=UTC)
        wc = write_concern or WriteConcern(w="majority", j=True, wtimeout=write_timeout_ms)
        db = self._client.get_database(db_name, codec_options=codec, write_concern=wc)
        self._records: Collection[dict[str, Any]] = db.get_collection("dead_letter")
        self._metrics: Collection[dict[str, Any]] = db.get_collection("metrics")
        self._meta: Collection[dict[str, Any]] = db.get_collection("sidecar_meta")
        self._store_id: str | None = None
        self._indexes_ready = False
        self._index_lock = threading.Lock()

    # --- plumbing

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Map every driver error to StoreUnavailable, with credentials scrubbed."""
        try:
            self._ensure_indexes()
            yield
        except PyMongoError as exc:
            raise StoreUnavailable(
                f"{self.describe()}: {action}: {type(exc).__name__}: {scrub(str(exc), self._url)}"
            ) from exc

    def _ensure_indexes(self) -> None:
        """Create the indexes once per process, on first contact (construction never blocks)."""
        if self._indexes_ready:
            return
        with self._index_lock:
            if self._indexes_ready:
                return
            try:
                self._create_indexes()
            except OperationFailure as exc:
                if isinstance(exc, ExecutionTimeout | WriteConcernError):
                    raise
                # e.g. a role without createIndex: slower queries beat refusing dead letters.
                log.warning(
                    "%s: cannot create indexes: %s", self.describe(), scrub(str(exc), self._url)
                )
            self._indexes_ready = True

    def _create_indexes(self) -> None:
        """The indexes the filters, sorts and aggregations of this class use."""
        for field in (
            "failureReason",
            "originalQueue",
            "processingHost",
            "signature",
            "deadLetteredAt",
        ):
            self._records.create_index([(field, ASCENDING)], name=field)
        self._records.create_index(
            [("lastFailureAt", DESCENDING), ("_id", DESCENDING)], name="lastFailureAt"
        )
        self._records.create_index([("retryToken", ASCENDING)], name="retryToken", sparse=True)
        self._metrics.create_index(
            [("type", ASCENDING), ("timestamp", ASCENDING)], name="type_timestamp"
        )

    @staticmethod
    def _query(flt: RecordFilter | None) -> dict[str, Any]:
        f = normalise_filter(flt)
        q: dict[str, Any] = {}
        if f.queue is not None:
            q["originalQueue"] = f.queue
        if f.reason is not None:
            q["failureReason"] = f.reason
        if f.host is not None:
            q["processingHost"] = f.host
        window: dict[str, Any] = {}
        if f.since is not None:
            window["$gte"] = f.since
        if f.until is not None:
            window["$lt"] = f.until
        if window:
            q["lastFailureAt"] = window
        if f.pattern is not None:
            rx = {"$regex": re.escape(f.pattern), "$options": "i"}
            q["$or"] = [{"failureReason": rx}, {"errorMessage": rx}, {"signature": rx}]
        if f.reprocessed is not None:
            q["reprocessed"] = f.reprocessed
        if f.ids is not None:
            q["_id"] = {"$in": list(f.ids)}
        return q

    _NEWEST_FIRST = [("lastFailureAt", DESCENDING), ("_id", DESCENDING)]

    # --- the contract

    def put(self, record: DeadLetterRecord) -> bool:
        """Insert, or on a duplicate id apply the later-failure update (base.apply_put's rule).

        A plain insert rather than an upsert with ``$setOnInsert``: the payload and headers
        are arbitrary JSON whose keys may contain "." or start with "$", which MongoDB
        (5.0+) accepts in inserted documents but not inside update-operator values.
        """
        new = normalise_record(record)
        doc = record_to_doc(new)
        with self._guard("put"):
            try:
                self._records.insert_one(doc)
                return True
            except DuplicateKeyError:
                pass  # known id (or a retried insert that had already landed)
            found = self._records.find_one({"_id": new.id})
            if found is not None and not same_message(record_from_doc(found), new):
                # Another message holds this id: keep both (records.distinct_id).
                new = msgspec.structs.replace(new, id=distinct_id(new))
                doc = record_to_doc(new)
                try:
                    self._records.insert_one(doc)
                    return True
                except DuplicateKeyError:
                    pass  # this message was stored under its distinct id before
            self._records.update_one(
                {"_id": new.id, "lastFailureAt": {"$lt": new.lastFailureAt}},
                {"$set": {**{k: doc[k] for k in _UPDATED_ON_REFAIL}, "reprocessed": False}},
            )
            return False

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        """One acknowledged write per record, in order: MongoDB has no multi-document
        transaction outside a replica set, and each ``put`` is already idempotent."""
        return put_each(self.put, records)

    def get(self, id: str) -> DeadLetterRecord | None:
        with self._guard("get"):
            doc = self._records.find_one({"_id": id})
        return None if doc is None else record_from_doc(doc)

    def ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids starting with ``prefix``; an anchored regex walks the _id index."""
        query = {"_id": {"$regex": "^" + re.escape(prefix)}}
        with self._guard("ids_with_prefix"):
            docs = self._records.find(query, {"_id": 1}).sort("_id", 1).limit(limit)
            return [str(d["_id"]) for d in docs]

    def find(
        self, filter: RecordFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterRecord]:
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        if limit == 0:
            return []  # Mongo's limit(0) would mean "no limit"
        with self._guard("find"):
            docs = list(
                self._records.find(self._query(filter))
                .sort(self._NEWEST_FIRST)
                .skip(offset)
                .limit(limit)
            )
        return [record_from_doc(d) for d in docs]

    def count(self, filter: RecordFilter | None = None) -> int:
        with self._guard("count"):
            return int(self._records.count_documents(self._query(filter)))

    def failure_patterns(
        self, filter: RecordFilter | None = None, *, by: PatternKey = "failureReason"
    ) -> list[PatternRow]:
        if by not in PATTERN_KEYS:
            raise ValueError(f"cannot group failure patterns by {by!r}")
        pipeline: list[dict[str, Any]] = [
            {"$match": self._query(filter)},
            {
                "$group": {
                    "_id": f"${by}",
                    "count": {"$sum": 1},
                    "firstOccurrence": {"$min": "$firstFailureAt"},
                    "lastOccurrence": {"$max": "$lastFailureAt"},
                }
            },
            {"$sort": {"count": -1, "_id": 1}},
        ]
        with self._guard("failure_patterns"):
            rows = list(self._records.aggregate(pipeline))
        return [
            PatternRow(
                "" if r["_id"] is None else str(r["_id"]),
                int(r["count"]),
                r["firstOccurrence"],
                r["lastOccurrence"],
            )
            for r in rows
        ]

    def oldest_newest(
        self, filter: RecordFilter | None = None
    ) -> tuple[datetime | None, datetime | None]:
        pipeline: list[dict[str, Any]] = [
            {"$match": self._query(filter)},
            {
                "$group": {
                    "_id": None,
                    "oldest": {"$min": "$deadLetteredAt"},
                    "newest": {"$max": "$deadLetteredAt"},
                }
            },
        ]
        with self._guard("oldest_newest"):
            rows = list(self._records.aggregate(pipeline))
        if not rows:
            return None, None
        return rows[0]["oldest"], rows[0]["newest"]

    def signatures(self) -> set[str]:
        # $group rather than distinct(): distinct's reply is capped at 16 MiB.
        pipeline: list[dict[str, Any]] = [
            {"$match": {"signature": {"$nin": ["", None]}}},
            {"$group": {"_id": "$signature"}},
        ]
        with self._guard("signatures"):
            return {r["_id"] for r in self._records.aggregate(pipeline)}

    def begin_retry(self, id: str, token: str) -> bool:
        with self._guard("begin_retry"):
            res = self._records.update_one(
                {"_id": id, "retryToken": {"$in": [None, token]}},  # None matches "absent"
                {"$set": {"retryToken": token}},
            )
        return res.matched_count > 0

    def cancel_retry(self, id: str, token: str) -> bool:
        with self._guard("cancel_retry"):
            res = self._records.update_one(
                {"_id": id, "retryToken": token}, {"$unset": {"retryToken": ""}}
            )
        return res.matched_count > 0

    def mark_reprocessed(
        self, id: str, *, token: str | None, target_queue: str, at: datetime, tool: str
    ) -> bool:
        at = utc_ms(at)
        entry = history_entry(token=token, target_queue=target_queue, at=at, tool=tool)
        query: dict[str, Any] = {"_id": id}
        if token is not None:
            query["history.token"] = {"$ne": token}  # no history entry carries this token
        with self._guard("mark_reprocessed"):
            res = self._records.update_one(
                query,
                {
                    "$set": {
                        "reprocessed": True,
                        "reprocessedAt": at,
                        "reprocessTarget": target_queue,
                    },
                    "$inc": {"reprocessCount": 1},
                    "$push": {"history": entry},
                },
            )
            if token is not None:
                # Separate and unconditional, so a repeat after a crash still releases it.
                self._records.update_one(
                    {"_id": id, "retryToken": token}, {"$unset": {"retryToken": ""}}
                )
        return res.matched_count > 0

    def in_flight_retries(self) -> list[DeadLetterRecord]:
        with self._guard("in_flight_retries"):
            docs = list(
                self._records.find({"retryToken": {"$type": "string"}}).sort(self._NEWEST_FIRST)
            )
        return [record_from_doc(d) for d in docs]

    def delete(self, filter: RecordFilter) -> int:
        with self._guard("delete"):
            return int(self._records.delete_many(self._query(filter)).deleted_count)

    def insert_metric(self, snapshot: MetricSnapshot) -> None:
        m = normalise_metric(snapshot)
        with self._guard("insert_metric"):
            self._metrics.insert_one(
                {
                    "type": m.type,
                    "queue": m.queue,
                    "count": m.count,
                    "timestamp": m.timestamp,
                    "labels": dict(m.labels),
                }
            )

    def metrics(
        self, type: str, *, since: datetime | None = None, limit: int = 1000
    ) -> list[MetricSnapshot]:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if limit == 0:
            return []
        query: dict[str, Any] = {"type": type}
        if since is not None:
            query["timestamp"] = {"$gte": utc_ms(since)}
        with self._guard("metrics"):
            docs = list(
                self._metrics.find(query)
                .sort([("timestamp", DESCENDING), ("_id", DESCENDING)])
                .limit(limit)
            )
        return [
            MetricSnapshot(
                type=d["type"],
                queue=d["queue"],
                count=float(d["count"]),
                timestamp=d["timestamp"],
                labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
            )
            for d in reversed(docs)
        ]

    def ping(self) -> None:
        with self._guard("ping"):
            self._client.admin.command("ping")

    def close(self) -> None:
        self._client.close()

    def store_id(self) -> str:
        """Created by the first upsert to reach the server; a racing upsert that loses on
        the unique ``_id`` reads the winner's id."""
        if self._store_id is None:
            with self._guard("store id"):
                with suppress(DuplicateKeyError):
                    self._meta.update_one(
                        {"_id": STORE_ID_KEY},
                        {"$setOnInsert": {"value": new_store_id()}},
                        upsert=True,
                    )
                doc = self._meta.find_one({"_id": STORE_ID_KEY})
            value = None if doc is None else doc.get("value")
            if not isinstance(value, str) or not value:
                raise StoreUnavailable(f"{self.describe()}: no usable store id in sidecar_meta")
            self._store_id = value
        return self._store_id

    def describe(self) -> str:
        return f"mongodb {redact_url(self._url)} (database {self.database})"
