"""Producer throttling: a token bucket whose rate follows downstream depth.

A token bucket (not the seed's fixed one-second window) because it never allows a double burst
across a window boundary and tells the caller exactly how long to wait.
"""

from __future__ import annotations

import math

from sidecar.policy.depth import DepthLevel

# Absorbs float rounding so that waiting exactly the returned time is always enough.
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; rate 0 holds all publishing."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not burst > 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        _check_rate(rate)
        self._rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    @property
    def rate(self) -> float:
        """Tokens per second; change it with ``set_rate`` so elapsed time is credited first."""
        return self._rate

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (for metrics and tests)."""
        self._refill(now)
        return self._tokens

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate; time already elapsed is credited at the old rate."""
        _check_rate(rate)
        self._refill(now)
        self._rate = rate

    def try_acquire(self, now: float, n: float = 1.0) -> float:
        """0.0 if ``n`` tokens were taken, else seconds until they will be there (none taken)."""
        if not 0 < n <= self.burst:
            raise ValueError(f"n must be in (0, burst={self.burst}], got {n}")
        self._refill(now)
        if self._tokens + _EPSILON >= n:
            self._tokens = max(0.0, self._tokens - n)
            return 0.0
        if self._rate == 0:
            return math.inf
        return (n - self._tokens) / self._rate

    def _refill(self, now: float) -> None:
        if now > self._last:  # a clock that steps back never mints tokens
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self._rate)
            self._last = now


def _check_rate(rate: float) -> None:
    if not (rate >= 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be finite and >= 0, got {rate}")


def adaptive_rate(queue_depth: int, base_rate: float) -> float:
    """The seed's formula: above 100 deep, slow linearly, to 1/s at 900+ (never above base)."""
    if queue_depth > 100:
        return min(base_rate, max(1.0, base_rate * (1 - queue_depth / 1000)))
    return base_rate


def publish_rate(
    base_rate: float, target_depth: int, depth_level: DepthLevel, broker_blocked: bool
) -> float:
    """Rate for the agent's publishes: 0 (held) when the broker blocks us or at EMERGENCY."""
    if broker_blocked or depth_level >= DepthLevel.EMERGENCY:
        return 0.0
    return adaptive_rate(target_depth, base_rate)
