"""Retry or dead-letter: what to do with a failed attempt.

Retries go through fixed-TTL delay-tier queues (never an immediate requeue), so a decision names
both the jittered delay and the tier to route through.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from sidecar.policy.failure import (
    BUILTIN_REASONS,
    DEFAULT_REASONS,
    FailureReason,
    ReasonBook,
    ReasonKind,
    ReasonSpec,
)

Action = Literal["retry", "dead_letter"]
Backoff = Literal["exponential", "rate_limit", "reduced_scope", "none"]
_ACTIONS = ("retry", "dead_letter")
_BACKOFFS = ("exponential", "rate_limit", "reduced_scope", "none")


@dataclass(frozen=True)
class ReasonRule:
    """How one failure reason is handled; ``max_attempts=None`` uses the policy's limit."""

    action: Action
    backoff: Backoff
    max_attempts: int | None = None


def _default_rules() -> Mapping[str, ReasonRule]:
    exponential = ReasonRule("retry", "exponential")
    dead = ReasonRule("dead_letter", "none")
    return {
        FailureReason.NETWORK_ERROR: exponential,
        FailureReason.RATE_LIMITED: ReasonRule("retry", "rate_limit"),
        FailureReason.TIMEOUT: ReasonRule("retry", "reduced_scope"),
        FailureReason.AGENT_CRASH: exponential,
        FailureReason.PROCESSING_ERROR: exponential,
        FailureReason.VALIDATION_FAILED: dead,
        FailureReason.UNRECOVERABLE: dead,
        FailureReason.CONSTRAINT_VIOLATION: dead,
    }


# Used only when a custom rule set omits PROCESSING_ERROR.
_FALLBACK_RULE = ReasonRule("retry", "exponential")
_DEFAULT_RULE_FOR_KIND = {
    ReasonKind.TRANSIENT: ReasonRule("retry", "exponential"),
    ReasonKind.PERMANENT: ReasonRule("dead_letter", "none"),
}


@dataclass(frozen=True)
class ReasonDeclaration:
    """One ``[retry.reasons.NAME]`` table as written; None means "not said"."""

    action: Action | None = None
    backoff: Backoff | None = None
    max_attempts: int | None = None
    like: str | None = None
    kind: str | None = None
    breaker: bool | None = None


class ReasonConfigError(ValueError):
    """A reason rule that cannot apply; ``key`` is relative to ``[retry.reasons]``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.detail = message


def resolve_reasons(
    declared: Mapping[str, ReasonDeclaration],
) -> tuple[ReasonBook, dict[str, ReasonRule]]:
    """The reason book and retry rules from the operator's declarations.

    A table for a built-in reason adjusts its rule and whether it trips the breaker; a table
    for a new reason declares it, with ``kind`` or ``like`` (a built-in reason whose kind,
    breaker flag and rule it starts from). Anything that could never apply is refused with
    its key named, rather than accepted and silently ignored.
    """
    defaults = _default_rules()
    rules: dict[str, ReasonRule] = dict(defaults)
    custom: list[ReasonSpec] = []
    overrides: list[ReasonSpec] = []
    seen: dict[str, str] = {}
    for key, d in declared.items():
        name = key.upper()
        if name in seen:
            raise ReasonConfigError(key, f"declared twice (also as {seen[name]!r})")
        seen[name] = key
        kind: ReasonKind | None = None
        if d.kind is not None:
            try:
                kind = ReasonKind(d.kind)
            except ValueError:
                raise ReasonConfigError(
                    f"{key}.kind", f'expected "transient" or "permanent", got {d.kind!r}'
                ) from None
        builtin = BUILTIN_REASONS.get(name)
        if builtin is not None:
            if d.like is not None:
                raise ReasonConfigError(
                    f"{key}.like", f"{name} is a built-in reason; only new reasons take like"
                )
            if kind is not None and kind is not builtin.kind:
                raise ReasonConfigError(
                    f"{key}.kind", f"{name} is built in as {builtin.kind}; that cannot change"
                )
            kind = builtin.kind
            breaker = builtin.breaker if d.breaker is None else d.breaker
            base = defaults[name]
            overrides.append(ReasonSpec(name, kind, breaker))
        else:
            if d.like is None and kind is None:
                raise ReasonConfigError(
                    key,
                    f"{name} is not a built-in reason, so this rule could never apply; declare"
                    ' it with kind = "transient" | "permanent" or like = "<built-in reason>"',
                )
            like = BUILTIN_REASONS.get(d.like.upper()) if d.like is not None else None
            if d.like is not None and like is None:
                raise ReasonConfigError(
                    f"{key}.like",
                    f"{d.like!r} is not a built-in reason (one of {', '.join(BUILTIN_REASONS)})",
                )
            if like is not None and (kind is None or kind is like.kind):
                kind, base = like.kind, defaults[like.name]
                breaker = like.breaker if d.breaker is None else d.breaker
            else:
                assert kind is not None
                base = _DEFAULT_RULE_FOR_KIND[kind]
                breaker = bool(d.breaker)
            custom.append(ReasonSpec(name, kind, breaker))
        if kind is ReasonKind.PERMANENT and d.action == "retry":
            raise ReasonConfigError(
                f"{key}.action",
                f'{name} is permanent and always dead-lettered; action = "retry" cannot apply',
            )
        action: Action = d.action or base.action
        if kind is ReasonKind.PERMANENT:
            action = "dead_letter"
        rules[name] = ReasonRule(
            action=action,
            backoff=d.backoff or base.backoff,
            max_attempts=base.max_attempts if d.max_attempts is None else d.max_attempts,
        )
    try:
        book = ReasonBook(custom, overrides=overrides)
    except ValueError as exc:
        raise ReasonConfigError("", str(exc)) from None
    return book, rules


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt limit, backoff shape and delay tiers; defaults follow the seed design."""

    max_attempts: int = 3
    base_delay: float = 1.0
    max_delay: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2
    rate_limit_default_delay: float = 30.0
    tiers: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)
    rules: Mapping[str, ReasonRule] = field(default_factory=_default_rules, hash=False)
    reasons: ReasonBook = field(default=DEFAULT_REASONS, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("base_delay", "max_delay", "rate_limit_default_delay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_delay < self.base_delay:
            raise ValueError("max_delay must be >= base_delay")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        tiers = tuple(self.tiers)
        if not tiers:
            raise ValueError("tiers must not be empty")
        if tiers[0] <= 0 or any(a >= b for a, b in itertools.pairwise(tiers)):
            raise ValueError(f"tiers must be positive and strictly increasing, got {tiers}")
        if self.max_delay > tiers[-1]:
            # Otherwise a delay could outlast every tier's TTL and the broker would cut it short.
            raise ValueError(f"max_delay {self.max_delay} exceeds the largest tier {tiers[-1]}")
        for reason, rule in self.rules.items():
            if rule.action not in _ACTIONS or rule.backoff not in _BACKOFFS:
                raise ValueError(f"rule for {reason}: unknown action or backoff {rule}")
            if rule.max_attempts is not None and rule.max_attempts < 1:
                raise ValueError(f"rule for {reason}: max_attempts must be >= 1")
            if self.reasons.permanent(reason) and rule.action != "dead_letter":
                raise ValueError(f"{reason} is permanent; its rule must be dead_letter")
        object.__setattr__(self, "tiers", tiers)
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    def rule_for(self, reason: str) -> ReasonRule:
        """The rule for a reason; unknown reasons are treated as PROCESSING_ERROR."""
        rule = self.rules.get(reason) or self.rules.get(FailureReason.PROCESSING_ERROR)
        return rule or _FALLBACK_RULE


@dataclass(frozen=True)
class Retry:
    """Republish through ``tier`` with per-message expiration ``delay`` (always <= tier)."""

    delay: float
    tier: float
    reduced_scope: bool
    next_attempt: int


@dataclass(frozen=True)
class DeadLetter:
    """Write to the DLQ; ``why`` is the human-readable cause for the record."""

    reason: str
    why: str


def exponential_backoff(attempt: int, policy: RetryPolicy) -> float:
    """base_delay * multiplier**(attempt-1), capped at max_delay; no jitter."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    try:
        raw = policy.base_delay * policy.multiplier ** (attempt - 1)
    except OverflowError:
        return policy.max_delay
    return min(raw, policy.max_delay)


def apply_jitter(delay: float, fraction: float, u: float) -> float:
    """Shorten ``delay`` by up to ``fraction`` (u in [0, 1) picks how much).

    Jitter only ever shortens: the tier is chosen from the un-jittered delay, and the tier
    queue's TTL is the upper bound on the wait, so the jittered per-message expiration must
    never exceed it.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if not 0 <= u < 1:
        raise ValueError(f"u must be in [0, 1), got {u}")
    return delay * (1 - fraction * u)


def choose_tier(delay: float, tiers: Sequence[float]) -> float:
    """The smallest tier >= delay, else the largest tier (tiers sorted ascending)."""
    if not tiers:
        raise ValueError("tiers must not be empty")
    i = bisect.bisect_left(tiers, delay)
    return tiers[i] if i < len(tiers) else tiers[-1]


_MINUTE_UNITS = ("m", "min", "mins", "minute", "minutes")
_UNIT_SECONDS = {"ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001} | {
    unit: 60.0 for unit in _MINUTE_UNITS
}
_RETRY_AFTER = re.compile(
    r"(?:retry[-_ ]?after|try again in|retry in)\s*[:=]?\s*(\d+(?:\.\d+)?)\s*"
    r"(milliseconds?|ms|minutes?|mins?|m|seconds?|secs?|s)?\b",
    re.IGNORECASE,
)


def parse_retry_after(error_message: str) -> float | None:
    """Seconds to wait from a rate-limit message ("Retry-After: 30", "in 1500ms"), else None."""
    match = _RETRY_AFTER.search(error_message)
    if match is None:
        return None
    unit = (match.group(2) or "s").lower()
    return float(match.group(1)) * _UNIT_SECONDS.get(unit, 1.0)


def decide(
    reason: str,
    error_message: str,
    attempt: int,
    retry_after: float | None,
    policy: RetryPolicy,
    u: float,
) -> Retry | DeadLetter:
    """Retry or dead-letter after ``attempt`` attempts (counting the one that just failed)."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    rule = policy.rule_for(reason)
    if policy.reasons.permanent(reason):
        return DeadLetter(reason, f"permanent failure {reason}")
    if rule.action == "dead_letter":
        return DeadLetter(reason, f"no retry configured for {reason}")
    limit = policy.max_attempts if rule.max_attempts is None else rule.max_attempts
    if attempt >= limit:
        return DeadLetter(reason, f"attempt limit {limit} reached")
    if rule.backoff == "rate_limit":
        hinted = retry_after if retry_after is not None and math.isfinite(retry_after) else None
        if hinted is None or hinted < 0:
            hinted = parse_retry_after(error_message)
        wanted = policy.rate_limit_default_delay if hinted is None else hinted
        # Floor at base_delay: "retry after 0" must not become a hot loop.
        delay = min(max(wanted, policy.base_delay), policy.max_delay)
    elif rule.backoff == "none":
        delay = policy.base_delay  # constant, but still through a tier: never a hot loop
    else:
        delay = exponential_backoff(attempt, policy)
    return Retry(
        delay=apply_jitter(delay, policy.jitter, u),
        tier=choose_tier(delay, policy.tiers),
        reduced_scope=rule.backoff == "reduced_scope",
        next_attempt=attempt + 1,
    )
