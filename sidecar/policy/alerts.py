"""Alert rules from the seed (DLQ growth, DLQ not empty, new pattern) plus operational ones.

Every alert (name + labels) has a cooldown so a condition that persists pages once, not on
every sample.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class AlertSeverity(enum.StrEnum):
    CRITICAL = "CRITICAL"
    WARNING = "WARNING"
    INFO = "INFO"


@dataclass(frozen=True)
class Alert:
    """One alert to send; ``at`` is the monotonic time it fired."""

    name: str
    severity: AlertSeverity
    message: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


@dataclass(frozen=True)
class AlertConfig:
    growth_per_minute: float = 100.0
    growth_window: float = 60.0
    cooldown: float = 300.0

    def __post_init__(self) -> None:
        if not (self.growth_per_minute > 0 and self.growth_window > 0 and self.cooldown >= 0):
            raise ValueError(
                f"need growth_per_minute > 0, growth_window > 0, cooldown >= 0: {self}"
            )


class DlqGrowth:
    """DLQ size samples over a sliding window; sample more often than the window to get a rate."""

    def __init__(self, window: float) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, now: float, size: int) -> None:
        self._samples.append((now, size))
        self._prune(now)

    def rate_per_minute(self, now: float) -> float:
        """Growth from the oldest sample in the window to the newest, per minute (0 if < 2).

        Spread over at least the whole window: a handful of dead letters seconds apart is
        not "100 a minute" until that many have really arrived within the window."""
        self._prune(now)
        if len(self._samples) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return 0.0 if t1 <= t0 else (s1 - s0) / max(t1 - t0, self.window) * 60.0

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()


_LEVEL_SEVERITY = {
    "WARNING": AlertSeverity.WARNING,
    "CRITICAL": AlertSeverity.CRITICAL,
    "EMERGENCY": AlertSeverity.CRITICAL,
    "HALF_OPEN": AlertSeverity.WARNING,
    "OPEN": AlertSeverity.CRITICAL,
}


def _name(level: str | enum.Enum) -> str:
    # IntEnum levels stringify to their number; use the member name instead.
    return level.name if isinstance(level, enum.Enum) else str(level)


class AlertRules:
    """Turns observations into alerts, each name + label set at most once per cooldown."""

    def __init__(self, config: AlertConfig, known_signatures: Iterable[str] = ()) -> None:
        self.config = config
        self.growth = DlqGrowth(config.growth_window)
        self._known = set(known_signatures)
        self._last_fired: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def observe_dlq(self, now: float, dlq_size: int) -> list[Alert]:
        self.growth.record(now, dlq_size)
        alerts: list[Alert] = []
        rate = self.growth.rate_per_minute(now)
        if rate > self.config.growth_per_minute:
            text = f"DLQ growing at {rate:.0f} messages/minute (size {dlq_size})"
            alerts += self._fire(now, "CRITICAL_DLQ_GROWTH", AlertSeverity.CRITICAL, text, {})
        if dlq_size > 0:
            text = f"DLQ holds {dlq_size} message(s)"
            alerts += self._fire(now, "DLQ_NOT_EMPTY", AlertSeverity.WARNING, text, {})
        return alerts

    def observe_dead_letter(self, now: float, signature: str) -> list[Alert]:
        """NEW_DLQ_PATTERN the first time a signature is seen; known ones stay quiet."""
        if signature in self._known:
            return []
        self._known.add(signature)
        labels = {"signature": signature, "reason": signature.partition(":")[0]}
        text = f"new dead-letter pattern: {signature}"
        return self._fire(now, "NEW_DLQ_PATTERN", AlertSeverity.INFO, text, labels)

    def observe_pressure(self, now: float, level_name: str | enum.Enum) -> list[Alert]:
        level = _name(level_name)
        if level == "NORMAL":
            return []
        text = f"memory pressure {level}"
        return self._fire(now, "MEMORY_PRESSURE", _severity(level), text, {"level": level})

    def observe_breaker(self, now: float, key: str, state_name: str | enum.Enum) -> list[Alert]:
        state = _name(state_name)
        if state == "CLOSED":
            return []
        labels = {"key": key, "state": state}
        text = f"circuit breaker {key} is {state}"
        return self._fire(now, "BREAKER_OPEN", _severity(state), text, labels)

    def observe_depth(self, now: float, queue: str, level_name: str | enum.Enum) -> list[Alert]:
        level = _name(level_name)
        if level == "NORMAL":
            return []
        labels = {"queue": queue, "level": level}
        text = f"queue {queue} depth {level}"
        return self._fire(now, "QUEUE_DEPTH", _severity(level), text, labels)

    def _fire(
        self, now: float, name: str, severity: AlertSeverity, message: str, labels: dict[str, str]
    ) -> list[Alert]:
        key = (name, frozenset(labels.items()))
        last = self._last_fired.get(key)
        if last is not None and now - last < self.config.cooldown:
            return []
        # Forget expired cooldowns so per-key labels (hosts, queues) cannot grow without bound.
        expired = [k for k, t in self._last_fired.items() if now - t >= self.config.cooldown]
        for k in expired:
            del self._last_fired[k]
        self._last_fired[key] = now
        return [Alert(name, severity, message, labels, now)]


def _severity(level: str) -> AlertSeverity:
    return _LEVEL_SEVERITY.get(level, AlertSeverity.WARNING)
