"""The session's paths without a task hop: pulls answered in the step that has the
deliveries, frames written straight to the socket when nothing is queued ahead, and what
the socket does not take at once left to the writer, first in line. Over a real socket
pair, since the direct path writes to a socket's descriptor."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from sidecar import protocol as p
from sidecar import wsburst
from sidecar.config import load_config
from sidecar.core.messages import Inbound, MessageProps
from sidecar.metrics import Metrics
from sidecar.policies import ledger_from
from sidecar.runtime.backpressure import PublishGate
from sidecar.runtime.engine import Engine, MetricsMeter
from sidecar.runtime.session import Session
from tests.helpers.fake_broker import FakeBroker, FakeDeadLetters

CODEC = p.Codec()
CONFIG = load_config(environ={}, overrides={"throttle": {"rate": 1e9, "burst": 1e9}})


def message(tag: int, body: bytes = b"") -> Inbound:
    return Inbound(1, tag, "work", body or f"m{tag}".encode(), MessageProps(), "work", "", False)


@asynccontextmanager
async def socket_connected(
    client_queue: int = 64,
) -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """A server and a client WebSocket over a Unix socket pair with small buffers, so a
    large write is only partly taken at once."""
    a, b = trio.socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 8192)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 8192)
    async with trio.open_nursery() as nursery:
        accepted: list[WebSocketConnection] = []

        async def serve() -> None:
            request = await wrap_server_stream(nursery, trio.SocketStream(a))
            accepted.append(await request.accept())

        nursery.start_soon(serve)
        client = await wrap_client_stream(
            nursery, trio.SocketStream(b), "localhost", "/", message_queue_size=client_queue
        )
        while not accepted:
            await trio.lowlevel.checkpoint()
        yield accepted[0], client
        nursery.cancel_scope.cancel()


def make_session(ws: WebSocketConnection) -> tuple[Session, FakeBroker]:
    broker = FakeBroker()
    metrics = Metrics()
    ledger = ledger_from(CONFIG, random=random.Random(7).random, meter=MetricsMeter(metrics))
    engine = Engine(ledger, broker, FakeDeadLetters(), metrics)
    session = Session(
        ws,
        agent=CONFIG.agent,
        throttle=CONFIG.throttle,
        host=CONFIG.identity.host,
        engine=engine,
        broker=broker,  # type: ignore[arg-type]
        gate=PublishGate(CONFIG, clock=trio.current_time, blocked=lambda: False),
        metrics=metrics,
        codec=CODEC,
        over_tcp=False,
        consume=lambda queue: None,
    )
    session.binary = True
    engine.open_session(session.id, "a", "1.0", None)
    return session, broker


def pull(session: Session, most: int, wait: float) -> None:
    session.dispatch(CODEC.encode(p.Pull(max=most, wait=wait), binary=True))


async def test_a_socket_connection_takes_the_direct_path():
    async with socket_connected() as (server, _):
        assert wsburst.writes_to_socket(server) and wsburst.may_write_now(server)


async def test_pulls_are_answered_at_once_or_when_deliveries_arrive_without_the_writer():
    with trio.fail_after(10):
        async with socket_connected() as (server, client):
            session, broker = make_session(server)
            async with trio.open_nursery() as nursery:
                session._nursery = nursery  # no writer, no pull task: nothing may need one
                broker.deliver(message(1), message(2))
                pull(session, 5, 1.0)
                first = CODEC.decode_sidecar(await client.get_message())
                assert isinstance(first, p.Batch) and len(first.messages) == 2
                pull(session, 5, 1.0)  # nothing buffered: waits
                assert session.pulling and not session._outbox
                broker.deliver(message(3))  # the step that fills the inbox answers it
                assert not session.pulling
                second = CODEC.decode_sidecar(await client.get_message())
                assert isinstance(second, p.Batch) and [m.body for m in second.messages] == [b"m3"]
                assert nursery.child_tasks == frozenset()
                nursery.cancel_scope.cancel()


async def test_a_pull_whose_wait_runs_out_gets_an_empty_batch_at_its_end(autojump_clock):
    with trio.fail_after(60):
        async with socket_connected() as (server, client):
            session, broker = make_session(server)
            async with trio.open_nursery() as nursery:
                session._nursery = nursery
                nursery.start_soon(session._pull_timer)
                for wait in (2.0, 0.5):
                    start = trio.current_time()
                    pull(session, 5, wait)
                    batch = CODEC.decode_sidecar(await client.get_message())
                    assert isinstance(batch, p.Batch) and batch.messages == []
                    assert trio.current_time() - start == wait  # virtual time: exactly then
                    assert not session.pulling
                # Answered before its end: the timer's later wake-up sends nothing.
                pull(session, 5, 1.0)
                broker.deliver(message(1))
                (got,) = CODEC.decode_sidecar(await client.get_message()).messages  # type: ignore[union-attr]
                await trio.sleep(2.0)
                pull(session, 5, 0.0)  # wait 0: answered at once, empty
                late = CODEC.decode_sidecar(await client.get_message())
                assert isinstance(late, p.Batch) and late.messages == []
                nursery.cancel_scope.cancel()
        assert got.body == b"m1"


async def test_what_the_socket_does_not_take_goes_out_first_through_the_writer():
    big = b"x" * 200_000  # more than a socket pair's buffer holds
    with trio.fail_after(20):
        async with socket_connected(client_queue=1) as (server, client):
            session, _ = make_session(server)
            async with trio.open_nursery() as nursery:
                session._nursery = nursery
                session.send(p.Heartbeat(ts=1.0))  # the socket takes this one whole
                session.send(p.Error(code="x", message=big.decode()))  # only part of this
                assert len(session._outbox) == 1  # its rest, framed, waits for the writer
                session.send(p.Heartbeat(ts=2.0))  # queued behind it: never overtakes
                assert len(session._outbox) == 2
                nursery.start_soon(session._writer)
                got = [CODEC.decode_sidecar(await client.get_message()) for _ in range(3)]
                nursery.cancel_scope.cancel()
    assert [type(f).__name__ for f in got] == ["Heartbeat", "Error", "Heartbeat"]
    assert isinstance(got[1], p.Error) and got[1].message == big.decode()
    assert isinstance(got[2], p.Heartbeat) and got[2].ts == 2.0


async def test_published_answers_still_wait_for_the_writer():
    with trio.fail_after(10):
        async with socket_connected() as (server, client):
            session, _ = make_session(server)
            async with trio.open_nursery() as nursery:
                session._nursery = nursery
                session.send(p.Published(ref=1, ok=True))
                session.send(p.Heartbeat(ts=3.0))  # behind the queued answer, not ahead
                assert len(session._outbox) == 2
                nursery.start_soon(session._writer)
                got = [CODEC.decode_sidecar(await client.get_message()) for _ in range(2)]
                nursery.cancel_scope.cancel()
    assert [type(f).__name__ for f in got] == ["Published", "Heartbeat"]


async def test_a_client_send_that_the_socket_cannot_take_finishes_under_the_lock():
    big = b"y" * 300_000
    with trio.fail_after(20):
        async with socket_connected() as (server, client), trio.open_nursery() as nursery:
            received: list[bytes | str] = []

            async def read() -> None:
                await trio.sleep(0.05)  # let the sender fill the socket first
                for _ in range(3):
                    received.append(await server.get_message())

            nursery.start_soon(read)
            # Concurrent senders: neither lands inside the other's frame.
            nursery.start_soon(wsburst.send_messages, client, [big])
            nursery.start_soon(wsburst.send_messages, client, [b"small", b"second"])
    assert sorted(received, key=len) == [b"small", b"second", big]
    assert received.index(b"small") < received.index(b"second")


async def test_frames_for_a_connection_the_peer_closed_are_dropped_quietly():
    with trio.fail_after(10):
        async with socket_connected() as (server, client):
            session, _ = make_session(server)
            async with trio.open_nursery() as nursery:
                session._nursery = nursery
                nursery.start_soon(session._writer)
                await client.aclose()
                while not server.closed:
                    await trio.sleep(0.01)
                session.send(p.Heartbeat(ts=1.0))  # would be a direct write: dropped
                session.send(p.Published(ref=1, ok=True))  # for the writer, which ends
                await trio.testing.wait_all_tasks_blocked()
                assert session._outbox.closed
                nursery.cancel_scope.cancel()
