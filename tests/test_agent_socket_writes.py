"""The session writer sends what is queued at a wake-up in one write to the socket: every
frame still arrives as its own WebSocket message, in order, and a reader that stops reading
still gets its session dropped rather than an outbox that grows without bound."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.lowlevel
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from sidecar import protocol as p
from sidecar.adapters.agent_socket import coalesces_writes, send_messages
from sidecar.agent.client import AgentClient, PublishRefused, SidecarClosed
from sidecar.config import load_config
from sidecar.metrics import Metrics
from sidecar.policy.failure import DEFAULT_REASONS
from sidecar.runtime.backpressure import PublishGate
from sidecar.runtime.session import (
    MAX_CHECKED_QUEUES,
    OUTBOX_LIMIT,
    WRITE_BURST_BYTES,
    Session,
)
from sidecar.wsburst import read_in_bursts, reads_in_bursts, take_received
from tests.helpers.streams import CountedStream

CODEC = p.Codec()


@asynccontextmanager
async def connected(
    pair: Callable[[], tuple[Any, Any]] = trio.testing.memory_stream_pair,
    client_queue: int = 4096,
    server_queue: int = 1,
) -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection, CountedStream]]:
    """A server and a client WebSocket over an in-memory stream; the server's writes counted
    from after the upgrade."""
    server_stream, client_stream = pair()
    counted = CountedStream(server_stream)
    async with trio.open_nursery() as nursery:
        accepted: list[WebSocketConnection] = []

        async def serve() -> None:
            request = await wrap_server_stream(nursery, counted, message_queue_size=server_queue)
            accepted.append(await request.accept())

        nursery.start_soon(serve)
        client = await wrap_client_stream(
            nursery, client_stream, "localhost", "/", message_queue_size=client_queue
        )
        while not accepted:
            await trio.lowlevel.checkpoint()
        counted.writes.clear()
        yield accepted[0], client, counted
        nursery.cancel_scope.cancel()


class ConfirmingLater:
    """A broker whose confirms arrive when the test says, all in one go."""

    is_connected = True

    def __init__(self) -> None:
        self.pending: list[Callable[[str | None], None]] = []

    def publish_nowait(self, body: bytes, **kwargs: Any) -> None:
        self.pending.append(kwargs["on_done"])


class Engine:
    reasons = DEFAULT_REASONS

    def __init__(self) -> None:
        self.broker = ConfirmingLater()


def make_session(ws: WebSocketConnection | None, *, binary: bool = True) -> Session:
    config = load_config(environ={}, overrides={"throttle": {"rate": 1e9, "burst": 1e9}})
    engine = Engine()
    session = Session(
        ws,  # type: ignore[arg-type]  # None where only the outbox is looked at
        agent=config.agent,
        throttle=config.throttle,
        host=config.identity.host,
        engine=engine,  # type: ignore[arg-type]
        broker=engine.broker,  # type: ignore[arg-type]
        gate=PublishGate(config, clock=trio.current_time, blocked=lambda: False),
        metrics=Metrics(),
        codec=CODEC,
        over_tcp=False,
        consume=lambda queue: None,
    )
    session.binary = binary
    return session


async def receive(client: WebSocketConnection, count: int) -> list[p.SidecarFrame]:
    return [CODEC.decode_sidecar(await client.get_message()) for _ in range(count)]


async def test_the_locked_trio_websocket_still_offers_what_coalescing_uses():
    # If this fails, trio-websocket's internals moved: agent writes fall back to one per
    # message (still correct); adapt send_messages to the new release.
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            assert coalesces_writes(server)
            await send_messages(server, [b"one", "two", b"three"])
            assert len(counted.writes) == 1
            assert [await client.get_message() for _ in range(3)] == [b"one", "two", b"three"]


async def test_the_locked_trio_websocket_still_offers_what_burst_reads_use():
    # If this fails, trio-websocket's internals moved: the session and the client take
    # received frames one per scheduler pass again (still correct); adapt sidecar/wsburst.py.
    with trio.fail_after(10):
        async with connected(server_queue=64) as (server, client, _counted):
            assert reads_in_bursts(server)
            read_in_bursts(server)
            read_in_bursts(server)  # idempotent: the reader's channel is wrapped once
            sent = [f"m{i}".encode() for i in range(50)]
            await send_messages(client, sent)  # one write, so one read on the other end
            first = await server.get_message()
            # The whole read is queued by the time the first message is handed over.
            assert [first, *take_received(server, 1000)] == sent
            assert take_received(server, 1000) == []


async def test_a_burst_read_takes_at_most_the_limit_and_keeps_the_queue_bound():
    with trio.fail_after(10):
        async with connected(server_queue=8) as (server, client, _counted):
            read_in_bursts(server)
            sent = [f"m{i}".encode() for i in range(30)]
            await send_messages(client, sent)
            got = [await server.get_message()]
            got += take_received(server, 3)
            assert len(got) == 4
            while len(got) < len(sent):
                got.append(await server.get_message())
                got += take_received(server, 1000)
                # The reader never queues past the channel's bound to take more at once.
                assert server._recv_channel.statistics().current_buffer_used <= 8
            assert got == sent


async def test_burst_reads_fall_back_to_one_at_a_time_without_the_internals():
    class Elsewhere:
        """A connection class without trio-websocket's private attributes."""

    plain = Elsewhere()
    read_in_bursts(plain)  # type: ignore[arg-type]  # a stand-in without the internals
    assert not reads_in_bursts(plain)  # type: ignore[arg-type]
    assert take_received(plain, 10) == []  # type: ignore[arg-type]


async def test_frames_queued_at_one_wake_up_go_out_in_one_write_in_order():
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            session = make_session(server)
            for ts in range(200):
                session.send(p.Heartbeat(ts=float(ts)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session._writer)
                got = await receive(client, 200)
                nursery.cancel_scope.cancel()
    assert [f.ts for f in got if isinstance(f, p.Heartbeat)] == [float(ts) for ts in range(200)]
    assert len(counted.writes) == 1


async def test_json_sessions_are_coalesced_too():
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            session = make_session(server, binary=False)
            session.send(p.Heartbeat(ts=1.0))
            session.send(p.Pressure(level="WARNING", batch_size=5))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session._writer)
                texts = [await client.get_message() for _ in range(2)]
                nursery.cancel_scope.cancel()
    assert all(isinstance(t, str) for t in texts)
    assert [type(CODEC.decode_sidecar(t)) for t in texts] == [p.Heartbeat, p.Pressure]
    assert len(counted.writes) == 1


async def test_a_burst_of_large_frames_is_cut_into_writes_of_bounded_size():
    body = b"b" * 50_000
    frames = 20  # about 1 MB in all
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            session = make_session(server)
            for i in range(frames):
                session.send(p.Batch(messages=[p.Delivery(id=i, queue="q", body=body)]))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session._writer)
                got = await receive(client, frames)
                nursery.cancel_scope.cancel()
    assert [f.messages[0].id for f in got if isinstance(f, p.Batch)] == list(range(frames))
    assert len(counted.writes) > 1
    # A write stops gathering once it holds WRITE_BURST_BYTES: at most one frame more.
    assert max(counted.writes) < WRITE_BURST_BYTES + len(body) + 1024


async def test_a_frame_that_cannot_be_encoded_is_skipped_and_the_rest_of_its_burst_sent():
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            session = make_session(server)
            session.send(p.Heartbeat(ts=1.0))
            unencodable = p.Delivery(id=1, queue="q", body=b"", headers={"x": object()})
            session.send(p.Batch(messages=[unencodable]))
            session.send(p.Heartbeat(ts=2.0))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session._writer)
                got = await receive(client, 2)
                nursery.cancel_scope.cancel()
    assert [f.ts for f in got if isinstance(f, p.Heartbeat)] == [1.0, 2.0]
    assert session.metrics.protocol_errors.labels("unencodable")._value.get() == 1
    assert len(counted.writes) == 1


async def test_published_answers_of_one_read_of_confirms_arrive_together_with_their_refs():
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            session = make_session(server)
            broker: ConfirmingLater = session.engine.broker  # type: ignore[assignment]
            for ref in range(1, 51):
                frame = p.Publish(ref=ref, body=b"x", queue="out")
                session.dispatch(CODEC.encode(frame, binary=True))
            assert len(broker.pending) == 50
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session._writer)
                await trio.testing.wait_all_tasks_blocked()
                # The broker adapter runs every confirm of one read in one go.
                for ref, on_done in enumerate(broker.pending, 1):
                    on_done(None if ref % 7 else f"nack {ref}")
                got = await receive(client, 50)
                nursery.cancel_scope.cancel()
    answers = [f for f in got if isinstance(f, p.Published)]
    assert [a.ref for a in answers] == list(range(1, 51))
    assert [a.ok for a in answers] == [bool(ref % 7) for ref in range(1, 51)]
    assert [a.error for a in answers if not a.ok] == [
        f"nack {r}" for r in (7, 14, 21, 28, 35, 42, 49)
    ]
    assert len(counted.writes) == 1


async def test_a_reader_that_stops_reading_is_dropped_with_a_bounded_outbox():
    # Lockstep streams: a write blocks until the client takes the bytes, and a client whose
    # one-message queue is full takes no more.
    with trio.fail_after(30):
        async with connected(trio.testing.lockstep_stream_pair, client_queue=1) as (server, _, _):
            session = make_session(server)
            async with trio.open_nursery() as nursery:
                session._nursery = nursery
                nursery.start_soon(session._writer)
                accepted = 0
                while session.metrics.protocol_errors.labels("not_reading")._value.get() == 0:
                    session.send(p.Heartbeat(ts=float(accepted)))
                    accepted += 1
                    if accepted % 64 == 0:
                        await trio.testing.wait_all_tasks_blocked()
    assert session.crashed is False
    # Held at most: the full outbox, one burst taken out of it, and what the client buffered
    # before it stopped reading (its one-message queue and a partial read).
    assert accepted <= 2 * OUTBOX_LIMIT + 1024


async def test_publish_checks_remember_good_queue_names_within_a_bound_and_never_bad_ones():
    session = make_session(None)
    broker: ConfirmingLater = session.engine.broker  # type: ignore[assignment]
    errors: list[str] = []
    for _ in range(3):
        session.dispatch(CODEC.encode(p.Publish(ref=1, body=b"x", queue="amq.bad"), binary=True))
    for i in range(MAX_CHECKED_QUEUES + 10):
        session.dispatch(CODEC.encode(p.Publish(ref=2, body=b"x", queue=f"q{i}"), binary=True))
    while True:
        try:
            frame = session._outbox.receive_nowait()
        except trio.WouldBlock:
            break
        if isinstance(frame, p.Error):
            errors.append(frame.code)
    assert errors == ["invalid_publish"] * 3
    assert len(broker.pending) == MAX_CHECKED_QUEUES + 10
    assert len(session._checked_queues) <= MAX_CHECKED_QUEUES


async def test_long_names_are_measured_in_bytes():
    session = make_session(None)
    # 64 characters of 4 bytes each: 256 bytes, one over the AMQP limit.
    wide = "\U0001f600" * 64
    session.dispatch(
        CODEC.encode(p.Publish(ref=1, body=b"x", exchange="ex", routing_key=wide), binary=True)
    )
    narrow = "k" * 255
    session.dispatch(
        CODEC.encode(p.Publish(ref=2, body=b"x", exchange="ex", routing_key=narrow), binary=True)
    )
    error = session._outbox.receive_nowait()
    assert isinstance(error, p.Error) and error.ref == 1 and "255 bytes" in error.message
    broker: ConfirmingLater = session.engine.broker  # type: ignore[assignment]
    assert len(broker.pending) == 1


async def test_an_answer_queued_by_another_task_in_the_same_turn_joins_the_burst():
    with trio.fail_after(10):
        async with connected() as (server, client, counted):
            session = make_session(server)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session._writer)
                await trio.testing.wait_all_tasks_blocked()
                for round_ in range(20):
                    session.send(p.Published(ref=2 * round_, ok=True))  # wakes the writer
                    await trio.lowlevel.checkpoint()  # runs alongside the woken writer
                    session.send(p.Published(ref=2 * round_ + 1, ok=True))
                    got = await receive(client, 2)
                    assert [f.ref for f in got if isinstance(f, p.Published)] == [
                        2 * round_,
                        2 * round_ + 1,
                    ]
                nursery.cancel_scope.cancel()
    assert len(counted.writes) == 20


async def test_the_client_matches_each_published_answer_to_its_publish_and_fails_the_rest_on_close():
    results: dict[int, object] = {}
    with trio.fail_after(10):
        async with connected() as (server, client_ws, _):
            client = AgentClient(client_ws)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.reader)

                async def publish(tag: int) -> None:
                    try:
                        results[tag] = await client.publish_once(f"{tag}".encode(), queue="q")
                    except (SidecarClosed, PublishRefused) as exc:
                        results[tag] = exc

                for tag in range(4):
                    nursery.start_soon(publish, tag)
                refs = {}
                for _ in range(4):
                    frame = CODEC.decode_agent(await server.get_message())
                    assert isinstance(frame, p.Publish)
                    refs[frame.body] = frame.ref
                # Answered out of order and in one burst; the last one never.
                await send_messages(
                    server,
                    [
                        CODEC.encode(
                            p.Published(ref=refs[b"2"], ok=False, error="nack"), binary=True
                        ),
                        CODEC.encode(
                            p.Error(code="invalid_publish", message="no", ref=refs[b"1"]),
                            binary=True,
                        ),
                        CODEC.encode(p.Published(ref=refs[b"0"], ok=True), binary=True),
                    ],
                )
                while len(results) < 3:
                    await trio.sleep(0.01)
                await server.aclose()
    assert isinstance(results[0], p.Published) and results[0].ok
    assert isinstance(results[1], PublishRefused)
    assert isinstance(results[2], p.Published) and results[2].error == "nack"
    assert isinstance(results[3], SidecarClosed)
    assert client._published == {}


async def test_a_frame_sent_after_queued_publishes_goes_out_after_them_in_the_same_write():
    with trio.fail_after(10):
        async with connected(server_queue=64) as (server, client, _counted):
            agent = AgentClient(client)
            writes: list[int] = []
            stream = client._stream
            send_all = stream.send_all

            async def counted(data: bytes | bytearray | memoryview) -> None:
                writes.append(len(data))
                await send_all(data)

            stream.send_all = counted  # type: ignore[method-assign]
            # Publishes queued for the writer, which has not run yet.
            agent._unsent = [
                CODEC.encode(p.Publish(ref=r, body=b"x", queue="q"), binary=True) for r in (1, 2)
            ]
            await agent.send(p.Ack(ids=[7]))
            frames = [CODEC.decode_agent(await server.get_message()) for _ in range(3)]
            assert [type(f) for f in frames] == [p.Publish, p.Publish, p.Ack]
            assert [f.ref for f in frames[:2]] == [1, 2]  # type: ignore[union-attr]
            assert len(writes) == 1 and agent._unsent == []
