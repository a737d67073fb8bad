"""A broker port that records what it is asked to do, for tests without RabbitMQ."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from sidecar.core.messages import Inbound, Inbox, MessageProps, tier_queue_name
from sidecar.core.port import PublishCallback
from sidecar.store.records import DeadLetterRecord


@dataclass
class Published:
    body: bytes
    exchange: str
    routing_key: str
    props: MessageProps
    on_done: PublishCallback


class FakeBroker:
    """Implements ``sidecar.core.port.BrokerPort``. Publishes wait in ``published`` until
    the test confirms them (``on_done``); settles are recorded as (tag, requeue)."""

    def __init__(self, generation: int = 1) -> None:
        self.inbox = Inbox()
        self.inbox.start_generation(generation)
        self.generation = generation
        self.is_connected = True
        self.paused = False
        self.settled: list[tuple[int, bool]] = []
        self.published: list[Published] = []
        self._changed = trio.Event()
        self.on_arrivals: Callable[[], None] | None = None

    def deliver(self, *messages: Inbound) -> None:
        for m in messages:
            self.inbox.append(m)
        self.wake()

    async def wait_inbox(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    def wake(self) -> None:
        self._changed.set()
        if self.on_arrivals is not None:
            self.on_arrivals()

    def settle(
        self, generation: int, tag: int, *, requeue: bool = False, linger: bool = False
    ) -> bool:
        if generation != self.generation or not self.is_connected:
            return False
        self.settled.append((tag, requeue))
        return True

    def flush_settlements(self) -> None:
        pass  # settlements are recorded as they come

    def publish_nowait(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        props: MessageProps,
        on_done: PublishCallback,
        linger: bool = False,
    ) -> None:
        self.published.append(Published(body, exchange, routing_key, props, on_done))

    def tier_for(self, queue: str, ttl: float) -> str:
        return tier_queue_name("test.retry", queue, ttl)

    async def pause(self) -> None:
        self.paused = True
        for message in self.inbox.clear():
            self.settle(message.generation, message.tag, requeue=True)

    async def resume(self) -> None:
        self.paused = False


@dataclass
class FakeDeadLetters:
    """Implements ``sidecar.core.port.DeadLetterSink``: durable at once, kept in a list."""

    healthy: bool = True
    records: list[DeadLetterRecord] = field(default_factory=list)

    def submit(self, record: DeadLetterRecord, *, on_durable: Callable[[], None]) -> None:
        self.records.append(record)
        on_durable()

    async def flush(self) -> None:
        pass
