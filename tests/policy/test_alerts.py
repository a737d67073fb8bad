import pytest

from sidecar.policy.alerts import Alert, AlertConfig, AlertRules, AlertSeverity, DlqGrowth
from sidecar.policy.breaker import BreakerState
from sidecar.policy.depth import DepthLevel
from sidecar.policy.pressure import PressureLevel


def names(alerts: list[Alert]) -> list[str]:
    return [a.name for a in alerts]


# --- DlqGrowth -----------------------------------------------------------------------------


def test_growth_needs_two_samples():
    growth = DlqGrowth(window=60)
    assert growth.rate_per_minute(0) == 0.0
    growth.record(0, 500)
    assert growth.rate_per_minute(0) == 0.0


def test_growth_rate_per_minute():
    growth = DlqGrowth(window=60)
    growth.record(0, 0)
    growth.record(60, 150)
    assert growth.rate_per_minute(60) == pytest.approx(150.0)


def test_a_short_burst_is_not_extrapolated_to_a_minute():
    growth = DlqGrowth(window=60)
    growth.record(0, 0)
    growth.record(2, 4)  # 4 dead letters in 2 s is not "120 a minute"
    assert growth.rate_per_minute(2) == pytest.approx(4.0)
    growth.record(20, 101)  # but 101 within the window is over 100 a minute
    assert growth.rate_per_minute(20) == pytest.approx(101.0)


def test_growth_uses_the_oldest_sample_still_in_the_window():
    growth = DlqGrowth(window=60)
    growth.record(0, 0)
    growth.record(50, 10)
    growth.record(100, 110)  # the sample at 0 has left the window
    assert growth.rate_per_minute(100) == pytest.approx(100 / 60 * 60)


def test_growth_window_boundary_is_inclusive():
    growth = DlqGrowth(window=60)
    growth.record(0, 0)
    growth.record(60, 120)
    assert growth.rate_per_minute(60) == pytest.approx(120.0)


def test_shrinking_dlq_has_negative_growth():
    growth = DlqGrowth(window=60)
    growth.record(0, 100)
    growth.record(30, 0)
    assert growth.rate_per_minute(30) == pytest.approx(-100.0)


def test_same_time_samples_do_not_divide_by_zero():
    growth = DlqGrowth(window=60)
    growth.record(5, 0)
    growth.record(5, 1000)
    assert growth.rate_per_minute(5) == 0.0


def test_growth_memory_is_bounded():
    growth = DlqGrowth(window=10)
    for t in range(10_000):
        growth.record(float(t), t)
    assert len(growth._samples) <= 11


def test_stale_samples_give_no_rate():
    growth = DlqGrowth(window=60)
    growth.record(0, 0)
    growth.record(10, 1000)
    assert growth.rate_per_minute(1000) == 0.0


def test_growth_window_must_be_positive():
    with pytest.raises(ValueError):
        DlqGrowth(window=0)


# --- config and Alert ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"growth_per_minute": 0}, {"growth_window": 0}, {"cooldown": -1}]
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        AlertConfig(**kwargs)


def test_alert_labels_are_frozen_copies():
    labels = {"queue": "a"}
    alert = Alert("QUEUE_DEPTH", AlertSeverity.WARNING, "m", labels, 1.0)
    labels["queue"] = "b"
    assert alert.labels == {"queue": "a"}
    with pytest.raises(TypeError):
        alert.labels["queue"] = "c"  # type: ignore[index]
    assert hash(alert) == hash(Alert("QUEUE_DEPTH", AlertSeverity.WARNING, "m", labels, 1.0))


# --- DLQ rules -----------------------------------------------------------------------------


def test_empty_dlq_is_quiet():
    rules = AlertRules(AlertConfig())
    assert rules.observe_dlq(0, 0) == []
    assert rules.observe_dlq(10, 0) == []


def test_dlq_not_empty_is_a_warning():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_dlq(5.0, 24)
    assert alert.name == "DLQ_NOT_EMPTY"
    assert alert.severity is AlertSeverity.WARNING
    assert alert.at == 5.0
    assert "24" in alert.message


def test_rapid_growth_is_critical():
    rules = AlertRules(AlertConfig())
    rules.observe_dlq(0, 0)
    alerts = rules.observe_dlq(30, 120)  # 120 within the last minute
    assert names(alerts) == ["CRITICAL_DLQ_GROWTH", "DLQ_NOT_EMPTY"]
    assert alerts[0].severity is AlertSeverity.CRITICAL


def test_growth_at_exactly_the_threshold_does_not_alert():
    rules = AlertRules(AlertConfig())
    rules.observe_dlq(0, 0)
    assert names(rules.observe_dlq(60, 100)) == ["DLQ_NOT_EMPTY"]


def test_slow_growth_is_only_a_warning():
    rules = AlertRules(AlertConfig(cooldown=0))
    rules.observe_dlq(0, 10)
    assert names(rules.observe_dlq(60, 50)) == ["DLQ_NOT_EMPTY"]


def test_cooldown_suppresses_repeats_then_allows_again():
    rules = AlertRules(AlertConfig(cooldown=300))
    assert names(rules.observe_dlq(0, 1)) == ["DLQ_NOT_EMPTY"]
    assert rules.observe_dlq(100, 2) == []
    assert rules.observe_dlq(299.9, 2) == []
    assert names(rules.observe_dlq(300, 2)) == ["DLQ_NOT_EMPTY"]


def test_cooldowns_are_per_alert_name():
    rules = AlertRules(AlertConfig())
    rules.observe_dlq(0, 1)
    # DLQ_NOT_EMPTY is cooling down, but growth is a different alert.
    assert names(rules.observe_dlq(30, 200)) == ["CRITICAL_DLQ_GROWTH"]


def test_new_pattern_alerts_once_per_signature():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_dead_letter(1.0, "TIMEOUT:request timed out after <n>ms")
    assert alert.name == "NEW_DLQ_PATTERN"
    assert alert.severity is AlertSeverity.INFO
    assert alert.labels["reason"] == "TIMEOUT"
    assert alert.labels["signature"] == "TIMEOUT:request timed out after <n>ms"
    assert rules.observe_dead_letter(2.0, "TIMEOUT:request timed out after <n>ms") == []
    assert rules.observe_dead_letter(10_000.0, "TIMEOUT:request timed out after <n>ms") == []


def test_distinct_new_patterns_each_alert_despite_cooldown():
    rules = AlertRules(AlertConfig())
    assert names(rules.observe_dead_letter(1.0, "TIMEOUT:a")) == ["NEW_DLQ_PATTERN"]
    assert names(rules.observe_dead_letter(1.0, "TIMEOUT:b")) == ["NEW_DLQ_PATTERN"]


def test_known_signatures_seed_the_set_after_restart():
    rules = AlertRules(AlertConfig(), known_signatures=["NETWORK_ERROR:econnreset"])
    assert rules.observe_dead_letter(0, "NETWORK_ERROR:econnreset") == []
    assert names(rules.observe_dead_letter(0, "NETWORK_ERROR:enotfound")) == ["NEW_DLQ_PATTERN"]


# --- operational rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        ("WARNING", AlertSeverity.WARNING),
        ("CRITICAL", AlertSeverity.CRITICAL),
        ("EMERGENCY", AlertSeverity.CRITICAL),
        (PressureLevel.EMERGENCY, AlertSeverity.CRITICAL),
    ],
)
def test_memory_pressure(level, severity):
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_pressure(0, level)
    assert alert.name == "MEMORY_PRESSURE"
    assert alert.severity is severity
    assert alert.labels["level"] in {"WARNING", "CRITICAL", "EMERGENCY"}


def test_int_enum_levels_are_labelled_by_name_not_number():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_depth(0, "html.raw", DepthLevel.CRITICAL)
    assert alert.labels == {"queue": "html.raw", "level": "CRITICAL"}


def test_normal_and_closed_are_quiet():
    rules = AlertRules(AlertConfig())
    assert rules.observe_pressure(0, "NORMAL") == []
    assert rules.observe_pressure(0, PressureLevel.NORMAL) == []
    assert rules.observe_breaker(0, "agent", BreakerState.CLOSED) == []
    assert rules.observe_depth(0, "q", "NORMAL") == []


def test_a_new_level_is_a_new_alert_within_cooldown():
    rules = AlertRules(AlertConfig())
    assert names(rules.observe_pressure(0, "WARNING")) == ["MEMORY_PRESSURE"]
    assert rules.observe_pressure(10, "WARNING") == []
    assert names(rules.observe_pressure(20, "EMERGENCY")) == ["MEMORY_PRESSURE"]


def test_breaker_alerts_per_key():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_breaker(0, "scraper-1", BreakerState.OPEN)
    assert alert.name == "BREAKER_OPEN"
    assert alert.severity is AlertSeverity.CRITICAL
    assert alert.labels == {"key": "scraper-1", "state": "OPEN"}
    assert rules.observe_breaker(5, "scraper-1", "OPEN") == []
    assert names(rules.observe_breaker(5, "scraper-2", "OPEN")) == ["BREAKER_OPEN"]
    [half] = rules.observe_breaker(6, "scraper-1", "HALF_OPEN")
    assert half.severity is AlertSeverity.WARNING


def test_depth_alerts_per_queue():
    rules = AlertRules(AlertConfig())
    [alert] = rules.observe_depth(0, "url.to_scrape", "EMERGENCY")
    assert alert.name == "QUEUE_DEPTH"
    assert alert.severity is AlertSeverity.CRITICAL
    assert rules.observe_depth(1, "url.to_scrape", "EMERGENCY") == []
    assert names(rules.observe_depth(1, "html.raw", "EMERGENCY")) == ["QUEUE_DEPTH"]
    assert names(rules.observe_depth(301, "url.to_scrape", "EMERGENCY")) == ["QUEUE_DEPTH"]


def test_zero_cooldown_fires_every_time():
    rules = AlertRules(AlertConfig(cooldown=0))
    assert len(rules.observe_dlq(0, 1)) == 1
    assert len(rules.observe_dlq(0, 1)) == 1


def test_expired_cooldowns_are_forgotten():
    rules = AlertRules(AlertConfig(cooldown=10))
    for i in range(100):
        rules.observe_breaker(float(i * 20), f"host-{i}", "OPEN")
    assert len(rules._last_fired) == 1
