"""Failure reasons and error signatures.

This module is the one source of truth for the reason vocabulary. Reasons drive the retry
decision and the circuit breaker; signatures group dead letters into patterns so a new kind of
failure can raise an alert while a thousand copies of a known one do not.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType


class FailureReason(enum.StrEnum):
    """The built-in reasons: reported by the agent, or (AGENT_CRASH) inferred by the sidecar."""

    TIMEOUT = "TIMEOUT"
    NETWORK_ERROR = "NETWORK_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    AGENT_CRASH = "AGENT_CRASH"
    UNRECOVERABLE = "UNRECOVERABLE"
    CONSTRAINT_VIOLATION = "CONSTRAINT_VIOLATION"
    PROCESSING_ERROR = "PROCESSING_ERROR"  # generic transient failure


class ReasonKind(enum.StrEnum):
    TRANSIENT = "transient"  # may succeed on a later attempt
    PERMANENT = "permanent"  # the same input fails the same way: dead-letter at once


@dataclass(frozen=True, slots=True)
class ReasonSpec:
    """What a reason means: whether retrying can help, whether it says something about
    downstream health (counted by the circuit breaker), and whether an agent may send it."""

    name: str
    kind: ReasonKind
    breaker: bool
    agent_may_send: bool = True

    @property
    def permanent(self) -> bool:
        return self.kind is ReasonKind.PERMANENT


_T, _P = ReasonKind.TRANSIENT, ReasonKind.PERMANENT

# The breaker guards downstream outages, not bad input: only reasons that point at something
# outside the message (the network, a slow or throttling dependency, a dying agent) count.
# PROCESSING_ERROR is the agent's catch-all, as likely a bad message as a broken dependency,
# so it does not count unless an operator says so.
BUILTIN_REASONS: Mapping[str, ReasonSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ReasonSpec(FailureReason.TIMEOUT, _T, breaker=True),
            ReasonSpec(FailureReason.NETWORK_ERROR, _T, breaker=True),
            ReasonSpec(FailureReason.RATE_LIMITED, _T, breaker=True),
            ReasonSpec(FailureReason.AGENT_CRASH, _T, breaker=True, agent_may_send=False),
            ReasonSpec(FailureReason.PROCESSING_ERROR, _T, breaker=False),
            ReasonSpec(FailureReason.VALIDATION_FAILED, _P, breaker=False),
            ReasonSpec(FailureReason.UNRECOVERABLE, _P, breaker=False),
            ReasonSpec(FailureReason.CONSTRAINT_VIOLATION, _P, breaker=False),
        )
    }
)

# Retrying these cannot help: the same input fails the same way.
PERMANENT_REASONS: frozenset[str] = frozenset(n for n, s in BUILTIN_REASONS.items() if s.permanent)
# The default set the circuit breaker counts.
SYSTEMIC_REASONS: frozenset[str] = frozenset(n for n, s in BUILTIN_REASONS.items() if s.breaker)

# Custom reason names: they become metric labels and travel in headers, so keep them tame.
REASON_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
MAX_CUSTOM_REASONS = 64


class ReasonBook:
    """The reasons a sidecar accepts: the built-in ones plus those its operator declared."""

    def __init__(self, custom: Iterable[ReasonSpec] = (), *, overrides: Iterable[ReasonSpec] = ()):
        specs = dict(BUILTIN_REASONS)
        for spec in overrides:
            # An operator may say whether a built-in reason trips the breaker; its kind is
            # part of the protocol and stays.
            base = specs.get(spec.name)
            if base is None:
                raise ValueError(f"{spec.name} is not a built-in reason")
            specs[spec.name] = ReasonSpec(base.name, base.kind, spec.breaker, base.agent_may_send)
        custom = list(custom)
        if len(custom) > MAX_CUSTOM_REASONS:
            raise ValueError(f"at most {MAX_CUSTOM_REASONS} custom reasons, got {len(custom)}")
        for spec in custom:
            if spec.name in specs:
                raise ValueError(f"{spec.name} is already a reason")
            if not REASON_NAME.fullmatch(spec.name):
                raise ValueError(
                    f"reason name {spec.name!r}: expected upper-case letters, digits and _"
                    " (at most 64, starting with a letter)"
                )
            specs[spec.name] = spec
        self._specs: Mapping[str, ReasonSpec] = MappingProxyType(specs)

    def get(self, name: str) -> ReasonSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return list(self._specs)

    def agent_reasons(self) -> list[str]:
        """What an agent may send in ``fail``, in a stable order (built-in ones first)."""
        return [n for n, s in self._specs.items() if s.agent_may_send]

    def accepts(self, name: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and spec.agent_may_send

    def permanent(self, name: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and spec.permanent

    def counts_for_breaker(self, name: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and spec.breaker


DEFAULT_REASONS = ReasonBook()


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
