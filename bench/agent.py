"""Agent roles that talk to a sidecar over its Unix socket (trio + sidecar.client).

python -m bench.agent consume --socket S --queue Q --count N --batch B
python -m bench.agent consume-each --socket S --queue Q --count N --batch B
python -m bench.agent latency --socket S --queue Q --count N --batch B
python -m bench.agent fail    --socket S --queue Q --count N --batch B --reason R --store URL
python -m bench.agent publish --socket S --queue Q --count N --size B --window W
"""

from __future__ import annotations

import argparse
import math
import time

import trio

from bench.common import body_of, cpu_seconds, emit, latency_summary, stamp_of
from sidecar import protocol as p
from sidecar.client import SidecarError, open_agent


def emit_consumed(n: int, count: int, first: float, cpu0: float, errors: list[p.Error]) -> None:
    """The result of a consume run: ``n`` messages since ``first`` (wall) and ``cpu0``."""
    last = time.time()
    elapsed = last - first
    emit(
        event="result",
        n=n,
        cpu_s=cpu_seconds() - cpu0,
        complete=n >= count,
        first=first,
        last=last,
        rate=(n - 1) / elapsed if elapsed > 0 and n > 1 else 0.0,
        errors=[e.code for e in errors][:5],
    )


async def consume(socket: str, queue: str, count: int, batch: int, idle: float) -> None:
    async with open_agent(socket, agent="bench-consume", queues=[queue]) as a:
        emit(event="ready")
        n, first, last_progress, cpu0 = 0, 0.0, time.monotonic(), 0.0
        while n < count:
            messages = await a.pull(batch, wait=1.0)
            if not messages:
                if time.monotonic() - last_progress > idle:
                    break
                continue
            if n == 0:
                first, cpu0 = time.time(), cpu_seconds()
            await a.ack([m.id for m in messages])
            n += len(messages)
            last_progress = time.monotonic()
        emit_consumed(n, count, first, cpu0, a.errors)


async def consume_each(socket: str, queue: str, count: int, batch: int, idle: float) -> None:
    """One message at a time through ``messages()`` (it pulls ``batch`` ahead)."""
    async with open_agent(socket, agent="bench-consume-each", queues=[queue]) as a:
        emit(event="ready")
        n, first, last_progress, cpu0 = 0, 0.0, time.monotonic(), 0.0

        def done() -> bool:
            return n >= count or time.monotonic() - last_progress > idle

        async for message in a.messages(batch=batch, wait=1.0, stop=done):
            if n == 0:
                first, cpu0 = time.time(), cpu_seconds()
            await message.ack()
            n += 1
            last_progress = time.monotonic()
        emit_consumed(n, count, first, cpu0, a.errors)


async def latency(socket: str, queue: str, count: int, batch: int, idle: float) -> None:
    lat: list[float] = []
    async with open_agent(socket, agent="bench-latency", queues=[queue]) as a:
        emit(event="ready")
        last_progress = time.monotonic()
        while len(lat) < count:
            messages = await a.pull(batch, wait=1.0)
            if not messages:
                if lat and time.monotonic() - last_progress > idle:
                    break
                if not lat and time.monotonic() - last_progress > 60:
                    break
                continue
            t = time.time_ns()
            lat.extend((t - stamp_of(m.body)) / 1e6 for m in messages)
            await a.ack([m.id for m in messages])
            last_progress = time.monotonic()
    emit(
        event="result",
        complete=len(lat) >= count,
        received=len(lat),
        **latency_summary(lat),
        lat=lat,
    )


async def fail(
    socket: str, queue: str, count: int, batch: int, reason: str, store_url: str, timeout: float
) -> None:
    from sidecar.store.opening import open_store

    stats = {"deliveries": 0, "first": 0.0, "done": 0.0, "stored": 0, "cpu0": 0.0, "cpu1": 0.0}
    store = open_store(store_url)

    async with open_agent(socket, agent="bench-fail", queues=[queue]) as a:
        emit(event="ready")

        async def failer() -> None:
            while True:
                messages = await a.pull(batch, wait=0.5)
                if messages and not stats["first"]:
                    stats["first"], stats["cpu0"] = time.time(), cpu_seconds()
                for m in messages:
                    await a.fail(m.id, reason, "bench: injected failure")
                stats["deliveries"] += len(messages)

        async def poller(cancel: trio.CancelScope) -> None:
            while True:
                stats["stored"] = await trio.to_thread.run_sync(store.count)
                if stats["stored"] >= count:
                    stats["done"], stats["cpu1"] = time.time(), cpu_seconds()
                    cancel.cancel()
                    return
                await trio.sleep(0.02)

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(failer)
                nursery.start_soon(poller, nursery.cancel_scope)
        errors = [e.code for e in a.errors][:5]
    store.close()
    done = stats["done"] or time.time()
    elapsed = done - stats["first"] if stats["first"] else math.nan
    emit(
        event="result",
        n=count,
        stored=stats["stored"],
        complete=stats["stored"] == count,
        deliveries=stats["deliveries"],
        cpu_s=(stats["cpu1"] or cpu_seconds()) - stats["cpu0"] if stats["first"] else math.nan,
        elapsed=elapsed,
        rate=stats["stored"] / elapsed if elapsed and elapsed > 0 else 0.0,
        errors=errors,
    )


async def publish(socket: str, queue: str, count: int, size: int, window: int) -> None:
    """Pipelined through the client: a task per publish, at most ``window`` waiting for
    their answers (as the direct publisher keeps ``window`` unconfirmed), counting
    ``published`` answers. The client writes the publishes queued at one wake-up at once."""
    body = body_of(size)
    result = {"ok": 0, "errors": 0, "throttled": 0}
    async with open_agent(socket, agent="bench-publish", queues=[]) as a:
        emit(event="ready")
        credit = trio.Semaphore(window)

        async def one() -> None:
            try:
                answer = await a.publish_once(body, queue=queue)
            except SidecarError:
                result["errors"] += 1
            else:
                if answer.throttled:
                    result["throttled"] += 1
                elif answer.ok:
                    result["ok"] += 1
                else:
                    result["errors"] += 1
            finally:
                credit.release()

        start, cpu0 = time.time(), cpu_seconds()
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                await credit.acquire()
                nursery.start_soon(one)
        elapsed, cpu_s = time.time() - start, cpu_seconds() - cpu0
    emit(
        event="result",
        n=count,
        elapsed=elapsed,
        rate=result["ok"] / elapsed,
        cpu_s=cpu_s,
        **result,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.agent")
    ap.add_argument("mode", choices=["consume", "consume-each", "latency", "fail", "publish"])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--queue", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--reason", default="NETWORK_ERROR")
    ap.add_argument("--store", default="")
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    if a.mode == "consume":
        trio.run(consume, a.socket, a.queue, a.count, a.batch, a.idle)
    elif a.mode == "consume-each":
        trio.run(consume_each, a.socket, a.queue, a.count, a.batch, a.idle)
    elif a.mode == "latency":
        trio.run(latency, a.socket, a.queue, a.count, a.batch, a.idle)
    elif a.mode == "fail":
        trio.run(fail, a.socket, a.queue, a.count, a.batch, a.reason, a.store, a.timeout)
    else:
        trio.run(publish, a.socket, a.queue, a.count, a.size, a.window)


if __name__ == "__main__":
    main()
