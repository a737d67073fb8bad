"""The agent client for asyncio programs: the same calls as ``sidecar.client`` (trio).

This is agent-side code: it runs in the agent's process, never in the daemon, so it may use
asyncio directly. The WebSocket layer is wsproto (sans-IO) over an asyncio Unix stream.

    agent = await AsyncioAgent.connect("/run/sidecar/agent.sock", agent="parser", queues=["html.raw"])
    for m in await agent.pull(10):
        await agent.ack([m.id])
    await agent.close()
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from sidecar import protocol as p
from sidecar.client import AgentCalls, SidecarError


class AsyncioAgent(AgentCalls):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._codec = p.Codec()
        self._refs = itertools.count(1)
        self._batches: asyncio.Queue[p.Batch] = asyncio.Queue()
        self._published: dict[int, asyncio.Future[p.Published]] = {}
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._welcome: asyncio.Future[p.Welcome] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self.pressure: p.Pressure | None = None
        self.errors: list[p.Error] = []

    @classmethod
    async def connect(
        cls,
        socket_path: str,
        *,
        agent: str,
        queues: list[str],
        version: str = "",
        token: str | None = None,
    ) -> AsyncioAgent:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=2**24)
        client = cls(reader, writer)
        client._task = asyncio.get_running_loop().create_task(client._read_loop())
        writer.write(client._ws.send(Request(host="localhost", target="/")))
        await client._accepted
        await client.send(
            p.Hello(agent=agent, version=version, pid=os.getpid(), queues=queues, token=token)
        )
        await client._welcome
        return client

    @property
    def welcome(self) -> p.Welcome:
        return self._welcome.result()

    async def send(self, frame: p.Frame) -> None:
        data = self._codec.encode(frame, binary=True)
        assert isinstance(data, bytes)
        self._writer.write(self._ws.send(BytesMessage(data=data)))
        await self._writer.drain()

    async def _read_loop(self) -> None:
        binary_parts: list[bytes] = []
        text_parts: list[str] = []
        try:
            while chunk := await self._reader.read(65536):
                self._ws.receive_data(chunk)
                for event in self._ws.events():
                    if isinstance(event, AcceptConnection):
                        self._accepted.set_result(None)
                    elif isinstance(event, RejectConnection):
                        raise ConnectionError("the sidecar refused the WebSocket upgrade")
                    elif isinstance(event, Ping):
                        self._writer.write(self._ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        return
                    elif isinstance(event, BytesMessage):
                        binary_parts.append(bytes(event.data))
                        if event.message_finished:
                            self._route(self._codec.decode_sidecar(b"".join(binary_parts)))
                            binary_parts.clear()
                    elif isinstance(event, TextMessage):
                        text_parts.append(event.data)
                        if event.message_finished:
                            self._route(self._codec.decode_sidecar("".join(text_parts)))
                            text_parts.clear()
        finally:
            futures: list[asyncio.Future[Any]] = [self._accepted, self._welcome]
            for future in [*futures, *self._published.values()]:
                if not future.done():
                    future.set_exception(ConnectionError("connection to the sidecar closed"))

    def _route(self, frame: Any) -> None:
        if isinstance(frame, p.Batch):
            self._batches.put_nowait(frame)
        elif isinstance(frame, p.Published):
            future = self._published.pop(frame.ref, None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif isinstance(frame, p.Welcome):
            self._welcome.set_result(frame)
        elif isinstance(frame, p.Pressure):
            self.pressure = frame
        elif isinstance(frame, p.Error):
            self.errors.append(frame)
            if frame.fatal and not self._welcome.done():
                self._welcome.set_exception(SidecarError(frame))

    async def pull(self, max: int = 10, wait: float = 1.0) -> list[p.Delivery]:
        await self.send(p.Pull(max=max, wait=wait))
        return (await self._batches.get()).messages

    async def publish(self, body: bytes, *, queue: str | None = None, **fields: Any) -> p.Published:
        ref = next(self._refs)
        future: asyncio.Future[p.Published] = asyncio.get_running_loop().create_future()
        self._published[ref] = future
        await self.send(p.Publish(ref=ref, body=body, queue=queue, **fields))
        return await future

    async def close(self) -> None:
        """A clean close: whatever the agent still holds is requeued, not charged."""
        try:
            self._writer.write(self._ws.send(CloseConnection(code=1000)))
            await self._writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 2)
            except (TimeoutError, ConnectionError):
                self._task.cancel()
        self._writer.close()
