"""Documented bounds on what the sidecar accepts from outside, and the checks that enforce
them in time linear in the size of the input.

Everything here is pure: no I/O, no clock. Frames, broker headers and bodies are hostile
until checked, and a check must never cost more than one pass over the bytes (no recursion
that a deep value can exhaust, no regex that can backtrack).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

# Deepest nesting (lists inside maps inside lists...) accepted in a frame's values, in the
# headers of a publish, and in a body the sidecar decodes as JSON for the DLQ payload.
MAX_NESTING = 32
# Characters of an agent's error string kept; the rest is counted, not stored.
MAX_ERROR_CHARS = 1024
# Largest attempt counter honoured in a header; beyond it the value is clamped.
MAX_ATTEMPT_COUNT = 10_000

# AMQP field values RabbitMQ accepts (signed 64-bit integers at most).
_INT64 = (-(2**63), 2**63 - 1)
_MAX_HEADER_STRING = 64 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LAST_TIMESTAMP = datetime(9999, 12, 31, tzinfo=UTC)


class TooDeep(ValueError):
    """A value nested deeper than MAX_NESTING."""


def truncate(text: str, limit: int = MAX_ERROR_CHARS) -> tuple[str, int]:
    """(the first ``limit`` characters, how many were dropped)."""
    if len(text) <= limit:
        return text, 0
    return text[:limit], len(text) - limit


# --- JSON text nesting, without parsing it ----------------------------------------------

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNER_PAIR = re.compile(r"\[\]|\{\}")


def json_nesting_exceeds(data: str | bytes, limit: int = MAX_NESTING) -> bool:
    """True when JSON text nests deeper than ``limit``. Linear: escapes, then strings, then
    everything but brackets are removed in single regex passes (none can backtrack: once
    escapes are gone a string ends at the next quote), then innermost pairs are peeled at
    most ``limit`` times."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    run = re.compile(r"[\[{]{" + str(limit + 1) + "}")
    for _ in range(limit):
        if not brackets:
            return False
        # A run of openers longer than the limit settles it in one pass (the usual shape
        # of a hostile frame), before another peel copies the whole string again.
        if run.search(brackets):
            return True
        peeled = _INNER_PAIR.sub("", brackets)
        if peeled == brackets:
            break  # unbalanced: only depth matters, and nothing more can be peeled
        brackets = peeled
    return "[" in brackets or "{" in brackets


def nesting_exceeds(value: Any, limit: int = MAX_NESTING) -> bool:
    """True when a decoded value (dicts, lists, tuples) nests deeper than ``limit``.
    Iterative, so a deep value cannot exhaust the interpreter's stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# --- header values --------------------------------------------------------------------


def json_safe(value: Any, *, lenient: bool = False, _depth: int = 0) -> Any:
    """An AMQP header value as a JSON-friendly value (datetimes and bytes become text,
    Decimals and non-finite floats become text). Deeper than MAX_NESTING: TooDeep, or with
    ``lenient`` a placeholder string, so what can be read of a hostile message is kept."""
    kind = type(value)
    # Most header values are plain text or numbers: kept as they are, without the chain of
    # checks below (exact types only: subclasses and non-finite floats go the long way).
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float and math.isfinite(value):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping | list | tuple):
        if _depth >= MAX_NESTING:
            if lenient:
                return f"<nested deeper than {MAX_NESTING}>"
            raise TooDeep(f"value nested deeper than {MAX_NESTING} levels")
        if isinstance(value, Mapping):
            return {
                str(k): json_safe(v, lenient=lenient, _depth=_depth + 1) for k, v in value.items()
            }
        return [json_safe(v, lenient=lenient, _depth=_depth + 1) for v in value]
    if isinstance(value, str):
        return str(value)  # a plain str: subclasses (placeholders) do not encode
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return int(value)
    return repr(value)[:200]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def amqp_header_problem(headers: Mapping[str, Any]) -> str | None:
    """Why these publish headers cannot travel in AMQP, or None. RabbitMQ closes the whole
    connection (INTERNAL_ERROR) on a value it cannot encode, so they are checked before
    anything is sent: finite floats, 64-bit integers, bounded nesting and string sizes."""
    stack: list[tuple[str, Any, int]] = [(k, v, 0) for k, v in headers.items()]
    for key in headers:
        if not isinstance(key, str) or not key or not _utf8(key) or len(key.encode()) > 255:
            return "header names must be 1..255 bytes of text"
    while stack:
        path, value, depth = stack.pop()
        if value is None or isinstance(value, bool | str | bytes):
            if isinstance(value, str | bytes) and len(value) > _MAX_HEADER_STRING:
                return f"header {path!r}: value longer than {_MAX_HEADER_STRING} bytes"
            if isinstance(value, str) and not value.isascii() and not _utf8(value):
                return f"header {path!r}: text that is not valid Unicode (a lone surrogate)"
            continue
        if isinstance(value, int):
            if not _INT64[0] <= value <= _INT64[1]:
                return f"header {path!r}: integer outside the signed 64-bit range"
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                return f"header {path!r}: {value!r} is not a finite number"
            continue
        if isinstance(value, datetime):
            # AMQP timestamps are unsigned seconds since the epoch.
            if value.tzinfo is None or not _EPOCH <= value <= _LAST_TIMESTAMP:
                return f"header {path!r}: timestamps must be timezone-aware, 1970..9999"
            continue
        if isinstance(value, Mapping | list):
            if depth >= MAX_NESTING:
                return f"header {path!r}: nested deeper than {MAX_NESTING} levels"
            if isinstance(value, Mapping):
                for k, v in value.items():
                    if not isinstance(k, str) or not _utf8(k) or len(k.encode()) > 255:
                        return f"header {path!r}: table keys must be text of at most 255 bytes"
                    stack.append((f"{path}.{k}", v, depth + 1))
            else:
                stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))
            continue
        return f"header {path!r}: unsupported value type {type(value).__name__}"
    return None
