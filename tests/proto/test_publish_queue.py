"""The session's publish queue on trio's virtual clock: publishes wait behind the token
bucket instead of being refused, and only beyond the queue's bound is one throttled, told to
come back when the queue ahead has drained."""

from __future__ import annotations

import itertools
from typing import Any

import trio

from sidecar import protocol as p
from sidecar.config import load_config
from sidecar.metrics import Metrics
from sidecar.policy.failure import DEFAULT_REASONS
from sidecar.runtime.backpressure import PublishGate
from sidecar.runtime.session import MIN_RETRY_AFTER, Session
from tests.helpers import until

CODEC = p.Codec()


class RecordingBroker:
    def __init__(self) -> None:
        self.is_connected = True
        self.sent: list[tuple[float, bytes]] = []

    def publish_nowait(self, body: bytes, **kwargs: Any) -> None:
        self.sent.append((trio.current_time(), body))
        kwargs["on_done"](None)


class Engine:
    reasons = DEFAULT_REASONS

    def __init__(self) -> None:
        self.broker = RecordingBroker()


def make(rate: float, burst: float, queue: int, queue_bytes: int = 1 << 20) -> Session:
    config = load_config(
        environ={},
        overrides={
            "throttle": {"rate": rate, "burst": burst, "queue": queue, "queue_bytes": queue_bytes}
        },
    )
    gate = PublishGate(config, clock=trio.current_time, blocked=lambda: False)
    engine = Engine()
    return Session(
        None,  # type: ignore[arg-type]  # _dispatch and _pump never touch the socket
        agent=config.agent,
        throttle=config.throttle,
        host=config.identity.host,
        engine=engine,  # type: ignore[arg-type]
        broker=engine.broker,  # type: ignore[arg-type]
        gate=gate,
        metrics=Metrics(),
        codec=CODEC,
        over_tcp=False,
        consume=lambda queue: None,
    )


def answers(session: Session) -> list[p.Published]:
    out = []
    while True:
        try:
            frame = session._outbox.receive_nowait()
        except trio.WouldBlock:
            return out
        assert isinstance(frame, p.Published)
        out.append(frame)


def publish(session: Session, ref: int, body: bytes = b"x", queue: str = "out") -> None:
    session.dispatch(CODEC.encode(p.Publish(ref=ref, body=body, queue=queue), binary=True))


async def test_publishes_wait_behind_the_bucket_and_only_overflow_is_throttled(autojump_clock):
    session = make(rate=10.0, burst=2.0, queue=5)
    broker: RecordingBroker = session.engine.broker  # type: ignore[assignment]
    for ref in range(1, 11):
        publish(session, ref, f"m{ref}".encode())
    first = answers(session)
    # Two went out on the burst; five wait in the queue; three are throttled.
    assert [a.ref for a in first if a.ok] == [1, 2]
    throttled = [a for a in first if a.throttled]
    assert [a.ref for a in throttled] == [8, 9, 10]
    # Each is told when the queue ahead (5 at 10/s) has drained, one slot apart.
    assert [a.retry_after for a in throttled] == [0.6, 0.7, 0.8]
    assert all(a.error == "rate_limited" for a in throttled)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._pump)
        await until(lambda: not (len(broker.sent) < 7))
        nursery.cancel_scope.cancel()
    later = answers(session)
    assert [a.ref for a in later] == [3, 4, 5, 6, 7] and all(a.ok for a in later)
    assert [b for _, b in broker.sent] == [f"m{i}".encode() for i in range(1, 8)]  # in order
    times = [t for t, _ in broker.sent[2:]]
    assert all(b - a >= 0.1 - 1e-6 for a, b in itertools.pairwise(times))
    # A throttled publish that comes back when told finds room.
    publish(session, 8, b"m8")
    assert not any(a.throttled for a in answers(session))
    assert session.queued_publishes <= 1


async def test_the_byte_bound_throttles_too_and_never_says_zero(autojump_clock):
    session = make(rate=1000.0, burst=1.0, queue=100, queue_bytes=10)
    publish(session, 1, b"a")  # the burst
    publish(session, 2, b"0123456789")  # fills the bytes bound
    publish(session, 3, b"z")
    (answer_1, answer_3) = answers(session)
    assert answer_1.ok and answer_3.ref == 3 and answer_3.throttled
    assert answer_3.retry_after is not None and answer_3.retry_after >= MIN_RETRY_AFTER


async def test_a_held_target_is_queued_and_its_overflow_names_the_cause(autojump_clock):
    session = make(rate=10.0, burst=1.0, queue=1)
    session.gate.depths["out"] = 10_000  # EMERGENCY: the target is held
    publish(session, 1)
    publish(session, 2)
    (answer,) = answers(session)
    assert answer.ref == 2 and answer.throttled and answer.error == "queue_emergency"
    assert answer.retry_after == 1.0
    broker: RecordingBroker = session.engine.broker  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._pump)
        await trio.sleep(5)
        assert broker.sent == []  # still held
        session.gate.depths["out"] = 0
        await until(lambda: broker.sent)
        nursery.cancel_scope.cancel()
    assert [a.ref for a in answers(session)] == [1]


async def test_state_per_target_stays_bounded_under_many_targets(autojump_clock):
    session = make(rate=10.0, burst=1.0, queue=1)
    publish(session, 1, queue="a")  # the burst
    publish(session, 2, queue="a")  # fills the queue
    for i in range(1000):
        publish(session, 3 + 2 * i, queue=f"t{i}")  # a new target's burst: sent
        publish(session, 4 + 2 * i, queue=f"t{i}")  # no token, queue full: throttled
    throttled = [a for a in answers(session) if a.throttled]
    assert len(throttled) == 1000
    assert len(session._next_slot) <= 256
    assert len(session._queued) == 1 and len(session._due) == 1
