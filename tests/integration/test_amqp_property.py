"""Property test from the broker's side: hypothesis-generated AMQP messages (random
properties, headers of every AMQP field type including extremes, bodies including deep
nesting and invalid UTF-8) published straight to the consumed queue while an agent fails
some of them. Whatever arrives, the daemon never exits or loops its connection, and every
message ends acked by the agent or in the DLQ.

Not generated: ``expiration`` (the broker would drop the message, so "acked or dead-
lettered" could not hold), non-finite floats in headers (RabbitMQ itself closes the
publisher's connection on them; the sidecar refuses them from agents, see
test_hostile_input), and integers beyond signed 64 bits (AMQP has none).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import aiormq
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sidecar import attempts
from sidecar.client import open_agent
from sidecar.core.messages import tier_queue_name
from sidecar.store.records import RecordFilter
from tests.helpers import (
    TEST_TIERS,
    amqp,
    delete_queues,
    make_config,
    queue_count,
    running_sidecar,
    until,
)

pytestmark = pytest.mark.integration

N_HEADER = "x-test-n"


class FarTimestamp(datetime):
    """A timestamp beyond what Python's datetime holds, as raw seconds on the wire."""

    seconds: int = 2**63 - 1

    def timestamp(self) -> float:
        return self.seconds  # type: ignore[return-value]


def far_timestamp(seconds: int) -> datetime:
    value = FarTimestamp(2024, 1, 1, tzinfo=UTC)
    value.seconds = seconds
    return value


short_text = st.text(max_size=30)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    st.sampled_from([2**63 - 1, 2**64 - 1, 2**40, 253402300800 * 1000 + 1]).map(far_timestamp),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    int64,
    st.integers(min_value=-128, max_value=127),
    st.floats(allow_nan=False, allow_infinity=False),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6
    ),
    short_text,
    st.binary(max_size=40).map(bytearray),
    timestamps,
)


def deep(depth: int, as_list: bool) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if as_list else {"d": value}
    return value


header_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=8), scalars, max_size=4),
    st.tuples(st.integers(min_value=30, max_value=200), st.booleans()).map(lambda t: deep(*t)),
)
sidecar_headers = st.fixed_dictionaries(
    {},
    optional={
        attempts.ATTEMPTS: st.one_of(
            int64, st.floats(allow_nan=False, allow_infinity=False), short_text, st.just(3e38)
        ),
        attempts.FIRST_FAILURE_AT: st.one_of(
            st.just("2024-01-01T00:00:00"), short_text, timestamps, int64
        ),
        attempts.SUSPECT: st.one_of(int64, short_text),
        attempts.LAST_ERROR: st.one_of(short_text, header_values),
        attempts.REDUCED_SCOPE: header_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    st.integers(min_value=1, max_value=120_000).map(lambda d: b"[" * d + b"]" * d),
    st.just(b"\xff\xfe\xfd invalid utf-8 \xc3\x28"),
    st.just(b'{"a": [1, {"b": null}], "c": "\\ud800"}'),
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "message_id": st.text(max_size=40),
        "content_type": st.text(max_size=20),
        "content_encoding": st.text(max_size=20),
        "correlation_id": st.text(max_size=40),
        "reply_to": st.text(max_size=20),
        "priority": st.integers(min_value=0, max_value=255),
        "timestamp": timestamps,
        "message_type": st.text(max_size=20),
        "app_id": st.text(max_size=20),
        "user_id": st.just("guest"),
    },
)
messages = st.lists(
    st.tuples(
        bodies,
        properties,
        st.dictionaries(st.text(min_size=1, max_size=12), header_values, max_size=5),
        sidecar_headers,
    ),
    min_size=10,
    max_size=25,
)


async def publish(queue: str, batch: list[tuple[bytes, dict[str, Any], dict[str, Any]]]) -> None:
    async def go(channel: Any) -> None:
        await channel.queue_declare(queue, durable=True)
        for body, props, headers in batch:
            await channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(delivery_mode=2, headers=headers, **props),
            )

    await amqp(go)


def outcome(n: int) -> str | None:
    """What the agent does with message n: fail some for good, some transiently, ack the
    rest (a transient failure is acked the second time)."""
    return {0: "VALIDATION_FAILED", 1: "NETWORK_ERROR"}.get(n % 3)


@settings(
    max_examples=15,
    # No shrinking: each example runs a sidecar against the broker, and shrinking one
    # takes minutes; the failing example is printed as generated.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=messages)
async def test_any_amqp_message_ends_acked_or_dead_lettered(tmp_path_factory, rabbitmq, batch):
    queue = f"prop.{uuid.uuid4().hex[:10]}"
    tmp_path = tmp_path_factory.mktemp("prop")
    config = make_config(
        tmp_path,
        [queue],
        retry={"max_attempts": 2},
        breaker={"failure_threshold": 10_000, "min_calls_in_window": 10_000},
    )
    wire = []
    for n, (body, props, headers, ours) in enumerate(batch):
        wire.append((body, props, {**headers, **ours, N_HEADER: n}))
    acked: set[int] = set()
    try:
        with trio.fail_after(120):
            async with running_sidecar(config) as sidecar:
                await publish(queue, wire)
                async with open_agent(config.agent.socket, agent="prop", queues=[queue]) as agent:
                    while len(acked) + sidecar.store.count() < len(wire):
                        for m in await agent.pull(10, wait=0.5):
                            n = m.headers[N_HEADER]
                            reason = outcome(n)
                            if reason == "VALIDATION_FAILED" or (reason and m.attempt == 1):
                                await agent.fail(m.id, reason, f"generated failure {n}")
                            else:
                                await agent.ack([m.id])
                                acked.add(n)
                records = sidecar.store.find(RecordFilter(queue=queue), limit=1000)
                dead = {r.headers[N_HEADER] for r in records}
                assert len(records) == len(dead), "one record per message"
                assert acked | dead == set(range(len(wire)))
                assert not acked & dead
                assert sidecar.broker.reconnects == 0, sidecar.broker.last_error
                assert sidecar.broker.is_connected
                await until(lambda: not sidecar.broker.unsettled)
        assert await queue_count(queue) == 0
    finally:
        await trio.to_thread.run_sync(
            delete_queues,
            [queue, *(tier_queue_name("sidecar.retry", queue, t) for t in TEST_TIERS)],
        )
