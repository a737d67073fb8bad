"""A tiny example agent for the compose stack: pulls from the sidecar over its Unix socket,
"scrapes" each URL (sleeps a little), acks most messages and fails a few so retries and the
DLQ have something to show. Replace it with your real agent.

Environment: SIDECAR_AGENT_SOCKET (default /run/sidecar/agent.sock), AGENT_QUEUE
(default url.to_scrape), AGENT_NAME (default example-agent).
"""

from __future__ import annotations

import os
import random
import signal

import trio

from sidecar.client import open_agent

SOCKET = os.environ.get("SIDECAR_AGENT_SOCKET", "/run/sidecar/agent.sock")
QUEUE = os.environ.get("AGENT_QUEUE", "url.to_scrape")
NAME = os.environ.get("AGENT_NAME", "example-agent")


async def work(stop: trio.Event) -> None:
    rng = random.Random()
    async with open_agent(SOCKET, agent=NAME, queues=[QUEUE], version="0.1.0") as agent:
        print(f"{NAME}: connected to {SOCKET}, consuming {QUEUE}", flush=True)
        while not stop.is_set():
            for message in await agent.pull(10, wait=1.0):
                await trio.sleep(rng.uniform(0.01, 0.1))
                roll = rng.random()
                if roll < 0.05:
                    await agent.fail(message.id, "NETWORK_ERROR", "read ECONNRESET (example)")
                elif roll < 0.07:
                    await agent.fail(message.id, "VALIDATION_FAILED", "missing url (example)")
                else:
                    await agent.ack([message.id])


async def main() -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    stop.set()  # finish the batch in hand, then leave
                    return

            nursery.start_soon(on_signal)
            while not stop.is_set():
                try:
                    await work(stop)
                except Exception as exc:  # socket not there yet, or the sidecar restarted
                    print(f"{NAME}: {SOCKET}: {exc}; retrying in 1s", flush=True)
                    with trio.move_on_after(1):
                        await stop.wait()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
