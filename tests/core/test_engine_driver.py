"""The engine as a driver: ledger commands carried out against a fake broker port, on
trio's virtual clock (the deadline and drain timers run without waiting)."""

from __future__ import annotations

import random

import trio

from sidecar import attempts
from sidecar.config import load_config
from sidecar.core.messages import Inbound, MessageProps
from sidecar.metrics import Metrics
from sidecar.policies import ledger_from
from sidecar.runtime.engine import Engine, MetricsMeter
from tests.helpers.fake_broker import FakeBroker, FakeDeadLetters

DEADLINE = 5.0


def message(tag: int) -> Inbound:
    return Inbound(1, tag, "work", f"m{tag}".encode(), MessageProps(), "work", "", False)


def make_engine(
    notices: list[tuple[int, int, bool]], noticed: trio.Event | None = None
) -> tuple[Engine, FakeBroker]:
    config = load_config(environ={}, overrides={"agent": {"deadline": DEADLINE}})
    broker = FakeBroker()
    metrics = Metrics()
    ledger = ledger_from(config, random=random.Random(7).random, meter=MetricsMeter(metrics))
    engine = Engine(
        ledger,
        broker,
        FakeDeadLetters(),
        metrics,
        on_timeout=lambda *notice: (notices.append(notice), noticed is None or noticed.set()),
    )
    return engine, broker


async def test_a_timeout_is_republished_then_acked_when_confirmed(autojump_clock):
    notices: list[tuple[int, int, bool]] = []
    noticed = trio.Event()
    engine, broker = make_engine(notices, noticed)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            engine.open_session(1, "a", "1.0", None)
            broker.deliver(message(1))
            (delivery,) = await engine.pull(1, 5, wait=1.0)
            start = trio.current_time()
            await noticed.wait()  # virtual time: the deadline watcher's timer fires
            assert trio.current_time() - start >= DEADLINE
            assert notices == [(1, delivery.id, True)]
            (copy,) = broker.published
            assert copy.routing_key.startswith("test.retry.work.")
            assert copy.props.headers[attempts.LAST_REASON] == "TIMEOUT"
            assert broker.settled == []  # not before the copy is confirmed
            copy.on_done(None)
            assert broker.settled == [(1, False)]
            nursery.cancel_scope.cancel()


async def test_pull_waits_for_a_delivery_and_gives_up_after_wait(autojump_clock):
    engine, broker = make_engine([])
    engine.open_session(1, "a", "1.0", None)
    with trio.fail_after(60):
        assert await engine.pull(1, 5, wait=2.0) == []
        async with trio.open_nursery() as nursery:

            async def deliver_later() -> None:
                await trio.sleep(1.0)
                broker.deliver(message(3))

            nursery.start_soon(deliver_later)
            (got,) = await engine.pull(1, 5, wait=10.0)
            assert got.body == b"m3"


async def test_drain_waits_for_answers_then_requeues_the_rest(autojump_clock):
    engine, broker = make_engine([])
    engine.open_session(1, "a", "1.0", None)
    broker.deliver(message(1), message(2), message(3))
    with trio.fail_after(60):
        first, _second, _third = await engine.pull(1, 5, wait=1.0)

        async def answer_later() -> None:
            await trio.sleep(1.0)
            engine.ack(1, [first.id])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_later)
            start = trio.current_time()
            await engine.drain(grace=3.0)
            assert trio.current_time() - start == 3.0  # waited out the grace for 2 and 3
    assert broker.paused
    assert broker.settled == [(1, False), (2, True), (3, True)]
    assert engine.counts["failed"] == 0 and not engine.in_flight


async def test_nothing_is_handed_out_while_the_broker_is_away(autojump_clock):
    engine, broker = make_engine([])
    engine.open_session(1, "a", "1.0", None)
    broker.deliver(message(1))
    broker.is_connected = False
    with trio.fail_after(60):
        assert await engine.pull(1, 5, wait=1.0) == []
    broker.is_connected = True
    with trio.fail_after(60):
        assert [d.body for d in await engine.pull(1, 5, wait=1.0)] == [b"m1"]


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


async def test_metrics_of_a_batch_are_written_once_per_event_and_add_up(autojump_clock):
    engine, broker = make_engine([])
    metrics = engine.metrics
    writes: list[float] = []
    delivered = metrics.delivered.labels("work")
    counting_inc = delivered.inc
    delivered.inc = lambda amount=1: (writes.append(amount), counting_inc(amount))  # type: ignore[method-assign]
    engine.open_session(1, "a", "1.0", None)
    broker.deliver(*(message(tag) for tag in range(1, 8)))
    with trio.fail_after(60):
        batch = await engine.pull(1, 5, wait=1.0)
    assert len(batch) == 5
    # Written when the pull's event ends, in one update for the five.
    assert writes == [5]
    assert sample(metrics, "sidecar_messages_delivered_total", {"queue": "work"}) == 5
    assert sample(metrics, "sidecar_in_flight_messages") == 5
    assert sample(metrics, "sidecar_buffered_messages") == 2
    engine.ack(1, [d.id for d in batch[:3]])
    assert sample(metrics, "sidecar_messages_acked_total", {"queue": "work"}) == 3
    assert sample(metrics, "sidecar_in_flight_messages") == 2
    # Every duration is still observed on its own.
    labels = {"queue": "work", "outcome": "ack"}
    assert sample(metrics, "sidecar_processing_seconds_count", labels) == 3
    engine.ack(1, [d.id for d in batch[3:]])
    assert sample(metrics, "sidecar_messages_acked_total", {"queue": "work"}) == 5
    assert sample(metrics, "sidecar_in_flight_messages") == 0


async def test_a_waiting_pull_is_answered_in_the_step_that_fills_the_inbox():
    engine, broker = make_engine([])
    engine.open_session(1, "a", "1.0", None)
    engine.open_session(2, "b", "1.0", None)
    answers: list[tuple[int, list[int]]] = []
    assert engine.pull_now(1, 5) == []
    engine.wait_for(1, 2, lambda batch: answers.append((1, [d.id for d in batch])))
    engine.wait_for(2, 5, lambda batch: answers.append((2, [d.id for d in batch])))
    broker.deliver(message(1), message(2), message(3))
    # Synchronously, oldest pull first, each within its own want.
    assert [(s, len(ids)) for s, ids in answers] == [(1, 2), (2, 1)]
    assert not engine.stop_waiting(1) and not engine.stop_waiting(2)  # both answered
    assert len(engine.in_flight) == 3


async def test_a_waiting_pull_taken_back_or_closed_gets_nothing():
    engine, broker = make_engine([])
    engine.open_session(1, "a", "1.0", None)
    engine.open_session(2, "b", "1.0", None)
    answers: list[int] = []
    engine.wait_for(1, 5, lambda batch: answers.append(1))
    engine.wait_for(2, 5, lambda batch: answers.append(2))
    assert engine.stop_waiting(1)
    engine.close_session(2, crashed=False)
    broker.deliver(message(1))
    assert answers == [] and len(broker.inbox) == 1 and not engine.in_flight


async def test_a_waiting_pull_is_not_answered_while_work_is_not_accepted():
    engine, broker = make_engine([])
    engine.open_session(1, "a", "1.0", None)
    answers: list[list[int]] = []
    engine.wait_for(1, 5, lambda batch: answers.append([d.id for d in batch]))
    broker.is_connected = False
    broker.deliver(message(1))
    assert answers == [] and engine.pull_now(1, 5) == []
    broker.is_connected = True
    broker.wake()  # what the broker does when work may be taken again
    assert len(answers) == 1 and len(answers[0]) == 1
