"""Backpressure: the publish gate, and the monitors that feed it and report pressure.

The gate holds one token bucket per publish target, its rate lowered by the target's depth
(the seed's adaptive formula) and held at zero while the target is at EMERGENCY depth or the
broker blocks the publishing connection. The monitors sample queue depths and memory and
turn them into levels, batch sizes, prefetch, scaling recommendations and alerts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from sidecar.adapters.sysmon import SystemMonitor
from sidecar.config import Config
from sidecar.core.port import BrokerUnavailable, QueueWatch
from sidecar.metrics import LEVELS, Metrics, set_state
from sidecar.policies import depth_thresholds_from, pressure_thresholds_from, scaling_policy_from
from sidecar.policy.depth import DepthLevel, depth_actions, depth_level
from sidecar.policy.pressure import (
    PressureLevel,
    PressureTracker,
    adjust_batch_size,
    degradation_actions,
    memory_ratio,
    prefetch_for,
)
from sidecar.policy.scaling import recommended_consumers, scaling_event
from sidecar.policy.throttle import TokenBucket, publish_rate

log = logging.getLogger("sidecar.backpressure")

MAX_TARGETS = 256  # publish targets tracked; bounded so label cardinality stays bounded
HELD_RETRY_AFTER = 1.0


class AlertSink(Protocol):
    """Where the monitor reports level changes that may raise alerts."""

    def pressure_changed(self, level: PressureLevel) -> None: ...
    def depth_changed(self, queue: str, level: DepthLevel) -> None: ...


class PublishGate:
    def __init__(self, config: Config, *, clock: Callable[[], float], blocked: Callable[[], bool]):
        self.base_rate = config.throttle.rate
        self.burst = config.throttle.burst
        self.thresholds = depth_thresholds_from(config)
        self.clock = clock
        self.blocked = blocked
        self.buckets: dict[str, TokenBucket] = {}
        self.depths: dict[str, int] = {}

    def check(self, target: str) -> tuple[float, str]:
        """(0, "") to publish now, else (seconds to wait, why)."""
        now = self.clock()
        depth = self.depths.get(target, 0)
        level = depth_level(depth, self.thresholds)
        blocked = self.blocked()
        rate = publish_rate(self.base_rate, depth, level, blocked)
        if rate == 0:
            return HELD_RETRY_AFTER, "broker_blocked" if blocked else "queue_emergency"
        bucket = self.buckets.get(target)
        if bucket is None:
            if len(self.buckets) >= MAX_TARGETS:
                self.buckets.pop(next(iter(self.buckets)))
            bucket = self.buckets[target] = TokenBucket(rate, self.burst, now)
        elif bucket.rate != rate:
            bucket.set_rate(rate, now)
        wait = bucket.try_acquire(now)
        return (wait, "rate_limited") if wait > 0 else (0.0, "")

    def current_rate(self, target: str) -> float:
        depth = self.depths.get(target, 0)
        return publish_rate(
            self.base_rate, depth, depth_level(depth, self.thresholds), self.blocked()
        )

    def queue_targets(self) -> list[str]:
        """Targets that are queues (default exchange), whose depth can be polled."""
        return [t for t in self.buckets if "/" not in t]


@dataclass
class QueueView:
    depth: int = 0
    consumers: int = 0
    level: str = "NORMAL"
    actions: tuple[str, ...] = ()
    recommended_consumers: int = 1
    producer_consumer_ratio: float | None = None
    exists: bool = True
    history: list[tuple[float, int]] = field(default_factory=list)


class BackpressureMonitor:
    """Samples depths and memory; applies levels to the gate and the broker's prefetch, and
    reports pressure changes to ``on_pressure``."""

    def __init__(
        self,
        config: Config,
        *,
        broker: QueueWatch,
        gate: PublishGate,
        metrics: Metrics,
        sysmon: SystemMonitor,
        on_pressure: Callable[[PressureLevel, int, float], None],
        alerts: AlertSink,
        agent_pids: Callable[[], list[int]],
        consumed: Callable[[], int],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``on_pressure`` applies a new level (engine, agents, logging); ``agent_pids`` are
        the connected agents' processes, ``consumed`` the messages settled so far."""
        self.config = config
        self.broker = broker
        self.level = PressureLevel.NORMAL
        self.agent_pids = agent_pids
        self.consumed = consumed
        self.gate = gate
        self.metrics = metrics
        self.sysmon = sysmon
        self.on_pressure = on_pressure
        self.alerts = alerts
        self.clock = clock
        self.tracker = PressureTracker(pressure_thresholds_from(config))
        self.scaling = scaling_policy_from(config)
        self.queues: dict[str, QueueView] = {}
        self.memory: dict[str, Any] = {}
        self._consumed_before: dict[str, tuple[float, int]] = {}
        # The reading runs in a worker thread, one at a time: /proc reads of a foreign pid
        # can block, and the loop carries deliveries meanwhile.
        self._sampling = trio.CapacityLimiter(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._every, self.config.pressure.interval, self.sample_pressure)
            nursery.start_soon(self._every, self.config.depth.interval, self.sample_depths)
            task_status.started()

    async def _every(self, interval: float, step: Callable[[], Any]) -> None:
        while True:
            await step()
            await trio.sleep(interval)

    # --- memory ----------------------------------------------------------------------------

    async def sample_pressure(self) -> None:
        pids = self.agent_pids()
        sample = await trio.to_thread.run_sync(
            self.sysmon.sample, pids, limiter=self._sampling, abandon_on_cancel=True
        )
        ratio = memory_ratio(sample.used, sample.limit)
        self.memory = {
            "ratio": round(ratio, 4),
            "used_bytes": sample.used,
            "limit_bytes": sample.limit,
            "source": sample.source,
            "agent_rss_bytes": sample.agent_rss,
            "sidecar_rss_bytes": sample.sidecar_rss,
            "sidecar_cpu_ratio": sample.cpu_ratio,
        }
        self.metrics.memory_ratio.set(ratio)
        self.metrics.agent_memory_bytes.set(sample.agent_rss)
        self.metrics.cpu_ratio.set(sample.cpu_ratio)
        changed = self.tracker.update(ratio)
        if changed is not None:
            await self.apply_pressure(changed, ratio)

    async def apply_pressure(self, level: PressureLevel, ratio: float) -> None:
        """Shrink (or restore) batches and prefetch, tell the agents, degrade as the seed
        lists."""
        self.level = level
        batch = adjust_batch_size(level, self.config.agent.batch_size)
        prefetch = prefetch_for(level, self.config.broker.prefetch, batch)
        log.warning(
            "memory pressure %s (%.0f%%): batch %d, prefetch %d",
            level.name,
            ratio * 100,
            batch,
            prefetch,
        )
        set_state(self.metrics.pressure_state, LEVELS, level.name.lower())
        self.metrics.batch_size.set(batch if level < PressureLevel.EMERGENCY else 0)
        self.metrics.prefetch.set(prefetch)
        set_state(self.metrics.degradation_state, LEVELS, level.name.lower())
        self.on_pressure(level, batch, ratio)
        self.alerts.pressure_changed(level)
        try:
            await self.broker.set_prefetch(prefetch)
        except Exception as exc:  # the broker may be away; the next connection uses it
            log.warning("could not apply prefetch %d now: %s", prefetch, exc)
        self.broker.wake()

    # --- depth -----------------------------------------------------------------------------

    def watched_queues(self) -> list[str]:
        names = [*self.broker.queues, *self.config.depth.watch, *self.gate.queue_targets()]
        return list(dict.fromkeys(names))

    async def sample_depths(self) -> None:
        if not self.broker.is_connected:
            return
        now = self.clock()
        for queue in self.watched_queues():
            try:
                result = await self.broker.queue_depth(queue)
            except BrokerUnavailable:
                return
            except Exception as exc:
                log.warning("depth of %s: %s", queue, exc)
                continue
            view = self.queues.setdefault(queue, QueueView())
            if result is None:
                view.exists = False
                continue
            depth, consumers = result
            self._observe(queue, view, depth, consumers, now)

    def _observe(self, queue: str, view: QueueView, depth: int, consumers: int, now: float) -> None:
        level = depth_level(depth, self.gate.thresholds)
        recommended = recommended_consumers(depth, self.scaling)
        event = scaling_event(view.recommended_consumers, recommended)
        if event != "steady":
            self.metrics.scaling_events.labels(queue, event).inc()
        ratio = self._producer_consumer_ratio(queue, view, depth, now)
        view.depth, view.consumers, view.exists = depth, consumers, True
        view.level, view.actions = level.name, depth_actions(level)
        view.recommended_consumers = recommended
        view.producer_consumer_ratio = ratio
        view.history = [*view.history[-119:], (now, depth)]
        self.gate.depths[queue] = depth
        m = self.metrics
        m.queue_depth.labels(queue).set(depth)
        m.queue_consumers.labels(queue).set(consumers)
        set_state(m.queue_depth_state, LEVELS, level.name.lower(), queue)
        m.recommended_consumers.labels(queue).set(recommended)
        if ratio is not None:
            m.producer_consumer_ratio.labels(queue).set(ratio)
        m.publish_rate.set(
            self.gate.base_rate
            if not self.gate.buckets
            else min(self.gate.current_rate(t) for t in self.gate.buckets)
        )
        if level > DepthLevel.NORMAL:
            self.alerts.depth_changed(queue, level)

    def _producer_consumer_ratio(
        self, queue: str, view: QueueView, depth: int, now: float
    ) -> float | None:
        """Inflow / outflow over the last interval. Outflow is what this sidecar settled;
        inflow is that plus the change in depth."""
        consumed = self.consumed()
        before = self._consumed_before.get(queue)
        self._consumed_before[queue] = (now, consumed)
        if before is None or not view.history or queue not in self.broker.queues:
            return None
        elapsed = now - before[0]
        outflow = consumed - before[1]
        if elapsed <= 0 or outflow <= 0:
            return None
        inflow = outflow + (depth - view.history[-1][1])
        return round(max(inflow, 0) / outflow, 3)

    def status(self) -> dict[str, Any]:
        level = self.level
        return {
            "queues": {
                name: {
                    "depth": v.depth,
                    "consumers": v.consumers,
                    "level": v.level.lower(),
                    "actions": list(v.actions),
                    "recommended_consumers": v.recommended_consumers,
                    "producer_consumer_ratio": v.producer_consumer_ratio,
                    "exists": v.exists,
                }
                for name, v in self.queues.items()
            },
            "system_pressure": level.name,
            "degradation": list(degradation_actions(level)),
            "memory": self.memory,
            "publish": {
                "base_rate": self.gate.base_rate,
                "blocked": self.gate.blocked(),
                "targets": {t: self.gate.current_rate(t) for t in self.gate.buckets},
            },
        }
