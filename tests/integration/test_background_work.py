"""Background work stays off the delivery path, and the loop-lag metric shows it.

Slow stand-ins for the memory sampler and the store's reads block their worker thread for
a long time; deliveries must keep flowing while they do. Nothing here times anything: the
tests count what arrived while a slow job was in progress.
"""

from __future__ import annotations

import re

import pytest
import trio

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
            assert lag["interval_ms"] == 50.0
            code, _, body = await http(port, "/metrics")
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
