"""An agent's acks are written at the end of the event that asked for them, in the trio
thread, when aiormq's loop shares it and the ack writer is idle: no writer wake-up per ack
frame. Otherwise (the thread hop, or the writer already woken by a lingering settlement
of the same event) the single writer writes them. Either way every ack reaches the real
RabbitMQ once."""

from __future__ import annotations

import uuid

import pytest
import trio

from sidecar.adapters.broker import Broker
from sidecar.core.messages import MessageProps
from tests.helpers.broker import BROKER_URL, delete_queues, queue_count

pytestmark = pytest.mark.integration

BURST = 50


@pytest.mark.parametrize(
    ("hop", "one_lingers"),
    [("trio-asyncio", False), ("trio-asyncio", True), ("thread", False)],
)
async def test_an_events_acks_are_written_at_its_end_when_the_writer_is_idle(
    hop: str, one_lingers: bool
) -> None:
    queue = f"test.ackflush.{uuid.uuid4().hex[:8]}"
    broker = Broker(BROKER_URL, prefetch=BURST, tiers=(0.2,), hop=hop)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.run)
                await broker.connected.wait()
                await broker.check_queue(queue)
                for n in range(BURST):
                    await broker.publish(
                        f"m{n}".encode(),
                        exchange="",
                        routing_key=queue,
                        props=MessageProps(delivery_mode=2),
                    )
                await broker.consume(queue)
                while len(broker.inbox) < BURST:
                    await broker.wait_inbox()
                gen = broker._gen
                messages = [broker.inbox.pop() for _ in range(BURST)]
                # One event, no checkpoint: as the engine settles an agent's ack frame.
                for n, message in enumerate(messages):
                    linger = one_lingers and n == 0
                    assert broker.settle(message.generation, message.tag, linger=linger)
                written_at_flush = hop == "trio-asyncio" and not one_lingers
                assert gen.settle_deferred is written_at_flush
                broker.flush_settlements()
                assert not gen.settle_deferred
                if written_at_flush:
                    # Written in the call: nothing outstanding, the writer never woken.
                    assert broker.unsettled == 0
                    assert not gen.writer_signalled and not gen.settle_requests
                else:
                    assert gen.writer_signalled or broker.unsettled == 0
                await broker.bridge.call(Broker._writer_idle, gen)
                assert broker.unsettled == 0
                nursery.cancel_scope.cancel()
        # Acks not on the wire would have come back to the queue when the connection closed.
        assert await queue_count(queue) == 0
    finally:
        # Consuming declared the queue's delay tier too.
        await trio.to_thread.run_sync(delete_queues, [queue, broker.tier_for(queue, 0.2)])
