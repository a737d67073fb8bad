"""The loop-lag monitor on trio's virtual clock: a stall shows up as exactly its lateness."""

import trio
import trio.testing
from prometheus_client import CollectorRegistry, Histogram

from sidecar.metrics import LOOP_LAG_BUCKETS
from sidecar.runtime.looplag import LoopLagMonitor


def lag_histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    histogram = Histogram("lag_seconds", "test", buckets=LOOP_LAG_BUCKETS, registry=registry)
    return registry, histogram


async def test_on_time_wakeups_record_no_lag(autojump_clock):
    registry, histogram = lag_histogram()
    monitor = LoopLagMonitor(histogram, interval=0.05, window_seconds=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(1.0 - 0.001)
        nursery.cancel_scope.cancel()
    status = monitor.status()
    assert status["samples"] == 19  # woke at 0.05, 0.10, ... 0.95
    assert status["max_ms"] == 0.0
    assert registry.get_sample_value("lag_seconds_count") == 19
    assert registry.get_sample_value("lag_seconds_bucket", {"le": "0.00025"}) == 19


async def test_a_stalled_loop_shows_as_lag(autojump_clock: trio.testing.MockClock):
    registry, histogram = lag_histogram()
    monitor = LoopLagMonitor(histogram, interval=0.05, window_seconds=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)  # due at 0.05
        await trio.sleep(0.01)
        # Something holds the loop for 300 ms without yielding: time passes, nobody runs.
        autojump_clock.jump(0.3)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    status = monitor.status()
    assert status["max_ms"] == 260.0  # woke at 0.31 for a wake-up due at 0.05
    assert status["p50_ms"] == 0.0
    assert registry.get_sample_value("lag_seconds_bucket", {"le": "0.25"}) == status["samples"] - 1
    assert registry.get_sample_value("lag_seconds_bucket", {"le": "0.5"}) == status["samples"]


async def test_window_is_bounded_by_its_length(autojump_clock):
    _, histogram = lag_histogram()
    monitor = LoopLagMonitor(histogram, interval=0.1, window_seconds=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(60.0)
        nursery.cancel_scope.cancel()
    assert monitor.status()["samples"] == 20
