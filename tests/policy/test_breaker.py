import pytest

from sidecar.policy.breaker import (
    NOT_A_PROBE,
    WINDOW_SLICES,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    KeyedBreakers,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def tripped(config: BreakerConfig | None = None, at: float = 0.0) -> CircuitBreaker:
    config = config or BreakerConfig()
    breaker = CircuitBreaker(config)
    for _ in range(config.failure_threshold):
        breaker.record_failure(at)
    assert breaker.state(at) is OPEN
    return breaker


def half_open(config: BreakerConfig | None = None) -> tuple[CircuitBreaker, float]:
    breaker = tripped(config)
    now = breaker.open_until()
    assert now is not None
    assert breaker.state(now) is HALF_OPEN
    return breaker, now


# --- config --------------------------------------------------------------------------------


def test_defaults_follow_the_seed():
    config = BreakerConfig()
    assert (config.failure_threshold, config.open_timeout) == (5, 60.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"open_timeout": 0},
        {"open_timeout": 100, "max_open_timeout": 50},
        {"backoff_multiplier": 0.9},
        {"window": 0},
        {"min_calls_in_window": 0},
        {"failure_ratio": 0},
        {"failure_ratio": 1.5},
        {"half_open_probes": 0},
        {"half_open_successes": 0},
        {"half_open_probes": 2, "half_open_successes": 3},
    ],
)
def test_invalid_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        BreakerConfig(**kwargs)


# --- closed --------------------------------------------------------------------------------


def test_starts_closed_and_allows():
    breaker = CircuitBreaker(BreakerConfig())
    assert breaker.state(0) is CLOSED
    assert breaker.allow(0)
    assert breaker.closed
    assert breaker.open_until() is None
    assert breaker.retry_in(0) == 0.0
    assert breaker.trips == 0


def test_trips_after_consecutive_failures():
    breaker = CircuitBreaker(BreakerConfig())
    for i in range(4):
        breaker.record_failure(float(i))
        assert breaker.state(float(i)) is CLOSED
    breaker.record_failure(4.0)
    assert breaker.state(4.0) is OPEN
    assert not breaker.allow(4.0)
    assert not breaker.closed
    assert breaker.trips == 1
    assert breaker.open_until() == 64.0
    assert breaker.retry_in(10.0) == 54.0


def test_a_success_resets_the_consecutive_count():
    breaker = CircuitBreaker(BreakerConfig(min_calls_in_window=1000))
    for t in range(4):
        breaker.record_failure(t)
    breaker.record_success(4)
    for t in range(5, 9):
        breaker.record_failure(t)
    assert breaker.state(9) is CLOSED


def test_failure_ratio_trips_without_consecutive_failures():
    breaker = CircuitBreaker(BreakerConfig())
    # Alternate: never more than one failure in a row, 50% failure rate.
    for i in range(9):
        (breaker.record_failure if i % 2 else breaker.record_success)(float(i))
    assert breaker.state(9) is CLOSED  # 9 calls, below min_calls_in_window
    breaker.record_failure(9.0)  # 10 calls, 5 failures
    assert breaker.state(9.0) is OPEN


def test_failure_ratio_below_threshold_stays_closed():
    breaker = CircuitBreaker(BreakerConfig())
    for i in range(30):
        (breaker.record_failure if i % 3 == 0 else breaker.record_success)(float(i) / 10)
    assert breaker.state(3.0) is CLOSED


def test_old_calls_leave_the_window():
    breaker = CircuitBreaker(BreakerConfig(window=10.0, failure_threshold=100))
    for t in range(4):
        breaker.record_failure(float(t))
    # Counting the old failures this would be 10 calls with 5 failures: a trip. Pruned, it is
    # 6 calls, below min_calls_in_window.
    for t in range(60, 65):
        breaker.record_success(float(t))
    breaker.record_failure(65.0)
    assert breaker.state(65.0) is CLOSED
    assert breaker.trips == 0


def test_failures_inside_the_window_do_count():
    breaker = CircuitBreaker(BreakerConfig(window=100.0, failure_threshold=100))
    for t in range(4):
        breaker.record_failure(float(t))
    for t in range(60, 65):
        breaker.record_success(float(t))
    breaker.record_failure(65.0)
    assert breaker.state(65.0) is OPEN


def test_window_memory_is_bounded_by_time_not_by_call_count():
    breaker = CircuitBreaker(BreakerConfig(window=1.0))
    for i in range(100_000):
        breaker.record_success(i * 0.0001)  # 10,000 calls a second for 10 s
    assert len(breaker._slices) <= WINDOW_SLICES + 1
    assert breaker._calls_in_window == pytest.approx(10_000, rel=0.02)


def test_all_failures_never_any_success_trips_by_ratio():
    config = BreakerConfig(failure_threshold=1000, min_calls_in_window=10)
    breaker = CircuitBreaker(config)
    for t in range(10):
        breaker.record_failure(float(t))
    assert breaker.state(10) is OPEN


# --- open and half-open --------------------------------------------------------------------


def test_open_becomes_half_open_when_the_timeout_elapses():
    breaker = tripped(at=100.0)
    assert breaker.state(159.999) is OPEN
    assert not breaker.allow(159.999)
    assert breaker.state(160.0) is HALF_OPEN
    assert breaker.open_until() is None
    assert breaker.retry_in(160.0) == 0.0


def test_results_arriving_while_open_are_ignored():
    breaker = tripped()
    breaker.record_success(1.0)
    breaker.record_failure(2.0)
    assert breaker.state(2.0) is OPEN
    assert breaker.trips == 1
    assert breaker.open_until() == 60.0


def test_half_open_hands_out_one_probe_by_default():
    breaker, now = half_open()
    assert [breaker.allow(now) for _ in range(3)] == [True, False, False]
    breaker.record_success(now + 1, probe_of=breaker.probe_round)
    assert breaker.state(now + 1) is CLOSED


def test_half_open_allows_a_limited_number_of_probes():
    breaker, now = half_open(BreakerConfig(half_open_probes=3, half_open_successes=2))
    assert [breaker.allow(now) for _ in range(5)] == [True, True, True, False, False]


def test_probe_results_free_probe_slots():
    breaker, now = half_open(BreakerConfig(half_open_probes=1, half_open_successes=1))
    assert breaker.allow(now)
    assert not breaker.allow(now)
    breaker.record_success(now + 1)
    assert breaker.state(now + 1) is CLOSED


def test_enough_successes_close_the_breaker():
    breaker, now = half_open(BreakerConfig(half_open_probes=3, half_open_successes=2))
    assert breaker.allow(now)
    assert breaker.allow(now)
    breaker.record_success(now + 1)
    assert breaker.state(now + 1) is HALF_OPEN
    breaker.record_success(now + 2)
    assert breaker.state(now + 2) is CLOSED
    assert breaker.allow(now + 2)


def test_a_failed_probe_reopens_for_longer_and_backs_off_to_the_cap():
    config = BreakerConfig(open_timeout=60, max_open_timeout=200, backoff_multiplier=2)
    breaker = tripped(config)
    now = 60.0
    expected = [120.0, 200.0, 200.0]
    for timeout in expected:
        assert breaker.state(now) is HALF_OPEN
        assert breaker.allow(now)
        breaker.record_failure(now)
        assert breaker.state(now) is OPEN
        assert breaker.current_open_timeout == timeout
        assert breaker.open_until() == now + timeout
        now += timeout
    assert breaker.trips == 4


def test_closing_resets_the_lengthened_timeout():
    breaker, now = half_open()
    breaker.record_failure(now)  # re-trip at 120 s
    assert breaker.current_open_timeout == 120.0
    now += 120.0
    breaker.record_success(now)
    breaker.record_success(now)
    assert breaker.state(now) is CLOSED
    assert breaker.current_open_timeout == 60.0
    for _ in range(5):
        breaker.record_failure(now)
    assert breaker.open_until() == now + 60.0


def test_closing_forgets_old_window_failures():
    breaker, now = half_open()
    breaker.record_success(now)
    breaker.record_success(now)
    # One failure after recovery must not trip on stale pre-trip history.
    breaker.record_failure(now + 1)
    assert breaker.state(now + 1) is CLOSED


def test_half_open_from_state_needs_no_allow_call():
    breaker = tripped()
    breaker.record_success(61.0)  # first call after the timeout is a result, not allow()
    breaker.record_success(62.0)
    assert breaker.state(62.0) is CLOSED


# --- keyed ---------------------------------------------------------------------------------


def test_keyed_breakers_are_created_lazily_and_kept():
    keyed = KeyedBreakers(BreakerConfig())
    assert len(keyed) == 0
    a = keyed.get("a.example")
    assert keyed.get("a.example") is a
    assert keyed.get("b.example") is not a
    assert "a.example" in keyed
    assert len(keyed) == 2


def test_open_keys():
    keyed = KeyedBreakers(BreakerConfig())
    for _ in range(5):
        keyed.get("bad").record_failure(0.0)
    keyed.get("good").record_success(0.0)
    assert keyed.open_keys(1.0) == ["bad"]
    assert keyed.open_keys(60.0) == []  # half-open now


def test_evicts_least_recently_used_closed_breaker():
    keyed = KeyedBreakers(BreakerConfig(), max_keys=3)
    keyed.get("a")
    keyed.get("b")
    keyed.get("c")
    keyed.get("a")  # a is now the most recently used
    keyed.get("d")
    assert "b" not in keyed
    assert all(k in keyed for k in ("a", "c", "d"))
    assert len(keyed) == 3


def test_open_breakers_survive_eviction_while_closed_ones_remain():
    keyed = KeyedBreakers(BreakerConfig(failure_threshold=1), max_keys=2)
    keyed.get("broken").record_failure(0.0)
    keyed.get("fine")
    keyed.get("new")
    assert "broken" in keyed
    assert "fine" not in keyed
    assert keyed.open_keys(1.0) == ["broken"]


def test_bound_holds_even_when_every_breaker_is_open():
    keyed = KeyedBreakers(BreakerConfig(failure_threshold=1), max_keys=2)
    keyed.get("x").record_failure(0.0)
    keyed.get("y").record_failure(0.0)
    fresh = keyed.get("z")
    assert len(keyed) == 2
    assert "x" not in keyed  # least recently used goes
    assert keyed.get("z") is fresh  # the new breaker is never the one evicted


def test_max_keys_must_be_positive():
    with pytest.raises(ValueError):
        KeyedBreakers(BreakerConfig(), max_keys=0)


# --- probe rounds --------------------------------------------------------------------------


def test_answers_from_an_earlier_probe_round_decide_nothing():
    breaker, now = half_open(BreakerConfig(half_open_probes=2, half_open_successes=2))
    first_round = breaker.probe_round
    assert breaker.allow(now) and breaker.allow(now)
    breaker.record_failure(now, probe_of=first_round)  # the first probe fails: reopen
    assert breaker.state(now) is OPEN
    later = breaker.open_until()
    assert later is not None and breaker.state(later) is HALF_OPEN
    assert breaker.probe_round == first_round + 1
    # The second probe of the first round answers late: neither closes nor reopens.
    breaker.record_failure(later, probe_of=first_round)
    assert breaker.state(later) is HALF_OPEN
    breaker.record_success(later, probe_of=first_round)
    assert breaker.state(later) is HALF_OPEN
    assert breaker.allow(later) and breaker.allow(later)
    breaker.record_success(later, probe_of=breaker.probe_round)
    breaker.record_success(later, probe_of=breaker.probe_round)
    assert breaker.state(later) is CLOSED


def test_a_delivery_from_before_the_trip_is_not_a_probe():
    breaker, now = half_open()
    breaker.record_failure(now, probe_of=NOT_A_PROBE)
    breaker.record_success(now, probe_of=NOT_A_PROBE)
    assert breaker.state(now) is HALF_OPEN
    assert breaker.allow(now)  # the single probe slot is still free


def test_a_probe_without_a_verdict_frees_its_slot():
    breaker, now = half_open()
    assert breaker.allow(now) and not breaker.allow(now)
    breaker.release_probe(now, probe_of=breaker.probe_round)
    assert breaker.state(now) is HALF_OPEN
    assert breaker.allow(now)


def test_release_outside_half_open_changes_nothing():
    breaker = CircuitBreaker(BreakerConfig())
    breaker.release_probe(0.0, probe_of=NOT_A_PROBE)
    assert breaker.state(0.0) is CLOSED
    tripped_breaker = tripped()
    tripped_breaker.release_probe(1.0)
    assert tripped_breaker.state(1.0) is OPEN
