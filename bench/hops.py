"""The two broker hops side by side: ``python -m bench.hops [--pairs 3]``.

Alternates the sidecar's ``broker.hop`` (thread, trio-asyncio, thread, ...) on the same
scenarios and reports each pair's ratio thread / trio-asyncio, so the default is chosen on
measurements from one run rather than across runs on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from bench import scenarios as sc
from bench.procs import ROOT

HOPS = ("thread", "trio-asyncio")


def one(hop: str, scenario: str, args: argparse.Namespace) -> float:
    os.environ["BENCH_HOP"] = hop
    if scenario.startswith("consume"):
        _, size, batch = scenario.split("-")
        return sc.consume_sidecar(args.messages, int(size), int(batch))["rate"]
    if scenario.startswith("latency"):
        rate = float(scenario.split("-")[1])
        return sc.latency_sidecar(rate, args.latency_duration)["p50"]
    if scenario.startswith("publish"):
        size = int(scenario.split("-")[1])
        return sc.publish_sidecar(args.messages // 2, size, 256)["rate"]
    raise ValueError(scenario)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=8000)
    ap.add_argument("--latency-duration", type=float, default=5.0)
    ap.add_argument(
        "--scenarios",
        default="consume-200-1,consume-200-50,consume-8192-50,latency-1000,latency-2000,publish-200",
    )
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    for scenario in args.scenarios.split(","):
        rows = []
        for pair in range(args.pairs):
            row = {hop: one(hop, scenario, args) for hop in HOPS}
            better = "lower" if scenario.startswith("latency") else "higher"
            row["thread_vs_trio_asyncio"] = row["thread"] / row["trio-asyncio"]
            rows.append(row)
            sc.log(f"hops {scenario} pair {pair + 1}: {row} ({better} is better)")
        results[scenario] = {
            "pairs": rows,
            "median": {k: sc.med([r[k] for r in rows]) for k in (*HOPS, "thread_vs_trio_asyncio")},
        }
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hops-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
    for scenario, r in results.items():
        m = r["median"]
        print(
            f"{scenario:18} thread {m['thread']:9.2f}  trio-asyncio {m['trio-asyncio']:9.2f}"
            f"  thread/trio-asyncio {m['thread_vs_trio_asyncio']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
