"""Writes dead-letter records durably before their messages are acked.

Records are written in batches from one worker thread (the store API is synchronous): what
was submitted while the thread was busy goes to the store as one ``put_many``, one
transaction and one disk flush (group commit), so a burst of failures costs one thread hop
and one fsync, not one per message. Each message is acked only once its batch is durable.
When the configured store is down, the spooling store keeps records in a local durable file
and drains them later; only when the spool cannot write either (a full disk) is a batch left
unwritten, its messages left unacked, and the daemon reported unhealthy so it stops taking
work.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import trio

from sidecar.store.base import PutResult, StoreUnavailable, put_each
from sidecar.store.records import DeadLetterRecord
from sidecar.store.spool import SpoolingStore

T = TypeVar("T")

log = logging.getLogger("sidecar.dlq")


def bare_record(record: DeadLetterRecord, cause: BaseException) -> DeadLetterRecord:
    """The record reduced to what any store accepts: raw body, reason, bounded numbers,
    aware times, no free-form documents. Used when a store refuses the full record, so the
    message is still kept (and then acked) rather than retried forever or crashing."""
    now = datetime.now(UTC)
    return msgspec.structs.replace(
        record,
        id=str(record.id)[:512] or "unknown",
        payload=None,
        rawBody=bytes(record.rawBody),
        errorMessage=f"{str(record.errorMessage)[:500]} (record refused by the store: "
        f"{type(cause).__name__})",
        attemptCount=max(0, min(int(record.attemptCount), 1_000_000)),
        firstFailureAt=now,
        lastFailureAt=now,
        deadLetteredAt=now,
        headers={},
        properties={},
        history=[],
        reprocessedAt=None,
    )


# Group commit: what was submitted while the store thread was busy goes into one
# transaction, bounded so that one batch never holds the thread (or memory) for long.
MAX_BATCH_RECORDS = 256
MAX_BATCH_BYTES = 8 * 1024 * 1024  # message bodies; a larger single record goes alone


@dataclass(slots=True)
class _Pending:
    record: DeadLetterRecord
    on_durable: Callable[[], None]


class DeadLetterWriter:
    def __init__(
        self,
        store: SpoolingStore,
        *,
        on_written: Callable[[DeadLetterRecord, bool], None] = lambda record, new: None,
        retry_interval: float = 1.0,
        drain_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.on_written = on_written
        self.retry_interval = retry_interval
        self.drain_interval = drain_interval
        self.limiter = trio.CapacityLimiter(1)
        self.healthy = True
        self.last_error = ""
        self._pending: deque[_Pending] = deque()
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def submit(self, record: DeadLetterRecord, *, on_durable: Callable[[], None]) -> None:
        self._pending.append(_Pending(record, on_durable))
        self._idle = trio.Event()
        self._wakeup.set()

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run any store call on the store's thread (reads for status, alerts, tools)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain_spool_forever)
            task_status.started()
            while True:
                if not self._pending:
                    self._idle.set()
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                batch = self._take_batch()
                written = await self._write(batch)
                if written is None:
                    # Nothing of the batch is durable: it goes back to the front, in order,
                    # and we wait a little.
                    self._pending.extendleft(reversed(batch))
                    await trio.sleep(self.retry_interval)
                    continue
                # Every record of the batch is durable now; only now are their messages acked.
                for item, new in written:
                    item.on_durable()
                    self.on_written(item.record, new)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        pending = self._pending
        while pending and len(batch) < MAX_BATCH_RECORDS:
            size += len(pending[0].record.rawBody)
            if batch and size > MAX_BATCH_BYTES:
                break
            batch.append(pending.popleft())
        return batch

    async def _write(self, batch: list[_Pending]) -> list[tuple[_Pending, bool]] | None:
        """Write the batch on the store's thread: what was written (a refused record as
        its bare fallback) and whether each was new, or None when nothing could be."""

        def write_batch() -> list[tuple[_Pending, bool]] | None:
            try:
                results = self._put_many([item.record for item in batch])
                refused = [
                    (item, result)
                    for item, result in zip(batch, results, strict=True)
                    if isinstance(result, Exception)
                ]
                fallbacks = self._bare_fallbacks(refused)
            except StoreUnavailable as exc:
                self.last_error = str(exc)
                return None
            written: list[tuple[_Pending, bool]] = []
            for item, result in zip(batch, results, strict=True):
                if not isinstance(result, Exception):
                    written.append((item, result))
                elif (fallback := fallbacks.get(id(item))) is not None:
                    written.append(fallback)
            return written

        written = await trio.to_thread.run_sync(write_batch, limiter=self.limiter)
        healthy = written is not None
        if healthy != self.healthy:
            if healthy:
                log.info("dead-letter store writable again")
            else:
                log.error("dead letters cannot be written anywhere: %s", self.last_error)
        self.healthy = healthy
        return written

    def _put_many(self, records: list[DeadLetterRecord]) -> list[PutResult]:
        """(store thread) The store's ``put_many``; should it fail for another reason than
        being unavailable (a fault that ought to have stayed with one record), each record
        is put alone instead, so that one record never stops the writer."""
        try:
            return self.store.put_many(records)
        except StoreUnavailable:
            raise
        except Exception:
            log.exception("writing %d dead letters at once failed; writing each", len(records))
            return put_each(self.store.put, records)

    def _bare_fallbacks(
        self, refused: list[tuple[_Pending, Exception]]
    ) -> dict[int, tuple[_Pending, bool]]:
        """(store thread) Records the store refused, stored as their bare form instead, so
        the message is still kept (and then acked) rather than retried forever. Keyed by
        the refused item's identity."""
        if not refused:
            return {}
        bare: list[_Pending] = []
        for item, cause in refused:
            log.error(
                "dead letter %r refused (%s: %s); storing its raw body alone",
                item.record.id,
                type(cause).__name__,
                str(cause)[:200],
            )
            bare.append(_Pending(bare_record(item.record, cause), item.on_durable))
        out: dict[int, tuple[_Pending, bool]] = {}
        results = self._put_many([item.record for item in bare])
        for (item, _), fallback, result in zip(refused, bare, results, strict=True):
            if isinstance(result, Exception):
                # No store takes even the bare record: its message stays unacked, held by
                # the broker, which delivers it again after the next reconnect.
                log.error(
                    "dead letter %r refused even bare (%s: %s); its message is left unacked",
                    item.record.id,
                    type(result).__name__,
                    str(result)[:200],
                )
                continue
            out[id(item)] = (fallback, result)
        return out

    async def _drain_spool_forever(self) -> None:
        while True:
            await trio.sleep(self.drain_interval)
            try:
                moved = await self.call(self.store.drain)
            except StoreUnavailable:
                continue
            if moved:
                log.info("moved %s spooled dead letters to the store", moved)

    async def flush(self) -> None:
        """Wait until every submitted record has been written (used by drain)."""
        await self._idle.wait()
