"""The W3C trace context parser: strict on what it accepts, silent on what it ignores."""

from __future__ import annotations

import re

import pytest

from sidecar import tracecontext
from sidecar.tracecontext import (
    MAX_TRACESTATE,
    TraceContext,
    format_traceparent,
    parse_traceparent,
    parse_tracestate,
    trace_context,
    trace_id,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def test_valid_traceparent_as_str_and_bytes() -> None:
    for value in (VALID, VALID.encode(), bytearray(VALID.encode())):
        context = parse_traceparent(value)
        assert context == TraceContext(TRACE, PARENT, 1)
        assert context.sampled
        assert context.traceparent == VALID


def test_flags_are_kept_and_unsampled_is_read() -> None:
    context = parse_traceparent(f"00-{TRACE}-{PARENT}-00")
    assert context is not None and not context.sampled and context.flags == 0
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-ff") == TraceContext(TRACE, PARENT, 0xFF)


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"01-{TRACE}-{PARENT}-01",  # another version
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f" {VALID}",
        f"{VALID} ",
        f"00_{TRACE}-{PARENT}-01",
        f"00-{TRACE[:-1]}g-{PARENT}-01",
        f"00-{TRACE}-{PARENT[:-1]}-01x",
        VALID[:-1],
        "00-" + "é" * 32 + f"-{PARENT}-01",
        None,
        1,
        ["00", TRACE, PARENT, "01"],
        {"traceparent": VALID},
        b"\xff" * 55,
    ],
)
def test_anything_else_is_ignored(value: object) -> None:
    assert parse_traceparent(value) is None


def test_trace_id_from_headers() -> None:
    assert trace_id({"traceparent": VALID}) == TRACE
    assert trace_id({"traceparent": VALID.encode()}) == TRACE
    assert trace_id({}) is None
    assert trace_id({"traceparent": "garbage"}) is None
    # AMQP header names are case-sensitive; the specification's name is lower-case.
    assert trace_id({"Traceparent": VALID}) is None


def test_tracestate_kept_only_with_a_valid_traceparent() -> None:
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    context = trace_context({"traceparent": VALID, "tracestate": state})
    assert context == TraceContext(TRACE, PARENT, 1, state)
    assert trace_context({"traceparent": VALID, "tracestate": state.encode()}) == context
    assert trace_context({"traceparent": "nope", "tracestate": state}) is None


@pytest.mark.parametrize(
    "state",
    ["", "   ", "a=b\n", "a=b=c", "a=\x00", "x" * (MAX_TRACESTATE + 1), 5, ["a=b"], b"\xff=1"],
)
def test_unusable_tracestate_is_dropped_not_the_context(state: object) -> None:
    assert parse_tracestate(state) is None
    context = trace_context({"traceparent": VALID, "tracestate": state})
    assert context == TraceContext(TRACE, PARENT, 1)


class _Tripwire(bytes):
    """Bytes that must never be decoded: reading them would cost their whole size."""

    def decode(self, *args: object, **kwargs: object) -> str:
        raise AssertionError(f"a {len(self)}-byte value was decoded")


class _GuardedPattern:
    """Stands in for a compiled pattern and refuses input longer than ``limit``."""

    def __init__(self, pattern: re.Pattern[str], limit: int) -> None:
        self.pattern, self.limit = pattern, limit

    def fullmatch(self, text: str) -> re.Match[str] | None:
        assert len(text) <= self.limit, f"a {len(text)}-character value was scanned"
        return self.pattern.fullmatch(text)


def test_oversized_values_are_refused_before_they_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linear at worst, and constant for oversized values: the length is checked before
    any decoding or matching, so a megabyte header costs what a short one costs."""
    monkeypatch.setattr(
        tracecontext, "_TRACEPARENT", _GuardedPattern(tracecontext._TRACEPARENT, 55)
    )
    monkeypatch.setattr(
        tracecontext, "_TRACESTATE", _GuardedPattern(tracecontext._TRACESTATE, MAX_TRACESTATE)
    )
    huge = "00-" + "a" * (1 << 22)
    assert parse_traceparent(huge) is None
    assert parse_traceparent(_Tripwire(huge.encode())) is None
    assert parse_tracestate(huge) is None
    assert parse_tracestate(_Tripwire(huge.encode())) is None
    # The guards let valid values through: they refuse only what is oversized.
    assert trace_context({"traceparent": VALID, "tracestate": "a=b"}) == TraceContext(
        TRACE, PARENT, 1, "a=b"
    )


def test_format_round_trips() -> None:
    assert format_traceparent(TRACE, PARENT, 1) == VALID
    assert parse_traceparent(format_traceparent(TRACE, PARENT, 0x1FF)) == TraceContext(
        TRACE, PARENT, 0xFF
    )
