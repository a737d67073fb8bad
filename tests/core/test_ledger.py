"""The delivery ledger without a broker: events in, commands out, time given by the test."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sidecar import attempts
from sidecar.config import load_config
from sidecar.core.ledger import (
    MALFORMED_MESSAGE,
    BreakerChanged,
    Command,
    Ledger,
    LedgerSettings,
    Moment,
    NotifyTimeout,
    Republish,
    Settle,
    WriteDeadLetter,
)
from sidecar.core.messages import Inbound, Inbox, MessageProps
from sidecar.core.port import UNENCODABLE
from sidecar.limits import MAX_NESTING
from sidecar.policies import breaker_config_from, retry_policy_from
from sidecar.policy.breaker import BreakerState, CircuitBreaker, KeyedBreakers

WALL = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
GEN = 1
DEADLINE = 30.0


def at(now: float, live: int | None = GEN) -> Moment:
    return Moment(now, WALL, live)


def make_ledger(draw: float = 0.5, **overrides: Any) -> Ledger:
    config = load_config(environ={}, overrides=overrides)
    breakers = breaker_config_from(config)
    return Ledger(
        LedgerSettings(
            deadline=DEADLINE,
            max_deadline=120.0,
            max_in_flight=100,
            batch_size=10,
            key_header=config.breaker.key_header,
            host="test-host",
        ),
        retry_policy_from(config),
        CircuitBreaker(breakers),
        KeyedBreakers(breakers),
        random=lambda: draw,
    )


def message(
    tag: int, headers: dict[str, Any] | None = None, *, generation: int = GEN, body: bytes = b""
) -> Inbound:
    return Inbound(
        generation=generation,
        tag=tag,
        queue="work",
        body=body or f"m{tag}".encode(),
        props=MessageProps(headers=headers or {}),
        routing_key="work",
        exchange="",
        redelivered=False,
    )


def inbox_of(*messages: Inbound, generation: int = GEN) -> Inbox:
    inbox = Inbox()
    inbox.start_generation(generation)
    for m in messages:
        inbox.append(m)
    return inbox


def only(commands: list[Command], kind: type) -> list[Any]:
    return [c for c in commands if isinstance(c, kind)]


def test_ack_settles_the_original_and_unknown_ids_come_back():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    pulled = ledger.pull(1, 5, inbox_of(message(1), message(2)), at=at(0.0))
    assert [d.body for d in pulled.deliveries] == [b"m1", b"m2"]
    assert pulled.commands == []
    first, second = pulled.deliveries
    unknown, commands = ledger.ack(1, [first.id, 999], now=1.0)
    assert unknown == [999]
    (settle,) = commands
    assert settle == Settle(settle.message) and settle.message.tag == 1
    # Another session cannot answer for a delivery it does not hold.
    ledger.open_session(2, "b", "1.0", None)
    assert ledger.ack(2, [second.id], now=1.0) == ([second.id], [])
    assert ledger.counts["acked"] == 1 and list(ledger.in_flight) == [second.id]


def test_a_pull_stops_at_the_batch_size_and_the_in_flight_limit():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(*(message(i) for i in range(1, 30)))
    assert len(ledger.pull(1, 50, inbox, at=at(0.0)).deliveries) == 10  # batch size
    assert len(inbox) == 19
    ledger.settings = LedgerSettings(
        deadline=DEADLINE, max_deadline=120.0, max_in_flight=12, batch_size=10
    )
    assert len(ledger.pull(1, 50, inbox, at=at(0.0)).deliveries) == 2  # 12 in flight at most


def test_messages_of_an_older_generation_are_skipped_not_handed_out():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(message(1, generation=1), message(2, generation=2), generation=2)
    pulled = ledger.pull(1, 5, inbox, at=at(0.0, live=2))
    assert [d.body for d in pulled.deliveries] == [b"m2"]
    assert len(inbox) == 0


def test_an_unanswered_delivery_is_charged_timeout_at_its_deadline():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    assert ledger.deadline_moved and ledger.next_deadline() == DEADLINE
    assert ledger.tick(at=at(DEADLINE - 0.001)) == []
    commands = ledger.tick(at=at(DEADLINE))
    (republish,) = only(commands, Republish)
    assert only(commands, NotifyTimeout) == [NotifyTimeout(1, delivery.id, True)]
    assert republish.props.headers[attempts.LAST_REASON] == "TIMEOUT"
    assert republish.props.headers[attempts.ATTEMPTS] == 1
    assert ledger.counts["timeouts"] == 1 and not ledger.in_flight
    # The late answer is refused: the delivery is no longer held.
    assert ledger.ack(1, [delivery.id], now=DEADLINE + 1) == ([delivery.id], [])


def test_an_extension_moves_the_deadline_up_to_the_maximum():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    assert ledger.extend(1, [delivery.id, 77], 1000.0, now=10.0) == [77]
    assert ledger.tick(at=at(DEADLINE)) == []  # the old heap entry is ignored
    assert ledger.in_flight[delivery.id].deadline == 130.0  # max_deadline 120 after t=10
    assert only(ledger.tick(at=at(130.0)), NotifyTimeout)


def test_a_failure_retries_through_a_tier_and_acks_only_once_confirmed():
    ledger = make_ledger(draw=0.5)
    ledger.open_session(1, "a", "2.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    commands = ledger.fail(1, delivery.id, "PROCESSING_ERROR", "boom", None, at=at(1.0))
    assert commands is not None
    (republish,) = commands
    assert isinstance(republish, Republish)
    assert republish.tier == 1.0  # base delay 1s
    assert republish.props.expiration == str(round(1.0 * (1 - 0.2 * 0.5) * 1000))
    assert republish.props.delivery_mode == 2
    (entry,) = attempts.read_failures(republish.props.headers)
    assert entry["reason"] == "PROCESSING_ERROR" and entry["agentVersion"] == "2.0"
    assert republish.message.props.headers == {}  # the original is left as delivered
    assert ledger.confirmed(republish.message, None, at=at(1.1)) == [Settle(republish.message)]
    requeue = ledger.confirmed(republish.message, "connection lost", at=at(1.1))
    assert requeue == [Settle(republish.message, requeue=True)]


def test_the_last_attempt_is_dead_lettered_and_acked_once_durable():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    tired = message(1, {attempts.ATTEMPTS: 2, attempts.FIRST_FAILURE_AT: "2025-12-31T00:00:00Z"})
    (delivery,) = ledger.pull(1, 1, inbox_of(tired), at=at(0.0)).deliveries
    assert delivery.attempt == 3
    commands = ledger.fail(1, delivery.id, "PROCESSING_ERROR", "still down", None, at=at(1.0))
    assert commands is not None
    (write,) = commands
    assert isinstance(write, WriteDeadLetter)
    assert write.record.failureReason == "PROCESSING_ERROR"
    assert write.record.attemptCount == 3
    assert write.record.lastFailureAt == WALL
    assert write.record.processingHost == "test-host"
    assert ledger.durable(write.message) == [Settle(write.message)]


def test_a_permanent_reason_is_dead_lettered_at_once():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    commands = ledger.fail(1, delivery.id, "VALIDATION_FAILED", "bad field", None, at=at(1.0))
    assert commands is not None
    assert [type(c) for c in commands] == [WriteDeadLetter]


def test_a_failure_on_a_lost_connection_is_neither_charged_nor_retried():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    # The broker reconnected (generation 2): the original is requeued by the broker already.
    assert ledger.fail(1, delivery.id, "PROCESSING_ERROR", "x", None, at=at(1.0, live=2)) == []
    assert ledger.counts["stale"] == 1 and ledger.counts["failed"] == 0
    (d2,) = ledger.pull(1, 1, inbox_of(message(2)), at=at(2.0)).deliveries
    commands = ledger.tick(at=at(2.0 + DEADLINE, live=None))  # disconnected
    assert commands == [NotifyTimeout(1, d2.id, False)]


def test_a_crash_with_one_message_charges_it_agent_crash():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0))
    (republish,) = ledger.close_session(1, crashed=True, at=at(1.0))
    assert isinstance(republish, Republish)
    assert republish.props.headers[attempts.LAST_REASON] == "AGENT_CRASH"
    assert ledger.counts["crashes"] == 1 and not ledger.sessions


def test_a_clean_close_requeues_what_the_agent_held():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0))
    commands = ledger.close_session(1, crashed=False, at=at(1.0))
    assert [(c.message.tag, c.requeue) for c in commands] == [(1, True), (2, True)]


def test_suspects_come_back_uncharged_and_go_alone_to_an_idle_agent():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 3, inbox_of(message(1), message(2), message(3)), at=at(0.0))
    parked = ledger.close_session(1, crashed=True, at=at(1.0))
    assert [type(c) for c in parked] == [Republish] * 3
    for command in parked:
        assert command.props.headers[attempts.SUSPECT] == 1
        assert attempts.ATTEMPTS not in command.props.headers  # nobody was charged
    assert ledger.counts["parked"] == 3
    # They come back from the tier: the suspects are held aside, ordinary work flows.
    back = [message(10 + i, c.props.headers) for i, c in enumerate(parked)]
    ledger.open_session(2, "b", "1.0", None)
    pulled = ledger.pull(2, 10, inbox_of(*back, message(20)), at=at(5.0))
    assert [d.body for d in pulled.deliveries] == [b"m20"]
    assert len(ledger.suspects) == 3
    # While b holds something, no suspect is handed to it.
    assert ledger.pull(2, 10, inbox_of(), at=at(5.0)).deliveries == []
    ledger.ack(2, [pulled.deliveries[0].id], now=6.0)
    alone = ledger.pull(2, 10, inbox_of(message(21)), at=at(6.0)).deliveries
    assert [d.body for d in alone] == [b"m10"]


def trip(ledger: Ledger, now: float) -> list[Command]:
    """Fail enough fresh messages to open the agent-wide breaker."""
    out: list[Command] = []
    ledger.open_session(99, "tripper", "1.0", None)
    threshold = ledger.breaker.config.failure_threshold
    inbox = inbox_of(*(message(1000 + i) for i in range(threshold)))
    for d in ledger.pull(99, threshold, inbox, at=at(now)).deliveries:
        out += ledger.fail(99, d.id, "NETWORK_ERROR", "503", None, at=at(now)) or []
    return out


def test_a_failure_after_the_breaker_tripped_is_parked_once_per_attempt():
    ledger = make_ledger(breaker={"failure_threshold": 2, "open_timeout": 10.0})
    ledger.open_session(1, "a", "1.0", None)
    (held,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    assert only(trip(ledger, 1.0), BreakerChanged)
    assert ledger.breaker.state(1.0) is BreakerState.OPEN
    (park,) = ledger.fail(1, held.id, "NETWORK_ERROR", "503", None, at=at(2.0)) or []
    assert isinstance(park, Republish)
    assert park.props.headers[attempts.PARKED] == 1
    assert attempts.ATTEMPTS not in park.props.headers
    assert park.tier == 30.0  # the 8s left of the open time, rounded up to a tier
    # While the breaker is open nothing is handed out.
    assert ledger.pull(1, 5, inbox_of(message(2)), at=at(3.0)).deliveries == []
    # The breaker closes again (a probe succeeds); the parked copy comes back.
    (probe,) = ledger.pull(1, 1, inbox_of(message(5)), at=at(11.0)).deliveries
    ledger.ack(1, [probe.id], now=11.0)
    assert ledger.breaker.state(11.0) is BreakerState.CLOSED
    back = message(1, park.props.headers)
    (again,) = ledger.pull(1, 1, inbox_of(back), at=at(12.0)).deliveries
    # The breaker trips again while it is in flight, and it fails the same way: this time
    # it is charged, however often the breaker trips.
    trip(ledger, 13.0)
    assert ledger.breaker.state(13.0) is BreakerState.OPEN
    (charged,) = ledger.fail(1, again.id, "NETWORK_ERROR", "503", None, at=at(13.0)) or []
    assert isinstance(charged, Republish)
    assert charged.props.headers[attempts.ATTEMPTS] == 1
    assert attempts.PARKED not in charged.props.headers


def test_half_open_hands_out_only_the_probes_and_their_answer_closes_it():
    ledger = make_ledger(breaker={"failure_threshold": 2, "open_timeout": 10.0})
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(*(message(i) for i in range(1, 6)))
    (probe,) = ledger.pull(1, 5, inbox, at=at(10.0)).deliveries
    assert len(inbox) == 4  # the rest wait for the probe's answer
    assert ledger.pull(1, 5, inbox, at=at(10.5)).deliveries == []
    ledger.ack(1, [probe.id], now=11.0)
    assert ledger.breaker.state(11.0) is BreakerState.CLOSED
    assert len(ledger.pull(1, 5, inbox, at=at(11.0)).deliveries) == 4


def test_a_keyed_breaker_parks_only_its_own_key():
    ledger = make_ledger(breaker={"key_header": "host", "failure_threshold": 1})
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"host": "down"})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    assert ledger.keyed.open_keys(0.5) == ["down"]
    inbox = inbox_of(message(2, {"host": "down"}), message(3, {"host": "up"}), message(4))
    pulled = ledger.pull(1, 5, inbox, at=at(1.0))
    assert [d.body for d in pulled.deliveries] == [b"m3", b"m4"]
    (park,) = pulled.commands
    assert isinstance(park, Republish) and park.message.tag == 2
    assert park.props.headers[attempts.PARKED] == 1


def test_a_message_that_cannot_be_carried_is_dead_lettered_as_malformed():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    deep: Any = "leaf"
    for _ in range(MAX_NESTING + 2):
        deep = {"k": deep}
    pulled = ledger.pull(1, 5, inbox_of(message(1, {"h": deep}), message(2)), at=at(0.0))
    assert [d.body for d in pulled.deliveries] == [b"m2"]  # the next message flows
    (write,) = pulled.commands
    assert isinstance(write, WriteDeadLetter)
    assert write.record.failureReason == MALFORMED_MESSAGE
    assert write.record.rawBody == b"m1"
    assert ledger.counts["malformed"] == 1 and len(ledger.in_flight) == 1


def test_a_copy_the_broker_cannot_encode_is_dead_lettered_not_retried():
    ledger = make_ledger()
    message_1 = message(1)
    (write,) = ledger.confirmed(message_1, f"{UNENCODABLE}value too large", at=at(0.0))
    assert isinstance(write, WriteDeadLetter)
    assert write.record.failureReason == MALFORMED_MESSAGE


def test_drain_requeues_suspects_and_what_is_still_held_and_never_charges():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    suspect = message(1, {attempts.SUSPECT: 1})
    pulled = ledger.pull(1, 5, inbox_of(suspect, message(2), message(3)), at=at(0.0))
    first, _second = pulled.deliveries
    assert ledger.start_drain() == [Settle(suspect, requeue=True)]
    assert ledger.pull(1, 5, inbox_of(message(4)), at=at(1.0)).deliveries == []
    (requeue,) = ledger.fail(1, first.id, "PROCESSING_ERROR", "x", None, at=at(1.0)) or []
    assert requeue == Settle(requeue.message, requeue=True)
    assert ledger.counts["failed"] == 0
    (rest,) = ledger.finish_drain()
    assert rest == Settle(rest.message, requeue=True) and rest.message.tag == 3
    assert not ledger.in_flight


@pytest.mark.parametrize("draw", [0.0, 0.999])
def test_parking_jitter_only_shortens_the_wait(draw: float):
    ledger = make_ledger(draw=draw)
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0))
    for park in ledger.close_session(1, crashed=True, at=at(0.0)):
        assert isinstance(park, Republish)
        expected = round(park.tier * (1 - 0.2 * draw) * 1000)
        assert park.props.expiration == str(expected)
        assert int(park.props.expiration) <= park.tier * 1000


# --- trace context -----------------------------------------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_the_trace_context_reaches_the_agent_the_retry_and_the_dead_letter():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    traced = message(1, {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"})
    (delivery,) = ledger.pull(1, 1, inbox_of(traced), at=at(0.0)).deliveries
    # Handed out: the agent sees the publisher's context among the headers.
    assert delivery.headers["traceparent"] == TRACEPARENT
    assert delivery.headers["tracestate"] == "congo=t61rcWkgMzE"
    (retry,) = ledger.fail(1, delivery.id, "NETWORK_ERROR", "reset", None, at=at(1.0)) or []
    assert isinstance(retry, Republish)
    # The retry copy keeps the context untouched (the driver's tracer may re-parent it).
    assert retry.props.headers["traceparent"] == TRACEPARENT
    assert retry.props.headers["tracestate"] == "congo=t61rcWkgMzE"
    # The copy comes back from its tier and fails for good: the record keeps the trace id.
    again = message(2, retry.props.headers)
    (delivery,) = ledger.pull(1, 1, inbox_of(again), at=at(2.0)).deliveries
    (write,) = ledger.fail(1, delivery.id, "VALIDATION_FAILED", "bad", None, at=at(3.0)) or []
    assert isinstance(write, WriteDeadLetter)
    assert write.record.traceId == TRACE_ID
    assert write.record.headers["traceparent"] == TRACEPARENT


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
        {"traceparent": TRACEPARENT.upper()},
        {"traceparent": TRACEPARENT + "x" * 100_000},
        {"traceparent": 42},
        {"traceparent": {"nested": TRACEPARENT}},
    ],
)
def test_a_missing_or_invalid_traceparent_leaves_the_record_without_a_trace_id(headers):
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1, headers)), at=at(0.0)).deliveries
    (write,) = ledger.fail(1, delivery.id, "VALIDATION_FAILED", "bad", None, at=at(1.0)) or []
    assert isinstance(write, WriteDeadLetter)
    assert write.record.traceId is None


def test_a_traceparent_in_bytes_is_read_for_the_record():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    traced = message(1, {"traceparent": TRACEPARENT.encode()})
    (delivery,) = ledger.pull(1, 1, inbox_of(traced), at=at(0.0)).deliveries
    (write,) = ledger.fail(1, delivery.id, "VALIDATION_FAILED", "bad", None, at=at(1.0)) or []
    assert isinstance(write, WriteDeadLetter)
    assert write.record.traceId == TRACE_ID
