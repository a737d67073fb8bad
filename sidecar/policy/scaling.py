"""Consumer scaling recommendations: the seed's ten messages per consumer, clamped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ScalingPolicy:
    messages_per_consumer: int = 10
    min_consumers: int = 1
    max_consumers: int = 50

    def __post_init__(self) -> None:
        if self.messages_per_consumer < 1:
            raise ValueError(f"messages_per_consumer must be >= 1, got {self}")
        if not 0 <= self.min_consumers <= self.max_consumers or self.max_consumers < 1:
            raise ValueError(f"need 0 <= min_consumers <= max_consumers, max >= 1; got {self}")


def recommended_consumers(depth: int, policy: ScalingPolicy) -> int:
    """ceil(depth / messages_per_consumer), clamped to [min_consumers, max_consumers]."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    wanted = -(-depth // policy.messages_per_consumer)  # integer ceil, exact for big depths
    return min(policy.max_consumers, max(policy.min_consumers, wanted))


def scaling_event(current: int, recommended: int) -> Literal["scale_up", "scale_down", "steady"]:
    """Which way to move, as the seed's evaluateScalingNeeds compares them."""
    if recommended > current:
        return "scale_up"
    if recommended < current:
        return "scale_down"
    return "steady"
