"""Render a results JSON as Markdown tables: ``python -m bench.report [results.json]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.procs import ROOT


def f0(v: float) -> str:
    return f"{v:,.0f}"


def f2(v: float) -> str:
    return f"{v:.2f}"


def render(res: dict[str, Any]) -> str:
    out: list[str] = []
    m = res["meta"]["machine"]
    out += [
        f"Machine: {m['nproc']} cores, {m['cpu']}, RabbitMQ {m['rabbitmq']}, Python {m['python']}",
        f"Command: `{res['meta']['command']}` ({res['meta']['seconds']:.0f} s)",
        "",
    ]
    for size, c in res.get("consume", {}).items():
        out += [
            f"### Consume, {size}-byte messages (msg/s and CPU-s per 10,000 messages)",
            "",
            "CPU: the baseline's own process; for the sidecar, sidecar + agent processes. "
            "Ratios: sidecar / multi-50 baseline (for CPU lower is better).",
            "",
        ]
        keys = ("base_each", "base_multi50", "sc_b1", "sc_b10", "sc_b50", "sc_each")
        out.append(
            "| pair | direct ack-each | direct ack x50 | sidecar b1 | sidecar b10 | "
            "sidecar b50 | sidecar 1-by-1 via messages() | b50/x50 rate | b50/x50 CPU | "
            "b1/b50 rate | 1-by-1/b50 rate |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")

        def cell(r: dict[str, float], k: str) -> str:
            if k not in r:  # results from before a variant existed
                return "-"
            cpu = r.get(f"cpu_{k}")
            return f0(r[k]) + (f" ({cpu:.2f})" if cpu is not None else "")

        rows = [(str(i), p["rates"], p["ratios"]) for i, p in enumerate(c["pairs"], 1)]
        rows.append(("**median**", c["median_rates"], c["median_ratios"]))
        for label, r, q in rows:
            out.append(
                f"| {label} | "
                + " | ".join(cell(r, k) for k in keys)
                + f" | {f2(q['sc_b50_vs_multi50'])} | {f2(q.get('cpu_sc_b50_vs_multi50', 0))} | "
                f"{f2(q.get('sc_b1_vs_b50', 0))} | {f2(q.get('sc_each_vs_b50', 0))} |"
            )
        out.append("")
    if "drain_patch" in res:
        d = res["drain_patch"]
        out += [
            f"### trio-asyncio drain patch on/off (consume, batch 50, {d['size']} B, msg/s)",
            "",
            "| patched | stock (patch disabled) | patched again | stock / patched |",
            "|---|---|---|---|",
            f"| {f0(d['patched'])} | {f0(d['stock'])} | {f0(d['patched_again'])} | "
            f"{f2(d['stock_vs_patched'])} |",
            "",
        ]
    if "latency" in res:
        out += ["### Latency, publish -> receipt (ms; sidecar path at batch 10)", ""]
        out.append(
            "| rate | pair | direct p50 | p99 | p99.9 | sidecar p50 | p99 | p99.9 | "
            "added p50 | added p99 | added p99.9 |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        shares = []
        for rate, lat in res["latency"].items():
            if "median_cpu_share" in lat:
                cs = lat["median_cpu_share"]
                ratio = lat.get("median_cpu_share_ratio", float("nan"))
                lag = lat.get("median_loop_lag", {})
                shares.append(
                    f"| {rate}/s | {cs['direct']:.1%} | {cs['sidecar']:.1%} | {f2(ratio)} | "
                    f"{f2(lag.get('p50', float('nan')))} | {f2(lag.get('p99', float('nan')))} | "
                    f"{f2(lag.get('max_le', float('nan')))} |"
                )
            rows = [(str(i), p) for i, p in enumerate(lat["pairs"], 1)]
            rows.append(("**median**", lat["median"]))
            for label, p in rows:
                d, s, a = p["direct"], p["sidecar"], p["added"]
                out.append(
                    f"| {rate}/s | {label} | {f2(d['p50'])} | {f2(d['p99'])} | {f2(d['p999'])} | "
                    f"{f2(s['p50'])} | {f2(s['p99'])} | {f2(s['p999'])} | {f2(a['p50'])} | "
                    f"{f2(a['p99'])} | {f2(a['p999'])} |"
                )
        out.append("")
        if shares:
            out += [
                "CPU share of one core during the paced run (plain ack-each consumer vs "
                "sidecar process; ratio = median of the per-pair sidecar / plain ratios), "
                "and the sidecar's event-loop lag over the paced run (ms, from its "
                "histogram; max = bound of the highest bucket reached):",
                "",
                "| rate | plain consumer | sidecar | sidecar / plain | loop lag p50 | p99 | "
                "max <= |",
                "|---|---|---|---|---|---|---|",
                *shares,
                "",
            ]
    if "publish" in res:
        out += ["### Publish with confirms (msg/s, window 256 outstanding)", ""]
        out.append(
            "| size | pair | direct | via sidecar | ratio | CPU-s/10k direct | "
            "sidecar + agent | CPU ratio |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for size, pub in res["publish"].items():
            rows = [(str(i), p) for i, p in enumerate(pub["pairs"], 1)]
            rows.append(("**median**", {**pub["median"]}))
            for label, p in rows:
                out.append(
                    f"| {size} B | {label} | {f0(p['direct'])} | {f0(p['sidecar'])} | "
                    f"{f2(p['ratio'])} | {f2(p.get('direct_cpu_per_10k', 0))} | "
                    f"{f2(p.get('sidecar_cpu_per_10k', 0))} | {f2(p.get('cpu_ratio', 0))} |"
                )
        out.append("")
    if "failure" in res:
        out += ["### Failure path (messages/s fully dead-lettered into SQLite)", ""]
        out.append("| reason | run | N | stored | deliveries | seconds | msg/s |")
        out.append("|---|---|---|---|---|---|---|")
        for reason, f in res["failure"].items():
            for i, r in enumerate(f["runs"], 1):
                out.append(
                    f"| {reason} | {i} | {r['n']} | {r['stored']} | {r['deliveries']} | "
                    f"{f2(r['elapsed'])} | {f0(r['rate'])} |"
                )
            out.append(
                f"| {reason} | **median** | | | | | **{f0(f['median_rate'])}** "
                f"(nothing lost: {f['nothing_lost']}) |"
            )
        direct = res["failure"].get("NETWORK_ERROR", {}).get("direct")
        if direct:
            out += [
                "",
                "The broker's part alone: a plain aiormq client sending every message back "
                "twice through the same tiers and acking it on the third delivery (no "
                "sidecar, agent or store), run before each NETWORK_ERROR run; sidecar "
                "CPU-s per 10,000 messages dead-lettered beside it.",
                "",
                "| run | plain aiormq msg/s | its CPU-s/10k | sidecar msg/s | sidecar CPU-s/10k |",
                "|---|---|---|---|---|",
            ]
            runs = res["failure"]["NETWORK_ERROR"]["runs"]
            for i, (d, r) in enumerate(zip(direct["runs"], runs, strict=False), 1):
                out.append(
                    f"| {i} | {f0(d['rate'])} | {f2(d['cpu_per_10k'])} | {f0(r['rate'])} | "
                    f"{f2(r.get('sidecar_cpu_per_10k', 0))} |"
                )
        out.append("")
    if "footprint" in res:
        fp = res["footprint"]
        out += [
            "### Footprint of the sidecar process",
            "",
            "| state | CPU (share of one core) | RSS (MB) |",
            "|---|---|---|",
            f"| idle, agent connected, {fp['idle']['seconds']:.0f} s | "
            f"{fp['idle']['cpu_share']:.1%} | {fp['idle']['rss_mb']:.1f} |",
            f"| {fp['load']['rate']:.0f} msg/s paced, {fp['load']['seconds']:.0f} s | "
            f"{fp['load']['cpu_share']:.1%} | peak {fp['load']['rss_peak_mb']:.1f} |",
            "",
        ]
    out += ["### Targets", "", "| target | value | goal | |", "|---|---|---|---|"]
    for t in res["targets"]:
        v = t["value"]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        out.append(f"| {t['target']} | {shown} | {t['goal']} | **{t['status']}** |")
    out.append("")
    if "profile" in res:
        pr = res["profile"]
        out += [f"### py-spy, sidecar during consume batch 50 ({pr.get('samples', 0)} samples)", ""]
        if "top_self" in pr:
            out += ["| function (file:line) | self % |", "|---|---|"]
            for row in pr["top_self"][:20]:
                out.append(f"| `{row['function']}` | {row['self_pct']:.1f} |")
        else:
            out.append(str(pr))
        out.append("")
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/out/results-latest.json"
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
