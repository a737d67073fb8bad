"""``async for message in agent.messages()`` with the asyncio client, in its own thread and
event loop, against a real sidecar: order, coalesced acks, failures per message, and what
was pulled ahead coming back when the agent stops early."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from sidecar import protocol as p
from sidecar.client_asyncio import AsyncioAgent
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


def bodies(n: int) -> list[bytes]:
    return [f"m{i:03d}".encode() for i in range(n)]


def in_asyncio(main: Callable[[], Awaitable[Any]]) -> Any:
    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def consume(socket: str, queue: str, n: int, stop_after: int | None = None) -> dict[str, Any]:
    """Take messages one at a time: ack them, fail the ``bad`` ones; stop after
    ``stop_after`` (leaving what was pulled ahead) or once ``n`` are seen."""

    async def main() -> dict[str, Any]:
        seen: list[tuple[bytes, int]] = []
        async with await AsyncioAgent.connect(socket, agent="aio", queues=[queue]) as agent:
            sent: list[p.Frame] = []
            send = agent.send

            async def recording(frame: p.Frame) -> None:
                sent.append(frame)
                await send(frame)

            agent.send = recording  # type: ignore[method-assign]
            async for message in agent.messages(batch=20, wait=0.5):
                seen.append((message.body, message.attempt))
                if message.body.startswith(b"bad"):
                    await message.fail("VALIDATION_FAILED", "not a job")
                else:
                    await message.ack()
                if len(seen) == (stop_after or n):
                    break
            buffered = len(agent._prefetch.buffer) + agent._prefetch.pulling
        return {"seen": seen, "sent": sent, "buffered": buffered}

    result: dict[str, Any] = in_asyncio(main)
    return result


async def test_asyncio_messages_in_order_with_coalesced_acks_and_failures(tmp_path, unique_queue):
    queue = unique_queue()
    sent_bodies = bodies(60)
    sent_bodies[10] = b"bad-10"
    sent_bodies[45] = b"bad-45"
    await publish_many(queue, sent_bodies)
    config = make_config(tmp_path, [queue], agent={"batch_size": 20})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            result = await trio.to_thread.run_sync(consume, config.agent.socket, queue, 60)
            await until(lambda: len(sidecar.store.find()) == 2)
            await until(lambda: not sidecar.broker.unsettled)
            records = sidecar.store.find()
            counts = dict(sidecar.engine.counts)
    assert [body for body, _ in result["seen"]] == sent_bodies
    acks = [f for f in result["sent"] if isinstance(f, p.Ack)]
    acked = [i for a in acks for i in a.ids]
    assert len(acked) == len(set(acked)) == 58
    assert len(acks) <= 10, f"{len(acks)} ack frames for 58 acks"
    fails = [f for f in result["sent"] if isinstance(f, p.Fail)]
    assert len(fails) == 2 and {f.reason for f in fails} == {"VALIDATION_FAILED"}
    assert sorted(r.rawBody for r in records) == [b"bad-10", b"bad-45"]
    assert counts["acked"] == 58 and counts["crashes"] == 0
    assert await queue_count(queue) == 0


async def test_asyncio_loop_left_early_returns_the_rest_uncharged(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(30))
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            first = await trio.to_thread.run_sync(
                lambda: consume(config.agent.socket, queue, 30, stop_after=4)
            )
            await until(lambda: not sidecar.engine.sessions)
            rest = await trio.to_thread.run_sync(consume, config.agent.socket, queue, 26)
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert first["seen"] == [(b, 1) for b in bodies(4)]
    assert first["buffered"] > 0  # something was pulled ahead and never handed out
    assert sorted(rest["seen"]) == [(b, 1) for b in bodies(30)[4:]]
    assert counts["acked"] == 30 and counts["crashes"] == 0 and counts["timeouts"] == 0
    assert await queue_count(queue) == 0


def cancelled_then_resumed(
    socket: str, queue: str, idle: threading.Event, filled: threading.Event
) -> dict[str, Any]:
    """Cancel the loop while it waits on an empty queue, then loop again once the test
    has published: the long poll cut short is still out, and its batch is not lost."""

    async def main() -> dict[str, Any]:
        seen: list[bytes] = []
        async with await AsyncioAgent.connect(socket, agent="aio", queues=[queue]) as agent:
            messages = agent.messages(batch=10, wait=5.0)
            try:
                await asyncio.wait_for(anext(messages), 0.3)
                cancelled = False
            except TimeoutError:
                cancelled = True
            idle.set()
            await asyncio.get_running_loop().run_in_executor(None, filled.wait, 30)
            async for message in agent.messages(batch=10, wait=0.5):
                seen.append(message.body)
                await message.ack()
                if len(seen) == 12:
                    break
            errors = [e.code for e in agent.errors]
        return {"seen": seen, "cancelled": cancelled, "errors": errors}

    result: dict[str, Any] = in_asyncio(main)
    return result


async def test_asyncio_loop_cancelled_while_waiting_then_resumed(tmp_path, unique_queue):
    queue = unique_queue()
    config = make_config(tmp_path, [queue])
    idle, filled = threading.Event(), threading.Event()
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            async with trio.open_nursery() as nursery:
                results: list[dict[str, Any]] = []

                async def agent() -> None:
                    results.append(
                        await trio.to_thread.run_sync(
                            cancelled_then_resumed, config.agent.socket, queue, idle, filled
                        )
                    )

                nursery.start_soon(agent)
                await trio.to_thread.run_sync(idle.wait, 30)
                await publish_many(queue, bodies(12))
                filled.set()
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    (result,) = results
    assert result["cancelled"] is True
    assert result["seen"] == bodies(12)
    assert "pull_in_progress" not in result["errors"]
    assert counts["acked"] == 12 and counts["crashes"] == 0
