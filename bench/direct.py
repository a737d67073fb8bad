"""Plain-asyncio roles: baseline consumers, publishers and queue admin.

Runs on an explicitly built ``asyncio.new_event_loop()`` and never imports trio, trio_asyncio
or sidecar: ``import trio_asyncio`` would silently swap in its slower loop.

    python -m bench.direct consume --queue Q --count N --ack each|multi50
    python -m bench.direct latency --queue Q --count N
    python -m bench.direct paced   --queue Q --rate R --duration S --size B
    python -m bench.direct publish --queue Q --count N --size B --window 256
    python -m bench.direct retry   --queue Q --count N --tiers 0.05,0.1,0.2
    python -m bench.direct fill    --queue Q --count N --size B
    python -m bench.direct declare --queues A,B
    python -m bench.direct delete  --queues A,B
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from pamqp import commands as spec

from bench.common import (
    BROKER_URL,
    body_of,
    cpu_seconds,
    emit,
    latency_summary,
    stamp_of,
    tier_queue_names,
)
from sidecar.core.messages import tier_queue_arguments


def persistent() -> spec.Basic.Properties:
    # A fresh object per publish: aiormq writes its generated message_id into the
    # properties it is given, so a shared object would give every message the same id.
    return spec.Basic.Properties(delivery_mode=2)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


async def _wait_or_idle(done: asyncio.Event, progress: Callable[[], int], idle: float) -> bool:
    """Wait for ``done``; give up when ``progress()`` has not moved for ``idle`` seconds."""
    last, last_t = progress(), time.monotonic()
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)
        if progress() != last:
            last, last_t = progress(), time.monotonic()
        elif time.monotonic() - last_t > idle:
            return False
    return True


async def consume(queue: str, count: int, ack: str, prefetch: int, idle: float) -> None:
    conn = await aiormq.connect(BROKER_URL)
    channel = await conn.channel(publisher_confirms=False)
    await channel.basic_qos(prefetch_count=prefetch)
    state = {"n": 0, "first": 0.0, "last": 0.0, "cpu0": 0.0, "cpu1": 0.0}
    done = asyncio.Event()
    every = 50 if ack == "multi50" else 1
    to_ack: asyncio.Queue[int] = asyncio.Queue()

    async def writer() -> None:
        # One writer, in order: concurrent multiple=True acks can overtake each other.
        while True:
            tag = await to_ack.get()
            await channel.basic_ack(tag, multiple=True)

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        n = state["n"] = state["n"] + 1
        if n == 1:
            state["first"] = time.time()
            state["cpu0"] = cpu_seconds()
        tag = message.delivery.delivery_tag
        if every == 1:
            await channel.basic_ack(tag)
        elif n % every == 0 or n == count:
            to_ack.put_nowait(tag)
        if n >= count:
            if every != 1:
                while not to_ack.empty():
                    await asyncio.sleep(0.001)
            state["last"] = time.time()
            state["cpu1"] = cpu_seconds()
            done.set()

    writer_task = asyncio.get_running_loop().create_task(writer())
    await channel.basic_consume(queue, on_message)
    complete = await _wait_or_idle(done, lambda: state["n"], idle)
    if not complete:
        state["last"] = time.time()
        state["cpu1"] = cpu_seconds()
    writer_task.cancel()
    with contextlib.suppress(Exception):
        await conn.close()
    elapsed = state["last"] - state["first"]
    n = state["n"]
    emit(
        event="result",
        n=n,
        complete=complete,
        first=state["first"],
        last=state["last"],
        rate=(n - 1) / elapsed if elapsed > 0 and n > 1 else 0.0,
        cpu_s=state["cpu1"] - state["cpu0"],
    )


async def latency(queue: str, count: int, prefetch: int, idle: float) -> None:
    conn = await aiormq.connect(BROKER_URL)
    channel = await conn.channel(publisher_confirms=False)
    await channel.basic_qos(prefetch_count=prefetch)
    lat: list[float] = []
    done = asyncio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        lat.append((time.time_ns() - stamp_of(message.body)) / 1e6)
        await channel.basic_ack(message.delivery.delivery_tag)
        if len(lat) >= count:
            done.set()

    await channel.basic_consume(queue, on_message)
    emit(event="ready")
    cpu0, t0 = cpu_seconds(), time.monotonic()
    complete = await _wait_or_idle(done, lambda: len(lat), idle)
    cpu_s, wall = cpu_seconds() - cpu0, time.monotonic() - t0
    with contextlib.suppress(Exception):
        await conn.close()
    emit(
        event="result",
        complete=complete,
        received=len(lat),
        **latency_summary(lat),
        lat=lat,
        cpu_s=cpu_s,
        cpu_share=cpu_s / wall if wall > 0 else 0.0,
    )


async def paced(queue: str, rate: float, duration: float, size: int) -> None:
    """Publish at a fixed rate (no confirms, so pacing is not bent by round trips), each
    body stamped with time.time_ns() just before it is written."""
    conn = await aiormq.connect(BROKER_URL)
    channel = await conn.channel(publisher_confirms=False)
    total = int(rate * duration)
    start = time.monotonic()
    behind_max = 0.0
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            behind_max = max(behind_max, -delay)
        await channel.basic_publish(
            body_of(size, time.time_ns()), routing_key=queue, properties=persistent()
        )
    elapsed = time.monotonic() - start
    with contextlib.suppress(Exception):
        await conn.close()
    emit(
        event="result",
        sent=total,
        elapsed=elapsed,
        achieved_rate=total / elapsed,
        behind_max_s=behind_max,
    )


async def publish(queue: str, count: int, size: int, window: int) -> None:
    """Pipelined publishes with confirms: at most ``window`` unconfirmed at a time."""
    conn = await aiormq.connect(BROKER_URL)
    channel = await conn.channel(publisher_confirms=True)
    body = body_of(size)
    sem = asyncio.Semaphore(window)
    errors = 0
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        nonlocal errors
        try:
            confirm = await channel.basic_publish(
                body, routing_key=queue, properties=persistent(), mandatory=True
            )
            if not isinstance(confirm, spec.Basic.Ack):
                errors += 1
        except Exception:
            errors += 1
        finally:
            sem.release()

    start, cpu0 = time.time(), cpu_seconds()
    for _ in range(count):
        await sem.acquire()
        task = loop.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for _ in range(window):
        await sem.acquire()
    elapsed, cpu_s = time.time() - start, cpu_seconds() - cpu0
    with contextlib.suppress(Exception):
        await conn.close()
    emit(event="result", n=count, errors=errors, elapsed=elapsed, rate=count / elapsed, cpu_s=cpu_s)


ATTEMPTS = "x-sidecar-attempts"


async def retry(queue: str, count: int, tiers: list[float], prefetch: int, idle: float) -> None:
    """The failure path's broker work without the sidecar, its agent or its store: every
    message is sent back twice through the delay tiers (the sidecar's quorum queues,
    republish confirmed before the original's ack) and acked on its third delivery."""
    conn = await aiormq.connect(BROKER_URL)
    admin = await conn.channel()
    names = tier_queue_names(queue, tiers)
    for name, ttl in zip(names, tiers, strict=True):
        await admin.queue_declare(
            name,
            durable=True,
            arguments=tier_queue_arguments(queue, ttl),
        )
    channel = await conn.channel(publisher_confirms=True)
    await channel.basic_qos(prefetch_count=prefetch)
    state = {"done": 0, "deliveries": 0, "first": 0.0, "last": 0.0, "cpu0": 0.0, "cpu1": 0.0}
    finished = asyncio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        state["deliveries"] += 1
        if not state["first"]:
            state["first"], state["cpu0"] = time.time(), cpu_seconds()
        headers = dict(message.header.properties.headers or {})
        attempt = int(headers.get(ATTEMPTS) or 0)
        tag = message.delivery.delivery_tag
        if attempt < 2:
            headers[ATTEMPTS] = attempt + 1
            ttl = tiers[attempt]
            props = spec.Basic.Properties(
                delivery_mode=2,
                headers=headers,
                message_id=message.header.properties.message_id,
                expiration=str(round(ttl * 1000)),
            )
            confirm = await channel.basic_publish(
                message.body, routing_key=names[attempt], properties=props, mandatory=True
            )
            if not isinstance(confirm, spec.Basic.Ack):
                await channel.basic_nack(tag, requeue=True)
                return
            await channel.basic_ack(tag)
            return
        await channel.basic_ack(tag)
        state["done"] += 1
        if state["done"] >= count:
            state["last"], state["cpu1"] = time.time(), cpu_seconds()
            finished.set()

    await channel.basic_consume(queue, on_message)
    complete = await _wait_or_idle(finished, lambda: state["deliveries"], idle)
    if not complete:
        state["last"], state["cpu1"] = time.time(), cpu_seconds()
    with contextlib.suppress(Exception):
        await conn.close()
    elapsed = state["last"] - state["first"]
    emit(
        event="result",
        n=count,
        done=state["done"],
        deliveries=state["deliveries"],
        complete=complete,
        elapsed=elapsed,
        rate=state["done"] / elapsed if elapsed > 0 else 0.0,
        cpu_s=state["cpu1"] - state["cpu0"],
    )


async def fill(queue: str, count: int, size: int) -> None:
    conn = await aiormq.connect(BROKER_URL)
    channel = await conn.channel(publisher_confirms=False)
    # Distinct bodies: the sidecar's dead-letter ids are content hashes (no message_id here).
    for i in range(count):
        await channel.basic_publish(body_of(size, i), routing_key=queue, properties=persistent())
    deadline = time.monotonic() + 60
    depth = 0
    while time.monotonic() < deadline:
        ok = await channel.queue_declare(queue, passive=True)
        depth = ok.message_count or 0
        if depth >= count:
            break
        await asyncio.sleep(0.05)
    with contextlib.suppress(Exception):
        await conn.close()
    emit(event="result", depth=depth)


async def declare(queues: list[str]) -> None:
    conn = await aiormq.connect(BROKER_URL)
    channel = await conn.channel()
    for q in queues:
        await channel.queue_declare(q, durable=True)
    await conn.close()
    emit(event="result", declared=queues)


async def delete(queues: list[str]) -> None:
    conn = await aiormq.connect(BROKER_URL)
    deleted = []
    for q in queues:
        # A failed delete closes the channel, so one channel per queue.
        channel = await conn.channel()
        try:
            await channel.queue_delete(q)
            deleted.append(q)
        except Exception:
            pass
        with contextlib.suppress(Exception):
            await channel.close()
    await conn.close()
    emit(event="result", deleted=deleted)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.direct")
    ap.add_argument(
        "mode",
        choices=["consume", "latency", "paced", "publish", "retry", "fill", "declare", "delete"],
    )
    ap.add_argument("--queue", default="")
    ap.add_argument("--queues", default="")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--ack", choices=["each", "multi50"], default="each")
    ap.add_argument("--prefetch", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--tiers", default="0.05,0.1,0.2")
    a = ap.parse_args(argv)
    assert "trio_asyncio" not in sys.modules
    jobs: dict[str, Callable[[], Awaitable[Any]]] = {
        "consume": lambda: consume(a.queue, a.count, a.ack, a.prefetch, a.idle),
        "latency": lambda: latency(a.queue, a.count, a.prefetch, a.idle),
        "paced": lambda: paced(a.queue, a.rate, a.duration, a.size),
        "publish": lambda: publish(a.queue, a.count, a.size, a.window),
        "retry": lambda: retry(
            a.queue, a.count, [float(t) for t in a.tiers.split(",")], a.prefetch, a.idle
        ),
        "fill": lambda: fill(a.queue, a.count, a.size),
        "declare": lambda: declare([q for q in a.queues.split(",") if q]),
        "delete": lambda: delete([q for q in a.queues.split(",") if q]),
    }
    run(jobs[a.mode])


if __name__ == "__main__":
    main()
