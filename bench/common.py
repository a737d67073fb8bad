"""Small helpers shared by the roles and the runner. Imports nothing from trio or sidecar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
TIER_PREFIX = "sidecar.retry"


def emit(**fields: Any) -> None:
    """One JSON line on stdout: how every role reports to the runner."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def unique_queue(tag: str) -> str:
    return f"bench.{tag}.{uuid.uuid4().hex[:10]}"


def tier_queue_names(queue: str, tiers: list[float]) -> list[str]:
    # The daemon's own formula: sidecar.core is pure, so importing it brings in no trio.
    from sidecar.core.messages import tier_queue_name

    return [tier_queue_name(TIER_PREFIX, queue, t) for t in tiers]


def body_of(size: int, stamp_ns: int | None = None) -> bytes:
    """A body of exactly ``size`` bytes; the first 19 carry a time.time_ns() stamp if given."""
    head = b"" if stamp_ns is None else str(stamp_ns).encode().rjust(19, b"0")
    return head + b"x" * max(0, size - len(head))


def stamp_of(body: bytes) -> int:
    return int(body[:19])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(lat_ms: list[float]) -> dict[str, float]:
    # Drop the first 5% as warm-up (connection setup, first JIT-free passes, prefetch fill).
    kept = lat_ms[len(lat_ms) // 20 :]
    return {
        "n": len(kept),
        "p50": percentile(kept, 50),
        "p99": percentile(kept, 99),
        "p999": percentile(kept, 99.9),
        "max": max(kept) if kept else math.nan,
    }


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat. CPU per message stays
    meaningful on a busy shared machine, where rates do not."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def per_10k(cpu_s: float, n: int) -> float:
    return cpu_s / n * 10_000 if n > 0 else math.nan


def now() -> float:
    return time.time()
