"""The broker adapter: aiormq on its own asyncio loop, driven from trio.

This module and its loop half (``aio_loop``: the bridge, trio-asyncio by default or a
dedicated thread) are the only code that imports asyncio or aiormq. The rest of the daemon sees
plain trio methods and ``Inbound`` records. Design points (measured in bench/, RESULTS.md):

* The bridge is never crossed with an awaited call per message. Deliveries land in a deque
  that is moved to the engine's inbox once per burst; acks are queued and written by ONE
  asyncio task per channel generation, in tag order, coalesced into ``multiple=True`` where
  the acked tags form a contiguous prefix of what is outstanding (acks sent from several
  tasks can overtake each other and make the broker close the channel).
* Separate connections for consuming and publishing: a broker memory alarm blocks
  publishers, and must not stall the acks of work already done.
* Publishes use confirms and ``mandatory``: an unroutable message is an error, not a loss.
* Delivery tags belong to one connection generation. After a reconnect the broker redelivers
  whatever was unacked, so acks for a dead generation are dropped, never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import uuid
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiormq
import aiormq.exceptions
import trio
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

from sidecar.adapters import amqp_decode
from sidecar.adapters.aio_loop import make_bridge
from sidecar.adapters.fast_amqp import FastConnection, Nacked, Publisher, Returned
from sidecar.core.messages import (
    Inbound,
    Inbox,
    MessageProps,
    tier_queue_arguments,
    tier_queue_name,
)
from sidecar.core.port import UNENCODABLE, BrokerUnavailable, PublishCallback
from sidecar.redact import redact_url, scrub

log = logging.getLogger("sidecar.broker")

# Values pamqp cannot represent must not kill the connection (see amqp_decode).
amqp_decode.install()

# How long a lingering publish (a retry copy) may wait to share a socket write with others.
# Each write costs about as much CPU as the rest of a retry's republish; the copy then
# waits tens of milliseconds or more in its delay tier, so two more are nothing.
PUBLISH_LINGER = 0.002
# The same for the ack of a message whose retry copy was confirmed or whose dead letter is
# durable: the agent is not waiting for it, and its prefetch slot is held 2 ms longer.
SETTLE_LINGER = 0.002


_BROKER_ERRORS = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
)


def _props_to_aiormq(p: MessageProps) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        headers=p.headers or None,
        message_id=p.message_id,
        content_type=p.content_type,
        content_encoding=p.content_encoding,
        correlation_id=p.correlation_id,
        reply_to=p.reply_to,
        priority=p.priority,
        delivery_mode=p.delivery_mode,
        timestamp=p.timestamp,
        message_type=p.type,
        app_id=p.app_id,
        expiration=p.expiration,
    )


def connection_url(url: str, name: str, heartbeat: int) -> str:
    """The URL aiormq connects with: the connection named, so operators (and tests) can find
    it in rabbitmqctl, and the configured heartbeat unless the URL sets its own."""
    parts = urlsplit(url)
    extra = {"name": name}
    if "heartbeat=" not in parts.query:
        extra["heartbeat"] = str(heartbeat)
    query = "&".join(q for q in (parts.query, urlencode(extra)) if q)
    return urlunsplit(parts._replace(query=query))


class PublishRefused(Exception):
    """A publish refused before it reached the broker (its target does not exist, or the
    message cannot be encoded: then the error starts with UNENCODABLE)."""


class QueueNotFound(Exception):
    """The queue does not exist and the sidecar is not allowed to declare it."""


class _Generation:
    """Everything that belongs to one pair of connections; thrown away on reconnect."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.consume_conn: Any = None
        self.publish_conn: Any = None
        self.consume_channel: Any = None
        self.publish_channel: Any = None
        self.publisher: Publisher | None = None  # pipelined publishes on publish_channel
        self.consumer_queues: dict[str, str] = {}  # consumer tag -> queue, whole generation
        self.consumers: dict[str, str] = {}  # queue -> consumer tag
        self.declared: set[str] = set()  # queues checked and given their delay tiers
        self.outstanding: dict[int, None] = {}  # delivered, not yet settled; ordered by tag
        self.to_ack: set[int] = set()
        self.to_requeue: set[int] = set()
        self.writer_wakeup: asyncio.Event | None = None
        self.writer: asyncio.Task[None] | None = None
        # (tag, requeue) from trio, read by the writer on the loop.
        self.settle_requests: deque[tuple[int, bool]] = deque()
        self.writer_signalled = False
        # The writer waits for a wake-up with nothing in hand: an agent's acks may then be
        # written by ``flush_settlements`` at the end of the event (same thread only).
        self.writer_parked = False
        self.settle_deferred = False  # urgent requests left for ``flush_settlements``
        # A settlement that should not wait (an agent's ack) is among the requests; while
        # only lingering ones are, the writer waits up to SETTLE_LINGER for company.
        self.settle_urgent = False
        self.writer_lingering: asyncio.Event | None = None  # set: stop waiting, write now
        self.writer_passed: asyncio.Event | None = None  # set after each writer pass
        self.exchanges: set[str] = set()  # exchanges seen to exist on this connection
        self.publish_lock: asyncio.Lock | None = None  # (loop) one channel reopen at a time
        self.depth_channel: Any = None  # (loop) kept open for depth queries


T = TypeVar("T")
_PublishRequest = tuple[_Generation, bytes, str, str, MessageProps, PublishCallback]

_ACK_METHOD = b"\x00\x3c\x00\x50"
_NACK_METHOD = b"\x00\x3c\x00\x78"


def _settle_frames(channel: int, plan: list[tuple[int, bool, bool]]) -> bytes:
    """Basic.Ack / Basic.Nack(requeue) frames for a settle plan, as one blob: one write
    per writer pass instead of one queue put per frame."""
    out = []
    for tag, multiple, requeue in plan:
        if requeue:
            out.append(
                struct.pack(">BHI", 1, channel, 13) + _NACK_METHOD + struct.pack(">QB", tag, 2)
            )
        else:
            out.append(
                struct.pack(">BHI", 1, channel, 13)
                + _ACK_METHOD
                + struct.pack(">QB", tag, 1 if multiple else 0)
            )
        out.append(b"\xce")
    return b"".join(out)


async def _open_connection(url: str) -> FastConnection:
    """(loop) A connection with the fast receive path (see fast_amqp)."""
    connection = FastConnection(url)
    await connection.connect()
    return connection


class Handoff(Generic[T]):
    """Items passed from one loop to the other and drained in one go per wake-up, so a
    burst costs one crossing, not one per message. ``schedule`` runs a function on the
    receiving side; ``take`` gets the whole burst there."""

    def __init__(
        self,
        schedule: Callable[[Callable[[], None]], None],
        take: Callable[[deque[T]], None],
    ) -> None:
        self._items: deque[T] = deque()
        self._signalled = False
        self._schedule = schedule
        self._take = take

    def put(self, item: T) -> None:
        self._items.append(item)
        self.flush()

    def add(self, item: T) -> None:
        """Queue ``item`` without crossing yet: ``flush`` sends what was added."""
        self._items.append(item)

    def flush(self) -> None:
        if self._items and not self._signalled:
            self._signalled = True
            self._schedule(self._drain)

    def _drain(self) -> None:
        self._signalled = False  # before taking, so no item put meanwhile is left behind
        self._take(self._items)


class Broker:
    """Consume, ack, publish and inspect queues; reconnects with jittered backoff."""

    def __init__(
        self,
        url: str,
        *,
        prefetch: int,
        tiers: tuple[float, ...],
        tier_prefix: str = "sidecar.retry",
        declare_queues: bool = True,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        heartbeat: int = 30,
        name: str = "sidecar",
        rng: random.Random | None = None,
        hop: str = "trio-asyncio",
    ) -> None:
        self.url = url
        self.prefetch = prefetch
        self.tiers = tiers
        self.tier_prefix = tier_prefix
        self.declare_queues = declare_queues
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.heartbeat = heartbeat
        self.name = name
        self.rng = rng or random.Random()
        self.inbox = Inbox()
        self.inbox_changed = trio.Event()
        # (trio) Called after deliveries reached the inbox, so a waiting pull is answered
        # in the same step (set by the engine).
        self.on_arrivals: Callable[[], None] | None = None
        self.connected = trio.Event()
        self.queues: list[str] = []
        self.paused = False
        self.stale_acks = 0
        self.reconnects = 0
        self.last_error = ""
        self.publish_channel_reopens = 0
        # Set while the publishing channel cannot be reopened on a live connection.
        self.publish_error = ""
        self._gen = _Generation(0)
        self._lost = trio.Event()
        self.bridge = make_bridge(hop)
        # Crossings between the loops: deliveries to trio, publishes to the loop, confirms back.
        self._arrivals = Handoff[Inbound](self.bridge.to_trio, self._take_arrivals)
        # Publishes wait for the loop's next pass, so a burst (say, the retry copies of a
        # batch of failures) goes out as one write instead of one write per publish.
        self._publishes = Handoff[_PublishRequest](
            self.bridge.to_asyncio_later, self._start_publishes
        )
        # Retry copies arrive one per agent frame, each in its own pass: written at once,
        # nearly every one cost its own socket write (the largest single cost per retry).
        # They are bound for a delay tier, so they wait a moment for company instead.
        self._lingering = Handoff[_PublishRequest](
            self.bridge.to_asyncio_later, self._start_lingering
        )
        self._confirms = Handoff[tuple[PublishCallback, str | None]](
            self.bridge.to_trio, self._deliver_confirms
        )

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._gen.number

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    @property
    def publish_ok(self) -> bool:
        """False while publishing cannot work on a connection that is up (for /readyz)."""
        return not self.publish_error

    @property
    def publish_blocked(self) -> bool:
        """True while the broker has blocked the publishing connection (resource alarm)."""
        conn = self._gen.publish_conn
        if conn is None:
            return False
        unblocked = getattr(conn, "_Connection__connection_unblocked", None)
        return unblocked is not None and not unblocked.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until cancelled. Ready at once: the daemon serves (and
        reports not ready) while the broker is away."""
        async with self.bridge.open():
            task_status.started()
            delay = self.reconnect_min
            while True:
                try:
                    await self._serve_generation()
                    delay = self.reconnect_min
                except _BROKER_ERRORS as exc:
                    # Driver messages may echo the URL: never let its password through.
                    self.last_error = scrub(f"{type(exc).__name__}: {exc}", self.url)
                    log.warning("broker %s: %s", redact_url(self.url), self.last_error)
                finally:
                    await self._end_generation()
                wait = delay * (0.5 + self.rng.random() / 2)
                delay = min(delay * 2, self.reconnect_max)
                await trio.sleep(wait)

    async def _serve_generation(self) -> None:
        gen = _Generation(self._gen.number + 1)
        self._gen = gen
        self.inbox.start_generation(gen.number)
        self._lost = trio.Event()
        gen.consume_conn = await self.bridge.call(
            _open_connection, connection_url(self.url, f"{self.name}-consume", self.heartbeat)
        )
        gen.consume_conn.after_read = self._arrivals_read
        gen.publish_conn = await self.bridge.call(
            _open_connection, connection_url(self.url, f"{self.name}-publish", self.heartbeat)
        )
        gen.consume_channel = await self.bridge.call(
            gen.consume_conn.channel, publisher_confirms=False
        )
        gen.publish_channel = await self.bridge.call(gen.publish_conn.channel)
        gen.publisher = Publisher(gen.publish_conn, gen.publish_channel)
        self.publish_error = ""
        lost = self._lost

        def on_lost(_f: object) -> None:
            self.bridge.to_trio(lost.set)

        async def start_writer() -> asyncio.Task[None]:
            gen.writer_wakeup = asyncio.Event()
            return self.bridge.create_task(self._ack_writer(gen))

        writer = gen.writer = await self.bridge.call(start_writer)
        for conn in (gen.consume_conn, gen.publish_conn):
            conn.closing.add_done_callback(on_lost)
        writer.add_done_callback(on_lost)
        for queue in self.queues:
            await self._start_consumer(gen, queue)
        self.connected.set()
        log.info("broker connected (generation %d)", gen.number)
        await self._lost.wait()
        if writer.done() and (failure := writer.exception()) is not None:
            raise failure
        raise ConnectionError("connection to the broker lost")

    async def _end_generation(self) -> None:
        if self.connected.is_set():
            self.reconnects += 1
        self.connected = trio.Event()
        gen = self._gen
        # Unacked deliveries of this generation come back from the broker; forget them.
        self.inbox.end_generation(gen.number)
        if gen.writer is not None:
            if not gen.writer.done():
                # Let queued acks and requeues reach the socket before the connection closes
                # (they precede the close frame in the same write queue).
                with trio.move_on_after(1) as flush_scope:
                    flush_scope.shield = True
                    with contextlib.suppress(*_BROKER_ERRORS):
                        await self.bridge.call(self._writer_idle, gen)
            self.bridge.to_asyncio(gen.writer.cancel)
        with trio.move_on_after(2) as scope:
            scope.shield = True
            for conn in (gen.consume_conn, gen.publish_conn):
                if conn is not None and not conn.is_closed:
                    with contextlib.suppress(*_BROKER_ERRORS):
                        await self.bridge.call(conn.close)

    # --- consuming ---------------------------------------------------------------------

    async def consume(self, queue: str) -> None:
        """Consume ``queue`` (now, and after every reconnect)."""
        if queue in self.queues:
            return
        await self.check_queue(queue)
        self.queues.append(queue)
        if self.is_connected and not self.paused:
            await self._start_consumer(self._gen, queue)

    async def _start_consumer(self, gen: _Generation, queue: str) -> None:
        # Once per connection: re-consuming (prefetch changes, breaker resume) needs no
        # fresh declarations.
        if queue not in gen.declared:
            await self._ensure_queue(gen, queue)
            await self._declare_tiers(gen, queue)
            gen.declared.add(queue)
        if self.paused:
            return
        channel = gen.consume_channel
        await self.bridge.call(channel.basic_qos, prefetch_count=self.prefetch)
        # Deliveries reach _on_delivery straight from the connection's frame parser; the
        # tag is ours so the route exists before the broker's first delivery can arrive.
        tag = f"{self.name}.{gen.number}.{uuid.uuid4().hex}"
        gen.consumer_queues[tag] = queue
        gen.consume_conn.consume_fast(
            channel.number,
            tag,
            partial(self._on_delivery, gen),
            queue=queue,
            generation=gen.number,
        )
        ok = await self.bridge.call(channel.basic_consume, queue, _never_called, consumer_tag=tag)
        gen.consumers[queue] = ok.consumer_tag

    def _on_delivery(self, gen: _Generation, message: Inbound) -> None:
        """(loop) One complete delivery, from the consuming connection's frame parser. It
        crosses to trio with the rest of its read (``_arrivals_read``)."""
        if gen is not self._gen:
            return
        gen.outstanding[message.tag] = None
        self._arrivals.add(message)

    def _arrivals_read(self) -> None:
        """(loop) The consuming connection finished a read: what it delivered crosses now."""
        self._arrivals.flush()

    def _take_arrivals(self, arrivals: deque[Inbound]) -> None:
        """(trio) Move every delivery that arrived since the last wake-up into the inbox."""
        generation = self._gen.number
        inbox = self.inbox
        while arrivals:
            message = arrivals.popleft()
            if message.generation == generation:
                inbox.append(message)
        self.inbox_changed.set()
        self._arrived()

    def _arrived(self) -> None:
        if self.on_arrivals is not None:
            try:
                self.on_arrivals()
            except Exception:
                # Not the connection's problem: whatever failed is the engine's, and a
                # broken receive path would loop the broker's redeliveries.
                log.exception("handing out arrivals failed")

    async def wait_inbox(self) -> None:
        """Return when the inbox may have changed since the last call."""
        await self.inbox_changed.wait()
        self.inbox_changed = trio.Event()

    def wake(self) -> None:
        """Wake whoever waits in ``wait_inbox``: what they may take has changed."""
        self.inbox_changed.set()
        self._arrived()

    @property
    def unsettled(self) -> int:
        """Deliveries of the current connection not yet acked or requeued on the wire."""
        return len(self._gen.outstanding)

    async def set_prefetch(self, prefetch: int) -> None:
        """Consumer prefetch is fixed when a consumer starts, so re-consume to change it.
        Deliveries already outstanding stay valid on the channel."""
        if prefetch == self.prefetch:
            return
        self.prefetch = prefetch
        if self.is_connected and not self.paused:
            await self._cancel_consumers(self._gen)
            for queue in self.queues:
                await self._start_consumer(self._gen, queue)

    async def pause(self) -> None:
        """Stop deliveries (circuit open) and hand buffered ones back to the queue."""
        if self.paused:
            return
        self.paused = True
        if self.is_connected:
            await self._cancel_consumers(self._gen)
        for message in self.inbox.clear():
            self.settle(message.generation, message.tag, requeue=True)
        self.flush_settlements()

    async def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.is_connected:
            for queue in self.queues:
                await self._start_consumer(self._gen, queue)

    async def _cancel_consumers(self, gen: _Generation) -> None:
        for queue, tag in list(gen.consumers.items()):
            try:
                await self.bridge.call(gen.consume_channel.basic_cancel, tag)
            except _BROKER_ERRORS as exc:
                log.warning("cancel consumer on %s: %s", queue, exc)
            else:
                # Cancel-Ok came after the tag's last delivery, which is handed over by now:
                # forget the route, or every prefetch change would leave one behind.
                gen.consume_conn.consumers.get(gen.consume_channel.number, {}).pop(tag, None)
                gen.consumer_queues.pop(tag, None)
            gen.consumers.pop(queue, None)

    # --- settling ------------------------------------------------------------------------

    def settle(
        self, generation: int, tag: int, *, requeue: bool = False, linger: bool = False
    ) -> bool:
        """Queue an ack (or a requeue) for the single ack writer. Returns False, sending
        nothing, when the tag belongs to a dead generation. ``linger``: the write may wait
        up to ``SETTLE_LINGER`` for other settlements (a hint: every one is written)."""
        gen = self._gen
        if generation != gen.number or gen.writer_wakeup is None:
            self.stale_acks += 1
            return False
        gen.settle_requests.append((tag, requeue))
        if not linger:
            gen.settle_urgent = True
            if self.bridge.same_thread and gen.writer_parked and not gen.writer_signalled:
                gen.settle_deferred = True  # written by flush_settlements, no writer wake-up
                return True
            lingering = gen.writer_lingering  # read once: the loop thread may clear it
            if lingering is not None:
                self.bridge.to_asyncio(lingering.set)
        self._signal_writer(gen)
        return True

    def flush_settlements(self) -> None:
        """At the end of an event: write the acks ``settle`` left for it, in this call,
        when aiormq's loop shares the thread and the writer is idle (it cannot be mid-pass,
        so the single-writer order holds); otherwise wake the writer as usual."""
        gen = self._gen
        if not gen.settle_deferred:
            return
        gen.settle_deferred = False
        conn = gen.consume_conn
        if (
            gen.writer_signalled  # a later settlement woke the writer: it takes them all
            or not gen.writer_parked
            or gen.consume_channel.is_closed
            or conn.write_queue.full()
        ):
            self._signal_writer(gen)
            return
        gen.settle_urgent = False
        plan = self._take_settlements(gen)
        if plan:
            payload = _settle_frames(gen.consume_channel.number, plan)
            if not conn.send(payload):
                conn.write_queue.put_nowait(ChannelFrame(payload=payload, should_close=False))
        if gen.writer_passed is not None:
            gen.writer_passed.set()

    def _signal_writer(self, gen: _Generation) -> None:
        if not gen.writer_signalled and gen.writer_wakeup is not None:
            gen.writer_signalled = True
            self.bridge.to_asyncio(gen.writer_wakeup.set)

    def _take_settlements(self, gen: _Generation) -> list[tuple[int, bool, bool]]:
        """The frames for every settlement requested so far (see ``_settle_plan``)."""
        requests = gen.settle_requests
        while requests:
            tag, requeue = requests.popleft()
            if tag not in gen.outstanding:
                self.stale_acks += 1  # already settled: never send a tag twice
                continue
            (gen.to_requeue if requeue else gen.to_ack).add(tag)
        return self._settle_plan(gen)

    async def _ack_writer(self, gen: _Generation) -> None:
        assert gen.writer_wakeup is not None
        channel = gen.consume_channel
        while True:
            gen.writer_parked = True
            try:
                await gen.writer_wakeup.wait()
            finally:
                gen.writer_parked = False
            gen.writer_wakeup.clear()
            if not gen.settle_urgent:
                await self._linger(gen)
            gen.settle_urgent = False
            gen.writer_signalled = False  # before draining, so no request is left behind
            plan = self._take_settlements(gen)
            if plan:
                if channel.is_closed:
                    raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
                # One frame blob per pass, through aiormq's write queue (ordered with
                # everything else on the connection).
                payload = _settle_frames(channel.number, plan)
                if not gen.consume_conn.send(payload):
                    await gen.consume_conn.write_queue.put(
                        ChannelFrame(payload=payload, should_close=False)
                    )
            if gen.writer_passed is not None:
                gen.writer_passed.set()

    @staticmethod
    async def _linger(gen: _Generation) -> None:
        """(loop) Wait up to SETTLE_LINGER, or until an urgent settlement arrives."""
        lingering = gen.writer_lingering = asyncio.Event()
        if gen.settle_urgent:  # arrived before the event was there to set
            gen.writer_lingering = None
            return
        timer = asyncio.get_running_loop().call_later(SETTLE_LINGER, lingering.set)
        try:
            await lingering.wait()
        finally:
            timer.cancel()
            gen.writer_lingering = None

    @staticmethod
    async def _writer_idle(gen: _Generation) -> None:
        """(loop) Return once the writer has taken every settlement asked of it."""
        while gen.settle_requests or gen.writer_signalled:
            gen.writer_passed = asyncio.Event()
            await gen.writer_passed.wait()

    @staticmethod
    def _settle_plan(gen: _Generation) -> list[tuple[int, bool, bool]]:
        """Frames for the pending settlements, in tag order: one ``multiple=True`` ack for
        the longest acked prefix of the outstanding tags, single frames for the rest."""
        plan: list[tuple[int, bool, bool]] = []
        prefix_end = None
        for tag in gen.outstanding:
            if tag not in gen.to_ack:
                break
            prefix_end = tag
        if prefix_end is not None:
            for tag in list(gen.outstanding):
                del gen.outstanding[tag]
                gen.to_ack.discard(tag)
                if tag == prefix_end:
                    break
            plan.append((prefix_end, True, False))
        for tag in sorted(gen.to_ack | gen.to_requeue):
            plan.append((tag, False, tag in gen.to_requeue))
            gen.outstanding.pop(tag, None)
        gen.to_ack.clear()
        gen.to_requeue.clear()
        return plan

    # --- publishing ----------------------------------------------------------------------

    def publish_nowait(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        props: MessageProps,
        on_done: PublishCallback,
        linger: bool = False,
    ) -> None:
        """Publish with confirms and ``mandatory``; ``on_done`` gets the outcome. Sync, so a
        session can pipeline many publishes without a task per message on the trio side.
        ``linger``: the write may wait up to ``PUBLISH_LINGER`` for other publishes."""
        gen = self._gen
        if not self.is_connected or gen.publish_channel is None:
            on_done("broker not connected")
            return
        request = (gen, body, exchange, routing_key, props, on_done)
        (self._lingering if linger else self._publishes).put(request)

    def _start_publishes(self, requests: deque[_PublishRequest]) -> None:
        """(loop) The burst goes out as one write per publishing channel, confirms
        pipelined: no task per publish. Only a publish that needs a round trip first (an
        exchange not seen yet, a channel to reopen) takes a task."""
        for publisher in self._marshal_all(requests):
            publisher.flush()

    def _start_lingering(self, requests: deque[_PublishRequest]) -> None:
        """(loop) Like ``_start_publishes``, but the write waits up to ``PUBLISH_LINGER``
        (or for the next burst that is written at once) so several go out together."""
        for publisher in self._marshal_all(requests):
            publisher.flush_later(PUBLISH_LINGER)

    def _marshal_all(self, requests: deque[_PublishRequest]) -> set[Publisher]:
        """(loop) Every request into its channel's burst; the publishers to flush."""
        touched: set[Publisher] = set()
        while requests:
            self._publish_fast(requests.popleft(), 1, touched)
        return touched

    def _publish_fast(
        self, request: _PublishRequest, attempt: int, touched: set[Publisher]
    ) -> None:
        """(loop) Marshal one publish into its channel's burst, or hand it to
        ``_publish_slow`` when something must be awaited first."""
        gen, body, exchange, routing_key, props, on_done = request
        publisher = gen.publisher
        if (
            (attempt == 1 and exchange and exchange not in gen.exchanges)
            or publisher is None
            or publisher.closed is not None
            or gen.publish_channel.is_closed
        ):
            self.bridge.create_task(self._publish_slow(request, attempt))
            return
        try:
            publisher.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=_props_to_aiormq(props),
                mandatory=True,
                on_done=partial(self._published, request, attempt),
            )
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            # Raised while marshalling, before anything was queued: the message itself.
            self._confirms.put((on_done, f"{UNENCODABLE}{exc}"))
            return
        touched.add(publisher)

    async def _publish_slow(self, request: _PublishRequest, attempt: int) -> None:
        """(loop) Publish on the generation's channel without letting one bad publish break
        the others. A publish to a missing exchange makes the broker close the channel
        (404), and every later publish on it failed for good: unknown exchanges are
        checked first on a throwaway channel, and a channel the broker closed anyway
        (an exchange deleted meanwhile, a 406) is reopened, with one more try for a
        publish that was only caught in the close."""
        gen, _body, exchange, _routing_key, _props, on_done = request
        try:
            if attempt == 1 and exchange and exchange not in gen.exchanges:
                if not await self._exchange_exists(gen, exchange):
                    raise PublishRefused(f"exchange {exchange!r} does not exist (404)")
                gen.exchanges.add(exchange)
            await self._publish_channel(gen)
        except asyncio.CancelledError:
            self._confirms.put((on_done, "publish cancelled"))
            raise
        except Exception as exc:
            self._confirms.put((on_done, _publish_error(exc)))
            return
        touched: set[Publisher] = set()
        # The exchange is now known (or this is the retry, which skips the check).
        self._publish_fast(request, attempt, touched)
        for publisher in touched:
            publisher.flush()

    def _published(
        self, request: _PublishRequest, attempt: int, error: BaseException | None
    ) -> None:
        """(loop) The outcome of one publish: a publish caught in a channel close gets one
        more try on a reopened channel; everything else goes back to trio, batched."""
        gen, _body, exchange, _routing_key, _props, on_done = request
        if (
            isinstance(
                error, aiormq.exceptions.ChannelInvalidStateError | aiormq.exceptions.ChannelClosed
            )
            and attempt == 1
            and not gen.publish_conn.is_closed
        ):
            gen.exchanges.discard(exchange)
            self.bridge.create_task(self._publish_slow(request, 2))
            return
        self._confirms.put((on_done, None if error is None else _publish_error(error)))

    async def _publish_channel(self, gen: _Generation) -> Any:
        """(loop) The generation's publishing channel, reopened if the broker closed it."""
        if not gen.publish_channel.is_closed:
            return gen.publish_channel
        if gen.publish_lock is None:
            gen.publish_lock = asyncio.Lock()
        async with gen.publish_lock:
            if gen.publish_channel.is_closed:
                try:
                    gen.publish_channel = await gen.publish_conn.channel()
                except _BROKER_ERRORS as exc:
                    self.publish_error = f"publishing channel cannot be reopened: {exc}"
                    # No way to publish on this connection: start a fresh one.
                    self.bridge.to_trio(self._lost.set)
                    raise
                gen.publisher = Publisher(gen.publish_conn, gen.publish_channel)
                self.publish_error = ""
                self.publish_channel_reopens += 1
                log.info("publishing channel reopened (generation %d)", gen.number)
        return gen.publish_channel

    async def _exchange_exists(self, gen: _Generation, exchange: str) -> bool:
        """(loop) A passive declare on a throwaway channel: a 404 closes only that one."""
        channel = await gen.publish_conn.channel(publisher_confirms=False)
        try:
            await channel.exchange_declare(exchange, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    @staticmethod
    def _deliver_confirms(results: deque[tuple[PublishCallback, str | None]]) -> None:
        """(trio) Tell each publisher its outcome."""
        while results:
            on_done, error = results.popleft()
            on_done(error)

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, props: MessageProps
    ) -> str | None:
        """Publish and wait for the confirm; returns None on success, else the error."""
        done = trio.Event()
        result: list[str | None] = []

        def on_done(error: str | None) -> None:
            result.append(error)
            done.set()

        self.publish_nowait(
            body, exchange=exchange, routing_key=routing_key, props=props, on_done=on_done
        )
        await done.wait()
        return result[0]

    # --- inspection and declarations ----------------------------------------------------

    async def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None when it does not exist."""
        if not self.is_connected:
            raise BrokerUnavailable("broker not connected")
        result: tuple[int, int] | None = await self.bridge.call(self._depth, self._gen, queue)
        return result

    @staticmethod
    async def _depth(gen: _Generation, queue: str) -> tuple[int, int] | None:
        """(loop) A passive declare on a channel kept for depth queries: one round trip and
        one crossing per query, where a throwaway channel costs three of each on the loop
        the deliveries share. A missing queue closes that channel; the next query opens
        another."""
        channel = gen.depth_channel
        if channel is None or channel.is_closed:
            channel = gen.depth_channel = await gen.publish_conn.channel(publisher_confirms=False)
        try:
            ok = await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return ok.message_count, ok.consumer_count

    async def _passive(self, gen: _Generation, queue: str) -> tuple[int, int] | None:
        # A passive declare of a missing queue closes its channel, so use a throwaway one.
        channel = await self.bridge.call(gen.publish_conn.channel, publisher_confirms=False)
        try:
            ok = await self.bridge.call(channel.queue_declare, queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await self.bridge.call(channel.close)
        return ok.message_count, ok.consumer_count

    async def check_queue(self, queue: str) -> None:
        """Declare ``queue`` if allowed, else make sure it exists."""
        if self.is_connected:
            await self._ensure_queue(self._gen, queue)

    async def _ensure_queue(self, gen: _Generation, queue: str) -> None:
        if await self._passive(gen, queue) is not None:
            return
        if not self.declare_queues:
            raise QueueNotFound(f"queue {queue!r} does not exist (and declare_queues is off)")
        channel = await self.bridge.call(self._publish_channel, gen)
        await self.bridge.call(channel.queue_declare, queue, durable=True)

    async def _declare_tiers(self, gen: _Generation, queue: str) -> None:
        """Fixed-TTL delay queues that dead-letter back to ``queue``. Quorum queues with
        at-least-once dead-lettering, because classic-queue DLX may drop a message."""
        for ttl in self.tiers:
            channel = await self.bridge.call(self._publish_channel, gen)
            await self.bridge.call(
                channel.queue_declare,
                tier_queue_name(self.tier_prefix, queue, ttl),
                durable=True,
                arguments=tier_queue_arguments(queue, ttl),
            )

    def tier_for(self, queue: str, ttl: float) -> str:
        return tier_queue_name(self.tier_prefix, queue, ttl)


async def _never_called(_message: DeliveredMessage) -> None:
    """aiormq wants a consumer callback; the fast receive path delivers instead."""
    log.error("a delivery took aiormq's own path: the fast receive path missed it")


def _publish_error(exc: BaseException) -> str:
    """What a publisher is told when its publish failed."""
    if isinstance(exc, Nacked):
        return "broker refused the message (nack)"
    if isinstance(exc, Returned):
        return f"unroutable: no queue is bound for this exchange and routing key ({exc})"
    if isinstance(exc, PublishRefused):
        return str(exc)
    if isinstance(exc, aiormq.exceptions.ChannelClosed):
        return f"refused by the broker: {exc}"
    if isinstance(exc, asyncio.CancelledError):
        return "publish cancelled"
    return f"{type(exc).__name__}: {exc}"
