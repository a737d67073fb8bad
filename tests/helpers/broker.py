"""Direct broker access for tests: publishing fixtures, counting, cleanup.

It runs aiormq on an explicit asyncio loop in a worker thread: the sidecar's trio-asyncio
must not be mixed with the test's own broker traffic.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import trio

BROKER_URL = os.environ.get("SIDECAR_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEST_TIERS = [0.2, 0.5, 1.0]


def run_amqp(fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``fn(channel)`` with a fresh aiormq connection on a private asyncio loop."""

    async def main() -> Any:
        connection = await aiormq.connect(BROKER_URL)
        try:
            channel = await connection.channel()
            return await fn(channel)
        finally:
            await connection.close()

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def amqp(fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """``run_amqp`` from a trio test, in a worker thread."""
    return await trio.to_thread.run_sync(run_amqp, fn)


async def publish_many(queue: str, bodies: list[bytes], **props: Any) -> None:
    async def go(channel: Any) -> None:
        await channel.queue_declare(queue, durable=True)
        for i, body in enumerate(bodies):
            await channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(
                    message_id=props.get("message_id_prefix", "m") + str(i), delivery_mode=2
                ),
            )

    await amqp(go)


async def queue_count(queue: str) -> int | None:
    async def go(channel: Any) -> int | None:
        try:
            return (await channel.queue_declare(queue, passive=True)).message_count
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None

    return await amqp(go)


async def drain_bodies(queue: str) -> list[bytes]:
    """Every body in ``queue``, oldest first (taken with no_ack: the queue ends empty)."""

    async def go(channel: Any) -> list[bytes]:
        bodies = []
        while True:
            got = await channel.basic_get(queue, no_ack=True)
            if got.delivery is None or got.body is None or not got.delivery_tag:
                return bodies
            bodies.append(bytes(got.body))

    return await amqp(go)


def delete_queues(names: list[str]) -> None:
    async def go(channel: Any) -> None:
        for name in names:
            await channel.queue_delete(name)

    run_amqp(go)
