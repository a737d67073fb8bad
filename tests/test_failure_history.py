"""The failure history a message carries through its retries (``x-sidecar-failures``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import trio

from sidecar import attempts
from sidecar.attempts import (
    FAILURES,
    MAX_FAILURE_ENTRIES,
    MAX_HISTORY_ERROR_CHARS,
    append_failure,
    failure_entry,
    read_failures,
    with_failures,
)
from sidecar.client import open_agent
from sidecar.store.records import RecordFilter
from tests.helpers import make_config, publish_many, running_sidecar

NOW = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)


def entry(n: int, error: str = "boom") -> dict[str, object]:
    return failure_entry(
        attempt=n, reason="NETWORK_ERROR", error=error, at=NOW, host="h1", agent_version="1.0"
    )


def test_round_trip_through_headers() -> None:
    history = append_failure(append_failure([], entry(1)), entry(2))
    headers = with_failures({"tenant": "acme"}, history)
    assert isinstance(headers[FAILURES], str)
    assert read_failures(headers) == history
    assert history[0] == {
        "attempt": 1,
        "reason": "NETWORK_ERROR",
        "error": "boom",
        "at": "2024-01-01T10:00:00Z",
        "host": "h1",
        "agentVersion": "1.0",
    }
    # The agent never sees the sidecar's bookkeeping.
    assert FAILURES not in attempts.agent_headers(headers)


def test_history_is_bounded_in_entries_and_error_length() -> None:
    history: list[dict[str, object]] = []
    for n in range(1, 40):
        history = append_failure(history, entry(n, error="x" * 10_000))
    assert len(history) == MAX_FAILURE_ENTRIES
    assert [e["attempt"] for e in history] == list(range(40 - MAX_FAILURE_ENTRIES, 40))
    assert all(len(str(e["error"])) == MAX_HISTORY_ERROR_CHARS for e in history)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        "{}",
        "[1, 2, 3]",
        "[" * 20_000 + "]" * 20_000,
        b"\xff\xfe",
        12,
        json.dumps([{"attempt": "1", "at": "2024-01-01T10:00:00Z"}]),
        json.dumps([{"attempt": 1, "at": "yesterday"}]),
        "x" * (attempts.MAX_FAILURES_HEADER_BYTES + 1),
    ],
)
def test_hostile_header_reads_as_empty(raw: object) -> None:
    assert read_failures({FAILURES: raw}) == []


def test_hostile_entries_are_dropped_or_truncated() -> None:
    forged = [
        {"attempt": 2, "at": "2024-01-01T10:00:00Z", "error": "e" * 5000, "reason": ["x"]},
        "junk",
        {"attempt": True, "at": "2024-01-01T10:00:00Z"},
    ] + [{"attempt": n, "at": "2024-01-01T10:00:00Z"} for n in range(100)]
    history = read_failures({FAILURES: json.dumps(forged)})
    assert len(history) == MAX_FAILURE_ENTRIES  # only the newest entries are read
    forged_one = read_failures({FAILURES: json.dumps(forged[:3]).encode()})
    assert forged_one == [
        {
            "attempt": 2,
            "reason": "",
            "error": "e" * MAX_HISTORY_ERROR_CHARS,
            "at": "2024-01-01T10:00:00Z",
            "host": "",
            "agentVersion": "",
        }
    ]


@pytest.mark.integration
async def test_dead_letter_record_keeps_every_failure(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b'{"jobId": "h1"}'])
    config = make_config(tmp_path, [queue])
    errors = iter(["connection reset", "dns failure", "still down"])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            async with open_agent(
                config.agent.socket, agent="scraper", version="2.0.1", queues=[queue]
            ) as agent:
                while sidecar.store.count(RecordFilter(queue=queue)) == 0:
                    for m in await agent.pull(1, wait=0.5):
                        await agent.fail(m.id, "NETWORK_ERROR", next(errors))
            record = sidecar.store.find(RecordFilter(queue=queue))[0]
    assert record.attemptCount == 3
    assert [(f["attempt"], f["reason"], f["error"]) for f in record.failures] == [
        (1, "NETWORK_ERROR", "connection reset"),
        (2, "NETWORK_ERROR", "dns failure"),
        (3, "NETWORK_ERROR", "still down"),
    ]
    assert {f["host"] for f in record.failures} == {config.identity.host}
    assert {f["agentVersion"] for f in record.failures} == {"2.0.1"}
    times = [datetime.fromisoformat(f["at"].replace("Z", "+00:00")) for f in record.failures]
    assert times == sorted(times)
