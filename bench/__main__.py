"""``python -m bench``: the sidecar hop against plain aiormq, each role its own process."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import scenarios as sc
from bench.procs import ROOT

OUT = ROOT / "bench" / "out"
PLOTS = ROOT / "bench" / "plots"
ALL = ["consume", "latency", "publish", "failure", "footprint"]


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rabbitmq": os.environ.get("BENCH_RABBITMQ_VERSION", "3.10.8"),
    }


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float, op: str, goal: float) -> None:
        ok = value >= goal if op == ">=" else value <= goal
        out.append(
            {
                "target": name,
                "value": value,
                "goal": f"{op} {goal}",
                "status": "PASS" if ok else "MISS",
            }
        )

    # The targets of issue #15, all same-run ratios (never timed tests).
    for size, c in res.get("consume", {}).items():
        r = c["median_ratios"]
        add(
            f"consume {size} B, agent batch 50 / multi-50 consumer",
            r["sc_b50_vs_multi50"],
            ">=",
            1.2,
        )
        add(
            f"consume {size} B, batch 50 CPU-s/10k (sidecar+agent) / multi-50 consumer's",
            r["cpu_sc_b50_vs_multi50"],
            "<=",
            0.6,
        )
        add(
            f"consume {size} B, agent one at a time via messages() / batch 50",
            r["sc_each_vs_b50"],
            ">=",
            0.8,
        )
    lat = res.get("latency", {}).get("500")
    if lat:
        add("added latency p50 at 500 msg/s (ms)", lat["median"]["added"]["p50"], "<=", 0.3)
    ratio = res.get("latency", {}).get("1000", {}).get("median_cpu_share_ratio")
    if ratio is not None and ratio == ratio:
        # Paired: each sidecar run against the plain consumer run just before it.
        add(
            "sidecar CPU share at 1000 msg/s / plain ack-each consumer's (same pair)",
            ratio,
            "<=",
            1.0,
        )
    for size, p in res.get("publish", {}).items():
        add(f"publish {size} B, sidecar / direct pipelined", p["median"]["ratio"], ">=", 1.0)
        add(
            f"publish {size} B, CPU-s/10k sidecar+agent / direct",
            p["median"]["cpu_ratio"],
            "<=",
            1.5,
        )
    for reason, goal in (("NETWORK_ERROR", 1000.0), ("VALIDATION_FAILED", 3000.0)):
        f = res.get("failure", {}).get(reason)
        if f:
            add(f"failure {reason}: msg/s fully dead-lettered", f["median_rate"], ">=", goal)
    fp = res.get("footprint")
    if fp:
        add("sidecar peak RSS at 1000 msg/s (MB)", fp["load"]["rss_peak_mb"], "<=", 60.0)
    for reason, f in res.get("failure", {}).items():
        out.append(
            {
                "target": f"failure {reason}: nothing lost (stored == N)",
                "value": f["nothing_lost"],
                "goal": "True",
                "status": "PASS" if f["nothing_lost"] else "MISS",
            }
        )
    return out


def profile_consume(s: sc.Settings, stamp: str) -> dict[str, Any]:
    """py-spy the sidecar during a batch-50 consume; top functions by self time."""
    raw = OUT / f"profile-{stamp}.txt"
    if not Path(sys.executable).with_name("py-spy").exists():
        return {"error": "py-spy is not installed in this environment"}
    r = sc.consume_sidecar(s.messages, s.sizes[0], 50, profile=str(raw))
    if not raw.exists():
        return {"error": "py-spy wrote nothing (ptrace not permitted?)", "rate": r["rate"]}
    self_time: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        self_time[leaf] += int(n)
        total += int(n)
    top = [{"function": f, "self_pct": 100 * n / total} for f, n in self_time.most_common(25)]
    return {"rate": r["rate"], "samples": total, "raw": str(raw.relative_to(ROOT)), "top_self": top}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--scenarios", default=",".join(ALL), help=f"comma list of {ALL}")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--sizes", default="200,8192")
    ap.add_argument("--rates", default="500,1000,2000")
    ap.add_argument("--latency-duration", type=float, default=5.0)
    ap.add_argument("--fail-messages", type=int, default=0, help="default messages/4")
    ap.add_argument("--publish-messages", type=int, default=0, help="default messages/2")
    ap.add_argument(
        "--drain-compare",
        action="store_true",
        help="also consume at batch 50 with the trio-asyncio drain patch disabled",
    )
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the sidecar during a batch-50 consume"
    )
    ap.add_argument(
        "--hop",
        choices=["trio-asyncio", "thread"],
        default="trio-asyncio",
        help="the sidecar's broker.hop (how aiormq's loop meets trio)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny counts, 1 pair: a CI smoke run")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    os.environ["BENCH_HOP"] = a.hop  # read by every sidecar the bench starts
    if a.quick:
        a.pairs, a.messages, a.sizes, a.rates = 1, 300, "200", "500"
        a.latency_duration = 1.0
    s = sc.Settings(
        pairs=a.pairs,
        messages=a.messages,
        sizes=[int(x) for x in a.sizes.split(",") if x],
        rates=[float(x) for x in a.rates.split(",") if x],
        latency_duration=a.latency_duration,
        footprint_load=2.0 if a.quick else 10.0,
        footprint_idle=1.0 if a.quick else 5.0,
        fail_messages=a.fail_messages or max(50, a.messages // 4),
        publish_messages=a.publish_messages or max(100, a.messages // 2),
    )
    chosen = [x for x in a.scenarios.split(",") if x]
    unknown = set(chosen) - set(ALL) - {"drain"}
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.time()
    res: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
            "started": stamp,
            "settings": vars(s),
            "machine": machine(),
            "quick": a.quick,
            "hop": a.hop,
        },
    }
    runners = {
        "consume": sc.run_consume,
        "latency": sc.run_latency,
        "publish": sc.run_publish,
        "failure": sc.run_failure,
        "footprint": sc.run_footprint,
    }
    for name in ALL:
        if name in chosen:
            sc.log(f"--- {name}")
            res[name] = runners[name](s)
    if a.drain_compare or "drain" in chosen:
        sc.log("--- drain patch compare")
        res["drain_patch"] = sc.run_drain_compare(s)
    res["targets"] = targets(res)
    if a.profile:
        sc.log("--- profile (py-spy, consume batch 50)")
        res["profile"] = profile_consume(s, stamp)
    res["meta"]["seconds"] = time.time() - started
    path = OUT / f"results-{stamp}.json"
    path.write_text(json.dumps(res, indent=2))
    (OUT / "results-latest.json").write_text(json.dumps(res, indent=2))
    if not a.no_plots:
        try:
            from bench.plots import plot_all

            made = plot_all(res, OUT)
            PLOTS.mkdir(parents=True, exist_ok=True)
            for png in made:
                shutil.copy(png, PLOTS / png.name)
        except ImportError as exc:
            sc.log(f"plots skipped: {exc} (pip install matplotlib)")
    for t in res["targets"]:
        v = t["value"]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        print(f"{t['status']:4}  {t['target']}: {shown} (goal {t['goal']})")
    print(f"results: {path.relative_to(ROOT)} ({res['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
