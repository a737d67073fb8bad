"""W3C trace context through the sidecar, against the real RabbitMQ: from the publisher's
headers to the agent, the agent's own publishes, retries and the DLQ record (``dlq show``);
and, with tracing enabled, the spans: in the SDK's in-memory exporter, and over OTLP/HTTP
to a receiver this test runs."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.adapters.tracing import OtelTracer
from sidecar.client import Failure, open_agent
from sidecar.client_asyncio import AsyncioAgent
from sidecar.protocol import Delivery
from sidecar.store.records import RecordFilter
from sidecar.tracecontext import parse_traceparent
from tests.helpers import make_config, running_sidecar, until
from tests.tools.helpers import cli, drain, publish

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PUBLISHER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PUBLISHER_SPAN}-01"
TRACESTATE = "rojo=00f067aa0ba902b7"


def publish_traced(queue: str, body: bytes, **headers: Any) -> None:
    publish(
        queue,
        [
            (
                body,
                {
                    "message_id": "job-7",
                    "delivery_mode": 2,
                    "headers": {"traceparent": TRACEPARENT, "tracestate": TRACESTATE, **headers},
                },
            )
        ],
    )


def trace_of_header(message: Any) -> str | None:
    headers = message.header.properties.headers or {}
    value = headers.get("traceparent")
    context = parse_traceparent(value)
    return None if context is None else context.trace_id


async def test_a_trace_id_published_with_a_message_is_found_in_its_dlq_record(
    tmp_path: Path, unique_queue: Any
) -> None:
    """Tracing off (the default): the context still travels. The agent sees it, its own
    publishes carry it, the retry copy keeps it, and the record and ``dlq show`` name it."""
    queue, out = unique_queue(), unique_queue("out")
    await trio.to_thread.run_sync(publish, out, [])
    await trio.to_thread.run_sync(publish_traced, queue, b'{"url": "https://example.com"}')
    config = make_config(tmp_path, [queue], retry={"max_attempts": 2})
    seen: list[Delivery] = []

    async def handle(message: Delivery) -> None:
        seen.append(message)
        # Published inside the handler: it continues the message's trace by itself.
        await agent.publish(b"derived", queue=out)
        raise Failure("NETWORK_ERROR", "upstream reset")

    with trio.fail_after(40):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="scraper", queues=[queue]) as agent:
                # Outside a handler the delivery is named explicitly.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(agent.run, handle)
                    await until(lambda: sidecar.store.count(RecordFilter(queue=queue)) == 1)
                    nursery.cancel_scope.cancel()
                await agent.publish(b"explicit", queue=out, trace=seen[0])
            (record,) = sidecar.store.find(RecordFilter(queue=queue))
    assert [m.attempt for m in seen] == [1, 2]
    for message in seen:
        assert message.headers["traceparent"] == TRACEPARENT  # the retry kept it as it was
        assert message.headers["tracestate"] == TRACESTATE
    assert record.traceId == TRACE_ID
    assert record.failureReason == "NETWORK_ERROR" and record.attemptCount == 2
    published = await trio.to_thread.run_sync(drain, out)
    assert [bytes(m.body) for m in published] == [b"derived", b"derived", b"explicit"]
    assert [trace_of_header(m) for m in published] == [TRACE_ID] * 3
    assert all(m.header.properties.headers["tracestate"] == TRACESTATE for m in published)

    shown = await trio.to_thread.run_sync(
        lambda: cli("dlq", "show", record.id, "--store", f"sqlite:///{tmp_path / 'dlq.sqlite3'}")
    )
    assert shown.returncode == 0, shown.stderr
    (line,) = [line for line in shown.stdout.splitlines() if line.startswith("traceId")]
    assert line.split() == ["traceId", TRACE_ID]
    listed = await trio.to_thread.run_sync(
        lambda: cli("dlq", "list", "--json", "--store", f"sqlite:///{tmp_path / 'dlq.sqlite3'}")
    )
    assert listed.returncode == 0, listed.stderr
    assert [r["traceId"] for r in json.loads(listed.stdout)["records"]] == [TRACE_ID]


async def test_an_agent_may_set_its_own_traceparent_and_an_invalid_one_is_not_read(
    tmp_path: Path, unique_queue: Any
) -> None:
    queue, out = unique_queue(), unique_queue("out")
    await trio.to_thread.run_sync(publish, out, [])
    await trio.to_thread.run_sync(
        lambda: publish(
            queue,
            [(b"bad", {"headers": {"traceparent": "00-" + "f" * 200}, "delivery_mode": 2})],
        )
    )
    own = f"00-{'1' * 32}-{'2' * 16}-01"
    config = make_config(tmp_path, [queue])
    with trio.fail_after(40):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                (message,) = await agent.pull(1, wait=5)
                # Its own context wins over the delivery's.
                await agent.publish(b"own", queue=out, trace=message, headers={"traceparent": own})
                await agent.fail(message.id, "VALIDATION_FAILED", "bad")
                await until(lambda: sidecar.store.count(RecordFilter(queue=queue)) == 1)
            (record,) = sidecar.store.find(RecordFilter(queue=queue))
    assert record.traceId is None  # an invalid traceparent is ignored, never an error
    assert record.headers["traceparent"] == "00-" + "f" * 200  # but kept as it came
    (published,) = await trio.to_thread.run_sync(drain, out)
    assert published.header.properties.headers["traceparent"] == own


async def test_spans_with_tracing_enabled_in_memory(tmp_path: Path, unique_queue: Any) -> None:
    queue, out = unique_queue(), unique_queue("out")
    await trio.to_thread.run_sync(publish, out, [])
    await trio.to_thread.run_sync(publish_traced, queue, b"payload")
    exporter = InMemorySpanExporter()
    tracer = OtelTracer(service_name="sidecar", host="h1", exporter=exporter, batch=False)
    config = make_config(tmp_path, [queue], tracing={"enabled": True})
    handed: list[Delivery] = []
    with trio.fail_after(40):
        async with running_sidecar(config, tracer=tracer) as sidecar:
            async with open_agent(config.agent.socket, agent="parser", queues=[queue]) as agent:
                while len(handed) < 2:
                    for message in await agent.pull(1, wait=1):
                        handed.append(message)
                        if message.attempt == 1:
                            await agent.publish(b"child", queue=out, trace=message)
                            await agent.fail(message.id, "NETWORK_ERROR", "reset")
                        else:
                            await agent.fail(message.id, "VALIDATION_FAILED", "field url")
                await until(lambda: sidecar.store.count(RecordFilter(queue=queue)) == 1)
                await until(lambda: len(sidecar.engine.in_flight) == 0)
            (record,) = sidecar.store.find(RecordFilter(queue=queue))
    spans = exporter.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == sorted(
        [f"receive {queue}"] * 2
        + [f"hand-out {queue}"] * 2
        + [f"ack {queue}"] * 2
        + [f"retry {queue}", f"dead-letter {queue}"]
    )
    assert {f"{s.context.trace_id:032x}" for s in spans if s.context} == {TRACE_ID}
    by_id = {s.context.span_id: s for s in spans if s.context}
    first_receive, second_receive = sorted(
        (s for s in spans if s.name == f"receive {queue}"), key=lambda s: s.start_time or 0
    )
    retry = next(s for s in spans if s.name == f"retry {queue}")
    dead = next(s for s in spans if s.name == f"dead-letter {queue}")
    assert first_receive.parent is not None
    assert f"{first_receive.parent.span_id:016x}" == PUBLISHER_SPAN
    assert retry.parent is not None and by_id[retry.parent.span_id] is first_receive
    # The copy came back from its delay tier carrying the retry span's context.
    assert second_receive.parent is not None and by_id[second_receive.parent.span_id] is retry
    assert dead.parent is not None and by_id[dead.parent.span_id] is second_receive
    assert dead.attributes is not None
    assert dead.attributes["sidecar.dlq.record_id"] == record.id
    assert dead.attributes["sidecar.failure_reason"] == "VALIDATION_FAILED"
    assert dead.attributes["sidecar.attempt_count"] == 2
    assert dead.attributes["messaging.system"] == "rabbitmq"
    assert dead.attributes["messaging.destination.name"] == queue
    assert dead.attributes["messaging.message.id"] == "job-7"
    assert record.traceId == TRACE_ID
    # What the agent got, and what it published, hang under the hand-out spans.
    hand_outs = {s.context.span_id for s in spans if s.name == f"hand-out {queue}" and s.context}
    for message in handed:
        context = parse_traceparent(message.headers["traceparent"])
        assert context is not None and context.trace_id == TRACE_ID
        assert int(context.parent_id, 16) in hand_outs
    (child,) = await trio.to_thread.run_sync(drain, out)
    assert child.header.properties.headers["traceparent"] == handed[0].headers["traceparent"]


def run_asyncio_handler(socket: str, queue: str, out: str) -> list[Delivery]:
    """An asyncio agent whose handler publishes, then stops after the first message."""
    handled: list[Delivery] = []

    async def main() -> None:
        agent = await AsyncioAgent.connect(socket, agent="aio", queues=[queue])

        async def handle(message: Delivery) -> None:
            handled.append(message)
            await agent.publish(b"from asyncio", queue=out)

        try:
            await agent.run_batches(handle, batch=1, wait=1.0, stop=lambda: bool(handled))
        finally:
            await agent.close()

    loop = asyncio.SelectorEventLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return handled


async def test_the_asyncio_client_carries_the_trace_into_publishes(
    tmp_path: Path, unique_queue: Any
) -> None:
    queue, out = unique_queue(), unique_queue("out")
    await trio.to_thread.run_sync(publish, out, [])
    await trio.to_thread.run_sync(publish_traced, queue, b"payload")
    config = make_config(tmp_path, [queue])
    with trio.fail_after(40):
        async with running_sidecar(config) as sidecar:
            (handled,) = await trio.to_thread.run_sync(
                run_asyncio_handler, config.agent.socket, queue, out
            )
            await until(lambda: sidecar.engine.counts["acked"] == 1)
    assert handled.headers["traceparent"] == TRACEPARENT
    (published,) = await trio.to_thread.run_sync(drain, out)
    assert published.header.properties.headers["traceparent"] == TRACEPARENT
    assert published.header.properties.headers["tracestate"] == TRACESTATE


# --- an OTLP/HTTP receiver ---------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    requests: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.requests.append(  # type: ignore[attr-defined]
            (self.path, {k.lower(): v for k, v in self.headers.items()}, request)
        )  # type: ignore[attr-defined]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def otlp_receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_spans_arrive_at_an_otlp_http_receiver(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue()
    await trio.to_thread.run_sync(publish_traced, queue, b"payload")
    headers_file = tmp_path / "otlp-headers"
    headers_file.write_text("x-api-key=k-123\n")
    with otlp_receiver() as server:
        port = server.server_address[1]
        config = make_config(
            tmp_path,
            [queue],
            tracing={
                "enabled": True,
                "endpoint": f"http://127.0.0.1:{port}/v1/traces",
                "service_name": "sidecar-otlp-test",
                "headers_file": str(headers_file),
                "timeout": 5.0,
            },
        )
        with trio.fail_after(40):
            async with running_sidecar(config) as sidecar:
                assert isinstance(sidecar.tracer, OtelTracer)
                async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                    (message,) = await agent.pull(1, wait=5)
                    await agent.ack([message.id])
                    await until(lambda: sidecar.engine.counts["acked"] == 1)
            # Stopping the sidecar exported what was still batched.
        requests = list(server.requests)  # type: ignore[attr-defined]
    assert requests, "no export reached the receiver"
    spans = []
    for path, headers, request in requests:
        assert path == "/v1/traces"
        assert headers["x-api-key"] == "k-123"
        assert headers["content-type"] == "application/x-protobuf"
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "sidecar-otlp-test"
            for scope in resource_spans.scope_spans:
                spans.extend(scope.spans)
    assert sorted(s.name for s in spans) == sorted(
        [f"receive {queue}", f"hand-out {queue}", f"ack {queue}"]
    )
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    receive = next(s for s in spans if s.name == f"receive {queue}")
    assert receive.parent_span_id.hex() == PUBLISHER_SPAN
    attributes = {a.key: a.value for a in receive.attributes}
    assert attributes["messaging.destination.name"].string_value == queue
    assert attributes["sidecar.outcome"].string_value == "processed"
