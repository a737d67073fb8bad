"""The asyncio agent client against a real sidecar: an asyncio agent in its own thread and
event loop, as an asyncio program would run it."""

from __future__ import annotations

import asyncio

import pytest
import trio

from sidecar.client_asyncio import AsyncioAgent
from tests.conftest import delete_queues, make_config, publish_many, queue_count, running_sidecar

pytestmark = pytest.mark.integration


def run_asyncio_agent(socket: str, queue: str, n: int) -> tuple[list[bytes], bool]:
    async def main() -> tuple[list[bytes], bool]:
        agent = await AsyncioAgent.connect(socket, agent="aio", version="1", queues=[queue])
        seen: list[bytes] = []
        while len(seen) < n:
            batch = await agent.pull(10, wait=1.0)
            seen += [m.body for m in batch]
            await agent.ack([m.id for m in batch])
        published = await agent.publish(b"done", queue=queue + ".out")
        await agent.close()
        return seen, published.ok

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def test_asyncio_agent_consumes_acks_and_publishes(tmp_path, unique_queue):
    queue = unique_queue()
    out = queue + ".out"
    n = 50
    await publish_many(queue, [f"{i}".encode() for i in range(n)])
    await publish_many(out, [])
    config = make_config(tmp_path, [queue])
    try:
        with trio.fail_after(60):
            async with running_sidecar(config) as sidecar:
                seen, published = await trio.to_thread.run_sync(
                    run_asyncio_agent, config.agent.socket, queue, n
                )
                while sidecar.broker._gen.outstanding:
                    await trio.sleep(0.05)
        assert sorted(seen) == sorted(f"{i}".encode() for i in range(n))
        assert published
        assert await queue_count(queue) == 0
        assert await queue_count(out) == 1
    finally:
        await trio.to_thread.run_sync(delete_queues, [out])
