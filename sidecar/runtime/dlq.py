"""Writes dead-letter records durably before their messages are acked.

Records are written in batches from one worker thread (the store API is synchronous), so a
burst of failures costs one thread hop, not one per message. When the configured store is
down, the spooling store keeps records in a local durable file and drains them later; only
when the spool cannot write either (a full disk) is a record left unwritten, its message
left unacked, and the daemon reported unhealthy so it stops taking work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import trio

from sidecar.store.base import StoreUnavailable
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
        self._pending: list[_Pending] = []
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
                batch, self._pending = self._pending, []
                written = await self._write(batch)
                for item, new in written:
                    item.on_durable()
                    self.on_written(item.record, new)
                if len(written) < len(batch):
                    # Keep order: what failed goes back to the front, and we wait a little.
                    self._pending = batch[len(written) :] + self._pending
                    await trio.sleep(self.retry_interval)

    async def _write(self, batch: list[_Pending]) -> list[tuple[_Pending, bool]]:
        def write_all() -> list[tuple[_Pending, bool]]:
            done = []
            for item in batch:
                try:
                    done.append((item, self.store.put(item.record)))
                except StoreUnavailable as exc:
                    self.last_error = str(exc)
                    break
                except Exception as exc:  # a record the store refuses must not stop the writer
                    fallback = bare_record(item.record, exc)
                    log.error(
                        "dead letter %r refused (%s: %s); storing its raw body alone",
                        item.record.id,
                        type(exc).__name__,
                        str(exc)[:200],
                    )
                    try:
                        done.append((_Pending(fallback, item.on_durable), self.store.put(fallback)))
                    except StoreUnavailable as unavailable:
                        self.last_error = str(unavailable)
                        break
            return done

        written = await trio.to_thread.run_sync(write_all, limiter=self.limiter)
        healthy = len(written) == len(batch)
        if healthy != self.healthy:
            if healthy:
                log.info("dead-letter store writable again")
            else:
                log.error("dead letters cannot be written anywhere: %s", self.last_error)
        self.healthy = healthy
        return written

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
