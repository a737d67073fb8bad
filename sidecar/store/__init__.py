"""Dead-letter store: one contract (``DeadLetterStore``), SQLite and MongoDB backends, and a
local durable spool for when the configured store is down.

Synchronous by design: the daemon calls it via ``trio.to_thread.run_sync`` with a limiter
of one per store.
"""

from sidecar.store.base import DeadLetterStore, StoreUnavailable, redact_url
from sidecar.store.opening import open_store
from sidecar.store.records import (
    REQUIRED_FIELDS,
    DeadLetterRecord,
    MetricSnapshot,
    PatternRow,
    RecordFilter,
    missing_fields,
    payload_from_body,
)
from sidecar.store.spool import SpoolingStore
from sidecar.store.sqlite import SqliteStore

__all__ = [
    "REQUIRED_FIELDS",
    "DeadLetterRecord",
    "DeadLetterStore",
    "MetricSnapshot",
    "PatternRow",
    "RecordFilter",
    "SpoolingStore",
    "SqliteStore",
    "StoreUnavailable",
    "missing_fields",
    "open_store",
    "payload_from_body",
    "redact_url",
]
