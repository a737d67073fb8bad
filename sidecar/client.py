"""A Python client for agents: connect to the sidecar's Unix socket, pull batches, ack, fail,
extend and publish. Written for trio; asyncio agents can use it through trio-asyncio, or
follow proto/PROTOCOL.md with any WebSocket library (see proto/node/agent.js).

    async with open_agent("/run/sidecar/agent.sock", agent="parser", queues=["html.raw"]) as a:
        while True:
            for message in await a.pull(10):
                try:
                    handle(message.body)
                    await a.ack([message.id])
                except Exception as exc:
                    await a.fail(message.id, "PROCESSING_ERROR", str(exc))
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from sidecar import protocol as p


class SidecarError(Exception):
    """The sidecar refused a frame; ``code`` is the error frame's code."""

    def __init__(self, frame: p.Error) -> None:
        super().__init__(f"{frame.code}: {frame.message}")
        self.code = frame.code
        self.frame = frame


class AgentCalls:
    """The fire-and-forget calls, the same over any transport: subclasses provide ``send``."""

    async def send(self, frame: p.Frame) -> None:
        raise NotImplementedError

    async def ack(self, ids: list[int]) -> None:
        await self.send(p.Ack(ids=ids))

    async def fail(
        self, id: int, reason: str, error: str = "", retry_after: float | None = None
    ) -> None:
        await self.send(p.Fail(id=id, reason=reason, error=error, retry_after=retry_after))

    async def extend(self, ids: list[int], seconds: float) -> None:
        await self.send(p.Extend(ids=ids, seconds=seconds))


class AgentClient(AgentCalls):
    def __init__(self, ws: WebSocketConnection, *, binary: bool = True) -> None:
        self.ws = ws
        self.binary = binary
        self.codec = p.Codec()
        self.welcome: p.Welcome | None = None
        self.pressure: p.Pressure | None = None
        self.errors: list[p.Error] = []
        self._refs = itertools.count(1)
        self._batch: trio.MemorySendChannel[p.Batch]
        self._batch, self._batches = trio.open_memory_channel[p.Batch](8)
        self._published: dict[int, trio.MemorySendChannel[p.Published]] = {}
        self._welcome = trio.Event()

    async def send(self, frame: p.Frame) -> None:
        await self.ws.send_message(self.codec.encode(frame, binary=self.binary))

    async def hello(
        self, agent: str, queues: list[str], *, version: str = "", token: str | None = None
    ) -> p.Welcome:
        await self.send(
            p.Hello(agent=agent, version=version, pid=os.getpid(), queues=queues, token=token)
        )
        await self._welcome.wait()
        if self.welcome is None:
            raise SidecarError(self.errors[-1])
        return self.welcome

    async def reader(self) -> None:
        """Route incoming frames; runs for the life of the connection."""
        try:
            while True:
                frame = self.codec.decode_sidecar(await self.ws.get_message())
                if isinstance(frame, p.Batch):
                    await self._batch.send(frame)
                elif isinstance(frame, p.Published):
                    waiter = self._published.pop(frame.ref, None)
                    if waiter is not None:
                        waiter.send_nowait(frame)
                elif isinstance(frame, p.Welcome):
                    self.welcome = frame
                    self._welcome.set()
                elif isinstance(frame, p.Pressure):
                    self.pressure = frame
                elif isinstance(frame, p.Error):
                    self.errors.append(frame)
                    if frame.fatal:
                        self._welcome.set()
        except ConnectionClosed:
            pass
        finally:
            self._welcome.set()

    async def pull(self, max: int = 10, wait: float = 1.0) -> list[p.Delivery]:
        await self.send(p.Pull(max=max, wait=wait))
        return (await self._batches.receive()).messages

    async def publish(self, body: bytes, *, queue: str | None = None, **fields: Any) -> p.Published:
        """Publish and wait for the broker's confirm (or a throttled answer)."""
        ref = next(self._refs)
        send, recv = trio.open_memory_channel[p.Published](1)
        self._published[ref] = send
        await self.send(p.Publish(ref=ref, body=body, queue=queue, **fields))
        return await recv.receive()

    async def publish_with_backoff(
        self, body: bytes, *, queue: str | None = None, **fields: Any
    ) -> p.Published:
        """Publish, sleeping out each throttled answer's retry_after; nothing is dropped."""
        while True:
            result = await self.publish(body, queue=queue, **fields)
            if not result.throttled:
                return result
            await trio.sleep(result.retry_after or 0.1)


async def connect_unix(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@asynccontextmanager
async def open_agent(
    socket_path: str,
    *,
    agent: str,
    queues: list[str],
    version: str = "",
    token: str | None = None,
    binary: bool = True,
) -> AsyncIterator[AgentClient]:
    """Connect, say hello, and keep a reader running until the block exits."""
    stream = await connect_unix(socket_path)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            "localhost",
            "/",
            message_queue_size=64,
            max_message_size=64 * 1024 * 1024,
        )
        client = AgentClient(ws, binary=binary)
        nursery.start_soon(client.reader)
        try:
            await client.hello(agent, queues, version=version, token=token)
            yield client
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()
