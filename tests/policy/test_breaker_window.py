"""The breaker's sliding window, probe accounting and defaults, pinned at their boundaries.

Each test is built so that an off-by-one in the counting (a failure that never leaves the
window, a probe slot never given back, a count not reset) changes the breaker's state.
"""

import re

import pytest

from sidecar.policy.breaker import (
    WINDOW_SLICES,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    KeyedBreakers,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# Ratio-only breakers: the consecutive rule never fires, so the window decides alone.
RATIO_ONLY = {"failure_threshold": 1000, "min_calls_in_window": 10, "failure_ratio": 0.5}


def record(breaker: CircuitBreaker, now: float, failures: int, successes: int) -> None:
    """Failures and successes interleaved (failures first), so none run consecutively long."""
    for i in range(max(failures, successes)):
        if i < failures:
            breaker.record_failure(now)
        if i < successes:
            breaker.record_success(now)


def test_every_default_is_pinned():
    config = BreakerConfig()
    assert config.failure_threshold == 5
    assert config.open_timeout == 60.0
    assert config.max_open_timeout == 600.0
    assert config.backoff_multiplier == 2.0
    assert config.window == 60.0
    assert config.min_calls_in_window == 10
    assert config.failure_ratio == 0.5
    assert config.half_open_probes == 1
    assert config.half_open_successes == 1
    assert WINDOW_SLICES == 60
    assert KeyedBreakers(config).max_keys == 1000


def test_the_default_open_time_backs_off_to_ten_minutes():
    breaker = CircuitBreaker(BreakerConfig())
    for _ in range(5):
        breaker.record_failure(0.0)
    now = 0.0
    seen = []
    for _ in range(6):
        now = breaker.open_until() or now
        breaker.record_failure(now)  # the probe's failure re-trips
        seen.append(breaker.current_open_timeout)
    assert seen == [120.0, 240.0, 480.0, 600.0, 600.0, 600.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 1},
        {"open_timeout": 0.001, "max_open_timeout": 0.001},
        {"backoff_multiplier": 1.0},
        {"window": 0.001},
        {"min_calls_in_window": 1},
        {"failure_ratio": 1.0},
        {"failure_ratio": 0.001},
        {"half_open_probes": 1, "half_open_successes": 1},
        {"half_open_probes": 4, "half_open_successes": 4},
    ],
)
def test_the_edges_of_the_valid_range_are_accepted(kwargs):
    config = BreakerConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be >= 1"),
        ({"open_timeout": 0}, "open_timeout must be > 0"),
        ({"open_timeout": 100, "max_open_timeout": 50}, "max_open_timeout must be >= open_timeout"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier must be >= 1"),
        ({"window": -1}, "window must be > 0"),
        ({"min_calls_in_window": 0}, "min_calls_in_window must be >= 1"),
        ({"failure_ratio": 0}, r"failure_ratio must be in \(0, 1\]"),
        ({"failure_ratio": 1.01}, r"failure_ratio must be in \(0, 1\]"),
        ({"half_open_probes": 0}, "half_open_probes must be >= 1"),
        (
            {"half_open_successes": 0},
            r"half_open_successes must be in \[1, half_open_probes\] or the breaker never closes",
        ),
        (
            {"half_open_probes": 1, "half_open_successes": 2},
            r"half_open_successes must be in \[1, half_open_probes\] or the breaker never closes",
        ),
    ],
)
def test_an_invalid_config_names_the_rule_and_the_values(kwargs, message):
    with pytest.raises(ValueError) as info:
        BreakerConfig(**kwargs)
    assert re.fullmatch(message + r" \(got BreakerConfig\(.*\)\)", str(info.value))


def test_keyed_breakers_accept_a_single_key():
    keyed = KeyedBreakers(BreakerConfig(), max_keys=1)
    keyed.get("a")
    keyed.get("b")
    assert len(keyed) == 1 and "b" in keyed
    with pytest.raises(ValueError, match="max_keys must be >= 1, got 0"):
        KeyedBreakers(BreakerConfig(), max_keys=0)


# --- the failure ratio at its boundary ----------------------------------------------------


def test_the_ratio_trips_at_exactly_min_calls_and_exactly_the_ratio():
    breaker = CircuitBreaker(BreakerConfig(**RATIO_ONLY))
    record(breaker, 0.0, failures=4, successes=5)  # 9 calls: too few to judge
    assert breaker.state(0.0) is CLOSED
    breaker.record_failure(0.0)  # 10 calls, 5 failures: exactly 0.5
    assert breaker.state(0.0) is OPEN


def test_just_below_the_ratio_stays_closed():
    breaker = CircuitBreaker(BreakerConfig(**RATIO_ONLY))
    record(breaker, 0.0, failures=3, successes=6)
    breaker.record_failure(0.0)  # judged at 10 calls with 4 failures: 0.4
    assert breaker.state(0.0) is CLOSED
    assert breaker.trips == 0


# --- failures and calls ageing out of the window ---------------------------------------------


def test_failures_age_out_of_the_window():
    breaker = CircuitBreaker(BreakerConfig(window=10.0, **RATIO_ONLY))
    record(breaker, 0.0, failures=9, successes=0)  # 9 calls: not enough to judge
    assert breaker.state(0.0) is CLOSED
    # Ten seconds on, those nine are gone. 4 failures in 10 calls stays closed; had the old
    # failures stayed counted (or been counted twice when leaving) it would trip.
    record(breaker, 10.0, failures=4, successes=6)
    assert breaker.state(10.0) is CLOSED
    # The window now holds exactly the new calls: one more failure makes 5 of 11 (< 0.5),
    # a second 6 of 12 (= 0.5) trips.
    breaker.record_failure(10.0)
    assert breaker.state(10.0) is CLOSED
    breaker.record_failure(10.0)
    assert breaker.state(10.0) is OPEN


def test_successes_age_out_of_the_window_too():
    breaker = CircuitBreaker(BreakerConfig(window=10.0, **RATIO_ONLY))
    record(breaker, 0.0, failures=0, successes=20)
    record(breaker, 10.0, failures=4, successes=5)  # 9 calls left: too few to judge
    assert breaker.state(10.0) is CLOSED
    breaker.record_failure(10.0)  # 10 calls, 5 failures: the old successes no longer dilute
    assert breaker.state(10.0) is OPEN


def test_a_call_leaves_exactly_one_window_after_its_slice_began():
    breaker = CircuitBreaker(BreakerConfig(window=10.0, **RATIO_ONLY))
    record(breaker, 0.0, failures=5, successes=4)  # 9 calls, too few
    # Just inside the window the old calls still count: 11 calls, 6 failures.
    breaker.record_success(9.999)
    breaker.record_failure(9.999)
    assert breaker.state(9.999) is OPEN


def test_at_the_window_edge_the_old_calls_are_gone():
    breaker = CircuitBreaker(BreakerConfig(window=10.0, **RATIO_ONLY))
    record(breaker, 0.0, failures=5, successes=4)
    breaker.record_success(10.0)
    breaker.record_failure(10.0)  # only these two are in the window now
    assert breaker.state(10.0) is CLOSED


# --- slice width -----------------------------------------------------------------------------


def test_calls_are_grouped_in_slices_of_one_sixtieth_of_the_window():
    # A 60 s window has 1 s slices: calls at 0.0 and 0.5 share a slice and leave together at
    # 60.0; a call at 1.0 starts the next slice and stays until 61.0.
    breaker = CircuitBreaker(BreakerConfig(window=60.0, **RATIO_ONLY))
    breaker.record_failure(0.0)
    record(breaker, 0.5, failures=4, successes=0)
    record(breaker, 1.0, failures=0, successes=4)
    assert len(breaker._slices) == 2
    # At 60.0 the first slice (5 failures) is gone: 4 successes + these 6 calls with
    # 5 failures is 10 calls at exactly 0.5.
    record(breaker, 60.0, failures=5, successes=0)
    assert breaker.state(60.0) is CLOSED  # 9 calls so far
    breaker.record_success(60.0)
    assert breaker.state(60.0) is CLOSED  # 10 calls, 5 failures would trip on record_failure
    breaker.record_failure(60.0)  # 11 calls, 6 failures
    assert breaker.state(60.0) is OPEN


def test_a_new_slice_starts_exactly_one_width_after_the_last():
    breaker = CircuitBreaker(BreakerConfig(window=60.0, **RATIO_ONLY))
    breaker.record_success(0.0)
    breaker.record_success(0.999)
    assert len(breaker._slices) == 1
    breaker.record_success(1.0)
    assert len(breaker._slices) == 2
    breaker.record_success(2.5)
    assert len(breaker._slices) == 3


def test_a_slice_started_late_keeps_its_early_calls_until_it_expires():
    # The slice that opened at 0.5 also holds the call at 1.2 (within 1 s of its start); both
    # leave at 60.5, not at 61.2: ageing is per slice, a bounded inexactness of 1/60.
    breaker = CircuitBreaker(BreakerConfig(window=60.0, **RATIO_ONLY))
    breaker.record_failure(0.5)
    breaker.record_failure(1.2)
    assert len(breaker._slices) == 1
    record(breaker, 60.5, failures=4, successes=4)  # 8 calls left in the window
    breaker.record_failure(60.5)  # 9 calls: too few; with the old two it would be 11
    assert breaker.state(60.5) is CLOSED


# --- half-open probes --------------------------------------------------------------------


def open_then_half_open(config: BreakerConfig) -> tuple[CircuitBreaker, float]:
    breaker = CircuitBreaker(config)
    for _ in range(config.failure_threshold):
        breaker.record_failure(0.0)
    now = config.open_timeout
    assert breaker.state(now) is HALF_OPEN
    return breaker, now


def test_probes_sent_one_at_a_time_each_free_their_slot():
    breaker, now = open_then_half_open(BreakerConfig(half_open_probes=2, half_open_successes=2))
    assert breaker.allow(now)
    breaker.record_success(now)  # the one probe out came back: both slots are free again
    assert breaker.state(now) is HALF_OPEN
    assert [breaker.allow(now) for _ in range(3)] == [True, True, False]
    breaker.record_success(now)
    assert breaker.state(now) is CLOSED


def test_a_returning_probe_frees_exactly_one_slot():
    breaker, now = open_then_half_open(BreakerConfig(half_open_probes=3, half_open_successes=3))
    assert [breaker.allow(now) for _ in range(4)] == [True, True, True, False]
    breaker.record_success(now)
    assert [breaker.allow(now) for _ in range(2)] == [True, False]
    breaker.record_success(now)
    assert breaker.state(now) is HALF_OPEN  # two successes of the three needed
    breaker.record_success(now)
    assert breaker.state(now) is CLOSED


def test_half_open_counts_each_success_once():
    breaker, now = open_then_half_open(BreakerConfig(half_open_probes=3, half_open_successes=3))
    for expected in (HALF_OPEN, HALF_OPEN, CLOSED):
        assert breaker.allow(now)
        breaker.record_success(now)
        assert breaker.state(now) is expected


def test_a_new_half_open_period_starts_with_fresh_probe_counts():
    config = BreakerConfig(half_open_probes=2, half_open_successes=2)
    breaker, now = open_then_half_open(config)
    assert breaker.allow(now) and breaker.allow(now)
    breaker.record_success(now)  # one success counted, then a failure re-trips
    breaker.record_failure(now)
    now = breaker.open_until() or 0.0
    assert breaker.state(now) is HALF_OPEN
    assert [breaker.allow(now) for _ in range(3)] == [True, True, False]
    breaker.record_success(now)
    assert breaker.state(now) is HALF_OPEN  # the success from the last period does not count
    breaker.record_success(now)
    assert breaker.state(now) is CLOSED


# --- reset after recovery ------------------------------------------------------------------


def recovered(config: BreakerConfig) -> tuple[CircuitBreaker, float]:
    breaker, now = open_then_half_open(config)
    for _ in range(config.half_open_successes):
        assert breaker.allow(now)
        breaker.record_success(now)
    assert breaker.state(now) is CLOSED
    return breaker, now


def test_after_recovery_it_takes_the_full_threshold_to_trip_again():
    breaker, now = recovered(BreakerConfig())
    for _ in range(4):
        breaker.record_failure(now)
    assert breaker.state(now) is CLOSED
    breaker.record_failure(now)
    assert breaker.state(now) is OPEN
    assert breaker.trips == 2


def test_after_recovery_the_window_counts_from_zero():
    config = BreakerConfig(**RATIO_ONLY)
    breaker = CircuitBreaker(config)
    record(breaker, 0.0, failures=4, successes=5)  # 9 calls in the window before the trip
    for _ in range(5):
        breaker.record_failure(0.0)  # trips on the ratio (and would on 1000 in a row)
    assert breaker.state(0.0) is OPEN
    now = breaker.open_until() or 0.0
    for _ in range(config.half_open_successes):
        breaker.record_success(now)
    assert breaker.state(now) is CLOSED
    # 9 calls with 5 failures: too few calls; a stale call count would make it 10 and trip.
    record(breaker, now, failures=5, successes=4)
    assert breaker.state(now) is CLOSED
    breaker.record_success(now)  # 10 calls, 5 failures, but judged only on a failure
    breaker.record_failure(now)  # 11 calls, 6 failures
    assert breaker.state(now) is OPEN


def test_after_recovery_failures_count_from_zero():
    config = BreakerConfig(**RATIO_ONLY)
    breaker = CircuitBreaker(config)
    record(breaker, 0.0, failures=10, successes=0)
    assert breaker.state(0.0) is OPEN
    now = breaker.open_until() or 0.0
    for _ in range(config.half_open_successes):
        breaker.record_success(now)
    # Judged at 10 calls with 4 failures; a stale failure count of one would make it 0.5.
    record(breaker, now, failures=3, successes=6)
    breaker.record_failure(now)
    assert breaker.state(now) is CLOSED


def test_successes_recorded_together_count_as_many_as_one_by_one():
    one_by_one = CircuitBreaker(BreakerConfig(**RATIO_ONLY))
    together = CircuitBreaker(BreakerConfig(**RATIO_ONLY))
    for breaker in (one_by_one, together):
        for _ in range(4):
            breaker.record_failure(0.0)
    for _ in range(5):
        one_by_one.record_success(1.0)
    together.record_successes(1.0, 5)
    together.record_successes(1.0, 0)  # nothing to tell: no change
    # 4 failures in 9 calls stay closed; one more failure (5 of 10) trips both alike.
    assert one_by_one.state(1.0) is CLOSED and together.state(1.0) is CLOSED
    one_by_one.record_failure(2.0)
    together.record_failure(2.0)
    assert one_by_one.state(2.0) is OPEN and together.state(2.0) is OPEN


def test_successes_recorded_together_say_nothing_while_not_closed():
    breaker, now = open_then_half_open(BreakerConfig(half_open_probes=1, half_open_successes=1))
    breaker.record_successes(now, 10)  # not probes: a half-open breaker ignores them
    assert breaker.state(now) is HALF_OPEN
    tripped = CircuitBreaker(BreakerConfig(failure_threshold=1))
    tripped.record_failure(0.0)
    tripped.record_successes(0.1, 10)
    assert tripped.state(0.1) is OPEN
