"""Configuration: one TOML file, ``SIDECAR_<SECTION>_<KEY>`` environment overrides, then
command-line flags; decoded and validated by msgspec structs that forbid unknown fields, so a
typo fails at start with the key named."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from sidecar.redact import redact_url as redact_url  # re-exported: callers import it here

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Ratio = Annotated[float, msgspec.Meta(gt=0, lt=1)]
# AMQP short strings: at most 255 bytes; RabbitMQ reserves the amq. prefix.
QueueName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=255, pattern=r"^(?!amq\.)[^\x00-\x1f]+$")
]

MIB = 1024 * 1024


def _default_socket() -> str:
    # Never a guessable name in a shared directory such as /tmp: another user could create
    # it first. /run/sidecar is made by systemd (RuntimeDirectory=) or the k8s volume.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / "sidecar" / "agent.sock" if runtime else "/run/sidecar/agent.sock")


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every config section rejects keys it does not know."""


class BrokerConfig(Section):
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    queues: list[QueueName] = []
    prefetch: Count = 100
    declare_queues: bool = True
    reconnect_min: Positive = 0.5
    reconnect_max: Positive = 30.0
    heartbeat: Annotated[int, msgspec.Meta(ge=0)] = 30
    tier_prefix: QueueName = "sidecar.retry"
    # How aiormq's asyncio loop meets trio: "trio-asyncio" (same thread, the stack's choice)
    # or "thread" (its own thread, work handed over in batches). Measured side by side in
    # bench/RESULTS.md: neither wins clearly (thread publishes ~1.16x faster; trio-asyncio
    # consumes large batches ~1.1x faster with lower latency), so the default stays.
    hop: Literal["trio-asyncio", "thread"] = "trio-asyncio"


class AgentConfig(Section):
    socket: str = msgspec.field(default_factory=_default_socket)
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    tcp: str = ""
    token: str = ""
    batch_size: Count = 10
    deadline: Positive = 30.0
    max_deadline: Positive = 3600.0
    heartbeat: Positive = 10.0
    max_frame_bytes: Count = 16 * MIB
    max_body_bytes: Count = 8 * MIB
    max_in_flight: Count = 1000
    max_headers: Count = 64
    max_header_bytes: Count = 64 * 1024
    # Limits across connections: sessions at once, seconds for the WebSocket upgrade, and
    # bytes all connections together may hold in partial frames.
    max_sessions: Count = 256
    handshake_timeout: Positive = 10.0
    max_buffered_bytes: Count = 64 * MIB


class ReasonRuleConfig(Section):
    action: Literal["retry", "dead_letter"]
    backoff: Literal["exponential", "rate_limit", "reduced_scope", "none"] = "exponential"
    max_attempts: Count | None = None


class RetryConfig(Section):
    max_attempts: Count = 3
    base_delay: Positive = 1.0
    max_delay: Positive = 300.0
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2
    rate_limit_default_delay: Positive = 30.0
    tiers: list[Positive] = msgspec.field(default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0])
    reasons: dict[str, ReasonRuleConfig] = {}


class BreakerConfig(Section):
    failure_threshold: Count = 5
    open_timeout: Positive = 60.0
    max_open_timeout: Positive = 600.0
    backoff_multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    window: Positive = 60.0
    min_calls_in_window: Count = 10
    failure_ratio: Ratio = 0.5
    half_open_probes: Count = 3
    half_open_successes: Count = 2
    key_header: str = ""


class PressureConfig(Section):
    warning: Ratio = 0.7
    critical: Ratio = 0.8
    emergency: Ratio = 0.9
    hysteresis: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.05
    interval: Positive = 1.0
    # auto: the container's cgroup when it has a limit, else the agent's RSS against
    # agent_limit_bytes (or the machine's memory), else the whole machine.
    source: Literal["auto", "cgroup", "agent", "system"] = "auto"
    # The memory limit the agent's RSS is compared with when no cgroup limit is found.
    agent_limit_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0


class DepthConfig(Section):
    warning: Count = 50
    critical: Count = 200
    emergency: Count = 500
    interval: Positive = 2.0
    watch: list[QueueName] = []


class ThrottleConfig(Section):
    rate: Positive = 10.0
    burst: Positive = 20.0


class ScalingConfig(Section):
    messages_per_consumer: Count = 10
    min_consumers: Count = 1
    max_consumers: Count = 50


class StoreConfig(Section):
    url: str = "sqlite:///sidecar-dlq.sqlite3"
    spool: str = "sidecar-spool.sqlite3"
    metrics_interval: Positive = 15.0


class HttpConfig(Section):
    listen: str = "127.0.0.1:9090"


class AlertsConfig(Section):
    growth_per_minute: Positive = 100.0
    cooldown: NonNegative = 300.0
    webhook: str = ""


class DrainConfig(Section):
    grace: NonNegative = 25.0


class IdentityConfig(Section):
    host: str = msgspec.field(default_factory=socket.gethostname)


class Config(Section):
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    pressure: PressureConfig = msgspec.field(default_factory=PressureConfig)
    depth: DepthConfig = msgspec.field(default_factory=DepthConfig)
    throttle: ThrottleConfig = msgspec.field(default_factory=ThrottleConfig)
    scaling: ScalingConfig = msgspec.field(default_factory=ScalingConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    drain: DrainConfig = msgspec.field(default_factory=DrainConfig)
    identity: IdentityConfig = msgspec.field(default_factory=IdentityConfig)


SECTION_NAMES = frozenset(f.name for f in msgspec.structs.fields(Config))


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what was expected."""


def _env_value(raw: str) -> Any:
    """Environment values are TOML literals when they parse as one, else plain strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``SIDECAR_BROKER_URL=...`` -> ``{"broker": {"url": ...}}``. Variables whose second
    word is not a section (``SIDECAR_TEST_*`` and the like) are not configuration."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        match = re.fullmatch(r"SIDECAR_([A-Z]+)_([A-Z0-9_]+)", name)
        if not match or match.group(1).lower() not in SECTION_NAMES:
            continue
        out.setdefault(match.group(1).lower(), {})[match.group(2).lower()] = _env_value(raw)
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """File, then environment, then explicit overrides (command-line flags)."""
    data: dict[str, Any] = {}
    source = "environment and flags"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (TOML must be UTF-8)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    data = _merge(data, overrides or {})
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None
    _check(config, source)
    return config


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # "Object contains unknown field `x` - at `$.broker`" reads better as a dotted key.
    match = re.match(r"Object contains unknown field `(.+?)`(?: - at `\$\.?(.*)`)?", text)
    if match:
        key = ".".join(p for p in (match.group(2), match.group(1)) if p)
        return f"unknown key {key!r} (check the spelling; see the example config)"
    match = re.match(r"(.*) - at `\$\.(.*)`", text)
    if match:
        return f"key {match.group(2)!r}: {match.group(1)}"
    return text


def _check(config: Config, source: str) -> None:
    """Rules that span several keys."""
    p, d, r = config.pressure, config.depth, config.retry
    problems = []
    if not p.warning < p.critical < p.emergency:
        problems.append("pressure: expected warning < critical < emergency")
    if not d.warning < d.critical < d.emergency:
        problems.append("depth: expected warning < critical < emergency")
    if any(b <= a for a, b in zip(r.tiers, r.tiers[1:], strict=False)) or not r.tiers:
        problems.append("retry.tiers: expected a non-empty, strictly increasing list of seconds")
    if config.broker.reconnect_min > config.broker.reconnect_max:
        problems.append("broker: expected reconnect_min <= reconnect_max")
    if config.scaling.min_consumers > config.scaling.max_consumers:
        problems.append("scaling: expected min_consumers <= max_consumers")
    if not config.broker.url.startswith(("amqp://", "amqps://")):
        problems.append("broker.url: expected an amqp:// or amqps:// URL")
    for addr, key in ((config.http.listen, "http.listen"), (config.agent.tcp, "agent.tcp")):
        if addr and parse_host_port(addr) is None:
            problems.append(f"{key}: expected HOST:PORT, got {addr!r}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def parse_host_port(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def example_toml() -> str:
    """The defaults as TOML, for ``sidecar config example``."""
    lines = []
    for field in msgspec.structs.fields(Config):
        section = getattr(Config(), field.name)
        lines.append(f"[{field.name}]")
        for key, value in msgspec.structs.asdict(section).items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {_toml_literal(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return repr(value)
