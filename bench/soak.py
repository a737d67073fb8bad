"""Soak: a sidecar under a steady paced load with failures mixed in, for minutes.

    .venv/bin/python -m bench.soak --minutes 10 --rate 1000

A paced publisher (plain aiormq, its own process) sends ``rate`` msg/s into a unique queue;
an agent (this process, through a sidecar process) acks most messages and fails some with
NETWORK_ERROR, RATE_LIMITED (both retried through the delay tiers) and VALIDATION_FAILED
(dead-lettered). Every ``--every`` seconds the sidecar's RSS and open file descriptors are
sampled. At the end: processed + dead-lettered must equal what was published (nothing lost),
and RSS and descriptors should be flat. Not run in CI: it takes minutes by design.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from bench import procs
from bench.scenarios import Queues, log

OUT = procs.ROOT / "bench" / "out"
PLOTS = procs.ROOT / "bench" / "plots"


async def agent_loop(socket: str, queue: str, state: dict[str, Any], stop: trio.Event) -> None:
    from sidecar.client import open_agent

    rng = random.Random(42)
    async with open_agent(socket, agent="soak", version="1", queues=[queue]) as agent:
        while not stop.is_set():
            batch = await agent.pull(20, wait=0.5)
            acks = []
            for m in batch:
                roll = rng.random()
                if roll < 0.96:
                    acks.append(m.id)
                    state["processed"].add(m.message_id)
                elif roll < 0.98:
                    await agent.fail(m.id, "NETWORK_ERROR", "read ECONNRESET")
                elif roll < 0.99:
                    await agent.fail(m.id, "RATE_LIMITED", "429", retry_after=0.1)
                else:
                    await agent.fail(m.id, "VALIDATION_FAILED", "bad job")
            if acks:
                await agent.ack(acks)


def dead_letter_ids(tmp: Path) -> set[str]:
    path = tmp / "dlq.sqlite3"
    if not path.exists():
        return set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT id FROM dead_letter")}


async def soak(minutes: float, rate: float, every: float) -> dict[str, Any]:
    duration = minutes * 60
    samples: list[dict[str, Any]] = []
    state: dict[str, Any] = {"processed": set()}
    with (
        Queues("soak") as q,
        procs.sidecar("sidecar-soak", batch=20, prefetch=200) as (sc, ready, tmp),
    ):
        sidecar = psutil.Process(sc.pid)
        publisher = procs.direct(
            "soak-paced", "paced", "--queue", q, "--rate", str(rate), "--duration", str(duration)
        )
        stop = trio.Event()
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent_loop, ready["socket"], q, state, stop)
            while publisher.p.poll() is None:
                await trio.sleep(every)
                sample = {
                    "t": round(time.monotonic() - started, 1),
                    "rss_mb": round(sidecar.memory_info().rss / 2**20, 2),
                    "open_fds": sidecar.num_fds(),
                    "processed": len(state["processed"]),
                }
                samples.append(sample)
                log(f"soak {sample}")
            sent = publisher.result(timeout=60)["sent"]
            # Let retries and the last deliveries settle.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                settled = state["processed"] | dead_letter_ids(tmp)
                if len(settled) >= sent:
                    break
                await trio.sleep(1)
            stop.set()
        dead = dead_letter_ids(tmp)
    settled = state["processed"] | dead
    rss = [s["rss_mb"] for s in samples]
    fds = [s["open_fds"] for s in samples]
    return {
        "minutes": minutes,
        "rate": rate,
        "published": sent,
        "processed": len(state["processed"]),
        "dead_lettered": len(dead),
        "lost": sent - len(settled),
        "rss_mb": {"first": rss[0], "max": max(rss), "last": rss[-1]} if rss else {},
        "open_fds": {"first": fds[0], "max": max(fds), "last": fds[-1]} if fds else {},
        "samples": samples,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in result["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s["rss_mb"] for s in result["samples"]], label="sidecar RSS (MB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax2 = ax.twinx()
    ax2.plot(t, [s["open_fds"] for s in result["samples"]], color="tab:orange", label="open fds")
    ax2.set_ylabel("open file descriptors")
    # Both axes from zero: "flat" should look flat, not be magnified into a slope.
    ax.set_ylim(bottom=0, top=max(s["rss_mb"] for s in result["samples"]) * 1.3)
    ax2.set_ylim(bottom=0, top=max(s["open_fds"] for s in result["samples"]) * 1.5)
    ax.set_title(
        f"soak: {result['rate']:g} msg/s for {result['minutes']:g} min, lost {result['lost']}"
    )
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    a = ap.parse_args(argv)
    result = trio.run(soak, a.minutes, a.rate, a.every)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"soak-{stamp}.json").write_text(json.dumps(result, indent=2))
    try:
        PLOTS.mkdir(parents=True, exist_ok=True)
        plot(result, PLOTS / "soak.png")
    except ImportError as exc:
        log(f"plot skipped: {exc}")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
