"""A small aiormq client for the short-lived tools, on a plain asyncio loop.

The tools never import trio_asyncio: each command runs ``asyncio.run`` around its broker work
and keeps store calls synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiormq
import aiormq.exceptions
from aiormq.abc import DeliveredMessage

from sidecar.core.port import BrokerUnavailable
from sidecar.redact import redact_url

CONNECT_TIMEOUT = 10.0
# Properties copied verbatim on a republish (everything but headers).
PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)


# What the broker going away in the middle of a tool's work raises.
BROKER_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


class QueueMissing(Exception):
    def __init__(self, queue: str) -> None:
        super().__init__(f"queue {queue!r} does not exist")
        self.queue = queue


class QueueLocked(Exception):
    """Another tool process holds the exclusive lock queue."""


class Amqp:
    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: Any = None

    async def __aenter__(self) -> Amqp:
        # aiormq logs connection failures itself; the tools report them once, clearly.
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        try:
            self.connection = await asyncio.wait_for(aiormq.connect(self.url), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to {redact_url(self.url)}: {exc or type(exc).__name__}"
            ) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            # Closing a broken connection must not mask the real error.
            with contextlib.suppress(Exception):
                await self.connection.close()

    async def channel(self, *, confirms: bool = True) -> Any:
        return await self.connection.channel(publisher_confirms=confirms)

    async def queue_info(self, queue: str) -> tuple[int, int]:
        """(depth, consumers) by passive declare; QueueMissing when it does not exist."""
        channel = await self.channel(confirms=False)
        try:
            ok = await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise QueueMissing(queue) from exc
        await channel.close()
        return ok.message_count, ok.consumer_count

    async def lock(self, name: str) -> Any:
        """A broker-wide mutex: an exclusive queue, released when this connection ends."""
        channel = await self.channel(confirms=False)
        try:
            await channel.queue_declare(name, exclusive=True, auto_delete=True)
        except aiormq.exceptions.ChannelLockedResource as exc:
            raise QueueLocked(name) from exc
        return channel


def copy_properties(
    message: DeliveredMessage | None = None, **overrides: Any
) -> aiormq.spec.Basic.Properties:
    """The properties of a delivered message (all of them, headers included), with overrides."""
    values: dict[str, Any] = {}
    if message is not None:
        props = message.header.properties
        for name in (*PROPERTY_NAMES, "headers"):
            value = getattr(props, name, None)
            if value is not None:
                values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return aiormq.spec.Basic.Properties(**values)


def properties_from_record(props: dict[str, Any], headers: dict[str, Any]) -> Any:
    """Basic.Properties from a DeadLetterRecord's stored properties and headers."""
    values: dict[str, Any] = {}
    for name, value in props.items():
        key = "message_type" if name == "type" else name
        if key in PROPERTY_NAMES and value is not None:
            values[key] = value
    values.setdefault("delivery_mode", 2)
    values["headers"] = headers
    return aiormq.spec.Basic.Properties(**values)
