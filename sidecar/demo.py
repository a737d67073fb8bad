"""``sidecar demo``: a sidecar, a demo agent and a demo publisher against the local broker,
with the embedded SQLite store. Shows retries with visible delays, dead letters, producer
throttling and the final tally (processed + dead-lettered = published)."""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from sidecar.adapters.broker import tier_queue_name
from sidecar.client import SidecarClosed, open_agent
from sidecar.config import load_config
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


async def demo(seconds: float, messages: int, broker: str, workdir: Path) -> int:
    queue = f"demo.url.to_scrape.{uuid.uuid4().hex[:6]}"
    config = load_config(
        overrides={
            "broker": {"url": broker, "queues": [queue], "prefetch": 50},
            "agent": {"socket": str(workdir / "agent.sock"), "deadline": 2.0, "batch_size": 10},
            "retry": {"tiers": [1.0, 2.0, 4.0], "base_delay": 1.0, "max_delay": 4.0},
            "throttle": {"rate": 40.0, "burst": 20.0},
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
        nonlocal throttled, published
        async with open_agent(config.agent.socket, agent="demo-publisher", queues=[]) as agent:
            for job_id, outcome in plan.items():
                while True:
                    body = f'{{"jobId": "{job_id}", "url": "https://example.com/{job_id}", "demo": "{outcome}"}}'
                    result = await agent.publish(
                        body.encode(),
                        queue=queue,
                        message_id=job_id,
                        content_type="application/json",
                    )
                    if not result.throttled:
                        assert result.ok, result.error
                        published += 1
                        break
                    throttled += 1
                    await trio.sleep(result.retry_after or 0.05)

    async def demo_agent() -> None:
        async with open_agent(
            config.agent.socket, agent="demo-scraper", version="1.2.3", queues=[queue]
        ) as agent:
            while True:
                for m in await agent.pull(10, wait=0.5):
                    outcome = plan.get(m.message_id or "", "ok")
                    if outcome == "ok" or (
                        outcome != "POISON" and m.attempt >= 2 and outcome != "VALIDATION_FAILED"
                    ):
                        processed.add(m.message_id or "")
                        await agent.ack([m.id])
                    elif outcome == "TIMEOUT":
                        pass  # hang past the deadline: the sidecar charges TIMEOUT
                    elif outcome == "RATE_LIMITED":
                        await agent.fail(
                            m.id, "RATE_LIMITED", "429 Too Many Requests; retry-after=2"
                        )
                    elif outcome == "POISON":
                        await agent.fail(m.id, "NETWORK_ERROR", "read ECONNRESET from upstream")
                    elif outcome == "VALIDATION_FAILED":
                        await agent.fail(m.id, "VALIDATION_FAILED", "missing field url in job")
                    else:
                        await agent.fail(m.id, outcome, "connect ECONNRESET 10.0.0.7:443")

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

    async with trio.open_nursery() as nursery:
        await nursery.start(sidecar.run)
        print(
            f"sidecar up: queue {queue}, dashboard http://127.0.0.1:{sidecar.http_port}/",
            flush=True,
        )
        nursery.start_soon(_until_closed, demo_agent)
        nursery.start_soon(_until_closed, publisher)
        with trio.move_on_after(seconds) as out_of_time:
            while len(processed) + dead_lettered() < messages:
                await trio.sleep(2)
                report()
        if out_of_time.cancelled_caught:
            report()
        dlq = dead_lettered()
        patterns = sidecar.store.failure_patterns(RecordFilter(queue=queue))
        sidecar.stop()
        await sidecar.stopping.wait()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    tiers = [tier_queue_name(config.broker.tier_prefix, queue, t) for t in config.retry.tiers]
    await trio.to_thread.run_sync(delete_demo_queues, broker, [queue, *tiers])

    print("\nDLQ Health")
    print(f"DLQ Size: {dlq} messages\nTop Failures:")
    for row in patterns:
        print(f"- {row.key} ({row.count})")
    lost = messages - len(processed) - dlq
    print(
        f"\nprocessed {len(processed)} + dead-lettered {dlq} = {len(processed) + dlq} of {messages}; lost {max(lost, 0)}"
    )
    print(
        f"producer throttled {throttled} times (rate {config.throttle.rate:g}/s, burst {config.throttle.burst:g})"
    )
    return 0 if lost <= 0 else 1


async def _until_closed(task: Callable[[], Awaitable[None]]) -> None:
    # The sidecar stops at the end of the demo and closes the connection under the agents.
    with contextlib.suppress(SidecarClosed):
        await task()


def main(*, seconds: float, messages: int, broker: str) -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
        return trio.run(demo, seconds, messages, broker, Path(tmp))


def delete_demo_queues(broker: str, queues: list[str]) -> None:
    """The demo leaves nothing behind on the broker: its queue and the queue's delay tiers.
    Runs a private asyncio loop, apart from the sidecar's."""
    import asyncio

    import aiormq

    async def delete() -> None:
        connection = await aiormq.connect(broker)
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        await connection.close()

    loop = asyncio.SelectorEventLoop()
    try:
        loop.run_until_complete(delete())
    finally:
        loop.close()
