"""The agent client's trace carrying, without a sidecar: which headers a publish gets."""

from __future__ import annotations

from typing import Any

import trio

from sidecar import protocol as p
from sidecar.agent.client import AgentCalls, Message, _handling, traced_fields, with_trace

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def delivery(headers: dict[str, Any]) -> p.Delivery:
    return p.Delivery(id=1, queue="q", body=b"", headers=headers)


def test_a_publish_continues_the_deliverys_trace() -> None:
    traced = delivery({"traceparent": TRACEPARENT, "tracestate": "rojo=1", "other": "x"})
    assert with_trace({"headers": {"k": "v"}}, traced) == {
        "headers": {"k": "v", "traceparent": TRACEPARENT, "tracestate": "rojo=1"}
    }
    assert with_trace({}, traced) == {
        "headers": {"traceparent": TRACEPARENT, "tracestate": "rojo=1"}
    }


def test_nothing_is_added_without_a_valid_context_or_over_the_agents_own() -> None:
    own = {"headers": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-00"}}
    assert with_trace(own, delivery({"traceparent": TRACEPARENT})) == own
    assert with_trace({}, delivery({"traceparent": "garbage"})) == {}
    assert with_trace({}, delivery({})) == {}
    assert with_trace({"headers": {"k": 1}}, None) == {"headers": {"k": 1}}


class _Recorder(AgentCalls):
    """Answers nothing; records what a handler run would publish and answer."""

    def __init__(self) -> None:
        self._init_calls()
        self.welcome = None
        self.sent: list[p.Frame] = []
        self.fields_seen: list[dict[str, Any]] = []

    async def send(self, frame: p.Frame) -> None:
        self.sent.append(frame)

    def _now(self) -> float:
        return trio.current_time()

    def _wake_keeper(self) -> None:
        pass  # no keeper: the test flushes the acks itself


async def test_the_handled_delivery_is_current_only_while_its_handler_runs() -> None:
    agent = _Recorder()
    traced = delivery({"traceparent": TRACEPARENT})
    agent._track_batch(p.Batch(messages=[traced]))

    async def handle(message: p.Delivery) -> None:
        await trio.lowlevel.checkpoint()
        agent.fields_seen.append(traced_fields({}, None))

    await agent._handle_one(handle, Message(traced, agent), [])
    await agent._flush_acks()
    assert agent.fields_seen == [{"headers": {"traceparent": TRACEPARENT}}]
    assert _handling.get() is None
    assert traced_fields({}, None) == {}  # outside a handler nothing is carried
    assert [type(f) for f in agent.sent] == [p.Ack]


async def test_a_message_from_the_loop_publishes_on_its_own_trace() -> None:
    class _Publisher(_Recorder):
        async def publish(
            self, body: bytes, *, queue: str | None = None, **fields: Any
        ) -> p.Published:
            self.fields_seen.append(traced_fields(fields, fields.pop("trace", None)))
            return p.Published(ref=0, ok=True)

    agent = _Publisher()
    message = Message(delivery({"traceparent": TRACEPARENT, "tracestate": "rojo=1"}), agent)
    await message.publish(b"next", queue="out", headers={"k": "v"})
    assert agent.fields_seen == [
        {"headers": {"k": "v", "traceparent": TRACEPARENT, "tracestate": "rojo=1"}}
    ]
