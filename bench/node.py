"""The Node client (proto/node/agent.js) consuming through a sidecar, A/B alternated.

    python -m bench.node --pairs 3 --messages 10000 [--before OLD_AGENT_JS]

Rows, each a fresh queue of 200-byte messages and a fresh sidecar (batch size 50): the agent
pulling 50 and acking them in one frame (``b50``), one at a time through ``messages()``
(``each``, 50 pulled ahead), and ``run(handler)`` at its default batch of 10 (``run``);
with ``--before``, ``run`` of that older agent.js too (``run-before``). CPU is sidecar +
agent, CPU-seconds per 10,000 messages from /proc (the agent counts its own from its first
message to its last, as bench/agent.py does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import cpu_seconds, per_10k
from bench.scenarios import Queues, _fill, log, med

NODE_AGENT = procs.ROOT / "bench" / "node_agent.js"
NODE_MODULES = procs.ROOT / "proto" / "node" / "node_modules"


def consume_node(
    count: int, size: int, mode: str, batch: int, agent_js: Path | None = None
) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not on PATH")
    with Queues("node") as q:
        _fill(q, count, size)
        with procs.sidecar(f"sidecar-node-{mode}", batch=50, prefetch=100) as (sc, ready, _tmp):
            sc_cpu0 = cpu_seconds(sc.pid)
            env = {"NODE_PATH": str(NODE_MODULES)}  # an agent.js outside proto/node finds ws
            if agent_js is not None:
                env["BENCH_NODE_AGENT"] = str(agent_js)
            agent = procs.Proc(
                f"node-agent-{mode}",
                "",
                [mode, ready["socket"], q, str(count), str(batch)],
                env=env,
                command=[node, str(NODE_AGENT)],
            )
            r = agent.result(timeout=600)
            r["sidecar_cpu_s"] = cpu_seconds(sc.pid) - sc_cpu0
    r["cpu_per_10k"] = per_10k(r["sidecar_cpu_s"] + r["cpu_s"], r["n"])
    r["agent_cpu_per_10k"] = per_10k(r["cpu_s"], r["n"])
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.node", description=__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--before", type=Path, help="an older agent.js whose run() to measure too")
    a = ap.parse_args(argv)
    rows: list[tuple[str, str, int, Path | None]] = [
        ("b50", "consume", 50, None),
        ("each", "each", 50, None),
        ("run", "run", 10, None),
    ]
    if a.before is not None:
        rows.append(("run-before", "run", 10, a.before.resolve()))
    pairs: list[dict[str, dict[str, float]]] = []
    for i in range(a.pairs):
        pair: dict[str, dict[str, float]] = {}
        for key, mode, batch, agent_js in rows if i % 2 == 0 else rows[::-1]:
            r = consume_node(a.messages, a.size, mode, batch, agent_js)
            if not r.get("complete"):
                log(f"node {key}: INCOMPLETE {r}")
            pair[key] = {
                "n": r["n"],
                "rate": r["rate"],
                "cpu_per_10k": r["cpu_per_10k"],
                "agent_cpu_per_10k": r["agent_cpu_per_10k"],
            }
            log(
                f"node pair={i + 1} {key}: {r['rate']:.0f} msg/s, {r['cpu_per_10k']:.3f} "
                f"CPU-s/10k (agent {r['agent_cpu_per_10k']:.3f})"
            )
        pairs.append(pair)
    keys = [key for key, *_ in rows]
    print("| pair | " + " | ".join(keys) + " | " + " | ".join(f"{k}/b50" for k in keys[1:]) + " |")
    print("|---" * (1 + 2 * len(keys) - 1) + "|")
    for i, pair in enumerate(pairs, 1):
        cells = [f"{pair[k]['rate']:,.0f} ({pair[k]['cpu_per_10k']:.2f})" for k in keys]
        ratios = [f"{pair[k]['rate'] / pair['b50']['rate']:.2f}" for k in keys[1:]]
        print(f"| {i} | " + " | ".join(cells + ratios) + " |")
    medians = {k: {m: med([p[k][m] for p in pairs]) for m in ("rate", "cpu_per_10k")} for k in keys}
    ratio_medians = [med([p[k]["rate"] / p["b50"]["rate"] for p in pairs]) for k in keys[1:]]
    cells = [f"{medians[k]['rate']:,.0f} ({medians[k]['cpu_per_10k']:.2f})" for k in keys]
    print("| **median** | " + " | ".join(cells + [f"{r:.2f}" for r in ratio_medians]) + " |")
    json.dump({"pairs": pairs, "medians": medians}, sys.stderr)
    sys.stderr.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
