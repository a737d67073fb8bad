"""The fleet dashboard (deploy/grafana/sidecar-fleet.json): every panel query returns data
from a real Prometheus server (Debian's ``prometheus``) scraping two running sidecars on
loopback, with real traffic through the real RabbitMQ; and the JSON is a sound dashboard."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio

from sidecar.client import open_agent
from tests.deploy.test_manifests import METRIC_RE, exposed_sample_names
from tests.helpers import make_config, publish_many, running_sidecar, until
from tests.observability._http import http

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sidecar-fleet.json"
PROMETHEUS = shutil.which("prometheus")

# What Grafana would put in for its variables: every job, and a rate window long enough
# to hold the whole test's traffic.
VARIABLES = {"$__rate_interval": "5m", "$job": ".+"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(panel title + refId, PromQL with the variables substituted)."""
    out = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


# --- the JSON, statically


def test_dashboard_is_sound() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "job"}
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            # Every query honours the job selector, so one dashboard serves many fleets.
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])
            leftover = re.findall(r"\$\w+", target["expr"])
            assert set(leftover) <= {"$job", "$__rate_interval"}, leftover


def test_dashboard_uses_exposed_metrics() -> None:
    exposed = exposed_sample_names()
    for title, expr in queries():
        names = METRIC_RE.findall(expr)
        assert names, title
        for name in names:
            assert name in exposed, f"{title}: {name} is not exposed by sidecar.metrics"


def test_dashboard_covers_the_fleet_view() -> None:
    """DLQ size and growth per queue and reason, breakers, pressure, depth, throughput and
    latency: each has a panel whose query reads the metric that carries it."""
    text = " ".join(expr for _, expr in queries())
    for needle in (
        "sidecar_dlq_size",
        "by (reason) (sidecar_dlq_records",
        "by (queue, reason) (rate(sidecar_dead_lettered_total",
        "sidecar_circuit_breaker_state",
        "sidecar_memory_pressure_state",
        "sidecar_queue_depth_messages",
        "rate(sidecar_messages_acked_total",
        "histogram_quantile(0.95, sum by (le, queue) (rate(sidecar_processing_seconds_bucket",
    ):
        assert needle in text, needle


# --- every query against a real Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _query(port: int, expr: str) -> list[dict[str, Any]]:
    status, _, body = await http(port, f"/api/v1/query?query={quote(expr, safe='')}")
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", (expr, reply)
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def _handled(seen: list[bytes], total: int) -> bool:
    return len(seen) == total


def _has_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


async def _agent(socket_path: str, queue: str, side_queue: str, seen: list[bytes]) -> None:
    """Acks, retries once, dead-letters and publishes: every family gets samples."""
    async with open_agent(socket_path, agent="dash", version="1.0", queues=[queue]) as agent:
        published = await agent.publish(b"downstream", queue=side_queue)
        assert published.ok, published
        while True:
            for m in await agent.pull(10, wait=0.5):
                kind = m.body.split(b"-")[1]
                if kind == b"dl":
                    await agent.fail(m.id, "VALIDATION_FAILED", "missing field url")
                elif kind == b"retry" and m.attempt == 1:
                    await agent.fail(m.id, "NETWORK_ERROR", "read ECONNRESET")
                    continue
                else:
                    await agent.ack([m.id])
                seen.append(m.body)


@pytest.mark.integration
@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not on PATH (apt-get install prometheus)"
)
async def test_every_panel_query_returns_data_from_prometheus(
    tmp_path: Path, unique_queue: Any
) -> None:
    queue, side_queue = unique_queue("dash"), unique_queue("dash-out")
    configs = [make_config(tmp_path / pod, [queue]) for pod in ("pod-a", "pod-b")]
    bodies = [b"ok-%d" % i for i in range(12)]
    bodies += [b"retry-%d" % i for i in range(4)] + [b"dl-%d" % i for i in range(4)]
    seen: list[bytes] = []
    await publish_many(side_queue, [])  # declared, so the agents' publishes are routed
    with trio.fail_after(150):
        async with running_sidecar(configs[0]) as a, running_sidecar(configs[1]) as b:
            prom_port = _free_port()
            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            (prom_dir / "prometheus.yml").write_text(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: sidecar\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{a.http_port}']\n        labels: {{pod: pod-a}}\n"
                f"      - targets: ['127.0.0.1:{b.http_port}']\n        labels: {{pod: pod-b}}\n"
            )
            async with trio.open_nursery() as nursery:
                with (prom_dir / "log").open("wb") as log:
                    prometheus = partial(
                        trio.run_process,
                        [
                            str(PROMETHEUS),
                            f"--config.file={prom_dir / 'prometheus.yml'}",
                            f"--storage.tsdb.path={prom_dir / 'data'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}",
                        ],
                        stdout=log,
                        stderr=log,
                        check=False,
                    )
                    await nursery.start(prometheus)  # killed when the nursery is cancelled

                    async def up() -> bool:
                        try:
                            return len(await _query(prom_port, 'up{job="sidecar"} == 1')) == 2
                        except (OSError, json.JSONDecodeError):
                            return False  # not listening yet

                    # Scraped before the traffic, so rates and quantiles see it change.
                    await until(up, 0.25)
                    for config in configs:
                        nursery.start_soon(_agent, config.agent.socket, queue, side_queue, seen)
                    # Two waves, the second after Prometheus has stored the series the first
                    # created: a series first seen at its final value has no rate.
                    for n, wave in enumerate((b"w1-", b"w2-"), start=1):
                        await publish_many(queue, [wave + body for body in bodies])
                        await until(partial(_handled, seen, len(bodies) * n), 0.1)

                        async def scraped() -> bool:
                            expr = "sum(sidecar_processing_seconds_count)"
                            result = await _query(prom_port, expr)
                            return bool(result) and float(result[0]["value"][1]) >= len(seen)

                        await until(scraped, 0.25)
                    # Each pod's DLQ view refreshes on its own timer: wait for both to count.
                    await until(lambda: a.obs.dlq["size"] + b.obs.dlq["size"] >= 4, 0.1)
                    missing = dict(queries())
                    with trio.move_on_after(60):
                        while missing:
                            for title, expr in list(missing.items()):
                                if _has_value(await _query(prom_port, expr)):
                                    del missing[title]
                            if missing:
                                await trio.sleep(0.5)
                    assert not missing, f"panel queries without data: {missing}"
                    # Across pods: both sidecars are in the per-pod panels.
                    pods = await _query(
                        prom_port, 'min by (pod) (sidecar_broker_connected{job=~".+"})'
                    )
                    assert {r["metric"]["pod"] for r in pods} == {"pod-a", "pod-b"}
                    nursery.cancel_scope.cancel()
