"""Event-loop lag: how late a periodic wake-up ran, kept over a recent window.

The driver sleeps a fixed interval and reports how much later than asked it woke; a loop
busy with a slow callback wakes late, so the lag says whether anything stalls deliveries.
This module only keeps the recent samples and summarises them; it reads no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LagSummary:
    samples: int
    p50: float
    p99: float
    max: float


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile of an ascending list (q in 0..1); 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class LagWindow:
    """The last ``capacity`` lag samples (seconds). Memory is bounded by the capacity;
    a summary sorts the window, so it costs O(capacity log capacity) per read, not per
    sample."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a lag window holds at least one sample")
        self._samples: deque[float] = deque(maxlen=capacity)

    def add(self, lag: float) -> None:
        # A clock that stepped backwards would give a negative lag: the loop was not early.
        self._samples.append(lag if lag > 0.0 else 0.0)

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> LagSummary:
        ordered = sorted(self._samples)
        return LagSummary(
            samples=len(ordered),
            p50=percentile(ordered, 0.50),
            p99=percentile(ordered, 0.99),
            max=ordered[-1] if ordered else 0.0,
        )
