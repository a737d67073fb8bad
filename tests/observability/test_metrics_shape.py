"""The shape of ``/metrics``: no ``_created`` series, the standard collectors, states as
labels, the sidecar's own CPU as a ratio, a DLQ size that agrees with its per-reason series,
and OpenMetrics when the scraper asks for it."""

from __future__ import annotations

import re

import pytest
import trio

from sidecar.client import open_agent
from sidecar.store.opening import open_store
from sidecar.store.records import RecordFilter
from tests.helpers import make_config, publish_many, running_sidecar, until
from tests.observability._http import http
from tests.observability.test_alerts import make_obs
from tests.store.contract import make_record

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def value(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def family_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


@pytest.mark.integration
async def test_metrics_shape_after_traffic(tmp_path, unique_queue):
    queue = unique_queue("shape")
    await publish_many(queue, [b"m-%d" % i for i in range(5)])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            port = sidecar.http_port
            async with open_agent(config.agent.socket, agent="shape", queues=[queue]) as agent:
                done = 0
                while done < 5:
                    for m in await agent.pull(5, wait=0.5):
                        if m.body in (b"m-0", b"m-1"):
                            await agent.fail(m.id, "VALIDATION_FAILED", "missing field")
                        elif m.body == b"m-2":
                            await agent.fail(m.id, "UNRECOVERABLE", "bad html")
                        else:
                            await agent.ack([m.id])
                        done += 1

            async def scraped() -> str:
                _, _, body = await http(port, "/metrics")
                return body.decode()

            async def ready() -> bool:
                text = await scraped()
                return (
                    value(text, "sidecar_dlq_size") == 3.0
                    and f'sidecar_queue_depth_state{{queue="{queue}"' in text
                    and "sidecar_cpu_usage_ratio " in text
                )

            await until(ready, 0.1)
            text = await scraped()
            assert sidecar.store.count(RecordFilter()) == 3

            code, headers, body = await http(port, "/metrics", headers={"Accept": OPENMETRICS})
    assert "_created" not in text
    for standard in ("process_resident_memory_bytes ", "process_cpu_seconds_total ",
                     "python_info{", "python_gc_objects_collected_total{"):  # fmt: skip
        assert standard in text, standard
    for gone in ("sidecar_cpu_percent", "sidecar_failures_by_host_total",
                 "sidecar_process_resident_memory_bytes", "sidecar_memory_pressure_level",
                 "sidecar_queue_depth_level", "sidecar_degradation_level"):  # fmt: skip
        assert gone not in text, gone
    assert value(text, 'sidecar_circuit_breaker_state{key="agent",state="closed"}') == 1.0
    assert value(text, 'sidecar_circuit_breaker_state{key="agent",state="open"}') == 0.0
    assert value(text, 'sidecar_memory_pressure_state{state="normal"}') == 1.0
    assert family_sum(text, "sidecar_memory_pressure_state") == 1.0
    assert value(text, f'sidecar_queue_depth_state{{queue="{queue}",state="normal"}}') == 1.0
    assert value(text, 'sidecar_degradation_state{state="normal"}') == 1.0
    cpu = value(text, "sidecar_cpu_usage_ratio")
    assert cpu is not None and cpu >= 0
    assert family_sum(text, "sidecar_dlq_records") == value(text, "sidecar_dlq_size") == 3.0
    assert value(text, 'sidecar_dlq_records{reason="VALIDATION_FAILED"}') == 2.0

    assert code == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")
    assert "_created" not in body.decode()


async def test_dlq_records_drop_reasons_no_longer_in_the_store(tmp_path, autojump_clock):
    store = open_store(f"sqlite:///{tmp_path / 'dlq.sqlite3'}")
    try:
        store.put(make_record("a", failureReason="TIMEOUT"))
        store.put(make_record("b", failureReason="PARSE_ERROR"))
        for n in range(7):  # more reasons than the top-5 view shows
            store.put(make_record(f"r{n}", failureReason=f"REASON_{n}"))
        obs = make_obs(tmp_path, store=store)
        await obs.refresh()
        registry = obs.metrics.registry
        reasons = {
            s.labels["reason"]
            for metric in registry.collect()
            if metric.name == "sidecar_dlq_records"
            for s in metric.samples
        }
        assert len(reasons) == 9
        store.delete(RecordFilter(reason="PARSE_ERROR"))
        await obs.refresh()
        assert registry.get_sample_value("sidecar_dlq_records", {"reason": "PARSE_ERROR"}) is None
        total = sum(
            s.value
            for metric in registry.collect()
            if metric.name == "sidecar_dlq_records"
            for s in metric.samples
        )
        assert total == registry.get_sample_value("sidecar_dlq_size") == 8
    finally:
        store.close()
