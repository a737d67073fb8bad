import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.policy.depth import DepthLevel
from sidecar.policy.throttle import TokenBucket, adaptive_rate, publish_rate


def test_starts_full_and_grants_a_burst():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.try_acquire(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.try_acquire(0.0) == pytest.approx(0.1)


def test_denied_acquire_consumes_nothing():
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert bucket.try_acquire(0.0) == 0.0
    assert bucket.try_acquire(0.05) == pytest.approx(0.05)
    assert bucket.try_acquire(0.05) == pytest.approx(0.05)  # same answer: nothing was taken
    assert bucket.tokens(0.05) == pytest.approx(0.5)


def test_waiting_the_returned_time_is_enough():
    bucket = TokenBucket(rate=3, burst=1, now=0.0)
    now = 0.0
    bucket.try_acquire(now)
    for _ in range(100):
        wait = bucket.try_acquire(now)
        assert wait > 0
        now += wait
        assert bucket.try_acquire(now) == 0.0
    assert now == pytest.approx(100 / 3)


def test_refills_at_rate():
    bucket = TokenBucket(rate=2, burst=10, now=0.0)
    for _ in range(10):
        bucket.try_acquire(0.0)
    assert bucket.tokens(1.0) == pytest.approx(2.0)
    assert bucket.try_acquire(1.0, n=2) == 0.0
    assert bucket.try_acquire(1.0) == pytest.approx(0.5)


def test_burst_after_idle_is_capped():
    bucket = TokenBucket(rate=100, burst=3, now=0.0)
    assert bucket.tokens(3600.0) == 3.0
    grants = [bucket.try_acquire(3600.0) for _ in range(4)]
    assert grants[:3] == [0.0, 0.0, 0.0]
    assert grants[3] > 0


def test_multi_token_acquire_wait():
    bucket = TokenBucket(rate=4, burst=8, now=0.0)
    assert bucket.try_acquire(0.0, n=6) == 0.0
    assert bucket.try_acquire(0.0, n=4) == pytest.approx(0.5)  # need 2 more at 4/s


def test_rate_zero_holds():
    bucket = TokenBucket(rate=0, burst=2, now=0.0)
    assert bucket.try_acquire(0.0) == 0.0  # the saved burst is still there
    assert bucket.try_acquire(0.0) == 0.0
    assert bucket.try_acquire(1000.0) == math.inf


def test_set_rate_credits_elapsed_time_at_the_old_rate():
    bucket = TokenBucket(rate=10, burst=100, now=0.0)
    bucket.try_acquire(0.0, n=100)
    bucket.set_rate(1, now=2.0)  # 2 s at 10/s = 20 tokens, credited before the change
    assert bucket.rate == 1
    assert bucket.tokens(2.0) == pytest.approx(20.0)
    assert bucket.tokens(4.0) == pytest.approx(22.0)


def test_set_rate_to_zero_then_back():
    bucket = TokenBucket(rate=5, burst=1, now=0.0)
    bucket.try_acquire(0.0)
    bucket.set_rate(0, now=0.1)  # 0.5 token credited
    assert bucket.try_acquire(10.0) == math.inf
    bucket.set_rate(5, now=10.0)  # nothing accrued while held
    assert bucket.try_acquire(10.0) == pytest.approx(0.1)


def test_rate_is_read_only():
    bucket = TokenBucket(rate=5, burst=1, now=0.0)
    with pytest.raises(AttributeError):
        bucket.rate = 6  # type: ignore[misc]


def test_clock_stepping_back_mints_nothing():
    bucket = TokenBucket(rate=10, burst=1, now=100.0)
    bucket.try_acquire(100.0)
    assert bucket.try_acquire(50.0) == pytest.approx(0.1)
    assert bucket.try_acquire(100.05) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1, 1), (math.inf, 1), (math.nan, 1), (1, 0), (1, -2)]
)
def test_invalid_construction(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


def test_invalid_set_rate():
    bucket = TokenBucket(rate=1, burst=1, now=0.0)
    with pytest.raises(ValueError):
        bucket.set_rate(-1, now=0.0)


@pytest.mark.parametrize("n", [0, -1, 3])
def test_acquire_amount_must_be_possible(n):
    bucket = TokenBucket(rate=1, burst=2, now=0.0)
    with pytest.raises(ValueError):
        bucket.try_acquire(0.0, n=n)


@given(
    rate=st.floats(min_value=0.1, max_value=1000),
    burst=st.floats(min_value=1, max_value=100),
    steps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=60),
)
def test_grants_never_exceed_burst_plus_rate_times_time(rate, burst, steps):
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    now = granted = 0.0
    for step in steps:
        now += step
        while bucket.try_acquire(now) == 0.0:
            granted += 1
        assert 0 <= bucket.tokens(now) < 1 + 1e-6
    assert granted <= burst + rate * now + 1e-6


@pytest.mark.parametrize(
    ("depth", "rate"),
    [(0, 10.0), (100, 10.0), (101, 8.99), (200, 8.0), (500, 5.0), (900, 1.0), (950, 1.0)],
)
def test_adaptive_rate_follows_the_seed(depth, rate):
    assert adaptive_rate(depth, 10.0) == pytest.approx(rate)


def test_adaptive_rate_floor_is_one_per_second():
    assert adaptive_rate(5000, 10.0) == 1.0
    assert adaptive_rate(5000, 200.0) == 1.0


def test_adaptive_rate_never_exceeds_base():
    assert adaptive_rate(500, 0.5) == 0.5
    assert adaptive_rate(500, 0.0) == 0.0


def test_publish_rate():
    assert publish_rate(10.0, 0, DepthLevel.NORMAL, broker_blocked=False) == 10.0
    assert publish_rate(10.0, 300, DepthLevel.CRITICAL, broker_blocked=False) == pytest.approx(7.0)
    assert publish_rate(10.0, 0, DepthLevel.NORMAL, broker_blocked=True) == 0.0
    assert publish_rate(10.0, 600, DepthLevel.EMERGENCY, broker_blocked=False) == 0.0
