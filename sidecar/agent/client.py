"""A Python client for agents: connect to the sidecar's Unix socket, then either hand it a
handler (``await agent.run(handle)``), take messages one at a time (``async for message in
agent.messages():`` answering each with ``message.ack()``/``fail``/``extend``), or pull,
ack, fail, extend and publish yourself.
Written for trio; ``sidecar.client_asyncio`` offers the same calls for asyncio programs, and
proto/PROTOCOL.md describes the protocol for any language (see proto/node/agent.js).

    import trio
    from sidecar.client import Failure, open_agent, run_agent

    async def handle(message):
        if not message.body:
            raise Failure("VALIDATION_FAILED", "empty body")
        ...  # other exceptions are mapped to reasons: TimeoutError -> TIMEOUT, ...

    async def main():
        async with open_agent("/run/sidecar/agent.sock", agent="parser", queues=["html.raw"]) as a:
            await a.run(handle)

    run_agent(main)  # Ctrl-C closes the connection cleanly (1000) and exits quietly

Trace context: a message published while a handler runs under ``run`` continues the trace
of the message being handled (its W3C ``traceparent`` header is carried over); elsewhere
pass the delivery, ``publish(body, queue=..., trace=message)``.

Publishing fast: call ``publish`` from several tasks at once (a nursery under a semaphore,
say); the publishes queued before the client's writer next runs leave in one socket write,
and their answers, read together, wake their tasks together.

Errors the sidecar answers with are raised as ``SidecarError`` subclasses at the call that
caused them: ``fail`` with a reason the sidecar does not accept and ``ack``/``fail``/
``extend`` of an id the agent does not hold are caught before anything is sent; a refused
``publish`` or ``pull`` raises when the sidecar's answer arrives.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from sidecar import protocol as p
from sidecar.agent.prefetch import Prefetch
from sidecar.tracecontext import TRACEPARENT, TRACESTATE, trace_context
from sidecar.wsburst import read_in_bursts, send_messages, take_received

log = logging.getLogger("sidecar.client")

MIN_RESEND = 0.05  # a throttled publish is never resent sooner than this
READ_BURST = 256  # frames routed per wake-up of the reader before it yields


# --- errors ------------------------------------------------------------------------------


class SidecarError(Exception):
    """The sidecar refused something; ``code`` is the error frame's code."""

    def __init__(self, frame: p.Error) -> None:
        super().__init__(f"{frame.code}: {frame.message}")
        self.code = frame.code
        self.frame = frame


class UnknownReason(SidecarError):
    """``fail`` named a reason this sidecar does not accept (see ``welcome.reasons``)."""


class UnknownDelivery(SidecarError):
    """``ack``, ``fail`` or ``extend`` named ids this agent does not hold (never handed
    out, already answered, or expired); ``ids`` lists them."""

    def __init__(self, frame: p.Error) -> None:
        super().__init__(frame)
        self.ids: list[int] = list(frame.ids or ([] if frame.ref is None else [frame.ref]))


class DeadlineExpired(SidecarError):
    """The delivery was not answered by its deadline; the sidecar took it back."""


class InvalidRequest(SidecarError):
    """A frame the sidecar could not accept (malformed, or a value out of range)."""


class PublishRefused(InvalidRequest):
    """``invalid_publish``: the publish itself is wrong (target, size, headers)."""


class HandshakeRefused(SidecarError):
    """The sidecar refused the connection (a fatal error during the handshake)."""


class SidecarClosed(ConnectionError):
    """The connection to the sidecar ended while a call was waiting for its answer."""


_ERRORS: dict[str, type[SidecarError]] = {
    "unknown_reason": UnknownReason,
    "unknown_delivery": UnknownDelivery,
    "deadline_expired": DeadlineExpired,
    "invalid_publish": PublishRefused,
}


def error_for(frame: p.Error) -> SidecarError:
    """The typed exception for an error frame."""
    if frame.fatal:
        return HandshakeRefused(frame)
    return _ERRORS.get(frame.code, InvalidRequest)(frame)


def _local_error(code: str, message: str, **fields: Any) -> SidecarError:
    return error_for(p.Error(code=code, message=message, **fields))


# --- the handler loop's failure mapping ------------------------------------------------


class Failure(Exception):
    """Raise from a handler to fail the message with ``reason`` (and an optional hint)."""

    def __init__(self, reason: str, error: str = "", *, retry_after: float | None = None):
        super().__init__(f"{reason}: {error}" if error else reason)
        self.reason = reason
        self.error = error
        self.retry_after = retry_after


# Most specific first: the first matching class decides.
DEFAULT_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (TimeoutError, "TIMEOUT"),
    (trio.TooSlowError, "TIMEOUT"),
    (ConnectionError, "NETWORK_ERROR"),
    (OSError, "NETWORK_ERROR"),
    (UnicodeError, "VALIDATION_FAILED"),
    (json.JSONDecodeError, "VALIDATION_FAILED"),
    (KeyError, "VALIDATION_FAILED"),
    (ValueError, "VALIDATION_FAILED"),
    (TypeError, "VALIDATION_FAILED"),
    (Exception, "PROCESSING_ERROR"),
)


def reason_for(
    exc: Exception, mapping: Iterable[tuple[type[BaseException], str]] = DEFAULT_REASONS
) -> tuple[str, str, float | None]:
    """(reason, error text, retry_after) for an exception a handler raised."""
    if isinstance(exc, Failure):
        return exc.reason, exc.error, exc.retry_after
    for kind, reason in mapping:
        if isinstance(exc, kind):
            return reason, f"{type(exc).__name__}: {exc}"[:1024], None
    return "PROCESSING_ERROR", f"{type(exc).__name__}: {exc}"[:1024], None


Handler = Callable[[p.Delivery], Awaitable[Any] | Any]

# --- trace context -----------------------------------------------------------------------

# The delivery whose handler is running (set by ``run``/``run_batches``), so what it
# publishes continues that delivery's trace without the handler passing it along.
_handling: ContextVar[p.Delivery | None] = ContextVar("sidecar_handling", default=None)


def with_trace(fields: dict[str, Any], trace: p.Delivery | None) -> dict[str, Any]:
    """Publish ``fields`` carrying ``trace``'s W3C trace context (``traceparent`` and
    ``tracestate`` headers), unless the agent set a ``traceparent`` itself or the delivery
    carried no valid one."""
    if trace is None:
        return fields
    headers = fields.get("headers") or {}
    if TRACEPARENT in headers:
        return fields
    context = trace_context(trace.headers)
    if context is None:
        return fields
    carried = {**headers, TRACEPARENT: context.traceparent}
    if context.state is not None:
        carried[TRACESTATE] = context.state
    return {**fields, "headers": carried}


def traced_fields(fields: dict[str, Any], trace: p.Delivery | None) -> dict[str, Any]:
    """``with_trace`` for a publish: the delivery given, else the one being handled."""
    return with_trace(fields, trace if trace is not None else _handling.get())


class Message:
    """One delivery handed out by ``messages()``, with the calls that answer it. The
    delivery's fields are readable here too (``message.body``, ``message.attempt``, ...)."""

    __slots__ = ("_calls", "delivery")

    def __init__(self, delivery: p.Delivery, calls: AgentCalls) -> None:
        self.delivery = delivery
        self._calls = calls

    async def ack(self) -> None:
        """Done. The ack goes out with the others of the same burst: at the latest when
        the agent next waits (for input or anything else), or after ``ACK_DELAY``."""
        self._calls._ack_soon(self.delivery.id)

    async def fail(self, reason: str, error: str = "", retry_after: float | None = None) -> None:
        await self._calls.fail(self.delivery.id, reason, error, retry_after)

    async def extend(self, seconds: float) -> None:
        await self._calls.extend([self.delivery.id], seconds)

    async def publish(self, body: bytes, *, queue: str | None = None, **fields: Any) -> p.Published:
        """``publish`` continuing this message's trace (its ``traceparent``)."""
        return await self._calls.publish(body, queue=queue, trace=self.delivery, **fields)

    @property
    def id(self) -> int:
        return self.delivery.id

    @property
    def queue(self) -> str:
        return self.delivery.queue

    @property
    def body(self) -> bytes:
        return self.delivery.body

    @property
    def attempt(self) -> int:
        return self.delivery.attempt

    @property
    def deadline(self) -> float:
        return self.delivery.deadline

    @property
    def headers(self) -> dict[str, Any]:
        return self.delivery.headers

    @property
    def routing_key(self) -> str:
        return self.delivery.routing_key

    @property
    def exchange(self) -> str:
        return self.delivery.exchange

    @property
    def message_id(self) -> str | None:
        return self.delivery.message_id

    @property
    def content_type(self) -> str | None:
        return self.delivery.content_type

    @property
    def priority(self) -> int | None:
        return self.delivery.priority

    @property
    def redelivered(self) -> bool:
        return self.delivery.redelivered

    @property
    def reduced_scope(self) -> bool:
        return self.delivery.reduced_scope

    def __repr__(self) -> str:
        return f"Message(id={self.id}, queue={self.queue!r}, attempt={self.attempt})"


class Messages:
    """The iterator ``messages()`` returns: one delivery per step, a pull kept in flight
    while the agent works on the buffered ones."""

    def __init__(
        self, calls: AgentCalls, batch: int, wait: float, stop: Callable[[], bool] | None
    ) -> None:
        self._calls = calls
        self._batch = batch
        self._wait = wait
        self._stop = stop

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> Message:
        calls, prefetch = self._calls, self._calls._prefetch
        prefetch.resumed(calls._now())
        while True:
            if self._stop is not None and self._stop():
                await calls._flush_acks()
                raise StopAsyncIteration
            now = calls._now()
            if prefetch.acks_overdue(now):
                await calls._flush_acks()
            want = prefetch.want(
                batch=self._batch,
                held=len(calls._held),
                limits=calls.welcome.limits if calls.welcome is not None else None,
                batch_size=calls._batch_size(),
            )
            if want:
                # Acks first (the sidecar counts unanswered deliveries against the limit),
                # in the same write as the pull.
                await calls._send_pull(want, self._wait, with_acks=True)
            if prefetch.head_due(now):
                await calls._extend_buffered(now)
            delivery = prefetch.take(calls._held, now)
            if delivery is not None:
                calls._wake_keeper()
                return Message(delivery, calls)
            await calls._flush_acks()  # never hold an ack while waiting for input
            await calls._receive_batch()


class AgentCalls:
    """The calls shared by every transport: subclasses provide ``send``, ``_next_batch``,
    the clock and the keeper's sleep, and feed batches and errors through
    ``_track_batch``/``_track_error``."""

    welcome: p.Welcome | None
    pressure: p.Pressure | None

    def _init_calls(self) -> None:
        self.errors: list[p.Error] = []  # errors no call was waiting for, newest last
        self._held: set[int] = set()
        self._prefetch = Prefetch()

    async def send(self, frame: p.Frame) -> None:
        raise NotImplementedError

    async def _next_batch(self) -> list[p.Delivery]:
        """The answer to the pull that is out (raises what the sidecar refused it with)."""
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    async def publish(self, body: bytes, *, queue: str | None = None, **fields: Any) -> p.Published:
        raise NotImplementedError

    def _wake_keeper(self) -> None:
        """Let the keeper run once the agent's task next waits."""
        raise NotImplementedError

    async def _doze(self, until: float | None) -> None:
        """Sleep until woken, or until ``until`` (the event loop's clock) if given."""
        raise NotImplementedError

    def _track_batch(self, batch: p.Batch) -> None:
        self._held.update(m.id for m in batch.messages)

    def _track_error(self, frame: p.Error) -> None:
        if frame.code == "deadline_expired" and frame.ref is not None:
            self._held.discard(frame.ref)
        elif frame.code == "unknown_delivery":
            self._held.difference_update(frame.ids or ())
        self.errors.append(frame)
        del self.errors[:-100]  # keep the recent ones, not all of a long session's
        if frame.code != "deadline_expired":
            log.warning("sidecar refused a frame: %s: %s", frame.code, frame.message)

    def _check_held(self, ids: list[int]) -> None:
        unknown = [i for i in ids if i not in self._held]
        if unknown:
            raise _local_error(
                "unknown_delivery",
                f"{len(unknown)} id(s) not held by this agent",
                ref=unknown[0],
                ids=unknown,
            )

    def _batch_size(self) -> int:
        """The batch size the sidecar's memory pressure allows now."""
        if self.pressure is not None:
            return self.pressure.batch_size
        return self.welcome.batch_size if self.welcome is not None else 1

    # --- pulling -------------------------------------------------------------------------

    async def send_many(self, frames: list[p.Frame]) -> None:
        """Send ``frames`` in order; a transport that can writes them at once."""
        for frame in frames:
            await self.send(frame)

    async def _send_pull(self, want: int, wait: float, *, with_acks: bool = False) -> None:
        """Send a pull; with ``with_acks``, the acks waiting to go out first, in the same
        write (the sidecar then reads both in one wake-up)."""
        pull = p.Pull(max=want, wait=wait)
        if with_acks and self._prefetch.pending_acks:
            await self.send_many([p.Ack(ids=self._prefetch.take_acks()), pull])
        else:
            await self.send(pull)
        self._prefetch.pulled()

    async def _answer_to_pull(self) -> list[p.Delivery]:
        """Wait for the batch answering the pull that is out."""
        while True:
            try:
                messages = await self._next_batch()
            except SidecarError as exc:
                if exc.code == "pull_in_progress":
                    # A pull whose sender was cancelled mid-send went out after all: its
                    # batch is the one to wait for.
                    continue
                self._prefetch.pull_answered()
                raise
            self._prefetch.pull_answered()
            return messages

    async def _receive_batch(self) -> None:
        """Wait for the pull that is out and buffer its batch."""
        messages = await self._answer_to_pull()
        self._prefetch.arrived(messages, self._now())

    async def pull(self, max: int = 10, wait: float = 1.0) -> list[p.Delivery]:
        """Up to ``max`` deliveries, waiting at most ``wait`` seconds for the first. What
        ``messages()`` buffered and did not hand out comes first, without a new pull."""
        prefetch = self._prefetch
        if prefetch.pulling:
            await self._receive_batch()
        if prefetch.buffer:
            return prefetch.take_many(max, self._held)
        await self._send_pull(max, wait)
        # Straight to the caller, not through the buffer: one that the sidecar took back
        # meanwhile (its deadline expired) is left out, as ``take_many`` would.
        held = self._held
        return [m for m in await self._answer_to_pull() if m.id in held]

    def messages(
        self, *, batch: int = 50, wait: float = 5.0, stop: Callable[[], bool] | None = None
    ) -> Messages:
        """Deliveries one at a time, for ``async for message in agent.messages():``.

        Answer each with ``await message.ack()`` / ``fail(...)`` / ``extend(...)``. Behind
        it, up to ``batch`` deliveries (within the Welcome's limits) are pulled ahead while
        the agent works, and acks of a burst go out in one frame. The loop ends when
        ``stop()`` is true (checked before each message and after each idle ``wait``).

        Leaving the loop early keeps what was pulled ahead held by this connection: the
        next ``messages()`` or ``pull()`` hands it out first, and closing the connection
        (1000, as ``open_agent`` does) returns it to the queue uncharged. A buffered
        delivery has its deadline moved while the agent works on the message handed out
        last; left alone after the loop, it runs to its deadline (charged TIMEOUT)."""
        return Messages(self, batch, wait, stop)

    # --- answers -------------------------------------------------------------------------

    async def ack(self, ids: list[int]) -> None:
        self._check_held(ids)
        self._held.difference_update(ids)
        await self.send(p.Ack(ids=ids))

    def _ack_soon(self, delivery_id: int) -> None:
        self._check_held([delivery_id])
        self._held.discard(delivery_id)
        self._prefetch.ack_later(delivery_id, self._now())
        self._wake_keeper()

    async def _flush_acks(self) -> None:
        if self._prefetch.pending_acks:
            await self.send(p.Ack(ids=self._prefetch.take_acks()))

    async def _extend_buffered(self, now: float) -> None:
        for seconds, ids in self._prefetch.extensions(now).items():
            await self.send(p.Extend(ids=ids, seconds=seconds))

    async def _keep(self) -> None:
        """Runs beside the agent for the life of the connection: sends waiting acks as
        soon as the agent's task waits for anything, and extends buffered deliveries while
        the agent works on the message handed out last."""
        prefetch = self._prefetch
        while True:
            engaged = prefetch.last_handed in self._held
            await self._doze(prefetch.next_due(engaged))
            await self._flush_acks()
            if prefetch.last_handed in self._held:
                await self._extend_buffered(self._now())

    async def fail(
        self, id: int, reason: str, error: str = "", retry_after: float | None = None
    ) -> None:
        accepted = self.welcome.reasons if self.welcome is not None else []
        if accepted and reason.upper() not in accepted:
            raise _local_error(
                "unknown_reason",
                f"unknown failure reason {reason!r}; this sidecar accepts {', '.join(accepted)}",
                ref=id,
            )
        self._check_held([id])
        self._held.discard(id)
        await self.send(p.Fail(id=id, reason=reason, error=error, retry_after=retry_after))

    async def extend(self, ids: list[int], seconds: float) -> None:
        self._check_held(ids)
        await self.send(p.Extend(ids=ids, seconds=seconds))

    async def _handle_one(
        self,
        handler: Handler,
        message: Message,
        mapping: Iterable[tuple[type[BaseException], str]],
    ) -> None:
        handling = _handling.set(message.delivery)
        try:
            result = handler(message.delivery)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            reason, error, retry_after = reason_for(exc, mapping)
            try:
                await message.fail(reason, error, retry_after)
            except UnknownReason:
                log.warning("handler raised unknown reason %r; failing as PROCESSING_ERROR", reason)
                await message.fail("PROCESSING_ERROR", error, retry_after)
            return
        finally:
            _handling.reset(handling)
        await message.ack()

    async def run_batches(
        self,
        handler: Handler,
        *,
        batch: int = 10,
        wait: float = 5.0,
        reasons: Mapping[type[BaseException], str] | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Handle messages one at a time (through ``messages()``) until ``stop()`` is true:
        each message is acked when the handler returns, and failed with the reason its
        exception maps to when it raises (``Failure`` names one; ``reasons`` adds or
        overrides mappings for exception types). A message whose deadline expired
        meanwhile is skipped, not an error."""
        mapping = [*(reasons or {}).items(), *DEFAULT_REASONS]
        async for message in self.messages(batch=batch, wait=wait, stop=stop):
            try:
                await self._handle_one(handler, message, mapping)
            except UnknownDelivery as exc:
                log.warning("message %s was taken back before its answer: %s", exc.ids, exc)


# --- trio --------------------------------------------------------------------------------


class _Answer:
    """Where the reader leaves the answer to one publish (an event and a slot: lighter
    than a channel per publish)."""

    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.answer: p.Published | SidecarError | None = None
        self.done = trio.Event()

    def give(self, answer: p.Published | SidecarError) -> None:
        self.answer = answer
        self.done.set()


class AgentClient(AgentCalls):
    def __init__(self, ws: WebSocketConnection, *, binary: bool = True) -> None:
        self._init_calls()
        self.ws = ws
        self.binary = binary
        self.codec = p.Codec()
        self.welcome: p.Welcome | None = None
        self.pressure: p.Pressure | None = None
        self._refs = itertools.count(1)
        self._batch: trio.MemorySendChannel[p.Batch | SidecarError]
        self._batch, self._batches = trio.open_memory_channel[p.Batch | SidecarError](8)
        self._published: dict[int, _Answer] = {}
        self._welcome = trio.Event()
        self._fatal: p.Error | None = None
        self._keeper_wake = trio.Event()
        # Publish frames waiting for the writer: those queued by any number of tasks before
        # it runs leave in one socket write.
        self._unsent: list[bytes | str] = []
        self._writer_wake = trio.Event()
        self._writer_running = False

    async def send(self, frame: p.Frame) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[p.Frame]) -> None:
        # In one write, straight to the socket when it takes it at once (``send_message``
        # yields twice per frame: its lock and trio's send, a scheduler pass each).
        data = [self.codec.encode(frame, binary=self.binary) for frame in frames]
        if self._unsent:
            # Never overtake the publishes queued before these frames.
            unsent, self._unsent = self._unsent, []
            data = unsent + data
        await send_messages(self.ws, data)

    async def _flush_unsent(self) -> None:
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            await send_messages(self.ws, unsent)

    async def writer(self) -> None:
        """Send the queued publish frames, everything queued at a wake-up in one write;
        runs for the life of the connection (``open_agent`` starts it)."""
        self._writer_running = True
        try:
            while True:
                await self._writer_wake.wait()
                self._writer_wake = trio.Event()
                await self._flush_unsent()
        except (ConnectionClosed, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the reader sees the close and wakes every waiting publish
        finally:
            self._writer_running = False

    async def hello(
        self, agent: str, queues: list[str], *, version: str = "", token: str | None = None
    ) -> p.Welcome:
        await self.send(
            p.Hello(agent=agent, version=version, pid=os.getpid(), queues=queues, token=token)
        )
        await self._welcome.wait()
        if self.welcome is None:
            if self._fatal is not None:
                raise HandshakeRefused(self._fatal)
            raise SidecarClosed("the sidecar closed the connection during the handshake")
        return self.welcome

    async def reader(self) -> None:
        """Route incoming frames; runs for the life of the connection. Everything received
        in one read is routed in one wake-up (a burst of ``published`` answers wakes its
        publishers together, so their next publishes share a write)."""
        ws = self.ws
        read_in_bursts(ws)
        try:
            while True:
                batch = self._route(await ws.get_message())
                if batch is not None:
                    await self._batch.send(batch)
                for data in take_received(ws, READ_BURST):
                    if (batch := self._route(data)) is not None:
                        await self._batch.send(batch)
        except (ConnectionClosed, trio.ClosedResourceError):
            pass
        finally:
            self._welcome.set()
            self._batch.close()
            for waiter in self._published.values():
                waiter.done.set()  # no answer: the connection closed
            self._published.clear()

    def _route(self, data: bytes | str) -> p.Batch | None:
        """Route one frame; a batch is returned for the reader to queue (it may wait)."""
        frame = self.codec.decode_sidecar(data)
        if isinstance(frame, p.Published):
            waiter = self._published.pop(frame.ref, None)
            if waiter is not None:
                waiter.give(frame)
        elif isinstance(frame, p.Batch):
            self._track_batch(frame)
            return frame
        elif isinstance(frame, p.Welcome):
            self.welcome = frame
            self._welcome.set()
        elif isinstance(frame, p.Pressure):
            self.pressure = frame
        elif isinstance(frame, p.Error):
            self._route_error(frame)
        return None

    def _route_error(self, frame: p.Error) -> None:
        if frame.fatal:
            self._fatal = frame
            self._welcome.set()
        if frame.code == "invalid_publish" and frame.ref is not None:
            waiter = self._published.pop(frame.ref, None)
            if waiter is not None:
                waiter.give(error_for(frame))
                return
        if frame.code in ("invalid_pull", "pull_in_progress"):
            try:
                self._batch.send_nowait(error_for(frame))
                return
            except trio.WouldBlock:
                pass
        self._track_error(frame)

    async def _next_batch(self) -> list[p.Delivery]:
        try:
            answer = await self._batches.receive()
        except trio.EndOfChannel:
            raise SidecarClosed("the connection to the sidecar closed") from None
        if isinstance(answer, SidecarError):
            raise answer
        return answer.messages

    def _now(self) -> float:
        return trio.current_time()

    def _wake_keeper(self) -> None:
        self._keeper_wake.set()

    async def _doze(self, until: float | None) -> None:
        with trio.move_on_at(math.inf if until is None else until):
            await self._keeper_wake.wait()
        self._keeper_wake = trio.Event()

    async def keeper(self) -> None:
        """The keeper (see ``AgentCalls._keep``) until the connection closes."""
        with suppress(ConnectionClosed, trio.ClosedResourceError, trio.BrokenResourceError):
            await self._keep()

    async def publish_once(
        self,
        body: bytes,
        *,
        queue: str | None = None,
        trace: p.Delivery | None = None,
        **fields: Any,
    ) -> p.Published:
        """One publish frame and its answer, throttled or not. The message continues the
        trace of ``trace`` (a delivery), or of the delivery whose handler is running."""
        ref = next(self._refs)
        fields = traced_fields(fields, trace)
        waiter = self._published[ref] = _Answer()
        frame = p.Publish(ref=ref, body=body, queue=queue, **fields)
        try:
            if self._writer_running:
                # Queued for the writer: publishes from many tasks share one write.
                self._unsent.append(self.codec.encode(frame, binary=self.binary))
                self._writer_wake.set()
            else:
                await self.send(frame)
            await waiter.done.wait()
        finally:
            self._published.pop(ref, None)
        answer = waiter.answer
        if answer is None:
            raise SidecarClosed("the connection closed before the publish was answered")
        if isinstance(answer, SidecarError):
            raise answer
        return answer

    async def publish(self, body: bytes, *, queue: str | None = None, **fields: Any) -> p.Published:
        """Publish and wait for the final answer: the broker's confirm (``ok``) or its
        refusal. A throttled answer is resent after its ``retry_after``, so nothing is
        dropped; an invalid publish raises ``PublishRefused``."""
        while True:
            result = await self.publish_once(body, queue=queue, **fields)
            if not result.throttled:
                return result
            await trio.sleep(max(result.retry_after or 0.0, MIN_RESEND))

    publish_with_backoff = publish  # the name earlier releases used

    async def run(
        self,
        handler: Handler,
        *,
        batch: int = 10,
        wait: float = 5.0,
        reasons: Mapping[type[BaseException], str] | None = None,
    ) -> None:
        """Handle messages until cancelled (or Ctrl-C, under ``run_agent``)."""
        await self.run_batches(handler, batch=batch, wait=wait, reasons=reasons)


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
    """Connect, say hello, and keep a reader running until the block exits. Leaving the
    block for any reason (Ctrl-C included) closes with 1000, so what the agent still holds
    is requeued uncharged."""
    stream = await connect_unix(socket_path)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                "localhost",
                "/",
                message_queue_size=64,
                max_message_size=64 * 1024 * 1024,
                # trio-websocket reads 4 KiB at a time by default: a batch of 50 took four
                # reads (and wake-ups) to arrive. The sidecar's end reads 256 KiB.
                receive_buffer_size=256 * 1024,
            )
            client = AgentClient(ws, binary=binary)
            nursery.start_soon(client.reader)
            nursery.start_soon(client.writer)
            nursery.start_soon(client.keeper)
            try:
                await client.hello(agent, queues, version=version, token=token)
                yield client
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    with suppress(ConnectionClosed, trio.ClosedResourceError):
                        await client._flush_acks()  # acks given are acks sent
                        await client._flush_unsent()  # and publishes queued are sent
                    await ws.aclose(code=1000)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure wrapped by the nursery reads better unwrapped: a Ctrl-C is a
        # KeyboardInterrupt, a refused handshake a HandshakeRefused.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def run_agent(main: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """``trio.run(main, *args)`` for an agent program: Ctrl-C ends it quietly (exit 130)
    once ``open_agent`` has closed the connection cleanly."""
    try:
        trio.run(main, *args)
    except KeyboardInterrupt:
        print("interrupted; connection closed", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseExceptionGroup as group:
        interrupted, rest = group.split(KeyboardInterrupt)
        if interrupted is not None and rest is None:
            print("interrupted; connection closed", file=sys.stderr)
            raise SystemExit(130) from None
        raise
