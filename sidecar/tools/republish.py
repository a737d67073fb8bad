"""Exactly-once republish of dead letters (``dlq retry`` and ``dlq move``).

Per record: ``begin_retry(id, token)`` claims it in the store; then, on a transactional
channel, the message (to its target queue) and a ledger entry (to the store's durable
ledger queue) are published and committed together; then the record is marked
reprocessed; then the ledger entry is removed. A crash anywhere leaves a state that
``recover`` resolves on the next run: a claimed record WITH a ledger entry was published
(mark it), one WITHOUT was not (release the claim so it is retried normally).

The ledger and the lock belong to one store: ``sidecar.dlq.ledger.<store id>`` and
``sidecar.dlq.lock.<store id>``, where the id is the one the store keeps (``store_id``).
Pods with stores of their own on one vhost never see each other's entries, and retries on
different stores run side by side. Each entry also names its store; ``recover`` resolves
only its own store's entries and puts anything else back untouched. A run that ends
cleanly with an empty ledger deletes the ledger queue. Only one retry/move per store runs
at a time: each holds the store's exclusive lock queue, which RabbitMQ deletes when the
process's connection ends.

Before store ids, one ledger (``sidecar.dlq.ledger``) served every store. Its entries,
left by a crash before the upgrade, name no store: ``recover`` resolves the ones whose
record is in this store claimed (or already marked) with the entry's token, which is
random, so only the store that wrote the entry matches; the rest stay for their own
store. It does so holding the old shared lock (``sidecar.dlq.lock``), so no other run
holds those entries meanwhile, and never deletes that queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
import aiormq.exceptions

from sidecar.attempts import REPROCESSED_FROM, agent_headers, with_failures
from sidecar.commands import EXIT_REFUSED
from sidecar.policy.throttle import TokenBucket
from sidecar.store.base import DeadLetterStore
from sidecar.store.records import DeadLetterRecord
from sidecar.tools.amqp import (
    BROKER_LOST,
    Amqp,
    QueueLocked,
    QueueMissing,
    properties_from_record,
)
from sidecar.tools.common import ToolError

# The single ledger and lock every store shared before store ids; read for recovery only.
LEGACY_LEDGER_QUEUE = "sidecar.dlq.ledger"
LEGACY_LOCK_QUEUE = "sidecar.dlq.lock"
# How long a run waits for the old shared lock while another run reads the old ledger.
LEGACY_LOCK_WAIT_S = 30.0
# A store id as it may appear in a queue name (AMQP allows 255 bytes; ids are 32 hex).
_STORE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")


def ledger_queue(store_id: str) -> str:
    return f"{LEGACY_LEDGER_QUEUE}.{store_id}"


def lock_queue(store_id: str) -> str:
    return f"{LEGACY_LOCK_QUEUE}.{store_id}"


def checked_store_id(store_id: str) -> str:
    """The store's id if it can name a queue; the store keeps it, so it is checked."""
    if not isinstance(store_id, str) or not _STORE_ID.fullmatch(store_id):
        raise ToolError(
            f"the dead-letter store's id {store_id!r} is not usable in a queue name "
            "(expected up to 128 letters, digits, '-' or '_')",
            EXIT_REFUSED,
        )
    return store_id


def new_token(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"


def republish_headers(record: DeadLetterRecord) -> dict[str, Any]:
    """The original headers, attempt state reset (no x-sidecar-*), plus the provenance and
    the failure history, so a record dead-lettered again still shows its earlier failures."""
    headers = agent_headers(record.headers)
    headers[REPROCESSED_FROM] = record.id
    return with_failures(headers, record.failures) if record.failures else headers


def preview(record: DeadLetterRecord, target: str) -> dict[str, Any]:
    """What would be sent (for --dry-run)."""
    return {
        "id": record.id,
        "targetQueue": target,
        "failureReason": record.failureReason,
        "bytes": len(record.rawBody),
        "properties": {k: v for k, v in record.properties.items() if v is not None},
        "headers": republish_headers(record),
    }


@dataclass
class Recovery:
    marked: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    dropped_ledger: int = 0
    left_ledger: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "marked": self.marked,
            "cancelled": self.cancelled,
            "dropped_ledger_entries": self.dropped_ledger,
            "left_ledger_entries": self.left_ledger,
        }


def _is_empty(message: Any) -> bool:
    return isinstance(message.delivery, aiormq.spec.Basic.GetEmpty)


def _entry_of(message: Any) -> dict[str, Any]:
    try:
        entry = json.loads(message.body)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _id_and_token(entry: dict[str, Any]) -> tuple[str, str] | None:
    record_id, token = entry.get("id"), entry.get("token")
    if isinstance(record_id, str) and isinstance(token, str):
        return record_id, token
    return None


def _has_token(record: DeadLetterRecord, token: str) -> bool:
    return any(h.get("token") == token for h in record.history)


def _claim_of(
    in_flight: dict[str, DeadLetterRecord], record_id: str, token: str
) -> DeadLetterRecord | None:
    """The in-flight record claimed with ``token``, taken out of ``in_flight`` (its entry
    resolves it); a claim with another token stays, to be released if nothing does."""
    record = in_flight.get(record_id)
    if record is None or record.retryToken != token:
        return None
    return in_flight.pop(record_id)


class Republisher:
    """Use as ``async with Republisher(...) as rp``: entering takes the store's lock and
    declares its ledger; a clean exit deletes the ledger queue when it is empty."""

    def __init__(self, amqp: Amqp, store: DeadLetterStore, *, tool: str, token: str) -> None:
        self.amqp = amqp
        self.store = store
        self.tool = tool
        self.token = token
        self.store_id = ""
        self.ledger_queue = ""
        self._locked = False
        self._tx: Any = None
        self._get: Any = None
        self._check: Any = None

    async def __aenter__(self) -> Republisher:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        # A refusal (ToolError, a missing queue) leaves the channels usable and nothing
        # held; any other error may have, and the next run's recovery tidies up instead.
        if exc_type is None or issubclass(exc_type, ToolError | QueueMissing):
            await self.delete_ledger_if_empty()

    async def open(self) -> None:
        self.store_id = checked_store_id(self.store.store_id())
        self.ledger_queue = ledger_queue(self.store_id)
        lock = lock_queue(self.store_id)
        try:
            await self.amqp.lock(lock)
        except QueueLocked as exc:
            raise ToolError(
                "another 'dlq retry' or 'dlq move' is running on this store (broker lock "
                f"queue {lock!r} is held); try again when it has finished",
                EXIT_REFUSED,
            ) from exc
        self._locked = True
        self._tx = await self.amqp.channel(confirms=False)
        await self._tx.queue_declare(self.ledger_queue, durable=True)
        await self._tx.tx_select()
        self._get = await self.amqp.channel(confirms=False)
        self._check = await self.amqp.channel(confirms=False)

    async def delete_ledger_if_empty(self) -> bool:
        """Delete this store's ledger queue unless it holds entries; True when deleted.

        Only while holding the store's lock (no other run uses the queue), and on the
        getter channel, so the broker has put back every entry it rejected first."""
        if not self._locked or self._get is None or self._get.is_closed:
            return False
        try:
            await self._get.queue_delete(self.ledger_queue, if_empty=True)
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False  # entries left: the queue stays for the next run's recovery
        except BROKER_LOST:
            return False  # the run's work is done; an empty queue left behind is harmless
        return True

    async def queue_exists(self, queue: str) -> bool:
        try:
            await self._check.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._check = await self.amqp.channel(confirms=False)
            return False
        return True

    # --- the ledger

    async def _take_ledger(self, queue: str) -> list[tuple[Any, dict[str, Any]]]:
        """Every entry of a ledger queue, held unacked on the getter channel."""
        held: list[tuple[Any, dict[str, Any]]] = []
        while True:
            message = await self._get.basic_get(queue, no_ack=False)
            if _is_empty(message):
                return held
            held.append((message, _entry_of(message)))

    async def _put_back(self, messages: list[Any]) -> None:
        for message in messages:
            await self._get.basic_reject(message.delivery.delivery_tag, requeue=True)

    async def _settle(self, queue: str) -> None:
        """Wait for a reply about ``queue`` on the getter channel: the broker then has
        put back every entry rejected before it, so whoever takes the lock next finds
        them all."""
        try:
            await self._get.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._get = await self.amqp.channel(confirms=False)

    async def _drop_entry(self, record_id: str, token: str) -> bool:
        """Remove this record's ledger entry; others go back untouched."""
        others: list[Any] = []
        found = False
        try:
            while True:
                message = await self._get.basic_get(self.ledger_queue, no_ack=False)
                if _is_empty(message):
                    break
                entry = _entry_of(message)
                if entry.get("id") == record_id and entry.get("token") == token:
                    await self._get.basic_ack(message.delivery.delivery_tag)
                    found = True
                    break
                others.append(message)
        finally:
            await self._put_back(others)
        return found

    # --- recovery

    async def recover(self) -> Recovery:
        result = Recovery()
        in_flight = {r.id: r for r in self.store.in_flight_retries()}
        now = datetime.now(UTC)
        held = await self._take_ledger(self.ledger_queue)
        unsettled = {m.delivery.delivery_tag: m for m, _ in held}
        try:
            for message, entry in held:
                key = _id_and_token(entry)
                if key is None or entry.get("store") != self.store_id:
                    continue  # not this store's: put back as it is
                record_id, token = key
                record = _claim_of(in_flight, record_id, token) or self.store.get(record_id)
                if record is not None and not _has_token(record, token):
                    # The message was committed with this entry: it was published.
                    self._mark_recovered(record_id, token, entry, now)
                    result.marked.append(record_id)
                result.dropped_ledger += 1
                await self._get.basic_ack(message.delivery.delivery_tag)
                del unsettled[message.delivery.delivery_tag]
        finally:
            await self._put_back(list(unsettled.values()))
        result.left_ledger += len(unsettled)
        await self._recover_legacy(in_flight, result, now)
        for record in in_flight.values():
            # Claimed but no ledger entry: the publish never committed.
            if record.retryToken and self.store.cancel_retry(record.id, record.retryToken):
                result.cancelled.append(record.id)
        return result

    def _mark_recovered(
        self, record_id: str, token: str, entry: dict[str, Any], now: datetime
    ) -> None:
        self.store.mark_reprocessed(
            record_id,
            token=token,
            target_queue=str(entry.get("target") or ""),
            at=now,
            tool=f"{entry.get('tool') or self.tool} (recovered)",
        )

    async def _legacy_depth(self) -> int | None:
        """Ready entries in the old shared ledger; None when it does not exist."""
        try:
            depth, _ = await self.amqp.queue_info(LEGACY_LEDGER_QUEUE)
        except QueueMissing:
            return None
        return depth

    async def _legacy_lock(self) -> Any:
        """The old shared lock, waited for: another run may be reading the old ledger."""
        deadline = time.monotonic() + LEGACY_LOCK_WAIT_S
        while True:
            try:
                return await self.amqp.lock(LEGACY_LOCK_QUEUE)
            except QueueLocked as exc:
                if time.monotonic() >= deadline:
                    raise ToolError(
                        f"the ledger from before store ids ({LEGACY_LEDGER_QUEUE!r}) is "
                        f"being read by another run (lock {LEGACY_LOCK_QUEUE!r} held for "
                        f"{LEGACY_LOCK_WAIT_S:g}s); try again when it has finished",
                        EXIT_REFUSED,
                    ) from exc
                await asyncio.sleep(0.2)

    async def _recover_legacy(
        self, in_flight: dict[str, DeadLetterRecord], result: Recovery, now: datetime
    ) -> None:
        """Resolve this store's entries in the ledger every store shared before store ids.

        An entry is this store's when its record is here claimed with, or already marked
        with, the entry's token: tokens are random, so no other store's record matches.
        Read only when that ledger holds entries or this store has claims a crash there
        may have left (an older run may hold the entries unacked)."""
        depth = await self._legacy_depth()
        if depth is None or (depth == 0 and not in_flight):
            return
        lock = await self._legacy_lock()
        held = await self._take_ledger(LEGACY_LEDGER_QUEUE)
        unsettled = {m.delivery.delivery_tag: m for m, _ in held}
        try:
            for message, entry in held:
                key = _id_and_token(entry)
                if key is None:
                    continue
                record_id, token = key
                record = _claim_of(in_flight, record_id, token) or self.store.get(record_id)
                if record is None:
                    continue  # another store's record
                if _has_token(record, token):
                    pass  # marked before the crash; only the entry was left
                elif record.retryToken == token:
                    self._mark_recovered(record_id, token, entry, now)
                    result.marked.append(record_id)
                else:
                    continue  # the same id in another store, claimed there
                result.dropped_ledger += 1
                await self._get.basic_ack(message.delivery.delivery_tag)
                del unsettled[message.delivery.delivery_tag]
        finally:
            await self._put_back(list(unsettled.values()))
            await self._settle(LEGACY_LEDGER_QUEUE)
            # Released now, not when the connection ends: other runs may be waiting.
            with contextlib.suppress(*BROKER_LOST):
                await lock.queue_delete(LEGACY_LOCK_QUEUE)
        result.left_ledger += len(unsettled)

    # --- one record

    async def republish(self, record: DeadLetterRecord, target: str) -> str | None:
        """None when republished and marked; otherwise why not (skipped or failed)."""
        if not await self.queue_exists(target):
            raise QueueMissing(target)
        if not self.store.begin_retry(record.id, self.token):
            return "claimed by another retry in flight"
        ledger = json.dumps(
            {
                "id": record.id,
                "token": self.token,
                "store": self.store_id,
                "target": target,
                "tool": self.tool,
            }
        ).encode()
        try:
            await self._tx.basic_publish(
                record.rawBody,
                exchange="",
                routing_key=target,
                properties=properties_from_record(record.properties, republish_headers(record)),
                mandatory=True,
            )
            await self._tx.basic_publish(
                ledger,
                exchange="",
                routing_key=self.ledger_queue,
                properties=aiormq.spec.Basic.Properties(
                    delivery_mode=2,
                    content_type="application/json",
                    message_id=f"{self.token}:{record.id}",
                ),
                mandatory=True,
            )
            await self._tx.tx_commit()
        except BaseException:
            # Not committed (or unknown): the next run's recovery decides from the ledger.
            # When the channel is still usable, roll back and release the claim now.
            with contextlib.suppress(Exception):  # else the next run's recovery handles it
                await asyncio.shield(self._tx.tx_rollback())
                self.store.cancel_retry(record.id, self.token)
            raise
        self.store.mark_reprocessed(
            record.id,
            token=self.token,
            target_queue=target,
            at=datetime.now(UTC),
            tool=self.tool,
        )
        await self._drop_entry(record.id, self.token)
        return None


class RateLimiter:
    def __init__(self, rate: float) -> None:
        burst = max(1.0, min(rate, 10.0))
        self.bucket = TokenBucket(rate, burst, time.monotonic())

    async def wait(self) -> None:
        while True:
            delay = self.bucket.try_acquire(time.monotonic())
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, 1.0))
