"""The attempt header codec: the count the attempt limit depends on, read from and written to
the headers that travel with a message. Pure functions, no broker."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from sidecar import attempts as a

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# --- read_state ----------------------------------------------------------------------------


def test_a_fresh_message_reads_as_attempt_one():
    state = a.read_state({})
    assert state == a.FRESH == a.AttemptState()
    assert (state.failures, state.attempt, state.suspect) == (0, 1, 0)
    assert state.first_failure_at is None
    assert (state.last_reason, state.last_error, state.reduced_scope) == ("", "", False)


def test_sidecar_headers_without_a_count_still_read_as_fresh():
    # Only the count (or a suspect mark) makes a message non-fresh; stray bookkeeping does not.
    headers = {a.LAST_REASON: "TIMEOUT", a.LAST_ERROR: "x", a.REDUCED_SCOPE: True, "tenant": "t"}
    assert a.read_state(headers) is a.FRESH


def test_every_field_is_read_back():
    headers = {
        a.ATTEMPTS: 2,
        a.FIRST_FAILURE_AT: T0.isoformat(),
        a.LAST_REASON: "NETWORK_ERROR",
        a.LAST_ERROR: "connection reset",
        a.REDUCED_SCOPE: True,
        a.SUSPECT: 1,
    }
    state = a.read_state(headers)
    assert state == a.AttemptState(
        failures=2,
        first_failure_at=T0,
        last_reason="NETWORK_ERROR",
        last_error="connection reset",
        reduced_scope=True,
        suspect=1,
    )
    assert state.attempt == 3


@pytest.mark.parametrize("failures", [0, 1, 2, 9, 1000])
def test_the_attempt_about_to_be_made_is_one_more_than_the_failures(failures):
    state = a.read_state({a.ATTEMPTS: failures})
    assert state.failures == failures
    assert state.attempt == failures + 1


def test_a_suspect_mark_alone_is_read():
    state = a.read_state({a.SUSPECT: 2})
    assert (state.failures, state.suspect, state.attempt) == (0, 2, 1)


def test_a_count_alone_reads_with_empty_details():
    state = a.read_state({a.ATTEMPTS: 1})
    assert state == a.AttemptState(failures=1)


def test_the_first_failure_time_is_read_from_a_datetime_header():
    # AMQP timestamps arrive as datetime objects; an aware one keeps its instant, in UTC.
    plus2 = timezone(timedelta(hours=2))
    aware = datetime(2024, 5, 1, 14, 0, tzinfo=plus2)
    state = a.read_state({a.ATTEMPTS: 1, a.FIRST_FAILURE_AT: aware})
    assert state.first_failure_at == aware
    assert state.first_failure_at.utcoffset() == timedelta(0)


def test_a_naive_datetime_header_is_taken_as_utc():
    naive = datetime(2024, 5, 1, 12, 0)
    state = a.read_state({a.ATTEMPTS: 1, a.FIRST_FAILURE_AT: naive})
    assert state.first_failure_at == T0
    assert state.first_failure_at.tzinfo is UTC


def test_the_first_failure_time_is_read_from_bytes():
    state = a.read_state({a.ATTEMPTS: 1, a.FIRST_FAILURE_AT: T0.isoformat().encode()})
    assert state.first_failure_at == T0


@pytest.mark.parametrize("value", ["not a time", b"2024-13-45", "", 12345, None])
def test_an_unreadable_first_failure_time_is_dropped_not_raised(value):
    state = a.read_state({a.ATTEMPTS: 2, a.FIRST_FAILURE_AT: value})
    assert state.first_failure_at is None
    assert state.failures == 2


@pytest.mark.parametrize("value", ["abc", None, [], b"\xff", -3])
def test_an_unusable_count_reads_as_no_failures(value):
    state = a.read_state({a.ATTEMPTS: value})
    assert state.failures == 0
    assert state.attempt == 1


def test_a_numeric_string_count_is_read():
    assert a.read_state({a.ATTEMPTS: "4"}).failures == 4


@pytest.mark.parametrize("value", ["x", -1, None])
def test_an_unusable_suspect_mark_reads_as_zero(value):
    assert a.read_state({a.SUSPECT: value, a.ATTEMPTS: 1}).suspect == 0


def test_reason_and_error_are_read_as_text():
    # Only text (or bytes) is text: a number in these headers is ignored, not stringified.
    state = a.read_state({a.ATTEMPTS: 1, a.LAST_REASON: None, a.LAST_ERROR: 42})
    assert (state.last_reason, state.last_error) == ("", "")
    state = a.read_state({a.ATTEMPTS: 1, a.LAST_REASON: b"TIMEOUT", a.LAST_ERROR: "boom"})
    assert (state.last_reason, state.last_error) == ("TIMEOUT", "boom")


# --- after_failure -------------------------------------------------------------------------


def test_the_first_charged_failure_writes_every_header():
    out = a.after_failure(
        {"tenant": "acme"},
        a.FRESH,
        reason="TIMEOUT",
        error="took too long",
        now=T0,
        reduced_scope=True,
    )
    assert out == {
        "tenant": "acme",
        a.ATTEMPTS: 1,
        a.FIRST_FAILURE_AT: T0.isoformat(),
        a.LAST_REASON: "TIMEOUT",
        a.LAST_ERROR: "took too long",
        a.REDUCED_SCOPE: True,
    }


def test_a_later_failure_counts_on_and_keeps_the_first_failure_time():
    headers = a.after_failure({}, a.FRESH, reason="TIMEOUT", error="", now=T0, reduced_scope=True)
    later = T0 + timedelta(minutes=5)
    out = a.after_failure(
        headers,
        a.read_state(headers),
        reason="NETWORK_ERROR",
        error="reset",
        now=later,
        reduced_scope=False,
    )
    assert out[a.ATTEMPTS] == 2
    assert out[a.FIRST_FAILURE_AT] == T0.isoformat()
    assert (out[a.LAST_REASON], out[a.LAST_ERROR], out[a.REDUCED_SCOPE]) == (
        "NETWORK_ERROR",
        "reset",
        False,
    )


def test_headers_written_read_back_as_the_next_attempt():
    headers: dict[str, object] = {}
    state = a.read_state(headers)
    for n in range(1, 6):
        headers = a.after_failure(
            headers, state, reason="TIMEOUT", error="e", now=T0, reduced_scope=False
        )
        state = a.read_state(headers)
        assert (state.failures, state.attempt, state.first_failure_at) == (n, n + 1, T0)


def test_the_error_is_cut_at_max_error_chars():
    assert a.MAX_ERROR_CHARS == 1024
    exact = "e" * a.MAX_ERROR_CHARS
    long = exact + "tail"

    def written(error: str) -> str:
        out = a.after_failure({}, a.FRESH, reason="R", error=error, now=T0, reduced_scope=False)
        return str(out[a.LAST_ERROR])

    assert written(exact) == exact
    assert written(long) == exact


def test_a_charged_failure_clears_suspect_and_parked_marks():
    headers = {a.SUSPECT: 2, a.PARKED: 1, a.ATTEMPTS: 1}
    out = a.after_failure(
        headers, a.read_state(headers), reason="R", error="", now=T0, reduced_scope=False
    )
    assert a.SUSPECT not in out
    assert a.PARKED not in out
    assert out[a.ATTEMPTS] == 2


def test_after_failure_leaves_its_input_alone():
    headers = {a.ATTEMPTS: 1, a.SUSPECT: 1, "k": "v"}
    snapshot = dict(headers)
    a.after_failure(
        headers, a.read_state(headers), reason="R", error="", now=T0, reduced_scope=True
    )
    assert headers == snapshot


# --- uncharged -----------------------------------------------------------------------------


def test_uncharged_without_marks_copies_the_headers():
    headers = {a.ATTEMPTS: 2, "k": "v"}
    out = a.uncharged(headers)
    assert out == headers
    assert out is not headers


def test_a_suspect_mark_is_counted_without_charging():
    out = a.uncharged({a.ATTEMPTS: 2}, suspect=True)
    assert out == {a.ATTEMPTS: 2, a.SUSPECT: 1}
    again = a.uncharged(out, suspect=True)
    assert again[a.SUSPECT] == 2
    assert a.read_state(again).failures == 2
    assert a.PARKED not in again


def test_a_parked_mark_is_counted_without_charging():
    out = a.uncharged({}, parked=True)
    assert out == {a.PARKED: 1}
    assert a.uncharged(out, parked=True)[a.PARKED] == 2
    assert a.read_state(out) is a.FRESH


def test_both_marks_at_once():
    out = a.uncharged({a.SUSPECT: 1, a.PARKED: 3}, suspect=True, parked=True)
    assert (out[a.SUSPECT], out[a.PARKED]) == (2, 4)


def test_an_unusable_mark_restarts_at_one():
    assert a.uncharged({a.SUSPECT: "junk"}, suspect=True)[a.SUSPECT] == 1


def test_uncharged_leaves_its_input_alone():
    headers = {a.SUSPECT: 1}
    a.uncharged(headers, suspect=True, parked=True)
    assert headers == {a.SUSPECT: 1}


# --- agent_headers -------------------------------------------------------------------------


def test_the_agent_sees_only_the_publishers_headers():
    headers = {
        "tenant": "acme",
        "x-custom": 1,
        a.ATTEMPTS: 2,
        a.LAST_ERROR: "e",
        a.REPROCESSED_FROM: "dlq",
        **{name: "b" for name in a.BROKER_HEADERS},
    }
    assert a.agent_headers(headers) == {"tenant": "acme", "x-custom": 1}


def test_every_broker_bookkeeping_header_is_hidden():
    assert set(a.BROKER_HEADERS) == {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    }
    for name in a.BROKER_HEADERS:
        assert a.agent_headers({name: 1}) == {}


# --- stable_id -----------------------------------------------------------------------------


def test_a_message_id_leads_the_stable_id():
    # Readable in the tools, yet two messages sharing a message_id never share a record.
    sid = a.stable_id("q", "m-1", "rk", b"body", {})
    assert re.fullmatch(r"m-1#[0-9a-f]{16}", sid)
    assert a.stable_id("q", "m-1", "rk", b"other body", {}) != sid


def _sid(
    queue: str = "q",
    routing_key: str = "rk",
    body: bytes = b"body",
    headers: dict[str, object] | None = None,
    message_id: str | None = None,
) -> str:
    return a.stable_id(queue, message_id, routing_key, body, headers or {})


def test_without_a_message_id_the_same_message_has_the_same_id():
    headers = {"tenant": "acme", "n": 1}
    assert _sid(headers=headers) == _sid(headers=dict(headers))
    assert _sid(message_id="") == _sid()  # an empty message id is no id


def test_the_id_ignores_header_order_and_the_sidecars_own_headers():
    # A retried message carries more x-sidecar-* headers, but is the same message.
    assert _sid(headers={"a": 1, "b": 2}) == _sid(headers={"b": 2, "a": 1})
    assert _sid(headers={"a": 1}) == _sid(headers={"a": 1, a.ATTEMPTS: 3, "x-death": []})


@pytest.mark.parametrize(
    "other",
    [
        {"queue": "q2"},
        {"body": b"body2"},
        {"body": b""},
        {"headers": {"tenant": "other"}},
        # Parts are separated, so shifting text from one into the next is a different message.
        {"queue": "qb", "body": b"ody"},
    ],
)
def test_a_different_message_has_a_different_id(other):
    assert _sid(**other) != _sid()


def test_the_derived_id_is_a_bounded_digest():
    derived = _sid()
    prefix, _, digest = derived.partition(":")
    assert prefix == "sha256"
    assert len(digest) == 40
    int(digest, 16)
