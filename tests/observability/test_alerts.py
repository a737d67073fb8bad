"""The seed's alert rules as the daemon applies them, on trio's virtual clock.

``Observability`` is driven with small stand-ins for the engine, monitor, broker and store
writer, so ``refresh()`` and ``on_dead_letter()`` run exactly as in the daemon while
``trio.sleep`` moves virtual time (minutes pass instantly).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.metrics import Metrics
from sidecar.policy.breaker import BreakerConfig, BreakerState, KeyedBreakers
from sidecar.policy.failure import error_signature
from sidecar.policy.pressure import PressureLevel
from sidecar.runtime.dlq import DeadLetterWriter
from sidecar.runtime.observability import (
    DLQ_IDLE_REFRESH,
    DLQ_REFRESH,
    Observability,
    ObservabilitySettings,
)
from sidecar.store.opening import open_store
from sidecar.store.records import PatternRow
from sidecar.store.spool import SpoolingStore
from tests.helpers import make_config, until
from tests.store.contract import make_record

# --- stand-ins ---------------------------------------------------------------------------


class FakeStore:
    """Just the reads ``dlq_health`` and the alert seeding make."""

    def __init__(self, known: set[str] | None = None) -> None:
        self.size = 0
        self.known = known or set()

    def count(self) -> int:
        return self.size

    def failure_patterns(self) -> list[PatternRow]:
        now = datetime.now(UTC)
        return [PatternRow("TIMEOUT", self.size, now, now)] if self.size else []

    def oldest_newest(self) -> tuple[datetime | None, datetime | None]:
        return (None, None)

    def spooled(self) -> int:
        return 0

    def signatures(self) -> set[str]:
        return set(self.known)


class InlineWriter:
    """Runs store calls inline: no worker thread, so the autojump clock stays exact."""

    healthy = True

    async def call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


class FakeBreaker:
    def state(self, now: float) -> BreakerState:
        return BreakerState.CLOSED


@dataclass
class FakeEngine:
    breaker: FakeBreaker = field(default_factory=FakeBreaker)
    keyed: KeyedBreakers = field(default_factory=lambda: KeyedBreakers(BreakerConfig()))
    pressure: PressureLevel = PressureLevel.NORMAL


@dataclass
class FakeQueue:
    depth: int


@dataclass
class FakeMonitor:
    queues: dict[str, FakeQueue] = field(default_factory=dict)


@dataclass
class FakeBroker:
    is_connected: bool = True
    reconnects: int = 0


def make_obs(tmp_path: Path, store: Any = None, writer: Any = None, **alerts: Any) -> Observability:
    config = make_config(tmp_path, ["obs.q"], alerts=alerts)
    obs = Observability(
        ObservabilitySettings.from_config(config),
        Metrics(),
        store if store is not None else FakeStore(),
    )
    obs.bind(FakeEngine(), FakeMonitor(), FakeBroker(), writer or InlineWriter())  # type: ignore[arg-type]
    return obs


def fired(obs: Observability, name: str) -> int:
    return sum(1 for a in obs.recent_alerts if a["alert"] == name)


def alert_total(obs: Observability, name: str, severity: str) -> float:
    value = obs.metrics.registry.get_sample_value(
        "sidecar_alerts_total", {"alert": name, "severity": severity}
    )
    return value or 0.0


async def grow_dlq(obs: Observability, per_refresh: int, refreshes: int) -> None:
    """Refresh every DLQ_REFRESH virtual seconds while the DLQ grows by ``per_refresh``."""
    store: FakeStore = obs.store  # type: ignore[assignment]
    for _ in range(refreshes):
        await obs.refresh()
        store.size += per_refresh
        await trio.sleep(DLQ_REFRESH)


# --- DLQ growth --------------------------------------------------------------------------


async def test_dlq_growth_over_100_per_minute_is_critical(tmp_path, autojump_clock):
    obs = make_obs(tmp_path)
    start = trio.current_time()
    await grow_dlq(obs, per_refresh=5, refreshes=31)  # 5 per 2 s = 150/min for a minute
    assert trio.current_time() - start == pytest.approx(62)
    assert fired(obs, "CRITICAL_DLQ_GROWTH") == 1  # once: the cooldown holds the rest
    assert alert_total(obs, "CRITICAL_DLQ_GROWTH", "CRITICAL") == 1
    alert = next(a for a in obs.recent_alerts if a["alert"] == "CRITICAL_DLQ_GROWTH")
    assert alert["severity"] == "CRITICAL"
    rate = int(alert["message"].split("at ")[1].split(" messages/minute")[0])
    assert 100 < rate <= 150
    assert fired(obs, "DLQ_NOT_EMPTY") == 1


async def test_dlq_growth_under_100_per_minute_only_warns_not_empty(tmp_path, autojump_clock):
    obs = make_obs(tmp_path)
    await grow_dlq(obs, per_refresh=3, refreshes=61)  # 90/min for two minutes
    assert fired(obs, "CRITICAL_DLQ_GROWTH") == 0
    assert fired(obs, "DLQ_NOT_EMPTY") == 1
    assert obs.dlq["size"] == 180


async def test_dlq_growth_of_exactly_100_per_minute_does_not_fire(tmp_path, autojump_clock):
    obs = make_obs(tmp_path)
    store: FakeStore = obs.store  # type: ignore[assignment]
    for _ in range(21):
        await obs.refresh()
        store.size += 10
        await trio.sleep(6)  # 10 per 6 s = 100/min: the seed says "> 100"
    assert fired(obs, "CRITICAL_DLQ_GROWTH") == 0


async def test_empty_dlq_raises_nothing(tmp_path, autojump_clock):
    obs = make_obs(tmp_path)
    await grow_dlq(obs, per_refresh=0, refreshes=100)
    assert obs.recent_alerts == []


# --- cooldown ------------------------------------------------------------------------------


async def test_cooldown_holds_a_repeat_until_it_expires(tmp_path, autojump_clock):
    obs = make_obs(tmp_path, cooldown=300)
    obs.store.size = 1  # type: ignore[attr-defined]
    start = trio.current_time()
    await obs.refresh()
    assert fired(obs, "DLQ_NOT_EMPTY") == 1
    # Still not empty for almost five minutes: no second page.
    while trio.current_time() - start < 298:
        await trio.sleep(DLQ_REFRESH)
        await obs.refresh()
        assert fired(obs, "DLQ_NOT_EMPTY") == 1
    await trio.sleep(300 - (trio.current_time() - start))
    await obs.refresh()
    assert fired(obs, "DLQ_NOT_EMPTY") == 2
    assert alert_total(obs, "DLQ_NOT_EMPTY", "WARNING") == 2


async def test_growth_alert_repeats_after_cooldown_while_growth_continues(tmp_path, autojump_clock):
    obs = make_obs(tmp_path, cooldown=120)
    await grow_dlq(obs, per_refresh=10, refreshes=59)  # 300/min for ~2 minutes
    assert fired(obs, "CRITICAL_DLQ_GROWTH") == 1
    await grow_dlq(obs, per_refresh=10, refreshes=13)  # past 120 s since the first
    assert fired(obs, "CRITICAL_DLQ_GROWTH") == 2


# --- new failure pattern -------------------------------------------------------------------


def record(id: str, reason: str, error: str) -> Any:
    return make_record(
        id, failureReason=reason, errorMessage=error, signature=error_signature(reason, error)
    )


async def test_new_pattern_fires_once_per_normalised_signature(tmp_path, autojump_clock):
    obs = make_obs(tmp_path)
    obs.on_dead_letter(record("a", "TIMEOUT", "Request timed out after 5000ms"), new=True)
    assert fired(obs, "NEW_DLQ_PATTERN") == 1
    alert = obs.recent_alerts[0]
    assert alert["severity"] == "INFO"
    assert alert["labels"] == {
        "signature": "TIMEOUT:request timed out after <n>ms",
        "reason": "TIMEOUT",
    }
    await trio.sleep(3600)  # well past any cooldown: the signature itself is known now
    obs.on_dead_letter(record("b", "TIMEOUT", "Request timed out after 300ms"), new=True)
    assert fired(obs, "NEW_DLQ_PATTERN") == 1
    obs.on_dead_letter(record("c", "NETWORK_ERROR", "connect ECONNREFUSED 10.0.0.7:443"), new=True)
    assert fired(obs, "NEW_DLQ_PATTERN") == 2
    assert alert_total(obs, "NEW_DLQ_PATTERN", "INFO") == 2


async def test_updated_record_is_not_a_new_pattern(tmp_path, autojump_clock):
    obs = make_obs(tmp_path)
    obs.on_dead_letter(record("a", "TIMEOUT", "timed out"), new=False)
    assert fired(obs, "NEW_DLQ_PATTERN") == 0


async def test_patterns_already_in_the_store_are_known_at_start(tmp_path, autojump_clock):
    known = {error_signature("TIMEOUT", "Request timed out after 5000ms")}
    obs = make_obs(tmp_path, store=FakeStore(known))
    async with trio.open_nursery() as nursery:
        await nursery.start(obs.run)
        obs.on_dead_letter(record("a", "TIMEOUT", "Request timed out after 42ms"), new=True)
        assert fired(obs, "NEW_DLQ_PATTERN") == 0
        obs.on_dead_letter(record("b", "VALIDATION_FAILED", "missing field url"), new=True)
        assert fired(obs, "NEW_DLQ_PATTERN") == 1
        nursery.cancel_scope.cancel()


# --- webhook (real time: a real HTTP server in a thread) -----------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.server.received.append(  # type: ignore[attr-defined]
            (self.command, self.path, self.headers.get("content-type"), self.rfile.read(length))
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, list[tuple[str, str, str, bytes]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", server.received  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_webhook_receives_alert_json(tmp_path, webhook_server):
    url, received = webhook_server
    obs = make_obs(tmp_path, webhook=url)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(obs.run)
            obs.on_dead_letter(record("a", "TIMEOUT", "Request timed out after 5000ms"), new=True)
            await until(lambda: received)
            nursery.cancel_scope.cancel()
    method, path, content_type, body = received[0]
    assert (method, path, content_type) == ("POST", "/hook", "application/json")
    assert json.loads(body) == {
        "alert": "NEW_DLQ_PATTERN",
        "severity": "INFO",
        "message": "new dead-letter pattern: TIMEOUT:request timed out after <n>ms",
        "labels": {"signature": "TIMEOUT:request timed out after <n>ms", "reason": "TIMEOUT"},
        "host": obs.settings.host,
    }


async def test_webhook_failure_is_logged_not_raised(tmp_path, caplog):
    # A port nobody listens on: delivery fails, the daemon keeps going.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    obs = make_obs(tmp_path, webhook=f"http://127.0.0.1:{port}/hook")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(obs.run)
            obs.on_dead_letter(record("a", "TIMEOUT", "timed out"), new=True)
            await until(lambda: "alert webhook NEW_DLQ_PATTERN failed" in caplog.text)
            nursery.cancel_scope.cancel()


# --- the seed's db.metrics snapshots ---------------------------------------------------------


def real_store(tmp_path: Path) -> SpoolingStore:
    return SpoolingStore(
        open_store(f"sqlite:///{tmp_path / 'dlq.sqlite3'}"), tmp_path / "spool.sqlite3"
    )


async def test_snapshot_writes_dlq_size_and_queue_depth(tmp_path):
    store = real_store(tmp_path)
    try:
        config = make_config(tmp_path, ["obs.q"], store={"metrics_interval": 0.05})
        obs = Observability(ObservabilitySettings.from_config(config), Metrics(), store)
        writer = DeadLetterWriter(store)
        obs.bind(FakeEngine(), FakeMonitor({"obs.q": FakeQueue(7)}), FakeBroker(), writer)  # type: ignore[arg-type]
        obs.dlq = {**obs.dlq, "size": 3}
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(obs._snapshot_forever)
                await until(lambda: writer.call(store.metrics, "queue_depth"))
                nursery.cancel_scope.cancel()
        dlq = store.metrics("dlq_size")
        assert dlq, "no dlq_size snapshot written"
        assert (dlq[0].type, dlq[0].queue, dlq[0].count) == ("dlq_size", "dead_letter", 3)
        depth = store.metrics("queue_depth")
        assert (depth[0].queue, depth[0].count) == ("obs.q", 7)
    finally:
        store.close()


async def test_snapshot_skipped_under_critical_pressure(tmp_path):
    store = real_store(tmp_path)
    try:
        config = make_config(tmp_path, ["obs.q"], store={"metrics_interval": 0.02})
        obs = Observability(ObservabilitySettings.from_config(config), Metrics(), store)
        engine = FakeEngine(pressure=PressureLevel.CRITICAL)
        obs.bind(engine, FakeMonitor(), FakeBroker(), DeadLetterWriter(store))  # type: ignore[arg-type]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(obs._snapshot_forever)
                await trio.sleep(0.3)
                assert store.metrics("dlq_size") == []
                engine.pressure = PressureLevel.NORMAL
                await until(lambda: store.metrics("dlq_size"))
                nursery.cancel_scope.cancel()
    finally:
        store.close()


# --- when the store is read ------------------------------------------------------------------


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def failure_patterns(self) -> list[PatternRow]:
        self.reads += 1
        return super().failure_patterns()

    def insert_metric(self, snapshot: Any) -> None:
        pass  # the periodic db.metrics snapshot; not what these tests count


async def test_store_is_read_only_when_something_may_have_changed(tmp_path, autojump_clock):
    store = CountingStore()
    obs = make_obs(tmp_path, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(obs.run)
        await trio.sleep(DLQ_REFRESH / 2)
        assert store.reads == 1  # the first view at start
        await trio.sleep(5 * DLQ_REFRESH)
        assert store.reads == 1  # nothing written, nobody looked
        # A dead letter written: the next tick reads the store, and the gauge follows.
        store.size = 1
        obs.on_dead_letter(record("a", "TIMEOUT", "timed out"), new=True)
        await trio.sleep(DLQ_REFRESH)
        assert store.reads == 2
        assert obs.metrics.registry.get_sample_value("sidecar_dlq_size") == 1
        # Someone reads /status, the dashboard or /metrics: the next tick re-reads.
        obs.view_read()
        await trio.sleep(DLQ_REFRESH)
        assert store.reads == 3
        # Changes made from outside still show within the idle refresh.
        store.size = 0
        await trio.sleep(DLQ_IDLE_REFRESH)
        assert store.reads == 4
        assert obs.metrics.registry.get_sample_value("sidecar_dlq_size") == 0
        nursery.cancel_scope.cancel()


async def test_health_gauges_and_alerts_still_follow_every_tick(tmp_path, autojump_clock):
    store = CountingStore()
    store.size = 5
    obs = make_obs(tmp_path, store)
    broker: FakeBroker = obs.broker  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(obs.run)
        await trio.sleep(DLQ_REFRESH / 2)
        broker.is_connected = False
        broker.reconnects = 2
        await trio.sleep(DLQ_REFRESH)
        assert store.reads == 1
        assert obs.metrics.registry.get_sample_value("sidecar_broker_connected") == 0
        assert obs.metrics.registry.get_sample_value("sidecar_broker_reconnects_total") == 2
        assert fired(obs, "DLQ_NOT_EMPTY") == 1
        nursery.cancel_scope.cancel()
