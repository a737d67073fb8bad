"""The policies, built once from the configuration.

The components get the policy objects, never the configuration: what a setting means is
decided here and nowhere else. ``config check`` builds the same objects (see preflight).
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config import Config, reason_declarations
from sidecar.core.ledger import Ledger, LedgerSettings, Meter
from sidecar.policy.alerts import AlertConfig
from sidecar.policy.breaker import BreakerConfig, CircuitBreaker, KeyedBreakers
from sidecar.policy.depth import DepthThresholds
from sidecar.policy.pressure import PressureThresholds
from sidecar.policy.retry import RetryPolicy, resolve_reasons
from sidecar.policy.scaling import ScalingPolicy


def retry_policy_from(config: Config) -> RetryPolicy:
    r = config.retry
    reasons, rules = resolve_reasons(reason_declarations(config))
    return RetryPolicy(
        max_attempts=r.max_attempts,
        base_delay=r.base_delay,
        max_delay=r.max_delay,
        multiplier=r.multiplier,
        jitter=r.jitter,
        rate_limit_default_delay=r.rate_limit_default_delay,
        tiers=tuple(r.tiers),
        rules=rules,
        reasons=reasons,
    )


def breaker_config_from(config: Config) -> BreakerConfig:
    b = config.breaker
    return BreakerConfig(
        failure_threshold=b.failure_threshold,
        open_timeout=b.open_timeout,
        max_open_timeout=b.max_open_timeout,
        backoff_multiplier=b.backoff_multiplier,
        window=b.window,
        min_calls_in_window=b.min_calls_in_window,
        failure_ratio=b.failure_ratio,
        half_open_probes=b.half_open_probes,
        half_open_successes=b.half_open_successes,
    )


def ledger_settings_from(config: Config) -> LedgerSettings:
    a = config.agent
    return LedgerSettings(
        deadline=a.deadline,
        max_deadline=a.max_deadline,
        max_in_flight=a.max_in_flight,
        batch_size=a.batch_size,
        key_header=config.breaker.key_header,
        host=config.identity.host,
    )


def ledger_from(config: Config, *, random: Callable[[], float], meter: Meter) -> Ledger:
    breakers = breaker_config_from(config)
    return Ledger(
        ledger_settings_from(config),
        retry_policy_from(config),
        CircuitBreaker(breakers),
        KeyedBreakers(breakers),
        random=random,
        meter=meter,
    )


def depth_thresholds_from(config: Config) -> DepthThresholds:
    d = config.depth
    return DepthThresholds(warning=d.warning, critical=d.critical, emergency=d.emergency)


def pressure_thresholds_from(config: Config) -> PressureThresholds:
    p = config.pressure
    return PressureThresholds(p.warning, p.critical, p.emergency, p.hysteresis)


def scaling_policy_from(config: Config) -> ScalingPolicy:
    s = config.scaling
    return ScalingPolicy(s.messages_per_consumer, s.min_consumers, s.max_consumers)


def alert_config_from(config: Config) -> AlertConfig:
    return AlertConfig(
        growth_per_minute=config.alerts.growth_per_minute, cooldown=config.alerts.cooldown
    )
