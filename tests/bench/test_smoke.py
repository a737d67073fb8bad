"""Smoke run of the benchmark runner: tiny counts, real RabbitMQ, separate processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_quick_smoke() -> None:
    out = ROOT / "bench" / "out"
    before = set(out.glob("results-2*.json")) if out.exists() else set()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "consume,failure", "--no-plots"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = sorted(set(out.glob("results-2*.json")) - before)
    assert new, proc.stdout[-3000:]
    res = json.loads(new[-1].read_text())
    assert {"meta", "consume", "failure", "targets"} <= res.keys()
    consume = res["consume"]["200"]
    for key in ("base_each", "base_multi50", "sc_b1", "sc_b10", "sc_b50", "sc_each"):
        assert consume["median_rates"][key] > 0, key
    assert consume["median_ratios"]["sc_b50_vs_each"] > 0
    # CPU-seconds per 10,000 messages, from /proc/PID/stat, next to every consume rate.
    for key in ("base_each", "base_multi50", "sc_b1", "sc_b10", "sc_b50", "sc_each"):
        assert 0 < consume["median_rates"][f"cpu_{key}"] < 1000, key
    for reason in ("NETWORK_ERROR", "VALIDATION_FAILED"):
        failure = res["failure"][reason]
        assert failure["median_rate"] > 0, reason
        assert failure["nothing_lost"], failure


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
@pytest.mark.skipif(
    not (ROOT / "proto" / "node" / "node_modules" / "ws").is_dir(),
    reason="proto/node/node_modules is missing: run `npm ci` in proto/node",
)
def test_bench_node_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.node", "--pairs", "1", "--messages", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(proc.stderr.strip().splitlines()[-1])
    for key in ("b50", "each", "run"):
        row = figures["pairs"][0][key]
        assert row["n"] == 300, (key, row)
        assert row["rate"] > 0 and 0 < row["cpu_per_10k"] < 1000, (key, row)
    assert "| **median** |" in proc.stdout
