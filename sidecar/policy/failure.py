"""Failure reasons and error signatures.

Reasons drive the retry decision; signatures group dead letters into patterns so a new kind of
failure can raise an alert while a thousand copies of a known one do not.
"""

from __future__ import annotations

import enum
import re


class FailureReason(enum.StrEnum):
    """Why an attempt failed, as reported by the agent (or inferred by the sidecar)."""

    TIMEOUT = "TIMEOUT"
    NETWORK_ERROR = "NETWORK_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    AGENT_CRASH = "AGENT_CRASH"
    UNRECOVERABLE = "UNRECOVERABLE"
    CONSTRAINT_VIOLATION = "CONSTRAINT_VIOLATION"
    PROCESSING_ERROR = "PROCESSING_ERROR"  # generic transient failure


# Retrying these cannot help: the same input fails the same way.
PERMANENT_REASONS: frozenset[FailureReason] = frozenset(
    {
        FailureReason.VALIDATION_FAILED,
        FailureReason.UNRECOVERABLE,
        FailureReason.CONSTRAINT_VIOLATION,
    }
)

SIGNATURE_MAX_CHARS = 200
# Only the head of an error is normalised: the signature keeps 200 characters anyway, and
# every rule below is linear, so the cost per failure is bounded whatever the agent sent.
SIGNATURE_INPUT_CHARS = 1024

# Every repetition that can start at many positions is bounded ({1,64} rather than +), so
# a long run that almost matches costs a constant per position, not a rescan of the rest.
# Order matters: structured tokens (URLs, emails, quoted text, UUIDs, IPs) are replaced before
# the bare hex and number rules could chew them into pieces. Placeholders contain no digits,
# so later rules never rewrite them.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"[a-z][a-z0-9+.\-]{0,31}://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}.,;:!?]"),
        "<url>",
    ),
    (
        re.compile(
            r"[a-z0-9._%+\-]{1,64}@[a-z0-9\-]{1,63}(?:\.[a-z0-9\-]{1,63}){0,8}\.[a-z]{2,24}"
        ),
        "<email>",
    ),
    (re.compile(r"(?<!\w)'[^']*'(?!\w)"), "<str>"),
    (re.compile(r'"[^"]*"'), "<str>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"\b0x[0-9a-f]+\b"), "<hex>"),
    # 8+ hex chars with at least one digit and one letter: ids, not words, not plain numbers.
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b"), "<hex>"),
    # Numbers keep a following unit: "5000ms" -> "<n>ms".
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def error_signature(reason: str, error_message: str) -> str:
    """Normalise an error so messages differing only in variable parts share one signature."""
    text = error_message[:SIGNATURE_INPUT_CHARS].lower()
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return f"{reason}:{text.strip()[:SIGNATURE_MAX_CHARS]}"
