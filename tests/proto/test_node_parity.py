"""The Node client's pure parts against the Python clients' own, on the same inputs: the
per-message loop's bookkeeping (proto/node/prefetch.js vs sidecar/agent/prefetch.py: pull
sizes, buffering, acks, extensions) and the trace context a publish carries
(proto/node/tracecontext.js vs ``with_trace``). The same limits hold in both by test, not
by reading. The Node side runs in tests/proto/node_pure.js."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sidecar import protocol as p
from sidecar.agent.client import with_trace
from sidecar.agent.prefetch import Prefetch

NODE = shutil.which("node")
DRIVER = Path(__file__).with_name("node_pure.js")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH")

LIMITS = [
    None,
    {"max_batch": 50, "max_in_flight": 1000, "deadline": 30.0},
    {"max_batch": 4, "max_in_flight": 6, "deadline": 2.0},
    {"max_batch": 10, "max_in_flight": 12, "deadline": 0.5},
]
Op = tuple[str, dict[str, Any]]


def run_node(prefetch: list[Op], trace: list[tuple[dict[str, Any], dict[str, Any]]]) -> Any:
    result = subprocess.run(
        [NODE or "node", str(DRIVER)],
        input=json.dumps({"prefetch": prefetch, "trace": trace}),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def limits_of(fields: dict[str, Any] | None) -> p.Limits | None:
    if fields is None:
        return None
    return p.Limits(max_frame_bytes=1 << 20, max_body_bytes=1 << 20, heartbeat=10.0, **fields)


def run_python(ops: list[Op]) -> list[Any]:
    prefetch = Prefetch()
    out: list[Any] = []
    for op, a in ops:
        if op == "want":
            limits = limits_of(a["limits"])
            out.append(
                prefetch.want(
                    batch=a["batch"], held=a["held"], limits=limits, batch_size=a["batch_size"]
                )
            )
        elif op == "pulled":
            out.append(prefetch.pulled())
        elif op == "arrived":
            messages = [
                p.Delivery(id=d["id"], queue="q", body=b"", deadline=d["deadline"])
                for d in a["deliveries"]
            ]
            out.append(prefetch.arrived(messages, a["now"]))
        elif op == "pull_answered":
            out.append(prefetch.pull_answered())
        elif op == "resumed":
            prefetch.resumed(a["now"])
            out.append(prefetch.pace)
        elif op == "take":
            delivery = prefetch.take(set(a["held"]), a["now"])
            out.append(None if delivery is None else delivery.id)
        elif op == "take_many":
            out.append([d.id for d in prefetch.take_many(a["most"], set(a["held"]))])
        elif op == "ack_later":
            out.append(prefetch.ack_later(a["id"], a["now"]))
        elif op == "acks_overdue":
            out.append(prefetch.acks_overdue(a["now"]))
        elif op == "take_acks":
            out.append(prefetch.take_acks())
        elif op == "head_due":
            out.append(prefetch.head_due(a["now"]))
        elif op == "extensions":
            out.append([[s, ids] for s, ids in prefetch.extensions(a["now"]).items()])
        elif op == "next_due":
            out.append(prefetch.next_due(a["engaged"]))
        else:
            raise AssertionError(op)
    return out


def script(seed: int, steps: int = 400) -> list[Op]:
    """A random but reproducible life of one connection's loop."""
    rng = random.Random(seed)
    ops: list[Op] = []
    held: set[int] = set()
    next_id = 1
    now = 0.0
    for _ in range(steps):
        now += rng.choice([0.0, 0.001, 0.005, 0.02, 0.1, 0.3, 1.0])
        kind = rng.choice(
            ["want", "want", "pulled", "arrived", "pull_answered", "resumed", "take", "take",
             "take_many", "ack_later", "ack_later", "acks_overdue", "take_acks", "head_due",
             "extensions", "next_due", "taken_back"]
        )  # fmt: skip
        if kind == "want":
            args = {
                "batch": rng.randint(1, 60),
                "held": len(held) + rng.choice([0, 0, 1, 5]),
                "limits": rng.choice(LIMITS),
                "batch_size": rng.randint(1, 60),
            }
        elif kind == "arrived":
            deadline = rng.choice([0.5, 2.0, 30.0])
            batch = [{"id": next_id + i, "deadline": deadline} for i in range(rng.randint(0, 12))]
            next_id += len(batch)
            held.update(d["id"] for d in batch)
            args = {"deliveries": batch, "now": now}
        elif kind == "ack_later":
            if not held:
                continue
            chosen = rng.choice(sorted(held))
            held.discard(chosen)
            args = {"id": chosen, "now": now}
        elif kind == "taken_back":  # the sidecar took a delivery back (deadline expired)
            if held:
                held.discard(rng.choice(sorted(held)))
            continue
        elif kind in ("take", "take_many"):
            args = {"held": sorted(held), "now": now, "most": rng.randint(1, 20)}
        elif kind == "next_due":
            args = {"engaged": rng.random() < 0.7}
        else:
            args = {"now": now}
        ops.append((kind, args))
    return ops


@pytest.mark.parametrize("seed", range(8))
def test_the_loop_bookkeeping_matches_the_python_clients(seed: int) -> None:
    ops = script(seed)
    node = run_node(ops, [])["prefetch"]
    python = run_python(ops)
    for (op, args), theirs, ours in zip(ops, node, python, strict=True):
        assert theirs == ours, f"{op}({args}): node {theirs!r}, python {ours!r}"
    # The scripts reach the interesting states, not only the empty ones.
    assert any(op == "want" and result > 1 for (op, _), result in zip(ops, python, strict=True))
    assert any(op == "extensions" and result for (op, _), result in zip(ops, python, strict=True))


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
HEADER_VALUES: list[Any] = [
    VALID,
    f"00-{TRACE}-{PARENT}-00",
    f"01-{TRACE}-{PARENT}-01",
    f"00-{'0' * 32}-{PARENT}-01",
    f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE.upper()}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-01-extra",
    f" {VALID}",
    VALID[:-1],
    "00-" + "é" * 32 + f"-{PARENT}-01",
    None,
    1,
    ["00", TRACE, PARENT, "01"],
    {"traceparent": VALID},
]
STATES: list[Any] = [
    None,
    "rojo=00f067aa0ba902b7",
    "rojo=1,congo=t61rcWkgMzE",
    "",
    "   ",
    "a=1" + "x" * 600,
    "bad\nvalue",
    "k=é",
    "no,=,list",
    7,
]
FIELDS: list[dict[str, Any]] = [
    {},
    {"headers": {"k": "v"}},
    {"headers": {"traceparent": f"00-{'1' * 32}-{'2' * 16}-00"}},
    {"headers": {"tracestate": "mine=1"}, "content_type": "text/plain"},
]


def test_trace_carrying_matches_the_python_clients() -> None:
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for parent in HEADER_VALUES:
        for state in STATES:
            headers = {"other": "x"}
            if parent is not None:
                headers["traceparent"] = parent
            if state is not None:
                headers["tracestate"] = state
            cases += [(headers, fields) for fields in FIELDS]
    node = run_node([], cases)["trace"]
    for (headers, fields), theirs in zip(cases, node, strict=True):
        ours = with_trace(fields, p.Delivery(id=1, queue="q", body=b"", headers=headers))
        assert theirs == ours, f"{headers} {fields}: node {theirs!r}, python {ours!r}"
    assert sum(1 for theirs in node if "traceparent" in theirs.get("headers", {})) > 20
