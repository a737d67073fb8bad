"""Dead letters written in batches, against the real RabbitMQ: while a batch is being
written nothing of it is acked, and if the connection dies meanwhile the broker delivers
every message again and each still ends up as exactly one record."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio

from sidecar.client import open_agent
from sidecar.store.base import PutResult
from sidecar.store.records import DeadLetterRecord, RecordFilter
from tests.helpers import make_config, publish_many, queue_count, running_sidecar
from tests.integration.test_flow import _close_connections

pytestmark = pytest.mark.integration

N = 40


@asynccontextmanager
async def _opened_at_exit(gate: threading.Event) -> AsyncIterator[None]:
    """Never leave the store thread waiting at the gate when a check fails."""
    try:
        yield
    finally:
        gate.set()


async def test_connection_lost_while_a_batch_is_written_loses_nothing(tmp_path, unique_queue):
    queue = unique_queue("dlqbatch")
    await publish_many(queue, [f"job-{i}".encode() for i in range(N)], message_id_prefix="d")
    host = f"dlqb-{queue[-6:]}"
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 50},
        broker={"prefetch": 100},
        identity={"host": host},
    )
    entered = threading.Semaphore(0)
    gate = threading.Event()
    with trio.fail_after(120):
        async with running_sidecar(config) as sidecar:
            real_put_many = sidecar.store.put_many

            def gated_put_many(records: Sequence[DeadLetterRecord]) -> list[PutResult]:
                entered.release()
                assert gate.wait(60), "the test never opened the gate"
                return real_put_many(records)

            sidecar.store.put_many = gated_put_many  # type: ignore[method-assign]
            async with (
                open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
                _opened_at_exit(gate),
            ):
                failed = 0
                while failed < N:
                    for m in await agent.pull(50, wait=2.0):
                        await agent.fail(m.id, "VALIDATION_FAILED", f"bad job {m.message_id}")
                        failed += 1
                # The store thread is inside the first batch; the rest wait behind it.
                await trio.to_thread.run_sync(entered.acquire)
                with trio.move_on_after(1.0):
                    while sidecar.engine.counts["dead_lettered"] < N:
                        await trio.sleep(0.01)
                assert sidecar.engine.counts["dead_lettered"] == N
                assert sidecar.broker.unsettled == N  # not one ack went out
                closed = await trio.to_thread.run_sync(
                    _close_connections, f"sidecar-{host}-consume"
                )
                assert closed >= 1
                gate.set()
                # Every message comes back (it was never acked) and is dead-lettered again:
                # the same message, so the same record.
                while (
                    sidecar.store.count(RecordFilter(queue=queue)) < N
                    or sidecar.broker.unsettled
                    or await queue_count(queue)
                ):
                    for m in await agent.pull(50, wait=0.2):
                        await agent.fail(m.id, "VALIDATION_FAILED", f"bad job {m.message_id}")
                records = sidecar.store.find(RecordFilter(queue=queue), limit=N * 2)
                redelivered = sidecar.engine.counts["dead_lettered"] - N
    assert sorted(r.properties["message_id"] for r in records) == sorted(f"d{i}" for i in range(N))
    assert redelivered > 0  # the broker did deliver them again
    assert await queue_count(queue) == 0
