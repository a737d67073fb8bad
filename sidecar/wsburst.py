"""WebSocket bursts over trio-websocket, for both ends of the agent socket: several messages
framed and written at once, and every message already received taken in one wake-up.

trio-websocket sends and receives one message at a time: one stream write per message, and
its reader task yields to the scheduler after each message it queues, so a burst that
arrived in one read is handed over one message per scheduler pass. Both helpers reach into
its private attributes (checked once; if a release renames them, they fall back to the
public one-at-a-time calls, correct but slower, and tests/test_agent_socket_writes.py fails
so the change is noticed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import BytesMessage, TextMessage
from wsproto.utilities import LocalProtocolError

log = logging.getLogger("sidecar.wsburst")

# What ``send_messages`` reaches into: the wsproto connection, the stream and the lock
# serialising writes to it, the close reason, and the abort trio-websocket runs when a
# write fails.
_WRITE_INTERNALS = ("_wsproto", "_stream", "_stream_lock", "_close_reason", "_abort_web_socket")
# What ``read_in_bursts`` and ``take_received`` reach into: the memory channel between the
# reader task and ``get_message``, both ends.
_READ_INTERNALS = ("_send_channel", "_recv_channel")
_writing: dict[type, bool] = {}  # per connection class: test doubles are not the real one
_bursting: dict[type, bool] = {}  # per connection class: test doubles are not the real one


def coalesces_writes(ws: WebSocketConnection) -> bool:
    """Whether ``send_messages`` writes several messages to ``ws`` in one stream write."""
    kind = type(ws)
    known = _writing.get(kind)
    if known is None:
        known = _writing[kind] = all(hasattr(ws, name) for name in _WRITE_INTERNALS)
        if not known and issubclass(kind, WebSocketConnection):
            log.warning("trio-websocket internals changed: agent writes are not coalesced")
    return known


def frame_messages(ws: WebSocketConnection, messages: Sequence[bytes | str]) -> bytes:
    """``messages`` framed for the wire, in order (``coalesces_writes`` must be true). The
    result must be written before anything framed after it. Raises ``ConnectionClosed``
    once the connection is closing (wsproto frames nothing then, and trio-websocket may
    not have recorded the close yet)."""
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    frame = ws._wsproto.send
    try:
        return b"".join(
            [
                frame(BytesMessage(data=m) if isinstance(m, bytes) else TextMessage(data=m))
                for m in messages
            ]
        )
    except LocalProtocolError:
        raise ConnectionClosed(ws._close_reason) from None


# Writing without a task step: trio-websocket's ``send_message`` (and the stream lock plus
# trio's socket send) yields twice per write even when the socket takes the bytes at once,
# and at paced rates each yield is a pass of the event loop. While nobody else is writing,
# framed bytes go straight to the socket's descriptor; only what the socket does not take
# at once goes the usual way, under the lock.


def _descriptor(stream: trio.abc.Stream) -> int:
    """The socket under ``stream``, or -1. Only wrappers that declare their writes pass
    straight through (``passes_writes_through``, keeping the stream as ``inner``) are
    looked through: writing under any other would skip what its ``send_all`` does."""
    for _ in range(4):
        if isinstance(stream, trio.SocketStream):
            return stream.socket.fileno()
        inner = getattr(stream, "inner", None)
        if not getattr(stream, "passes_writes_through", False) or not isinstance(
            inner, trio.abc.Stream
        ):
            return -1
        stream = inner
    return -1


def writes_to_socket(ws: WebSocketConnection) -> bool:
    """Whether ``write_now`` can work on ``ws`` at all (its stream is a socket)."""
    return coalesces_writes(ws) and _descriptor(ws._stream) >= 0


def may_write_now(ws: WebSocketConnection) -> bool:
    """Whether a ``write_now`` would not overtake another write (for a ``ws`` that
    ``writes_to_socket``)."""
    return not ws._close_reason and not ws._stream_lock.locked()


def write_now(ws: WebSocketConnection, data: bytes) -> int:
    """Write what the socket takes of ``data`` right now, without yielding. Returns the
    number of bytes written, or -1 when this path is closed: another write holds the lock
    (the caller must not overtake it), the stream is not a socket, or the connection is
    closing (the lock path reports that as ``ConnectionClosed``)."""
    if not coalesces_writes(ws) or ws._close_reason or ws._stream_lock.locked():
        return -1
    fd = _descriptor(ws._stream)
    if fd < 0:
        return -1
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError:
        return -1  # broken: the lock path fails the same way and aborts the connection


async def send_framed(ws: WebSocketConnection, data: bytes) -> None:
    """Write framed ``data``: at once when the socket takes it, else what is left under the
    stream lock. Raises ``ConnectionClosed`` like ``send_message``."""
    written = write_now(ws, data)
    if written == len(data):
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    lock = ws._stream_lock
    if written > 0:
        # Part of a frame is on the wire: hold the lock before anything can yield, so no
        # other write lands in the middle of it.
        lock.acquire_nowait()
    else:
        written = 0
        await lock.acquire()
    try:
        await ws._stream.send_all(data[written:])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # What trio-websocket does when its own write fails: the peer is gone.
        await ws._abort_web_socket()
        assert ws._close_reason is not None
        raise ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()


async def send_messages(ws: WebSocketConnection, messages: Sequence[bytes | str]) -> None:
    """Send ``messages`` in order as separate WebSocket messages, framed together and
    written at once (straight to the socket when it takes them): one system call for a
    burst instead of one per message, with the same wire bytes as sending each on its own.

    Raises ``ConnectionClosed`` like ``WebSocketConnection.send_message``."""
    if not messages:
        return
    if not coalesces_writes(ws):
        for message in messages:
            await ws.send_message(message)
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    await send_framed(ws, frame_messages(ws, messages))


def reads_in_bursts(ws: WebSocketConnection) -> bool:
    """Whether ``read_in_bursts`` and ``take_received`` can work on ``ws``."""
    known = _bursting.get(type(ws))
    if known is None:
        known = _bursting[type(ws)] = all(
            hasattr(ws, name) for name in _READ_INTERNALS
        ) and isinstance(ws._recv_channel, trio.MemoryReceiveChannel)
        if not known:
            log.warning("trio-websocket internals changed: received messages come one by one")
    return known


class _QueueWithoutYielding:
    """Stands in for the reader task's end of the message channel: a message goes in at
    once while there is room, without the scheduler pass ``MemorySendChannel.send`` takes
    after each one, so every message of one read is queued before the reader next waits
    (on the stream, which is its checkpoint). When the channel is full it waits for room
    like the channel itself: the queue bound still holds a reader that stops reading."""

    def __init__(self, inner: trio.MemorySendChannel[Any]) -> None:
        self._inner = inner

    async def send(self, value: Any) -> None:
        try:
            self._inner.send_nowait(value)
        except trio.WouldBlock:
            await self._inner.send(value)

    def __getattr__(self, name: str) -> Any:
        # aclose, close, statistics, ...: the channel's own.
        return getattr(self._inner, name)


def read_in_bursts(ws: WebSocketConnection) -> None:
    """Make ``ws``'s reader queue every message of one read before yielding, so that
    ``take_received`` after a ``get_message`` takes the rest of the burst."""
    if reads_in_bursts(ws) and not isinstance(ws._send_channel, _QueueWithoutYielding):
        # Duck-typed: the reader only calls send and aclose on it.
        ws._send_channel = _QueueWithoutYielding(ws._send_channel)  # type: ignore[assignment]


def take_received(ws: WebSocketConnection, limit: int) -> list[bytes | str]:
    """Up to ``limit`` messages already received on ``ws``, without waiting (none when the
    internals moved, or the connection closed: the next ``get_message`` says so)."""
    if not reads_in_bursts(ws):
        return []
    receive_nowait = ws._recv_channel.receive_nowait
    taken: list[bytes | str] = []
    while len(taken) < limit:
        try:
            taken.append(receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    return taken
