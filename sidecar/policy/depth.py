"""Queue depth levels: when a downstream queue is deep enough to push back on producers."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.levels import Level

DepthLevel = Level


@dataclass(frozen=True)
class DepthThresholds:
    """The seed's BACKPRESSURE_THRESHOLDS (messages ready in the queue)."""

    warning: int = 50
    critical: int = 200
    emergency: int = 500

    def __post_init__(self) -> None:
        if not 0 <= self.warning < self.critical < self.emergency:
            raise ValueError(
                f"need 0 <= warning < critical < emergency, got "
                f"{self.warning}, {self.critical}, {self.emergency}"
            )


def depth_level(depth: int, t: DepthThresholds) -> DepthLevel:
    """Strict ``>`` as in the seed: exactly 50 messages is still NORMAL."""
    if depth > t.emergency:
        return DepthLevel.EMERGENCY
    if depth > t.critical:
        return DepthLevel.CRITICAL
    if depth > t.warning:
        return DepthLevel.WARNING
    return DepthLevel.NORMAL


_ACTIONS: dict[DepthLevel, tuple[str, ...]] = {
    DepthLevel.NORMAL: (),
    DepthLevel.WARNING: ("alert",),
    DepthLevel.CRITICAL: ("alert", "throttle_producers"),
    DepthLevel.EMERGENCY: ("alert", "throttle_producers", "hold_producers", "shrink_prefetch"),
}


def depth_actions(level: DepthLevel) -> tuple[str, ...]:
    """What the seed's warning / critical / emergency backpressure amounts to, cumulatively."""
    return _ACTIONS[level]
