"""Everything ``run`` builds from a configuration, except the I/O.

``config check`` and ``run`` both call ``check_buildable``: a configuration that passes the
check constructs the same policies and store choice that the daemon constructs at start,
so it starts (systemd runs the check as ExecStartPre; a config that passed it and then
crashed ``run`` would crash-loop).
"""

from __future__ import annotations

import importlib

from yarl import URL

from sidecar.config import Config, ConfigError
from sidecar.policies import breaker_config_from, retry_policy_from
from sidecar.policy.breaker import CircuitBreaker
from sidecar.redact import redact_url
from sidecar.store.base import parse_store_url


def check_buildable(config: Config, source: str = "configuration") -> None:
    """Raise ConfigError naming every part that the daemon could not build."""
    problems: list[str] = []
    try:
        retry_policy_from(config)
    except (ValueError, TypeError) as exc:
        problems.append(f"retry: {exc}")
    try:
        CircuitBreaker(breaker_config_from(config))
    except (ValueError, TypeError) as exc:
        problems.append(f"breaker: {exc}")
    try:
        parse_store_url(config.store.url)
    except ValueError as exc:
        problems.append(f"store.url: {exc}")
    try:
        # The parser the AMQP client uses: a URL it rejects would stop the daemon at start.
        if not URL(config.broker.url).host:
            raise ValueError("no host")
    except ValueError as exc:
        problems.append(
            f"broker.url {redact_url(config.broker.url)!r} is not a valid URL ({exc}); "
            "percent-encode / ? # @ : % in the user name or password"
        )
    if config.tracing.enabled:
        try:
            importlib.import_module("opentelemetry.sdk.trace")
            importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError as exc:
            problems.append(
                f"tracing.enabled: the OpenTelemetry packages are not installed ({exc}); "
                "install the otel extra (pip install 'sidecar[otel]') or set enabled = false"
            )
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
