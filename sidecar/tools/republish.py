"""Exactly-once republish of dead letters (``dlq retry`` and ``dlq move``).

Per record: ``begin_retry(id, token)`` claims it in the store; then, on a transactional
channel, the message (to its target queue) and a ledger entry (to the durable
``sidecar.dlq.ledger`` queue) are published and committed together; then the record is
marked reprocessed; then the ledger entry is removed. A crash anywhere leaves a state that
``recover`` resolves on the next run: a claimed record WITH a ledger entry was published
(mark it), one WITHOUT was not (release the claim so it is retried normally).

Only one retry/move runs at a time: each holds an exclusive lock queue on the broker, which
RabbitMQ releases when the process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from sidecar.tools.amqp import Amqp, QueueLocked, QueueMissing, properties_from_record
from sidecar.tools.common import ToolError

LEDGER_QUEUE = "sidecar.dlq.ledger"
LOCK_QUEUE = "sidecar.dlq.lock"


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "marked": self.marked,
            "cancelled": self.cancelled,
            "dropped_ledger_entries": self.dropped_ledger,
        }


def _is_empty(message: Any) -> bool:
    return isinstance(message.delivery, aiormq.spec.Basic.GetEmpty)


class Republisher:
    def __init__(self, amqp: Amqp, store: DeadLetterStore, *, tool: str, token: str) -> None:
        self.amqp = amqp
        self.store = store
        self.tool = tool
        self.token = token
        self._tx: Any = None
        self._get: Any = None
        self._check: Any = None

    async def open(self) -> None:
        try:
            await self.amqp.lock(LOCK_QUEUE)
        except QueueLocked as exc:
            raise ToolError(
                "another 'dlq retry' or 'dlq move' is running (broker lock queue "
                f"{LOCK_QUEUE!r} is held); try again when it has finished",
                EXIT_REFUSED,
            ) from exc
        self._tx = await self.amqp.channel(confirms=False)
        await self._tx.queue_declare(LEDGER_QUEUE, durable=True)
        await self._tx.tx_select()
        self._get = await self.amqp.channel(confirms=False)
        self._check = await self.amqp.channel(confirms=False)

    async def queue_exists(self, queue: str) -> bool:
        try:
            await self._check.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._check = await self.amqp.channel(confirms=False)
            return False
        return True

    # --- the ledger

    async def _take_ledger(self) -> list[tuple[Any, dict[str, Any]]]:
        """Every ledger entry, held unacked on the getter channel."""
        held: list[tuple[Any, dict[str, Any]]] = []
        while True:
            message = await self._get.basic_get(LEDGER_QUEUE, no_ack=False)
            if _is_empty(message):
                return held
            try:
                entry = json.loads(message.body)
            except ValueError:
                entry = {}
            held.append((message, entry if isinstance(entry, dict) else {}))

    async def _drop_entry(self, record_id: str, token: str) -> bool:
        """Remove this record's ledger entry; others go back untouched."""
        others: list[Any] = []
        found = False
        try:
            while True:
                message = await self._get.basic_get(LEDGER_QUEUE, no_ack=False)
                if _is_empty(message):
                    break
                try:
                    entry = json.loads(message.body)
                except ValueError:
                    entry = {}
                if entry.get("id") == record_id and entry.get("token") == token:
                    await self._get.basic_ack(message.delivery.delivery_tag)
                    found = True
                    break
                others.append(message)
        finally:
            for message in others:
                await self._get.basic_reject(message.delivery.delivery_tag, requeue=True)
        return found

    # --- recovery

    async def recover(self) -> Recovery:
        result = Recovery()
        in_flight = {r.id: r for r in self.store.in_flight_retries()}
        now = datetime.now(UTC)
        for message, entry in await self._take_ledger():
            record_id, token = entry.get("id"), entry.get("token")
            if isinstance(record_id, str) and isinstance(token, str):
                record = in_flight.pop(record_id, None) or self.store.get(record_id)
                done = record is None or any(h.get("token") == token for h in record.history)
                if not done:
                    # The message was committed with this entry: it was published.
                    self.store.mark_reprocessed(
                        record_id,
                        token=token,
                        target_queue=str(entry.get("target") or ""),
                        at=now,
                        tool=f"{entry.get('tool') or self.tool} (recovered)",
                    )
                    result.marked.append(record_id)
                    in_flight.pop(record_id, None)
            result.dropped_ledger += 1
            await self._get.basic_ack(message.delivery.delivery_tag)
        for record in in_flight.values():
            # Claimed but no ledger entry: the publish never committed.
            if record.retryToken and self.store.cancel_retry(record.id, record.retryToken):
                result.cancelled.append(record.id)
        return result

    # --- one record

    async def republish(self, record: DeadLetterRecord, target: str) -> str | None:
        """None when republished and marked; otherwise why not (skipped or failed)."""
        if not await self.queue_exists(target):
            raise QueueMissing(target)
        if not self.store.begin_retry(record.id, self.token):
            return "claimed by another retry in flight"
        ledger = json.dumps(
            {"id": record.id, "token": self.token, "target": target, "tool": self.tool}
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
                routing_key=LEDGER_QUEUE,
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
