"""The edges of every policy's valid range, and the exact refusals at those edges.

A value exactly on a limit (``prefetch=1``, ``min_consumers == max_consumers``, a cooldown
that has exactly elapsed) is accepted or refused on purpose; these tests pin which, and that
each refusal says what was wrong.
"""

from __future__ import annotations

import re

import pytest

from sidecar.policy.alerts import AlertConfig, AlertRules, AlertSeverity, DlqGrowth
from sidecar.policy.depth import DepthLevel, DepthThresholds, depth_level
from sidecar.policy.pressure import (
    PressureLevel,
    PressureThresholds,
    adjust_batch_size,
    level_for,
    memory_ratio,
    prefetch_for,
)
from sidecar.policy.retry import (
    ReasonRule,
    RetryPolicy,
    apply_jitter,
    choose_tier,
    decide,
    exponential_backoff,
)
from sidecar.policy.scaling import ScalingPolicy, recommended_consumers
from sidecar.policy.throttle import TokenBucket


def exactly(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern for this whole message and nothing more."""
    return "^" + re.escape(message) + "$"


# --- alerts --------------------------------------------------------------------------------


def test_alert_config_defaults():
    config = AlertConfig()
    assert (config.growth_per_minute, config.growth_window, config.cooldown) == (
        100.0,
        60.0,
        300.0,
    )


def test_alert_config_accepts_small_positive_values():
    config = AlertConfig(growth_per_minute=0.5, growth_window=0.5, cooldown=0)
    assert (config.growth_per_minute, config.growth_window, config.cooldown) == (0.5, 0.5, 0)


def test_an_invalid_alert_config_names_every_rule():
    with pytest.raises(ValueError, match=r"^need growth_per_minute > 0, growth_window > 0, "):
        AlertConfig(cooldown=-1)


def test_a_growth_window_under_a_second_is_valid():
    assert DlqGrowth(0.5).window == 0.5
    with pytest.raises(ValueError, match=exactly("window must be > 0, got 0")):
        DlqGrowth(0)


def test_a_new_pattern_is_labelled_with_the_reason_before_the_first_colon():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_dead_letter(0.0, "TIMEOUT:request timed out: after <n>ms")
    assert dict(alert.labels) == {
        "signature": "TIMEOUT:request timed out: after <n>ms",
        "reason": "TIMEOUT",
    }
    assert alert.message == "new dead-letter pattern: TIMEOUT:request timed out: after <n>ms"


def test_operational_alerts_say_what_happened():
    rules = AlertRules(AlertConfig())
    [pressure] = rules.observe_pressure(1.0, PressureLevel.CRITICAL)
    assert pressure.message == "memory pressure CRITICAL"
    assert (pressure.name, pressure.severity, pressure.at) == (
        "MEMORY_PRESSURE",
        AlertSeverity.CRITICAL,
        1.0,
    )
    [breaker] = rules.observe_breaker(2.0, "agent", "HALF_OPEN")
    assert breaker.message == "circuit breaker agent is HALF_OPEN"
    assert breaker.severity is AlertSeverity.WARNING
    [depth] = rules.observe_depth(3.0, "q1", DepthLevel.EMERGENCY)
    assert depth.message == "queue q1 depth EMERGENCY"
    assert depth.severity is AlertSeverity.CRITICAL


def test_an_unknown_level_is_a_warning():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_pressure(0.0, "SOMETHING_NEW")
    assert alert.severity is AlertSeverity.WARNING
    [alert] = rules.observe_breaker(0.0, "k", "STUCK")
    assert alert.severity is AlertSeverity.WARNING


def test_a_cooldown_that_has_exactly_elapsed_is_forgotten():
    rules = AlertRules(AlertConfig(cooldown=300))
    rules.observe_depth(0.0, "a", "WARNING")
    assert rules.observe_depth(299.0, "a", "WARNING") == []
    rules.observe_depth(300.0, "b", "WARNING")  # a's cooldown ended exactly now
    assert [labels for labels in rules._last_fired] == [
        ("QUEUE_DEPTH", frozenset({("queue", "b"), ("level", "WARNING")}))
    ]
    assert len(rules.observe_depth(300.0, "a", "WARNING")) == 1


# --- depth ---------------------------------------------------------------------------------


def test_depth_thresholds_must_strictly_increase():
    with pytest.raises(
        ValueError, match=exactly("need 0 <= warning < critical < emergency, got 1, 5, 5")
    ):
        DepthThresholds(warning=1, critical=5, emergency=5)
    assert DepthThresholds(warning=0, critical=1, emergency=2).warning == 0


def test_depth_level_with_the_lowest_thresholds():
    t = DepthThresholds(warning=0, critical=1, emergency=2)
    assert [depth_level(d, t) for d in range(4)] == [
        DepthLevel.NORMAL,
        DepthLevel.WARNING,
        DepthLevel.CRITICAL,
        DepthLevel.EMERGENCY,
    ]


# --- pressure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warning": 0}, "need 0 < warning < critical < emergency, got 0, 0.8, 0.9"),
        ({"critical": 0.9}, "need 0 < warning < critical < emergency, got 0.7, 0.9, 0.9"),
        ({"hysteresis": 0.7}, "hysteresis must be in [0, warning), got 0.7"),
        ({"hysteresis": -0.01}, "hysteresis must be in [0, warning), got -0.01"),
    ],
)
def test_pressure_thresholds_at_their_edges_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        PressureThresholds(**kwargs)


def test_pressure_thresholds_just_inside_their_edges():
    t = PressureThresholds(warning=0.01, critical=0.02, emergency=0.03, hysteresis=0)
    assert t.threshold(PressureLevel.NORMAL) == 0.0
    assert t.threshold(PressureLevel.EMERGENCY) == 0.03
    assert PressureThresholds(hysteresis=0.69).hysteresis == 0.69


def test_normal_has_no_threshold():
    assert PressureThresholds().threshold(PressureLevel.NORMAL) == 0.0


def test_a_nonsense_negative_ratio_falls_to_normal_and_no_further():
    t = PressureThresholds()
    assert level_for(-0.5, PressureLevel.EMERGENCY, t) is PressureLevel.NORMAL
    assert level_for(-0.5, PressureLevel.NORMAL, t) is PressureLevel.NORMAL


def test_memory_ratio_with_a_one_byte_limit():
    assert memory_ratio(1, 1) == 1.0
    assert memory_ratio(0, 1) == 0.0
    assert memory_ratio(5, 0) == 0.0


def test_a_prefetch_of_one_is_valid_and_stays_one():
    for level in PressureLevel:
        assert prefetch_for(level, 1, 1) == 1
    with pytest.raises(ValueError, match=exactly("configured prefetch must be >= 1, got 0")):
        prefetch_for(PressureLevel.NORMAL, 0, 1)


def test_batch_size_refusal_says_why():
    with pytest.raises(ValueError, match=exactly("configured batch size must be >= 1, got 0")):
        adjust_batch_size(PressureLevel.NORMAL, 0)


# --- retry ---------------------------------------------------------------------------------


def test_retry_policy_accepts_values_on_its_edges():
    policy = RetryPolicy(base_delay=5.0, max_delay=5.0, multiplier=1.0, tiers=(5.0,))
    assert exponential_backoff(3, policy) == 5.0
    one = RetryPolicy(rules={"X": ReasonRule("retry", "exponential", max_attempts=1)})
    assert one.rule_for("X").max_attempts == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_delay": 2.0, "max_delay": 1.0}, "max_delay must be >= base_delay"),
        ({"tiers": ()}, "tiers must not be empty"),
        (
            {"max_delay": 700.0, "tiers": (1.0, 5.0, 600.0)},
            "max_delay 700.0 exceeds the largest tier 600.0",
        ),
        (
            {"rules": {"X": ReasonRule("retry", "exponential", max_attempts=0)}},
            "rule for X: max_attempts must be >= 1",
        ),
        ({"multiplier": 0.99}, "multiplier must be >= 1, got 0.99"),
    ],
)
def test_retry_policy_refusals_say_why(kwargs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: exponential_backoff(0, RetryPolicy()), "attempt must be >= 1, got 0"),
        (lambda: apply_jitter(1.0, 1.0, 0.5), "fraction must be in [0, 1), got 1.0"),
        (lambda: apply_jitter(1.0, 0.2, 1.0), "u must be in [0, 1), got 1.0"),
        (lambda: choose_tier(1.0, ()), "tiers must not be empty"),
        (
            lambda: decide("TIMEOUT", "", 0, None, RetryPolicy(), 0.0),
            "attempt must be >= 1, got 0",
        ),
    ],
)
def test_retry_functions_refuse_out_of_range_arguments_clearly(call, message):
    with pytest.raises(ValueError, match=exactly(message)):
        call()


# --- scaling -------------------------------------------------------------------------------


def test_a_fixed_consumer_count_is_a_valid_policy():
    policy = ScalingPolicy(min_consumers=3, max_consumers=3)
    assert [recommended_consumers(d, policy) for d in (0, 10, 1000)] == [3, 3, 3]


def test_at_most_one_consumer_is_a_valid_policy():
    policy = ScalingPolicy(min_consumers=0, max_consumers=1)
    assert [recommended_consumers(d, policy) for d in (0, 1, 1000)] == [0, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"messages_per_consumer": 0}, "messages_per_consumer must be >= 1, got "),
        ({"min_consumers": 2, "max_consumers": 1}, "need 0 <= min_consumers <= max_consumers"),
        ({"min_consumers": 0, "max_consumers": 0}, "need 0 <= min_consumers <= max_consumers"),
    ],
)
def test_scaling_policy_refusals_say_why(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ScalingPolicy(**kwargs)


def test_negative_depth_refusal_says_why():
    with pytest.raises(ValueError, match=exactly("depth must be >= 0, got -1")):
        recommended_consumers(-1, ScalingPolicy())


# --- throttle ------------------------------------------------------------------------------


def test_a_shortfall_within_the_rounding_allowance_is_granted():
    # After 1 - 1e-9 s at 1 token/s the bucket holds 0.999999999 token: short by exactly the
    # allowance that absorbs float rounding, so the token is granted.
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    assert bucket.try_acquire(0.0) == 0.0
    assert bucket.try_acquire(1.0 - 1e-9) == 0.0


def test_a_shortfall_beyond_the_rounding_allowance_is_not_granted():
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    assert bucket.try_acquire(0.0) == 0.0
    assert bucket.try_acquire(1.0 - 1e-6) == pytest.approx(1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TokenBucket(rate=1.0, burst=0.0, now=0.0), "burst must be > 0, got 0.0"),
        (
            lambda: TokenBucket(rate=-1.0, burst=1.0, now=0.0),
            "rate must be finite and >= 0, got -1.0",
        ),
        (
            lambda: TokenBucket(rate=1.0, burst=2.0, now=0.0).try_acquire(0.0, 3.0),
            "n must be in (0, burst=2.0], got 3.0",
        ),
    ],
)
def test_throttle_refusals_say_why(call, message):
    with pytest.raises(ValueError, match=exactly(message)):
        call()
