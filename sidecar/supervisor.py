"""The supervisor: one nursery that wires the adapters to the policies, handles signals and
drains on SIGTERM (stop handing out work, let in-flight work finish within the grace
period, requeue the rest)."""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from sidecar import protocol as p
from sidecar.adapters.agent_socket import AgentServer
from sidecar.adapters.broker import Broker
from sidecar.adapters.http import HttpProviders, serve_http
from sidecar.adapters.sysmon import SystemMonitor
from sidecar.config import Config, parse_host_port, redact_url
from sidecar.core.port import Tracer
from sidecar.dlq_browser import DlqBrowser
from sidecar.metrics import Metrics
from sidecar.policies import ledger_from
from sidecar.policy.pressure import PressureLevel, degradation_actions
from sidecar.runtime.backpressure import BackpressureMonitor, PublishGate
from sidecar.runtime.dlq import DeadLetterWriter
from sidecar.runtime.engine import Engine, MetricsMeter
from sidecar.runtime.looplag import LoopLagMonitor
from sidecar.runtime.observability import Observability, ObservabilitySettings
from sidecar.runtime.session import Session
from sidecar.store.opening import open_store
from sidecar.store.spool import SpoolingStore

log = logging.getLogger("sidecar")


def _tracer_from(config: Config) -> Tracer | None:
    """The OTLP tracer when ``[tracing]`` enables it; OpenTelemetry is imported only then."""
    if not config.tracing.enabled:
        return None
    from sidecar.adapters.tracing import otlp_tracer

    log.info("tracing: spans exported to %s", redact_url(config.tracing.endpoint))
    return otlp_tracer(config.tracing, config.identity.host)


class Sidecar:
    """Everything one daemon holds; ``run`` starts it and returns after a drain."""

    def __init__(self, config: Config, *, tracer: Tracer | None = None) -> None:
        """``tracer`` replaces the one ``[tracing]`` describes (tests use an in-memory one)."""
        self.config = config
        self.tracer = tracer if tracer is not None else _tracer_from(config)
        self.metrics = Metrics()
        self.codec = p.Codec()
        self.store = SpoolingStore(open_store(config.store.url), Path(config.store.spool))
        self.broker = Broker(
            config.broker.url,
            prefetch=config.broker.prefetch,
            tiers=tuple(config.retry.tiers),
            tier_prefix=config.broker.tier_prefix,
            declare_queues=config.broker.declare_queues,
            reconnect_min=config.broker.reconnect_min,
            reconnect_max=config.broker.reconnect_max,
            heartbeat=config.broker.heartbeat,
            name=f"sidecar-{config.identity.host}",
            hop=config.broker.hop,
        )
        self.obs = Observability(
            ObservabilitySettings.from_config(config), self.metrics, self.store
        )
        self.dlq = DeadLetterWriter(self.store, on_written=self.obs.on_dead_letter)
        ledger = ledger_from(
            config, random=random.Random().random, meter=MetricsMeter(self.metrics)
        )
        self.engine = Engine(
            ledger,
            self.broker,
            self.dlq,
            self.metrics,
            on_timeout=self._notify_timeout,
            tracer=self.tracer,
        )
        self.gate = PublishGate(
            config, clock=trio.current_time, blocked=lambda: self.broker.publish_blocked
        )
        self.monitor = BackpressureMonitor(
            config,
            broker=self.broker,
            gate=self.gate,
            metrics=self.metrics,
            sysmon=SystemMonitor(
                source=config.pressure.source, agent_limit_bytes=config.pressure.agent_limit_bytes
            ),
            on_pressure=self._apply_pressure,
            alerts=self.obs,
            agent_pids=lambda: [s.pid for s in self.engine.sessions.values() if s.pid],
            consumed=lambda: self.engine.counts["acked"] + self.engine.counts["failed"],
        )
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        self.obs.bind(self.engine, self.monitor, self.broker, self.dlq, self.loop_lag)
        self.sessions: dict[int, Session] = {}
        self.http_port: int | None = None
        self.started = trio.Event()
        self.stopping = trio.Event()

    # --- wiring ------------------------------------------------------------------------

    def _apply_pressure(self, level: PressureLevel, batch: int, ratio: float) -> None:
        """A new memory pressure level: smaller batches, quieter logs, and the agents told."""
        self.engine.pressure = level
        logging.getLogger("sidecar").setLevel(
            logging.ERROR if "log_level_error" in degradation_actions(level) else logging.INFO
        )
        frame = p.Pressure(level=level.name, batch_size=batch, ratio=round(ratio, 4))
        for session in self.sessions.values():
            session.send(frame)

    def _notify_timeout(self, session_id: int, delivery_id: int, charged: bool) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.send(
                p.Error(
                    code="deadline_expired",
                    message="no answer by the deadline; charged TIMEOUT"
                    if charged
                    else "no answer by the deadline; returned uncharged",
                    ref=delivery_id,
                )
            )

    async def _serve_agent(self, ws: WebSocketConnection, conn_id: int, over_tcp: bool) -> None:
        session = Session(
            ws,
            agent=self.config.agent,
            throttle=self.config.throttle,
            host=self.config.identity.host,
            engine=self.engine,
            broker=self.broker,
            gate=self.gate,
            metrics=self.metrics,
            codec=self.codec,
            over_tcp=over_tcp,
            consume=self.broker.consume,
        )
        self.sessions[session.id] = session
        try:
            await session.serve()
        finally:
            self.sessions.pop(session.id, None)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "broker_connected": self.broker.is_connected,
            "publish_path": self.broker.publish_ok,
            "store_writable": self.dlq.healthy,
            "not_draining": not self.engine.draining,
        }
        detail: dict[str, Any] = {"ready": all(checks.values()), **checks}
        if not self.broker.is_connected and self.broker.last_error:
            detail["broker_error"] = self.broker.last_error
        if not self.dlq.healthy:
            detail["store_error"] = self.dlq.last_error
        if not self.broker.publish_ok:
            detail["publish_error"] = self.broker.publish_error
        return detail["ready"], detail

    # --- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.config
        log.info(
            "sidecar starting: broker %s, store %s, socket %s",
            redact_url(c.broker.url),
            self.store.describe(),
            c.agent.socket,
        )
        http_host, http_port = parse_host_port(c.http.listen) or ("127.0.0.1", 9090)
        agents = AgentServer(
            self._serve_agent,
            socket_path=c.agent.socket,
            socket_mode=c.agent.socket_mode,
            tcp=parse_host_port(c.agent.tcp) if c.agent.tcp else None,
            max_frame_bytes=c.agent.max_frame_bytes,
            max_sessions=c.agent.max_sessions,
            handshake_timeout=c.agent.handshake_timeout,
            max_buffered_bytes=c.agent.max_buffered_bytes,
            on_refused=lambda why: self.metrics.connections_refused.labels(why).inc(),
        )
        self.agent_server = agents
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.loop_lag.run)
                await nursery.start(self.broker.run)
                for queue in c.broker.queues:
                    await self.broker.consume(queue)
                await nursery.start(self.dlq.run)
                await nursery.start(self.engine.run)
                await nursery.start(self.monitor.run)
                await nursery.start(self.obs.run)
                binds = await nursery.start(
                    serve_http,
                    HttpProviders(
                        ready=self.ready,
                        status=self.obs.status,
                        registry=self.metrics.registry,
                        dashboard_html=self.obs.dashboard_html,
                        live=self.obs.live,
                        dlq=DlqBrowser(c, self.store, self.dlq),
                        metrics_read=self.obs.view_read,
                    ),
                    http_host,
                    http_port,
                )
                self.http_port = int(binds[0].rsplit(":", 1)[1]) if binds else None
                await nursery.start(agents.run)
                nursery.start_soon(self._signals)
                self.started.set()
                task_status.started()
                log.info("sidecar ready: http %s", binds[0] if binds else "-")
                await self.stopping.wait()
                await self.engine.drain(c.drain.grace)
                # The broker flushes the final acks and requeues as its connections close.
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.close)
                if self.tracer is not None:
                    # Exports what is still queued, bounded by the export timeout.
                    await trio.to_thread.run_sync(self.tracer.close)
        log.info("sidecar stopped: %s", self.engine.counts)

    def stop(self) -> None:
        self.stopping.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(
                    "%s: draining (grace %ss)", signal.Signals(signum).name, self.config.drain.grace
                )
                self.stop()
                return
