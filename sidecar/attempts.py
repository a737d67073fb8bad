"""The attempt state a message carries in headers the sidecar owns.

The count travels with the message, not in sidecar memory, so it survives restarts and holds
across many sidecars consuming one queue.
"""

from __future__ import annotations

import hashlib
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
