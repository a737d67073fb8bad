"""``sidecar dlq ...`` against the real RabbitMQ and an SQLite store in tmp_path."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.attempts import REPROCESSED_FROM
from sidecar.tools.republish import ledger_queue, lock_queue
from tests.tools.helpers import (
    CRASHING_CLI,
    at,
    cli,
    declare,
    drain,
    open_store,
    put,
    queue_exists,
    record,
)

pytestmark = pytest.mark.integration


def test_list_show_analyze(tmp_path: Path, rabbitmq: str) -> None:
    put(
        tmp_path,
        record("t1", "url.to_scrape", 1),
        record("t2", "url.to_scrape", 2, processingHost="scraper-agent-2"),
        record(
            "p1",
            "url.parsed",
            3,
            failureReason="PARSE_ERROR",
            errorMessage="bad html at line 7",
            signature="PARSE_ERROR:bad html at line <n>",
        ),
    )
    out = cli("dlq", "list", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["total"] == 3
    assert [r["id"] for r in listed["records"]] == ["p1", "t2", "t1"]  # newest first

    out = cli("dlq", "list", "--json", "--limit", "1", "--offset", "1", tmp_path=tmp_path)
    assert [r["id"] for r in json.loads(out.stdout)["records"]] == ["t2"]
    out = cli("dlq", "list", "--json", "--reason", "TIMEOUT", "--host", "scraper-agent-2",
              tmp_path=tmp_path)  # fmt: skip
    assert [r["id"] for r in json.loads(out.stdout)["records"]] == ["t2"]
    out = cli("dlq", "list", "--json", "--since", at(2).isoformat(), tmp_path=tmp_path)
    assert {r["id"] for r in json.loads(out.stdout)["records"]} == {"p1", "t2"}

    out = cli("dlq", "list", tmp_path=tmp_path)
    assert out.returncode == 0
    assert "REASON" in out.stdout and "PARSE_ERROR" in out.stdout and "1-3 of 3" in out.stdout

    out = cli("dlq", "show", "t1", "--json", tmp_path=tmp_path)
    assert out.returncode == 0
    shown = json.loads(out.stdout)
    assert shown["id"] == "t1" and shown["originalQueue"] == "url.to_scrape"
    out = cli("dlq", "show", "nope", tmp_path=tmp_path)
    assert out.returncode == 4
    assert "no dead letter with id 'nope'" in out.stderr

    out = cli("dlq", "analyze", "--report", "failure-patterns", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["total"] == 3
    assert [(r["failureReason"], r["count"]) for r in report["failure_patterns"]] == [
        ("TIMEOUT", 2),
        ("PARSE_ERROR", 1),
    ]
    timeout_row = report["failure_patterns"][0]
    assert timeout_row["firstOccurrence"].startswith("2024-01-01T10:00")
    assert timeout_row["lastOccurrence"].startswith("2024-01-01T10:02")
    assert report["by_signature"][0] == {
        "signature": "TIMEOUT:request timed out after <n>ms",
        "count": 2,
        "firstOccurrence": timeout_row["firstOccurrence"],
        "lastOccurrence": timeout_row["lastOccurrence"],
    }
    assert {r["processingHost"]: r["count"] for r in report["by_host"]} == {
        "scraper-agent-1": 2,
        "scraper-agent-2": 1,
    }
    assert {r["originalQueue"]: r["count"] for r in report["by_queue"]} == {
        "url.to_scrape": 2,
        "url.parsed": 1,
    }
    out = cli("dlq", "analyze", "--report", "failure-patterns", tmp_path=tmp_path)
    assert "By error signature" in out.stdout and "By original queue" in out.stdout


def _check_republished(messages: list[Any], ids: set[str]) -> None:
    provenance = [m.header.properties.headers[REPROCESSED_FROM] for m in messages]
    assert sorted(provenance) == sorted(ids), provenance  # each exactly once
    for m in messages:
        p = m.header.properties
        rid = p.headers[REPROCESSED_FROM]
        assert p.message_id == rid
        assert p.content_type == "application/json"
        assert p.headers["tenant"] == "acme"
        assert not any(k.startswith("x-sidecar-") and k != REPROCESSED_FROM for k in p.headers)
        assert json.loads(m.body) == {"jobId": rid}


def _check_marked(tmp_path: Path, ids: set[str], tool: str = "dlq retry") -> None:
    store = open_store(tmp_path)
    try:
        for rid in ids:
            r = store.get(rid)
            assert r is not None and r.reprocessed, rid
            assert r.retryToken is None
            assert r.reprocessCount == 1
            assert r.history[-1]["tool"].startswith(tool)
        assert store.in_flight_retries() == []
    finally:
        store.close()


def test_retry_republishes_and_marks(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue("tools")
    declare(queue)
    ids = {f"r{i}" for i in range(4)}
    put(
        tmp_path,
        *[record(rid, queue, i) for i, rid in enumerate(sorted(ids))],
        record("other", queue, 9, failureReason="PARSE_ERROR", errorMessage="x", signature="P"),
    )
    out = cli("dlq", "retry", "--pattern", "TIMEOUT", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {r["id"] for r in result["republished"]} == ids
    _check_republished(drain(queue), ids)
    _check_marked(tmp_path, ids)
    store = open_store(tmp_path)
    assert not store.get("other").reprocessed
    store.close()

    # A second run finds nothing left to retry.
    out = cli("dlq", "retry", "--pattern", "TIMEOUT", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["selected"] == 0
    assert drain(queue) == []


def test_retry_dry_run_changes_nothing(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue("tools")
    declare(queue)
    put(tmp_path, record("d1", queue, 1), record("d2", queue, 2))
    out = cli("dlq", "retry", "--pattern", "timeout", "--dry-run", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["dry_run"] is True
    assert {p["id"] for p in plan["would_retry"]} == {"d1", "d2"}
    assert plan["would_retry"][0]["headers"][REPROCESSED_FROM] in {"d1", "d2"}
    out = cli("dlq", "retry", "--pattern", "timeout", "--dry-run", tmp_path=tmp_path)
    assert "nothing was changed" in out.stdout
    assert drain(queue) == []
    store = open_store(tmp_path)
    assert all(not r.reprocessed and r.retryToken is None for r in store.find())
    store.close()


def test_retry_crash_half_way_is_exactly_once(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue("tools")
    declare(queue)
    ids = {f"c{i}" for i in range(6)}
    put(tmp_path, *[record(rid, queue, i) for i, rid in enumerate(sorted(ids))])
    out = cli(
        "dlq", "retry", "--pattern", "TIMEOUT", "--json",
        tmp_path=tmp_path, env={"CRASH_AT_MARK": "3"}, program=CRASHING_CLI,
    )  # fmt: skip
    assert out.returncode == 137, (out.returncode, out.stderr)
    store = open_store(tmp_path)
    in_flight = store.in_flight_retries()
    assert len(in_flight) == 1  # the third: published and committed, not yet marked
    assert sum(r.reprocessed for r in store.find()) == 2
    store.close()

    out = cli("dlq", "retry", "--pattern", "TIMEOUT", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["recovered"]["marked"] == [in_flight[0].id]
    assert len(result["republished"]) == 3
    messages = drain(queue)
    assert len(messages) == 6
    _check_republished(messages, ids)
    _check_marked(tmp_path, ids)


def test_retry_recovery_releases_unpublished_claim(tmp_path: Path, unique_queue: Any) -> None:
    """A claim without a ledger entry (crash before the commit) is released and retried."""
    queue = unique_queue("tools")
    declare(queue)
    put(tmp_path, record("u1", queue, 1))
    store = open_store(tmp_path)
    assert store.begin_retry("u1", "retry-crashed")
    store.close()
    out = cli("dlq", "retry", "--pattern", "TIMEOUT", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["recovered"]["cancelled"] == ["u1"]
    assert [r["id"] for r in result["republished"]] == ["u1"]
    _check_republished(drain(queue), {"u1"})
    _check_marked(tmp_path, {"u1"})


def test_move(tmp_path: Path, unique_queue: Any) -> None:
    source, target = unique_queue("tools"), unique_queue("tools")
    declare(source, target)
    put(tmp_path, record("m1", source, 1))
    missing = unique_queue("missing")
    out = cli("dlq", "move", "--message-id", "m1", "--target-queue", missing, tmp_path=tmp_path)
    assert out.returncode == 4
    assert "does not exist" in out.stderr and missing in out.stderr
    out = cli("dlq", "move", "--message-id", "nope", "--target-queue", target, tmp_path=tmp_path)
    assert out.returncode == 4
    assert "no dead letter with id 'nope'" in out.stderr
    store = open_store(tmp_path)
    assert store.in_flight_retries() == [] and not store.get("m1").reprocessed
    store.close()

    out = cli("dlq", "move", "--message-id", "m1", "--target-queue", target, "--json",
              tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["targetQueue"] == target
    _check_republished(drain(target), {"m1"})
    assert drain(source) == []
    _check_marked(tmp_path, {"m1"}, tool="dlq move")
    store = open_store(tmp_path)
    assert store.get("m1").reprocessTarget == target
    store.close()


def test_purge(tmp_path: Path, rabbitmq: str) -> None:
    now = datetime.now(UTC)
    put(
        tmp_path,
        record("old1", "q", 1),
        record("old2", "q", 2, failureReason="PARSE_ERROR"),
        record("new1", "q", 0, lastFailureAt=now, deadLetteredAt=now),
    )
    # No --yes and no answer on stdin: refused, nothing deleted.
    out = cli("dlq", "purge", "--older-than", "7d", tmp_path=tmp_path)
    assert out.returncode == 4
    assert "not confirmed" in out.stderr
    assert open_store(tmp_path).count() == 3
    # A typed "yes" confirms.
    out = cli("dlq", "purge", "--reason", "PARSE_ERROR", "--json", tmp_path=tmp_path, input="yes\n")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"matched": 1, "deleted": 1}
    # --yes: only the ones older than 7 days go.
    out = cli("dlq", "purge", "--older-than", "7d", "--yes", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"matched": 1, "deleted": 1}
    store = open_store(tmp_path)
    assert [r.id for r in store.find()] == ["new1"]
    store.close()
    out = cli("dlq", "purge", "--older-than", "banana", "--yes", tmp_path=tmp_path)
    assert out.returncode == 2


def test_unreachable_broker_and_store(tmp_path: Path, rabbitmq: str) -> None:
    put(tmp_path, record("x1", "q", 1))
    out = cli(
        "dlq", "retry", "--pattern", "TIMEOUT",
        tmp_path=tmp_path, broker="amqp://guest:guest@127.0.0.1:1/",
    )  # fmt: skip
    assert out.returncode == 5, out.stderr
    assert "broker unavailable" in out.stderr and "127.0.0.1:1" in out.stderr
    assert "guest:guest" not in out.stderr
    assert open_store(tmp_path).in_flight_retries() == []

    (tmp_path / "a-file").write_text("not a directory")
    bad = f"sqlite:///{tmp_path / 'a-file' / 'dlq.db'}"
    out = cli("dlq", "list", "--store", bad)
    assert out.returncode == 5, out.stderr
    assert "no dead-letter store" in out.stderr and "is not a directory" in out.stderr
    out = cli("dlq", "retry", "--pattern", "TIMEOUT", "--store", bad)
    assert out.returncode == 5, out.stderr


def test_ledger_left_empty(tmp_path: Path, unique_queue: Any) -> None:
    """A clean run deletes its store's ledger queue, and the broker its lock queue."""
    queue = unique_queue("tools")
    declare(queue)
    put(tmp_path, record("l1", queue, 1))
    store = open_store(tmp_path)
    store_id = store.store_id()
    store.close()
    out = cli("dlq", "retry", "--pattern", "TIMEOUT", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not queue_exists(ledger_queue(store_id))
    assert not queue_exists(lock_queue(store_id))
    _check_republished(drain(queue), {"l1"})
