"""Status views, DLQ metrics, metric snapshots and alerts.

The seed's two dashboard views ("DLQ Health" and "Backpressure Status") are built here once
and served as ``/status``, pushed to the dashboard's live WebSocket and printed by
``sidecar status``. Alerts go to the structured log and, when configured, a webhook.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio

from sidecar.config import Config
from sidecar.metrics import Metrics
from sidecar.policies import alert_config_from
from sidecar.policy.alerts import Alert, AlertConfig, AlertRules
from sidecar.policy.breaker import BreakerState
from sidecar.policy.depth import DepthLevel
from sidecar.policy.pressure import PressureLevel
from sidecar.store.base import DeadLetterStore, StoreUnavailable
from sidecar.store.records import DeadLetterRecord, MetricSnapshot

if TYPE_CHECKING:
    from sidecar.adapters.broker import Broker
    from sidecar.runtime.backpressure import BackpressureMonitor
    from sidecar.runtime.dlq import DeadLetterWriter
    from sidecar.runtime.engine import Engine
    from sidecar.runtime.looplag import LoopLagMonitor
    from sidecar.store.spool import SpoolingStore

log = logging.getLogger("sidecar.alerts")

DLQ_REFRESH = 2.0
# The store is re-read when a dead letter was written, someone read the view, the spool
# holds records or the last read failed; otherwise only this often, for changes made from
# outside (tools, other sidecars sharing the store).
DLQ_IDLE_REFRESH = 30.0
HISTORY_POINTS = 300


def dlq_health(store: DeadLetterStore, top: int = 5) -> dict[str, Any]:
    """The seed's "DLQ Health" view, read from any store (the daemon's spooling store also
    says how many records wait in its local spool)."""
    patterns = store.failure_patterns()
    oldest, newest = store.oldest_newest()
    health: dict[str, Any] = {
        # The sum of the per-reason counts read together, so the size and the per-reason
        # metrics agree even when a record lands between two queries.
        "size": sum(r.count for r in patterns),
        "top_failures": [{"reason": r.key, "count": r.count} for r in patterns[:top]],
        "by_reason": {r.key: r.count for r in patterns},
        "oldest": oldest.isoformat() if oldest else None,
        "newest": newest.isoformat() if newest else None,
    }
    spooled = getattr(store, "spooled", None)
    if spooled is not None:
        health["spooled"] = spooled()
    return health


_DEPTH_ORDER = ["normal", "warning", "critical", "emergency"]


def _depth_rank(level: str) -> int:
    return _DEPTH_ORDER.index(level) if level in _DEPTH_ORDER else -1


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _post(request: urllib.request.Request) -> None:
    urllib.request.urlopen(request, timeout=5).close()


@dataclass(frozen=True, slots=True)
class ObservabilitySettings:
    """What observability needs of the configuration, taken once at start."""

    alerts: AlertConfig
    webhook: str
    host: str
    metrics_interval: float

    @classmethod
    def from_config(cls, config: Config) -> ObservabilitySettings:
        return cls(
            alerts=alert_config_from(config),
            webhook=config.alerts.webhook,
            host=config.identity.host,
            metrics_interval=config.store.metrics_interval,
        )


class Observability:
    def __init__(
        self, settings: ObservabilitySettings, metrics: Metrics, store: SpoolingStore
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.rules = AlertRules(settings.alerts)
        self.recent_alerts: list[dict[str, Any]] = []
        self.dlq: dict[str, Any] = {"size": 0, "top_failures": [], "oldest": None, "newest": None}
        self.history: list[dict[str, Any]] = []
        self._reconnects_counted = 0
        self._reasons_exported: set[str] = set()
        self._breaker_seen: tuple[BreakerState, float | None] = (BreakerState.CLOSED, None)
        self._webhook_send, self._webhook_recv = trio.open_memory_channel[Alert](256)
        self._dlq_changed = True  # a record written (or the view read) since the last read
        self._dlq_read_at: float | None = None

    def bind(
        self,
        engine: Engine,
        monitor: BackpressureMonitor,
        broker: Broker,
        dlq: DeadLetterWriter,
        loop_lag: LoopLagMonitor | None = None,
    ) -> None:
        self.engine, self.monitor, self.broker, self.writer = engine, monitor, broker, dlq
        self.loop_lag = loop_lag

    # --- alerts --------------------------------------------------------------------------

    def on_dead_letter(self, record: DeadLetterRecord, new: bool) -> None:
        self._dlq_changed = True
        if new:
            self._emit(self.rules.observe_dead_letter(trio.current_time(), record.signature))

    def pressure_changed(self, level: PressureLevel) -> None:
        if level > PressureLevel.NORMAL:
            self._emit(self.rules.observe_pressure(trio.current_time(), level.name))

    def depth_changed(self, queue: str, level: DepthLevel) -> None:
        self._emit(self.rules.observe_depth(trio.current_time(), queue, level.name))

    def _emit(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            entry = {
                "alert": alert.name,
                "severity": str(alert.severity),
                "message": alert.message,
                "labels": dict(alert.labels),
                "at": datetime.now(UTC).isoformat(),
            }
            self.metrics.alerts.labels(alert.name, str(alert.severity)).inc()
            log.warning("ALERT %s", json.dumps(entry, sort_keys=True))
            self.recent_alerts = [entry, *self.recent_alerts[:49]]
            if self.settings.webhook:
                try:
                    self._webhook_send.send_nowait(alert)
                except trio.WouldBlock:
                    log.error("alert webhook is backed up; dropping %s", alert.name)

    async def _deliver_webhooks(self) -> None:
        url = self.settings.webhook
        async for alert in self._webhook_recv:
            body = json.dumps(
                {
                    "alert": alert.name,
                    "severity": str(alert.severity),
                    "message": alert.message,
                    "labels": dict(alert.labels),
                    "host": self.settings.host,
                }
            ).encode()
            request = urllib.request.Request(
                url, data=body, headers={"content-type": "application/json"}, method="POST"
            )
            try:
                await trio.to_thread.run_sync(_post, request)
            except OSError as exc:
                log.error("alert webhook %s failed: %s", alert.name, exc)

    # --- periodic work ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_webhooks)
            nursery.start_soon(self._snapshot_forever)
            try:
                known = await self.writer.call(self.store.signatures)
                self.rules = AlertRules(self.rules.config, known_signatures=known)
            except StoreUnavailable as exc:
                log.warning("could not read known failure patterns: %s", exc)
            task_status.started()
            while True:
                if self._dlq_read_due(trio.current_time()):
                    await self.refresh()
                else:
                    self._observe(trio.current_time())
                await trio.sleep(DLQ_REFRESH)

    def view_read(self) -> None:
        """Someone looked (status, dashboard, a scrape): the next tick re-reads the store."""
        self._dlq_changed = True

    def _dlq_read_due(self, now: float) -> bool:
        """Whether the store needs reading: the queries run on the store's one thread, where
        they hold up dead-letter writes, so they run only when they may tell something new."""
        return (
            self._dlq_changed
            or self._dlq_read_at is None
            or now - self._dlq_read_at >= DLQ_IDLE_REFRESH
            or "error" in self.dlq
            or self.dlq.get("spooled", 0) > 0
        )

    async def refresh(self) -> None:
        """Re-read the DLQ view and evaluate the DLQ alert rules."""
        self._dlq_changed = False
        try:
            self.dlq = await self.writer.call(dlq_health, self.store)
        except StoreUnavailable as exc:
            self.dlq = {**self.dlq, "error": str(exc)}
            return
        self._dlq_read_at = trio.current_time()
        self._observe(self._dlq_read_at)

    def _observe(self, now: float) -> None:
        """Export the last DLQ view and the health gauges, and evaluate the alert rules."""
        m = self.metrics
        m.dlq_size.set(self.dlq["size"])
        m.spooled.set(self.dlq.get("spooled", 0))
        by_reason: dict[str, int] = self.dlq.get("by_reason", {})
        for reason in self._reasons_exported - by_reason.keys():
            # Purged or retried away: a stale series would keep counting in sum().
            m.dlq_by_reason.remove(reason)
        for reason, count in by_reason.items():
            m.dlq_by_reason.labels(reason).set(count)
        self._reasons_exported = set(by_reason)
        m.broker_connected.set(1 if self.broker.is_connected else 0)
        lost_since = self.broker.reconnects - self._reconnects_counted
        if lost_since > 0:
            m.broker_reconnects.inc(lost_since)
            self._reconnects_counted = self.broker.reconnects
        self._emit(self.rules.observe_dlq(now, self.dlq["size"]))
        state = self.engine.breaker.state(now)
        self._emit(self.rules.observe_breaker(now, "agent", state.name))
        open_keys = self.engine.keyed.open_keys(now)
        m.breaker_open_keys.set(len(open_keys))
        for key in open_keys:
            self._emit(self.rules.observe_breaker(now, key, "OPEN"))
        self.history = [
            *self.history[-(HISTORY_POINTS - 1) :],
            {
                "t": datetime.now(UTC).isoformat(),
                "dlq": self.dlq["size"],
                "depths": {q: v.depth for q, v in self.monitor.queues.items()},
            },
        ]

    async def _snapshot_forever(self) -> None:
        """The seed's ``db.metrics`` records, so history survives restarts. Skipped under
        CRITICAL memory pressure (the seed's "disable analytics collection")."""
        while True:
            await trio.sleep(self.settings.metrics_interval)
            if self.engine.pressure >= PressureLevel.CRITICAL:
                continue
            now = datetime.now(UTC)
            snapshots = [
                MetricSnapshot(
                    type="dlq_size", queue="dead_letter", count=self.dlq["size"], timestamp=now
                )
            ]
            snapshots += [
                MetricSnapshot(type="queue_depth", queue=q, count=v.depth, timestamp=now)
                for q, v in self.monitor.queues.items()
            ]
            try:
                for snap in snapshots:
                    await self.writer.call(self.store.insert_metric, snap)
            except StoreUnavailable as exc:
                log.warning("metric snapshot not written: %s", exc)

    # --- views -----------------------------------------------------------------------------

    def _breaker_view(self) -> dict[str, Any]:
        """The agent breaker for people: state, since when, and when it next probes."""
        now = self.engine.clock()
        breaker = self.engine.breaker
        state = breaker.state(now)
        wall = datetime.now(UTC)
        if state is not self._breaker_seen[0]:
            self._breaker_seen = (state, now)
        since = self._breaker_seen[1]
        open_until = breaker.open_until()
        if state is BreakerState.OPEN and open_until is not None:
            # Exact: it opened one open-timeout before it will probe.
            since = open_until - breaker.current_open_timeout
        retry_in = breaker.retry_in(now) if state is BreakerState.OPEN else 0.0
        return {
            "state": state.value,
            "since": None if since is None else _iso(wall - timedelta(seconds=now - since)),
            "next_probe_in": round(retry_in, 3) if state is BreakerState.OPEN else None,
            "next_probe_at": _iso(wall + timedelta(seconds=retry_in))
            if state is BreakerState.OPEN
            else None,
            "trips": breaker.trips,
            "open_keys": self.engine.keyed.open_keys(now),
        }

    async def status(self) -> dict[str, Any]:
        self.view_read()
        bp = self.monitor.status()
        engine = self.engine.status()
        depth_levels = {q: v["level"] for q, v in bp["queues"].items()}
        return {
            "host": self.settings.host,
            "summary": {
                "breaker": self._breaker_view(),
                "sessions": [
                    {
                        "agent": s["agent"],
                        "version": s["version"],
                        "pid": s["pid"],
                        "held": s["in_flight"],
                    }
                    for s in engine["sessions"]
                ],
                "broker": {
                    "connected": self.broker.is_connected,
                    "generation": self.broker.generation,
                    "reconnects": self.broker.reconnects,
                    "blocked": self.broker.publish_blocked,
                },
                "pressure": {
                    "level": bp["system_pressure"],
                    "memory_ratio": (bp["memory"] or {}).get("ratio"),
                    "degradation": bp["degradation"],
                },
                "depth_levels": depth_levels,
                "depth_level": max(depth_levels.values(), key=_depth_rank, default="normal"),
                "spool": {
                    "records": self.dlq.get("spooled", 0),
                    "store_error": self.dlq.get("error"),
                    "writable": self.writer.healthy,
                },
                "draining": engine["draining"],
                "in_flight": engine["in_flight"],
                "loop_lag": self.loop_lag.status() if self.loop_lag else None,
            },
            "dlq_health": self.dlq,
            "backpressure_status": {
                "queue_depths": bp["queues"],
                "consumer_counts": {
                    q: v["consumers"] for q, v in bp["queues"].items() if q in self.broker.queues
                },
                "system_pressure": bp["system_pressure"],
                "memory": bp["memory"],
                "degradation": bp["degradation"],
                "publish": bp["publish"],
            },
            "engine": engine,
            "broker": {
                "connected": self.broker.is_connected,
                "generation": self.broker.generation,
                "reconnects": self.broker.reconnects,
                "paused": self.broker.paused,
                "blocked": self.broker.publish_blocked,
                "queues": list(self.broker.queues),
            },
            "alerts": self.recent_alerts[:10],
        }

    async def live(self) -> dict[str, Any]:
        return {**(await self.status()), "history": self.history[-120:]}

    def dashboard_html(self) -> bytes:
        return resources.files("sidecar").joinpath("dashboard.html").read_bytes()
