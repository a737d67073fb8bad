"""The chaos test: nothing is lost whatever the agent, the broker and the store do."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from sidecar.client import open_agent
from sidecar.policy.failure import PERMANENT_REASONS
from sidecar.store.base import StoreUnavailable
from sidecar.store.records import RecordFilter, missing_fields
from tests.helpers import make_config, publish_many, queue_count, running_sidecar
from tests.integration.test_flow import _close_connections

pytestmark = pytest.mark.integration

N = 2000


class OutageSwitch:
    """Stands in front of the real primary store and refuses every call while ``down``:
    the spool in front of it is real and must carry the dead letters meanwhile."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("chaos: store outage")
            return target(*args, **kwargs)

        return call


async def test_chaos_every_message_is_processed_or_dead_lettered(tmp_path, unique_queue):
    queue = unique_queue("chaos")
    await publish_many(queue, [f"{i}".encode() for i in range(N)], message_id_prefix="c")
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 25, "deadline": 0.5},
        broker={"prefetch": 100},
        breaker={"failure_threshold": 1000, "min_calls_in_window": 100000},
        identity={"host": f"chaos-{queue[-6:]}"},
    )
    rng = random.Random(1234)
    processed: set[str] = set()
    deliveries = 0
    crashes = 0

    with trio.fail_after(240):
        async with running_sidecar(config) as sidecar:
            switch = OutageSwitch(sidecar.store.primary)
            sidecar.store.primary = switch
            sidecar.store.retry_primary_after = 0.2
            sidecar.dlq.drain_interval = 0.3

            def settled() -> set[str]:
                if switch.down:
                    return set()
                found = sidecar.store.find(RecordFilter(queue=queue), limit=N * 2)
                dead = {r.properties.get("message_id", "") for r in found}
                return processed | dead

            broker_dropped = store_outage_done = False
            while len(settled()) < N:
                async with open_agent(
                    config.agent.socket, agent="chaos", version="6.6", queues=[queue]
                ) as agent:
                    while len(settled()) < N:
                        batch = await agent.pull(25, wait=0.3)
                        deliveries += len(batch)
                        for m in batch:
                            roll = rng.random()
                            if roll < 0.72:
                                await agent.ack([m.id])
                                processed.add(m.message_id or "")
                            elif roll < 0.77:
                                await agent.fail(m.id, "NETWORK_ERROR", f"read ECONNRESET {m.id}")
                            elif roll < 0.80:
                                await agent.fail(m.id, "RATE_LIMITED", "429", retry_after=0.2)
                            elif roll < 0.84:
                                await agent.fail(m.id, "PROCESSING_ERROR", "boom")
                            elif roll < 0.86:
                                await agent.fail(m.id, "VALIDATION_FAILED", "bad job")
                            # else: hang past the deadline (TIMEOUT)
                        if not broker_dropped and deliveries > N // 3:
                            broker_dropped = True
                            await trio.to_thread.run_sync(
                                _close_connections, f"sidecar-{config.identity.host}-consume"
                            )
                        if not store_outage_done and deliveries > N // 2:
                            store_outage_done = True
                            switch.down = True
                            await trio.sleep(1.5)
                            switch.down = False
                        # Random crashes, and one for sure: how many batches a run takes
                        # depends on how full each pull comes back.
                        crash = rng.random() < 0.02 or (crashes == 0 and deliveries > 2 * N // 3)
                        if batch and crash:
                            crashes += 1
                            await agent.ws._stream.aclose()  # crash while holding messages
                            break
            dead = sidecar.store.find(RecordFilter(queue=queue), limit=N * 2)
            counts = dict(sidecar.engine.counts)
            spooled = sidecar.store.spooled()

    # Record ids cover the body and headers, not only the message_id (see PROTOCOL.md).
    dead_ids = {r.properties.get("message_id", "") for r in dead}
    everything = {f"c{i}" for i in range(N)}
    assert processed | dead_ids == everything  # processed + dead-lettered = all N: none lost
    for record in dead:
        assert missing_fields(record) == [], record.id
        if record.failureReason not in PERMANENT_REASONS:
            assert record.attemptCount == 3, (record.id, record.failureReason, record.attemptCount)
    assert len(dead) == len(dead_ids)  # one record per message, even across the outage
    assert spooled == 0
    assert broker_dropped and store_outage_done and crashes >= 1
    assert counts["timeouts"] > 0 and counts["retried"] > 0 and counts["stale"] >= 0
    assert await queue_count(queue) == 0
