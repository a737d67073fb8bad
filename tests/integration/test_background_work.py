"""Background work stays off the delivery path, and the loop-lag metric shows it.

Slow stand-ins for the memory sampler and the store's reads block their worker thread for
a long time; deliveries must keep flowing while they do. Nothing here times anything: the
tests count what arrived while a slow job was in progress.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
import trio

from sidecar.adapters.sysmon import MemorySample
from sidecar.client import open_agent
from sidecar.runtime import observability
from tests.helpers import make_config, publish_many, running_sidecar, until
from tests.observability._http import get_json, http

pytestmark = pytest.mark.integration


def sample_value(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_loop_lag_in_metrics_and_status(tmp_path, unique_queue):
    queue = unique_queue("lag")
    config = make_config(tmp_path, [queue])
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            port = sidecar.http_port
            assert port
            await until(lambda: sidecar.loop_lag.status()["samples"] >= 5)
            status = await get_json(port, "/status")
            lag = status["summary"]["loop_lag"]
            assert lag["samples"] >= 5
            assert 0.0 <= lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"]
            assert lag["interval_ms"] == 100.0
            _, _, page = await http(port, "/dashboard")
            code, _, body = await http(port, "/metrics")
    assert b'id="loop-lag"' in page and b"summary || {}).loop_lag" in page
    assert code == 200
    text = body.decode()
    assert "# TYPE sidecar_event_loop_lag_seconds histogram" in text
    count = sample_value(text, "sidecar_event_loop_lag_seconds_count")
    assert count is not None and count >= 5
    # Fine buckets: a p99 of a few milliseconds is readable.
    assert 'sidecar_event_loop_lag_seconds_bucket{le="0.001"}' in text
    assert 'sidecar_event_loop_lag_seconds_bucket{le="0.005"}' in text


async def test_depth_queries_keep_one_channel_and_survive_a_missing_queue(tmp_path, unique_queue):
    consumed, watched, missing = unique_queue("depth"), unique_queue("depth"), unique_queue("gone")
    await publish_many(watched, [b"x"] * 3)
    config = make_config(tmp_path, [consumed], depth={"interval": 3600.0})
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            broker = sidecar.broker
            assert await broker.queue_depth(watched) == (3, 0)
            channel = broker._gen.depth_channel
            assert await broker.queue_depth(watched) == (3, 0)
            assert broker._gen.depth_channel is channel  # no channel opened per query
            # A missing queue: the broker closes that channel; the next query opens another.
            assert await broker.queue_depth(missing) is None
            assert await broker.queue_depth(watched) == (3, 0)
            assert broker._gen.depth_channel is not channel
            assert await broker.queue_depth(consumed) == (0, 1)
            assert broker.is_connected


class SlowJob:
    """Blocks its worker thread ``seconds`` per call; says whether a call is in progress and
    whether two ever overlapped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.busy = False
        self.calls = 0
        self.overlapped = 0
        self._lock = threading.Lock()

    def run(self, result: Any) -> Any:
        if not self._lock.acquire(blocking=False):
            self.overlapped += 1
            self._lock.acquire()
        try:
            self.busy = True
            time.sleep(self.seconds)
            self.calls += 1
            return result
        finally:
            self.busy = False
            self._lock.release()


async def consume_counting(
    socket: str, queue: str, total: int, job: SlowJob, *, fail_every: int = 0, pace: float = 0
) -> int:
    """Take and settle ``total`` messages, resting ``pace`` seconds after each batch; return
    how many arrived while ``job`` was busy."""
    during = 0
    settled = 0
    async with open_agent(socket, agent="bg", queues=[queue]) as agent:
        while settled < total:
            batch = await agent.pull(10, wait=0.5)
            during += sum(1 for _ in batch if job.busy)
            for m in batch:
                settled += 1
                if fail_every and settled % fail_every == 0:
                    await agent.fail(m.id, "VALIDATION_FAILED", "bad field")
                else:
                    await agent.ack([m.id])
            await trio.sleep(pace)
    return during


async def test_slow_memory_sampler_does_not_hold_deliveries(tmp_path, unique_queue):
    queue = unique_queue("bg")
    total = 300
    await publish_many(queue, [b'{"n": %d}' % i for i in range(total)])
    config = make_config(tmp_path, [queue], pressure={"interval": 0.01})
    job = SlowJob(0.2)
    reading = MemorySample(
        used=75, limit=100, source="agent", agent_rss=75, sidecar_rss=1, cpu_ratio=0.5
    )

    class SlowSampler:
        def sample(self, agent_pids: list[int]) -> MemorySample:
            return job.run(reading)  # type: ignore[no-any-return]

    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            sidecar.monitor.sysmon = SlowSampler()  # type: ignore[assignment]
            during = await consume_counting(config.agent.socket, queue, total, job)
            await until(lambda: job.calls >= 2)
            metrics = sidecar.metrics
            # The moved reading still drives the gauges and the seed's pressure levels.
            await until(lambda: sidecar.monitor.level.name == "WARNING")
            assert metrics.memory_ratio._value.get() == 0.75
            assert metrics.cpu_ratio._value.get() == 0.5
            assert metrics.pressure_state.labels("warning")._value.get() == 1
            counts = dict(sidecar.engine.counts)
    assert counts["acked"] == total
    assert during > 0, "no message arrived while the sampler was reading"
    assert job.overlapped == 0


async def test_slow_store_reads_do_not_hold_deliveries(tmp_path, unique_queue, monkeypatch):
    queue = unique_queue("bg")
    total, fail_every = 200, 20
    await publish_many(queue, [b'{"n": %d}' % i for i in range(total)])
    config = make_config(tmp_path, [queue])
    job = SlowJob(0.2)
    monkeypatch.setattr(observability, "DLQ_REFRESH", 0.01)
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            failure_patterns = sidecar.store.failure_patterns
            sidecar.store.failure_patterns = (  # type: ignore[method-assign]
                lambda *a, **k: job.run(failure_patterns(*a, **k))
            )
            # Paced so the run outlasts the first store read: unpaced, 200 messages can all
            # be settled before the first dead letter's refresh has begun.
            during = await consume_counting(
                config.agent.socket, queue, total, job, fail_every=fail_every, pace=0.02
            )
            # The view still follows the store: every dead letter is counted.
            await until(lambda: sidecar.metrics.dlq_size._value.get() == total // fail_every)
            counts = dict(sidecar.engine.counts)
    assert counts["acked"] == total - total // fail_every
    assert job.calls >= 2
    assert during > 0, "no message arrived while the store was being read"
    assert job.overlapped == 0
