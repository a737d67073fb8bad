"""What a careless producer or a hostile client sends, against a real sidecar and RabbitMQ:
the daemon keeps serving, keeps its broker connection, and every message ends acked or in
the DLQ. One test per finding of the hardening review."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import aiormq
import msgspec
import pytest
import trio

from sidecar import attempts
from sidecar import protocol as p
from sidecar.client import open_agent
from sidecar.runtime.engine import MALFORMED_MESSAGE
from sidecar.store.records import RecordFilter
from sidecar.supervisor import Sidecar
from tests.helpers import amqp, make_config, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


class _FarFuture(datetime):
    """A timestamp property of 2^63-1 on the wire (no real datetime reaches it)."""

    def timestamp(self) -> float:
        return 2**63 - 1  # type: ignore[return-value]


async def publish_raw(queue: str, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Publish straight to the broker, properties as given (``headers`` included)."""

    async def go(channel: Any) -> None:
        await channel.queue_declare(queue, durable=True)
        for body, props in messages:
            await channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(delivery_mode=2, **props),
            )

    await amqp(go)


async def make_exchange(exchange: str, queue: str) -> None:
    async def go(channel: Any) -> None:
        await channel.exchange_declare(exchange, exchange_type="direct", auto_delete=False)
        await channel.queue_bind(queue, exchange, routing_key="k")

    await amqp(go)


async def consume_all(
    sidecar: Sidecar, socket: str, queue: str, total: int, *, fail: Any = None
) -> dict[str, int]:
    """Pull until ``total`` messages are settled (acked by the agent, or failed with the
    reason ``fail(delivery)`` returns, until they are dead-lettered)."""
    seen = {"acked": 0, "failed": 0}
    async with open_agent(socket, agent="hostile-test", queues=[queue]) as agent:
        while sidecar.engine.counts["acked"] + sidecar.store.count() < total:
            for m in await agent.pull(10, wait=0.5):
                reason = fail(m) if fail is not None else None
                if reason:
                    await agent.fail(m.id, reason, "refused by the test agent")
                    seen["failed"] += 1
                else:
                    await agent.ack([m.id])
                    seen["acked"] += 1
    return seen


async def test_a_timestamp_of_2_63_does_not_loop_the_connection(tmp_path, unique_queue):
    """Finding: 11 reconnects in 15 s, 1 of 5 delivered. Now: 5 of 5, no reconnect."""
    queue = unique_queue()
    config = make_config(tmp_path, [queue])
    far = _FarFuture(2024, 1, 1, tzinfo=UTC)
    bodies = [(f"m{i}".encode(), {"timestamp": far} if i == 1 else {}) for i in range(5)]
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            await publish_raw(queue, bodies)
            await consume_all(sidecar, config.agent.socket, queue, 5)
            assert sidecar.engine.counts["acked"] == 5
            assert sidecar.broker.reconnects == 0
            assert sidecar.broker.is_connected
            await until(lambda: not sidecar.broker.unsettled)
    assert await queue_count(queue) == 0


POISON: list[tuple[str, dict[str, Any], bytes]] = [
    (
        "naive first failure",
        {attempts.ATTEMPTS: 1, attempts.FIRST_FAILURE_AT: "2024-01-01T00:00:00"},
        b"a",
    ),
    ("attempts 2^63-1", {attempts.ATTEMPTS: 2**63 - 1}, b"b"),
    ("attempts 3e38", {attempts.ATTEMPTS: 3e38}, b"c"),
    ("attempts -7", {attempts.ATTEMPTS: -7}, b"d"),
    ("deep json body", {}, b"[" * 100_000 + b"]" * 100_000),
    ("deep header table", {"deep": "table"}, b"f"),
    ("not utf-8 body", {}, b"\xff\xfe\xfd"),
]


def _deep_table(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.mark.parametrize("reason", ["VALIDATION_FAILED", "NETWORK_ERROR"])
async def test_poison_headers_and_bodies_never_crash_the_daemon(tmp_path, unique_queue, reason):
    """Finding: each of these crash-looped the daemon when failed (ValueError,
    OverflowError, RecursionError). Now each ends in the DLQ and the daemon keeps serving."""
    queue = unique_queue()
    # The breaker would (rightly) stop pulling after a run of failures; not under test here.
    config = make_config(
        tmp_path,
        [queue],
        retry={"max_attempts": 2},
        breaker={"failure_threshold": 1000, "min_calls_in_window": 1000},
    )
    messages = []
    for name, headers, body in POISON:
        if headers == {"deep": "table"}:
            headers = {"deep": _deep_table(60)}
        messages.append((body, {"headers": {**headers, "case": name}, "message_id": name}))
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            await publish_raw(queue, messages)
            await consume_all(
                sidecar, config.agent.socket, queue, len(messages), fail=lambda m: reason
            )
            records = sidecar.store.find(RecordFilter(queue=queue), limit=100)
            assert len(records) == len(messages)
            assert {r.headers.get("case") for r in records} == {n for n, _, _ in POISON}
            for record in records:
                assert 1 <= record.attemptCount <= 10_001
                assert record.firstFailureAt.tzinfo is not None
            deep = next(r for r in records if r.headers["case"] == "deep json body")
            assert deep.rawBody == POISON[4][2]
            assert sidecar.broker.reconnects == 0
            await until(lambda: not sidecar.broker.unsettled)
    assert await queue_count(queue) == 0


async def test_an_unhandable_message_is_dead_lettered_as_malformed(tmp_path, unique_queue):
    """A message the engine cannot hand to an agent (here: its key header makes building
    the delivery raise) is dead-lettered as MALFORMED_MESSAGE with its raw body, acked once
    durable, and the next message flows."""
    queue = unique_queue()
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            original = sidecar.engine.ledger._hand_out

            def hand_out(session: int, info: Any, message: Any, *args: Any, **kw: Any) -> Any:
                if message.body == b"poison":
                    raise OverflowError("cannot carry this message")
                return original(session, info, message, *args, **kw)

            sidecar.engine.ledger._hand_out = hand_out  # type: ignore[method-assign]
            await publish_raw(
                queue, [(b"poison", {"headers": {"h": "v"}}), (b"fine", {"headers": {}})]
            )
            await consume_all(sidecar, config.agent.socket, queue, 2)
            (record,) = sidecar.store.find(RecordFilter(queue=queue))
            assert record.failureReason == MALFORMED_MESSAGE
            assert record.rawBody == b"poison" and record.headers == {"h": "v"}
            assert "OverflowError" in record.errorMessage
            assert sidecar.engine.counts["acked"] == 1
            await until(lambda: not sidecar.broker.unsettled)
    assert await queue_count(queue) == 0


async def test_a_publish_header_amqp_cannot_carry_is_refused(tmp_path, unique_queue):
    """Finding: a header value inf made RabbitMQ close the connection (INTERNAL_ERROR) and
    3 messages another agent had acked came back. Now: invalid_publish, nothing else moves."""
    queue, target = unique_queue(), unique_queue()
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            await publish_raw(queue, [(f"m{i}".encode(), {}) for i in range(3)])
            await publish_raw(target, [])
            async with open_agent(config.agent.socket, agent="a", queues=[queue]) as agent:
                got: list[p.Delivery] = []
                while len(got) < 3:
                    got += await agent.pull(3, wait=1)
                await agent.ack([m.id for m in got])
                for bad in ({"h": math.inf}, {"h": math.nan}, {"h": 2**64 - 1}):
                    before = len(agent.errors)
                    await agent.send(p.Publish(ref=7, body=b"x", queue=target, headers=bad))
                    await until(lambda n=before: len(agent.errors) > n)
                    assert agent.errors[-1].code == "invalid_publish"
                    assert agent.errors[-1].ref == 7
                ok = await agent.publish(b"fine", queue=target, headers={"h": 1.5})
                assert ok.ok
            await until(lambda: not sidecar.broker.unsettled)
            assert sidecar.broker.reconnects == 0
    assert await queue_count(queue) == 0
    assert await queue_count(target) == 1


async def test_a_publish_to_a_missing_exchange_breaks_nothing_else(tmp_path, unique_queue):
    """Finding: one publish to a missing exchange broke publishing for good (channel
    closed), retries never came back, /readyz stayed true. Now that publish gets ok=false
    with the reason, and every later publish and retry republish works."""
    queue, target = unique_queue(), unique_queue()
    config = make_config(tmp_path, [queue])
    missing = f"missing.{target}"
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            await publish_raw(target, [])
            async with open_agent(config.agent.socket, agent="a", queues=[queue]) as agent:
                refused = await agent.publish(b"x", exchange=missing, routing_key="k")
                assert not refused.ok and "does not exist" in (refused.error or "")
                # An exchange that vanishes after it was seen: the broker closes the channel
                # (404) on the publish itself; that publish fails, the channel is reopened.
                await make_exchange(missing, target)
                assert (await agent.publish(b"via", exchange=missing, routing_key="k")).ok
                await amqp(lambda channel: channel.exchange_delete(missing))
                gone = await agent.publish(b"x", exchange=missing, routing_key="k")
                assert not gone.ok and "NOT_FOUND" in (gone.error or ""), gone
                results = [await agent.publish(b"%d" % i, queue=target) for i in range(5)]
                assert all(r.ok for r in results), results
                # A retry republish (NETWORK_ERROR) still goes through its delay tier.
                await publish_raw(queue, [(b"retry-me", {})])
                first = []
                while not first:
                    first = await agent.pull(1, wait=1)
                await agent.fail(first[0].id, "NETWORK_ERROR", "try again")
                again: list[p.Delivery] = []
                while not again:
                    again = await agent.pull(1, wait=1)
                assert again[0].body == b"retry-me" and again[0].attempt == 2
                await agent.ack([again[0].id])
            ready, detail = sidecar.ready()
            assert ready and detail["publish_path"] is True
            assert sidecar.broker.reconnects == 0
            await until(lambda: not sidecar.broker.unsettled)
    assert await queue_count(target) == 6
    assert await queue_count(queue) == 0


async def test_a_long_error_string_is_cut_at_the_edge(tmp_path, unique_queue):
    """Finding: a fail with a 60 KB error froze the event loop for 15 s (quadratic
    signature regexes). Now the error is cut to 1024 characters before anything sees it."""
    queue = unique_queue()
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            await publish_raw(queue, [(b"x", {})])
            async with open_agent(config.agent.socket, agent="a", queues=[queue]) as agent:
                got: list[p.Delivery] = []
                while not got:
                    got = await agent.pull(1, wait=1)
                await agent.fail(got[0].id, "VALIDATION_FAILED", "a@" * 65_000)
                await until(lambda: sidecar.store.count() == 1)
            (record,) = sidecar.store.find(RecordFilter(queue=queue))
            assert len(record.errorMessage) == 1024
            await until(lambda: not sidecar.broker.unsettled)


def test_deep_frames_are_refused_over_the_wire_vectors() -> None:
    """The 1-2 KB frame that killed the daemon before authentication is malformed."""
    frame = '{"kind":"hello","agent":"x","queues":[],"pid":' + "[" * 1000 + "]" * 1000 + "}"
    with pytest.raises(p.ProtocolError) as refused:
        p.Codec().decode_agent(frame)
    assert refused.value.code == "malformed"
    assert msgspec.json.encode(refused.value.to_frame(fatal=True))
