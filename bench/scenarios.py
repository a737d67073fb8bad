"""The five scenarios. Each returns a JSON-able dict; rates are msg/s, latencies ms."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import procs
from bench.common import cpu_seconds, per_10k, tier_queue_names, unique_queue


@dataclass
class Settings:
    pairs: int
    messages: int
    sizes: list[int]
    rates: list[float]
    latency_duration: float
    footprint_load: float
    footprint_idle: float
    fail_messages: int
    publish_messages: int
    window: int = 256


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Queues:
    """Unique queues (and their sidecar retry tiers), deleted on exit."""

    def __init__(self, tag: str, *, tiers: bool = True) -> None:
        self.name = unique_queue(tag)
        self.tiers = tiers

    def __enter__(self) -> str:
        procs.direct_run("declare", "--queues", self.name)
        return self.name

    def __exit__(self, *exc: object) -> None:
        names = [self.name, *(tier_queue_names(self.name, procs.TIERS) if self.tiers else [])]
        procs.direct_run("delete", "--queues", ",".join(names))


def _fill(queue: str, count: int, size: int) -> None:
    r = procs.direct_run("fill", "--queue", queue, "--count", str(count), "--size", str(size))
    if r["depth"] < count:
        raise procs.RoleError(f"fill of {queue}: depth {r['depth']} < {count}")


def consume_direct(count: int, size: int, ack: str) -> dict[str, Any]:
    with Queues("consume", tiers=False) as q:
        _fill(q, count, size)
        r = procs.direct_run(
            "consume", "--queue", q, "--count", str(count), "--ack", ack, timeout=600
        )
    r["cpu_per_10k"] = per_10k(r.get("cpu_s", float("nan")), r["n"])
    return r


def consume_sidecar(
    count: int,
    size: int,
    batch: int,
    *,
    drain_patch: bool = True,
    profile: str | None = None,
    one_by_one: bool = False,
) -> dict[str, Any]:
    """The agent pulls ``batch`` and acks them in one frame, or (``one_by_one``) takes
    one message at a time through the client's ``messages()``, which pulls ``batch`` ahead."""
    prefetch = max(100, 2 * batch)
    with Queues("consume") as q:
        _fill(q, count, size)
        with procs.sidecar(
            f"sidecar-consume-b{batch}", batch=batch, prefetch=prefetch, drain_patch=drain_patch
        ) as (sc, ready, _tmp):
            spy = None
            if profile:
                import subprocess

                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "--pid",
                        str(sc.pid),
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "-o",
                        profile,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            sc_cpu0 = cpu_seconds(sc.pid)
            ag = procs.agent(
                f"agent-consume-{'each' if one_by_one else 'b'}{batch}",
                "consume-each" if one_by_one else "consume",
                ready["socket"],
                "--queue",
                q,
                "--count",
                str(count),
                "--batch",
                str(batch),
            )
            r = ag.result(timeout=600)
            r["sidecar_cpu_s"] = cpu_seconds(sc.pid) - sc_cpu0
            if spy is not None:
                import signal

                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
    r["batch"] = batch
    r["drain_patch"] = drain_patch
    r["agent_cpu_s"] = r.get("cpu_s", float("nan"))
    r["cpu_per_10k"] = per_10k(r["sidecar_cpu_s"] + r["agent_cpu_s"], r["n"])
    r["sidecar_cpu_per_10k"] = per_10k(r["sidecar_cpu_s"], r["n"])
    return r


def run_consume(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in s.sizes:
        pairs = []
        for i in range(s.pairs):
            row: dict[str, float] = {}
            # A B A B: baseline, sidecar, baseline, sidecar; then batch 50 and one at a
            # time, in turn first (they are compared with each other).
            last_two = [("sc_b50", "sidecar", 50), ("sc_each", "sidecar-each", 50)]
            for key, kind, arg in (
                ("base_each", "direct", "each"),
                ("sc_b1", "sidecar", 1),
                ("base_multi50", "direct", "multi50"),
                ("sc_b10", "sidecar", 10),
                *(last_two if i % 2 == 0 else last_two[::-1]),
            ):
                if kind == "direct":
                    r = consume_direct(s.messages, size, str(arg))
                else:
                    r = consume_sidecar(
                        s.messages, size, int(arg), one_by_one=kind == "sidecar-each"
                    )
                if not r.get("complete"):
                    log(f"consume {key} size {size}: INCOMPLETE {r}")
                row[key] = r["rate"]
                row[f"cpu_{key}"] = r["cpu_per_10k"]
                log(
                    f"consume size={size} pair={i + 1} {key}: {r['rate']:.0f} msg/s, "
                    f"{r['cpu_per_10k']:.3f} CPU-s/10k"
                    + (
                        f" (sidecar {r['sidecar_cpu_per_10k']:.3f})"
                        if "sidecar_cpu_per_10k" in r
                        else ""
                    )
                )
            ratios = (
                {f"{b}_vs_each": row[b] / row["base_each"] for b in ("sc_b1", "sc_b10", "sc_b50")}
                | {
                    f"{b}_vs_multi50": row[b] / row["base_multi50"]
                    for b in ("sc_b1", "sc_b10", "sc_b50")
                }
                | {
                    f"cpu_{b}_vs_multi50": row[f"cpu_{b}"] / row["cpu_base_multi50"]
                    for b in ("sc_b1", "sc_b10", "sc_b50")
                }
                | {"sc_b1_vs_b50": row["sc_b1"] / row["sc_b50"]}
                | {"sc_each_vs_b50": row["sc_each"] / row["sc_b50"]}
                | {"cpu_sc_each_vs_b50": row["cpu_sc_each"] / row["cpu_sc_b50"]}
            )
            pairs.append({"rates": row, "ratios": ratios})
        out[str(size)] = {
            "pairs": pairs,
            "median_rates": {k: med([p["rates"][k] for p in pairs]) for k in pairs[0]["rates"]},
            "median_ratios": {k: med([p["ratios"][k] for p in pairs]) for k in pairs[0]["ratios"]},
        }
    return out


def run_drain_compare(s: Settings) -> dict[str, Any]:
    """Consume at batch 50 on the trio-asyncio hop, with the drained loop and stock."""
    size = s.sizes[0]
    row = {}
    hop = os.environ.get("BENCH_HOP")
    os.environ["BENCH_HOP"] = "trio-asyncio"  # the patch only exists on this hop
    try:
        for key, patch in (("patched", True), ("stock", False), ("patched_again", True)):
            r = consume_sidecar(s.messages, size, 50, drain_patch=patch)
            row[key] = r["rate"]
            log(f"drain-patch compare {key}: {r['rate']:.0f} msg/s")
    finally:
        if hop is None:
            os.environ.pop("BENCH_HOP", None)
        else:
            os.environ["BENCH_HOP"] = hop
    row["stock_vs_patched"] = row["stock"] / med([row["patched"], row["patched_again"]])
    return {"size": size, "batch": 50, **row}


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("lat", "event")}


def latency_direct(rate: float, duration: float) -> dict[str, Any]:
    count = int(rate * duration)
    with Queues("latency", tiers=False) as q:
        rx = procs.direct("direct-latency", "latency", "--queue", q, "--count", str(count))
        rx.wait_event("ready", 30)
        pub = procs.direct(
            "paced", "paced", "--queue", q, "--rate", str(rate), "--duration", str(duration)
        )
        p = pub.result(timeout=duration * 4 + 30)
        r = rx.result(timeout=60)
    r["publisher"] = _strip(p)
    return r


LOOP_LAG = "sidecar_event_loop_lag_seconds"


def loop_lag_buckets(http_port: int) -> dict[float, float]:
    """The sidecar's loop-lag histogram now: cumulative sample count by bucket bound (s)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == LOOP_LAG:
            return {
                float(sample.labels["le"]): sample.value
                for sample in family.samples
                if sample.name == f"{LOOP_LAG}_bucket"
            }
    return {}


def loop_lag_between(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Loop lag over the samples taken between two scrapes, in ms: p50 and p99 interpolated
    within their bucket (as Prometheus' histogram_quantile does), and the bound of the
    highest bucket that received a sample (the max is at most that)."""
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return {"samples": 0, "p50": float("nan"), "p99": float("nan"), "max_le": float("nan")}

    def quantile(q: float) -> float:
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, count in zip(bounds, cumulative, strict=True):
            if count >= rank:
                if bound == float("inf"):
                    return lower * 1000
                share = (rank - below) / (count - below) if count > below else 1.0
                return (lower + (bound - lower) * share) * 1000
            lower, below = bound, count
        return lower * 1000

    top = next(b for b, c in zip(bounds, cumulative, strict=True) if c >= total)
    return {
        "samples": int(total),
        "p50": quantile(0.50),
        "p99": quantile(0.99),
        "max_le": top * 1000,
    }


def latency_sidecar(rate: float, duration: float, batch: int = 10) -> dict[str, Any]:
    count = int(rate * duration)
    with Queues("latency") as q, procs.sidecar("sidecar-latency", batch=batch) as (sc, ready, _t):
        rx = procs.agent(
            "agent-latency",
            "latency",
            ready["socket"],
            "--queue",
            q,
            "--count",
            str(count),
            "--batch",
            str(batch),
        )
        rx.wait_event("ready", 30)
        lag0 = loop_lag_buckets(ready["http_port"])
        cpu0, t0 = cpu_seconds(sc.pid), time.monotonic()
        pub = procs.direct(
            "paced", "paced", "--queue", q, "--rate", str(rate), "--duration", str(duration)
        )
        p = pub.result(timeout=duration * 4 + 30)
        r = rx.result(timeout=60)
        r["sidecar_cpu_share"] = (cpu_seconds(sc.pid) - cpu0) / (time.monotonic() - t0)
        r["loop_lag"] = loop_lag_between(lag0, loop_lag_buckets(ready["http_port"]))
    r["publisher"] = _strip(p)
    return r


def run_latency(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in s.rates:
        pairs = []
        hist: dict[str, list[float]] = {}
        for i in range(s.pairs):
            d = latency_direct(rate, s.latency_duration)
            sc = latency_sidecar(rate, s.latency_duration)
            if i == 0:
                hist = {"direct": d.get("lat", [])[::5], "sidecar": sc.get("lat", [])[::5]}
            added = {k: sc[k] - d[k] for k in ("p50", "p99", "p999")}
            pairs.append({"direct": _strip(d), "sidecar": _strip(sc), "added": added})
            pairs[-1]["cpu_share"] = {
                "direct": d.get("cpu_share"),
                "sidecar": sc.get("sidecar_cpu_share"),
                "agent": sc.get("cpu_share"),
            }
            # Same pair, same minute of machine load: the ratio is steadier than the shares.
            direct_share = d.get("cpu_share") or float("nan")
            pairs[-1]["cpu_share_ratio"] = (sc.get("sidecar_cpu_share") or float("nan")) / (
                direct_share if direct_share > 0 else float("nan")
            )
            lag = sc["loop_lag"]
            log(
                f"latency {rate:.0f}/s pair={i + 1}: direct p50 {d['p50']:.2f} p99 {d['p99']:.2f}"
                f" | sidecar p50 {sc['p50']:.2f} p99 {sc['p99']:.2f} ms"
                f" (received {d['received']}/{sc['received']});"
                f" sidecar loop lag p50 {lag['p50']:.2f} p99 {lag['p99']:.2f}"
                f" max <= {lag['max_le']:.2f} ms; CPU share sidecar/plain"
                f" {pairs[-1]['cpu_share_ratio']:.2f}"
            )
        out[str(int(rate))] = {
            "pairs": pairs,
            "median": {
                side: {k: med([p[side][k] for p in pairs]) for k in ("p50", "p99", "p999")}
                for side in ("direct", "sidecar", "added")
            },
            "median_cpu_share": {
                side: med([p["cpu_share"][side] or float("nan") for p in pairs])
                for side in ("direct", "sidecar", "agent")
            },
            "median_cpu_share_ratio": med([p["cpu_share_ratio"] for p in pairs]),
            "median_loop_lag": {
                k: med([p["sidecar"]["loop_lag"][k] for p in pairs])
                for k in ("p50", "p99", "max_le")
            },
            "samples_pair1": hist,
        }
    return out


def publish_direct(count: int, size: int, window: int) -> dict[str, Any]:
    with Queues("publish", tiers=False) as q:
        return procs.direct_run(
            "publish",
            "--queue",
            q,
            "--count",
            str(count),
            "--size",
            str(size),
            "--window",
            str(window),
            timeout=600,
        )


def publish_sidecar(count: int, size: int, window: int) -> dict[str, Any]:
    with Queues("publish", tiers=False) as q, procs.sidecar("sidecar-publish") as (sc, ready, _t):
        sc_cpu0 = cpu_seconds(sc.pid)
        ag = procs.agent(
            "agent-publish",
            "publish",
            ready["socket"],
            "--queue",
            q,
            "--count",
            str(count),
            "--size",
            str(size),
            "--window",
            str(window),
        )
        r = ag.result(timeout=600)
        r["sidecar_cpu_s"] = cpu_seconds(sc.pid) - sc_cpu0
        r["cpu_per_10k"] = per_10k(r["sidecar_cpu_s"] + r["cpu_s"], r["n"])
        return r


def run_publish(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in s.sizes:
        pairs = []
        for i in range(s.pairs):
            d = publish_direct(s.publish_messages, size, s.window)
            sc = publish_sidecar(s.publish_messages, size, s.window)
            d_cpu = per_10k(d["cpu_s"], d["n"])
            pairs.append(
                {
                    "direct": d["rate"],
                    "sidecar": sc["rate"],
                    "ratio": sc["rate"] / d["rate"],
                    "direct_cpu_per_10k": d_cpu,
                    "sidecar_cpu_per_10k": sc["cpu_per_10k"],
                    "cpu_ratio": sc["cpu_per_10k"] / d_cpu,
                    "sidecar_errors": sc.get("errors", 0),
                    "sidecar_throttled": sc.get("throttled", 0),
                    "sidecar_only_cpu_per_10k": per_10k(sc["sidecar_cpu_s"], sc["n"]),
                    "agent_cpu_per_10k": per_10k(sc["cpu_s"], sc["n"]),
                }
            )
            log(
                f"publish size={size} pair={i + 1}: direct {d['rate']:.0f} sidecar "
                f"{sc['rate']:.0f} msg/s (errors {sc.get('errors')}, throttled "
                f"{sc.get('throttled')}); CPU-s/10k direct {d_cpu:.3f} "
                f"sidecar+agent {sc['cpu_per_10k']:.3f} (sidecar "
                f"{per_10k(sc['sidecar_cpu_s'], sc['n']):.3f}, agent "
                f"{per_10k(sc['cpu_s'], sc['n']):.3f})"
            )
        keys = ("direct", "sidecar", "ratio", "direct_cpu_per_10k", "sidecar_cpu_per_10k")
        out[str(size)] = {
            "pairs": pairs,
            "median": {k: med([p[k] for p in pairs]) for k in (*keys, "cpu_ratio")},
        }
    return out


def failure_run(count: int, reason: str, batch: int = 10) -> dict[str, Any]:
    with Queues("failure") as q:
        _fill(q, count, 200)
        with procs.sidecar(f"sidecar-fail-{reason}", batch=batch) as (sc, ready, tmp):
            sc_cpu0 = cpu_seconds(sc.pid)
            ag = procs.agent(
                f"agent-fail-{reason}",
                "fail",
                ready["socket"],
                "--queue",
                q,
                "--count",
                str(count),
                "--batch",
                str(batch),
                "--reason",
                reason,
                "--store",
                procs.store_url(tmp),
            )
            r = ag.result(timeout=300)
            # From start-up of the agent to its result: the whole run, idle edges included.
            r["sidecar_cpu_s"] = cpu_seconds(sc.pid) - sc_cpu0
    r["agent_cpu_s"] = r.get("cpu_s", float("nan"))
    r["sidecar_cpu_per_10k"] = per_10k(r["sidecar_cpu_s"], r["stored"])
    r["agent_cpu_per_10k"] = per_10k(r["agent_cpu_s"], r["stored"])
    r["cpu_per_10k"] = r["sidecar_cpu_per_10k"] + r["agent_cpu_per_10k"]
    return r


def failure_direct(count: int) -> dict[str, Any]:
    """The same three deliveries per message through the same tiers, by a plain aiormq
    client: the broker's part of NETWORK_ERROR x3, with no sidecar, agent or store."""
    with Queues("failure-direct") as q:
        _fill(q, count, 200)
        r = procs.direct_run(
            "retry",
            "--queue",
            q,
            "--count",
            str(count),
            "--tiers",
            ",".join(str(t) for t in procs.TIERS),
            timeout=300,
        )
    r["cpu_per_10k"] = per_10k(r.get("cpu_s", float("nan")), r["n"])
    return r


def run_failure(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    direct_runs: list[dict[str, Any]] = []
    for reason in ("NETWORK_ERROR", "VALIDATION_FAILED"):
        runs = []
        for i in range(s.pairs):
            if reason == "NETWORK_ERROR":
                d = failure_direct(s.fail_messages)
                direct_runs.append(d)
                log(
                    f"failure plain aiormq retry x3 run={i + 1}: {d['rate']:.0f} msg/s, "
                    f"done {d['done']}/{d['n']}, CPU-s/10k {d['cpu_per_10k']:.2f}"
                )
            r = failure_run(s.fail_messages, reason)
            runs.append(_strip(r))
            log(
                f"failure {reason} run={i + 1}: {r['rate']:.0f} msg/s dead-lettered, "
                f"stored {r['stored']}/{r['n']}, deliveries {r['deliveries']}, CPU-s/10k "
                f"sidecar {r['sidecar_cpu_per_10k']:.2f} agent {r['agent_cpu_per_10k']:.2f}"
            )
        out[reason] = {
            "runs": runs,
            "median_rate": med([r["rate"] for r in runs]),
            "median_cpu_per_10k": {
                "sidecar+agent": med([r["cpu_per_10k"] for r in runs]),
                "sidecar": med([r["sidecar_cpu_per_10k"] for r in runs]),
                "agent": med([r["agent_cpu_per_10k"] for r in runs]),
            },
            "nothing_lost": all(r["stored"] == r["n"] for r in runs),
        }
    out["NETWORK_ERROR"]["direct"] = {
        "runs": [_strip(d) for d in direct_runs],
        "median_rate": med([d["rate"] for d in direct_runs]),
        "median_cpu_per_10k": med([d["cpu_per_10k"] for d in direct_runs]),
    }
    return out


class Sampler:
    """Peak RSS of one process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def close(self) -> None:
        self._stop.set()
        self._t.join()


def run_footprint(s: Settings, rate: float = 1000.0) -> dict[str, Any]:
    count = int(rate * s.footprint_load)
    with Queues("footprint") as q, procs.sidecar("sidecar-footprint") as (sc, ready, _t):
        ag = procs.agent(
            "agent-footprint",
            "consume",
            ready["socket"],
            "--queue",
            q,
            "--count",
            str(count),
            "--batch",
            "10",
            "--idle",
            "600",
        )
        ag.wait_event("ready", 30)
        sampler = Sampler(sc.pid)
        time.sleep(1.0)
        # Idle first: connected agent long-polling, no traffic.
        c0, t0 = sampler.cpu(), time.monotonic()
        time.sleep(s.footprint_idle)
        idle = {
            "cpu_share": (sampler.cpu() - c0) / (time.monotonic() - t0),
            "rss_mb": sampler.proc.memory_info().rss / 2**20,
            "seconds": s.footprint_idle,
        }
        sampler.peak = 0
        c0, t0 = sampler.cpu(), time.monotonic()
        pub = procs.direct(
            "paced", "paced", "--queue", q, "--rate", str(rate), "--duration", str(s.footprint_load)
        )
        p = pub.result(timeout=s.footprint_load * 4 + 30)
        r = ag.result(timeout=60)
        wall = time.monotonic() - t0
        load = {
            "cpu_share": (sampler.cpu() - c0) / wall,
            "rss_peak_mb": sampler.peak / 2**20,
            "seconds": wall,
            "rate": rate,
            "publisher_rate": p["achieved_rate"],
            "agent_received": r["n"],
        }
        sampler.close()
    log(
        f"footprint: load cpu {load['cpu_share']:.1%} rss peak {load['rss_peak_mb']:.1f} MB;"
        f" idle cpu {idle['cpu_share']:.1%} rss {idle['rss_mb']:.1f} MB"
    )
    return {"load": load, "idle": idle}
