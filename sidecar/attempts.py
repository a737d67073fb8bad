"""The attempt state a message carries in headers the sidecar owns.

The count travels with the message, not in sidecar memory, so it survives restarts and holds
across many sidecars consuming one queue.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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

MAX_ERROR_CHARS = 1024


@dataclass(frozen=True, slots=True)
class AttemptState:
    failures: int = 0
    first_failure_at: datetime | None = None
    last_reason: str = ""
    last_error: str = ""
    reduced_scope: bool = False
    suspect: int = 0

    @property
    def attempt(self) -> int:
        """The number of the attempt about to be made (1 for a fresh message)."""
        return self.failures + 1


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


FRESH = AttemptState()


def read_state(headers: dict[str, Any]) -> AttemptState:
    # Hot path: most messages have never failed and were never sent back.
    if ATTEMPTS not in headers and SUSPECT not in headers:
        return FRESH
    first = headers.get(FIRST_FAILURE_AT)
    first_at = None
    if isinstance(first, datetime):
        first_at = first if first.tzinfo else first.replace(tzinfo=UTC)
    elif isinstance(first, str | bytes):
        try:
            text = first.decode() if isinstance(first, bytes) else first
            first_at = datetime.fromisoformat(text)
        except ValueError:
            first_at = None
    return AttemptState(
        failures=_int(headers.get(ATTEMPTS)),
        first_failure_at=first_at,
        last_reason=str(headers.get(LAST_REASON) or ""),
        last_error=str(headers.get(LAST_ERROR) or ""),
        reduced_scope=bool(headers.get(REDUCED_SCOPE)),
        suspect=_int(headers.get(SUSPECT)),
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
    """The DLQ record's idempotency key: the same broker message always maps to the same id,
    so a crash between the DLQ write and the ack yields one record, not two."""
    if message_id:
        return message_id
    digest = hashlib.sha256()
    for part in (queue, routing_key, repr(sorted(agent_headers(headers).items()))):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(body)
    return "sha256:" + digest.hexdigest()[:40]


# --- failure history: each charged failure, carried with the message through its retries

FAILURES = "x-sidecar-failures"
# Headers are hostile input: the history is bounded in entries, in each text field, and in
# the raw header read, so a forged header cannot make a message (or a record) grow.
MAX_FAILURE_ENTRIES = 10
MAX_HISTORY_ERROR_CHARS = 256
MAX_HISTORY_FIELD_CHARS = 128
MAX_FAILURES_HEADER_BYTES = 16 * 1024


def _text(value: Any, limit: int) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value[:limit] if isinstance(value, str) else ""


def failure_entry(
    *, attempt: int, reason: str, error: str, at: datetime, host: str, agent_version: str
) -> dict[str, Any]:
    """One failed attempt as stored in a DLQ record's ``failures`` and in the header."""
    return {
        "attempt": max(0, int(attempt)),
        "reason": _text(reason, MAX_HISTORY_FIELD_CHARS),
        "error": _text(error, MAX_HISTORY_ERROR_CHARS),
        "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "host": _text(host, MAX_HISTORY_FIELD_CHARS),
        "agentVersion": _text(agent_version, MAX_HISTORY_FIELD_CHARS),
    }


def _clean_entry(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    attempt = raw.get("attempt")
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        return None
    at = _text(raw.get("at"), 40)
    try:
        datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return {
        "attempt": max(0, attempt),
        "reason": _text(raw.get("reason"), MAX_HISTORY_FIELD_CHARS),
        "error": _text(raw.get("error"), MAX_HISTORY_ERROR_CHARS),
        "at": at,
        "host": _text(raw.get("host"), MAX_HISTORY_FIELD_CHARS),
        "agentVersion": _text(raw.get("agentVersion"), MAX_HISTORY_FIELD_CHARS),
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
