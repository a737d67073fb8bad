"""OpenTelemetry spans for the delivery path (the ``Tracer`` port), exported over OTLP/HTTP.

Imported only when ``[tracing] enabled = true``: with tracing off no OpenTelemetry module
is loaded and the engine does no span work at all.

Per message, parented on the publisher's ``traceparent`` when it carried a valid one:

    receive <queue>        CONSUMER; from hand-out to the broker ack (or requeue)
      hand-out <queue>     the agent's work: from the hand-out to its answer; its context is
                           the ``traceparent`` the agent receives, so the agent's own spans
                           and publishes continue the trace
      retry <queue>        PRODUCER; the copy to a delay tier, until the broker confirms it;
                           the copy carries this span's context
      dead-letter <queue>  the DLQ write, until durable; the record's fields as attributes
      ack <queue>          the broker ack that ends the message's time here

Attribute names follow the OpenTelemetry messaging conventions where one fits
(``messaging.system``, ``messaging.destination.name``, ``messaging.message.id`` ...);
the rest are ``sidecar.*``. Attribute values are cut to ``MAX_ATTRIBUTE_LENGTH``: they come
from message headers and agents' error texts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from opentelemetry import trace as otel
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from sidecar import __version__, attempts
from sidecar.config import TracingConfig
from sidecar.core.messages import Inbound, MessageProps
from sidecar.protocol import Delivery
from sidecar.store.records import DeadLetterRecord
from sidecar.tracecontext import TRACEPARENT, TRACESTATE, format_traceparent, trace_context

__all__ = ["MAX_ATTRIBUTE_LENGTH", "OtelTracer", "otlp_tracer"]

log = logging.getLogger("sidecar.tracing")

MAX_ATTRIBUTE_LENGTH = 1024
# Spans waiting for export; beyond it the SDK drops new ones rather than grow.
MAX_QUEUED_SPANS = 4096


@dataclass(slots=True)
class _Spans:
    """The open spans of one message (kept on ``Inbound.trace``)."""

    receive: Span
    context: Context  # the receive span's, to parent the others
    hand_out: Span | None = None
    step: Span | None = None  # the retry or dead-letter span in progress
    outcome: str = "processed"


class OtelTracer:
    """The ``Tracer`` port on the OpenTelemetry SDK."""

    def __init__(
        self,
        *,
        service_name: str,
        host: str,
        sample_ratio: float = 1.0,
        exporter: SpanExporter,
        batch: bool = True,
        export_timeout: float = 10.0,
    ) -> None:
        """``batch`` exports from a background thread (the daemon's choice); without it
        each span is exported as it ends (tests with the SDK's in-memory exporter)."""
        resource = Resource.create(
            {"service.name": service_name, "service.version": __version__, "host.name": host}
        )
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_LENGTH),
        )
        processor: SpanProcessor = (
            BatchSpanProcessor(
                exporter,
                max_queue_size=MAX_QUEUED_SPANS,
                export_timeout_millis=export_timeout * 1000,
            )
            if batch
            else SimpleSpanProcessor(exporter)
        )
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("sidecar", __version__)
        self.failures = 0  # tracing steps that raised (logged once)

    # --- the port ----------------------------------------------------------------------
    # Tracing never stands in the way of a message: whatever fails here is logged once and
    # the message goes on untraced (its ack, retry or dead letter happens all the same).

    def handed_out(self, message: Inbound, delivery: Delivery) -> None:
        try:
            self._handed_out(message, delivery)
        except Exception:
            self._failed("hand-out")

    def settled(self, message: Inbound, *, requeue: bool) -> None:
        try:
            self._settled(message, requeue=requeue)
        except Exception:
            message.trace = None
            self._failed("settle")

    def retrying(self, message: Inbound, props: MessageProps, routing_key: str) -> MessageProps:
        try:
            return self._retrying(message, props, routing_key)
        except Exception:
            self._failed("retry")
            return props

    def retried(self, message: Inbound, error: str | None) -> None:
        try:
            self._retried(message, error)
        except Exception:
            self._failed("retry confirm")

    def dead_lettering(self, message: Inbound, record: DeadLetterRecord) -> DeadLetterRecord:
        try:
            return self._dead_lettering(message, record)
        except Exception:
            self._failed("dead-letter")
            return record

    def dead_lettered(self, message: Inbound) -> None:
        try:
            self._dead_lettered(message)
        except Exception:
            self._failed("dead-letter durable")

    def _failed(self, step: str) -> None:
        self.failures += 1
        if self.failures == 1:
            log.exception("tracing failed at %s; the message goes on untraced", step)

    def _handed_out(self, message: Inbound, delivery: Delivery) -> None:
        spans = self._spans(message)
        if spans.hand_out is not None:  # handed out again without an answer: close the old
            spans.hand_out.end()
        hand_out = self._tracer.start_span(
            f"hand-out {message.queue}",
            context=spans.context,
            attributes={
                **_brief_attributes(message),
                "messaging.operation.type": "process",
                "sidecar.delivery_id": delivery.id,
                "sidecar.attempt": delivery.attempt,
            },
        )
        spans.hand_out = hand_out
        _inject(delivery.headers, hand_out)

    def _settled(self, message: Inbound, *, requeue: bool) -> None:
        spans: _Spans | None = message.trace
        if spans is None:
            return
        message.trace = None
        if spans.hand_out is not None:
            spans.hand_out.end()
        if spans.step is not None:
            spans.step.end()
        if requeue:
            spans.outcome = "requeued"
        else:
            self._tracer.start_span(
                f"ack {message.queue}",
                context=spans.context,
                attributes={
                    **_brief_attributes(message),
                    "messaging.operation.type": "settle",
                    "sidecar.outcome": spans.outcome,
                },
            ).end()
        spans.receive.set_attribute("sidecar.outcome", spans.outcome)
        spans.receive.end()

    def _retrying(self, message: Inbound, props: MessageProps, routing_key: str) -> MessageProps:
        spans = self._spans(message)
        failures = attempts.read_failures(props.headers)
        last = failures[-1] if failures else {}
        reason, error = str(last.get("reason", "")), str(last.get("error", ""))
        self._answered(spans, reason, error)
        attributes = {
            **_message_attributes(message),
            "messaging.operation.type": "send",
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "sidecar.retry.queue": routing_key,
        }
        if last:
            attributes["sidecar.failure_reason"] = reason
            attributes["sidecar.attempt_count"] = _int(last.get("attempt"))
        if props.expiration is not None:
            attributes["sidecar.retry.delay_ms"] = _int(props.expiration)
        retry = self._tracer.start_span(
            f"retry {message.queue}",
            context=spans.context,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )
        spans.step, spans.outcome = retry, "retried"
        headers = dict(props.headers)
        _inject(headers, retry)
        return props.replace_headers(headers)

    def _retried(self, message: Inbound, error: str | None) -> None:
        spans: _Spans | None = message.trace
        if spans is None or spans.step is None:
            return
        if error is not None:
            spans.step.set_status(Status(StatusCode.ERROR, error[:MAX_ATTRIBUTE_LENGTH]))
        spans.step.end()
        spans.step = None

    def _dead_lettering(self, message: Inbound, record: DeadLetterRecord) -> DeadLetterRecord:
        spans = self._spans(message)
        self._answered(spans, record.failureReason, record.errorMessage)
        span = self._tracer.start_span(
            f"dead-letter {message.queue}",
            context=spans.context,
            attributes={
                **_message_attributes(message),
                "messaging.operation.type": "send",
                **_record_attributes(record),
            },
        )
        spans.step, spans.outcome = span, "dead_lettered"
        context = span.get_span_context()
        if record.traceId is None and span.is_recording():
            # The message came without a trace: the record points at the one begun here.
            record = msgspec.structs.replace(record, traceId=f"{context.trace_id:032x}")
        return record

    def _dead_lettered(self, message: Inbound) -> None:
        spans: _Spans | None = message.trace
        if spans is None or spans.step is None:
            return
        spans.step.end()
        spans.step = None

    def close(self) -> None:
        self.provider.shutdown()

    # --- inside ------------------------------------------------------------------------

    def _spans(self, message: Inbound) -> _Spans:
        """The message's open spans, opening its receive span on first sight."""
        spans: _Spans | None = message.trace
        if spans is None:
            receive = self._tracer.start_span(
                f"receive {message.queue}",
                context=_parent(message.props.headers),
                kind=SpanKind.CONSUMER,
                attributes={
                    **_message_attributes(message),
                    "messaging.operation.type": "receive",
                    "sidecar.redelivered": message.redelivered,
                },
            )
            spans = _Spans(receive, otel.set_span_in_context(receive))
            message.trace = spans
        return spans

    @staticmethod
    def _answered(spans: _Spans, reason: str, error: str) -> None:
        """The agent's work ended in a failure (or a deadline): close the hand-out span."""
        hand_out = spans.hand_out
        if hand_out is None:
            return
        spans.hand_out = None
        if reason:
            hand_out.set_attribute("error.type", reason)
            hand_out.set_status(
                Status(StatusCode.ERROR, f"{reason}: {error}"[:MAX_ATTRIBUTE_LENGTH])
            )
        hand_out.end()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def _parent(headers: Mapping[str, Any]) -> Context | None:
    """The publisher's span as the parent, when the message carried a valid context."""
    found = trace_context(headers)
    if found is None:
        return None
    state = TraceState.from_header([found.state]) if found.state else None
    parent = SpanContext(
        trace_id=int(found.trace_id, 16),
        span_id=int(found.parent_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(found.flags & TraceFlags.SAMPLED),
        trace_state=state,
    )
    return otel.set_span_in_context(NonRecordingSpan(parent))


def _inject(headers: dict[str, Any], span: Span) -> None:
    """Put ``span``'s context in ``headers`` as W3C ``traceparent`` / ``tracestate``."""
    context = span.get_span_context()
    headers[TRACEPARENT] = format_traceparent(
        f"{context.trace_id:032x}", f"{context.span_id:016x}", int(context.trace_flags)
    )
    state = context.trace_state.to_header() if context.trace_state else ""
    if state:
        headers[TRACESTATE] = state
    else:
        headers.pop(TRACESTATE, None)


def _brief_attributes(message: Inbound) -> dict[str, Any]:
    """For the hand-out and ack spans: their receive span (the parent) has the rest, and
    every attribute costs its cleaning per span."""
    return {"messaging.system": "rabbitmq", "messaging.destination.name": message.queue}


def _message_attributes(message: Inbound) -> dict[str, Any]:
    props = message.props
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": message.queue,
        "messaging.rabbitmq.destination.routing_key": message.routing_key,
        "messaging.message.body.size": len(message.body),
    }
    if props.message_id is not None:
        attributes["messaging.message.id"] = props.message_id
    if props.correlation_id is not None:
        attributes["messaging.message.conversation_id"] = props.correlation_id
    return attributes


def _record_attributes(record: DeadLetterRecord) -> dict[str, Any]:
    """The dead-letter record's fields, as the DLQ tools name them."""
    return {
        "sidecar.dlq.record_id": record.id,
        "sidecar.dlq.original_queue": record.originalQueue,
        "sidecar.failure_reason": record.failureReason,
        "error.type": record.failureReason,
        "sidecar.error_message": record.errorMessage,
        "sidecar.error_signature": record.signature,
        "sidecar.attempt_count": record.attemptCount,
        "sidecar.first_failure_at": record.firstFailureAt.isoformat(),
        "sidecar.last_failure_at": record.lastFailureAt.isoformat(),
        "sidecar.processing_host": record.processingHost,
        "sidecar.agent_name": record.agentName,
        "sidecar.agent_version": record.agentVersion,
    }


def otlp_tracer(settings: TracingConfig, host: str) -> OtelTracer:
    """The daemon's tracer: spans batched to the OTLP/HTTP endpoint the config names."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(
        endpoint=settings.endpoint,
        headers=dict(settings.headers),
        timeout=settings.timeout,
    )
    return OtelTracer(
        service_name=settings.service_name,
        host=host,
        sample_ratio=settings.sample_ratio,
        exporter=exporter,
        export_timeout=settings.timeout,
    )
