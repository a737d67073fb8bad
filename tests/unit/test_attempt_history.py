"""The failure history a message carries in its headers, without a broker: entries built,
written and read back exactly, and every bound that keeps a forged header small."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from sidecar.attempts import (
    FAILURES,
    MAX_FAILURE_ENTRIES,
    MAX_FAILURES_HEADER_BYTES,
    append_failure,
    failure_entry,
    read_failures,
    with_failures,
)

AT = "2026-01-02T03:04:05Z"


def entry(attempt: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "attempt": attempt,
        "reason": "TIMEOUT",
        "error": "slow",
        "at": AT,
        "host": "h",
        "agentVersion": "1.0",
    } | fields


def test_an_entry_is_written_in_utc_with_every_field():
    local = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert failure_entry(
        attempt=2, reason="TIMEOUT", error="slow", at=local, host="h", agent_version="1.0"
    ) == entry(2)


def test_an_entry_cuts_each_field_and_never_counts_below_zero():
    made = failure_entry(
        attempt=-3,
        reason="r" * 200,
        error="e" * 300,
        at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        host="h" * 200,
        agent_version="v" * 200,
    )
    assert made == {
        "attempt": 0,
        "reason": "r" * 128,
        "error": "e" * 256,
        "at": AT,
        "host": "h" * 128,
        "agentVersion": "v" * 128,
    }


def test_a_history_is_written_as_compact_json_of_the_last_entries():
    history = [entry(i) for i in range(1, 13)]
    headers = {"keep": 1}
    out = with_failures(headers, history)
    assert headers == {"keep": 1}
    assert out["keep"] == 1
    assert out[FAILURES] == json.dumps(history[-10:], separators=(",", ":"))
    assert ", " not in out[FAILURES] and '": ' not in out[FAILURES]


def test_appending_keeps_the_most_recent_entries():
    history = [entry(i) for i in range(1, 11)]
    assert append_failure(history, entry(11)) == [entry(i) for i in range(2, 12)]
    assert append_failure([], entry(1)) == [entry(1)]
    assert len(history) == MAX_FAILURE_ENTRIES  # the input is left alone


@pytest.mark.parametrize("kind", [str, bytes, bytearray])
def test_a_history_reads_back_from_text_or_bytes(kind: Any):
    text = json.dumps([entry(1), entry(2)])
    raw = text if kind is str else kind(text.encode())
    assert read_failures({FAILURES: raw}) == [entry(1), entry(2)]


def test_only_the_last_entries_of_a_long_history_are_read():
    raw = json.dumps([entry(i) for i in range(1, 16)])
    assert read_failures({FAILURES: raw}) == [entry(i) for i in range(6, 16)]


def test_a_text_header_with_a_lone_surrogate_still_reads():
    raw = json.dumps([entry(1, error="a\ud800b")], ensure_ascii=False)
    (read,) = read_failures({FAILURES: raw})
    assert read["error"] == "a?b"


def test_the_header_may_be_as_large_as_the_bound_and_no_larger():
    body = json.dumps([entry(1)])
    fits = body + " " * (MAX_FAILURES_HEADER_BYTES - len(body))
    assert len(fits.encode()) == MAX_FAILURES_HEADER_BYTES
    assert read_failures({FAILURES: fits}) == [entry(1)]
    assert read_failures({FAILURES: fits + " "}) == []


@pytest.mark.parametrize(
    "raw",
    [None, 7, ["x"], "not json", "[" * 100_000 + "]" * 100_000, '{"attempt": 1}', "null"],
)
def test_a_header_that_is_not_a_history_reads_as_none(raw: Any):
    headers = {} if raw is None else {FAILURES: raw}
    assert read_failures(headers) == []


@pytest.mark.parametrize(
    "bad",
    [
        "entry",
        entry(True),
        entry("1"),  # type: ignore[arg-type]
        entry(1.0),  # type: ignore[arg-type]
        entry(1, at="yesterday"),
        entry(1, at=None),
    ],
)
def test_a_malformed_entry_is_dropped_and_the_rest_kept(bad: Any):
    raw = json.dumps([entry(1), bad, entry(3)])
    assert read_failures({FAILURES: raw}) == [entry(1), entry(3)]


def test_an_entry_read_back_is_cut_and_cleaned():
    forged = {
        "attempt": -5,
        "reason": "r" * 200,
        "error": "e" * 300,
        "at": "2026-01-02T03:04:05+00:00",
        "host": 12,
        "agentVersion": ["x"],
        "extra": "dropped",
    }
    assert read_failures({FAILURES: json.dumps([forged])}) == [
        {
            "attempt": 0,
            "reason": "r" * 128,
            "error": "e" * 256,
            "at": "2026-01-02T03:04:05+00:00",
            "host": "",
            "agentVersion": "",
        }
    ]


def test_an_entry_read_back_cuts_host_and_agent_version():
    forged = entry(1, host="h" * 200, agentVersion="v" * 200)
    (read,) = read_failures({FAILURES: json.dumps([forged])})
    assert (read["host"], read["agentVersion"]) == ("h" * 128, "v" * 128)


def test_an_entry_time_is_read_from_its_first_forty_characters_only():
    def at_of(fraction_digits: int) -> str:
        return "2026-01-02T03:04:05." + "1" * fraction_digits + "+00:00"

    assert len(at_of(14)) == 40
    assert read_failures({FAILURES: json.dumps([entry(1, at=at_of(14))])}) == [
        entry(1, at=at_of(14))
    ]
    # Cut at forty characters, a longer one is no longer a time: dropped.
    assert read_failures({FAILURES: json.dumps([entry(1, at=at_of(15))])}) == []


def test_an_entry_time_with_a_lower_case_zone_letter_is_not_a_time():
    assert read_failures({FAILURES: json.dumps([entry(1, at="2026-01-02T03:04:05z")])}) == []
