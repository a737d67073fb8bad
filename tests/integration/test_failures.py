"""Retries through the broker, dead-lettering, timeouts and agent crashes."""

from __future__ import annotations

import itertools
import sys
import textwrap

import pytest
import trio

from sidecar.client import open_agent
from sidecar.store.records import RecordFilter, missing_fields
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


async def test_message_that_times_out_lands_in_dlq_with_reason_timeout(tmp_path, unique_queue):
    """The seed's "DLQ timeout handling" test, for real."""
    queue = unique_queue()
    await publish_many(queue, [b'{"jobId": "abc123", "url": "https://example.com/page"}'])
    config = make_config(tmp_path, [queue], agent={"deadline": 0.3})
    attempts_seen: list[tuple[int, bool]] = []
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            async with open_agent(
                config.agent.socket, agent="scraper", version="1.2.3", queues=[queue]
            ) as agent:
                while sidecar.store.count(RecordFilter(queue=queue)) == 0:
                    for m in await agent.pull(1, wait=0.5):
                        attempts_seen.append((m.attempt, m.reduced_scope))  # never answered
            record = sidecar.store.find(RecordFilter(queue=queue))[0]
    assert attempts_seen == [(1, False), (2, True), (3, True)]
    assert record.failureReason == "TIMEOUT"
    assert record.attemptCount == 3
    assert record.agentVersion == "1.2.3"
    assert record.payload == {"jobId": "abc123", "url": "https://example.com/page"}
    assert record.firstFailureAt <= record.lastFailureAt
    assert missing_fields(record) == []
    assert await queue_count(queue) == 0


async def test_retry_goes_through_delay_tier_with_backoff_then_succeeds(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"flaky"])
    config = make_config(tmp_path, [queue])
    times: list[float] = []
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                while True:
                    batch = await agent.pull(1, wait=0.5)
                    if not batch:
                        continue
                    m = batch[0]
                    times.append(trio.current_time())
                    if m.attempt < 3:
                        await agent.fail(m.id, "NETWORK_ERROR", "read ECONNRESET")
                    else:
                        await agent.ack([m.id])
                        break
            counts = dict(sidecar.engine.counts)
    assert counts["retried"] == 2 and counts["dead_lettered"] == 0 and counts["acked"] == 1
    # Backoff grows (base 0.2 s, x2) and each wait went through a tier, not a hot loop.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.2 * 0.8 - 0.05
    assert gaps[1] >= 0.4 * 0.8 - 0.05


async def test_permanent_failure_is_dead_lettered_at_once(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"not json"])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                m = (await agent.pull(1, wait=5))[0]
                await agent.fail(m.id, "VALIDATION_FAILED", "missing field url")
                await until(lambda: sidecar.store.count() != 0)
            record = sidecar.store.find()[0]
    assert (record.failureReason, record.attemptCount) == ("VALIDATION_FAILED", 1)
    assert record.rawBody == b"not json" and record.errorMessage == "missing field url"


POISON_AGENT = textwrap.dedent(
    """
    import os, sys, trio
    from sidecar.client import open_agent

    async def main(socket, queue):
        async with open_agent(socket, agent="crashy", version="9", queues=[queue]) as agent:
            while True:
                batch = await agent.pull(10, wait=0.5)
                good = [m.id for m in batch if m.body != b"poison"]
                if good:
                    await agent.ack(good)
                if any(m.body == b"poison" for m in batch):
                    os._exit(1)  # the poison message kills the agent

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


async def test_poison_message_that_kills_its_agent_ends_in_dlq_alone(tmp_path, unique_queue):
    queue = unique_queue()
    bodies = [b"poison"] + [f"ok-{i}".encode() for i in range(19)]
    await publish_many(queue, bodies)
    # Healthy messages held beside the poison in a batch must not be charged; the agent
    # acks them before dying here, and a batch-mate it never answered comes back uncharged.
    config = make_config(tmp_path, [queue], agent={"batch_size": 10})
    script = tmp_path / "poison_agent.py"
    script.write_text(POISON_AGENT)
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            runs = 0
            while sidecar.store.count(RecordFilter(queue=queue)) == 0:
                runs += 1
                assert runs <= 6, "the poison message never reached the DLQ"
                await trio.run_process(
                    [sys.executable, str(script), config.agent.socket, queue], check=False
                )
                await trio.sleep(0.1)
            record = sidecar.store.find(RecordFilter(queue=queue))[0]
            total_dead = sidecar.store.count()
            counts = dict(sidecar.engine.counts)
    assert record.rawBody == b"poison"
    assert record.failureReason == "AGENT_CRASH"
    assert record.attemptCount == 3
    assert total_dead == 1  # nothing healthy was dead-lettered
    assert counts["acked"] == 19
    assert await queue_count(queue) == 0


async def test_agent_crash_with_several_unanswered_charges_none_and_isolates_them(
    tmp_path, unique_queue
):
    queue = unique_queue()
    await publish_many(queue, [b"x1", b"x2", b"x3"])
    config = make_config(tmp_path, [queue], agent={"batch_size": 3})
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                assert len(await agent.pull(3, wait=5)) == 3
                await agent.ws._stream.aclose()  # vanish without a WebSocket close
            await until(lambda: not sidecar.engine.sessions)
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                got = []
                while len(got) < 3:
                    batch = await agent.pull(3, wait=1)
                    assert len(batch) <= 1, "suspects are handed out alone"
                    got += batch
                    for m in batch:
                        assert m.attempt == 1  # nobody was charged
                        await agent.ack([m.id])
            counts = dict(sidecar.engine.counts)
    assert counts["parked"] == 3 and counts["dead_lettered"] == 0


async def test_dead_lettered_message_retried_succeeds_and_shows_reprocessed(tmp_path, unique_queue):
    """The seed's "DLQ message recovery" test, for real: the operator retries a dead
    letter, the agent processes it, and the record shows it was reprocessed."""
    from sidecar.cli import main as cli

    queue = unique_queue()
    await publish_many(queue, [b'{"jobId": "abc123"}'])
    config = make_config(tmp_path, [queue], agent={"deadline": 0.3})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                while sidecar.store.count(RecordFilter(queue=queue)) == 0:
                    await agent.pull(1, wait=0.3)  # never answered: TIMEOUT x3
                record_id = sidecar.store.find(RecordFilter(queue=queue))[0].id
                code = await trio.to_thread.run_sync(
                    cli,
                    [
                        "dlq",
                        "retry",
                        "--pattern",
                        "TIMEOUT",
                        "--store",
                        config.store.url,
                        "--broker",
                        config.broker.url,
                        "--json",
                    ],
                )
                assert code == 0
                while True:
                    batch = await agent.pull(1, wait=1.0)
                    if batch:
                        break
                (m,) = batch
                assert m.attempt == 1  # a fresh start after an operator's retry
                await agent.ack([m.id])
                await until(lambda: not sidecar.broker.unsettled)
            record = sidecar.store.get(record_id)
    assert record is not None and record.reprocessed and record.reprocessCount == 1
    assert record.reprocessTarget == queue
    assert await queue_count(queue) == 0
