"""W3C Trace Context (level 1) read from message headers: pure, strict and bounded.

A publisher that traces puts ``traceparent`` (and maybe ``tracestate``) in the AMQP
headers of its message. The daemon reads them to keep the trace id in dead-letter records
and, when tracing is enabled, to parent its spans. Header values come from anyone: a value
that is not exactly a version-00 ``traceparent`` is ignored, never an error, and every
check looks at a bounded number of characters whatever the value's size.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "TraceContext",
    "format_traceparent",
    "parse_traceparent",
    "parse_tracestate",
    "trace_context",
    "trace_id",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# "00-" + 32 hex trace id + "-" + 16 hex parent id + "-" + 2 hex flags.
TRACEPARENT_LENGTH = 55
# The specification asks vendors to carry at least 512 characters of tracestate; a longer
# one may be dropped whole, and is, so a hostile header is never copied into spans.
MAX_TRACESTATE = 512

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16
# Printable ASCII without the characters the list syntax cannot hold inside a member.
_TRACESTATE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]*(?:=[\x20-\x2b\x2d-\x3c\x3e-\x7e]*)?")


@dataclasses.dataclass(slots=True, frozen=True)
class TraceContext:
    """A valid ``traceparent`` (lower-case hex) and the ``tracestate`` that came with it."""

    trace_id: str
    parent_id: str
    flags: int
    state: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.parent_id, self.flags)


def format_traceparent(trace_id: str, parent_id: str, flags: int) -> str:
    return f"00-{trace_id}-{parent_id}-{flags & 0xFF:02x}"


def _text(value: Any, limit: int) -> str | None:
    """``value`` as text when it is str or bytes of at most ``limit`` characters."""
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) > limit:
            return None
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and len(value) <= limit:
        return value
    return None


def parse_traceparent(value: Any) -> TraceContext | None:
    """The context of a version-00 ``traceparent`` value, or None for anything else
    (another version, upper-case hex, an all-zero id, surrounding spaces, a non-string)."""
    text = _text(value, TRACEPARENT_LENGTH)
    if text is None or len(text) != TRACEPARENT_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(text)
    if match is None:
        return None
    trace, parent, flags = match.groups()
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return TraceContext(trace, parent, int(flags, 16))


def parse_tracestate(value: Any) -> str | None:
    """A ``tracestate`` value kept verbatim when it is short printable list text, else None.
    Only its length and alphabet are checked: the daemon carries it, never interprets it."""
    text = _text(value, MAX_TRACESTATE)
    if not text or not text.strip():
        return None
    if not all(_TRACESTATE.fullmatch(member) for member in text.split(",")):
        return None
    return text


def trace_context(headers: Mapping[str, Any]) -> TraceContext | None:
    """The trace context a message carries in its headers, if a valid one."""
    context = parse_traceparent(headers.get(TRACEPARENT))
    if context is None:
        return None
    state = parse_tracestate(headers.get(TRACESTATE))
    return context if state is None else dataclasses.replace(context, state=state)


def trace_id(headers: Mapping[str, Any]) -> str | None:
    """The 32-hex trace id of a message's ``traceparent``, if valid."""
    context = parse_traceparent(headers.get(TRACEPARENT))
    return None if context is None else context.trace_id
