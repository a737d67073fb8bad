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

from sidecar.policy.retry import ReasonConfigError, ReasonDeclaration, resolve_reasons
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
    # A file holding the URL (a mounted Secret): keeps credentials out of the environment,
    # which other processes of the same user can read in /proc/<pid>/environ.
    url_file: str = ""
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
    """``[retry.reasons.NAME]``: adjusts a built-in reason, or declares a new one (with
    ``kind`` or ``like``). Unset keys come from ``like``, the built-in reason, or the kind."""

    action: Literal["retry", "dead_letter"] | None = None
    backoff: Literal["exponential", "rate_limit", "reduced_scope", "none"] | None = None
    max_attempts: Count | None = None
    like: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    kind: Literal["transient", "permanent"] | None = None
    breaker: bool | None = None


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
    # Deliveries handed out while half-open; that many successes close the breaker, one
    # counted failure reopens it.
    half_open_probes: Count = 1
    half_open_successes: Count = 1
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
    # Each agent's publishes wait in the sidecar, up to these bounds, until the token bucket
    # lets them out; only beyond them is a publish answered "throttled".
    queue: Count = 1000
    queue_bytes: Count = 16 * MIB


class ScalingConfig(Section):
    messages_per_consumer: Count = 10
    min_consumers: Count = 1
    max_consumers: Count = 50


class StoreConfig(Section):
    url: str = "sqlite:///sidecar-dlq.sqlite3"
    url_file: str = ""  # as broker.url_file
    spool: str = "sidecar-spool.sqlite3"
    metrics_interval: Positive = 15.0


class HttpConfig(Section):
    listen: str = "127.0.0.1:9090"
    # Enables retry and move of dead letters from the dashboard for whoever presents it;
    # empty keeps the HTTP port read-only.
    admin_token: str = ""


class AlertsConfig(Section):
    growth_per_minute: Positive = 100.0
    cooldown: NonNegative = 300.0
    webhook: str = ""


class DrainConfig(Section):
    grace: NonNegative = 25.0


class IdentityConfig(Section):
    host: str = msgspec.field(default_factory=socket.gethostname)


class TracingConfig(Section):
    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "sidecar"
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    timeout: Positive = 10.0
    # Headers sent with every export (a vendor's API key): from a mounted file, one
    # ``name=value`` a line, so the key stays out of the config and the environment.
    headers_file: str = ""
    headers: dict[str, str] = {}


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
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)


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
    env = env_overrides(os.environ if environ is None else environ)
    layers = [(source, data), ("environment", env), ("flags", overrides or {})]
    merged: dict[str, Any] = {}
    for where, layer in layers:
        _check_url_pairs(layer, where)
        merged = _merge(_without_shadowed(merged, layer), layer)
    merged = _octal_modes(merged)
    try:
        config = msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        origin = _origin(exc, env, overrides or {}, os.environ if environ is None else environ)
        message = f"{origin or source}: {_explain(exc)}"
        if origin and origin.startswith("environment") and re.search(r"`(array|object)`", message):
            message += (
                '; in variables, lists are TOML arrays (["a", "b"]) and maps TOML inline '
                'tables ({ KEY = { action = "retry" } })'
            )
        raise ConfigError(message) from None
    config = _read_url_files(config)
    _check(config, source)
    return config


_OCTAL = re.compile(r"(?:0o|0)?([0-7]{3,4})")


def _octal_modes(data: dict[str, Any]) -> dict[str, Any]:
    """File modes may be written as chmod does, ``"0660"`` (a TOML integer cannot have a
    leading zero, and 432 means nothing to a reader); anything else is left for the
    validation to report with the key named."""
    agent = data.get("agent")
    if isinstance(agent, dict) and isinstance(agent.get("socket_mode"), str):
        match = _OCTAL.fullmatch(agent["socket_mode"].strip())
        if match:
            data = {**data, "agent": {**agent, "socket_mode": int(match.group(1), 8)}}
    return data


_SECRET_WORDS = ("url", "token", "webhook", "password", "uri", "secret")


def _origin(
    exc: msgspec.ValidationError,
    env: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any],
    environ: Mapping[str, str],
) -> str | None:
    """The environment variable (or flag) a bad key came from, so the message points at
    what the operator must fix rather than at a file that does not hold it."""
    text = str(exc)
    match = re.match(r"Object contains unknown field `(.+?)` - at `\$\.(\w+)`", text)
    if match:
        section, key = match.group(2), match.group(1)
    else:
        match = re.search(r" - at `\$\.(\w+)\.(\w+)", text)
        if not match:
            return None
        section, key = match.group(1), match.group(2)
    if key in (overrides.get(section) or {}):
        return "command-line flag"
    if key not in (env.get(section) or {}):
        return None
    name = f"SIDECAR_{section.upper()}_{key.upper()}"
    raw = environ.get(name)
    if raw is None or any(word in key for word in _SECRET_WORDS):
        return f"environment variable {name}"
    shown = raw if len(raw) <= 40 else raw[:39] + "…"
    return f"environment variable {name}={shown!r}"


_URL_SECTIONS = ("broker", "store")


def _sets(keys: Mapping[str, Any], key: str) -> bool:
    """An empty url_file (as ``config example`` prints it) means "no file"."""
    return key in keys and (key != "url_file" or bool(keys[key]))


def _check_url_pairs(layer: Mapping[str, Any], where: str) -> None:
    for section in _URL_SECTIONS:
        keys = layer.get(section)
        if isinstance(keys, Mapping) and _sets(keys, "url") and _sets(keys, "url_file"):
            raise ConfigError(f"{where}: set {section}.url or {section}.url_file, not both")


def _without_shadowed(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """A later layer's url replaces an earlier url_file and the other way round, so a
    ``--store`` flag wins over a mounted file named in the config, as any key would."""
    out = dict(base)
    for section in _URL_SECTIONS:
        keys, given = out.get(section), layer.get(section)
        if isinstance(keys, dict) and isinstance(given, Mapping):
            for key, other in (("url", "url_file"), ("url_file", "url")):
                if _sets(given, key) and other in keys:
                    out[section] = {k: v for k, v in keys.items() if k != other}
                    keys = out[section]
    return out


# Enough for any URL; stops a misconfigured path (a log, a device) from being read whole.
_MAX_URL_FILE_BYTES = 64 * 1024


def read_secret_file(path: str, key: str) -> str:
    """The stripped first line of a mounted secret file, or a one-line ConfigError."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_URL_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_URL_FILE_BYTES:
        raise ConfigError(f"{key}: {path!r} is larger than {_MAX_URL_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path!r} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{key}: {path!r} is empty")
    if len(lines) > 1:
        raise ConfigError(f"{key}: {path!r} holds {len(lines)} lines; expected one URL")
    return lines[0]


def _read_url_files(config: Config) -> Config:
    broker, store = config.broker, config.store
    if broker.url_file:
        url = read_secret_file(broker.url_file, "broker.url_file")
        broker = msgspec.structs.replace(broker, url=url)
    if store.url_file:
        url = read_secret_file(store.url_file, "store.url_file")
        store = msgspec.structs.replace(store, url=url)
    tracing = config.tracing
    if tracing.headers_file:
        headers = {**tracing.headers, **read_header_file(tracing.headers_file)}
        tracing = msgspec.structs.replace(tracing, headers=headers)
    return msgspec.structs.replace(config, broker=broker, store=store, tracing=tracing)


# An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")


def read_header_file(path: str) -> dict[str, str]:
    """``name=value`` lines of a mounted file (blank lines and ``#`` comments skipped)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_URL_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"tracing.headers_file: cannot read {path!r}: {exc.strerror or exc}"
        ) from None
    if len(raw) > _MAX_URL_FILE_BYTES:
        raise ConfigError(
            f"tracing.headers_file: {path!r} is larger than {_MAX_URL_FILE_BYTES} bytes"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"tracing.headers_file: {path!r} is not UTF-8 text") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not _HEADER_NAME.fullmatch(name.strip()):
            raise ConfigError(f"tracing.headers_file: {path!r} line {number}: expected name=value")
        headers[name.strip()] = value.strip()
    return headers


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
    problems += _reason_problems(config)
    if config.breaker.half_open_successes > config.breaker.half_open_probes:
        problems.append(
            "breaker.half_open_successes: expected at most breaker.half_open_probes,"
            " or the breaker never closes"
        )
    problems += _tracing_problems(config.tracing)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _tracing_problems(tracing: TracingConfig) -> list[str]:
    problems = []
    if not tracing.endpoint.startswith(("http://", "https://")):
        problems.append("tracing.endpoint: expected an http:// or https:// URL (OTLP/HTTP)")
    for name, value in tracing.headers.items():
        if not _HEADER_NAME.fullmatch(name) or any(c in value for c in "\r\n\0"):
            problems.append(f"tracing.headers: {name!r} is not a valid header")
    if not tracing.service_name.strip():
        problems.append("tracing.service_name: expected a name")
    return problems


def _reason_problems(config: Config) -> list[str]:
    """``[retry.reasons]`` tables that could never apply, named by key."""
    try:
        resolve_reasons(reason_declarations(config))
    except ReasonConfigError as exc:
        key = ".".join(k for k in ("retry.reasons", exc.key) if k)
        return [f"{key}: {exc.detail}"]
    return []


def reason_declarations(config: Config) -> dict[str, ReasonDeclaration]:
    """The ``[retry.reasons]`` tables as the retry policy's declarations."""
    return {
        name: ReasonDeclaration(
            action=rule.action,
            backoff=rule.backoff,
            max_attempts=rule.max_attempts,
            like=rule.like,
            kind=rule.kind,
            breaker=rule.breaker,
        )
        for name, rule in config.retry.reasons.items()
    }


def parse_host_port(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


_SECTION_NOTES: dict[str, str] = {
    "broker": "RabbitMQ: where to connect and which queues this sidecar consumes.",
    "agent": "The local agent connection (Unix socket, WebSocket frames) and its limits.",
    "retry": "Retries with backoff through fixed-TTL delay queues, then the DLQ.",
    "breaker": "Circuit breaker: stop pulling work while the agent keeps failing.",
    "pressure": "Memory pressure levels (fractions of the limit) that shrink batches.",
    "depth": "Queue depth levels (messages) that slow producers down.",
    "throttle": "Token bucket for the agent's publishes.",
    "scaling": "Recommended consumers = depth / messages_per_consumer, clamped.",
    "store": "The dead-letter store and the local spool used while it is down.",
    "http": "Health, metrics, status and dashboard listener.",
    "alerts": "Alert rules and an optional webhook.",
    "drain": "Graceful shutdown on SIGTERM.",
    "identity": "How this sidecar names itself in records, metrics and alerts.",
    "tracing": "OpenTelemetry spans per message, exported over OTLP/HTTP (off by default).",
}

_KEY_NOTES: dict[str, str] = {
    "broker.url": "amqp:// or amqps:// URL (credentials here are never logged)",
    "broker.queues": 'queues to consume, e.g. ["url.to_scrape"]',
    "broker.prefetch": "unacked messages the broker may hand this consumer at once",
    "broker.declare_queues": "declare the consumed queues (durable) if missing",
    "broker.reconnect_min": "seconds before the first reconnect attempt",
    "broker.reconnect_max": "longest wait between reconnect attempts, seconds",
    "broker.heartbeat": "AMQP heartbeat, seconds (0 = off)",
    "broker.tier_prefix": "name prefix of the delay queues",
    "broker.hop": '"trio-asyncio" (same thread) or "thread"',
    "agent.socket": "Unix socket the agent connects to",
    "agent.socket_mode": 'file mode of the socket, octal as chmod takes it ("0660")',
    "agent.tcp": 'optional HOST:PORT listener beside the socket ("" = off)',
    "agent.token": "shared secret the agent must present (required over tcp)",
    "agent.batch_size": "largest batch handed to the agent",
    "agent.deadline": "seconds an agent may hold a message before TIMEOUT",
    "agent.max_deadline": "longest deadline an agent may ask for, seconds",
    "agent.heartbeat": "seconds between pings to the agent",
    "agent.max_frame_bytes": "largest frame accepted from the agent",
    "agent.max_body_bytes": "largest message body the agent may publish",
    "agent.max_in_flight": "most messages one agent may hold",
    "agent.max_headers": "most headers on a published message",
    "agent.max_header_bytes": "largest encoded headers on a published message",
    "agent.max_sessions": "most agent connections at once (more are refused and counted)",
    "agent.handshake_timeout": "seconds a new connection has to finish its WebSocket upgrade",
    "agent.max_buffered_bytes": "bytes of partial frames held across all agent connections",
    "retry.max_attempts": "attempts before a message is dead-lettered",
    "retry.base_delay": "first retry delay, seconds",
    "retry.max_delay": "longest retry delay, seconds",
    "retry.multiplier": "delay growth per attempt",
    "retry.jitter": "random fraction taken off each delay (0..1)",
    "retry.rate_limit_default_delay": "RATE_LIMITED delay when the agent gives no retry_after",
    "retry.tiers": "delay queue TTLs, seconds, strictly increasing",
    "breaker.failure_threshold": "consecutive failures that open it",
    "breaker.open_timeout": "seconds open before the first probe",
    "breaker.max_open_timeout": "longest open time after repeated trips, seconds",
    "breaker.backoff_multiplier": "open time growth per re-trip",
    "breaker.window": "sliding window for the failure ratio, seconds",
    "breaker.min_calls_in_window": "calls needed before the ratio counts",
    "breaker.failure_ratio": "failure share in the window that opens it",
    "breaker.half_open_probes": "messages let through while half-open",
    "breaker.half_open_successes": "successful probes that close it",
    "breaker.key_header": 'header naming a per-target breaker key ("" = one breaker)',
    "pressure.warning": "memory used / limit at which prefetch and batches shrink",
    "pressure.critical": "level at which analytics collection pauses too",
    "pressure.emergency": "level at which non-essential features stop too",
    "pressure.hysteresis": "margin below a level before it is left",
    "pressure.interval": "seconds between memory samples",
    "pressure.source": '"auto", "cgroup", "agent" or "system"',
    "pressure.agent_limit_bytes": "limit for the agent's RSS without a cgroup (0 = machine)",
    "depth.warning": "ready messages for the warning level (publishes slowed)",
    "depth.critical": "ready messages for the critical level",
    "depth.emergency": "ready messages for the emergency level",
    "depth.interval": "seconds between depth checks",
    "depth.watch": "further queues to watch (publish targets)",
    "throttle.rate": "publishes per second",
    "throttle.burst": "publishes allowed at once",
    "throttle.queue": "publishes each agent may have waiting in the sidecar",
    "throttle.queue_bytes": "bytes of publishes each agent may have waiting",
    "scaling.messages_per_consumer": "ready messages one consumer is expected to handle",
    "scaling.min_consumers": "never recommend fewer",
    "scaling.max_consumers": "never recommend more",
    "store.url": "sqlite:///relative.db, sqlite:////absolute.db or mongodb://...",
    "broker.url_file": "file holding the broker URL (a mounted secret); replaces url",
    "store.url_file": "file holding the store URL (a mounted secret); replaces url",
    "store.spool": "local SQLite file holding dead letters while the store is down",
    "store.metrics_interval": "seconds between metric snapshots in the store",
    "http.listen": "HOST:PORT; sidecar status --config reads it too",
    "http.admin_token": 'enables dashboard retry/move for this bearer token ("" = read-only)',
    "alerts.growth_per_minute": "DLQ growth per minute that is critical",
    "alerts.cooldown": "seconds before the same alert fires again",
    "alerts.webhook": 'URL that receives alerts as JSON ("" = log only)',
    "drain.grace": "seconds in-flight work gets on SIGTERM before it is requeued",
    "identity.host": "defaults to this machine's hostname",
    "tracing.enabled": "export spans (needs the otel extra: pip install 'sidecar[otel]')",
    "tracing.endpoint": "OTLP/HTTP traces URL of the collector",
    "tracing.service_name": "service.name of the spans",
    "tracing.sample_ratio": "share of new traces sampled (0..1); a publisher's choice wins",
    "tracing.timeout": "seconds an export may take",
    "tracing.headers_file": "file of name=value lines sent as export headers (an API key)",
}

_REASON_EXAMPLE = """\
# Per-reason rules override the defaults above; the key is the failure reason. Example:
# [retry.reasons.RATE_LIMITED]
# action = "retry"          # "retry" or "dead_letter"
# backoff = "rate_limit"    # "exponential", "rate_limit", "reduced_scope" or "none"
# max_attempts = 10         # optional; default retry.max_attempts
"""


def example_toml() -> str:
    """Every key with its default and a comment, as TOML, for ``sidecar config example``.

    Environment variables override any key as ``SIDECAR_<SECTION>_<KEY>``; their values are
    TOML literals, so lists are written ``["a", "b"]`` and maps as inline tables.
    """
    lines = [
        "# sidecar configuration: every key with its default.",
        "# Override any key with SIDECAR_<SECTION>_<KEY>, e.g. SIDECAR_BROKER_URL=amqp://...;",
        '# variable values are TOML literals: lists as \'["a", "b"]\', maps as inline',
        "# tables: SIDECAR_RETRY_REASONS='{ PARSE_ERROR = { action = \"dead_letter\" } }'.",
        "",
    ]
    for field in msgspec.structs.fields(Config):
        section = getattr(Config(), field.name)
        lines.append(f"# {_SECTION_NOTES.get(field.name, '')}".rstrip())
        lines.append(f"[{field.name}]")
        for key, value in msgspec.structs.asdict(section).items():
            if isinstance(value, dict):
                continue
            literal = f'"{value:04o}"' if key.endswith("_mode") else _toml_literal(value)
            note = _KEY_NOTES.get(f"{field.name}.{key}")
            lines.append(f"{key} = {literal}" + (f"  # {note}" if note else ""))
        if field.name == "retry":
            lines.append(_REASON_EXAMPLE.rstrip("\n"))
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
