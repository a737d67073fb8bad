"""Attempt headers as hostile input, without a broker: the exact bounds of counters, times
and texts, and ids that never fail on odd text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

import pytest

from sidecar import limits
from sidecar.attempts import (
    ATTEMPTS,
    FIRST_FAILURE_AT,
    LAST_REASON,
    SUSPECT,
    failure_entry,
    read_state,
    stable_id,
)


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's local zone is not UTC: nothing read or written may depend on it."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


class NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None


@pytest.mark.parametrize(
    ("raw", "failures", "ignored"),
    [
        (0, 0, ()),
        ("0", 0, ()),
        (2.0, 2, ()),
        (Decimal("3"), 3, ()),
        (Decimal("sNaN"), 0, (ATTEMPTS,)),
        (Decimal("Infinity"), 0, (ATTEMPTS,)),
        (b" " * 31 + b"7", 7, ()),  # 32 bytes are read
        (b" " * 32 + b"7", 0, (ATTEMPTS,)),  # the 7 is beyond them
        ("1" + "0" * 19, limits.MAX_ATTEMPT_COUNT, (ATTEMPTS,)),  # 20 digits: clamped
        ("1" + "0" * 20, 0, (ATTEMPTS,)),  # 21 digits: refused
        ("", 0, (ATTEMPTS,)),
    ],
)
def test_an_attempt_count_is_read_within_exact_bounds(raw: Any, failures: int, ignored: Any):
    state = read_state({ATTEMPTS: raw})
    assert (state.failures, state.ignored) == (failures, ignored)


def test_an_unusable_suspect_mark_is_named():
    state = read_state({SUSPECT: "many"})
    assert (state.suspect, state.ignored) == (0, (SUSPECT,))


def test_undecodable_reason_bytes_are_replaced_not_refused():
    state = read_state({ATTEMPTS: 1, LAST_REASON: b"TIME\xffOUT"})
    assert (state.last_reason, state.ignored) == ("TIME\ufffdOUT", ())


@pytest.mark.parametrize("fraction_digits", [38, 39])
def test_a_first_failure_time_may_be_64_characters_and_no_longer(fraction_digits: int):
    text = "2026-01-02T03:04:05." + "1" * fraction_digits + "+00:00"
    state = read_state({ATTEMPTS: 1, FIRST_FAILURE_AT: text})
    if len(text) == 64:
        assert state.first_failure_at == datetime(2026, 1, 2, 3, 4, 5, 111111, tzinfo=UTC)
    else:
        assert state.first_failure_at is None and state.ignored == (FIRST_FAILURE_AT,)


@pytest.mark.usefixtures("tokyo")
@pytest.mark.parametrize(
    "raw",
    [datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, tzinfo=NoOffset())],
)
def test_a_time_without_an_offset_is_utc_whatever_the_hosts_zone(raw: datetime):
    state = read_state({ATTEMPTS: 1, FIRST_FAILURE_AT: raw})
    assert state.first_failure_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.usefixtures("tokyo")
def test_an_entry_time_is_written_in_utc_whatever_the_hosts_zone():
    made = failure_entry(
        attempt=1,
        reason="TIMEOUT",
        error="",
        at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        host="",
        agent_version="",
    )
    assert made["at"] == "2026-01-02T03:04:05Z"


def test_an_id_is_made_of_text_with_lone_surrogates_too():
    one = stable_id("work\ud800", "id\udfff", "rk", b"body", {"h\ud801": "v\ud802"})
    other = stable_id("work\ud800", "id\udffe", "rk", b"body", {"h\ud801": "v\ud802"})
    assert one.startswith("id\udfff#") and other.startswith("id\udffe#")
    assert one.split("#")[1] != other.split("#")[1]


def test_a_message_id_leads_the_id_up_to_200_characters():
    assert stable_id("q", "m" * 200, "rk", b"", {}).startswith("m" * 200 + "#")
    assert stable_id("q", "m" * 201, "rk", b"", {}).startswith("sha256:")
