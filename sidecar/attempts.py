"""The attempt state a message carries in headers the sidecar owns.

The count travels with the message, not in sidecar memory, so it survives restarts and holds
across many sidecars consuming one queue.
"""

from __future__ import annotations

import hashlib
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


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value[: MAX_ERROR_CHARS * 4].decode("utf-8", "replace")
    if isinstance(value, str):
        return value[:MAX_ERROR_CHARS]
    return None


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
