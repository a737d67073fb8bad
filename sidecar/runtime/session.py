"""One agent connection: handshake, then frames dispatched to the engine and publish gate.

Bad input never takes the daemon down: each refused frame is answered with an ``error``
frame naming the problem, and the session keeps serving. Only a broken handshake, a wrong
token, or an agent that stops reading its socket ends the connection.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from sidecar import limits
from sidecar import protocol as p
from sidecar.config import AgentConfig, ThrottleConfig
from sidecar.core.messages import MessageProps
from sidecar.core.port import BrokerPort
from sidecar.metrics import Metrics
from sidecar.runtime.backpressure import HELD_RETRY_AFTER, PublishGate
from sidecar.runtime.engine import Engine
from sidecar.wsburst import (
    coalesces_writes,
    frame_messages,
    may_write_now,
    read_in_bursts,
    send_framed,
    send_messages,
    take_received,
    write_now,
    writes_to_socket,
)

log = logging.getLogger("sidecar.session")

HANDSHAKE_TIMEOUT = 10.0
MAX_UNKNOWN_IDS = 10000  # ids named in one unknown_delivery error
OUTBOX_LIMIT = 4096  # frames queued for an agent that is not reading: then we drop it
# Encoded bytes the writer gathers for one write to the socket: what is queued at a wake-up
# goes out together, but a burst of large batches is not copied into one huge buffer.
WRITE_BURST_BYTES = 256 * 1024
# Frames handled per wake-up of the reader before it yields: a burst an agent wrote at once
# (say, a window of publishes) is dispatched together, so it reaches the broker as one
# handoff and one write.
READ_BURST = 256
_QUEUE_NAME = re.compile(r"^(?!amq\.)[^\x00-\x1f]{1,255}$")
# retry_after of a throttled publish: never 0 (an agent obeying it exactly must not spin),
# never so long that an idle queue is left waiting.
MIN_RETRY_AFTER = 0.05
MAX_RETRY_AFTER = 60.0
PUMP_RECHECK = 1.0  # held targets are re-checked at least this often (rates follow depth)
DISCONNECTED_RECHECK = 0.2
MAX_SLOT_TARGETS = 256  # targets whose next throttled slot is remembered
MAX_CHECKED_QUEUES = 1024  # publish queue names remembered as valid, not matched again


class Outbox:
    """What waits for the session's writer, in order: frames, or bytes already framed for
    the wire (the rest of a direct write the socket did not take at once)."""

    def __init__(self, limit: int) -> None:
        self.items: deque[p.Frame | bytes] = deque()
        self.limit = limit
        self.closed = False
        self.changed = trio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: p.Frame | bytes) -> None:
        """Raises ``trio.WouldBlock`` when full, ``trio.ClosedResourceError`` once closed."""
        if self.closed:
            raise trio.ClosedResourceError
        if len(self.items) >= self.limit:
            raise trio.WouldBlock
        self.items.append(item)
        self.changed.set()

    def receive_nowait(self) -> p.Frame | bytes:
        if not self.items:
            raise trio.WouldBlock
        return self.items.popleft()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def wait(self) -> bool:
        """Until something is queued; False once closed and empty."""
        while not self.items:
            if self.closed:
                return False
            self.changed = trio.Event()
            await self.changed.wait()
        return True


@dataclass(slots=True)
class _Queued:
    """A publish accepted into the session's queue, waiting for a token."""

    frame: p.Publish
    exchange: str
    routing_key: str
    size: int


class Session:
    """Serves one connected agent."""

    _ids = itertools.count(1)

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        agent: AgentConfig,
        throttle: ThrottleConfig,
        host: str,
        engine: Engine,
        broker: BrokerPort,
        gate: PublishGate,
        metrics: Metrics,
        codec: p.Codec,
        over_tcp: bool,
        consume: Callable[[str], Any],
    ) -> None:
        self.ws = ws
        # Only the settings a session uses: the agent's limits, its publish queue, our name.
        self.agent_settings = agent
        self.throttle = throttle
        self.host = host
        self.engine = engine
        self.broker = broker
        self.gate = gate
        self.metrics = metrics
        self.codec = codec
        self.over_tcp = over_tcp
        self.consume = consume
        self.id = next(self._ids)
        self.binary = False
        self.hello: p.Hello | None = None
        self.pulling = False
        self._outbox = Outbox(OUTBOX_LIMIT)
        # Set while the writer holds frames it took from the outbox and has not written:
        # a direct write then would overtake them.
        self._writing = False
        self._direct: bool | None = None  # whether frames may be written without the writer
        self.crashed = True
        self._nursery: trio.Nursery | None = None
        # Publishes waiting for their target's token bucket, one FIFO per target so a held
        # target does not stall the others; bounded in count and bytes across targets.
        self._queued: dict[str, deque[_Queued]] = {}
        self._queued_count = 0
        self._queued_bytes = 0
        # Per target: the earliest time the next throttled publish is told to come back,
        # so a crowd of refused publishes is spread out instead of returning all at once.
        self._next_slot: dict[str, float] = {}
        # When each target with queued publishes is next looked at: (time, seq, target), one
        # entry per such target, so the pump's work per publish is logarithmic, not a scan.
        self._due: list[tuple[float, int, str]] = []
        self._due_seq = itertools.count()
        self._pump_wake = trio.Event()
        self._checked_queues: set[str] = set()
        self._published_ok = metrics.published.labels("ok")
        self._published_error = metrics.published.labels("error")
        # The waiting pull's end (trio clock) and the timer's scope, whose deadline follows
        # it: moving a deadline wakes nobody, so a pull answered in time costs no wake-up.
        self._pull_until = math.inf
        self._pull_timer_scope: trio.CancelScope | None = None

    # --- sending -----------------------------------------------------------------------

    def send(self, frame: p.Frame) -> None:
        if (
            not self._outbox.items
            and not self._writing
            and type(frame) is not p.Published
            and self._may_write_directly()
        ):
            self._write_directly(frame)
            return
        self._queue(frame)

    def _queue(self, item: p.Frame | bytes) -> None:
        try:
            self._outbox.put(item)
        except trio.WouldBlock:
            # The agent stopped reading; buffering without bound would eat our memory, and a
            # polite close would block on the same full socket. Cut the connection.
            log.warning("agent session %d is not reading its socket; dropping it", self.id)
            self.metrics.protocol_errors.labels("not_reading").inc()
            self.crashed = False
            self._outbox.close()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        except trio.ClosedResourceError:
            # The connection is closing (its writer is gone): a late notice, such as a
            # deadline that expired meanwhile, has nobody to go to.
            pass

    def _may_write_directly(self) -> bool:
        if self._direct is None:
            self._direct = self.ws is not None and writes_to_socket(self.ws)
        return self._direct and not self._outbox.closed and may_write_now(self.ws)

    def _write_directly(self, frame: p.Frame) -> None:
        """Write ``frame`` now, without waking the writer (a batch answering a pull at
        a paced rate was a writer wake-up and two more yields per message); what the
        socket does not take at once is left to the writer, ahead of anything later."""
        data = self._encode(frame)
        if data is None:
            return
        try:
            framed = frame_messages(self.ws, [data])
        except ConnectionClosed:
            return  # the connection is closing: nobody to tell (as for a queued frame)
        written = write_now(self.ws, framed)
        if written < len(framed):
            self._queue(framed[max(written, 0) :])

    def refuse(self, error: p.ProtocolError, *, fatal: bool = False) -> None:
        self.metrics.protocol_errors.labels(error.code).inc()
        log.info("agent session %d: %s: %s", self.id, error.code, error.message)
        self.send(error.to_frame(fatal=fatal))

    async def _writer(self) -> None:
        """Send what the outbox holds: everything queued by the time this task wakes (a
        batch, the ``published`` answers of one read of confirms, errors) goes out in one
        write, in order, each frame still its own WebSocket message."""
        outbox = self._outbox
        framing = self.ws is not None and coalesces_writes(self.ws)
        try:
            while await outbox.wait():
                if type(outbox.items[0]) is p.Published:
                    # Confirms arrive a few per read of the broker's socket: one turn for
                    # the tasks already runnable lets the next read's answers join this
                    # write. A batch, which a pull is waiting for, goes at once.
                    await trio.lowlevel.checkpoint()
                self._writing = True
                burst: list[bytes | str] = []
                framed: list[bytes] = []
                size = 0
                while outbox.items and size < WRITE_BURST_BYTES:
                    item = outbox.items.popleft()
                    if type(item) is bytes:
                        # The rest of a direct write: framed already, and first in line.
                        if burst:
                            framed.append(frame_messages(self.ws, burst))
                            burst = []
                        framed.append(item)
                        size += len(item)
                        continue
                    assert not isinstance(item, bytes)
                    data = self._encode(item)
                    if data is not None:
                        burst.append(data)
                        size += len(data)
                if framing:
                    if burst:
                        framed.append(frame_messages(self.ws, burst))
                    if framed:
                        await send_framed(self.ws, b"".join(framed))
                elif burst:
                    await send_messages(self.ws, burst)
                self._writing = False
        except ConnectionClosed:
            pass
        finally:
            outbox.close()

    def _encode(self, frame: p.Frame) -> bytes | str | None:
        try:
            return self.codec.encode(frame, binary=self.binary)
        except (TypeError, ValueError, OverflowError) as exc:
            # One frame that cannot be encoded must not end the session.
            log.error("agent session %d: frame not sent: %s", self.id, exc)
            self.metrics.protocol_errors.labels("unencodable").inc()
            return None

    # --- serving -----------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            if not await self._handshake():
                await self._flush_and_close()
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._pump)
                nursery.start_soon(self._pull_timer)
                await self._read_frames()
                nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            if self.hello is not None:
                self.engine.close_session(self.id, crashed=self.crashed)

    async def _read_frames(self) -> None:
        ws = self.ws
        read_in_bursts(ws)
        try:
            while True:
                self.dispatch(await ws.get_message())
                for data in take_received(ws, READ_BURST):
                    self.dispatch(data)
        except ConnectionClosed as closed:
            reason = closed.reason
            # A clean close (1000/1001) is a goodbye: what the agent held is requeued, not
            # charged. Anything else is a crash.
            self.crashed = reason is None or reason.code not in (1000, 1001)

    async def _flush_and_close(self) -> None:
        self._outbox.close()
        refusals = [
            self.codec.encode(item, binary=self.binary)
            for item in self._outbox.items
            if not isinstance(item, bytes)
        ]
        self._outbox.items.clear()
        await send_messages(self.ws, refusals)
        await self.ws.aclose(code=1008, reason="handshake refused")

    async def _handshake(self) -> bool:
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            data = await self.ws.get_message()
            self.binary = isinstance(data, bytes)
            try:
                frame = self.codec.decode_agent(data)
            except p.ProtocolError as exc:
                self.refuse(exc, fatal=True)
                return False
            if not isinstance(frame, p.Hello):
                self.refuse(
                    p.ProtocolError("handshake_required", "first frame must be hello"), fatal=True
                )
                return False
            problem = self._check_hello(frame)
            if problem is not None:
                self.refuse(problem, fatal=True)
                return False
            for queue in frame.queues:
                try:
                    await self.consume(queue)
                except Exception as exc:
                    self.refuse(p.ProtocolError("unknown_queue", str(exc)), fatal=True)
                    return False
            self.hello = frame
            self.engine.open_session(self.id, frame.agent, frame.version, frame.pid)
            self.send(self._welcome())
            return True
        self.refuse(p.ProtocolError("handshake_timeout", "no hello within 10s"), fatal=True)
        return False

    def _check_hello(self, hello: p.Hello) -> p.ProtocolError | None:
        token = self.agent_settings.token
        if (self.over_tcp or token) and not (
            token and hello.token and secrets.compare_digest(hello.token, token)
        ):
            return p.ProtocolError("unauthorized", "a valid token is required")
        if hello.protocol != p.PROTOCOL_VERSION:
            return p.ProtocolError(
                "unsupported_protocol",
                f"protocol {hello.protocol} unsupported; this sidecar speaks 1",
            )
        bad = [q for q in hello.queues if not _QUEUE_NAME.match(q)]
        if bad:
            return p.ProtocolError("invalid_queue", f"invalid queue name {bad[0]!r}")
        if not hello.agent:
            return p.ProtocolError("invalid_hello", "hello.agent must name the agent")
        return None

    @property
    def queued_publishes(self) -> int:
        """Publishes waiting for their target's token bucket."""
        return self._queued_count

    def _welcome(self) -> p.Welcome:
        a = self.agent_settings
        return p.Welcome(
            session=f"{self.host}/{self.id}",
            protocol=p.PROTOCOL_VERSION,
            limits=p.Limits(
                max_batch=a.batch_size,
                max_frame_bytes=a.max_frame_bytes,
                max_body_bytes=a.max_body_bytes,
                max_in_flight=a.max_in_flight,
                deadline=a.deadline,
                heartbeat=a.heartbeat,
            ),
            pressure=self.engine.pressure.name,
            batch_size=self.engine.batch_size,
            reasons=self.engine.reasons.agent_reasons(),
        )

    def dispatch(self, data: bytes | str) -> None:
        """Handle one frame from the agent; answers go to the outbox."""
        try:
            frame = self.codec.decode_agent(data)
            handler = self._handlers[type(frame)]
            handler(self, frame)
        except p.ProtocolError as exc:
            self.refuse(exc)
        except (ValueError, TypeError, OverflowError) as exc:
            # Whatever slipped past validation is still the agent's input, not our crash.
            log.exception("agent session %d: frame refused", self.id)
            self.refuse(p.ProtocolError("malformed", f"frame refused: {exc}"))

    # --- frame handlers ----------------------------------------------------------------

    def _on_pull(self, frame: p.Pull) -> None:
        if frame.max < 1:
            raise p.ProtocolError("invalid_pull", "pull.max must be at least 1")
        if not math.isfinite(frame.wait) or frame.wait < 0:
            raise p.ProtocolError("invalid_pull", "pull.wait must be a finite number >= 0")
        if self.pulling:
            raise p.ProtocolError("pull_in_progress", "wait for the batch before pulling again")
        self.pulling = True
        assert self._nursery is not None, "frames are handled only while the session runs"
        want = min(frame.max, self.agent_settings.batch_size)
        wait = min(frame.wait, 30.0)
        if self.engine.must_pause():
            self._nursery.start_soon(self._pull, want, wait)
            return
        # Answered here when deliveries are buffered; else by the engine as soon as some
        # arrive, or with an empty batch by the timer when the wait runs out.
        batch = self.engine.pull_now(self.id, want)
        if batch or wait <= 0:
            self._answer_pull(batch)
            return
        self.engine.wait_for(self.id, want, self._answer_pull)
        self._pull_until = trio.current_time() + wait
        if self._pull_timer_scope is not None:
            self._pull_timer_scope.deadline = self._pull_until

    def _answer_pull(self, batch: list[p.Delivery]) -> None:
        self.pulling = False
        self._pull_until = math.inf
        # The timer's deadline is left where it is: moving it costs more than the one
        # wake-up it may save, and at that wake-up it sees nothing is waiting.
        self.send(p.Batch(messages=batch))

    async def _pull_timer(self) -> None:
        """Answer a waiting pull whose wait ran out with an empty batch."""
        while True:
            with trio.CancelScope(deadline=self._pull_until) as scope:
                self._pull_timer_scope = scope
                await trio.sleep_forever()
            self._pull_timer_scope = None
            if trio.current_time() >= self._pull_until and self.engine.stop_waiting(self.id):
                self._answer_pull([])

    async def _pull(self, want: int, wait: float) -> None:
        try:
            messages = await self.engine.pull(self.id, want, wait)
        finally:
            self.pulling = False
        self.send(p.Batch(messages=messages))

    def _on_ack(self, frame: p.Ack) -> None:
        _refuse_unknown(self.engine.ack(self.id, frame.ids))

    def _on_fail(self, frame: p.Fail) -> None:
        reason = frame.reason.upper()
        if not self.engine.reasons.accepts(reason):
            # Refused at once, not held until the deadline: the agent learns at the call.
            accepted = ", ".join(self.engine.reasons.agent_reasons())
            raise p.ProtocolError(
                "unknown_reason",
                f"unknown failure reason {frame.reason[:64]!r}; expected one of {accepted}",
                ref=frame.id,
            )
        if frame.retry_after is not None and not (
            math.isfinite(frame.retry_after) and frame.retry_after >= 0
        ):
            raise p.ProtocolError(
                "invalid_fail", "retry_after must be a finite number >= 0", ref=frame.id
            )
        # Cut at the edge: nothing downstream (signatures, headers, the store) sees more.
        error, dropped = limits.truncate(frame.error)
        if dropped:
            self.metrics.protocol_errors.labels("error_truncated").inc()
        if not self.engine.fail(self.id, frame.id, reason, error, frame.retry_after):
            raise p.ProtocolError(
                "unknown_delivery",
                f"not held by this session: {frame.id}",
                ref=frame.id,
                ids=[frame.id],
            )

    def _on_extend(self, frame: p.Extend) -> None:
        if not math.isfinite(frame.seconds) or frame.seconds <= 0:
            raise p.ProtocolError("invalid_extend", "extend.seconds must be a finite number > 0")
        _refuse_unknown(self.engine.extend(self.id, frame.ids, frame.seconds))

    def _on_publish(self, frame: p.Publish) -> None:
        problem = self._check_publish(frame)
        if problem is not None:
            self.metrics.published.labels("refused").inc()
            raise p.ProtocolError("invalid_publish", problem, ref=frame.ref)
        exchange = "" if frame.queue else frame.exchange
        routing_key = frame.queue or frame.routing_key
        target = routing_key if exchange == "" else f"{exchange}/{routing_key}"
        item = _Queued(frame, exchange, routing_key, len(frame.body))
        if not self._queued.get(target) and self.broker.is_connected:
            wait, _ = self.gate.check(target)
            if wait <= 0:
                self._send_publish(item)
                return
        q = self.throttle
        if self._queued_count >= q.queue or self._queued_bytes + item.size > q.queue_bytes:
            self._throttle(frame, target)
            return
        pending = self._queued.get(target)
        if pending is None:
            pending = self._queued[target] = deque()
            heapq.heappush(self._due, (-math.inf, next(self._due_seq), target))
            self._pump_wake.set()
        pending.append(item)
        self._queued_count += 1
        self._queued_bytes += item.size

    def _throttle(self, frame: p.Publish, target: str) -> None:
        """The queue is full: not sent. Tell the agent when there will be room for it."""
        now = self.gate.clock()
        if not self.broker.is_connected:
            why, rate = "broker_unavailable", 0.0
        else:
            rate = self.gate.current_rate(target)
            # A held target (rate 0) takes no token, so asking the gate only names the cause.
            why = "rate_limited" if rate > 0 else self.gate.check(target)[1]
        if rate > 0:
            # Room comes as the queue ahead drains at the target's rate; each refused
            # publish gets its own later slot, so they come back one by one.
            ahead = len(self._queued.get(target, ())) + 1
            slot = max(now + ahead / rate, self._next_slot.get(target, 0.0))
            if len(self._next_slot) >= MAX_SLOT_TARGETS:
                self._next_slot = {t: s for t, s in self._next_slot.items() if s > now}
                while len(self._next_slot) >= MAX_SLOT_TARGETS:
                    del self._next_slot[next(iter(self._next_slot))]
            self._next_slot[target] = slot + 1 / rate
            wait = slot - now
        else:
            wait = HELD_RETRY_AFTER
        wait = min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
        self.metrics.throttled.labels(why).inc()
        self.metrics.published.labels("throttled").inc()
        self.send(
            p.Published(
                ref=frame.ref, ok=False, throttled=True, retry_after=round(wait, 3), error=why
            )
        )

    def _send_publish(self, item: _Queued) -> None:
        frame = item.frame
        props = MessageProps(
            # The decoded frame is ours alone and not used after this: no copy needed.
            headers=frame.headers,
            message_id=frame.message_id,
            content_type=frame.content_type,
            priority=frame.priority,
            delivery_mode=2 if frame.persistent else 1,
        )
        ref = frame.ref

        def on_done(error: str | None) -> None:
            if error is None:
                self._published_ok.inc()
                self.send(p.Published(ref=ref, ok=True))
            else:
                self._published_error.inc()
                self.send(p.Published(ref=ref, ok=False, error=error))

        self.broker.publish_nowait(
            frame.body,
            exchange=item.exchange,
            routing_key=item.routing_key,
            props=props,
            on_done=on_done,
        )

    async def _pump(self) -> None:
        """Send queued publishes as their targets' token buckets allow."""
        while True:
            now = self.gate.clock()
            while self._due and self._due[0][0] <= now:
                _, _, target = heapq.heappop(self._due)
                pending = self._queued.get(target)
                if not pending:
                    self._queued.pop(target, None)
                    continue
                wait = self._send_queued(target, pending)
                if pending:
                    # Looked at again when a token is due, and at least every PUMP_RECHECK
                    # since the target's rate follows its depth.
                    due = now + min(wait, PUMP_RECHECK)
                    heapq.heappush(self._due, (due, next(self._due_seq), target))
                else:
                    del self._queued[target]
            # No await between the scan and here, so a target queued meanwhile cannot be
            # missed: it sets this new event.
            self._pump_wake = trio.Event()
            with trio.move_on_after(self._due[0][0] - now if self._due else math.inf):
                await self._pump_wake.wait()

    def _send_queued(self, target: str, pending: deque[_Queued]) -> float:
        """Send what the bucket allows now; the seconds until the next try, if any remain."""
        while pending:
            if not self.broker.is_connected:
                return DISCONNECTED_RECHECK
            wait, _ = self.gate.check(target)
            if wait > 0:
                return wait
            item = pending.popleft()
            self._queued_count -= 1
            self._queued_bytes -= item.size
            self._send_publish(item)
        return 0.0

    def _check_publish(self, frame: p.Publish) -> str | None:
        a = self.agent_settings
        if len(frame.body) > a.max_body_bytes:
            return f"body of {len(frame.body)} bytes exceeds max_body_bytes {a.max_body_bytes}"
        queue = frame.queue
        if queue is not None and queue not in self._checked_queues:
            if not _QUEUE_NAME.match(queue):
                return f"invalid queue name {queue!r}"
            if len(self._checked_queues) >= MAX_CHECKED_QUEUES:
                self._checked_queues.clear()
            self._checked_queues.add(queue)
        if queue is None and not frame.exchange and not frame.routing_key:
            return "give queue, or exchange and routing_key"
        # Up to 63 characters are at most 252 bytes of UTF-8: only longer names are encoded.
        if (len(frame.routing_key) > 63 and len(frame.routing_key.encode()) > 255) or (
            len(frame.exchange) > 63 and len(frame.exchange.encode()) > 255
        ):
            return "exchange and routing_key are at most 255 bytes"
        if frame.priority is not None and not 0 <= frame.priority <= 255:
            return "priority must be 0..255"
        if not frame.headers:
            return None
        if len(frame.headers) > a.max_headers:
            return f"{len(frame.headers)} headers exceed max_headers {a.max_headers}"
        # Checked first, iteratively: the size check below encodes, which recurses.
        if (problem := limits.amqp_header_problem(frame.headers)) is not None:
            return problem
        if len(msgspec.msgpack.encode(frame.headers)) > a.max_header_bytes:
            return f"headers exceed max_header_bytes {a.max_header_bytes}"
        return None

    def _on_heartbeat(self, frame: p.Heartbeat) -> None:
        self.send(p.Heartbeat(ts=frame.ts if math.isfinite(frame.ts) else 0.0))

    def _on_hello(self, frame: p.Hello) -> None:
        raise p.ProtocolError("duplicate_hello", "hello was already received")

    _handlers: dict[type, Callable[[Session, Any], None]] = {
        p.Pull: _on_pull,
        p.Ack: _on_ack,
        p.Fail: _on_fail,
        p.Extend: _on_extend,
        p.Publish: _on_publish,
        p.Heartbeat: _on_heartbeat,
        p.Hello: _on_hello,
    }


def _refuse_unknown(unknown: list[int]) -> None:
    """One error naming every id of an ack or extend this session does not hold (capped, so
    a hostile frame cannot make the answer huge)."""
    if not unknown:
        return
    distinct = list(dict.fromkeys(unknown))
    ids = distinct[:MAX_UNKNOWN_IDS]
    raise p.ProtocolError(
        "unknown_delivery",
        f"{len(distinct)} id(s) not held by this session",
        ref=ids[0],
        ids=ids,
    )
