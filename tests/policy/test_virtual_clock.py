"""Policies driven by trio's virtual clock: the adapters will feed them trio.current_time().

``autojump_clock`` (pytest-trio) jumps time forward whenever every task is asleep, so these tests
sleep minutes of virtual time in milliseconds of real time.
"""

import itertools
import time

import pytest
import trio

from sidecar.policy.breaker import BreakerConfig, BreakerState, CircuitBreaker
from sidecar.policy.throttle import TokenBucket


async def test_breaker_opens_half_opens_and_closes_on_virtual_time(autojump_clock):
    started = time.monotonic()
    breaker = CircuitBreaker(BreakerConfig())
    for _ in range(5):
        breaker.record_failure(trio.current_time())
        await trio.sleep(1)
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    assert breaker.retry_in(trio.current_time()) == pytest.approx(59.0)  # tripped at +4 s

    await trio.sleep(breaker.retry_in(trio.current_time()) - 0.5)
    assert not breaker.allow(trio.current_time())

    await trio.sleep(0.5)
    assert breaker.state(trio.current_time()) is BreakerState.HALF_OPEN
    assert breaker.allow(trio.current_time())
    breaker.record_failure(trio.current_time())  # probe fails: open for 120 s now

    await trio.sleep(119)
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    await trio.sleep(1)
    for _ in range(2):
        assert breaker.allow(trio.current_time())
        await trio.sleep(0.1)
        breaker.record_success(trio.current_time())
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED
    assert breaker.trips == 2
    assert time.monotonic() - started < 5  # three virtual minutes, no real waiting


async def test_token_bucket_paces_a_publisher_on_virtual_time(autojump_clock):
    start = trio.current_time()
    bucket = TokenBucket(rate=10, burst=5, now=start)
    sent_at = []
    for _ in range(25):
        wait = bucket.try_acquire(trio.current_time())
        if wait > 0:
            await trio.sleep(wait)
            # One sleep of the advertised length is always enough.
            assert bucket.try_acquire(trio.current_time()) == 0.0
        sent_at.append(trio.current_time() - start)
    # A burst of 5 at once, then one every 0.1 s: 20 more take 2 s.
    assert sent_at[:5] == [0.0] * 5
    assert sent_at[-1] == pytest.approx(2.0)
    gaps = [b - a for a, b in itertools.pairwise(sent_at[5:])]
    assert len(gaps) == 19
    assert all(g == pytest.approx(0.1) for g in gaps)


async def test_token_bucket_rate_change_mid_stream(autojump_clock):
    bucket = TokenBucket(rate=10, burst=1, now=trio.current_time())
    sent = 0

    async def publisher():
        nonlocal sent
        while True:
            wait = bucket.try_acquire(trio.current_time())
            if wait == 0:
                sent += 1
            else:
                await trio.sleep(min(wait, 1.0))  # wake up to notice a rate change

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        await trio.sleep(10)
        fast = sent
        bucket.set_rate(0, trio.current_time())  # broker blocked: hold
        await trio.sleep(30)
        held = sent - fast
        bucket.set_rate(2, trio.current_time())
        await trio.sleep(10)
        slow = sent - fast - held
        nursery.cancel_scope.cancel()
    assert 100 <= fast <= 101
    assert held <= 1  # at most a token already accrued before the hold
    assert 19 <= slow <= 21
