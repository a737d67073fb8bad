"""Backpressure for real: circuit breaking, memory pressure, producer throttling, scaling."""

from __future__ import annotations

import sys
import textwrap

import aiormq
import pytest
import trio

from sidecar import protocol as p
from sidecar.client import open_agent
from sidecar.metrics import LEVELS
from sidecar.policy.breaker import BreakerState
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


async def test_breaker_opens_pauses_without_charging_then_resumes(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [f"m{i}".encode() for i in range(30)])
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 1},
        breaker={
            "failure_threshold": 5,
            # Long enough that a busy machine still fits a pull inside it.
            "open_timeout": 3.0,
            "half_open_probes": 1,
            "half_open_successes": 1,
        },
        retry={"max_attempts": 10},
    )
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:
            breaker = sidecar.engine.breaker

            def is_open() -> bool:
                return breaker.state(trio.current_time()) is BreakerState.OPEN

            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                # The agent fails everything: five failures trip the breaker.
                while not is_open():
                    for m in await agent.pull(1, wait=0.5):
                        await agent.fail(m.id, "NETWORK_ERROR", "ECONNRESET")
                counts_at_trip = dict(sidecar.engine.counts)
                # While open: no work is handed out, nothing is charged or dead-lettered. The
                # open time is real time, so only pulls that began and ended inside it count
                # (a busy machine may let it end at any moment); a later one is kept for acking.
                handed_out_later = []
                pulls_while_open = 0
                while is_open():
                    trips = breaker.trips
                    batch = await agent.pull(1, wait=0.1)
                    if is_open() and breaker.trips == trips:
                        assert batch == []
                        pulls_while_open += 1
                    handed_out_later += batch
                assert pulls_while_open >= 1
                assert sidecar.engine.counts["failed"] == counts_at_trip["failed"]
                assert sidecar.engine.counts["dead_lettered"] == 0
                # After the open time a probe goes through; its success closes the breaker.
                await agent.ack([m.id for m in handed_out_later])
                while sidecar.engine.counts["acked"] < 30:
                    for m in await agent.pull(1, wait=0.5):
                        await agent.ack([m.id])
                state = breaker.state(trio.current_time())
            final = dict(sidecar.engine.counts)
    assert counts_at_trip["failed"] == 5
    assert state is BreakerState.CLOSED
    assert final["dead_lettered"] == 0
    assert final["acked"] == 30  # the five failed ones came back through their tier


ALLOCATING_AGENT = textwrap.dedent(
    """
    import sys, trio
    from sidecar.client import open_agent

    async def main(socket, queue, out):
        hog = []
        sizes = []
        async with open_agent(socket, agent="hungry", queues=[queue]) as agent:
            for step in range(200):
                batch = await agent.pull(20, wait=0.3)
                if batch:
                    sizes.append(len(batch))
                    await agent.ack([m.id for m in batch])
                text = " ".join(map(str, sizes))
                if step == 15:
                    hog.append(bytearray(130 * 1024 * 1024))  # RSS climbs past 0.8 of 200 MB
                    for i in range(0, len(hog[0]), 4096):
                        hog[0][i] = 1
                    sizes.append(-1)
                if step == 45:
                    hog.clear()  # memory released: batches recover
                    sizes.append(-2)
                await trio.sleep(0.05)
        open(out, "w").write(" ".join(map(str, sizes)))

    trio.run(main, *sys.argv[1:4])
    """
)


async def test_agent_memory_pressure_shrinks_batches_then_recovers(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"x"] * 3000)
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 20},
        pressure={"source": "agent", "agent_limit_bytes": 200 * 1024 * 1024, "interval": 0.1},
    )
    script = tmp_path / "agent.py"
    script.write_text(ALLOCATING_AGENT)
    out = tmp_path / "sizes.txt"
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:
            await trio.run_process(
                [sys.executable, str(script), config.agent.socket, queue, str(out)]
            )
            pressure_metric = max(
                n
                for n, state in enumerate(LEVELS)
                if sidecar.metrics.pressure_state.labels(state)._value.get() == 1
            )
    sizes = [int(x) for x in out.read_text().split()]
    before = sizes[: sizes.index(-1)]
    during = sizes[sizes.index(-1) + 1 : sizes.index(-2)]
    after = sizes[sizes.index(-2) + 1 :]
    assert max(before) == 20
    assert during and min(during) <= 15  # x0.75 or less while the agent is under pressure
    assert after and max(after[-10:]) == 20  # back to full batches once memory is released
    assert pressure_metric == 0


async def test_deep_target_queue_throttles_publishes_and_loses_none(tmp_path, unique_queue):
    """The seed's "Backpressure under load": a producer pushing as fast as it can into a deep
    queue is held, then rate-limited; every publish lands, the sidecar queueing them."""
    target = unique_queue("deep")
    consumed = unique_queue("src")
    await publish_many(target, [b"backlog"] * 600)  # beyond emergency (500)
    config = make_config(
        tmp_path,
        [consumed],
        # A rate far below what even a busy machine's producer reaches, so it is always held.
        throttle={"rate": 20.0, "burst": 5.0},
        depth={"interval": 0.2, "watch": [target]},
    )
    results: list[p.Published] = []
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            await until(lambda: not (sidecar.gate.depths.get(target, 0) < 600))
            async with (
                open_agent(config.agent.socket, agent="producer", queues=[]) as agent,
                trio.open_nursery() as nursery,
            ):
                # Deep queue (EMERGENCY): held in the sidecar's queue, not answered yet.
                held: list[p.Published] = []

                async def publish_held() -> None:
                    held.append(await agent.publish(b"x", queue=target))

                nursery.start_soon(publish_held)
                (session,) = sidecar.sessions.values()
                await until(lambda: session.queued_publishes != 0)
                await trio.sleep(0.3)
                assert held == [] and session.queued_publishes == 1
                # Drain the backlog to 100; publishing 60 more keeps it under EMERGENCY while the
                # adaptive rate stays at or below the base 20/s.

                async def shrink() -> None:
                    from tests.helpers import amqp

                    async def go(channel):
                        for _ in range(500):
                            m = await channel.basic_get(target)
                            await channel.basic_ack(m.delivery.delivery_tag)

                    await amqp(go)

                await shrink()
                # The held publish goes out once the gate sees the depth below EMERGENCY and
                # makes it 101, so a reading of exactly 100 may never come.
                await until(lambda: held != [])
                await until(lambda: not (sidecar.gate.depths.get(target, 0) > 101))
                start = trio.current_time()
                for i in range(60):
                    results.append(await agent.publish(f"n{i}".encode(), queue=target))
                elapsed = trio.current_time() - start
    assert [r.ok for r in held] == [True]  # sent once the depth came down
    assert all(r.ok for r in results)
    assert elapsed >= (60 - 5) / 20 * 0.8  # paced by the throttle beyond the burst
    assert len(results) == 60
    assert await queue_count(target) == 100 + 60 + 1


async def test_backlog_of_200_raises_recommended_consumers(tmp_path, unique_queue):
    """The seed's "Auto-scaling response": a backlog of 200 raises the recommendation."""
    queue = unique_queue()
    config = make_config(tmp_path, [], depth={"interval": 0.2, "watch": [queue]})
    await publish_many(queue, [])
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            await until(lambda: not (queue not in sidecar.monitor.queues))
            initial = sidecar.monitor.queues[queue].recommended_consumers
            await publish_many(queue, [b"job"] * 200)
            await until(lambda: not (sidecar.monitor.queues[queue].depth < 200))
            final = sidecar.monitor.queues[queue].recommended_consumers
            level = sidecar.monitor.queues[queue].level
    assert initial == 1
    assert final == 20 > initial
    assert level == "WARNING"


async def test_keyed_breaker_pauses_only_the_failing_host(tmp_path, unique_queue):
    """Keyed by a header naming the target host: one failing site opens its own breaker and
    its messages wait uncharged, while the other site's messages keep flowing."""
    from tests.helpers import amqp

    queue = unique_queue()

    async def publish_hosts(channel):
        await channel.queue_declare(queue, durable=True)
        for i in range(40):
            host = "down.example" if i % 2 else "up.example"
            await channel.basic_publish(
                f"{host}/{i}".encode(),
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(
                    message_id=f"k{i}", headers={"x-target-host": host}
                ),
            )

    await amqp(publish_hosts)
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 5},
        breaker={"key_header": "x-target-host", "failure_threshold": 3, "open_timeout": 30.0},
        retry={"max_attempts": 10},
    )
    up_done: set[bytes] = set()
    down_attempts = 0
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            while len(up_done) < 20:
                for m in await agent.pull(5, wait=0.5):
                    if m.headers["x-target-host"] == "up.example":
                        up_done.add(m.body)
                        await agent.ack([m.id])
                    else:
                        down_attempts += 1
                        await agent.fail(m.id, "NETWORK_ERROR", "connect ECONNREFUSED")
            now = trio.current_time()
            open_keys = sidecar.engine.keyed.open_keys(now)
            down_trips = sidecar.engine.keyed.get("down.example").trips
            agent_wide = sidecar.engine.breaker.state(now)
            counts = dict(sidecar.engine.counts)
            parked = sidecar.metrics.parked
            parked_in_flight = parked.labels(queue, "circuit_open")._value.get()
            parked_at_hand_out = parked.labels(queue, "key_circuit_open")._value.get()
    assert open_keys == ["down.example"] and down_trips == 1
    assert agent_wide is BreakerState.CLOSED  # the agent itself is healthy
    assert len(up_done) == 20  # the healthy host's messages kept flowing
    # Exactly the three failures that opened the key were charged (and retried); every
    # later down-host message waits out the open time in a tier, uncharged.
    assert counts["retried"] == 3
    assert parked_in_flight == down_attempts - 3  # failed after the trip: not charged
    assert parked_at_hand_out >= 1  # not even handed to the agent while the key is open
    assert counts["dead_lettered"] == 0
