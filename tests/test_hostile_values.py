"""Hostile values from outside, one regression test per finding of the hardening review:
attempt headers, frame and body nesting, publish headers, error strings, DLQ identity.

Pure: no broker, no socket. What must hold for each: a clear refusal or a value ignored
and counted, never an exception, and time linear in the size of the input.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from sidecar import attempts, limits
from sidecar import protocol as p
from sidecar.policy.failure import SIGNATURE_MAX_CHARS, error_signature
from sidecar.store.records import payload_from_body

# --- attempt headers ---------------------------------------------------------------------


def test_naive_first_failure_time_is_taken_as_utc() -> None:
    state = attempts.read_state(
        {attempts.ATTEMPTS: 1, attempts.FIRST_FAILURE_AT: "2024-01-01T00:00:00"}
    )
    assert state.first_failure_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert state.first_failure_at.tzinfo is not None
    assert state.ignored == ()


def test_naive_datetime_header_is_taken_as_utc() -> None:
    state = attempts.read_state(
        {attempts.ATTEMPTS: 1, attempts.FIRST_FAILURE_AT: datetime(2024, 1, 1, 5)}
    )
    assert state.first_failure_at == datetime(2024, 1, 1, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",  # cannot move to UTC without leaving the calendar
        "not a time",
        "9" * 5000,
        b"\xff\xfe",
        12345,
        ["2024-01-01"],
    ],
)
def test_unusable_first_failure_time_is_ignored_and_named(value: Any) -> None:
    state = attempts.read_state({attempts.ATTEMPTS: 2, attempts.FIRST_FAILURE_AT: value})
    assert state.failures == 2
    assert state.first_failure_at is None
    assert attempts.FIRST_FAILURE_AT in state.ignored


@pytest.mark.parametrize(
    ("value", "failures", "ignored"),
    [
        (9223372036854775807, limits.MAX_ATTEMPT_COUNT, True),  # OverflowError in SQLite
        (2**80, limits.MAX_ATTEMPT_COUNT, True),
        (3e38, limits.MAX_ATTEMPT_COUNT, True),  # OverflowError encoding the delivery
        (float("inf"), 0, True),
        (float("nan"), 0, True),
        (2.5, 0, True),
        (2.0, 2, False),
        (Decimal("3"), 3, False),
        (Decimal("Infinity"), 0, True),
        (Decimal("NaN"), 0, True),
        (-5, 0, True),
        ("7", 7, False),
        (b"4", 4, False),
        ("1e400", 0, True),
        ("9" * 5000, 0, True),
        (True, 0, True),
        ([1, 2], 0, True),
        ({"a": 1}, 0, True),
        (datetime(2024, 1, 1, tzinfo=UTC), 0, True),
        (limits.MAX_ATTEMPT_COUNT, limits.MAX_ATTEMPT_COUNT, False),
    ],
)
def test_attempt_count_is_clamped_or_ignored(value: Any, failures: int, ignored: bool) -> None:
    state = attempts.read_state({attempts.ATTEMPTS: value})
    assert state.failures == failures
    assert (attempts.ATTEMPTS in state.ignored) is ignored
    # Whatever came in, what goes out fits MessagePack, SQLite and the next header.
    assert 1 <= state.attempt <= limits.MAX_ATTEMPT_COUNT + 1
    msgspec.msgpack.encode(p.Delivery(id=1, queue="q", body=b"", attempt=state.attempt))
    headers = attempts.after_failure(
        {attempts.ATTEMPTS: value},
        state,
        reason="NETWORK_ERROR",
        error="x",
        now=datetime.now(UTC),
        reduced_scope=False,
    )
    assert headers[attempts.ATTEMPTS] == state.failures + 1


@pytest.mark.parametrize("value", [-1, 2**70, "x", float("inf"), [None]])
def test_suspect_count_is_never_trusted_beyond_range(value: Any) -> None:
    state = attempts.read_state({attempts.SUSPECT: value})
    assert 0 <= state.suspect <= limits.MAX_ATTEMPT_COUNT
    out = attempts.uncharged({attempts.SUSPECT: value}, suspect=True)
    assert 1 <= out[attempts.SUSPECT] <= limits.MAX_ATTEMPT_COUNT + 1


def test_last_error_and_reason_of_any_type_are_bounded_text() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    state = attempts.read_state(
        {attempts.ATTEMPTS: 1, attempts.LAST_ERROR: deep, attempts.LAST_REASON: b"TIMEOUT"}
    )
    assert state.last_error == ""
    assert state.last_reason == "TIMEOUT"
    assert attempts.LAST_ERROR in state.ignored
    long = attempts.read_state({attempts.ATTEMPTS: 1, attempts.LAST_ERROR: "e" * 100_000})
    assert len(long.last_error) == limits.MAX_ERROR_CHARS


# --- DLQ identity ------------------------------------------------------------------------


def test_different_messages_sharing_a_message_id_get_different_ids() -> None:
    c1 = attempts.stable_id("q", "same-1", "q", b'{"id":"c1"}', {})
    c2 = attempts.stable_id("q", "same-1", "q", b'{"id":"c2"}', {})
    assert c1 != c2
    assert c1.startswith("same-1#")
    other_headers = attempts.stable_id("q", "same-1", "q", b'{"id":"c1"}', {"tenant": "b"})
    assert other_headers not in (c1, c2)


def test_the_same_message_keeps_its_id_across_attempts_and_redeliveries() -> None:
    body, published = b'{"id":"c1"}', {"tenant": "a"}
    first = attempts.stable_id("q", "m-1", "orig.key", body, published)
    later_headers = attempts.after_failure(
        {**published, "x-death": [{"count": 1}]},
        attempts.FRESH,
        reason="NETWORK_ERROR",
        error="reset",
        now=datetime.now(UTC),
        reduced_scope=True,
    )
    # Back from a delay tier: other routing key, sidecar and broker headers added.
    assert attempts.stable_id("q", "m-1", "q", body, later_headers) == first
    assert attempts.stable_id("other", "m-1", "q", body, published) != first


def test_identity_of_a_message_with_deep_headers_is_computed() -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = {"a": deep}
    one = attempts.stable_id("q", None, "q", b"x", {"h": deep})
    assert one == attempts.stable_id("q", None, "q", b"x", {"h": deep})
    assert one.startswith("sha256:")


# --- nesting -----------------------------------------------------------------------------


def _hello_with_pid_nested(depth: int) -> str:
    return '{"kind":"hello","agent":"x","queues":[],"pid":' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [p.MAX_DEPTH, 500, 1000, 100_000])
def test_deep_json_frame_is_malformed_not_a_recursion_error(depth: int) -> None:
    with pytest.raises(p.ProtocolError) as refused:
        p.Codec().decode_agent(_hello_with_pid_nested(depth))
    assert refused.value.code == "malformed"
    assert "nested deeper" in refused.value.message


def test_frame_at_the_documented_depth_is_decoded() -> None:
    # The frame is level 1: headers (2) may hold values down to MAX_DEPTH in all.
    value: Any = 1
    for _ in range(p.MAX_DEPTH - 2):
        value = [value]
    frame = msgspec.json.encode(
        {"kind": "publish", "ref": 1, "body": "", "queue": "q", "headers": {"h": value}}
    )
    assert isinstance(p.Codec().decode_agent(frame.decode()), p.Publish)
    assert not limits.json_nesting_exceeds(frame)
    deeper = frame.replace(b"[1]", b"[[1]]")
    assert limits.json_nesting_exceeds(deeper)


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deep_msgpack_frame_is_malformed(depth: int) -> None:
    head = msgspec.msgpack.encode({"kind": "publish", "ref": 1, "body": b"", "queue": "q"})
    frame = (
        bytes([head[0] + 1])
        + head[1:]
        + msgspec.msgpack.encode("headers")
        + b"\x81"
        + msgspec.msgpack.encode("h")
        + b"\x91" * depth
        + b"\xc0"
    )
    with pytest.raises(p.ProtocolError) as refused:
        p.Codec().decode_agent(frame)
    assert refused.value.code == "malformed"


def test_brackets_inside_strings_and_escapes_do_not_count() -> None:
    text = '{"a":"' + "[" * 1000 + '\\"' + "{" * 1000 + '"}'
    assert not limits.json_nesting_exceeds(text)
    assert limits.json_nesting_exceeds('{"a":"\\\\"' + ",[" * 40 + "]" * 40 + "}")


def test_deep_json_body_is_kept_as_text() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert payload_from_body(body) == body.decode()
    shallow = b'{"a":[1,{"b":2}]}'
    assert payload_from_body(shallow) == {"a": [1, {"b": 2}]}


def test_nesting_of_decoded_values_is_checked_without_recursion() -> None:
    deep: Any = 0
    for _ in range(100_000):
        deep = [deep]
    assert limits.nesting_exceeds(deep)
    assert not limits.nesting_exceeds({"a": [[1]]}, 3)
    assert limits.nesting_exceeds({"a": [[[1]]]}, 3)
    assert limits.json_safe(deep, lenient=True) == [
        [
            [
                [
                    [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    f"<nested deeper than {limits.MAX_NESTING}>"
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                ]
            ]
        ]
    ]
    with pytest.raises(limits.TooDeep):
        limits.json_safe(deep)


# --- publish headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"h": math.inf},
        {"h": -math.inf},
        {"h": math.nan},
        {"h": [1.0, {"x": math.inf}]},
        {"h": 2**63},
        {"h": -(2**63) - 1},
        {"h": "x" * 70_000},
        {"h": msgspec.msgpack.Ext(1, b"x")},
        {"h": datetime(2024, 1, 1)},
        {"h": datetime(1, 1, 1, tzinfo=UTC)},
        {"": 1},
        {"k" * 256: 1},
    ],
)
def test_headers_amqp_cannot_carry_are_refused(headers: dict[str, Any]) -> None:
    assert limits.amqp_header_problem(headers) is not None


def test_deep_publish_header_is_refused() -> None:
    deep: Any = 1
    for _ in range(limits.MAX_NESTING + 1):
        deep = [deep]
    assert "nested deeper" in (limits.amqp_header_problem({"h": deep}) or "")


def test_ordinary_headers_pass() -> None:
    ok = {
        "s": "text",
        "b": b"\x00\xff",
        "i": -(2**63),
        "j": 2**63 - 1,
        "f": 1.5,
        "t": True,
        "n": None,
        "l": [1, "a", {"x": [2.0]}],
        "d": {"k": {"k": "v"}},
        "ts": datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))),
    }
    assert limits.amqp_header_problem(ok) is None


# --- error strings -----------------------------------------------------------------------


def test_error_signature_is_bounded_for_long_hostile_errors() -> None:
    for text in ("a" * 130_000, "a@" * 65_000, "a://" * 30_000, "'" * 130_000, "a@b." * 30_000):
        signature = error_signature("TIMEOUT", text)
        assert len(signature) <= len("TIMEOUT:") + SIGNATURE_MAX_CHARS


def test_signature_rules_still_normalise() -> None:
    a = error_signature("NETWORK_ERROR", "GET https://x.example/a?id=5 failed after 5000ms")
    b = error_signature("NETWORK_ERROR", "GET https://y.example/b failed after 120ms")
    assert a == b == "NETWORK_ERROR:get <url> failed after <n>ms"
    assert error_signature("X", "mail to bob@example.com") == "X:mail to <email>"


def test_truncate_counts_what_it_drops() -> None:
    assert limits.truncate("abc", 5) == ("abc", 0)
    assert limits.truncate("x" * 60_000) == ("x" * limits.MAX_ERROR_CHARS, 60_000 - 1024)
