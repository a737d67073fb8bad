"""``sidecar queue purge``, ``sidecar scale recommend`` and ``sidecar status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import publish_many
from tests.tools.helpers import cli, drain, props_of, publish, put, record

pytestmark = pytest.mark.integration


def _mix() -> list[tuple[bytes, dict[str, Any]]]:
    out: list[tuple[bytes, dict[str, Any]]] = []
    for i in range(20):
        props: dict[str, Any] = {
            "message_id": f"m{i}",
            "content_type": "text/plain",
            "delivery_mode": 2,
            "correlation_id": f"c{i}",
        }
        kind = i % 5
        if kind == 0:
            props["priority"] = 1  # low by property
        elif kind == 1:
            props["headers"] = {"priority": "low", "n": i}  # low by header
        elif kind == 2:
            props["priority"] = 8
            props["headers"] = {"priority": "high", "n": i}
        elif kind == 3:
            props["priority"] = 4  # above the low threshold
        else:
            props["headers"] = {"n": i}
        out.append((f"body-{i}".encode(), props))
    return out


def _is_low(props: dict[str, Any]) -> bool:
    p = props.get("priority")
    return (p is not None and p <= 3) or (props.get("headers") or {}).get("priority") == "low"


def _expected(props: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {
        "body": body,
        "message_id": props["message_id"],
        "content_type": "text/plain",
        "priority": props.get("priority"),
        "delivery_mode": 2,
        "correlation_id": props["correlation_id"],
        "headers": props.get("headers") or {},
    }


def test_selective_purge(unique_queue: Any) -> None:
    queue = unique_queue("tools")
    mix = _mix()
    publish(queue, mix)
    low = [i for i, (_, p) in enumerate(mix) if _is_low(p)]
    assert len(low) == 8

    out = cli("queue", "purge", queue, "--priority", "low", "--limit", "3", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "queue": queue,
        "scanned": 20,
        "removed": 3,
        "kept": 17,
        "failed": 0,
    }
    removed = set(low[:3])
    expected = [_expected(p, b) for i, (b, p) in enumerate(mix) if i not in removed]
    remaining = drain(queue)
    assert [props_of(m) for m in remaining] == expected  # exactly, in order

    publish(queue, mix)
    out = cli("queue", "purge", queue, "--priority", "low", "--yes")
    assert out.returncode == 0, out.stderr
    assert "removed 8 low-priority, kept 12" in out.stdout
    expected = [_expected(p, b) for (b, p) in mix if not _is_low(p)]
    assert [props_of(m) for m in drain(queue)] == expected


def test_queue_purge_refusals(unique_queue: Any) -> None:
    missing = unique_queue("missing")
    out = cli("queue", "purge", missing, "--priority", "low", "--yes")
    assert out.returncode == 4
    assert "does not exist" in out.stderr
    queue = unique_queue("tools")
    publish(queue, _mix()[:5])
    out = cli("queue", "purge", queue, "--priority", "low")  # no --yes, no answer
    assert out.returncode == 4
    assert len(drain(queue)) == 5
    out = cli("queue", "purge", queue, "--priority", "low", "--broker",
              "amqp://guest:guest@127.0.0.1:1/")  # fmt: skip
    assert out.returncode == 5
    assert "broker unavailable" in out.stderr


async def test_scale_recommend(unique_queue: Any) -> None:
    queue = unique_queue("tools")
    await publish_many(queue, [b"x"] * 200)
    out = cli("scale", "recommend", "--queue", queue, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["queues"] == [
        {"queue": queue, "depth": 200, "consumers": 0, "recommended": 20, "event": "scale_up"}
    ]
    out = cli("scale", "recommend", "--queue", queue)
    assert "20" in out.stdout and "scale_up" in out.stdout
    out = cli("scale", "recommend", "--queue", unique_queue("missing"))
    assert out.returncode == 4


def test_status(tmp_path: Path, rabbitmq: str) -> None:
    put(tmp_path, record("s1", "q", 1), record("s2", "q", 2, failureReason="PARSE_ERROR"))
    out = cli("status", "--store", f"sqlite:///{tmp_path / 'dlq.sqlite3'}", "--json")
    assert out.returncode == 0, out.stderr
    health = json.loads(out.stdout)["dlq_health"]
    assert health["size"] == 2
    assert {f["reason"] for f in health["top_failures"]} == {"TIMEOUT", "PARSE_ERROR"}
    out = cli("status", "--store", f"sqlite:///{tmp_path / 'dlq.sqlite3'}")
    assert "DLQ Health" in out.stdout and "DLQ Size: 2" in out.stdout
    out = cli("status", "--http", "http://127.0.0.1:1")
    assert out.returncode == 5
    assert "cannot reach sidecar" in out.stderr
