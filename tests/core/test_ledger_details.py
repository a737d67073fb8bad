"""The ledger's exact outputs: what it reports to the meter, the dead-letter records and
republished copies it builds, the breaker keys it reads, and its guards. Plain ``now``
values, no broker."""

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
    parked_this_attempt,
)
from sidecar.core.messages import Inbound, Inbox, MessageProps
from sidecar.limits import MAX_NESTING
from sidecar.policies import breaker_config_from, retry_policy_from
from sidecar.policy.breaker import NOT_A_PROBE, BreakerState, CircuitBreaker, KeyedBreakers
from sidecar.policy.failure import error_signature
from sidecar.policy.pressure import PressureLevel
from sidecar.store.records import DeadLetterRecord

WALL = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
GEN = 1


def at(now: float, live: int | None = GEN) -> Moment:
    return Moment(now, WALL, live)


class RecordingMeter:
    """Every call the ledger makes to its meter, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def agents(self, count: int) -> None:
        self.calls.append(("agents", count))

    def in_flight(self, count: int) -> None:
        self.calls.append(("in_flight", count))

    def buffered(self, count: int) -> None:
        self.calls.append(("buffered", count))

    def delivered(self, queue: str) -> None:
        self.calls.append(("delivered", queue))

    def acked(self, queue: str, seconds: float, count: int = 1) -> None:
        self.calls.append(
            ("acked", queue, seconds) if count == 1 else ("acked", queue, seconds, count)
        )

    def failed(self, queue: str, reason: str, seconds: float) -> None:
        self.calls.append(("failed", queue, reason, seconds))

    def retried(self, queue: str, tier: float, attempt: int) -> None:
        self.calls.append(("retried", queue, tier, attempt))

    def parked(self, queue: str, why: str) -> None:
        self.calls.append(("parked", queue, why))

    def dead_lettered(self, queue: str, reason: str, attempt: int) -> None:
        self.calls.append(("dead_lettered", queue, reason, attempt))

    def malformed(self, what: str, count: int = 1) -> None:
        self.calls.append(("malformed", what, count))

    def stale(self) -> None:
        self.calls.append(("stale",))

    def breaker_tripped(self) -> None:
        self.calls.append(("breaker_tripped",))

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls


def make_ledger(
    *,
    draw: float = 0.5,
    meter: RecordingMeter | None = None,
    deadline: float = 30.0,
    max_in_flight: int = 100,
    **overrides: Any,
) -> Ledger:
    config = load_config(environ={}, overrides=overrides)
    breakers = breaker_config_from(config)
    return Ledger(
        LedgerSettings(
            deadline=deadline,
            max_deadline=120.0,
            max_in_flight=max_in_flight,
            batch_size=10,
            key_header=config.breaker.key_header,
            host="test-host",
        ),
        retry_policy_from(config),
        CircuitBreaker(breakers),
        KeyedBreakers(breakers),
        random=lambda: draw,
        meter=meter,
    )


def message(
    tag: int,
    headers: dict[str, Any] | None = None,
    *,
    generation: int = GEN,
    props: MessageProps | None = None,
) -> Inbound:
    # Queue, routing key and exchange all differ, so a record naming the wrong one shows.
    if props is None:
        props = MessageProps(headers=headers or {})
    return Inbound(
        generation=generation,
        tag=tag,
        queue="work",
        body=f"m{tag}".encode(),
        props=props,
        routing_key=f"rk.{tag}",
        exchange="ex",
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


def deep(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": value}
    return value


# --- the meter ---------------------------------------------------------------------------


def test_the_meter_hears_of_every_session_delivery_ack_and_retry():
    meter = RecordingMeter()
    ledger = make_ledger(meter=meter)
    ledger.open_session(1, "a", "1.0", None)
    ledger.open_session(2, "b", "1.0", None)
    assert meter.take() == [("agents", 1), ("agents", 2)]
    first, second = ledger.pull(
        1, 2, inbox_of(message(1), message(2), message(3)), at=at(10.0)
    ).deliveries
    assert meter.take() == [
        ("delivered", "work"),
        ("in_flight", 1),
        ("delivered", "work"),
        ("in_flight", 2),
        ("buffered", 1),
    ]
    ledger.ack(1, [first.id], now=12.5)
    assert meter.take() == [("in_flight", 1), ("acked", "work", 2.5)]
    ledger.fail(1, second.id, "PROCESSING_ERROR", "boom", None, at=at(14.0))
    assert meter.take() == [
        ("in_flight", 0),
        ("failed", "work", "PROCESSING_ERROR", 4.0),
        ("retried", "work", 1.0, 1),
    ]
    assert (first.id, second.id) == (1, 2)
    assert ledger.counts == dict.fromkeys(ledger.counts, 0) | {
        "delivered": 2,
        "acked": 1,
        "failed": 1,
        "retried": 1,
    }
    assert ledger.sessions[1].pid is None
    assert ledger.close_session(2, crashed=False, at=at(15.0)) == []
    assert meter.take() == [("agents", 1)]
    # A session closed twice still reports the count, and asks for nothing.
    assert ledger.close_session(2, crashed=True, at=at(15.0)) == []
    assert meter.take() == [("agents", 1)]


def test_the_meter_hears_of_dead_letters_parks_stale_answers_and_trips():
    meter = RecordingMeter()
    ledger = make_ledger(meter=meter, breaker={"failure_threshold": 2})
    ledger.open_session(1, "a", "1.0", None)
    d1, d2, d3, d4 = ledger.pull(
        1, 4, inbox_of(*(message(i) for i in range(1, 5))), at=at(0.0)
    ).deliveries
    meter.take()
    ledger.fail(1, d1.id, "VALIDATION_FAILED", "bad", None, at=at(1.0))
    assert meter.take() == [
        ("in_flight", 3),
        ("failed", "work", "VALIDATION_FAILED", 1.0),
        ("dead_lettered", "work", "VALIDATION_FAILED", 1),
    ]
    assert ledger.fail(1, d2.id, "NETWORK_ERROR", "503", None, at=at(2.0, live=2)) == []
    assert meter.take() == [("in_flight", 2), ("stale",)]
    first = ledger.fail(1, d3.id, "NETWORK_ERROR", "503", None, at=at(3.0)) or []
    assert only(first, BreakerChanged) == []
    meter.take()
    tripped = ledger.fail(1, d4.id, "NETWORK_ERROR", "503", None, at=at(4.0)) or []
    assert only(tripped, BreakerChanged) == [BreakerChanged()]
    assert meter.take() == [
        ("in_flight", 0),
        ("failed", "work", "NETWORK_ERROR", 4.0),
        ("breaker_tripped",),
        ("retried", "work", 1.0, 1),
    ]
    assert ledger.counts == dict.fromkeys(ledger.counts, 0) | {
        "delivered": 4,
        "failed": 3,
        "retried": 2,
        "dead_lettered": 1,
        "stale": 1,
    }


def test_the_meter_hears_of_crash_parks_malformed_messages_and_repaired_headers():
    meter = RecordingMeter()
    ledger = make_ledger(meter=meter)
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0))
    meter.take()
    ledger.close_session(1, crashed=True, at=at(1.0))
    assert meter.take() == [
        ("agents", 0),
        ("in_flight", 1),
        ("in_flight", 0),
        ("parked", "work", "agent_crash"),
        ("parked", "work", "agent_crash"),
    ]
    ledger.open_session(2, "b", "1.0", None)
    meter.take()
    pulled = ledger.pull(2, 1, inbox_of(message(3, {"h": deep(MAX_NESTING + 2)})), at=at(2.0))
    assert pulled.deliveries == []
    assert meter.take() == [
        ("malformed", "message", 1),
        ("dead_lettered", "work", MALFORMED_MESSAGE, 1),
        ("buffered", 0),
    ]
    ledger.headers_repaired(3)
    assert meter.take() == [("malformed", "amqp_value", 3)]
    assert ledger.counts["ignored_headers"] == 3
    # Headers of ours holding values that cannot be used are named one by one.
    bad = message(4, {attempts.ATTEMPTS: "lots", attempts.LAST_REASON: ["x"]})
    (delivery,) = ledger.pull(2, 1, inbox_of(bad), at=at(3.0)).deliveries
    assert delivery.attempt == 1
    assert meter.take()[:2] == [
        ("malformed", attempts.ATTEMPTS, 1),
        ("malformed", attempts.LAST_REASON, 1),
    ]
    assert ledger.counts == dict.fromkeys(ledger.counts, 0) | {
        "delivered": 3,
        "crashes": 1,
        "parked": 2,
        "dead_lettered": 1,
        "malformed": 1,
        "ignored_headers": 5,
    }


# --- records and copies ------------------------------------------------------------------


def test_a_dead_letter_record_carries_every_field_of_the_message_and_the_failure():
    ledger = make_ledger()
    ledger.open_session(1, "agent-a", "3.1", 4242)
    assert ledger.sessions[1].pid == 4242
    headers = {
        "tenant": b"acme",
        attempts.ATTEMPTS: 1,
        attempts.FIRST_FAILURE_AT: "2025-12-31T00:00:00+00:00",
        "x-death": [{"count": 1}],
    }
    props = MessageProps(
        headers=headers,
        message_id="mid-1",
        content_type="application/json",
        priority=3,
        delivery_mode=2,
        app_id="billing",
    )
    original = Inbound(GEN, 7, "work", b'{"n": 1}', props, "rk.7", "ex", True)
    (delivery,) = ledger.pull(1, 1, inbox_of(original), at=at(0.0)).deliveries
    commands = ledger.fail(1, delivery.id, "VALIDATION_FAILED", "bad field n", None, at=at(2.0))
    assert commands is not None
    (write,) = commands
    assert isinstance(write, WriteDeadLetter) and write.message is original
    history = [
        {
            "attempt": 2,
            "reason": "VALIDATION_FAILED",
            "error": "bad field n",
            "at": "2026-01-02T03:04:05Z",
            "host": "test-host",
            "agentVersion": "3.1",
        }
    ]
    assert write.record == DeadLetterRecord(
        id=attempts.stable_id("work", "mid-1", "rk.7", b'{"n": 1}', headers),
        originalQueue="work",
        payload={"n": 1},
        rawBody=b'{"n": 1}',
        failureReason="VALIDATION_FAILED",
        errorMessage="bad field n",
        attemptCount=2,
        firstFailureAt=datetime(2025, 12, 31, tzinfo=UTC),
        lastFailureAt=WALL,
        processingHost="test-host",
        agentVersion="3.1",
        agentName="agent-a",
        routingKey="rk.7",
        exchange="ex",
        headers={"tenant": "acme"},
        properties={
            "message_id": "mid-1",
            "content_type": "application/json",
            "priority": 3,
            "delivery_mode": 2,
            "app_id": "billing",
        },
        signature=error_signature("VALIDATION_FAILED", "bad field n"),
        deadLetteredAt=WALL,
        failures=history,
    )


def test_a_dead_letter_without_an_error_text_says_why_but_signs_the_empty_error():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    (write,) = ledger.fail(1, delivery.id, "UNRECOVERABLE", "", None, at=at(1.0)) or []
    assert isinstance(write, WriteDeadLetter)
    assert write.record.errorMessage == "permanent failure UNRECOVERABLE"
    assert write.record.signature == error_signature("UNRECOVERABLE", "")
    assert write.record.firstFailureAt == WALL


def test_a_copy_the_broker_cannot_encode_is_recorded_with_the_error_text():
    ledger = make_ledger()
    error = "message cannot be encoded in AMQP: header 'h' is too long" + "!" * 600
    (write,) = ledger.confirmed(message(1), error, at=at(0.0))
    assert isinstance(write, WriteDeadLetter)
    assert write.record.errorMessage == "ValueError: " + error[:500]
    assert write.record.attemptCount == 1
    assert write.record.agentName == "" and write.record.agentVersion == ""
    assert write.record.firstFailureAt == WALL
    assert write.record.signature == error_signature(
        MALFORMED_MESSAGE, "ValueError: " + error[:500]
    )
    # Any other publish error hands the original back to its queue.
    assert ledger.confirmed(message(1), "cannot be encoded", at=at(0.0)) == [
        Settle(message(1), requeue=True)
    ]


def test_a_header_too_deep_to_carry_is_named_in_the_malformed_record():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    hostile = message(1, {"h": deep(MAX_NESTING + 2), "ok": 1})
    (write,) = ledger.pull(1, 1, inbox_of(hostile), at=at(0.0)).commands
    assert isinstance(write, WriteDeadLetter)
    assert write.record.errorMessage == f"TooDeep: value nested deeper than {MAX_NESTING} levels"
    # The record keeps what can be read of the headers.
    nested = write.record.headers["h"]
    for _ in range(MAX_NESTING - 1):
        nested = nested["k"]
    assert nested == f"<nested deeper than {MAX_NESTING}>"
    assert write.record.headers["ok"] == 1


def test_a_republished_copy_keeps_the_message_id_and_delivery_mode_it_came_with():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    props = MessageProps(headers={"h": 1}, message_id="mid-9", delivery_mode=1)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(9, props=props)), at=at(0.0)).deliveries
    (copy,) = ledger.fail(1, delivery.id, "PROCESSING_ERROR", "x", None, at=at(1.0)) or []
    assert isinstance(copy, Republish)
    assert copy.props.message_id == "mid-9"
    assert copy.props.delivery_mode == 1
    assert props.expiration is None and props.headers == {"h": 1}  # the original is untouched


def test_a_republished_copy_without_an_id_gets_the_stable_one_and_persists():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(9, {"h": 1})), at=at(0.0)).deliveries
    (copy,) = ledger.fail(1, delivery.id, "PROCESSING_ERROR", "x", None, at=at(1.0)) or []
    assert isinstance(copy, Republish)
    assert copy.props.message_id == attempts.stable_id("work", None, "rk.9", b"m9", {"h": 1})
    assert copy.props.delivery_mode == 2


def test_a_copy_waits_at_least_a_millisecond():
    ledger = make_ledger(
        draw=0.999, retry={"base_delay": 0.0004, "max_delay": 1.0, "tiers": [0.0004, 1.0]}
    )
    ledger.open_session(1, "a", "1.0", None)
    (delivery,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    (copy,) = ledger.fail(1, delivery.id, "PROCESSING_ERROR", "x", None, at=at(1.0)) or []
    assert isinstance(copy, Republish)
    assert copy.tier == 0.0004
    assert copy.props.expiration == "1"


def test_a_timeout_and_a_crash_say_what_happened_in_the_copy():
    ledger = make_ledger(deadline=2.5)
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0))
    (copy,) = only(ledger.tick(at=at(2.5)), Republish)
    assert copy.props.headers[attempts.LAST_ERROR] == "no answer within 2.5s"
    assert copy.props.headers[attempts.REDUCED_SCOPE] is True
    ledger.pull(1, 1, inbox_of(message(2)), at=at(3.0))
    (crash,) = ledger.close_session(1, crashed=True, at=at(4.0))
    assert isinstance(crash, Republish)
    assert (
        crash.props.headers[attempts.LAST_ERROR] == "agent disconnected while holding the message"
    )
    assert ledger.counts["crashes"] == 1 and ledger.counts["timeouts"] == 1


def test_a_delivery_carries_what_the_agent_needs_and_none_of_our_headers():
    ledger = make_ledger(deadline=12.0)
    ledger.open_session(1, "a", "1.0", None)
    props = MessageProps(
        headers={"tenant": "acme", attempts.ATTEMPTS: 1, attempts.REDUCED_SCOPE: True},
        message_id="mid",
        content_type="text/plain",
        priority=4,
    )
    original = Inbound(GEN, 5, "work", b"body", props, "rk.5", "ex", True)
    (delivery,) = ledger.pull(1, 1, inbox_of(original), at=at(0.0)).deliveries
    held = ledger.in_flight[delivery.id]
    assert (held.id, held.message, held.session, held.deadline) == (delivery.id, original, 1, 12.0)
    assert (
        delivery.queue,
        delivery.body,
        delivery.attempt,
        delivery.deadline,
        delivery.routing_key,
        delivery.exchange,
        delivery.headers,
        delivery.message_id,
        delivery.content_type,
        delivery.priority,
        delivery.redelivered,
        delivery.reduced_scope,
    ) == (
        "work",
        b"body",
        2,
        12.0,
        "rk.5",
        "ex",
        {"tenant": "acme"},
        "mid",
        "text/plain",
        4,
        True,
        True,
    )


# --- breaker keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (b"db-\xff1", "db-\ufffd1"),
        ("h" * 300, "h" * 255),
        (7, "7"),
        ("", ""),
        (True, ""),
        (1.5, ""),
        ({"a": 1}, ""),
    ],
)
def test_only_plain_scalars_key_a_breaker(value: Any, key: str):
    ledger = make_ledger(breaker={"key_header": "target", "failure_threshold": 1})
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"target": value})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    if key:
        assert ledger.keyed.open_keys(0.5) == [key]
        assert ledger.breaker.state(0.5) is BreakerState.CLOSED
    else:
        # Unkeyed: the failure counts against the agent-wide breaker.
        assert ledger.keyed.open_keys(0.5) == []
        assert ledger.breaker.state(0.5) is BreakerState.OPEN


def test_without_a_key_header_configured_every_message_is_unkeyed():
    ledger = make_ledger(breaker={"failure_threshold": 1})
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"": "x"})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    assert ledger.keyed.open_keys(0.5) == []
    assert ledger.breaker.state(0.5) is BreakerState.OPEN


def test_a_keyed_breaker_half_open_lets_one_probe_through_and_its_success_closes_it():
    ledger = make_ledger(
        breaker={"key_header": "host", "failure_threshold": 1, "open_timeout": 10.0}
    )
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"host": "h"})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    pulled = ledger.pull(
        1, 5, inbox_of(message(2, {"host": "h"}), message(3, {"host": "h"})), at=at(10.0)
    )
    assert [d.body for d in pulled.deliveries] == [b"m2"]
    (park,) = pulled.commands
    assert isinstance(park, Republish) and park.message.tag == 3
    # Parked for at least the first tier while the probe is out.
    assert park.tier == 1.0 and park.props.expiration == "900"
    ledger.ack(1, [pulled.deliveries[0].id], now=11.0)
    assert ledger.keyed.get("h").state(11.0) is BreakerState.CLOSED


def test_a_keyed_message_is_parked_for_the_rest_of_its_open_time():
    ledger = make_ledger(
        breaker={"key_header": "host", "failure_threshold": 1, "open_timeout": 10.0}
    )
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"host": "h"})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    (park,) = ledger.pull(1, 5, inbox_of(message(2, {"host": "h"})), at=at(2.0)).commands
    assert isinstance(park, Republish)
    # 8s left: the 30s tier, waiting 8s less the jitter (draw 0.5 of 20%).
    assert park.tier == 30.0 and park.props.expiration == "7200"


# --- the agent-wide breaker and probes ---------------------------------------------------


def trip(ledger: Ledger, now: float) -> None:
    ledger.open_session(99, "tripper", "1.0", None)
    threshold = ledger.breaker.config.failure_threshold
    inbox = inbox_of(*(message(1000 + i) for i in range(threshold)))
    for d in ledger.pull(99, threshold, inbox, at=at(now)).deliveries:
        ledger.fail(99, d.id, "NETWORK_ERROR", "503", None, at=at(now))
    assert ledger.breaker.state(now) is BreakerState.OPEN


def test_a_malformed_probe_frees_its_slot_for_the_next_message():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(message(1, {"h": deep(MAX_NESTING + 2)}), message(2), message(3))
    pulled = ledger.pull(1, 5, inbox, at=at(10.0))
    assert [d.body for d in pulled.deliveries] == [b"m2"]
    assert [type(c) for c in pulled.commands] == [WriteDeadLetter]
    assert len(inbox) == 1  # m3 waits for the probe's answer


def test_a_suspect_met_while_half_open_frees_its_probe_slot():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(message(1, {attempts.SUSPECT: 1}), message(2), message(3))
    pulled = ledger.pull(1, 5, inbox, at=at(10.0))
    assert [d.body for d in pulled.deliveries] == [b"m2"]
    assert len(ledger.suspects) == 1 and len(inbox) == 1


def suspects_held_through_a_reopened_breaker(ledger: Ledger, *extra: Inbound) -> float:
    """Trip the breaker, let two suspects reach the ledger while half-open, and have the
    probe fail so it opens again; returns when the next probe may go."""
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(*extra, message(3))
    (probe,) = ledger.pull(1, 5, inbox, at=at(10.0)).deliveries
    assert probe.body == b"m3" and len(ledger.suspects) == len(extra)
    ledger.fail(1, probe.id, "NETWORK_ERROR", "503", None, at=at(10.0))
    assert ledger.breaker.state(10.0) is BreakerState.OPEN
    return 10.0 + ledger.breaker.retry_in(10.0)


def test_a_suspect_goes_out_as_the_probe_while_half_open():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    s1, s2 = message(1, {attempts.SUSPECT: 1}), message(2, {attempts.SUSPECT: 1})
    half_open = suspects_held_through_a_reopened_breaker(ledger, s1, s2)
    ledger.open_session(2, "b", "1.0", None)
    ledger.open_session(3, "c", "1.0", None)
    # Open: not even a suspect goes out.
    assert ledger.pull(2, 5, inbox_of(), at=at(half_open - 0.5)).deliveries == []
    (probe,) = ledger.pull(2, 5, inbox_of(message(4)), at=at(half_open)).deliveries
    assert probe.body == b"m1"
    # The one probe slot is taken: another idle agent gets no suspect.
    assert ledger.pull(3, 5, inbox_of(), at=at(half_open)).deliveries == []
    assert len(ledger.suspects) == 1
    ledger.ack(2, [probe.id], now=half_open)
    assert ledger.breaker.state(half_open) is BreakerState.CLOSED
    (second,) = ledger.pull(3, 5, inbox_of(), at=at(half_open)).deliveries
    assert second.body == b"m2"


def test_a_suspect_that_cannot_be_carried_is_dead_lettered_and_frees_its_probe_slot():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    bad = message(1, {attempts.SUSPECT: 1, "h": deep(MAX_NESTING + 2)})
    half_open = suspects_held_through_a_reopened_breaker(ledger, bad)
    ledger.open_session(2, "b", "1.0", None)
    pulled = ledger.pull(2, 5, inbox_of(message(4)), at=at(half_open))
    assert pulled.deliveries == []
    (write,) = pulled.commands
    assert isinstance(write, WriteDeadLetter) and write.record.failureReason == MALFORMED_MESSAGE
    assert write.message is bad and ledger.suspects == []
    (probe,) = ledger.pull(2, 5, inbox_of(message(4)), at=at(half_open)).deliveries
    assert probe.body == b"m4"


def test_bad_input_from_a_probe_leaves_the_breaker_half_open_with_the_slot_free():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    (probe,) = ledger.pull(1, 5, inbox_of(message(1), message(2)), at=at(10.0)).deliveries
    ledger.fail(1, probe.id, "VALIDATION_FAILED", "bad", None, at=at(10.5))
    assert ledger.breaker.state(10.5) is BreakerState.HALF_OPEN
    (again,) = ledger.pull(1, 5, inbox_of(message(2)), at=at(10.5)).deliveries
    assert again.body == b"m2"


def test_a_probe_that_fails_systemically_is_charged_not_parked():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    (probe,) = ledger.pull(1, 5, inbox_of(message(1)), at=at(10.0)).deliveries
    commands = ledger.fail(1, probe.id, "NETWORK_ERROR", "503", None, at=at(10.5)) or []
    (copy,) = only(commands, Republish)
    assert copy.props.headers[attempts.ATTEMPTS] == 1
    assert ledger.breaker.state(10.5) is BreakerState.OPEN


def test_bad_input_while_the_breaker_is_open_is_charged_not_parked():
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    ledger.open_session(1, "a", "1.0", None)
    (held,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    trip(ledger, 1.0)
    (copy,) = ledger.fail(1, held.id, "PROCESSING_ERROR", "x", None, at=at(2.0)) or []
    assert isinstance(copy, Republish) and copy.props.headers[attempts.ATTEMPTS] == 1
    assert ledger.counts["parked"] == 0


def test_a_crash_while_draining_requeues_without_charging():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0))
    ledger.start_drain()
    commands = ledger.close_session(1, crashed=True, at=at(1.0))
    assert [(c.message.tag, c.requeue) for c in commands] == [(1, True), (2, True)]
    assert ledger.counts["crashes"] == 0


def test_a_session_that_held_nothing_closes_without_commands():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    assert ledger.close_session(1, crashed=True, at=at(1.0)) == []
    assert ledger.counts["crashes"] == 0


# --- guards on a pull --------------------------------------------------------------------


def test_nothing_is_handed_out_to_an_unknown_session_or_in_an_emergency():
    ledger = make_ledger()
    inbox = inbox_of(*(message(i) for i in range(1, 30)))
    assert ledger.pull(1, 5, inbox, at=at(0.0)).deliveries == []
    ledger.open_session(1, "a", "1.0", None)
    ledger.pressure = PressureLevel.EMERGENCY
    assert ledger.pull(1, 5, inbox, at=at(0.0)).deliveries == []
    assert len(inbox) == 29
    # Under pressure short of an emergency the batch shrinks (10 configured, 75%).
    ledger.pressure = PressureLevel.WARNING
    assert len(ledger.pull(1, 50, inbox, at=at(0.0)).deliveries) == 7


def test_a_session_at_its_in_flight_limit_gets_nothing_and_the_inbox_is_untouched():
    meter = RecordingMeter()
    ledger = make_ledger(max_in_flight=1, meter=meter)
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(message(1), message(2))
    assert len(ledger.pull(1, 5, inbox, at=at(0.0)).deliveries) == 1
    meter.take()
    assert ledger.pull(1, 5, inbox, at=at(0.0)).deliveries == []
    assert len(inbox) == 1
    assert meter.take() == []  # returned before anything was looked at
    assert ledger.pull(1, 0, inbox_of(message(3)), at=at(0.0)).deliveries == []


# --- deadlines ---------------------------------------------------------------------------


def test_the_deadline_timer_is_told_only_when_the_earliest_deadline_moves_earlier():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    assert ledger.next_deadline() is None and ledger.deadline_moved is False
    assert ledger.draining is False
    (d1,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    assert ledger.deadline_moved and ledger.next_deadline() == 30.0
    ledger.deadline_moved = False
    (d2,) = ledger.pull(1, 1, inbox_of(message(2)), at=at(1.0)).deliveries
    assert not ledger.deadline_moved and ledger.next_deadline() == 30.0
    ledger.extend(1, [d2.id], 5.0, now=1.0)
    assert ledger.deadline_moved and ledger.next_deadline() == 6.0
    ledger.deadline_moved = False
    ledger.extend(1, [d1.id], 60.0, now=1.0)
    assert not ledger.deadline_moved


def test_answered_deadlines_are_dropped_once_they_outnumber_what_is_in_flight():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    d, other = ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0)).deliveries
    ledger.extend(1, [other.id], 110.0, now=0.0)
    # Each extension leaves the previous deadline behind; the earliest stays reported
    # (a harmless early wake-up) until the entries outnumber twice the in-flight plus 1024.
    for _ in range(1026):
        ledger.extend(1, [d.id], 100.0, now=0.0)
    # 1028 entries for 2 in flight: the pull's two deliveries share one.
    assert ledger.next_deadline() == 30.0
    ledger.extend(1, [d.id], 100.0, now=0.0)
    assert ledger.next_deadline() == 100.0


def test_a_tick_charges_only_what_is_due_in_deadline_order():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    d1, d2, d3 = ledger.pull(
        1, 3, inbox_of(message(1), message(2), message(3)), at=at(0.0)
    ).deliveries
    ledger.extend(1, [d1.id], 50.0, now=0.0)
    ledger.ack(1, [d2.id], now=1.0)
    commands = ledger.tick(at=at(30.0))
    assert only(commands, NotifyTimeout) == [NotifyTimeout(1, d3.id, True)]
    assert list(ledger.in_flight) == [d1.id]
    assert ledger.next_deadline() == 50.0


def test_a_pulls_deliveries_share_one_deadline_entry_and_each_times_out_on_its_own():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    batch = ledger.pull(
        1, 4, inbox_of(message(1), message(2), message(3), message(4)), at=at(0.0)
    ).deliveries
    assert len(ledger._deadlines) == 1  # one entry for the whole pull
    d1, d2, d3, d4 = batch
    ledger.ack(1, [d2.id], now=1.0)
    ledger.extend(1, [d3.id], 45.0, now=2.0)  # one of the batch moves on alone
    assert ledger.tick(at=at(29.9)) == []
    commands = ledger.tick(at=at(30.0))
    # The rest of the batch times out, each in hand-out order; the answered and the
    # extended ones do not.
    assert only(commands, NotifyTimeout) == [
        NotifyTimeout(1, d1.id, True),
        NotifyTimeout(1, d4.id, True),
    ]
    assert list(ledger.in_flight) == [d3.id]
    assert ledger.next_deadline() == 47.0
    assert only(ledger.tick(at=at(47.0)), NotifyTimeout) == [NotifyTimeout(1, d3.id, True)]
    assert ledger.in_flight == {} and ledger.next_deadline() is None


def test_an_extension_of_one_delivery_of_a_batch_to_earlier_wakes_the_timer():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    d1, d2 = ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0)).deliveries
    ledger.deadline_moved = False
    ledger.extend(1, [d2.id], 3.0, now=1.0)
    assert ledger.deadline_moved and ledger.next_deadline() == 4.0
    assert only(ledger.tick(at=at(4.0)), NotifyTimeout) == [NotifyTimeout(1, d2.id, True)]
    assert list(ledger.in_flight) == [d1.id]
    assert ledger.next_deadline() == 30.0


# --- uncharged parks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parks"),
    [
        (None, 0),
        (2, 2),
        ("3", 3),
        (b"4", 4),
        (-1, 0),
        ("x", 0),
        (1.0, 0),
        ([1], 0),
        ("9" * 5000, 0),  # beyond int()'s digit limit
    ],
)
def test_parks_this_attempt_are_read_from_any_plain_header_value(value: Any, parks: int):
    headers = {} if value is None else {attempts.PARKED: value}
    assert parked_this_attempt(message(1, headers)) == parks


# --- answers -----------------------------------------------------------------------------


def test_an_unknown_id_in_a_list_does_not_stop_the_ones_after_it():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    d1, d2 = ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0)).deliveries
    assert ledger.extend(1, [999, d1.id], 50.0, now=0.0) == [999]
    assert ledger.next_deadline() == 30.0  # d2's
    ledger.ack(1, [d2.id], now=1.0)
    assert ledger.tick(at=at(30.0)) == []  # d1 was extended
    unknown, commands = ledger.ack(1, [998, d1.id], now=2.0)
    assert unknown == [998] and [c.message.tag for c in commands] == [1]


def test_a_retry_copy_records_the_failure_in_its_headers():
    ledger = make_ledger(draw=0.0)
    ledger.open_session(1, "a", "2.5", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    (copy,) = ledger.fail(1, d.id, "PROCESSING_ERROR", "boom", None, at=at(1.0)) or []
    assert isinstance(copy, Republish)
    headers = copy.props.headers
    assert headers[attempts.REDUCED_SCOPE] is False
    assert headers[attempts.LAST_ERROR] == "boom"
    assert attempts.read_failures(headers) == [
        {
            "attempt": 1,
            "reason": "PROCESSING_ERROR",
            "error": "boom",
            "at": "2026-01-02T03:04:05Z",
            "host": "test-host",
            "agentVersion": "2.5",
        }
    ]
    assert ledger.counts["retried"] == 1


@pytest.mark.parametrize(("retry_after", "error"), [(20.0, "slow down"), (None, "retry after 20s")])
def test_a_rate_limited_message_waits_as_long_as_it_was_told(retry_after: float | None, error: str):
    ledger = make_ledger(draw=0.5)
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    (copy,) = ledger.fail(1, d.id, "RATE_LIMITED", error, retry_after, at=at(1.0)) or []
    assert isinstance(copy, Republish)
    assert copy.tier == 30.0 and copy.props.expiration == "18000"


def test_a_timeout_during_a_drain_is_requeued_and_reported_uncharged():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    ledger.start_drain()
    assert ledger.draining is True
    commands = ledger.tick(at=at(30.0))
    assert [(type(c), getattr(c, "requeue", None)) for c in commands] == [
        (Settle, True),
        (NotifyTimeout, None),
    ]
    assert commands[0].message.tag == 1
    assert commands[1] == NotifyTimeout(1, d.id, False)
    assert ledger.counts["failed"] == 0 and ledger.counts["timeouts"] == 1


def test_a_timeout_parked_by_an_open_breaker_is_reported_uncharged():
    meter = RecordingMeter()
    ledger = make_ledger(meter=meter, breaker={"failure_threshold": 1, "open_timeout": 100.0})
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    trip(ledger, 1.0)
    meter.take()
    commands = ledger.tick(at=at(30.0))
    (park,) = only(commands, Republish)
    assert park.props.headers[attempts.PARKED] == 1
    assert only(commands, NotifyTimeout) == [NotifyTimeout(1, d.id, False)]
    assert ("parked", "work", "circuit_open") in meter.take()


def test_a_keyed_park_waits_the_open_time_left_even_below_the_next_tier():
    meter = RecordingMeter()
    ledger = make_ledger(
        meter=meter, breaker={"key_header": "host", "failure_threshold": 1, "open_timeout": 4.0}
    )
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"host": "h"})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    meter.take()
    (park,) = ledger.pull(1, 5, inbox_of(message(2, {"host": "h"})), at=at(2.0)).commands
    assert isinstance(park, Republish)
    # 2s left: the 5s tier, but the copy waits only the 2s (less 10% jitter).
    assert park.tier == 5.0 and park.props.expiration == "1800"
    assert ("parked", "work", "key_circuit_open") in meter.take()


def test_a_message_without_the_key_header_is_unkeyed():
    ledger = make_ledger(breaker={"key_header": "host", "failure_threshold": 1})
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    assert ledger.keyed.open_keys(0.5) == []
    assert ledger.breaker.state(0.5) is BreakerState.OPEN


def test_a_malformed_keyed_probe_frees_its_keys_slot():
    ledger = make_ledger(
        breaker={"key_header": "host", "failure_threshold": 1, "open_timeout": 10.0}
    )
    ledger.open_session(1, "a", "1.0", None)
    (d,) = ledger.pull(1, 1, inbox_of(message(1, {"host": "h"})), at=at(0.0)).deliveries
    ledger.fail(1, d.id, "NETWORK_ERROR", "503", None, at=at(0.0))
    bad = message(2, {"host": "h", "deep": deep(MAX_NESTING + 2)})
    pulled = ledger.pull(1, 5, inbox_of(bad, message(3, {"host": "h"})), at=at(10.0))
    assert [d.body for d in pulled.deliveries] == [b"m3"]
    assert [type(c) for c in pulled.commands] == [WriteDeadLetter]
    assert pulled.commands[0].record.deadLetteredAt == WALL


def test_answers_from_an_earlier_probe_round_do_not_decide_the_current_one():
    ledger = make_ledger(
        breaker={"failure_threshold": 1, "open_timeout": 10.0, "half_open_probes": 3}
    )
    trip(ledger, 0.0)
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(message(1), message(2), message(3))
    a, b, c = ledger.pull(1, 5, inbox, at=at(10.0)).deliveries
    ledger.fail(1, a.id, "NETWORK_ERROR", "503", None, at=at(10.0))
    assert ledger.breaker.state(10.0) is BreakerState.OPEN
    half_open = 10.0 + ledger.breaker.retry_in(10.0)
    assert ledger.breaker.state(half_open) is BreakerState.HALF_OPEN
    ledger.ack(1, [b.id], now=half_open)
    assert ledger.breaker.state(half_open) is BreakerState.HALF_OPEN
    ledger.fail(1, c.id, "NETWORK_ERROR", "503", None, at=at(half_open))
    assert ledger.breaker.state(half_open) is BreakerState.HALF_OPEN


def _bad_input(ledger: Ledger, n: int, now: float) -> list[Command]:
    return ledger.fail(1, n, "VALIDATION_FAILED", "bad", None, at=at(now)) or []


def _on_a_lost_connection(ledger: Ledger, n: int, now: float) -> list[Command]:
    return ledger.fail(1, n, "NETWORK_ERROR", "x", None, at=at(now, live=2)) or []


def _clean_close(ledger: Ledger, n: int, now: float) -> list[Command]:
    return ledger.close_session(1, crashed=False, at=at(now))


def _crash(ledger: Ledger, n: int, now: float) -> list[Command]:
    return ledger.close_session(1, crashed=True, at=at(now))


def _during_a_drain(ledger: Ledger, n: int, now: float) -> list[Command]:
    ledger.start_drain()
    return ledger.fail(1, n, "NETWORK_ERROR", "x", None, at=at(now)) or []


ENDINGS = [
    (_bad_input, [WriteDeadLetter]),
    (_on_a_lost_connection, []),
    (_clean_close, [Settle, Settle]),
    (_crash, [Republish, Republish]),
    (_during_a_drain, [Settle]),
]


def held_then_tripped() -> tuple[Ledger, int]:
    ledger = make_ledger(breaker={"failure_threshold": 1, "open_timeout": 10.0})
    ledger.open_session(1, "a", "1.0", None)
    n, _ = ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0)).deliveries
    trip(ledger, 1.0)
    return ledger, n.id


@pytest.mark.parametrize(("end", "kinds"), ENDINGS)
def test_a_delivery_held_across_a_trip_can_end_while_the_breaker_is_open(end: Any, kinds: Any):
    ledger, n = held_then_tripped()
    assert [type(c) for c in end(ledger, n, 5.0)] == kinds
    assert ledger.breaker.state(5.0) is BreakerState.OPEN


@pytest.mark.parametrize(("end", "kinds"), ENDINGS)
def test_a_delivery_that_was_no_probe_frees_no_probe_slot(end: Any, kinds: Any):
    ledger, n = held_then_tripped()
    ledger.open_session(2, "b", "1.0", None)
    (probe,) = ledger.pull(2, 5, inbox_of(message(3), message(4)), at=at(11.0)).deliveries
    assert [type(c) for c in end(ledger, n, 11.0)] == kinds
    assert not ledger.breaker.allow(11.0)
    assert ledger.owned_by(2, probe.id)


def test_a_message_not_even_a_dead_letter_can_describe_is_left_to_the_broker():
    # An integer too long to print: neither a breaker key nor a record id can be made of
    # it. Requeueing would loop, so nothing is sent for it; the next message still flows.
    ledger = make_ledger(breaker={"key_header": "host"})
    ledger.open_session(1, "a", "1.0", None)
    inbox = inbox_of(message(1, {"host": 10**5000}), message(2))
    pulled = ledger.pull(1, 5, inbox, at=at(0.0))
    assert [d.body for d in pulled.deliveries] == [b"m2"]
    assert pulled.commands == [] and len(inbox) == 0
    assert ledger.counts["malformed"] == 1 and ledger.counts["dead_lettered"] == 0


def test_a_failure_whose_copy_cannot_be_built_is_caught_at_the_message_boundary():
    # Handed out fine, but neither a retry copy's id nor a record can be made of it: the
    # error stays with this message (left to the broker), the ledger carries on.
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    odd = message(1, {"n": 10**5000})
    d, other = ledger.pull(1, 2, inbox_of(odd, message(2)), at=at(0.0)).deliveries
    assert ledger.fail(1, d.id, "PROCESSING_ERROR", "x", None, at=at(1.0)) == []
    assert ledger.counts["malformed"] == 1 and ledger.counts["dead_lettered"] == 0
    (settle,) = ledger.ack(1, [other.id], now=2.0)[1]
    assert settle == Settle(message(2))


def test_every_count_adds_up_over_repeated_events():
    ledger = make_ledger(deadline=5.0)
    ledger.headers_repaired(1)
    ledger.headers_repaired(1)
    for tag in (1, 2):
        ledger.open_session(tag, "a", "1.0", None)
        ledger.pull(tag, 1, inbox_of(message(tag)), at=at(0.0))
        ledger.close_session(tag, crashed=True, at=at(1.0))
    ledger.open_session(3, "a", "1.0", None)
    a, b = ledger.pull(3, 2, inbox_of(message(3), message(4)), at=at(2.0)).deliveries
    ledger.ack(3, [a.id, b.id], now=3.0)
    ledger.pull(3, 2, inbox_of(message(5), message(6)), at=at(3.0))
    ledger.tick(at=at(8.0))
    ledger.settle_refused()
    ledger.settle_refused()
    for tag in (7, 8):
        ledger.confirmed(message(tag), "message cannot be encoded in AMQP: x", at=at(9.0))
    assert ledger.counts == {
        "delivered": 6,
        "acked": 2,
        "failed": 4,
        "retried": 4,
        "dead_lettered": 2,
        "timeouts": 2,
        "crashes": 2,
        "parked": 0,
        "stale": 2,
        "malformed": 2,
        "ignored_headers": 2,
    }


def test_a_crash_with_several_messages_parks_them_in_the_first_tier():
    ledger = make_ledger()
    ledger.open_session(1, "a", "1.0", None)
    ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(0.0))
    parks = ledger.close_session(1, crashed=True, at=at(1.0))
    assert [(p.tier, p.props.expiration) for p in parks] == [(1.0, "900"), (1.0, "900")]


def test_the_acks_of_one_batch_are_metered_together_and_others_apart():
    meter = RecordingMeter()
    ledger = make_ledger(meter=meter)
    ledger.open_session(1, "a", "1.0", None)
    early = ledger.pull(1, 2, inbox_of(message(1), message(2)), at=at(10.0)).deliveries
    late = ledger.pull(1, 2, inbox_of(message(3)), at=at(11.0)).deliveries
    meter.take()
    ids = [d.id for d in early + late]
    unknown, commands = ledger.ack(1, [*ids, 999], now=12.0)
    assert unknown == [999] and len(only(commands, Settle)) == 3
    assert [c for c in meter.take() if c[0] == "acked"] == [
        ("acked", "work", 2.0, 2),  # the two handed out together
        ("acked", "work", 1.0),
    ]
    assert ledger.counts["acked"] == 3


def test_a_probe_success_closing_the_breaker_keeps_the_order_of_a_batch():
    ledger = make_ledger(breaker={"failure_threshold": 1, "half_open_successes": 1})
    ledger.open_session(1, "a", "1.0", None)
    (before,) = ledger.pull(1, 1, inbox_of(message(1)), at=at(0.0)).deliveries
    breaker = ledger.breaker
    breaker.record_failure(0.0)  # open; half-open once its open time has passed
    now = breaker.config.open_timeout
    (probe,) = ledger.pull(1, 1, inbox_of(message(2)), at=at(now)).deliveries
    assert ledger.in_flight[probe.id].probe_of != NOT_A_PROBE
    ledger.ack(1, [before.id, probe.id], now=now)
    # The plain success came while half-open (ignored); the probe's closed the breaker.
    assert breaker.state(now) is BreakerState.CLOSED
    assert breaker._calls_in_window == 0
