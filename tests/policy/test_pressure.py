import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.policy.pressure import (
    PressureLevel,
    PressureThresholds,
    PressureTracker,
    adjust_batch_size,
    batch_allowed,
    degradation_actions,
    level_for,
    memory_ratio,
    prefetch_for,
)

N, W, C, E = (
    PressureLevel.NORMAL,
    PressureLevel.WARNING,
    PressureLevel.CRITICAL,
    PressureLevel.EMERGENCY,
)
T = PressureThresholds()


def test_levels_are_ordered_and_named():
    assert N < W < C < E
    assert [int(x) for x in (N, W, C, E)] == [0, 1, 2, 3]
    assert W.label == "WARNING"
    assert E.label == "EMERGENCY"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warning": 0.8, "critical": 0.8},
        {"critical": 0.95, "emergency": 0.9},
        {"warning": 0.0},
        {"hysteresis": -0.01},
        {"hysteresis": 0.7},
    ],
)
def test_invalid_thresholds(kwargs):
    with pytest.raises(ValueError):
        PressureThresholds(**kwargs)


@pytest.mark.parametrize(
    ("ratio", "level"),
    [(0.0, N), (0.7, N), (0.7001, W), (0.8, W), (0.81, C), (0.9, C), (0.91, E), (1.5, E)],
)
def test_rising_uses_the_seeds_strict_thresholds(ratio, level):
    assert level_for(ratio, N, T) is level


def test_can_jump_several_levels_up():
    assert level_for(0.95, N, T) is E


@pytest.mark.parametrize(
    ("previous", "ratio", "level"),
    [
        (W, 0.69, W),  # below 0.7 but not below 0.65
        (W, 0.65, W),  # boundary: must fall strictly below
        (W, 0.6499, N),
        (C, 0.76, C),
        (C, 0.7499, W),
        (E, 0.86, E),
        (E, 0.84, C),
        (E, 0.5, N),  # several levels at once
        (E, 0.72, W),  # 0.72 keeps WARNING: above 0.65
        (C, 0.66, W),
    ],
)
def test_falling_needs_the_hysteresis_margin(previous, ratio, level):
    assert level_for(ratio, previous, T) is level


def test_zero_hysteresis_falls_at_the_threshold():
    t = PressureThresholds(hysteresis=0.0)
    assert level_for(0.69, W, t) is N
    assert level_for(0.7, W, t) is W


def test_tracker_reports_only_changes():
    tracker = PressureTracker()
    assert tracker.level is N
    assert tracker.update(0.5) is None
    assert tracker.update(0.75) is W
    assert tracker.update(0.68) is None  # hysteresis: stays WARNING
    assert tracker.level is W
    assert tracker.update(0.95) is E
    assert tracker.update(0.6) is N
    assert tracker.level is N


def test_tracker_does_not_flap_around_a_threshold():
    tracker = PressureTracker()
    changes = [tracker.update(r) for r in (0.71, 0.69, 0.71, 0.69, 0.71, 0.69)]
    assert changes == [W, None, None, None, None, None]


def test_tracker_accepts_custom_thresholds_and_start_level():
    tracker = PressureTracker(PressureThresholds(0.5, 0.6, 0.7, 0.0), level=C)
    assert tracker.update(0.55) is W


@given(
    ratios=st.lists(st.floats(min_value=0, max_value=1.2, allow_nan=False), max_size=50),
)
def test_level_is_always_between_raw_and_hysteresis_bound(ratios):
    level = N
    for ratio in ratios:
        level = level_for(ratio, level, T)
        raw = level_for(ratio, N, T)
        assert level >= raw
        if level > N:
            assert ratio >= T.threshold(level) - T.hysteresis


@pytest.mark.parametrize(
    ("level", "configured", "expected"),
    [(N, 100, 100), (W, 100, 75), (C, 100, 50), (E, 100, 25), (W, 10, 7), (E, 3, 1), (E, 1, 1)],
)
def test_adjust_batch_size(level, configured, expected):
    assert adjust_batch_size(level, configured) == expected


def test_adjust_batch_size_rejects_zero():
    with pytest.raises(ValueError):
        adjust_batch_size(N, 0)


def test_batch_allowed_until_emergency():
    assert [batch_allowed(level) for level in (N, W, C, E)] == [True, True, True, False]


@pytest.mark.parametrize(
    ("used", "limit", "ratio"),
    [(50, 100, 0.5), (0, 100, 0.0), (150, 100, 1.5), (10, 0, 0.0), (10, -1, 0.0), (-5, 100, 0.0)],
)
def test_memory_ratio(used, limit, ratio):
    assert memory_ratio(used, limit) == ratio


def test_degradation_actions_accumulate():
    assert degradation_actions(N) == ()
    assert degradation_actions(W) == ("reduce_prefetch", "increase_processing_delay")
    assert degradation_actions(C) == (
        "reduce_prefetch",
        "increase_processing_delay",
        "disable_analytics_collection",
        "reduce_cache_ttl",
    )
    emergency = degradation_actions(E)
    assert emergency[:4] == degradation_actions(C)
    assert set(emergency[4:]) == {
        "disable_non_essential_features",
        "log_level_error",
        "stop_fetching",
    }


@pytest.mark.parametrize(
    ("level", "prefetch", "batch", "expected"),
    [
        (N, 100, 10, 100),
        (W, 100, 10, 75),
        (C, 100, 10, 50),
        (E, 100, 10, 25),
        (N, 5, 20, 20),  # never below the batch: a batch must be fillable
        (C, 10, 16, 8),  # 10 * 0.5 = 5 < adjusted batch 8
        (E, 2, 1, 1),  # never 0 (AMQP prefetch 0 means unlimited)
    ],
)
def test_prefetch_follows_batch_sizing(level, prefetch, batch, expected):
    assert prefetch_for(level, prefetch, batch) == expected


def test_prefetch_rejects_zero():
    with pytest.raises(ValueError):
        prefetch_for(N, 0, 1)
