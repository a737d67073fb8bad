"""The consume path end to end against the real RabbitMQ: batches, acks, reconnects."""

from __future__ import annotations

import subprocess

import pytest
import trio

from sidecar.client import open_agent
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


async def test_thousand_messages_flow_through_in_batches(tmp_path, unique_queue):
    queue = unique_queue()
    n = 1000
    await publish_many(queue, [f"job-{i}".encode() for i in range(n)])
    config = make_config(tmp_path, [queue], agent={"batch_size": 50}, broker={"prefetch": 200})
    seen: list[bytes] = []
    batch_sizes: list[int] = []
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                while len(seen) < n:
                    batch = await agent.pull(50, wait=1.0)
                    batch_sizes.append(len(batch))
                    seen += [m.body for m in batch]
                    await agent.ack([m.id for m in batch])
                # Acks are asynchronous: wait until the broker has them all.
                await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert sorted(seen) == sorted(f"job-{i}".encode() for i in range(n))
    assert max(batch_sizes) == 50
    assert counts["delivered"] == n and counts["acked"] == n
    assert counts["retried"] == counts["dead_lettered"] == 0
    assert await queue_count(queue) == 0


def _close_connections(name_part: str) -> int:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "name", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    closed = 0
    for line in listing.splitlines():
        if name_part in line:
            pid = line.split("\t", 1)[0]
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid, "test: broker-side close"],
                capture_output=True,
                check=True,
                timeout=30,
            )
            closed += 1
    return closed


async def test_broker_connection_drop_mid_stream_loses_nothing(tmp_path, unique_queue):
    queue = unique_queue()
    n = 600
    await publish_many(queue, [f"job-{i}".encode() for i in range(n)])
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 20},
        broker={"prefetch": 100},
        identity={"host": f"reconnect-{queue[-6:]}"},
    )
    processed: set[bytes] = set()
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                dropped = False
                while len(processed) < n:
                    batch = await agent.pull(20, wait=0.5)
                    if not dropped and len(processed) >= n // 3 and batch:
                        # Drop the consume connection while this batch is held: its acks
                        # belong to a dead generation and must be dropped, not sent.
                        generation = sidecar.broker.generation
                        closed = await trio.to_thread.run_sync(
                            _close_connections, f"sidecar-{config.identity.host}-consume"
                        )
                        assert closed == 1
                        while (
                            sidecar.broker.generation == generation
                            or not sidecar.broker.is_connected
                        ):
                            await trio.sleep(0.05)
                        dropped = True
                    processed |= {m.body for m in batch}
                    await agent.ack([m.id for m in batch])
                await until(lambda: not sidecar.broker.unsettled)
            stale = sidecar.engine.counts["stale"]
            reconnects = sidecar.broker.reconnects
    assert processed == {f"job-{i}".encode() for i in range(n)}
    assert reconnects >= 1
    assert stale >= 1  # the held batch's acks were dropped; the broker redelivered it
    assert await queue_count(queue) == 0


async def test_sigterm_style_drain_requeues_and_never_dead_letters(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"a", b"b", b"c"])
    config = make_config(tmp_path, [queue], drain={"grace": 0.5})
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                held = await agent.pull(3, wait=2.0)
                assert len(held) == 3
                sidecar.stop()  # what SIGTERM does
                await until(lambda: not sidecar.engine.in_flight)
            counts = dict(sidecar.engine.counts)
    assert counts["dead_lettered"] == 0 and counts["failed"] == 0
    assert await queue_count(queue) == 3
