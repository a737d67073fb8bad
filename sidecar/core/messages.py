"""The message types the daemon passes around, free of any AMQP library's types."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sidecar import limits


@dataclass(slots=True)
class MessageProps:
    """The AMQP basic properties the daemon cares about, free of aiormq types."""

    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    delivery_mode: int | None = None
    timestamp: datetime | None = None
    type: str | None = None
    app_id: str | None = None
    expiration: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("message_id", self.message_id),
                ("content_type", self.content_type),
                ("content_encoding", self.content_encoding),
                ("correlation_id", self.correlation_id),
                ("reply_to", self.reply_to),
                ("priority", self.priority),
                ("delivery_mode", self.delivery_mode),
                ("type", self.type),
                ("app_id", self.app_id),
            )
            if v is not None
        }

    def replace_headers(self, headers: dict[str, Any]) -> MessageProps:
        """A copy with other headers; the original stays as delivered."""
        copy = MessageProps(**{name: getattr(self, name) for name in MessageProps.__slots__})
        copy.headers = headers
        return copy


@dataclass(slots=True)
class Inbound:
    """One delivery from the broker, valid for acks only within its ``generation``."""

    generation: int
    tag: int
    queue: str
    body: bytes
    props: MessageProps
    routing_key: str
    exchange: str
    redelivered: bool
    # What the tracer (when enabled) keeps of this message's spans until it is settled; it
    # lives and dies with the message, so nothing needs cleaning when a message is dropped.
    trace: Any = None


class Inbox:
    """Deliveries waiting for an agent, in arrival order. The broker adapter fills it; the
    ledger takes from it. Messages of an older connection generation are skipped on the way
    out: their tags can no longer be acked, and the broker redelivers them anyway."""

    __slots__ = ("_items", "generation")

    def __init__(self) -> None:
        self._items: deque[Inbound] = deque()
        self.generation = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Inbound]:
        return iter(self._items)

    def append(self, message: Inbound) -> None:
        self._items.append(message)

    def peek(self) -> Inbound | None:
        """The next current-generation message, dropping stale ones in front of it."""
        items = self._items
        while items:
            if items[0].generation == self.generation:
                return items[0]
            items.popleft()
        return None

    def pop(self) -> Inbound:
        return self._items.popleft()

    def clear(self) -> list[Inbound]:
        """Empty the inbox, returning what it held."""
        held = list(self._items)
        self._items.clear()
        return held

    def start_generation(self, generation: int) -> None:
        """Deliveries of ``generation`` are the ones that can be acked from now on."""
        self.generation = generation

    def end_generation(self, generation: int) -> None:
        """That connection is gone and the broker requeued what it delivered: forget it."""
        self._items = deque(m for m in self._items if m.generation != generation)


def tier_queue_name(prefix: str, queue: str, ttl: float) -> str:
    """The delay-tier queue for ``queue`` whose messages wait ``ttl`` seconds."""
    return f"{prefix}.{queue}.{round(ttl * 1000)}ms"


def tier_queue_arguments(queue: str, ttl: float) -> dict[str, Any]:
    """How a delay tier is declared: a quorum queue (at-least-once dead-lettering, so a
    message leaving the tier is never dropped) whose messages go back to ``queue`` after
    ``ttl`` seconds; a full tier refuses the publish rather than dropping the oldest."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": round(ttl * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def headers_json_safe(headers: Mapping[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """AMQP header values as JSON-friendly values (datetimes and bytes become text). Values
    nested deeper than ``limits.MAX_NESTING`` raise ``limits.TooDeep``, or with ``lenient``
    are replaced by a placeholder (for dead letters: keep what can be read)."""
    return {str(k): limits.json_safe(v, lenient=lenient, _depth=1) for k, v in headers.items()}
