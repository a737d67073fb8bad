"""The Node client's per-message loop (``for await (const message of agent.messages())`` in
proto/node/agent.js) against a real sidecar and RabbitMQ: a burst with its acks in few
frames, the welcome's limits, leaving the loop early, deadlines of buffered deliveries
behind a slow handler, and W3C trace context carried into what the agent publishes. The
scenarios run in tests/proto/node_loop.js."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until
from tests.proto._util import PROTO
from tests.tools.helpers import drain, publish

NODE = shutil.which("node")
NODE_DIR = PROTO / "node"
SCENARIOS = Path(__file__).with_name("node_loop.js")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "ws").is_dir(),
        reason="proto/node/node_modules is missing: run `npm ci` in proto/node",
    ),
]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
TRACESTATE = "rojo=00f067aa0ba902b7"
OTHER_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OWN_TRACEPARENT = "00-11111111111111111111111111111111-2222222222222222-00"


async def scenario(name: str, socket: str, queue: str, **options: Any) -> dict[str, Any]:
    """Run one scenario of node_loop.js; its JSON summary (frames sent included)."""
    result = await trio.run_process(
        [NODE or "node", str(SCENARIOS), name, socket, queue, json.dumps(options)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    summary: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert "failed" not in summary, summary["failed"]
    return summary


def bodies(n: int) -> list[str]:
    return [f"m{i:03d}" for i in range(n)]


def frames_of(summary: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in summary["frames"] if f["kind"] == kind]


async def test_a_burst_is_handed_out_in_order_with_acks_sharing_frames(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("nodeloop")
    await publish_many(queue, [b.encode() for b in bodies(120)])
    config = make_config(tmp_path, [queue], agent={"batch_size": 50})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            summary = await scenario("burst", config.agent.socket, queue, count=120, batch=50)
            await until(lambda: not sidecar.engine.sessions)
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
        remaining = await queue_count(queue)
    assert [m["body"] for m in summary["seen"]] == bodies(120)
    assert all(m["attempt"] == 1 for m in summary["seen"])
    acks = frames_of(summary, "ack")
    acked = [i for f in acks for i in f["ids"]]
    assert len(acked) == len(set(acked)) == 120
    assert len(acks) <= 12, f"{len(acks)} ack frames for 120 messages"
    assert not frames_of(summary, "extend")
    assert summary["errors"] == []
    assert counts["acked"] == 120 and counts["crashes"] == 0 and counts["timeouts"] == 0
    assert remaining == 0


async def test_never_more_in_flight_than_the_welcome_allows(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("nodelimit")
    await publish_many(queue, [b.encode() for b in bodies(40)])
    config = make_config(tmp_path, [queue], agent={"batch_size": 50, "max_in_flight": 6})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            summary = await scenario("burst", config.agent.socket, queue, count=40, batch=50)
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert [m["body"] for m in summary["seen"]] == bodies(40)
    pulls = frames_of(summary, "pull")
    assert pulls
    # Asked for only what the limit left, except a pull for 1 with nothing buffered.
    assert all(f["max"] + f["held"] <= 6 or f["max"] == 1 for f in pulls), pulls
    assert summary["errors"] == []  # the sidecar refused nothing
    assert counts["acked"] == 40


async def test_leaving_the_loop_then_closing_requeues_the_rest_uncharged(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("nodeleave")
    await publish_many(queue, [b.encode() for b in bodies(30)])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            first = await scenario("leave", config.agent.socket, queue, take=3, batch=10)
            await until(lambda: not sidecar.engine.sessions)
            after_close = dict(sidecar.engine.counts)
            again = await scenario("burst", config.agent.socket, queue, count=27, batch=10)
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
        remaining = await queue_count(queue)
    assert [m["body"] for m in first["seen"]] == bodies(3)
    # Something was pulled ahead and never handed out when the loop was left.
    assert first["bufferedAfterBreak"] > 0 or first["pullingAfterBreak"]
    assert after_close["acked"] == 3
    assert after_close["timeouts"] == after_close["failed"] == after_close["crashes"] == 0
    # Uncharged: every one comes again as attempt 1, none failed or timed out.
    assert sorted((m["body"], m["attempt"]) for m in again["seen"]) == [
        (b, 1) for b in bodies(30)[3:]
    ]
    assert counts["acked"] == 30
    assert counts["timeouts"] == counts["failed"] == counts["crashes"] == 0
    assert remaining == 0


async def test_leaving_the_loop_keeps_the_rest_for_the_next_pull_and_loop(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("nodeagain")
    await publish_many(queue, [b.encode() for b in bodies(30)])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            summary = await scenario("leave", config.agent.socket, queue, take=3, rest=27)
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
        remaining = await queue_count(queue)
    handed = [m["body"] for m in summary["seen"] + summary["later"]]
    assert handed == bodies(30)  # nothing lost, nothing twice, in order
    assert counts["acked"] == 30 and counts["timeouts"] == 0
    assert remaining == 0


async def test_buffered_deliveries_are_extended_behind_a_slow_handler(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("nodeslow")
    await publish_many(queue, [b.encode() for b in bodies(8)])
    # A 2 s deadline and 0.5 s per message: the last of a batch of 8 would wait 3.5 s. An
    # extend goes out at half the deadline, which leaves a second of slack on a busy machine.
    config = make_config(tmp_path, [queue], agent={"deadline": 2.0, "batch_size": 8})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            summary = await scenario(
                "slow", config.agent.socket, queue, count=8, sleepMs=500, batch=8
            )
            await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert summary["seen"] == [{"body": b, "attempt": 1} for b in bodies(8)]
    assert not [e for e in summary["errors"] if e["code"] == "deadline_expired"]
    assert counts["timeouts"] == 0 and counts["acked"] == 8
    extended = [i for f in frames_of(summary, "extend") for i in f["ids"]]
    assert extended, "no buffered delivery was extended"


async def test_publishes_while_handling_carry_the_trace_context(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue, out = unique_queue("nodetrace"), unique_queue("nodetraceout")
    traced = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    messages = [
        (b"loop traced", traced),
        (b"own loop", traced),  # the agent sets its own traceparent: it wins
        (b"loop invalid", {"traceparent": TRACEPARENT.upper()}),  # not a valid one: ignored
        (b"run traced", {"traceparent": OTHER_TRACEPARENT}),
        (b"own run", traced),
        (b"run plain", {}),
    ]
    await trio.to_thread.run_sync(publish, out, [])
    await trio.to_thread.run_sync(
        publish, queue, [(body, {"delivery_mode": 2, "headers": h}) for body, h in messages]
    )
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            summary = await scenario(
                "trace",
                config.agent.socket,
                queue,
                count=len(messages),
                loop=3,
                out=out,
                own=OWN_TRACEPARENT,
            )
            await until(lambda: not sidecar.broker.unsettled)
        published = await trio.to_thread.run_sync(drain, out)
    assert summary["handled"] == 6 and summary["published"] == 7
    headers = {m.body.decode(): dict(m.header.properties.headers or {}) for m in published}

    def context(body: str) -> tuple[Any, Any]:
        found = headers[body]
        return _text(found.get("traceparent")), _text(found.get("tracestate"))

    assert context("derived loop traced") == (TRACEPARENT, TRACESTATE)
    assert context("derived own loop") == (OWN_TRACEPARENT, None)
    assert context("derived loop invalid") == (None, None)
    assert context("derived run traced") == (OTHER_TRACEPARENT, None)
    assert context("derived own run") == (OWN_TRACEPARENT, None)
    assert context("derived run plain") == (None, None)
    assert context("outside") == (None, None)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
