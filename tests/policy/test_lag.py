"""The loop-lag window: nearest-rank percentiles over a bounded set of recent samples."""

import pytest

from sidecar.policy.lag import LagWindow, percentile


def test_percentile_is_nearest_rank():
    ordered = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(ordered, 0.50) == 50.0
    assert percentile(ordered, 0.99) == 99.0
    assert percentile(ordered, 1.0) == 100.0
    assert percentile(ordered, 0.0) == 1.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.99) == 0.0


def test_p99_picks_out_the_rare_stall():
    window = LagWindow(200)
    for _ in range(197):
        window.add(0.001)
    for stall in (0.2, 0.3, 0.4):
        window.add(stall)
    summary = window.summary()
    # 200 samples: rank ceil(0.99 * 200) = 198, the first of the three stalls.
    assert (summary.samples, summary.p50, summary.p99, summary.max) == (200, 0.001, 0.2, 0.4)


def test_window_keeps_only_the_most_recent_samples():
    window = LagWindow(10)
    window.add(5.0)  # an old stall, pushed out by ten newer samples
    for i in range(10):
        window.add(i / 1000)
    assert len(window) == 10
    summary = window.summary()
    assert summary.max == 0.009
    assert summary.p50 == 0.004


def test_negative_lag_counts_as_on_time():
    window = LagWindow(4)
    window.add(-0.5)
    assert window.summary().max == 0.0


def test_empty_window_summarises_to_zero():
    summary = LagWindow(5).summary()
    assert (summary.samples, summary.p50, summary.p99, summary.max) == (0, 0.0, 0.0, 0.0)


def test_window_needs_room_for_a_sample():
    with pytest.raises(ValueError):
        LagWindow(0)
