"""The engine: drives the delivery ledger (``sidecar.core.ledger``) with the broker and
the DLQ writer. It feeds the ledger events (pulls, answers, deadline ticks, breaker changes,
publish confirms, durable dead letters) and carries out the commands that come back; the
decisions themselves live in the ledger and the policies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from sidecar.adapters import amqp_decode
from sidecar.core.ledger import (
    MALFORMED_MESSAGE,
    BreakerChanged,
    Command,
    InFlight,
    Ledger,
    Moment,
    NotifyTimeout,
    Republish,
    SessionInfo,
    Settle,
    WriteDeadLetter,
)
from sidecar.core.messages import Inbound
from sidecar.core.port import UNENCODABLE, BrokerPort, DeadLetterSink, Tracer
from sidecar.metrics import BREAKER_STATES, Metrics, set_state
from sidecar.policy.breaker import BreakerState, CircuitBreaker, KeyedBreakers
from sidecar.policy.failure import ReasonBook
from sidecar.policy.pressure import PressureLevel, batch_allowed, degradation_actions
from sidecar.policy.retry import RetryPolicy
from sidecar.protocol import Delivery

log = logging.getLogger("sidecar.engine")

Clock = Callable[[], float]
WallClock = Callable[[], datetime]
TimeoutNotice = Callable[[int, int, bool], None]
BatchAnswer = Callable[[list[Delivery]], None]
PRESSURE_PAUSE = 0.05  # seconds per pressure level between batches (WARNING 0.05, CRITICAL 0.1)

__all__ = ["MALFORMED_MESSAGE", "Engine", "InFlight", "SessionInfo"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# prometheus-client's Histogram has no observe-with-count; what ``observe`` does is
# repeated here for ``count`` equal observations (one lock round per bucket, not per
# delivery). tests/observability pins it against ``observe``; should the internals move,
# every observation goes through ``observe`` again.
_HISTOGRAM_INTERNALS = ("_sum", "_buckets", "_upper_bounds", "_raise_if_not_observable")


def observe_many(histogram: Any, amount: float, count: int) -> None:
    """``count`` observations of ``amount`` on a labelled histogram child."""
    if count == 1 or not all(hasattr(histogram, name) for name in _HISTOGRAM_INTERNALS):
        for _ in range(count):
            histogram.observe(amount)
        return
    histogram._raise_if_not_observable()
    histogram._sum.inc(amount * count)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(count)
            break


@dataclass(slots=True, frozen=True)
class QueueMetrics:
    delivered: Any
    acked: Any
    ack_seconds: Any


class MetricsMeter:
    """The ledger's counts as Prometheus metrics; labelled children looked up once per
    queue, not once per message. What the hot path counts per message (deliveries, acks,
    the in-flight and buffered gauges) is gathered in plain ints and written once per
    engine event by ``flush``: a batch of 50 costs one counter update, not 50 (each takes
    the metric's lock)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._per_queue: dict[str, QueueMetrics] = {}
        self._delivered: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        self._in_flight: int | None = None
        self._buffered: int | None = None

    def _queue(self, queue: str) -> QueueMetrics:
        found = self._per_queue.get(queue)
        if found is None:
            m = self.m
            found = self._per_queue[queue] = QueueMetrics(
                m.delivered.labels(queue),
                m.acked.labels(queue),
                m.processing_seconds.labels(queue, "ack"),
            )
        return found

    def flush(self) -> None:
        """Write what was gathered since the last flush."""
        if self._in_flight is not None:
            self.m.in_flight.set(self._in_flight)
            self._in_flight = None
        if self._buffered is not None:
            self.m.buffered.set(self._buffered)
            self._buffered = None
        if self._delivered:
            for queue, count in self._delivered.items():
                self._queue(queue).delivered.inc(count)
            self._delivered.clear()
        if self._acked:
            for queue, count in self._acked.items():
                self._queue(queue).acked.inc(count)
            self._acked.clear()

    def agents(self, count: int) -> None:
        self.m.agents.set(count)

    def in_flight(self, count: int) -> None:
        self._in_flight = count

    def buffered(self, count: int) -> None:
        self._buffered = count

    def delivered(self, queue: str) -> None:
        delivered = self._delivered
        delivered[queue] = delivered.get(queue, 0) + 1

    def acked(self, queue: str, seconds: float, count: int = 1) -> None:
        acked = self._acked
        acked[queue] = acked.get(queue, 0) + count
        # Each delivery is its own observation: the histogram's buckets need every one.
        observe_many(self._queue(queue).ack_seconds, seconds, count)

    def failed(self, queue: str, reason: str, seconds: float) -> None:
        self.m.failures.labels(queue, reason).inc()
        self.m.processing_seconds.labels(queue, "fail").observe(seconds)

    def retried(self, queue: str, tier: float, attempt: int) -> None:
        self.m.retries.labels(queue, f"{tier:g}s").inc()
        self.m.retry_attempt.labels("retry").observe(attempt)

    def parked(self, queue: str, why: str) -> None:
        self.m.parked.labels(queue, why).inc()

    def dead_lettered(self, queue: str, reason: str, attempt: int) -> None:
        self.m.dead_lettered.labels(queue, reason).inc()
        self.m.retry_attempt.labels("dead_letter").observe(attempt)

    def malformed(self, what: str, count: int = 1) -> None:
        self.m.malformed.labels(what).inc(count)

    def stale(self) -> None:
        self.m.stale_acks.inc()

    def breaker_tripped(self) -> None:
        self.m.breaker_trips.inc()


class Engine:
    """Drives the ledger: one instance per daemon, its watchers started by the supervisor."""

    def __init__(
        self,
        ledger: Ledger,
        broker: BrokerPort,
        dlq: DeadLetterSink,
        metrics: Metrics,
        *,
        clock: Clock = trio.current_time,
        wall_clock: WallClock = _utc_now,
        on_timeout: TimeoutNotice | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """``ledger`` is built once from the configuration (``policies.ledger_from``), with
        a ``MetricsMeter`` on the same ``metrics`` to count what it decides. ``tracer`` is
        None while tracing is off: then no span work is done per message."""
        self.ledger = ledger
        self.broker = broker
        self.dlq = dlq
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.tracer = tracer
        self._deadline_changed = trio.Event()
        self._settled = trio.Event()
        self._breaker_changed = trio.Event()
        # (session, delivery id, charged): charged is False when the expiry was parked.
        self.on_timeout: TimeoutNotice = on_timeout or (lambda session, delivery_id, c: None)
        meter = ledger.meter
        self._flush_metrics: Callable[[], None] = (
            meter.flush if isinstance(meter, MetricsMeter) else lambda: None
        )
        # Pulls waiting for deliveries, oldest first: session -> (want, answer). Answered
        # from the broker's arrivals hook in the step that filled the inbox, not by a task
        # woken for it (at paced rates each such hop was a wake-up per message).
        self._waiting: dict[int, tuple[int, BatchAnswer]] = {}
        broker.on_arrivals = self._serve_waiting

    # --- views the rest of the daemon reads ------------------------------------------------

    @property
    def policy(self) -> RetryPolicy:
        return self.ledger.policy

    @property
    def reasons(self) -> ReasonBook:
        return self.ledger.reasons

    @property
    def breaker(self) -> CircuitBreaker:
        return self.ledger.breaker

    @property
    def keyed(self) -> KeyedBreakers:
        return self.ledger.keyed

    @property
    def counts(self) -> dict[str, int]:
        return self.ledger.counts

    @property
    def sessions(self) -> dict[int, SessionInfo]:
        return self.ledger.sessions

    @property
    def in_flight(self) -> dict[int, InFlight]:
        return self.ledger.in_flight

    @property
    def draining(self) -> bool:
        return self.ledger.draining

    @property
    def pressure(self) -> PressureLevel:
        return self.ledger.pressure

    @pressure.setter
    def pressure(self, level: PressureLevel) -> None:
        self.ledger.pressure = level

    @property
    def batch_size(self) -> int:
        return self.ledger.batch_size

    def _moment(self) -> Moment:
        live = self.broker.generation if self.broker.is_connected else None
        return Moment(self.clock(), self.wall_clock(), live)

    # --- carrying out commands -------------------------------------------------------------

    def _run(self, commands: list[Command], *, linger: bool = False) -> None:
        """``linger``: the commands answer the broker or the store, not an agent, so their
        acks may wait a moment to share a write."""
        try:
            for command in commands:
                if isinstance(command, Settle):
                    self._settle(command.message, requeue=command.requeue, linger=linger)
                elif isinstance(command, Republish):
                    self._republish(command)
                elif isinstance(command, WriteDeadLetter):
                    self._write_dead_letter(command)
                elif isinstance(command, NotifyTimeout):
                    self.on_timeout(command.session, command.delivery_id, command.charged)
                elif isinstance(command, BreakerChanged):
                    self._breaker_changed.set()
        finally:
            self.broker.flush_settlements()  # the event's acks in one write
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """After any event: wake the drain when nothing is held, and the deadline watcher
        when the earliest deadline moved; write the metrics the event gathered."""
        self._flush_metrics()
        if not self.ledger.in_flight:
            self._settled.set()
        if self.ledger.deadline_moved:
            self.ledger.deadline_moved = False
            self._deadline_changed.set()

    def _settle(self, message: Inbound, *, requeue: bool = False, linger: bool = False) -> None:
        if self.tracer is not None:
            self.tracer.settled(message, requeue=requeue)
        if not self.broker.settle(message.generation, message.tag, requeue=requeue, linger=linger):
            self.ledger.settle_refused()

    def _republish(self, command: Republish) -> None:
        """Republish to the tier with confirms; the ledger acks the original only once the
        copy is confirmed."""
        message = command.message

        def confirmed(error: str | None) -> None:
            if error is not None and not error.startswith(UNENCODABLE):
                log.warning("retry publish for %s failed: %s; requeued", message.queue, error)
            if self.tracer is not None:
                self.tracer.retried(message, error)
            self._run(self.ledger.confirmed(message, error, at=self._moment()), linger=True)

        routing_key = self.broker.tier_for(message.queue, command.tier)
        props = command.props
        if self.tracer is not None:
            props = self.tracer.retrying(message, props, routing_key)
        self.broker.publish_nowait(
            message.body,
            exchange="",
            routing_key=routing_key,
            props=props,
            on_done=confirmed,
            linger=True,
        )

    def _write_dead_letter(self, command: WriteDeadLetter) -> None:
        message, record = command.message, command.record
        if record.failureReason == MALFORMED_MESSAGE:
            log.warning(
                "malformed message on %s dead-lettered: %s",
                message.queue,
                record.errorMessage[:200],
            )
        tracer = self.tracer
        if tracer is not None:
            record = tracer.dead_lettering(message, record)

        def durable() -> None:
            if tracer is not None:
                tracer.dead_lettered(message)
            self._run(self.ledger.durable(message), linger=True)

        # The ack happens only after the record is durable (store or local spool).
        self.dlq.submit(record, on_durable=durable)

    # --- the agent's view ------------------------------------------------------------------

    def open_session(self, session: int, agent: str, version: str, pid: int | None) -> None:
        self.ledger.open_session(session, agent, version, pid)
        self._flush_metrics()

    def accepting_work(self) -> bool:
        return (
            not self.ledger.draining
            and batch_allowed(self.pressure)
            and self.dlq.healthy
            and self.broker.is_connected
        )

    async def pull(self, session: int, want: int, wait: float) -> list[Delivery]:
        """Up to ``want`` deliveries (capped by the batch size the pressure allows), waiting
        at most ``wait`` seconds for the first one."""
        if "increase_processing_delay" in degradation_actions(self.pressure):
            # The seed's WARNING response: give the agent's memory time between batches.
            await trio.sleep(PRESSURE_PAUSE * int(self.pressure))
        with trio.move_on_after(max(0.0, wait)):
            while True:
                batch = self._take(session, want)
                if batch:
                    return batch
                await self.broker.wait_inbox()
        return []

    def pull_now(self, session: int, want: int) -> list[Delivery]:
        """What a pull gets without waiting (maybe nothing)."""
        return self._take(session, want)

    def must_pause(self) -> bool:
        """Whether a pull must wait out the memory pressure's pause first (``pull``)."""
        return "increase_processing_delay" in degradation_actions(self.pressure)

    def wait_for(self, session: int, want: int, answer: BatchAnswer) -> None:
        """Answer ``session``'s pull with ``answer(batch)`` as soon as deliveries for it
        arrive; ``stop_waiting`` takes the pull back (its wait ran out)."""
        self._waiting[session] = (want, answer)

    def stop_waiting(self, session: int) -> bool:
        """Take back a waiting pull; False when it was answered already (or never made)."""
        return self._waiting.pop(session, None) is not None

    def _serve_waiting(self) -> None:
        """The inbox changed: answer the waiting pulls it can, oldest first."""
        if not self._waiting or not self.broker.inbox:
            return
        for session, (want, answer) in list(self._waiting.items()):
            batch = self._take(session, want)
            if batch:
                del self._waiting[session]
                answer(batch)
            if not self.broker.inbox:
                return

    def _take(self, session: int, want: int) -> list[Delivery]:
        if not self.accepting_work():
            return []
        pulled = self.ledger.pull(session, want, self.broker.inbox, at=self._moment())
        if repaired := amqp_decode.take_repairs():
            self.ledger.headers_repaired(repaired)
        self._run(pulled.commands)
        if self.tracer is not None:
            self._trace_hand_out(self.tracer, pulled.deliveries)
        return pulled.deliveries

    def _trace_hand_out(self, tracer: Tracer, deliveries: list[Delivery]) -> None:
        in_flight = self.ledger.in_flight
        for delivery in deliveries:
            held = in_flight.get(delivery.id)
            if held is not None:
                tracer.handed_out(held.message, delivery)

    def owned_by(self, session: int, delivery_id: int) -> bool:
        return self.ledger.owned_by(session, delivery_id)

    def ack(self, session: int, ids: list[int]) -> list[int]:
        """Settle successes; returns the ids that were not held by this session (late
        answers after a timeout, or never handed out)."""
        unknown, commands = self.ledger.ack(session, ids, now=self.clock())
        self._run(commands)
        return unknown

    def extend(self, session: int, ids: list[int], seconds: float) -> list[int]:
        unknown = self.ledger.extend(session, ids, seconds, now=self.clock())
        self._wake_waiters()
        return unknown

    def fail(
        self,
        session: int,
        delivery_id: int,
        reason: str,
        error: str,
        retry_after: float | None,
    ) -> bool:
        """A failure the session has checked (``reason`` accepted, in canonical form)."""
        commands = self.ledger.fail(
            session,
            delivery_id,
            reason,
            error,
            retry_after,
            at=self._moment(),
        )
        if commands is None:
            return False
        self._run(commands)
        return True

    def close_session(self, session: int, *, crashed: bool) -> None:
        self._waiting.pop(session, None)
        self._run(
            self.ledger.close_session(
                session,
                crashed=crashed,
                at=self._moment(),
            )
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine's timers: deadlines, and consumption paused while the circuit is open."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.watch_deadlines)
            await nursery.start(self.watch_breaker)
            task_status.started()

    # --- deadlines -------------------------------------------------------------------------

    async def watch_deadlines(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Charge TIMEOUT to deliveries not answered by their deadline."""
        task_status.started()
        while True:
            self._deadline_changed = trio.Event()
            self.ledger.deadline_moved = False
            due = self.ledger.next_deadline()
            if due is None:
                await self._deadline_changed.wait()
                continue
            with trio.move_on_at(due):
                await self._deadline_changed.wait()
            self._run(self.ledger.tick(at=self._moment()))

    # --- breaker ---------------------------------------------------------------------------

    async def watch_breaker(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Pause consumption while the circuit is open; resume for half-open probes."""
        task_status.started()
        while True:
            now = self.clock()
            state = self.breaker.state(now)
            set_state(self.metrics.breaker_state, BREAKER_STATES, state.value.lower(), "agent")
            if state is BreakerState.OPEN and not self.broker.paused:
                log.warning(
                    "circuit open: pausing consumption for %.1fs", self.breaker.retry_in(now)
                )
                await self.broker.pause()
            elif state is not BreakerState.OPEN and self.broker.paused and not self.draining:
                log.info("circuit %s: resuming consumption", state.value)
                await self.broker.resume()
                self.broker.wake()
            self._breaker_changed = trio.Event()
            with trio.move_on_after(
                self.breaker.retry_in(now) if state is BreakerState.OPEN else 1.0
            ):
                await self._breaker_changed.wait()

    # --- drain -----------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop handing out work, let in-flight work finish within ``grace``, requeue the
        rest. Never dead-letters."""
        suspects = self.ledger.start_drain()
        self.broker.wake()
        await self.broker.pause()
        self._run(suspects)
        with trio.move_on_after(grace):
            while self.ledger.in_flight:
                self._settled = trio.Event()
                await self._settled.wait()
        self._run(self.ledger.finish_drain())
        await self.dlq.flush()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "counts": dict(self.counts),
            "in_flight": len(self.ledger.in_flight),
            "buffered": len(self.broker.inbox),
            "sessions": [
                {
                    "agent": s.agent,
                    "version": s.version,
                    "pid": s.pid,
                    "in_flight": len(s.in_flight),
                }
                for s in self.sessions.values()
            ],
            "breaker": {
                "state": self.breaker.state(now).value,
                "retry_in": round(self.breaker.retry_in(now), 3),
                "trips": self.breaker.trips,
                "open_keys": self.keyed.open_keys(now),
            },
            "draining": self.draining,
            "batch_size": self.batch_size,
        }
