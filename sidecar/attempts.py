"""The attempt state a message carries in headers the sidecar owns.

The count travels with the message, not in sidecar memory, so it survives restarts and holds
across many sidecars consuming one queue.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sidecar import limits

PREFIX = "x-sidecar-"
ATTEMPTS = "x-sidecar-attempts"  # failed attempts so far
FIRST_FAILURE_AT = "x-sidecar-first-failure-at"
LAST_REASON = "x-sidecar-last-reason"
LAST_ERROR = "x-sidecar-last-error"
REDUCED_SCOPE = "x-sidecar-reduced-scope"
SUSPECT = "x-sidecar-suspect"  # held by an agent that crashed with several messages
PARKED = "x-sidecar-parked"  # sent to wait out an open circuit, not charged
REPROCESSED_FROM = "x-sidecar-reprocessed-from"  # set by the operator tools
# Broker-added bookkeeping that means nothing to the agent.
BROKER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
)

MAX_ERROR_CHARS = limits.MAX_ERROR_CHARS
_MAX_TIME_CHARS = 64  # an ISO timestamp is ~32 characters; longer is not one


@dataclass(frozen=True, slots=True)
class AttemptState:
    failures: int = 0
    first_failure_at: datetime | None = None
    last_reason: str = ""
    last_error: str = ""
    reduced_scope: bool = False
    suspect: int = 0
    # Headers of ours that held values we could not use (ignored, so the message still
    # flows); the engine counts them.
    ignored: tuple[str, ...] = ()

    @property
    def attempt(self) -> int:
        """The number of the attempt about to be made (1 for a fresh message)."""
        return self.failures + 1


def _count(value: Any) -> int | None:
    """A counter header as an int in 0..MAX_ATTEMPT_COUNT, or None when it is unusable.
    Anything a producer wrote is accepted only if it is plainly a non-negative whole
    number; huge values are clamped so later arithmetic and storage stay in range."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, bytes):
        value = value[:32].decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not (0 < len(text) <= 20 and text.isdigit()):
            return None
        value = int(text)
    if isinstance(value, float | Decimal):
        if not value.is_finite() if isinstance(value, Decimal) else not math.isfinite(value):
            return None
        if value != int(value):
            return None
        value = int(value)
    if not isinstance(value, int) or value < 0:
        return None
    return min(value, limits.MAX_ATTEMPT_COUNT)


def _time(value: Any) -> datetime | None:
    """An aware UTC datetime, or None. Naive values are taken as UTC (that is how the
    sidecar writes them); text that is not a timestamp, or one that cannot be moved to UTC,
    is unusable."""
    if isinstance(value, bytes):
        value = value[:_MAX_TIME_CHARS].decode("ascii", "replace")
    if isinstance(value, str):
        if len(value) > _MAX_TIME_CHARS:
            return None
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    try:
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=UTC)
        aware: datetime = value.astimezone(UTC)
        return aware
    except (OverflowError, ValueError):
        return None


def _text(value: Any, limit: int = MAX_ERROR_CHARS) -> str | None:
    """Header text cut to ``limit`` characters (bytes decoded leniently, only as many as can
    matter); None for any other type."""
    if isinstance(value, bytes):
        value = value[: limit * 4].decode("utf-8", "replace")
    return value[:limit] if isinstance(value, str) else None


def _int(value: Any) -> int:
    return _count(value) or 0


FRESH = AttemptState()


def read_state(headers: dict[str, Any]) -> AttemptState:
    """The attempt state a message carries. Never raises: a header of ours holding a value
    we cannot use is ignored (and named in ``ignored``), the rest still counts."""
    # Hot path: most messages have never failed and were never sent back.
    if ATTEMPTS not in headers and SUSPECT not in headers:
        return FRESH
    ignored: list[str] = []
    failures = _count(headers.get(ATTEMPTS))
    suspect = _count(headers.get(SUSPECT))
    first = headers.get(FIRST_FAILURE_AT)
    first_at = _time(first)
    reason = _text(headers.get(LAST_REASON) or "")
    error = _text(headers.get(LAST_ERROR) or "")
    for name, raw, parsed in (
        (ATTEMPTS, headers.get(ATTEMPTS), failures),
        (SUSPECT, headers.get(SUSPECT), suspect),
        (FIRST_FAILURE_AT, first, first_at),
        (LAST_REASON, headers.get(LAST_REASON), reason),
        (LAST_ERROR, headers.get(LAST_ERROR), error),
    ):
        if raw is not None and parsed is None:
            ignored.append(name)
    for name, value in ((ATTEMPTS, failures), (SUSPECT, suspect)):
        raw = headers.get(name)
        if value == limits.MAX_ATTEMPT_COUNT and not (type(raw) is int and raw == value):
            ignored.append(name)  # clamped
    return AttemptState(
        failures=failures or 0,
        first_failure_at=first_at,
        last_reason=reason or "",
        last_error=error or "",
        reduced_scope=bool(headers.get(REDUCED_SCOPE)),
        suspect=suspect or 0,
        ignored=tuple(ignored),
    )


def after_failure(
    headers: dict[str, Any],
    state: AttemptState,
    *,
    reason: str,
    error: str,
    now: datetime,
    reduced_scope: bool,
) -> dict[str, Any]:
    """Headers for the republished message after a charged failure."""
    out = dict(headers)
    out[ATTEMPTS] = state.failures + 1
    out[FIRST_FAILURE_AT] = (state.first_failure_at or now).isoformat()
    out[LAST_REASON] = reason
    out[LAST_ERROR] = error[:MAX_ERROR_CHARS]
    out[REDUCED_SCOPE] = reduced_scope
    out.pop(SUSPECT, None)
    out.pop(PARKED, None)
    return out


def uncharged(
    headers: dict[str, Any], *, suspect: bool = False, parked: bool = False
) -> dict[str, Any]:
    """Headers for a message sent back without charging an attempt."""
    out = dict(headers)
    if suspect:
        out[SUSPECT] = _int(out.get(SUSPECT)) + 1
    if parked:
        out[PARKED] = _int(out.get(PARKED)) + 1
    return out


def agent_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """What the agent sees: the publisher's headers, without the sidecar's or broker's."""
    return {
        k: v for k, v in headers.items() if not k.startswith(PREFIX) and k not in BROKER_HEADERS
    }


def stable_id(
    queue: str, message_id: str | None, routing_key: str, body: bytes, headers: dict[str, Any]
) -> str:
    """The DLQ record's id: one record per dead-lettered message.

    The same broker message always maps to the same id, so a crash between the DLQ write and
    the ack yields one record, not two. Two different messages (another body, or other
    headers the publisher set) never share an id, whatever their ``message_id``: producers
    reuse message ids, and merging would lose a body. The id hashes the queue, the
    message_id, the publisher's headers (not the sidecar's attempt headers, not the broker's
    ``x-death``: those change between attempts of one message) and the body. The routing key
    is not part of it: it changes when a retry comes back from a delay tier. A message_id
    stays readable in front of the hash."""
    digest = hashlib.sha256()
    for part in (queue, message_id or "", _canonical(agent_headers(headers))):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    digest.update(body)
    suffix = digest.hexdigest()[:40]
    if message_id and len(message_id) <= 200:
        return f"{message_id}#{suffix[:16]}"
    return "sha256:" + suffix


def _canonical(headers: dict[str, Any]) -> str:
    """Headers as deterministic text; deep values are cut, never recursed without bound."""
    safe = limits.json_safe(headers, lenient=True)
    return repr(sorted(safe.items())) if isinstance(safe, dict) else repr(safe)


# --- failure history: each charged failure, carried with the message through its retries

FAILURES = "x-sidecar-failures"
# Headers are hostile input: the history is bounded in entries, in each text field, and in
# the raw header read, so a forged header cannot make a message (or a record) grow.
MAX_FAILURE_ENTRIES = 10
MAX_HISTORY_ERROR_CHARS = 256
MAX_HISTORY_FIELD_CHARS = 128
MAX_FAILURES_HEADER_BYTES = 16 * 1024


def _field(value: Any, limit: int) -> str:
    return _text(value, limit) or ""


def failure_entry(
    *, attempt: int, reason: str, error: str, at: datetime, host: str, agent_version: str
) -> dict[str, Any]:
    """One failed attempt as stored in a DLQ record's ``failures`` and in the header."""
    return {
        "attempt": max(0, int(attempt)),
        "reason": _field(reason, MAX_HISTORY_FIELD_CHARS),
        "error": _field(error, MAX_HISTORY_ERROR_CHARS),
        "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "host": _field(host, MAX_HISTORY_FIELD_CHARS),
        "agentVersion": _field(agent_version, MAX_HISTORY_FIELD_CHARS),
    }


def _clean_entry(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    attempt = raw.get("attempt")
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        return None
    at = _field(raw.get("at"), 40)
    try:
        datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return {
        "attempt": max(0, attempt),
        "reason": _field(raw.get("reason"), MAX_HISTORY_FIELD_CHARS),
        "error": _field(raw.get("error"), MAX_HISTORY_ERROR_CHARS),
        "at": at,
        "host": _field(raw.get("host"), MAX_HISTORY_FIELD_CHARS),
        "agentVersion": _field(raw.get("agentVersion"), MAX_HISTORY_FIELD_CHARS),
    }


def read_failures(headers: dict[str, Any]) -> list[dict[str, Any]]:
    """The failure history a message carries; malformed or oversized input reads as empty
    (or loses only the malformed entries), never raises."""
    raw = headers.get(FAILURES)
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "replace")
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_FAILURES_HEADER_BYTES:
        return []
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested forgery
        return []
    if not isinstance(entries, list):
        return []
    cleaned = [e for e in map(_clean_entry, entries[-MAX_FAILURE_ENTRIES:]) if e is not None]
    return cleaned


def append_failure(history: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """History with ``entry`` added, keeping the most recent MAX_FAILURE_ENTRIES."""
    return [*history, entry][-MAX_FAILURE_ENTRIES:]


def with_failures(headers: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """Headers carrying ``history`` (compact JSON text: every AMQP client reads a string)."""
    out = dict(headers)
    out[FAILURES] = json.dumps(history[-MAX_FAILURE_ENTRIES:], separators=(",", ":"))
    return out
