"""``async for message in agent.messages()`` against a real sidecar and RabbitMQ (trio
client): order, coalesced acks, failures per message, leaving the loop early, cancellation,
the Welcome's limits and deadlines of deliveries buffered ahead."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel

from sidecar import protocol as p
from sidecar.client import AgentClient, open_agent
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


def record_frames(agent: AgentClient) -> list[p.Frame]:
    """Wrap ``agent.send`` to keep every frame the agent sends, with the ids it held then."""
    sent: list[p.Frame] = []
    send = agent.send

    async def recording(frame: p.Frame) -> None:
        sent.append(frame)
        await send(frame)

    agent.send = recording  # type: ignore[method-assign]
    return sent


def bodies(n: int) -> list[bytes]:
    return [f"m{i:03d}".encode() for i in range(n)]


async def test_messages_come_in_order_and_acks_share_frames(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(120))
    config = make_config(tmp_path, [queue], agent={"batch_size": 50})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            seen: list[bytes] = []
            async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                sent = record_frames(agent)
                async for message in agent.messages(batch=50, wait=0.5):
                    seen.append(message.body)
                    assert message.attempt == 1 and message.queue == queue
                    await message.ack()
                    if len(seen) == 120:
                        break
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert seen == bodies(120)
    acks = [f for f in sent if isinstance(f, p.Ack)]
    acked = [i for f in acks for i in f.ids]
    assert len(acked) == len(set(acked)) == 120
    assert len(acks) <= 12, f"{len(acks)} ack frames for 120 messages"
    assert not any(isinstance(f, p.Extend) for f in sent)
    assert counts["acked"] == 120 and counts["crashes"] == 0
    assert await queue_count(queue) == 0


async def test_failures_are_answered_per_message(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"ok1", b"bad1", b"ok2", b"bad2", b"ok3"])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            seen: list[bytes] = []
            async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                async for message in agent.messages(batch=10, wait=0.5):
                    seen.append(message.body)
                    if message.body.startswith(b"bad"):
                        await message.fail("VALIDATION_FAILED", "not a job")
                    else:
                        await message.ack()
                    if len(seen) == 5:
                        break
            await until(lambda: len(sidecar.store.find()) == 2)
            await until(lambda: not sidecar.broker.unsettled)
            records = sidecar.store.find()
            counts = dict(sidecar.engine.counts)
    assert seen == [b"ok1", b"bad1", b"ok2", b"bad2", b"ok3"]
    assert sorted(r.rawBody for r in records) == [b"bad1", b"bad2"]
    assert {r.failureReason for r in records} == {"VALIDATION_FAILED"}
    assert counts["acked"] == 3
    assert await queue_count(queue) == 0


async def test_leaving_the_loop_keeps_the_rest_for_the_next_loop(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(30))
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            first: list[bytes] = []
            rest: list[bytes] = []
            async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                async for message in agent.messages(batch=10, wait=0.5):
                    first.append(message.body)
                    await message.ack()
                    if len(first) == 3:
                        break
                pulled = await agent.pull(2, wait=0.5)  # a plain pull hands out the buffer
                await agent.ack([m.id for m in pulled])
                async for message in agent.messages(batch=10, wait=0.5):
                    rest.append(message.body)
                    await message.ack()
                    if len(first) + len(pulled) + len(rest) == 30:
                        break
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert first + [m.body for m in pulled] + rest == bodies(30)
    assert counts["acked"] == 30 and counts["timeouts"] == 0
    assert await queue_count(queue) == 0


async def test_breaking_out_and_closing_returns_the_buffer_uncharged(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(30))
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            first: list[bytes] = []
            async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                async for message in agent.messages(batch=10, wait=0.5):
                    first.append(message.body)
                    await message.ack()
                    if len(first) == 3:
                        break
                # Something was pulled ahead and never handed out.
                assert agent._prefetch.buffer or agent._prefetch.pulling
            await until(lambda: not sidecar.engine.sessions)
            again: list[tuple[bytes, int]] = []
            async with open_agent(config.agent.socket, agent="loop2", queues=[queue]) as agent:
                async for message in agent.messages(batch=10, wait=0.5):
                    again.append((message.body, message.attempt))
                    await message.ack()
                    if len(again) == 27:
                        break
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert first == bodies(3)
    assert sorted(again) == [(b, 1) for b in bodies(30)[3:]]  # uncharged: still attempt 1
    assert counts["acked"] == 30 and counts["crashes"] == 0
    assert await queue_count(queue) == 0


async def test_an_exception_in_the_loop_loses_nothing(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(20))
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            done: list[bytes] = []
            with pytest.raises(RuntimeError, match="handler broke"):
                async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                    async for message in agent.messages(batch=8, wait=0.5):
                        if len(done) == 5:
                            raise RuntimeError("handler broke")
                        done.append(message.body)
                        await message.ack()
            await until(lambda: not sidecar.engine.sessions)
            acked = dict(sidecar.engine.counts)["acked"]
        remaining = await queue_count(queue)  # the sidecar gone, nothing is held anywhere
    assert done == bodies(5) and acked == 5  # every ack given went out before the close
    assert remaining == 15


async def test_cancelled_while_waiting_for_input_then_resumed(tmp_path, unique_queue):
    queue = unique_queue()
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            seen: list[bytes] = []
            async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                with trio.move_on_after(0.3) as idle:
                    async for message in agent.messages(batch=10, wait=5.0):
                        seen.append(message.body)
                assert idle.cancelled_caught and not seen
                # The long poll cut short is still out; its batch is taken by the next loop.
                await publish_many(queue, bodies(12))
                async for message in agent.messages(batch=10, wait=0.5):
                    seen.append(message.body)
                    await message.ack()
                    if len(seen) == 12:
                        break
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
            errors = [e.code for e in agent.errors]
    assert seen == bodies(12)
    assert "pull_in_progress" not in errors
    assert counts["acked"] == 12


async def test_never_more_in_flight_than_the_welcome_allows(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(40))
    config = make_config(tmp_path, [queue], agent={"batch_size": 50, "max_in_flight": 6})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            seen: list[bytes] = []
            most_held = 0
            async with open_agent(config.agent.socket, agent="loop", queues=[queue]) as agent:
                assert agent.welcome is not None and agent.welcome.limits.max_in_flight == 6
                sent = record_frames(agent)
                pull_room: list[tuple[int, int]] = []
                send = agent.send

                async def checking(frame: Any) -> None:
                    if isinstance(frame, p.Pull):
                        pull_room.append((frame.max, len(agent._held)))
                    await send(frame)

                agent.send = checking  # type: ignore[method-assign]
                async for message in agent.messages(batch=50, wait=0.5):
                    most_held = max(most_held, len(sidecar.engine.ledger.in_flight))
                    seen.append(message.body)
                    await trio.lowlevel.checkpoint()  # let the keeper and the sidecar run
                    await message.ack()
                    if len(seen) == 40:
                        break
            await until(lambda: not sidecar.broker.unsettled)
    assert seen == bodies(40)
    assert 0 < most_held <= 6
    assert pull_room and sent
    # Asked for only what the limit left, except a pull for 1 with nothing buffered.
    assert all(want + held <= 6 or want == 1 for want, held in pull_room), pull_room


async def test_buffered_deliveries_do_not_time_out_behind_a_slow_handler(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(8))
    # A 1 s deadline and 0.3 s per message: the last of a batch of 8 would wait 2.1 s.
    config = make_config(tmp_path, [queue], agent={"deadline": 1.0, "batch_size": 8})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            seen: list[tuple[bytes, int]] = []
            async with open_agent(config.agent.socket, agent="slow", queues=[queue]) as agent:
                sent = record_frames(agent)
                async for message in agent.messages(batch=8, wait=0.5):
                    seen.append((message.body, message.attempt))
                    await trio.sleep(0.3)
                    await message.ack()
                    if len(seen) == 8:
                        break
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
            expired = [e for e in agent.errors if e.code == "deadline_expired"]
    assert seen == [(b, 1) for b in bodies(8)]
    assert not expired and counts["timeouts"] == 0 and counts["acked"] == 8
    assert any(isinstance(f, p.Extend) for f in sent)


async def test_run_handles_one_message_at_a_time(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, bodies(25))
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            seen: list[bytes] = []
            active = 0

            async def handle(message: p.Delivery) -> None:
                nonlocal active
                active += 1
                assert active == 1
                await trio.lowlevel.checkpoint()
                seen.append(message.body)
                active -= 1

            async with open_agent(config.agent.socket, agent="run", queues=[queue]) as agent:
                await agent.run_batches(handle, batch=10, wait=0.5, stop=lambda: len(seen) >= 25)
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert seen == bodies(25)
    assert counts["acked"] == 25
