"""A burst of publishes from trio (the retry copies of a batch of failures, say) leaves the
broker adapter as one write with confirms pipelined, against the real RabbitMQ, on both
hops; every publish is confirmed once and arrives."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from sidecar.adapters.broker import Broker
from sidecar.core.messages import MessageProps
from tests.helpers.broker import BROKER_URL, delete_queues, queue_count

pytestmark = pytest.mark.integration

BURST = 50


@pytest.mark.parametrize("hop", ["trio-asyncio", "thread"])
async def test_a_burst_of_publishes_is_one_write_with_pipelined_confirms(hop: str) -> None:
    queue = f"test.burst.{uuid.uuid4().hex[:8]}"
    broker = Broker(BROKER_URL, prefetch=10, tiers=(0.2,), hop=hop)
    outcomes: list[str | None] = []
    all_confirmed = trio.Event()

    def on_done(error: str | None) -> None:
        outcomes.append(error)
        if len(outcomes) == BURST:
            all_confirmed.set()

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.run)
                await broker.connected.wait()
                await broker.check_queue(queue)
                publisher: Any = broker._gen.publisher
                per_write: list[int] = []
                flush, published_before = publisher.flush, publisher.tag

                def counting_flush() -> None:
                    nonlocal published_before
                    if publisher.out:
                        per_write.append(publisher.tag - published_before)
                        published_before = publisher.tag
                    flush()

                publisher.flush = counting_flush
                for n in range(BURST):  # no checkpoint in between, as in one engine pass
                    broker.publish_nowait(
                        f"copy {n}".encode(),
                        exchange="",
                        routing_key=queue,
                        props=MessageProps(delivery_mode=2),
                        on_done=on_done,
                    )
                assert outcomes == []  # nothing is confirmed before it was even written
                await all_confirmed.wait()
                nursery.cancel_scope.cancel()
        assert outcomes == [None] * BURST
        assert sum(per_write) == BURST
        if hop == "trio-asyncio":
            assert per_write == [BURST]
        else:
            # aiormq's thread may wake while trio is still queueing: a few writes at most.
            assert len(per_write) <= 3, per_write
        assert await queue_count(queue) == BURST
    finally:
        await trio.to_thread.run_sync(delete_queues, [queue])
