"""Prometheus metrics, one registry per daemon (tests run several daemons in one process).

Names follow Prometheus conventions: units in names, ``_total`` counters, and labels
bounded to queues, reasons, levels and states the configuration or the code fixes.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

# ``_created`` series double every counter's series for a timestamp nobody queries.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it untyped

BREAKER_STATES = ("closed", "half_open", "open")
LEVELS = ("normal", "warning", "critical", "emergency")

# Fine at the low end: a healthy loop wakes within a millisecond, and a p99 of a few
# milliseconds has to be readable from the buckets.
LOOP_LAG_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def set_state(gauge: Gauge, states: Sequence[str], current: str, *labels: str) -> None:
    """A state as labels: 1 on the current state's series, 0 on the others, so a query
    reads ``metric{state="open"} == 1`` instead of decoding a number."""
    for state in states:
        gauge.labels(*labels, state).set(1 if state == current else 0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # The standard collectors (process_* and python_*), as every Prometheus client has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # consume path
        self.delivered = Counter(
            "sidecar_messages_delivered_total",
            "Messages handed to the agent",
            ["queue"],
            registry=r,
        )
        self.acked = Counter(
            "sidecar_messages_acked_total", "Messages the agent processed", ["queue"], registry=r
        )
        self.failures = Counter(
            "sidecar_failures_total",
            "Failed attempts by reason (agent-reported, TIMEOUT and AGENT_CRASH)",
            ["queue", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "sidecar_retries_total", "Messages sent to a delay tier", ["queue", "tier"], registry=r
        )
        self.retry_attempt = Histogram(
            "sidecar_retry_attempt",
            "Attempt number at which messages were retried or dead-lettered",
            ["outcome"],
            buckets=(1, 2, 3, 4, 5, 7, 10, 20),
            registry=r,
        )
        self.dead_lettered = Counter(
            "sidecar_dead_lettered_total",
            "Messages written to the DLQ store",
            ["queue", "reason"],
            registry=r,
        )
        self.parked = Counter(
            "sidecar_parked_total",
            "Messages sent back without charging an attempt (open circuit, agent crash)",
            ["queue", "why"],
            registry=r,
        )
        self.processing_seconds = Histogram(
            "sidecar_processing_seconds",
            "Time from handing a message to the agent until its answer",
            ["queue", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stale_acks = Counter(
            "sidecar_stale_acks_total",
            "Acks for a dead broker channel generation, dropped (the broker redelivers)",
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_messages", "Messages held by agents right now", registry=r
        )
        self.buffered = Gauge(
            "sidecar_buffered_messages", "Messages received, not yet handed out", registry=r
        )
        # publish path
        self.published = Counter(
            "sidecar_publishes_total", "Agent publishes by outcome", ["outcome"], registry=r
        )
        self.throttled = Counter(
            "sidecar_throttled_publishes_total",
            "Agent publishes answered with throttled",
            ["why"],
            registry=r,
        )
        self.publish_rate = Gauge(
            "sidecar_publish_rate_limit",
            "Current publish rate limit, messages per second (0 = held)",
            registry=r,
        )
        # DLQ
        self.dlq_size = Gauge("sidecar_dlq_size", "Records in the DLQ store", registry=r)
        self.dlq_by_reason = Gauge(
            "sidecar_dlq_records", "DLQ records by failure reason", ["reason"], registry=r
        )
        self.spooled = Gauge(
            "sidecar_dlq_spooled_records",
            "DLQ records held in the local spool while the store is down",
            registry=r,
        )
        # backpressure
        self.queue_depth = Gauge(
            "sidecar_queue_depth_messages", "Messages ready in a queue", ["queue"], registry=r
        )
        self.queue_consumers = Gauge(
            "sidecar_queue_consumers", "Consumers on a queue", ["queue"], registry=r
        )
        self.queue_depth_state = Gauge(
            "sidecar_queue_depth_state",
            "Depth level of a queue: 1 on the current state (normal, warning, critical, emergency)",
            ["queue", "state"],
            registry=r,
        )
        self.producer_consumer_ratio = Gauge(
            "sidecar_producer_consumer_ratio",
            "Publish rate into a queue divided by its consume rate, over the last interval",
            ["queue"],
            registry=r,
        )
        self.recommended_consumers = Gauge(
            "sidecar_recommended_consumers",
            "Consumers the scaling rule recommends (depth / messages per consumer)",
            ["queue"],
            registry=r,
        )
        self.scaling_events = Counter(
            "sidecar_scaling_events_total",
            "Changes of the recommendation",
            ["queue", "direction"],
            registry=r,
        )
        self.memory_ratio = Gauge(
            "sidecar_memory_pressure_ratio", "Agent memory used / limit", registry=r
        )
        self.pressure_state = Gauge(
            "sidecar_memory_pressure_state",
            "Memory pressure level: 1 on the current state (normal, warning, critical, emergency)",
            ["state"],
            registry=r,
        )
        self.agent_memory_bytes = Gauge(
            "sidecar_agent_memory_bytes", "Agent resident memory", registry=r
        )
        self.cpu_ratio = Gauge(
            "sidecar_cpu_usage_ratio",
            "CPU time the sidecar process used per second over the last sample (1 = one core)",
            registry=r,
        )
        self.batch_size = Gauge(
            "sidecar_batch_size", "Largest batch handed to the agent now", registry=r
        )
        self.prefetch = Gauge("sidecar_prefetch", "Consumer prefetch in force", registry=r)
        self.breaker_state = Gauge(
            "sidecar_circuit_breaker_state",
            "Circuit breaker: 1 on the current state (closed, half_open, open)",
            ["key", "state"],
            registry=r,
        )
        self.breaker_open_keys = Gauge(
            "sidecar_circuit_breaker_open_keys",
            "Keyed breakers (for example per target host) open right now",
            registry=r,
        )
        self.breaker_trips = Counter(
            "sidecar_circuit_breaker_trips_total", "Times the breaker opened", registry=r
        )
        self.degradation_state = Gauge(
            "sidecar_degradation_state",
            "Graceful degradation applied: 1 on the current level (normal = none)",
            ["state"],
            registry=r,
        )
        # health
        self.broker_connected = Gauge(
            "sidecar_broker_connected", "1 when connected to the broker", registry=r
        )
        self.broker_reconnects = Counter(
            "sidecar_broker_reconnects_total", "Broker connections lost", registry=r
        )
        self.agents = Gauge("sidecar_agent_sessions", "Connected agent sessions", registry=r)
        self.protocol_errors = Counter(
            "sidecar_protocol_errors_total", "Frames refused, by error code", ["code"], registry=r
        )
        self.alerts = Counter(
            "sidecar_alerts_total", "Alerts raised", ["alert", "severity"], registry=r
        )
        self.connections_refused = Counter(
            "sidecar_agent_connections_refused_total",
            "Agent connections refused or cut: too many sessions, no WebSocket upgrade in "
            "time, partial frames over the shared budget, accept failures (EMFILE)",
            ["why"],
            registry=r,
        )
        self.malformed = Counter(
            "sidecar_malformed_inputs_total",
            "Broker messages dead-lettered as malformed, header values ignored or clamped, "
            "and other hostile input absorbed, by what",
            ["what"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "sidecar_event_loop_lag_seconds",
            "How late the event loop ran a periodic wake-up: time the loop was busy elsewhere",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        # Every state series exists from the start, so "== 1" queries never see a gap.
        set_state(self.breaker_state, BREAKER_STATES, "closed", "agent")
        set_state(self.pressure_state, LEVELS, "normal")
        set_state(self.degradation_state, LEVELS, "normal")
