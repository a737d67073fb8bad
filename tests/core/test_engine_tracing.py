"""Spans from the engine (OpenTelemetry SDK, in-memory exporter) against a fake broker port:
their names, parents, trace ids and attributes, and the context carried to the agent, the
retry copy and the dead-letter record."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.adapters.tracing import MAX_ATTRIBUTE_LENGTH, OtelTracer
from sidecar.config import load_config
from sidecar.core.messages import Inbound, MessageProps
from sidecar.metrics import Metrics
from sidecar.policies import ledger_from
from sidecar.runtime.engine import Engine, MetricsMeter
from sidecar.tracecontext import parse_traceparent
from tests.helpers.fake_broker import FakeBroker, FakeDeadLetters

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISHER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PUBLISHER_SPAN}-01"


def message(tag: int, headers: dict[str, Any] | None = None, **props: Any) -> Inbound:
    return Inbound(
        1,
        tag,
        "work",
        f"m{tag}".encode(),
        MessageProps(headers=headers or {}, **props),
        "work",
        "",
        False,
    )


def make_engine(
    exporter: InMemorySpanExporter, *, sample_ratio: float = 1.0
) -> tuple[Engine, FakeBroker, FakeDeadLetters]:
    config = load_config(environ={}, overrides={"retry": {"max_attempts": 2}})
    broker = FakeBroker()
    dead_letters = FakeDeadLetters()
    metrics = Metrics()
    ledger = ledger_from(config, random=random.Random(7).random, meter=MetricsMeter(metrics))
    tracer = OtelTracer(
        service_name="sidecar-test",
        host="test-host",
        sample_ratio=sample_ratio,
        exporter=exporter,
        batch=False,
    )
    engine = Engine(ledger, broker, dead_letters, metrics, tracer=tracer)
    engine.open_session(1, "agent", "1.0", None)
    return engine, broker, dead_letters


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def trace_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def parent_of(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


async def test_an_acked_message_has_receive_hand_out_and_ack_spans(exporter) -> None:
    engine, broker, _ = make_engine(exporter)
    broker.deliver(message(1, {"traceparent": TRACEPARENT}, message_id="job-1"))
    with trio.fail_after(5):
        (delivery,) = await engine.pull(1, 5, wait=1.0)
    spans = by_name(exporter.get_finished_spans())
    assert spans == {}  # nothing ends before the answer
    handed = parse_traceparent(delivery.headers["traceparent"])
    assert handed is not None and handed.trace_id == TRACE_ID
    engine.ack(1, [delivery.id])
    assert broker.settled == [(1, False)]

    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"receive work", "hand-out work", "ack work"}
    receive, hand_out, ack = spans["receive work"], spans["hand-out work"], spans["ack work"]
    assert {trace_of(s) for s in spans.values()} == {TRACE_ID}
    assert parent_of(receive) == PUBLISHER_SPAN and receive.kind is SpanKind.CONSUMER
    assert parent_of(hand_out) == span_id(receive) == parent_of(ack)
    # The agent's context is the hand-out span: its work continues the trace under it.
    assert handed.parent_id == span_id(hand_out)
    assert receive.attributes is not None and hand_out.attributes is not None
    assert receive.attributes["messaging.system"] == "rabbitmq"
    assert receive.attributes["messaging.destination.name"] == "work"
    assert receive.attributes["messaging.message.id"] == "job-1"
    assert receive.attributes["sidecar.outcome"] == "processed"
    assert hand_out.attributes["sidecar.delivery_id"] == delivery.id
    assert hand_out.attributes["sidecar.attempt"] == 1
    assert hand_out.status.status_code is StatusCode.UNSET
    resource = receive.resource.attributes
    assert resource["service.name"] == "sidecar-test" and resource["host.name"] == "test-host"


async def test_a_retry_carries_the_retry_span_and_the_dead_letter_keeps_the_trace(
    exporter,
) -> None:
    engine, broker, dead_letters = make_engine(exporter)
    broker.deliver(message(1, {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}))
    with trio.fail_after(5):
        (delivery,) = await engine.pull(1, 5, wait=1.0)
    assert engine.fail(1, delivery.id, "NETWORK_ERROR", "reset by peer", None)
    (copy,) = broker.published
    copy.on_done(None)  # confirmed: now the original is acked
    assert broker.settled == [(1, False)]
    first = by_name(exporter.get_finished_spans())
    assert set(first) == {"receive work", "hand-out work", "retry work", "ack work"}
    retry = first["retry work"]
    assert retry.kind is SpanKind.PRODUCER
    assert parent_of(retry) == span_id(first["receive work"])
    assert retry.attributes is not None
    assert retry.attributes["sidecar.failure_reason"] == "NETWORK_ERROR"
    assert retry.attributes["sidecar.attempt_count"] == 1
    assert retry.attributes["sidecar.retry.queue"] == copy.routing_key
    assert first["receive work"].attributes["sidecar.outcome"] == "retried"  # type: ignore[index]
    hand_out = first["hand-out work"]
    assert hand_out.status.status_code is StatusCode.ERROR
    assert hand_out.attributes is not None and hand_out.attributes["error.type"] == "NETWORK_ERROR"
    # The copy's context is the retry span's, in the same trace, tracestate kept.
    carried = parse_traceparent(copy.props.headers["traceparent"])
    assert carried is not None and carried.trace_id == TRACE_ID
    assert carried.parent_id == span_id(retry)
    assert copy.props.headers["tracestate"] == "congo=t61rcWkgMzE"
    exporter.clear()

    # The copy comes back from its tier and fails its last attempt: dead-lettered.
    broker.deliver(message(2, copy.props.headers))
    with trio.fail_after(5):
        (again,) = await engine.pull(1, 5, wait=1.0)
    assert again.attempt == 2
    assert engine.fail(1, again.id, "NETWORK_ERROR", "reset again", None)
    (record,) = dead_letters.records
    assert record.traceId == TRACE_ID
    second = by_name(exporter.get_finished_spans())
    assert set(second) == {"receive work", "hand-out work", "dead-letter work", "ack work"}
    assert parent_of(second["receive work"]) == span_id(retry)  # the retry span goes on
    dead = second["dead-letter work"]
    assert parent_of(dead) == span_id(second["receive work"])
    assert {trace_of(s) for s in second.values()} == {TRACE_ID}
    attributes = dead.attributes
    assert attributes is not None
    assert attributes["sidecar.dlq.record_id"] == record.id
    assert attributes["sidecar.failure_reason"] == "NETWORK_ERROR"
    assert attributes["sidecar.attempt_count"] == 2
    assert attributes["sidecar.error_message"] == "reset again"
    assert attributes["sidecar.processing_host"] == record.processingHost
    assert attributes["sidecar.agent_name"] == "agent"
    assert attributes["messaging.destination.name"] == "work"
    assert second["receive work"].attributes["sidecar.outcome"] == "dead_lettered"  # type: ignore[index]


async def test_a_message_without_context_starts_a_trace_its_record_names(exporter) -> None:
    engine, broker, dead_letters = make_engine(exporter)
    broker.deliver(message(1))
    with trio.fail_after(5):
        (delivery,) = await engine.pull(1, 5, wait=1.0)
    started = parse_traceparent(delivery.headers["traceparent"])
    assert started is not None
    assert engine.fail(1, delivery.id, "VALIDATION_FAILED", "bad", None)
    (record,) = dead_letters.records
    assert record.traceId == started.trace_id
    receive = by_name(exporter.get_finished_spans())["receive work"]
    assert receive.parent is None and trace_of(receive) == started.trace_id


async def test_an_unsampled_trace_exports_nothing_and_keeps_the_publishers_trace_id(
    exporter,
) -> None:
    engine, broker, dead_letters = make_engine(exporter, sample_ratio=0.0)
    unsampled = f"00-{TRACE_ID}-{PUBLISHER_SPAN}-00"
    broker.deliver(message(1, {"traceparent": unsampled}), message(2))
    with trio.fail_after(5):
        first, second = await engine.pull(1, 5, wait=1.0)
    # The publisher's decision (not sampled) is followed; the context still goes on.
    handed = parse_traceparent(first.headers["traceparent"])
    assert handed is not None and handed.trace_id == TRACE_ID and not handed.sampled
    assert engine.fail(1, first.id, "VALIDATION_FAILED", "bad", None)
    assert engine.fail(1, second.id, "VALIDATION_FAILED", "bad", None)
    assert exporter.get_finished_spans() == ()
    traced, untraced = dead_letters.records
    assert traced.traceId == TRACE_ID
    assert untraced.traceId is None  # no trace was recorded that it could point at


async def test_requeued_on_drain_ends_the_spans_without_an_ack(exporter, autojump_clock) -> None:
    engine, broker, _ = make_engine(exporter)
    broker.deliver(message(1, {"traceparent": TRACEPARENT}))
    with trio.fail_after(60):
        await engine.pull(1, 5, wait=1.0)
        await engine.drain(grace=1.0)
    assert broker.settled == [(1, True)]
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"receive work", "hand-out work"}
    assert spans["receive work"].attributes["sidecar.outcome"] == "requeued"  # type: ignore[index]


async def test_without_a_tracer_the_agent_sees_the_publishers_context_unchanged() -> None:
    config = load_config(environ={}, overrides={})
    broker = FakeBroker()
    metrics = Metrics()
    ledger = ledger_from(config, random=random.Random(7).random, meter=MetricsMeter(metrics))
    engine = Engine(ledger, broker, FakeDeadLetters(), metrics)
    engine.open_session(1, "agent", "1.0", None)
    broker.deliver(message(1, {"traceparent": TRACEPARENT}))
    with trio.fail_after(5):
        (delivery,) = await engine.pull(1, 5, wait=1.0)
    assert delivery.headers["traceparent"] == TRACEPARENT
    assert engine.fail(1, delivery.id, "NETWORK_ERROR", "reset", None)
    (copy,) = broker.published
    assert copy.props.headers["traceparent"] == TRACEPARENT


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-" + "a" * 1_000_000, "tracestate": "x" * 1_000_000},
        {"traceparent": TRACEPARENT.encode(), "tracestate": b"\xff\xfe"},
        {"traceparent": {"nested": [TRACEPARENT]}, "tracestate": ["rojo=1"]},
        {"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01", "tracestate": "=,=,="},
    ],
)
async def test_hostile_trace_headers_are_ignored_and_the_message_is_traced_anyway(
    exporter, headers
) -> None:
    engine, broker, dead_letters = make_engine(exporter)
    broker.deliver(message(1, headers, message_id="m" * 100_000))
    with trio.fail_after(5):
        (delivery,) = await engine.pull(1, 5, wait=1.0)
    assert engine.fail(1, delivery.id, "VALIDATION_FAILED", "e" * 100_000, None)
    assert broker.settled == [(1, False)]
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"receive work", "hand-out work", "dead-letter work", "ack work"}
    receive = spans["receive work"]
    valid_parent = isinstance(headers["traceparent"], bytes)
    assert (receive.parent is not None) is valid_parent
    (record,) = dead_letters.records
    assert record.traceId == trace_of(receive)
    for span in spans.values():  # hostile values are cut, not copied whole into spans
        for value in (span.attributes or {}).values():
            assert not isinstance(value, str) or len(value) <= MAX_ATTRIBUTE_LENGTH


async def test_a_tracer_that_fails_never_stops_a_message(exporter, caplog) -> None:
    engine, broker, dead_letters = make_engine(exporter)
    assert isinstance(engine.tracer, OtelTracer)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter exploded")

    engine.tracer._tracer.start_span = broken  # type: ignore[method-assign]
    broker.deliver(message(1, {"traceparent": TRACEPARENT}), message(2), message(3))
    with trio.fail_after(5):
        first, second, third = await engine.pull(1, 5, wait=1.0)
    assert first.headers["traceparent"] == TRACEPARENT  # handed out as it came
    engine.ack(1, [first.id])
    assert engine.fail(1, second.id, "NETWORK_ERROR", "reset", None)
    (copy,) = broker.published
    copy.on_done(None)
    assert engine.fail(1, third.id, "VALIDATION_FAILED", "bad", None)
    assert broker.settled == [(1, False), (2, False), (3, False)]
    (record,) = dead_letters.records
    assert record.traceId is None
    assert engine.tracer.failures > 0
    assert sum("tracing failed" in r.getMessage() for r in caplog.records) == 1
