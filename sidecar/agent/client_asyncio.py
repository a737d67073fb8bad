"""The agent client for asyncio programs: the same calls as ``sidecar.client`` (trio).

This is agent-side code: it runs in the agent's process, never in the daemon, so it may use
asyncio directly. The WebSocket layer is wsproto (sans-IO) over an asyncio Unix stream.

    async def main():
        async with await AsyncioAgent.connect(
            "/run/sidecar/agent.sock", agent="parser", queues=["html.raw"]
        ) as agent:
            await agent.run(handle)  # or pull, ack, fail, extend and publish yourself

    run_agent_asyncio(main)  # Ctrl-C closes the connection cleanly (1000) and exits quietly

Handlers, the exception-to-reason mapping and the typed errors are those of
``sidecar.client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
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
from sidecar.agent.client import (
    MIN_RESEND,
    AgentCalls,
    Handler,
    HandshakeRefused,
    SidecarClosed,
    error_for,
    traced_fields,
)


class AsyncioAgent(AgentCalls):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._init_calls()
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._codec = p.Codec()
        self._refs = itertools.count(1)
        self._batches: asyncio.Queue[p.Batch | BaseException] = asyncio.Queue()
        self._published: dict[int, asyncio.Future[p.Published]] = {}
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._welcome_future: asyncio.Future[p.Welcome] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._keeper_wake = asyncio.Event()
        self._keeper_task: asyncio.Task[None] | None = None
        self.pressure: p.Pressure | None = None
        # Framed publishes waiting for the loop's next pass: those queued by any number of
        # tasks before it leave in one socket write.
        self._unsent: list[bytes] = []

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
        await client._welcome_future
        client._keeper_task = asyncio.get_running_loop().create_task(client._keeper())
        return client

    @property
    def welcome(self) -> p.Welcome | None:  # type: ignore[override]  # None until the handshake ends
        future = self._welcome_future
        return future.result() if future.done() and not future.exception() else None

    async def __aenter__(self) -> AsyncioAgent:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _frame(self, frame: p.Frame) -> bytes:
        data = self._codec.encode(frame, binary=True)
        assert isinstance(data, bytes)
        return self._ws.send(BytesMessage(data=data))

    async def send(self, frame: p.Frame) -> None:
        data = self._frame(frame)
        if self._unsent:
            self._write_unsent()  # never overtake the publishes queued before this frame
        self._writer.write(data)
        await self._writer.drain()

    def _send_soon(self, frame: p.Frame) -> None:
        """Queue a frame for the write at the loop's next pass."""
        self._unsent.append(self._frame(frame))
        if len(self._unsent) == 1:
            asyncio.get_running_loop().call_soon(self._write_unsent)

    def _write_unsent(self) -> None:
        if self._unsent and not self._writer.is_closing():
            self._writer.write(b"".join(self._unsent))
        self._unsent.clear()

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
            futures: list[asyncio.Future[Any]] = [self._accepted, self._welcome_future]
            for future in [*futures, *self._published.values()]:
                if not future.done():
                    future.set_exception(SidecarClosed("connection to the sidecar closed"))
            self._batches.put_nowait(SidecarClosed("connection to the sidecar closed"))
            if self._keeper_task is not None:
                self._keeper_task.cancel()

    def _route(self, frame: Any) -> None:
        if isinstance(frame, p.Batch):
            self._track_batch(frame)
            self._batches.put_nowait(frame)
        elif isinstance(frame, p.Published):
            future = self._published.pop(frame.ref, None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif isinstance(frame, p.Welcome):
            self._welcome_future.set_result(frame)
        elif isinstance(frame, p.Pressure):
            self.pressure = frame
        elif isinstance(frame, p.Error):
            self._route_error(frame)

    def _route_error(self, frame: p.Error) -> None:
        if frame.fatal and not self._welcome_future.done():
            self._welcome_future.set_exception(HandshakeRefused(frame))
            return
        if frame.code == "invalid_publish" and frame.ref is not None:
            future = self._published.pop(frame.ref, None)
            if future is not None and not future.done():
                future.set_exception(error_for(frame))
                return
        if frame.code in ("invalid_pull", "pull_in_progress"):
            self._batches.put_nowait(error_for(frame))
            return
        self._track_error(frame)

    async def _next_batch(self) -> list[p.Delivery]:
        answer = await self._batches.get()
        if isinstance(answer, BaseException):
            if isinstance(answer, SidecarClosed):
                self._batches.put_nowait(answer)  # every later pull fails the same way
            raise answer
        return answer.messages

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _wake_keeper(self) -> None:
        self._keeper_wake.set()

    async def _doze(self, until: float | None) -> None:
        timeout = None if until is None else max(0.0, until - self._now())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._keeper_wake.wait(), timeout)
        self._keeper_wake.clear()

    async def _keeper(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the connection closed
            await self._keep()

    async def publish_once(
        self,
        body: bytes,
        *,
        queue: str | None = None,
        trace: p.Delivery | None = None,
        **fields: Any,
    ) -> p.Published:
        """One publish frame and its answer, throttled or not; continues ``trace``'s trace
        (or that of the delivery being handled), as ``sidecar.client`` does."""
        ref = next(self._refs)
        fields = traced_fields(fields, trace)
        future: asyncio.Future[p.Published] = asyncio.get_running_loop().create_future()
        self._published[ref] = future
        try:
            # Written at the loop's next pass with the publishes other tasks queue meanwhile;
            # the wait for room follows, as ``send`` waits after its write.
            self._send_soon(p.Publish(ref=ref, body=body, queue=queue, **fields))
            await self._writer.drain()
            return await future
        finally:
            self._published.pop(ref, None)

    async def publish(self, body: bytes, *, queue: str | None = None, **fields: Any) -> p.Published:
        """Publish and wait for the final answer; throttled answers are resent after their
        ``retry_after``; an invalid publish raises ``PublishRefused``."""
        while True:
            result = await self.publish_once(body, queue=queue, **fields)
            if not result.throttled:
                return result
            await asyncio.sleep(max(result.retry_after or 0.0, MIN_RESEND))

    async def run(
        self,
        handler: Handler,
        *,
        batch: int = 10,
        wait: float = 5.0,
        reasons: Mapping[type[BaseException], str] | None = None,
    ) -> None:
        """Handle messages until cancelled (or Ctrl-C, under ``run_agent_asyncio``)."""
        await self.run_batches(handler, batch=batch, wait=wait, reasons=reasons)

    async def close(self) -> None:
        """A clean close: whatever the agent still holds is requeued, not charged."""
        if self._keeper_task is not None:
            self._keeper_task.cancel()
        try:
            await self._flush_acks()  # acks given are acks sent
            self._write_unsent()  # and publishes queued are publishes sent
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


def run_agent_asyncio(main: Callable[[], Awaitable[Any]]) -> None:
    """``asyncio.run(main())`` for an agent program: Ctrl-C cancels ``main`` (so an
    ``async with`` agent closes with 1000) and ends the program quietly (exit 130)."""
    try:
        asyncio.run(_as_coroutine(main))
    except KeyboardInterrupt:
        print("interrupted; connection closed", file=sys.stderr)
        raise SystemExit(130) from None


async def _as_coroutine(main: Callable[[], Awaitable[Any]]) -> Any:
    return await main()
