"""Memory pressure levels (with hysteresis) and what each level changes.

Hysteresis keeps a ratio hovering around a threshold from flapping the level, and with it the
batch size, prefetch and alerts, on every sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.policy.levels import Level

PressureLevel = Level


@dataclass(frozen=True)
class PressureThresholds:
    """Used/limit ratios from the seed; a level is left below threshold - hysteresis."""

    warning: float = 0.7
    critical: float = 0.8
    emergency: float = 0.9
    hysteresis: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.warning < self.critical < self.emergency:
            raise ValueError(
                f"need 0 < warning < critical < emergency, got "
                f"{self.warning}, {self.critical}, {self.emergency}"
            )
        if not 0 <= self.hysteresis < self.warning:
            raise ValueError(f"hysteresis must be in [0, warning), got {self.hysteresis}")

    def threshold(self, level: PressureLevel) -> float:
        """The ratio above which ``level`` is entered (0 for NORMAL)."""
        return (0.0, self.warning, self.critical, self.emergency)[level]


def level_for(ratio: float, previous: PressureLevel, t: PressureThresholds) -> PressureLevel:
    """Rise on ratio > threshold; fall only once ratio < threshold - hysteresis."""
    raw = PressureLevel.NORMAL
    for level in (PressureLevel.EMERGENCY, PressureLevel.CRITICAL, PressureLevel.WARNING):
        if ratio > t.threshold(level):
            raw = level
            break
    if raw >= previous:
        return raw
    level = previous
    while level > raw and ratio < t.threshold(level) - t.hysteresis:
        level = PressureLevel(level - 1)
    return level


class PressureTracker:
    """Remembers the current level so each sample is judged with hysteresis."""

    def __init__(
        self,
        thresholds: PressureThresholds | None = None,
        level: PressureLevel = PressureLevel.NORMAL,
    ) -> None:
        self.thresholds = thresholds or PressureThresholds()
        self.level = level

    def update(self, ratio: float) -> PressureLevel | None:
        """Feed a sample; returns the new level if it changed, else None."""
        new = level_for(ratio, self.level, self.thresholds)
        if new == self.level:
            return None
        self.level = new
        return new


_FACTORS = {
    PressureLevel.NORMAL: 1.0,
    PressureLevel.WARNING: 0.75,
    PressureLevel.CRITICAL: 0.5,
    PressureLevel.EMERGENCY: 0.25,
}


def adjust_batch_size(level: PressureLevel, configured: int) -> int:
    """The seed's factors (1, 0.75, 0.5, 0.25), floored, never below 1."""
    if configured < 1:
        raise ValueError(f"configured batch size must be >= 1, got {configured}")
    return max(1, math.floor(configured * _FACTORS[level]))


def batch_allowed(level: PressureLevel) -> bool:
    """No new work is handed out in EMERGENCY; in-flight work still finishes."""
    return level < PressureLevel.EMERGENCY


def memory_ratio(used: int, limit: int) -> float:
    """used / limit; 0.0 when the limit is unknown (<= 0), so no pressure is invented."""
    if limit <= 0:
        return 0.0
    return max(0, used) / limit


_WARNING_ACTIONS = ("reduce_prefetch", "increase_processing_delay")
_CRITICAL_ACTIONS = (*_WARNING_ACTIONS, "disable_analytics_collection", "reduce_cache_ttl")
_EMERGENCY_ACTIONS = (
    *_CRITICAL_ACTIONS,
    "disable_non_essential_features",
    "log_level_error",
    "stop_fetching",
)


def degradation_actions(level: PressureLevel) -> tuple[str, ...]:
    """The seed's graceful degradation as named actions; each level includes the ones below."""
    return ((), _WARNING_ACTIONS, _CRITICAL_ACTIONS, _EMERGENCY_ACTIONS)[level]


def prefetch_for(level: PressureLevel, configured_prefetch: int, batch_size: int) -> int:
    """Prefetch scaled like batches, never below the adjusted batch (or 1: AMQP 0 = unlimited).

    ``batch_size`` is the configured batch size; its level adjustment is applied here.
    """
    if configured_prefetch < 1:
        raise ValueError(f"configured prefetch must be >= 1, got {configured_prefetch}")
    scaled = math.floor(configured_prefetch * _FACTORS[level])
    return max(1, scaled, adjust_batch_size(level, batch_size))
