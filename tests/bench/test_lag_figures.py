"""The bench's loop-lag figures from two scrapes of the sidecar's histogram."""

from __future__ import annotations

import math

from bench.scenarios import loop_lag_between

INF = float("inf")


def test_quantiles_over_the_samples_between_two_scrapes():
    before = {0.001: 10.0, 0.005: 10.0, 0.01: 10.0, 0.1: 10.0, INF: 10.0}
    # 100 new samples: 90 under 1 ms, 9 in (1, 5] ms, 1 in (10, 100] ms.
    after = {0.001: 100.0, 0.005: 109.0, 0.01: 109.0, 0.1: 110.0, INF: 110.0}
    lag = loop_lag_between(before, after)
    assert lag["samples"] == 100
    assert math.isclose(lag["p50"], 50 / 90 * 1.0)  # within the first bucket, from 0
    assert math.isclose(lag["p99"], 1.0 + 4.0 * (99 - 90) / 9)  # top of (1, 5] ms
    assert lag["max_le"] == 100.0


def test_no_new_samples_gives_no_figures():
    scrape = {0.001: 3.0, INF: 3.0}
    lag = loop_lag_between(scrape, scrape)
    assert lag["samples"] == 0
    assert math.isnan(lag["p99"])


def test_samples_past_the_last_bound_report_that_bound():
    lag = loop_lag_between({}, {0.5: 0.0, 2.5: 1.0, INF: 2.0})
    assert lag["p99"] == 2500.0
    assert lag["max_le"] == INF
