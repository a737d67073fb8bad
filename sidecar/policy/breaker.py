"""Circuit breaker: stop pulling work while something downstream of the agent is down.

Trips on consecutive failures (the seed's rule) or on a failure ratio over a sliding window,
so a dependency that fails every other call is caught too. Only failures that say something
about downstream health should be recorded here (the caller filters by reason: see
``ReasonBook.counts_for_breaker``); a burst of malformed input is not an outage.

HALF_OPEN hands out ``half_open_probes`` deliveries and decides on their answers alone:
``half_open_successes`` successes close it, one failure reopens it. Re-trips from HALF_OPEN
back off exponentially so a still-broken dependency is probed less and less often. Answers
are tagged with the probe round they belong to, so a late answer from before (or from an
earlier round) cannot close or reopen the breaker.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass

WINDOW_SLICES = 60
NOT_A_PROBE = -1  # ``probe_of`` for a delivery handed out while CLOSED


class BreakerState(enum.StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass(frozen=True)
class BreakerConfig:
    """Trip thresholds and open-time backoff; defaults follow the seed (5 failures, 60 s)."""

    failure_threshold: int = 5
    open_timeout: float = 60.0
    max_open_timeout: float = 600.0
    backoff_multiplier: float = 2.0
    window: float = 60.0
    min_calls_in_window: int = 10
    failure_ratio: float = 0.5
    half_open_probes: int = 1
    half_open_successes: int = 1

    def __post_init__(self) -> None:
        checks = (
            (self.failure_threshold >= 1, "failure_threshold must be >= 1"),
            (self.open_timeout > 0, "open_timeout must be > 0"),
            (
                self.max_open_timeout >= self.open_timeout,
                "max_open_timeout must be >= open_timeout",
            ),
            (self.backoff_multiplier >= 1, "backoff_multiplier must be >= 1"),
            (self.window > 0, "window must be > 0"),
            (self.min_calls_in_window >= 1, "min_calls_in_window must be >= 1"),
            (0 < self.failure_ratio <= 1, "failure_ratio must be in (0, 1]"),
            (self.half_open_probes >= 1, "half_open_probes must be >= 1"),
            (
                1 <= self.half_open_successes <= self.half_open_probes,
                "half_open_successes must be in [1, half_open_probes] or the breaker never closes",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")


class CircuitBreaker:
    """CLOSED -> OPEN -> HALF_OPEN -> CLOSED (or back to OPEN, for longer)."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.trips = 0
        self.current_open_timeout = config.open_timeout
        self._state = BreakerState.CLOSED
        self._open_until: float | None = None
        self._consecutive = 0
        # Calls counted in time slices (window / WINDOW_SLICES wide), not one entry per call:
        # at thousands of messages a second the memory stays a few dozen slices.
        self._slices: deque[list[float]] = deque()  # [slice start, calls, failures]
        self._calls_in_window = 0
        self._failures_in_window = 0
        self._probes_out = 0
        self._probe_successes = 0
        self.probe_round = 0  # bumped on every entry into HALF_OPEN

    @property
    def closed(self) -> bool:
        """True when closed; needs no clock because only time moves OPEN to HALF_OPEN."""
        return self._state is BreakerState.CLOSED

    def state(self, now: float) -> BreakerState:
        """The state at ``now``; an elapsed open period turns into HALF_OPEN here."""
        opened_until = self._open_until
        if self._state is BreakerState.OPEN and opened_until is not None and now >= opened_until:
            self._state = BreakerState.HALF_OPEN
            self._open_until = None
            self._probes_out = 0
            self._probe_successes = 0
            self.probe_round += 1
        return self._state

    def allow(self, now: float) -> bool:
        """May one more delivery go out? In HALF_OPEN, each True is a probe of the current
        ``probe_round``; tag its answer with that round."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probes_out < self.config.half_open_probes:
            self._probes_out += 1
            return True
        return False

    def _is_current_probe(self, probe_of: int | None) -> bool:
        # None: the caller does not track rounds, so any answer in HALF_OPEN is a probe's.
        return probe_of is None or probe_of == self.probe_round

    def record_success(self, now: float, *, probe_of: int | None = None) -> None:
        state = self.state(now)
        if state is BreakerState.CLOSED:
            self._consecutive = 0
            self._remember(now, ok=True)
        elif state is BreakerState.HALF_OPEN and self._is_current_probe(probe_of):
            self._probes_out = max(0, self._probes_out - 1)
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_successes:
                self._close()
        # OPEN, or an answer from outside the current probe round: it says nothing about
        # recovery now; ignore it.

    def record_successes(self, now: float, count: int) -> None:
        """``count`` successes of deliveries that were not probes (``NOT_A_PROBE``), at
        once: the same as that many ``record_success`` calls, for one batch of acks."""
        if count > 0 and self.state(now) is BreakerState.CLOSED:
            self._consecutive = 0
            self._remember(now, ok=True, count=count)

    def record_failure(self, now: float, *, probe_of: int | None = None) -> None:
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            if not self._is_current_probe(probe_of):
                return
            self.current_open_timeout = min(
                self.current_open_timeout * self.config.backoff_multiplier,
                self.config.max_open_timeout,
            )
            self._trip(now)
        elif state is BreakerState.CLOSED:
            self._consecutive += 1
            self._remember(now, ok=False)
            if self._consecutive >= self.config.failure_threshold or self._ratio_exceeded():
                self._trip(now)

    def release_probe(self, now: float, *, probe_of: int | None = None) -> None:
        """A probe came back without a verdict (a failure that does not count, a clean close,
        a drain): free its slot so another delivery can probe."""
        if self.state(now) is BreakerState.HALF_OPEN and self._is_current_probe(probe_of):
            self._probes_out = max(0, self._probes_out - 1)

    def open_until(self) -> float | None:
        """When the current open period ends, or None when not open."""
        return self._open_until if self._state is BreakerState.OPEN else None

    def retry_in(self, now: float) -> float:
        """Seconds until HALF_OPEN; 0 when not open."""
        if self.state(now) is BreakerState.OPEN and self._open_until is not None:
            return self._open_until - now
        return 0.0

    def _remember(self, now: float, *, ok: bool, count: int = 1) -> None:
        width = self.config.window / WINDOW_SLICES
        if not self._slices or now >= self._slices[-1][0] + width:
            self._slices.append([now, 0, 0])
        current = self._slices[-1]
        failed = 0 if ok else count
        current[1] += count
        current[2] += failed
        self._calls_in_window += count
        self._failures_in_window += failed
        horizon = now - self.config.window
        while self._slices and self._slices[0][0] <= horizon:
            _, calls, failures = self._slices.popleft()
            self._calls_in_window -= int(calls)
            self._failures_in_window -= int(failures)

    def _ratio_exceeded(self) -> bool:
        calls = self._calls_in_window
        if calls < self.config.min_calls_in_window:
            return False
        return self._failures_in_window / calls >= self.config.failure_ratio

    def _reset_counts(self) -> None:
        self._consecutive = 0
        self._slices.clear()
        self._calls_in_window = 0
        self._failures_in_window = 0
        self._probes_out = 0
        self._probe_successes = 0

    def _trip(self, now: float) -> None:
        self.trips += 1
        self._state = BreakerState.OPEN
        self._open_until = now + self.current_open_timeout
        self._reset_counts()

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._open_until = None
        self.current_open_timeout = self.config.open_timeout
        self._reset_counts()


class KeyedBreakers:
    """One breaker per key (e.g. target host), created lazily, at most ``max_keys`` kept."""

    def __init__(self, config: BreakerConfig, max_keys: int = 1000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.config = config
        self.max_keys = max_keys
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()

    def __len__(self) -> int:
        return len(self._breakers)

    def __contains__(self, key: object) -> bool:
        return key in self._breakers

    def get(self, key: str) -> CircuitBreaker:
        """The breaker for ``key``, marking it most recently used."""
        breaker = self._breakers.get(key)
        if breaker is not None:
            self._breakers.move_to_end(key)
            return breaker
        breaker = self._breakers[key] = CircuitBreaker(self.config)
        if len(self._breakers) > self.max_keys:
            self._evict(keep=key)
        return breaker

    def open_keys(self, now: float) -> list[str]:
        """Keys whose breaker is OPEN at ``now`` (HALF_OPEN ones are already probing)."""
        return [k for k, b in self._breakers.items() if b.state(now) is BreakerState.OPEN]

    def _evict(self, keep: str) -> None:
        # Forgetting a closed breaker loses little; forgetting an open one loses protection,
        # so an open one goes only when nothing closed is left (the bound still holds).
        others = [(k, b) for k, b in self._breakers.items() if k != keep]
        victim = next((k for k, b in others if b.closed), others[0][0])
        del self._breakers[victim]
