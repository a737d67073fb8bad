"""Publishes pipelined by an agent's tasks, against the real RabbitMQ: the client writes the
publishes queued at one wake-up at once, the session hands everything it read at once to
the broker adapter (one write to the broker per burst, not per publish), and still every
publish is answered under its own ref, confirmed before ``ok``, throttled past the queue
bound, and refused alone when it is wrong."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import trio

from sidecar import protocol as p
from sidecar.client import AgentClient, PublishRefused, open_agent
from tests.helpers import (
    drain_bodies,
    make_config,
    publish_many,
    queue_count,
    running_sidecar,
    until,
)
from tests.helpers.streams import CountedStream

pytestmark = pytest.mark.integration

BURST = 200
HOP = os.environ.get("SIDECAR_TEST_HOP", "trio-asyncio")


def count_writes(agent: AgentClient) -> CountedStream:
    counted = CountedStream(agent.ws._stream)
    agent.ws._stream = counted
    return counted


def count_broker_writes(sidecar: Any) -> list[int]:
    """Publishes per write the broker adapter's publisher makes (one entry per write)."""
    publisher = sidecar.broker._gen.publisher
    per_write: list[int] = []
    flush, before = publisher.flush, publisher.tag

    def counting_flush() -> None:
        nonlocal before
        if publisher.out:
            per_write.append(publisher.tag - before)
            before = publisher.tag
        flush()

    publisher.flush = counting_flush
    return per_write


async def test_a_burst_of_publishes_from_tasks_is_confirmed_and_answered_per_ref(
    tmp_path, unique_queue
):
    target = unique_queue("out")
    await publish_many(target, [])
    config = make_config(tmp_path, [])
    answers: dict[int, p.Published] = {}
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="producer", queues=[]) as agent,
        ):
            client_writes = count_writes(agent)
            broker_writes = count_broker_writes(sidecar)

            async def one(i: int) -> None:
                answer = await agent.publish_once(f"m{i}".encode(), queue=target)
                answers[i] = answer

            async with trio.open_nursery() as nursery:
                for i in range(BURST):  # no checkpoint in between: one wake-up's worth
                    nursery.start_soon(one, i)
            publish_writes = len(client_writes.writes)  # before the close frame's own write
            await until(lambda: not sidecar.broker.unsettled)
    assert len(answers) == BURST
    assert all(a.ok and not a.throttled for a in answers.values())
    # Each answer came back under the ref of its own publish, each ref once.
    assert len({a.ref for a in answers.values()}) == BURST
    # The client's publishes left together; the sidecar's reads of them reached the broker
    # in a few writes (one per publish before burst reads).
    assert publish_writes == 1
    assert sum(broker_writes) == BURST
    if HOP == "trio-asyncio":
        assert len(broker_writes) <= 10, broker_writes
    # Confirmed before ok: everything answered ok is in the queue, exactly once.
    assert await queue_count(target) == BURST
    assert Counter(await drain_bodies(target)) == Counter(f"m{i}".encode() for i in range(BURST))


async def test_a_burst_past_the_queue_bound_is_throttled_per_publish(tmp_path, unique_queue):
    target = unique_queue("out")
    await publish_many(target, [])
    burst, bound = 60, 5
    config = make_config(tmp_path, [], throttle={"rate": 20.0, "burst": 1.0, "queue": bound})
    answers: dict[int, p.Published] = {}
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="producer", queues=[]) as agent,
        ):

            async def one(i: int) -> None:
                answers[i] = await agent.publish_once(f"m{i}".encode(), queue=target)

            async with trio.open_nursery() as nursery:
                for i in range(burst):
                    nursery.start_soon(one, i)
            await until(lambda: not sidecar.broker.unsettled)
    throttled = [a for a in answers.values() if a.throttled]
    sent = [a for a in answers.values() if a.ok]
    assert len(answers) == burst and len(throttled) + len(sent) == burst
    # At most the bucket's one token plus the queue bound went through, whatever arrived
    # in one read; every other publish was told to come back, and when.
    assert len(sent) <= 1 + bound + 1, len(sent)
    assert len(throttled) >= burst - bound - 2
    assert all(a.retry_after is not None and a.retry_after > 0 for a in throttled)
    assert await queue_count(target) == len(sent)
    await drain_bodies(target)


async def test_a_bad_publish_in_a_burst_fails_only_itself(tmp_path, unique_queue):
    target = unique_queue("out")
    await publish_many(target, [])
    config = make_config(tmp_path, [])
    outcomes: dict[int, p.Published | Exception] = {}
    refused_at, unroutable_at, burst = 7, 13, 40
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="producer", queues=[]) as agent,
        ):

            async def one(i: int) -> None:
                try:
                    if i == refused_at:  # refused by the sidecar: not a valid queue name
                        outcomes[i] = await agent.publish_once(b"bad", queue="bad\x01name")
                    elif i == unroutable_at:  # refused by the broker: no such exchange
                        outcomes[i] = await agent.publish_once(
                            b"bad", exchange=f"{target}.missing", routing_key="k"
                        )
                    else:
                        outcomes[i] = await agent.publish_once(f"m{i}".encode(), queue=target)
                except PublishRefused as exc:
                    outcomes[i] = exc

            async with trio.open_nursery() as nursery:
                for i in range(burst):
                    nursery.start_soon(one, i)
            await until(lambda: not sidecar.broker.unsettled)
    refused = outcomes.pop(refused_at)
    assert isinstance(refused, PublishRefused) and refused.frame.ref is not None
    unroutable = outcomes.pop(unroutable_at)
    assert isinstance(unroutable, p.Published) and not unroutable.ok and unroutable.error
    assert all(isinstance(o, p.Published) and o.ok for o in outcomes.values())
    good = {f"m{i}".encode() for i in range(burst)} - {b"m7", b"m13"}
    assert Counter(await drain_bodies(target)) == Counter(good)
