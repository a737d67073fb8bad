"""The asyncio agent client against a real sidecar: an asyncio agent in its own thread and
event loop, as an asyncio program would run it."""

from __future__ import annotations

import asyncio

import pytest
import trio

from sidecar.client_asyncio import AsyncioAgent
from tests.helpers import (
    delete_queues,
    make_config,
    publish_many,
    queue_count,
    running_sidecar,
    until,
)

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
                await until(lambda: not sidecar.broker.unsettled)
        assert sorted(seen) == sorted(f"{i}".encode() for i in range(n))
        assert published
        assert await queue_count(queue) == 0
        assert await queue_count(out) == 1
    finally:
        await trio.to_thread.run_sync(delete_queues, [out])


def run_asyncio_handler_agent(socket: str, queue: str) -> dict[str, object]:
    from sidecar.client import Failure, UnknownReason

    async def main() -> dict[str, object]:
        seen: list[tuple[bytes, int]] = []
        async with await AsyncioAgent.connect(socket, agent="aio", queues=[queue]) as agent:
            assert agent.welcome is not None
            reasons = list(agent.welcome.reasons)

            async def handle(m: object) -> None:
                body, attempt = m.body, m.attempt  # type: ignore[attr-defined]
                seen.append((body, attempt))
                if body == b"flaky" and attempt == 1:
                    raise Failure("HTTP_503", "503 Service Unavailable")
                if body == b"bad":
                    raise ValueError("not a job")  # mapped to VALIDATION_FAILED

            await agent.run_batches(handle, batch=5, wait=0.5, stop=lambda: len(seen) >= 4)
            (extra,) = await agent.pull(1, wait=5)
            try:
                await agent.fail(extra.id, "HTTP_504")
                refused = False
            except UnknownReason:
                refused = True  # raised at the call, nothing sent
            await agent.ack([extra.id])
        return {"seen": seen, "reasons": reasons, "refused": refused}

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def test_asyncio_handler_loop_maps_exceptions_to_reasons(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"ok", b"flaky", b"bad", b"last"])
    config = make_config(
        tmp_path, [queue], retry={"reasons": {"HTTP_503": {"like": "NETWORK_ERROR"}}}
    )
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            result = await trio.to_thread.run_sync(
                run_asyncio_handler_agent, config.agent.socket, queue
            )
            await until(lambda: not sidecar.engine.sessions)
            records = sidecar.store.find()
            counts = dict(sidecar.engine.counts)
    seen = result["seen"]
    assert sorted(seen) == sorted([(b"ok", 1), (b"flaky", 1), (b"bad", 1), (b"last", 1)])
    assert "HTTP_503" in result["reasons"] and result["refused"] is True
    assert [(r.rawBody, r.failureReason) for r in records] == [(b"bad", "VALIDATION_FAILED")]
    assert counts["retried"] == 1 and counts["acked"] == 3 and counts["crashes"] == 0
    assert await queue_count(queue) == 0


def run_asyncio_publishers(socket: str, queue: str, n: int) -> tuple[list[int], int]:
    """``n`` publishes from ``n`` tasks started together: their answers' refs, and how many
    writes the client made for them."""

    async def main() -> tuple[list[int], int]:
        agent = await AsyncioAgent.connect(socket, agent="aio-burst", queues=[])
        writes = 0
        write = agent._writer.write

        def counted(data: bytes | bytearray | memoryview) -> None:
            nonlocal writes
            writes += 1
            write(data)

        agent._writer.write = counted  # type: ignore[method-assign]
        answers = await asyncio.gather(
            *(agent.publish_once(f"m{i}".encode(), queue=queue) for i in range(n))
        )
        publish_writes = writes
        await agent.close()
        assert all(a.ok for a in answers)
        return [a.ref for a in answers], publish_writes

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def test_asyncio_publishes_from_tasks_leave_in_one_write_and_are_answered_per_ref(
    tmp_path, unique_queue
):
    queue = unique_queue()
    n = 100
    await publish_many(queue, [])
    config = make_config(tmp_path, [])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            refs, writes = await trio.to_thread.run_sync(
                run_asyncio_publishers, config.agent.socket, queue, n
            )
            await until(lambda: not sidecar.broker.unsettled)
    assert sorted(refs) == sorted(set(refs)) and len(refs) == n
    assert writes == 1
    assert await queue_count(queue) == n
