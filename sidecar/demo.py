"""``sidecar demo``: a sidecar, a demo agent and a demo publisher against the local broker,
with the embedded SQLite store. Shows retries with visible delays, dead letters, producer
throttling and the final tally (processed + dead-lettered = published)."""

from __future__ import annotations

import functools
import logging
import random
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from sidecar.client import open_agent
from sidecar.config import load_config
from sidecar.core.messages import tier_queue_name
from sidecar.store.records import RecordFilter
from sidecar.supervisor import Sidecar

# What the demo agent does with each message, by the first letter of its kind.
OUTCOMES = (
    ("ok", 0.70),
    ("NETWORK_ERROR", 0.10),
    ("RATE_LIMITED", 0.05),
    ("TIMEOUT", 0.05),
    ("VALIDATION_FAILED", 0.05),
    ("POISON", 0.05),
)


def pick_outcome(rng: random.Random) -> str:
    roll, total = rng.random(), 0.0
    for outcome, share in OUTCOMES:
        total += share
        if roll < total:
            return outcome
    return "ok"


async def demo(
    seconds: float,
    messages: int,
    broker: str,
    workdir: Path,
    *,
    keep: bool = False,
    command: str = "sidecar",
) -> int:
    queue = f"demo.url.to_scrape.{uuid.uuid4().hex[:6]}"
    config = load_config(
        overrides={
            "broker": {"url": broker, "queues": [queue], "prefetch": 50},
            "agent": {"socket": str(workdir / "agent.sock"), "deadline": 2.0, "batch_size": 10},
            "retry": {"tiers": [1.0, 2.0, 4.0], "base_delay": 1.0, "max_delay": 4.0},
            # A small publish queue, so the burst below shows both kinds of backpressure:
            # publishes held and paced in the sidecar, and "throttled" answers beyond it.
            "throttle": {"rate": 40.0, "burst": 20.0, "queue": 50},
            "store": {
                "url": f"sqlite:///{workdir / 'dlq.sqlite3'}",
                "spool": str(workdir / "spool.sqlite3"),
            },
            "http": {"listen": "127.0.0.1:0"},
            "drain": {"grace": 3.0},
            "breaker": {"failure_threshold": 8, "open_timeout": 3.0, "failure_ratio": 0.8},
        }
    )
    sidecar = Sidecar(config)
    rng = random.Random(7)
    plan = {f"job-{i}": pick_outcome(rng) for i in range(messages)}
    processed: set[str] = set()
    throttled = published = 0
    started = time.monotonic()

    async def publisher() -> None:
        """A producer far faster than the 40/s allowed: 100 publishes in flight at once."""
        nonlocal throttled, published
        window = trio.Semaphore(100)

        async def publish_one(agent: Any, job_id: str, outcome: str) -> None:
            nonlocal throttled, published
            body = f'{{"jobId": "{job_id}", "url": "https://example.com/{job_id}", "demo": "{outcome}"}}'
            try:
                while True:
                    result = await agent.publish_once(
                        body.encode(),
                        queue=queue,
                        message_id=job_id,
                        content_type="application/json",
                    )
                    if not result.throttled:
                        assert result.ok, result.error
                        published += 1
                        return
                    throttled += 1
                    await trio.sleep(result.retry_after or 0.05)
            finally:
                window.release()

        async with (
            open_agent(config.agent.socket, agent="demo-publisher", queues=[]) as agent,
            trio.open_nursery() as nursery,
        ):
            for job_id, outcome in plan.items():
                await window.acquire()
                nursery.start_soon(publish_one, agent, job_id, outcome)

    async def demo_agent() -> None:
        async with open_agent(
            config.agent.socket, agent="demo-scraper", version="1.2.3", queues=[queue]
        ) as agent:
            async for m in agent.messages(batch=10, wait=0.5):
                outcome = plan.get(m.message_id or "", "ok")
                if outcome == "ok" or (
                    outcome != "POISON" and m.attempt >= 2 and outcome != "VALIDATION_FAILED"
                ):
                    processed.add(m.message_id or "")
                    await m.ack()
                elif outcome == "TIMEOUT":
                    pass  # hang past the deadline: the sidecar charges TIMEOUT
                elif outcome == "RATE_LIMITED":
                    await m.fail("RATE_LIMITED", "429 Too Many Requests; retry-after=2")
                elif outcome == "POISON":
                    await m.fail("NETWORK_ERROR", "read ECONNRESET from upstream")
                elif outcome == "VALIDATION_FAILED":
                    await m.fail("VALIDATION_FAILED", "missing field url in job")
                else:
                    await m.fail(outcome, "connect ECONNRESET 10.0.0.7:443")

    def dead_lettered() -> int:
        return sidecar.store.count(RecordFilter(queue=queue))

    def report() -> None:
        c = sidecar.engine.counts
        depth = sidecar.monitor.queues.get(queue)
        print(
            f"[{time.monotonic() - started:5.1f}s] published {published:4d}"
            f" throttled-answers {throttled:4d} | delivered {c['delivered']:4d} acked {c['acked']:4d}"
            f" retried {c['retried']:3d} timeouts {c['timeouts']:3d} dead-lettered {c['dead_lettered']:3d}"
            f" | depth {depth.depth if depth else 0:3d} breaker {sidecar.engine.breaker.state(trio.current_time()).value}",
            flush=True,
        )

    tiers = [tier_queue_name(config.broker.tier_prefix, queue, t) for t in config.retry.tiers]
    sidecar_done = trio.Event()

    async def run_sidecar(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await sidecar.run(task_status=task_status)
        finally:
            sidecar_done.set()

    async def until_stopped(role: Any) -> None:
        """The demo's own agents end with the sidecar; only an earlier failure is an error."""
        try:
            await role()
        except Exception:
            if not sidecar.stopping.is_set():
                raise

    async with trio.open_nursery() as nursery:
        await nursery.start(run_sidecar)
        url = f"127.0.0.1:{sidecar.http_port}"
        print(f"sidecar up: queue {queue}, dashboard http://{url}/", flush=True)
        print(f"logs: {workdir / 'sidecar.log'}", flush=True)
        nursery.start_soon(until_stopped, demo_agent)
        publishing = trio.CancelScope()

        async def publish_until_done() -> None:
            with publishing:
                await until_stopped(publisher)

        nursery.start_soon(publish_until_done)
        with trio.move_on_after(seconds) as out_of_time:
            while len(processed) + dead_lettered() < messages and not sidecar.stopping.is_set():
                await trio.sleep(2)
                report()
        if out_of_time.cancelled_caught:
            report()
        publishing.cancel()  # what is published is final from here; the tally counts it
        dlq = dead_lettered()  # final too: shutdown never dead-letters
        patterns = sidecar.store.failure_patterns(RecordFilter(queue=queue))
        done = len(processed)
        if keep and not sidecar.stopping.is_set():
            tally(messages, published, done, dlq, patterns, throttled, config, queued=None)
            toml = workdir / "sidecar.toml"
            toml.write_text(
                f'[broker]\nurl = "{broker}"\n\n[store]\nurl = "sqlite:///{workdir / "dlq.sqlite3"}"'
                f'\n\n[http]\nlisten = "{url}"\n'
            )
            newest = sidecar.store.find(RecordFilter(queue=queue), limit=1)
            print_try_commands(command, toml, url, queue, newest[0].id if newest else "ID")
            await sidecar.stopping.wait()  # Ctrl-C (SIGINT) or SIGTERM: the sidecar drains
            print("\nstopping the demo: draining, then removing its queues and files", flush=True)
        else:
            sidecar.stop()
        with trio.move_on_after(config.drain.grace + 10):
            await sidecar_done.wait()  # drained: in-flight work is back on the broker
        nursery.cancel_scope.cancel()
    done = len(processed)  # acks that landed while draining count as processed
    queued: int = await trio.to_thread.run_sync(delete_demo_queues, broker, [*tiers, queue])
    if not keep:
        tally(messages, published, done, dlq, patterns, throttled, config, queued=queued)
        lost = published - done - dlq - queued
        return 0 if lost <= 0 else 1
    print(f"removed the demo queues ({queued} message(s) were still queued) and its files")
    return 0


def tally(
    messages: int,
    published: int,
    processed: int,
    dlq: int,
    patterns: list[Any],
    throttled: int,
    config: Any,
    *,
    queued: int | None,
) -> None:
    """The end-of-run view. Only what is neither processed, dead-lettered, nor still on the
    broker (queued or in a retry delay) counts as lost."""
    print("\nDLQ Health")
    print(f"DLQ Size: {dlq} messages\nTop Failures:")
    for row in patterns:
        print(f"- {row.key} ({row.count})")
    unsettled = max(published - processed - dlq, 0)
    line = f"\nprocessed {processed} + dead-lettered {dlq} = {processed + dlq} of {messages}"
    if published < messages:
        line += f"; not yet published {messages - published}"
    if queued is None:
        if unsettled:
            line += f"; still in flight {unsettled} (queued, in a retry delay or with the agent)"
        line += "; lost 0" if not unsettled else ""
    else:
        lost = max(unsettled - queued, 0)
        if queued:
            line += f"; still queued or in a retry delay when stopped {queued} (removed with the demo queue)"
        line += f"; lost {lost}"
    print(line)
    print(
        f"producer held to {config.throttle.rate:g}/s (burst {config.throttle.burst:g}):"
        f" up to {config.throttle.queue} publishes waited in the sidecar, and {throttled}"
        " more were answered throttled and sent again after retry_after",
        flush=True,
    )


def print_try_commands(command: str, toml: Path, url: str, queue: str, example_id: str) -> None:
    c = f"{command} "
    cfg = f"--config {shlex.quote(str(toml))}"
    print(
        "\nThe sidecar, its dashboard and its DLQ keep running until Ctrl-C. Try:\n"
        f"  dashboard:  http://{url}/\n"
        f"  {c}status {cfg}\n"
        f"  {c}dlq list {cfg} --reason validation_failed\n"
        f"  {c}dlq analyze {cfg}\n"
        f"  {c}dlq show {cfg} {shlex.quote(example_id)}\n"
        f"  {c}dlq retry {cfg} --pattern ECONNRESET --dry-run\n"
        f"  {c}dlq retry {cfg} --reason network_error --limit 5\n"
        f"  {c}scale recommend {cfg} --queue {queue}\n"
        f"  curl -s http://{url}/metrics | grep sidecar_dlq\n",
        flush=True,
    )


def main(*, seconds: float, messages: int, broker: str, keep: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
        workdir = Path(tmp)
        _log_to(workdir / "sidecar.log")
        command = sys.argv[0] if Path(sys.argv[0]).name == "sidecar" else "sidecar"
        return trio.run(
            functools.partial(demo, seconds, messages, broker, workdir, keep=keep, command=command)
        )


def _log_to(path: Path) -> None:
    """The tally is the demo's output; logs and alert lines go to a file, not between it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def delete_demo_queues(broker: str, queues: list[str]) -> int:
    """The demo leaves nothing behind on the broker: its queue and the queue's delay tiers.
    Returns how many messages they still held. Delay tiers go first: a message expiring
    from a tier moves into the main queue and is counted there, never twice.
    Runs a private asyncio loop, apart from the sidecar's."""
    import asyncio

    import aiormq

    async def delete() -> int:
        connection = await aiormq.connect(broker)
        channel = await connection.channel()
        left = 0
        for name in queues:
            ok = await channel.queue_delete(name)
            left += ok.message_count or 0
        await connection.close()
        return left

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(delete())
    finally:
        loop.close()
