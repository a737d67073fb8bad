"""The delivery ledger: which agent holds which message, and what happens to each one.

A state machine without I/O. Events come in as method calls (a pull, an ack, a failure, a
deadline tick, a session closing, a publish confirmed, a dead letter made durable) with the
time and, where a decision needs one, the connection generation that is live; what the
broker and the DLQ writer must do comes back as a list of commands, carried out by the
driver (``sidecar.engine``). The random draws come from the ``random`` function passed in.

Every message taken from the broker ends in exactly one of: acked after the agent's success,
republished to a delay tier (confirmed) before its ack, or written durably to the DLQ store
before its ack. A crash at any point therefore duplicates at worst, never drops.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sidecar import attempts, tracecontext
from sidecar.core.messages import Inbound, Inbox, MessageProps, headers_json_safe
from sidecar.core.port import UNENCODABLE
from sidecar.policy.breaker import NOT_A_PROBE, BreakerState, CircuitBreaker, KeyedBreakers
from sidecar.policy.failure import FailureReason, error_signature
from sidecar.policy.pressure import PressureLevel, adjust_batch_size, batch_allowed
from sidecar.policy.retry import (
    DeadLetter,
    Retry,
    RetryPolicy,
    apply_jitter,
    choose_tier,
    decide,
)
from sidecar.protocol import Delivery
from sidecar.store.records import DeadLetterRecord, payload_from_body

# Dead-letter reason for a broker message the sidecar cannot read or carry to an agent.
MALFORMED_MESSAGE = "MALFORMED_MESSAGE"

# --- commands ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Settle:
    """Ack the message (or hand it back to its queue with ``requeue``)."""

    message: Inbound
    requeue: bool = False


@dataclass(slots=True, frozen=True)
class Republish:
    """Publish a copy with ``props`` to the delay tier ``tier`` of the message's queue,
    with confirms; report the outcome with ``Ledger.confirmed``, which then acks."""

    message: Inbound
    tier: float
    props: MessageProps


@dataclass(slots=True, frozen=True)
class WriteDeadLetter:
    """Write ``record`` durably; report it with ``Ledger.durable``, which then acks."""

    message: Inbound
    record: DeadLetterRecord


@dataclass(slots=True, frozen=True)
class NotifyTimeout:
    """Tell the session that ``delivery_id`` timed out, and whether it was charged."""

    session: int
    delivery_id: int
    charged: bool


@dataclass(slots=True, frozen=True)
class BreakerChanged:
    """The agent-wide or a keyed breaker tripped: consumption may need pausing."""


Command = Settle | Republish | WriteDeadLetter | NotifyTimeout | BreakerChanged
BREAKER_CHANGED = BreakerChanged()


class Meter(Protocol):
    """Where the ledger reports what it counts (metrics live outside the core)."""

    def agents(self, count: int) -> None: ...
    def in_flight(self, count: int) -> None: ...
    def buffered(self, count: int) -> None: ...
    def delivered(self, queue: str) -> None: ...
    def acked(self, queue: str, seconds: float, count: int = 1) -> None:
        """``count`` deliveries of ``queue`` acked, each ``seconds`` after it was handed out."""
        ...

    def failed(self, queue: str, reason: str, seconds: float) -> None: ...
    def retried(self, queue: str, tier: float, attempt: int) -> None: ...
    def parked(self, queue: str, why: str) -> None: ...
    def dead_lettered(self, queue: str, reason: str, attempt: int) -> None: ...
    def malformed(self, what: str, count: int = 1) -> None: ...
    def stale(self) -> None: ...
    def breaker_tripped(self) -> None: ...


class NoMeter:
    """A ``Meter`` that counts nothing."""

    def agents(self, count: int) -> None:
        pass

    def in_flight(self, count: int) -> None:
        pass

    def buffered(self, count: int) -> None:
        pass

    def delivered(self, queue: str) -> None:
        pass

    def acked(self, queue: str, seconds: float, count: int = 1) -> None:
        pass

    def failed(self, queue: str, reason: str, seconds: float) -> None:
        pass

    def retried(self, queue: str, tier: float, attempt: int) -> None:
        pass

    def parked(self, queue: str, why: str) -> None:
        pass

    def dead_lettered(self, queue: str, reason: str, attempt: int) -> None:
        pass

    def malformed(self, what: str, count: int = 1) -> None:
        pass

    def stale(self) -> None:
        pass

    def breaker_tripped(self) -> None:
        pass


# --- state -------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Moment:
    """When an event happens: ``now`` on the monotonic clock (deadlines, breakers), ``wall``
    for what is written down (failure history, dead letters), and ``live``, the broker
    connection generation whose deliveries can still be settled (None while disconnected)."""

    now: float
    wall: datetime
    live: int | None = None


@dataclass(slots=True, frozen=True)
class LedgerSettings:
    """What the ledger needs from the configuration, read once."""

    deadline: float
    max_deadline: float
    max_in_flight: int
    batch_size: int
    key_header: str = ""
    host: str = ""


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


@dataclass(slots=True)
class SessionInfo:
    agent: str
    version: str
    pid: int | None
    in_flight: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Pulled:
    """What a pull produced: deliveries for the agent, and commands for the driver."""

    deliveries: list[Delivery]
    commands: list[Command]


COUNTS = (
    "delivered",
    "acked",
    "failed",
    "retried",
    "dead_lettered",
    "timeouts",
    "crashes",
    "parked",
    "stale",
    "malformed",
    "ignored_headers",
)


class Ledger:
    def __init__(
        self,
        settings: LedgerSettings,
        policy: RetryPolicy,
        breaker: CircuitBreaker,
        keyed: KeyedBreakers,
        *,
        random: Callable[[], float],
        meter: Meter | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.reasons = policy.reasons
        self.breaker = breaker
        self.keyed = keyed
        self.random = random
        self.meter: Meter = meter or NoMeter()
        self.pressure = PressureLevel.NORMAL
        self.draining = False
        self.in_flight: dict[int, InFlight] = {}
        self.sessions: dict[int, SessionInfo] = {}
        self.suspects: list[Inbound] = []
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self._ids = itertools.count(1)
        # One heap entry per pull: (deadline, sequence, ids). A pull's deliveries share one
        # deadline, so they share an entry; an extension pushes an entry for its ids alone.
        # An entry may name ids already answered or extended: tick checks each against
        # in_flight, whose deadline is the truth.
        self._deadlines: list[tuple[float, int, list[int]]] = []
        self._deadline_entries = itertools.count()
        # Set when the earliest deadline moved earlier; the driver's timer reads and clears it.
        self.deadline_moved = False

    # --- views -----------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return adjust_batch_size(self.pressure, self.settings.batch_size)

    def owned_by(self, session: int, delivery_id: int) -> bool:
        held = self.in_flight.get(delivery_id)
        return held is not None and held.session == session

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def breaker_for(self, held: InFlight) -> CircuitBreaker:
        return self.keyed.get(held.key) if held.key else self.breaker

    # --- sessions --------------------------------------------------------------------------

    def open_session(self, session: int, agent: str, version: str, pid: int | None) -> None:
        self.sessions[session] = SessionInfo(agent=agent, version=version, pid=pid)
        self.meter.agents(len(self.sessions))

    def close_session(self, session: int, *, crashed: bool, at: Moment) -> list[Command]:
        """The agent went away. What it held is charged AGENT_CRASH when it held one message;
        when it held several, none is charged (the healthy ones must not pay for the poison)
        and each comes back as a suspect, handed out alone next time."""
        info = self.sessions.pop(session, None)
        self.meter.agents(len(self.sessions))
        if info is None:
            return []
        held = [h for h in map(self._release, sorted(info.in_flight)) if h is not None]
        if not held:
            return []
        out: list[Command] = []
        now = at.now
        if self.draining or not crashed:
            for h in held:
                self.breaker_for(h).release_probe(now, probe_of=h.probe_of)
                out.append(Settle(h.message, requeue=True))
            return out
        self.counts["crashes"] += 1
        if len(held) == 1:
            self._charge(
                out,
                held[0],
                FailureReason.AGENT_CRASH,
                "agent disconnected while holding the message",
                None,
                at,
            )
            return out
        for h in held:
            self.breaker_for(h).release_probe(now, probe_of=h.probe_of)
            self._park(out, h.message, self.policy.tiers[0], why="agent_crash", suspect=True)
        return out

    # --- handing out -----------------------------------------------------------------------

    def pull(self, session: int, want: int, inbox: Inbox, *, at: Moment) -> Pulled:
        """Up to ``want`` deliveries for ``session`` (capped by the batch size the pressure
        allows, the session's in-flight limit and the breakers), taken from ``inbox``. The
        caller checks first that the daemon accepts work at all."""
        pulled = Pulled([], [])
        now, wall = at.now, at.wall
        info = self.sessions.get(session)
        if info is None or self.draining or not batch_allowed(self.pressure):
            return pulled
        limit = min(want, self.batch_size, self.settings.max_in_flight - len(info.in_flight))
        if limit <= 0:
            return pulled
        state = self.breaker.state(now)
        if state is BreakerState.OPEN:
            return pulled
        out = pulled.deliveries
        deadline = now + self.settings.deadline
        # A suspect (held by an agent that crashed with several messages) goes alone, to
        # an agent holding nothing else: if it is the poison, only it gets charged.
        if self.suspects and not info.in_flight:
            probe_of = NOT_A_PROBE
            if state is BreakerState.HALF_OPEN:
                if not self.breaker.allow(now):
                    return pulled
                probe_of = self.breaker.probe_round
            suspect = self.suspects.pop(0)
            try:
                out.append(self._hand_out(session, info, suspect, now, probe_of=probe_of))
            except Exception as exc:  # the error boundary of one message
                if probe_of != NOT_A_PROBE:
                    self.breaker.release_probe(now, probe_of=probe_of)
                self._malformed(pulled.commands, suspect, exc, wall)
            if out:
                self._push_deadline(deadline, [out[0].id])
            return pulled
        while len(out) < limit and (message := inbox.peek()) is not None:
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
                inbox.pop()
                message_state = self._read_state(message)
                if message_state.suspect:
                    if probe_of != NOT_A_PROBE:
                        self.breaker.release_probe(now, probe_of=probe_of)
                    self.suspects.append(message)
                    continue
                if key:
                    allowed, probe_of = self._key_allows(pulled.commands, message, key, now)
                    if not allowed:
                        continue
                out.append(
                    self._hand_out(
                        session, info, message, now, message_state, probe_of=probe_of, key=key
                    )
                )
            except Exception as exc:  # the error boundary of one message
                if probe_of != NOT_A_PROBE:
                    # Its probe slot is free again: the message never reached the agent.
                    breaker = self.keyed.get(key) if key else self.breaker
                    breaker.release_probe(now, probe_of=probe_of)
                if inbox.peek() is message:
                    inbox.pop()
                self._malformed(pulled.commands, message, exc, wall)
        if out:
            self._push_deadline(deadline, [delivery.id for delivery in out])
        self.meter.buffered(len(inbox))
        return pulled

    def headers_repaired(self, count: int) -> None:
        """Header values the AMQP decoder could not read and replaced."""
        self.counts["ignored_headers"] += count
        self.meter.malformed("amqp_value", count)

    def _read_state(self, message: Inbound) -> attempts.AttemptState:
        state = attempts.read_state(message.props.headers)
        for name in state.ignored:
            self.counts["ignored_headers"] += 1
            self.meter.malformed(name)
        return state

    def _key_of(self, message: Inbound) -> str:
        """The breaker key (for example the target host) a message carries, if keyed."""
        if not self.settings.key_header:
            return ""
        value = message.props.headers.get(self.settings.key_header, "")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        # Only plain scalars key a breaker; anything else (a table, a list) is unkeyed.
        return value[:255] if isinstance(value, str) else str(value) if type(value) is int else ""

    def _key_allows(
        self, out: list[Command], message: Inbound, key: str, now: float
    ) -> tuple[bool, int]:
        """A keyed breaker pauses only its own messages: they wait out the open time in a
        delay tier, uncharged, while other keys keep flowing. Returns (allowed, probe_of)."""
        breaker = self.keyed.get(key)
        state = breaker.state(now)
        if state is BreakerState.CLOSED:
            return True, NOT_A_PROBE
        if state is BreakerState.HALF_OPEN and breaker.allow(now):
            return True, breaker.probe_round
        wait = max(breaker.retry_in(now), self.policy.tiers[0])
        self._park(out, message, wait, why="key_circuit_open")
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
        key: str | None = None,
    ) -> Delivery:
        if state is None:
            state = self._read_state(message)
        if key is None:
            key = self._key_of(message)
        headers = message.props.headers
        delivery_id = next(self._ids)
        deadline_after = self.settings.deadline
        # Built before anything is registered: a header that cannot be carried to the agent
        # raises here and the message is dead-lettered, with no in-flight entry left behind.
        delivery = Delivery(
            id=delivery_id,
            queue=message.queue,
            body=message.body,
            attempt=state.attempt,
            deadline=deadline_after,
            routing_key=message.routing_key,
            exchange=message.exchange,
            # Most messages carry no headers at all: nothing to filter or convert.
            headers=headers_json_safe(attempts.agent_headers(headers)) if headers else {},
            message_id=message.props.message_id,
            content_type=message.props.content_type,
            priority=message.props.priority,
            redelivered=message.redelivered,
            reduced_scope=state.reduced_scope,
        )
        deadline = now + deadline_after
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
        # The caller pushes one deadline entry for all it handed out.
        self.counts["delivered"] += 1
        self.meter.delivered(message.queue)
        self.meter.in_flight(len(self.in_flight))
        return delivery

    def _release(self, delivery_id: int) -> InFlight | None:
        held = self.in_flight.pop(delivery_id, None)
        if held is None:
            return None
        info = self.sessions.get(held.session)
        if info is not None:
            info.in_flight.discard(delivery_id)
        self.meter.in_flight(len(self.in_flight))
        return held

    # --- answers from the agent ------------------------------------------------------------

    def ack(self, session: int, ids: list[int], *, now: float) -> tuple[list[int], list[Command]]:
        """Settle successes. Returns the ids that were not held by this session (late
        answers after a timeout, or never handed out), and the acks to send.

        A batch's acks are counted together: deliveries handed out by one pull (same queue,
        same hand-out time) are one meter call, and consecutive unkeyed non-probe successes
        one breaker call, in the order the answers came (a probe's success may close the
        breaker mid-batch)."""
        unknown = []
        out: list[Command] = []
        in_flight = self.in_flight
        meter = self.meter
        plain = 0  # unkeyed non-probe successes not yet told to the agent-wide breaker
        group_queue = ""
        group_handed = 0.0
        group = 0  # acks of one queue handed out at one time, not yet metered
        for delivery_id in ids:
            held = in_flight.get(delivery_id)
            if held is None or held.session != session:
                unknown.append(delivery_id)
                continue
            self._release(delivery_id)
            message = held.message
            out.append(Settle(message))
            if held.key or held.probe_of != NOT_A_PROBE:
                self.breaker.record_successes(now, plain)
                plain = 0
                self.breaker_for(held).record_success(now, probe_of=held.probe_of)
            else:
                plain += 1
            if group and message.queue == group_queue and held.handed_at == group_handed:
                group += 1
            else:
                if group:
                    meter.acked(group_queue, now - group_handed, group)
                group_queue, group_handed, group = message.queue, held.handed_at, 1
        if group:
            meter.acked(group_queue, now - group_handed, group)
        self.breaker.record_successes(now, plain)
        self.counts["acked"] += len(out)
        return unknown, out

    def extend(self, session: int, ids: list[int], seconds: float, *, now: float) -> list[int]:
        """Move the deadlines of ``ids``; returns the ids this session does not hold."""
        unknown = []
        seconds = min(seconds, self.settings.max_deadline)
        for delivery_id in ids:
            if not self.owned_by(session, delivery_id):
                unknown.append(delivery_id)
                continue
            held = self.in_flight[delivery_id]
            held.deadline = now + seconds
            self._push_deadline(held.deadline, [delivery_id])
        return unknown

    def fail(
        self,
        session: int,
        delivery_id: int,
        reason: str,
        error: str,
        retry_after: float | None,
        *,
        at: Moment,
    ) -> list[Command] | None:
        """A failure reported by the agent; None when this session does not hold it.
        ``reason`` is a reason the ``ReasonBook`` accepts, already in canonical form."""
        if not self.owned_by(session, delivery_id):
            return None
        held = self._release(delivery_id)
        assert held is not None
        out: list[Command] = []
        self._charge(out, held, reason, error, retry_after, at)
        return out

    def _charge(
        self,
        out: list[Command],
        held: InFlight,
        reason: str,
        error: str,
        retry_after: float | None,
        at: Moment,
    ) -> bool:
        """One failed attempt: breaker bookkeeping, then retry, park or dead-letter. Returns
        whether the attempt was charged (False: requeued by a drain, or parked). ``live`` is
        the connection generation now up, None while disconnected."""
        now, wall = at.now, at.wall
        message = held.message
        breaker = self.breaker_for(held)
        if self.draining:
            # Shutdown never dead-letters and never burns an attempt.
            breaker.release_probe(now, probe_of=held.probe_of)
            out.append(Settle(message, requeue=True))
            return False
        if message.generation != at.live:
            # The connection that delivered it is gone and the broker has requeued it: a
            # retry copy would duplicate it, and a lost connection says nothing about the
            # agent, so neither the attempt nor the breaker is charged.
            breaker.release_probe(now, probe_of=held.probe_of)
            self.settle_refused()
            return False
        self.counts["failed"] += 1
        self.meter.failed(message.queue, reason, now - held.handed_at)
        systemic = self.reasons.counts_for_breaker(reason)
        if (
            systemic
            and held.probe_of == NOT_A_PROBE
            and breaker.state(now) is BreakerState.OPEN
            and parked_this_attempt(message) == 0
        ):
            # The breaker tripped while this one was in flight: its failure is likely the
            # outage's, so it waits out the open time uncharged, once per attempt. A message
            # that fails again the same way is charged, however often the breaker trips.
            self._park(out, message, breaker.retry_in(now), why="circuit_open")
            return False
        if systemic:
            trips = breaker.trips
            breaker.record_failure(now, probe_of=held.probe_of)
            if breaker.trips != trips:
                self.meter.breaker_tripped()
                out.append(BREAKER_CHANGED)
        else:
            # Bad input says nothing about downstream health: neither a failure nor a
            # success for the breaker, but a probe's slot is free again.
            breaker.release_probe(now, probe_of=held.probe_of)
        decision = decide(
            reason, error, held.state.attempt, retry_after, self.policy, self.random()
        )
        try:
            if isinstance(decision, Retry):
                self._retry(out, held, reason, error, decision, wall)
            else:
                self._dead_letter(out, held, reason, error, decision, wall)
        except Exception as exc:  # the error boundary of one message
            self._malformed(out, message, exc, wall)
        return True

    def _retry(
        self,
        out: list[Command],
        held: InFlight,
        reason: str,
        error: str,
        decision: Retry,
        wall: datetime,
    ) -> None:
        message, state = held.message, held.state
        headers = attempts.after_failure(
            message.props.headers,
            state,
            reason=reason,
            error=error,
            now=wall,
            reduced_scope=decision.reduced_scope,
        )
        history = self._failures(message, state.attempt, reason, error, wall, held.agent_version)
        headers = attempts.with_failures(headers, history)
        self.counts["retried"] += 1
        self.meter.retried(message.queue, decision.tier, state.attempt)
        self._republish(out, message, headers, decision.tier, decision.delay)

    def _park(
        self, out: list[Command], message: Inbound, wait: float, *, why: str, suspect: bool = False
    ) -> None:
        """Send back through a delay tier without charging an attempt."""
        tier = choose_tier(max(wait, 0.001), self.policy.tiers)
        headers = attempts.uncharged(message.props.headers, suspect=suspect, parked=not suspect)
        delay = apply_jitter(
            min(tier, max(wait, self.policy.tiers[0])), self.policy.jitter, self.random()
        )
        self.counts["parked"] += 1
        self.meter.parked(message.queue, why)
        self._republish(out, message, headers, tier, delay)

    @staticmethod
    def _republish(
        out: list[Command], message: Inbound, headers: dict[str, Any], tier: float, delay: float
    ) -> None:
        props = message.props.replace_headers(headers)
        props.message_id = message.props.message_id or attempts.stable_id(
            message.queue, None, message.routing_key, message.body, message.props.headers
        )
        props.expiration = str(max(1, round(delay * 1000)))
        if props.delivery_mode is None:
            props.delivery_mode = 2
        out.append(Republish(message, tier, props))

    def _failures(
        self,
        message: Inbound,
        attempt: int,
        reason: str,
        error: str,
        wall: datetime,
        agent_version: str,
    ) -> list[dict[str, Any]]:
        """The message's failure history with this failure added."""
        entry = attempts.failure_entry(
            attempt=attempt,
            reason=reason,
            error=error,
            at=wall,
            host=self.settings.host,
            agent_version=agent_version,
        )
        return attempts.append_failure(attempts.read_failures(message.props.headers), entry)

    def _dead_letter(
        self,
        out: list[Command],
        held: InFlight,
        reason: str,
        error: str,
        decision: DeadLetter,
        wall: datetime,
    ) -> None:
        self._write_dead_letter(
            out,
            held.message,
            reason=reason,
            error=error or decision.why,
            attempt=held.state.attempt,
            first_failure_at=held.state.first_failure_at,
            agent=held.agent,
            agent_version=held.agent_version,
            wall=wall,
            signature_error=error,
        )

    def _malformed(
        self, out: list[Command], message: Inbound, exc: BaseException, wall: datetime
    ) -> None:
        """A message whose bytes, headers or properties we cannot handle: dead-lettered
        with what can be read of it (raw body, readable headers), acked once durable. It
        must never reach the supervisor, or every restart would crash on it again."""
        self.counts["malformed"] += 1
        self.meter.malformed("message")
        # Last resort if even that fails: requeueing would loop, so it is left unacked and
        # the broker hands it back after the next reconnect.
        with contextlib.suppress(Exception):
            self._write_dead_letter(
                out,
                message,
                reason=MALFORMED_MESSAGE,
                error=f"{type(exc).__name__}: {str(exc)[:500]}",
                attempt=1,
                first_failure_at=None,
                agent="",
                agent_version="",
                wall=wall,
            )

    def _write_dead_letter(
        self,
        out: list[Command],
        message: Inbound,
        *,
        reason: str,
        error: str,
        attempt: int,
        first_failure_at: datetime | None,
        agent: str,
        agent_version: str,
        wall: datetime,
        signature_error: str | None = None,
    ) -> None:
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
            firstFailureAt=first_failure_at or wall,
            lastFailureAt=wall,
            processingHost=self.settings.host,
            agentVersion=agent_version,
            agentName=agent,
            routingKey=message.routing_key,
            exchange=message.exchange,
            headers=headers_json_safe(attempts.agent_headers(message.props.headers), lenient=True),
            properties=message.props.as_dict(),
            signature=error_signature(
                reason, error if signature_error is None else signature_error
            ),
            deadLetteredAt=wall,
            failures=self._failures(message, attempt, reason, error, wall, agent_version),
            traceId=tracecontext.trace_id(message.props.headers),
        )
        self.counts["dead_lettered"] += 1
        self.meter.dead_lettered(message.queue, reason, attempt)
        out.append(WriteDeadLetter(message, record))

    # --- outcomes of commands --------------------------------------------------------------

    def confirmed(self, message: Inbound, error: str | None, *, at: Moment) -> list[Command]:
        """The outcome of a ``Republish``: ack the original once its copy is confirmed. If
        the publish failed the original is requeued (a duplicate later, not a loss)."""
        if error is None:
            return [Settle(message)]
        out: list[Command] = []
        if error.startswith(UNENCODABLE):
            # It would fail the same way every time: keep it in the DLQ instead.
            self._malformed(out, message, ValueError(error), at.wall)
        else:
            # Back to the queue, uncharged: left unacked it would sit with this connection
            # until the next reconnect.
            out.append(Settle(message, requeue=True))
        return out

    @staticmethod
    def durable(message: Inbound) -> list[Command]:
        """A ``WriteDeadLetter`` reached the store (or the local spool): ack the original."""
        return [Settle(message)]

    def settle_refused(self) -> None:
        """An ack or requeue was not sent: its connection generation is gone."""
        self.counts["stale"] += 1
        self.meter.stale()

    # --- deadlines -------------------------------------------------------------------------

    def _push_deadline(self, deadline: float, ids: list[int]) -> None:
        """One heap entry for ``ids``, all due at ``deadline``."""
        entry = (deadline, next(self._deadline_entries), ids)
        heapq.heappush(self._deadlines, entry)
        if len(self._deadlines) > 2 * len(self.in_flight) + 1024:
            # Answered deliveries leave their entry behind until its deadline; rebuild from
            # what is really in flight so the heap stays proportional to it (amortised O(1)).
            entries = self._deadline_entries
            self._deadlines = [(h.deadline, next(entries), [i]) for i, h in self.in_flight.items()]
            heapq.heapify(self._deadlines)
            self.deadline_moved = True  # the timer re-reads the earliest; rare and harmless
        elif self._deadlines[0] is entry:
            self.deadline_moved = True

    def tick(self, *, at: Moment) -> list[Command]:
        """Charge TIMEOUT to deliveries not answered by their deadline."""
        out: list[Command] = []
        now = at.now
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, ids = heapq.heappop(self._deadlines)
            for delivery_id in ids:
                held = self.in_flight.get(delivery_id)
                if held is None or held.deadline > now:
                    continue  # answered, or extended (a newer heap entry exists)
                self._release(delivery_id)
                self.counts["timeouts"] += 1
                charged = self._charge(
                    out,
                    held,
                    FailureReason.TIMEOUT,
                    f"no answer within {self.settings.deadline:g}s",
                    None,
                    at,
                )
                # Told after the decision, so the notice can say truthfully what happened.
                out.append(NotifyTimeout(held.session, delivery_id, charged))
        return out

    # --- drain -----------------------------------------------------------------------------

    def start_drain(self) -> list[Command]:
        """Stop handing out work; suspects go back to their queue."""
        self.draining = True
        out: list[Command] = [Settle(m, requeue=True) for m in self.suspects]
        self.suspects.clear()
        return out

    def finish_drain(self) -> list[Command]:
        """The grace is over: whatever is still held goes back to its queue."""
        out: list[Command] = []
        for delivery_id in list(self.in_flight):
            held = self._release(delivery_id)
            if held is not None:
                out.append(Settle(held.message, requeue=True))
        return out


def parked_this_attempt(message: Inbound) -> int:
    """Uncharged parks since the last charged failure (a charge clears the header)."""
    value = message.props.headers.get(attempts.PARKED)
    if not isinstance(value, int | str | bytes):
        return 0
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0
