"""The broker as the rest of the daemon sees it: a narrow port the adapter implements.

Nothing above the adapters touches the connection, its channels or its delivery tags'
bookkeeping; a fake implementing this protocol serves unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sidecar.core.messages import Inbound, Inbox, MessageProps
from sidecar.protocol import Delivery
from sidecar.store.records import DeadLetterRecord

PublishCallback = Callable[[str | None], None]
"""Called with None when the broker confirmed a publish, else the error text."""

# The start of a publish error that would repeat on every try: retrying cannot help.
UNENCODABLE = "message cannot be encoded in AMQP: "


class BrokerUnavailable(Exception):
    """No connection to the broker right now."""


class BrokerPort(Protocol):
    # Called (in trio) after deliveries reached the inbox and on ``wake``, so a waiting
    # pull is answered in that step; the engine sets it.
    on_arrivals: Callable[[], None] | None

    @property
    def inbox(self) -> Inbox:
        """Deliveries waiting for an agent (filled by the adapter)."""
        ...

    @property
    def generation(self) -> int:
        """The connection generation whose delivery tags can be settled."""
        ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def paused(self) -> bool: ...

    async def wait_inbox(self) -> None:
        """Return when the inbox may have changed since the last call."""
        ...

    def wake(self) -> None:
        """Wake ``wait_inbox`` callers and call ``on_arrivals``: what they may take has
        changed."""
        ...

    def settle(
        self, generation: int, tag: int, *, requeue: bool = False, linger: bool = False
    ) -> bool:
        """Ack (or requeue) a delivery; False, sending nothing, for a dead generation.
        ``linger``: the write may wait a few milliseconds for others (no one waits on it)."""
        ...

    def flush_settlements(self) -> None:
        """The end of an event: settlements asked for during it may be written now."""
        ...

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
        """Publish with confirms; ``on_done`` gets the outcome. ``linger``: it may wait a
        few milliseconds to leave in one write with others (a retry copy, bound for a delay
        tier anyway)."""
        ...

    def tier_for(self, queue: str, ttl: float) -> str:
        """The delay-tier queue holding ``queue``'s messages for ``ttl`` seconds."""
        ...

    async def pause(self) -> None:
        """Stop deliveries and hand buffered ones back to their queue."""
        ...

    async def resume(self) -> None: ...


class DeadLetterSink(Protocol):
    """Where dead letters go: durably, before the original is acked."""

    @property
    def healthy(self) -> bool:
        """False while records cannot be written (work is not accepted then)."""
        ...

    def submit(self, record: DeadLetterRecord, *, on_durable: Callable[[], None]) -> None:
        """Write ``record``; call ``on_durable`` once it is in the store or the spool."""
        ...

    async def flush(self) -> None:
        """Return once everything submitted is durable."""
        ...


class QueueWatch(Protocol):
    """What the backpressure monitor needs from the broker: queue depths and prefetch."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def queues(self) -> Sequence[str]:
        """The queues consumed."""
        ...

    async def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """(messages, consumers) of ``queue``, None when it does not exist. Raises
        ``BrokerUnavailable`` while disconnected."""
        ...

    async def set_prefetch(self, prefetch: int) -> None: ...

    def wake(self) -> None:
        """Wake whoever waits for deliveries: what they may take has changed."""
        ...


class Tracer(Protocol):
    """Spans for what happens to a message, parented on the trace context it carried.

    The engine calls these only when tracing is enabled (its tracer is None otherwise, so
    the hot path pays nothing). Each call is told what the engine is about to do or has
    just done; a span the tracer opens for a message is kept on ``Inbound.trace``."""

    def handed_out(self, message: Inbound, delivery: Delivery) -> None:
        """``delivery`` goes to an agent: open receive and hand-out spans, and put the
        hand-out span's context in the delivery's headers."""
        ...

    def settled(self, message: Inbound, *, requeue: bool) -> None:
        """The message is acked (or requeued): close its spans."""
        ...

    def retrying(self, message: Inbound, props: MessageProps, routing_key: str) -> MessageProps:
        """A retry copy goes to ``routing_key``: open a retry span and return the copy's
        properties carrying its context."""
        ...

    def retried(self, message: Inbound, error: str | None) -> None:
        """The retry copy was confirmed (``error`` None) or refused."""
        ...

    def dead_lettering(self, message: Inbound, record: DeadLetterRecord) -> DeadLetterRecord:
        """``record`` is about to be written: open a dead-letter span; the record returned
        carries the trace id when the message had none of its own."""
        ...

    def dead_lettered(self, message: Inbound) -> None:
        """The record is durable."""
        ...

    def close(self) -> None:
        """Export what is pending; called once at shutdown (may block briefly)."""
        ...
