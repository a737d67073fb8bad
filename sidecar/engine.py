"""The consume and publish paths: where the policies meet the adapters.

Every message taken from the broker ends in exactly one of: acked after the agent's success,
republished to a delay tier (confirmed) before its ack, or written durably to the DLQ store
before its ack. A crash at any point therefore duplicates at worst, never drops.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from sidecar import attempts
from sidecar.adapters import amqp_decode
from sidecar.adapters.broker import (
    UNENCODABLE,
    Broker,
    Inbound,
    MessageProps,
    headers_json_safe,
)
from sidecar.config import Config, reason_declarations
from sidecar.dlq import DeadLetterWriter
from sidecar.metrics import BREAKER_STATES, Metrics, set_state
from sidecar.policy.breaker import (
    NOT_A_PROBE,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    KeyedBreakers,
)
from sidecar.policy.failure import FailureReason, ReasonBook, error_signature
from sidecar.policy.pressure import (
    PressureLevel,
    adjust_batch_size,
    batch_allowed,
    degradation_actions,
)
from sidecar.policy.retry import (
    DeadLetter,
    Retry,
    RetryPolicy,
    choose_tier,
    decide,
    resolve_reasons,
)
from sidecar.protocol import Delivery
from sidecar.store.records import DeadLetterRecord, payload_from_body

log = logging.getLogger("sidecar.engine")

Clock = Callable[[], float]
# Dead-letter reason for a broker message the sidecar cannot read or carry to an agent.
MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
PRESSURE_PAUSE = 0.05  # seconds per pressure level between batches (WARNING 0.05, CRITICAL 0.1)


@dataclass(slots=True)
class InFlight:
    """A delivery held by an agent session."""

    id: int
    message: Inbound
    session: int
    state: attempts.AttemptState
    handed_at: float
    deadline: float
    key: str = ""
    agent: str = ""
    agent_version: str = ""
    probe_of: int = NOT_A_PROBE  # the breaker's probe round when handed out as a probe


@dataclass(slots=True, frozen=True)
class QueueMetrics:
    delivered: Any
    acked: Any
    ack_seconds: Any


@dataclass(slots=True)
class SessionInfo:
    agent: str
    version: str
    pid: int | None
    in_flight: set[int] = field(default_factory=set)


def retry_policy_from(config: Config) -> RetryPolicy:
    r = config.retry
    reasons, rules = resolve_reasons(reason_declarations(config))
    return RetryPolicy(
        max_attempts=r.max_attempts,
        base_delay=r.base_delay,
        max_delay=r.max_delay,
        multiplier=r.multiplier,
        jitter=r.jitter,
        rate_limit_default_delay=r.rate_limit_default_delay,
        tiers=tuple(r.tiers),
        rules=rules,
        reasons=reasons,
    )


def breaker_config_from(config: Config) -> BreakerConfig:
    b = config.breaker
    return BreakerConfig(
        failure_threshold=b.failure_threshold,
        open_timeout=b.open_timeout,
        max_open_timeout=b.max_open_timeout,
        backoff_multiplier=b.backoff_multiplier,
        window=b.window,
        min_calls_in_window=b.min_calls_in_window,
        failure_ratio=b.failure_ratio,
        half_open_probes=b.half_open_probes,
        half_open_successes=b.half_open_successes,
    )


class Engine:
    def __init__(
        self,
        config: Config,
        broker: Broker,
        dlq: DeadLetterWriter,
        metrics: Metrics,
        *,
        clock: Clock = trio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.dlq = dlq
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = retry_policy_from(config)
        self.reasons: ReasonBook = self.policy.reasons
        self.breaker = CircuitBreaker(breaker_config_from(config))
        self.keyed = KeyedBreakers(breaker_config_from(config))
        self.key_header = config.breaker.key_header
        self.pressure = PressureLevel.NORMAL
        self.draining = False
        self.in_flight: dict[int, InFlight] = {}
        self.sessions: dict[int, SessionInfo] = {}
        self.suspects: list[Inbound] = []
        self.counts: dict[str, int] = {
            "delivered": 0,
            "acked": 0,
            "failed": 0,
            "retried": 0,
            "dead_lettered": 0,
            "timeouts": 0,
            "crashes": 0,
            "parked": 0,
            "stale": 0,
            "malformed": 0,
            "ignored_headers": 0,
        }
        self._ids = itertools.count(1)
        self._per_queue: dict[str, QueueMetrics] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._deadline_changed = trio.Event()
        self._settled = trio.Event()
        self._breaker_changed = trio.Event()
        # (session, delivery id, charged): charged is False when the expiry was parked.
        self.on_timeout: Callable[[int, int, bool], None] = lambda session, delivery_id, c: None

    # --- the agent's view ------------------------------------------------------------------

    def open_session(self, session: int, agent: str, version: str, pid: int | None) -> None:
        self.sessions[session] = SessionInfo(agent=agent, version=version, pid=pid)
        self.metrics.agents.set(len(self.sessions))

    @property
    def batch_size(self) -> int:
        return adjust_batch_size(self.pressure, self.config.agent.batch_size)

    def accepting_work(self) -> bool:
        return (
            not self.draining
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

    def _take(self, session: int, want: int) -> list[Delivery]:
        info = self.sessions.get(session)
        if info is None or not self.accepting_work():
            return []
        now = self.clock()
        limit = min(
            want,
            self.batch_size,
            self.config.agent.max_in_flight - len(info.in_flight),
        )
        if limit <= 0:
            return []
        state = self.breaker.state(now)
        if state is BreakerState.OPEN:
            return []
        out: list[Delivery] = []
        # A suspect (held by an agent that crashed with several messages) goes alone, to
        # an agent holding nothing else: if it is the poison, only it gets charged.
        if self.suspects and not info.in_flight:
            probe_of = NOT_A_PROBE
            if state is BreakerState.HALF_OPEN:
                if not self.breaker.allow(now):
                    return []
                probe_of = self.breaker.probe_round
            return [self._hand_out(session, info, self.suspects.pop(0), now, probe_of=probe_of)]
        inbox = self.broker.inbox
        generation = self.broker.generation
        while inbox and len(out) < limit:
            message = inbox[0]
            if message.generation != generation:
                inbox.popleft()
                continue
            key = ""
            probe_of = NOT_A_PROBE
            try:
                key = self._key_of(message)
                # Half-open probes of the agent-wide breaker are unkeyed messages: a keyed
                # message's outcome is recorded on its own key's breaker.
                if not key and state is BreakerState.HALF_OPEN:
                    if not self.breaker.allow(now):
                        break
                    probe_of = self.breaker.probe_round
                inbox.popleft()
                message_state = self._read_state(message)
                if message_state.suspect:
                    if probe_of != NOT_A_PROBE:
                        self.breaker.release_probe(now, probe_of=probe_of)
                    self.suspects.append(message)
                    continue
                if key:
                    allowed, probe_of = self._key_allows(message, key, now)
                    if not allowed:
                        continue
                out.append(
                    self._hand_out(session, info, message, now, message_state, probe_of=probe_of)
                )
            except Exception as exc:  # the error boundary of one message
                if probe_of != NOT_A_PROBE:
                    # Its probe slot is free again: the message never reached the agent.
                    breaker = self.keyed.get(key) if key else self.breaker
                    breaker.release_probe(now, probe_of=probe_of)
                if inbox and inbox[0] is message:
                    inbox.popleft()
                self._malformed(message, exc)
        self.metrics.buffered.set(len(inbox))
        if repaired := amqp_decode.take_repairs():
            self.metrics.malformed.labels("amqp_value").inc(repaired)
            self.counts["ignored_headers"] += repaired
        return out

    def _read_state(self, message: Inbound) -> attempts.AttemptState:
        state = attempts.read_state(message.props.headers)
        for name in state.ignored:
            self.counts["ignored_headers"] += 1
            self.metrics.malformed.labels(name).inc()
        return state

    def _malformed(self, message: Inbound, exc: BaseException) -> None:
        """A message whose bytes, headers or properties we cannot handle: dead-lettered
        with what can be read of it (raw body, readable headers), acked once durable. It
        must never reach the supervisor, or every restart would crash on it again."""
        log.warning(
            "malformed message on %s dead-lettered: %s: %s",
            message.queue,
            type(exc).__name__,
            str(exc)[:200],
        )
        self.counts["malformed"] += 1
        self.metrics.malformed.labels("message").inc()
        try:
            self._write_dead_letter(
                message,
                reason=MALFORMED_MESSAGE,
                error=f"{type(exc).__name__}: {str(exc)[:500]}",
                attempt=1,
                first_failure_at=None,
                agent="",
                agent_version="",
            )
        except Exception:  # last resort: requeueing would loop
            log.exception("malformed message on %s could not be recorded", message.queue)

    def _key_of(self, message: Inbound) -> str:
        """The breaker key (for example the target host) a message carries, if keyed."""
        if not self.key_header:
            return ""
        value = message.props.headers.get(self.key_header, "")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        # Only plain scalars key a breaker; anything else (a table, a list) is unkeyed.
        return value[:255] if isinstance(value, str) else str(value) if type(value) is int else ""

    def _breaker_for(self, held: InFlight) -> CircuitBreaker:
        return self.keyed.get(held.key) if held.key else self.breaker

    def _key_allows(self, message: Inbound, key: str, now: float) -> tuple[bool, int]:
        """A keyed breaker pauses only its own messages: they wait out the open time in a
        delay tier, uncharged, while other keys keep flowing. Returns (allowed, probe_of)."""
        breaker = self.keyed.get(key)
        state = breaker.state(now)
        if state is BreakerState.CLOSED:
            return True, NOT_A_PROBE
        if state is BreakerState.HALF_OPEN and breaker.allow(now):
            return True, breaker.probe_round
        self._park(
            message, max(breaker.retry_in(now), self.policy.tiers[0]), why="key_circuit_open"
        )
        return False, NOT_A_PROBE

    def _hand_out(
        self,
        session: int,
        info: SessionInfo,
        message: Inbound,
        now: float,
        state: attempts.AttemptState | None = None,
        *,
        probe_of: int = NOT_A_PROBE,
    ) -> Delivery:
        if state is None:
            state = self._read_state(message)
        delivery_id = next(self._ids)
        # Built before anything is registered: a header that cannot be carried to the agent
        # raises here and the message is dead-lettered, with no in-flight entry left behind.
        delivery = Delivery(
            id=delivery_id,
            queue=message.queue,
            body=message.body,
            attempt=state.attempt,
            deadline=self.config.agent.deadline,
            routing_key=message.routing_key,
            exchange=message.exchange,
            headers=headers_json_safe(attempts.agent_headers(message.props.headers)),
            message_id=message.props.message_id,
            content_type=message.props.content_type,
            priority=message.props.priority,
            redelivered=message.redelivered,
            reduced_scope=state.reduced_scope,
        )
        deadline = now + self.config.agent.deadline
        key = self._key_of(message)
        self.in_flight[delivery_id] = InFlight(
            delivery_id,
            message,
            session,
            state,
            now,
            deadline,
            key,
            info.agent,
            info.version,
            probe_of,
        )
        info.in_flight.add(delivery_id)
        self._push_deadline(deadline, delivery_id)
        self.counts["delivered"] += 1
        self._queue_metrics(message.queue).delivered.inc()
        self.metrics.in_flight.set(len(self.in_flight))
        return delivery

    def _queue_metrics(self, queue: str) -> QueueMetrics:
        """Labelled children looked up once per queue, not once per message."""
        found = self._per_queue.get(queue)
        if found is None:
            m = self.metrics
            found = self._per_queue[queue] = QueueMetrics(
                m.delivered.labels(queue),
                m.acked.labels(queue),
                m.processing_seconds.labels(queue, "ack"),
            )
        return found

    def _release(self, delivery_id: int) -> InFlight | None:
        held = self.in_flight.pop(delivery_id, None)
        if held is None:
            return None
        info = self.sessions.get(held.session)
        if info is not None:
            info.in_flight.discard(delivery_id)
        self.metrics.in_flight.set(len(self.in_flight))
        if not self.in_flight:
            self._settled.set()
        return held

    def owned_by(self, session: int, delivery_id: int) -> bool:
        held = self.in_flight.get(delivery_id)
        return held is not None and held.session == session

    def ack(self, session: int, ids: list[int]) -> list[int]:
        """Settle successes; returns the ids that were not held by this session (late
        answers after a timeout, or never handed out)."""
        unknown = []
        now = self.clock()
        for delivery_id in ids:
            if not self.owned_by(session, delivery_id):
                unknown.append(delivery_id)
                continue
            held = self._release(delivery_id)
            assert held is not None
            self._settle(held.message)
            self.counts["acked"] += 1
            per_queue = self._queue_metrics(held.message.queue)
            per_queue.acked.inc()
            per_queue.ack_seconds.observe(now - held.handed_at)
            self._breaker_for(held).record_success(now, probe_of=held.probe_of)
        return unknown

    def _settle(self, message: Inbound, *, requeue: bool = False) -> None:
        if not self.broker.settle(message.generation, message.tag, requeue=requeue):
            self.counts["stale"] += 1
            self.metrics.stale_acks.inc()

    def extend(self, session: int, ids: list[int], seconds: float) -> list[int]:
        unknown = []
        seconds = min(seconds, self.config.agent.max_deadline)
        for delivery_id in ids:
            if not self.owned_by(session, delivery_id):
                unknown.append(delivery_id)
                continue
            held = self.in_flight[delivery_id]
            held.deadline = self.clock() + seconds
            self._push_deadline(held.deadline, delivery_id)
        return unknown

    def fail(
        self,
        session: int,
        delivery_id: int,
        reason: str,
        error: str,
        retry_after: float | None,
    ) -> bool:
        if not self.owned_by(session, delivery_id):
            return False
        held = self._release(delivery_id)
        assert held is not None
        self._charge(held, reason.upper(), error, retry_after)
        return True

    def _charge(self, held: InFlight, reason: str, error: str, retry_after: float | None) -> bool:
        """One failed attempt: breaker bookkeeping, then retry, park or dead-letter. Returns
        whether the attempt was charged (False: requeued by a drain, or parked)."""
        now = self.clock()
        message = held.message
        breaker = self._breaker_for(held)
        if self.draining:
            # Shutdown never dead-letters and never burns an attempt.
            breaker.release_probe(now, probe_of=held.probe_of)
            self._settle(message, requeue=True)
            return False
        if message.generation != self.broker.generation or not self.broker.is_connected:
            # The connection that delivered it is gone and the broker has requeued it: a
            # retry copy would duplicate it, and a lost connection says nothing about the
            # agent, so neither the attempt nor the breaker is charged.
            breaker.release_probe(now, probe_of=held.probe_of)
            self.counts["stale"] += 1
            self.metrics.stale_acks.inc()
            return False
        self.counts["failed"] += 1
        self.metrics.failures.labels(message.queue, reason).inc()
        self.metrics.processing_seconds.labels(message.queue, "fail").observe(now - held.handed_at)
        systemic = self.reasons.counts_for_breaker(reason)
        if (
            systemic
            and held.probe_of == NOT_A_PROBE
            and breaker.state(now) is BreakerState.OPEN
            and _parked_this_attempt(message) == 0
        ):
            # The breaker tripped while this one was in flight: its failure is likely the
            # outage's, so it waits out the open time uncharged, once per attempt. A message
            # that fails again the same way is charged, however often the breaker trips.
            self._park(message, breaker.retry_in(now), why="circuit_open")
            return False
        if systemic:
            trips = breaker.trips
            breaker.record_failure(now, probe_of=held.probe_of)
            if breaker.trips != trips:
                self.metrics.breaker_trips.inc()
                self._breaker_changed.set()
        else:
            # Bad input says nothing about downstream health: neither a failure nor a
            # success for the breaker, but a probe's slot is free again.
            breaker.release_probe(now, probe_of=held.probe_of)
        decision = decide(
            reason, error, held.state.attempt, retry_after, self.policy, self.rng.random()
        )
        try:
            if isinstance(decision, Retry):
                self._retry(message, held.state, reason, error, decision, held.agent_version)
            else:
                self._dead_letter(held, reason, error, decision)
        except Exception as exc:  # the error boundary of one message
            self._malformed(message, exc)
        return True

    def _retry(
        self,
        message: Inbound,
        state: attempts.AttemptState,
        reason: str,
        error: str,
        decision: Retry,
        agent_version: str = "",
    ) -> None:
        now = datetime.now(UTC)
        headers = attempts.after_failure(
            message.props.headers,
            state,
            reason=reason,
            error=error,
            now=now,
            reduced_scope=decision.reduced_scope,
        )
        headers = attempts.with_failures(
            headers, self._failures(message, state.attempt, reason, error, now, agent_version)
        )
        self.counts["retried"] += 1
        self.metrics.retries.labels(message.queue, f"{decision.tier:g}s").inc()
        self.metrics.retry_attempt.labels("retry").observe(state.attempt)
        self._republish(message, headers, decision.tier, decision.delay)

    def _park(self, message: Inbound, wait: float, *, why: str, suspect: bool = False) -> None:
        """Send back through a delay tier without charging an attempt."""
        tier = choose_tier(max(wait, 0.001), self.policy.tiers)
        headers = attempts.uncharged(message.props.headers, suspect=suspect, parked=not suspect)
        delay = min(tier, max(wait, self.policy.tiers[0])) * (
            1 - self.policy.jitter * self.rng.random()
        )
        self.counts["parked"] += 1
        self.metrics.parked.labels(message.queue, why).inc()
        self._republish(message, headers, tier, delay)

    def _republish(
        self, message: Inbound, headers: dict[str, Any], tier: float, delay: float
    ) -> None:
        """Republish to the tier with confirms; ack the original only once confirmed. If the
        publish fails the original stays unacked and comes back (a duplicate, not a loss)."""
        props = MessageProps(**{**_props_kwargs(message.props), "headers": headers})
        props.message_id = message.props.message_id or attempts.stable_id(
            message.queue, None, message.routing_key, message.body, message.props.headers
        )
        props.expiration = str(max(1, round(delay * 1000)))
        if props.delivery_mode is None:
            props.delivery_mode = 2

        def confirmed(error: str | None) -> None:
            if error is None:
                self._settle(message)
            elif error.startswith(UNENCODABLE):
                # It would fail the same way every time: keep it in the DLQ instead.
                self._malformed(message, ValueError(error))
            else:
                # Back to the queue, uncharged: left unacked it would sit with this
                # connection until the next reconnect.
                log.warning("retry publish for %s failed: %s; requeued", message.queue, error)
                self._settle(message, requeue=True)

        self.broker.publish_nowait(
            message.body,
            exchange="",
            routing_key=self.broker.tier_for(message.queue, tier),
            props=props,
            on_done=confirmed,
        )

    def _failures(
        self,
        message: Inbound,
        attempt: int,
        reason: str,
        error: str,
        now: datetime,
        agent_version: str,
    ) -> list[dict[str, Any]]:
        """The message's failure history with this failure added."""
        entry = attempts.failure_entry(
            attempt=attempt,
            reason=reason,
            error=error,
            at=now,
            host=self.config.identity.host,
            agent_version=agent_version,
        )
        return attempts.append_failure(attempts.read_failures(message.props.headers), entry)

    def _dead_letter(self, held: InFlight, reason: str, error: str, decision: DeadLetter) -> None:
        self._write_dead_letter(
            held.message,
            reason=reason,
            error=error or decision.why,
            attempt=held.state.attempt,
            first_failure_at=held.state.first_failure_at,
            agent=held.agent,
            agent_version=held.agent_version,
            signature_error=error,
        )

    def _write_dead_letter(
        self,
        message: Inbound,
        *,
        reason: str,
        error: str,
        attempt: int,
        first_failure_at: datetime | None,
        agent: str,
        agent_version: str,
        signature_error: str | None = None,
    ) -> None:
        now = datetime.now(UTC)
        record = DeadLetterRecord(
            id=attempts.stable_id(
                message.queue,
                message.props.message_id,
                message.routing_key,
                message.body,
                message.props.headers,
            ),
            originalQueue=message.queue,
            payload=payload_from_body(message.body),
            rawBody=message.body,
            failureReason=reason,
            errorMessage=error,
            attemptCount=attempt,
            firstFailureAt=first_failure_at or now,
            lastFailureAt=now,
            processingHost=self.config.identity.host,
            agentVersion=agent_version,
            agentName=agent,
            routingKey=message.routing_key,
            exchange=message.exchange,
            headers=headers_json_safe(attempts.agent_headers(message.props.headers), lenient=True),
            properties=message.props.as_dict(),
            signature=error_signature(
                reason, error if signature_error is None else signature_error
            ),
            deadLetteredAt=now,
            failures=self._failures(message, attempt, reason, error, now, agent_version),
        )
        self.counts["dead_lettered"] += 1
        self.metrics.dead_lettered.labels(message.queue, reason).inc()
        self.metrics.retry_attempt.labels("dead_letter").observe(attempt)
        # The ack happens only after the record is durable (store or local spool).
        self.dlq.submit(record, on_durable=lambda: self._settle(message))

    def close_session(self, session: int, *, crashed: bool) -> None:
        """The agent went away. What it held is charged AGENT_CRASH when it held one message;
        when it held several, none is charged (the healthy ones must not pay for the poison)
        and each comes back as a suspect, handed out alone next time."""
        info = self.sessions.pop(session, None)
        self.metrics.agents.set(len(self.sessions))
        if info is None:
            return
        held = [h for h in map(self._release, sorted(info.in_flight)) if h is not None]
        if not held:
            return
        now = self.clock()
        if self.draining or not crashed:
            for h in held:
                self._breaker_for(h).release_probe(now, probe_of=h.probe_of)
                self._settle(h.message, requeue=True)
            return
        self.counts["crashes"] += 1
        if len(held) == 1:
            self._charge(
                held[0],
                FailureReason.AGENT_CRASH,
                "agent disconnected while holding the message",
                None,
            )
            return
        for h in held:
            self._breaker_for(h).release_probe(now, probe_of=h.probe_of)
            self._park(h.message, self.policy.tiers[0], why="agent_crash", suspect=True)

    # --- deadlines -------------------------------------------------------------------------

    def _push_deadline(self, deadline: float, delivery_id: int) -> None:
        heapq.heappush(self._deadlines, (deadline, delivery_id))
        if len(self._deadlines) > 2 * len(self.in_flight) + 1024:
            # Answered deliveries leave their entry behind until its deadline; rebuild from
            # what is really in flight so the heap stays proportional to it (amortised O(1)).
            self._deadlines = [(h.deadline, i) for i, h in self.in_flight.items()]
            heapq.heapify(self._deadlines)
        if self._deadlines[0][1] == delivery_id:
            self._deadline_changed.set()

    async def watch_deadlines(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Charge TIMEOUT to deliveries not answered by their deadline."""
        task_status.started()
        while True:
            self._deadline_changed = trio.Event()
            if not self._deadlines:
                await self._deadline_changed.wait()
                continue
            with trio.move_on_at(self._deadlines[0][0]):
                await self._deadline_changed.wait()
            now = self.clock()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, delivery_id = heapq.heappop(self._deadlines)
                held = self.in_flight.get(delivery_id)
                if held is None or held.deadline > now:
                    continue  # answered, or extended (a newer heap entry exists)
                self._release(delivery_id)
                self.counts["timeouts"] += 1
                charged = self._charge(
                    held,
                    FailureReason.TIMEOUT,
                    f"no answer within {self.config.agent.deadline:g}s",
                    None,
                )
                # Told after the decision, so the notice can say truthfully what happened.
                self.on_timeout(held.session, delivery_id, charged)

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
                self.broker.inbox_changed.set()
            self._breaker_changed = trio.Event()
            with trio.move_on_after(
                self.breaker.retry_in(now) if state is BreakerState.OPEN else 1.0
            ):
                await self._breaker_changed.wait()

    # --- drain -----------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop handing out work, let in-flight work finish within ``grace``, requeue the
        rest. Never dead-letters."""
        self.draining = True
        self.broker.inbox_changed.set()
        await self.broker.pause()
        for message in self.suspects:
            self._settle(message, requeue=True)
        self.suspects.clear()
        with trio.move_on_after(grace):
            while self.in_flight:
                self._settled = trio.Event()
                await self._settled.wait()
        for delivery_id in list(self.in_flight):
            held = self._release(delivery_id)
            if held is not None:
                self._settle(held.message, requeue=True)
        await self.dlq.flush()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "counts": dict(self.counts),
            "in_flight": len(self.in_flight),
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


def _parked_this_attempt(message: Inbound) -> int:
    """Uncharged parks since the last charged failure (a charge clears the header)."""
    value = message.props.headers.get(attempts.PARKED)
    if not isinstance(value, int | str | bytes):
        return 0
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def _props_kwargs(p: MessageProps) -> dict[str, Any]:
    return {name: getattr(p, name) for name in MessageProps.__slots__}
