"""``/metrics`` after real traffic passes ``promtool check metrics`` (Prometheus' own linter)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio

from sidecar.client import open_agent
from tests.helpers import make_config, publish_many, running_sidecar, until
from tests.observability._http import http

PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMTOOL is None,
        reason="promtool not found on PATH (Debian: apt-get install prometheus)",
    ),
]


async def scrape_after_traffic(tmp_path, queue: str) -> str:
    await publish_many(queue, [b"ok-%d" % i for i in range(6)])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="lint", queues=[queue]) as agent:
                done = 0
                while done < 6:
                    for m in await agent.pull(6, wait=0.5):
                        if m.body == b"ok-0" and m.attempt == 1:
                            # one retry through a delay tier: retries, attempt histogram
                            await agent.fail(m.id, "NETWORK_ERROR", "read ECONNRESET")
                            continue
                        if m.body in (b"ok-1", b"ok-2"):
                            await agent.fail(m.id, "VALIDATION_FAILED", "missing field url")
                        else:
                            await agent.ack([m.id])
                        done += 1
            # Wait for the DLQ view (refreshed every 2 s) so labelled DLQ gauges exist too.
            await until(lambda: sidecar.obs.dlq["size"] >= 2, 0.1)
            code, _, body = await http(sidecar.http_port, "/metrics")
    assert code == 200
    return body.decode()


async def test_metrics_pass_promtool_lint(tmp_path, unique_queue):
    text = await scrape_after_traffic(tmp_path, unique_queue("lint"))
    # The labelled series the lint should see, not just the empty families.
    for series in (
        "sidecar_failures_total{",
        "sidecar_dead_lettered_total{",
        "sidecar_retries_total{",
        "sidecar_dlq_records{",
        "sidecar_processing_seconds_bucket{",
        "sidecar_retry_attempt_bucket{",
    ):
        assert series in text, series
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [PROMTOOL, "check", "metrics"],
            input=text.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    )
    problems = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 and not problems, f"promtool check metrics:\n{problems}"
