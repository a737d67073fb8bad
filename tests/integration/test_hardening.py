"""Faults and hostile input against a real sidecar and the real RabbitMQ, each ending with
nothing lost."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from sidecar import protocol as p
from sidecar.adapters.agent_socket import SocketPathError, prepare_socket_path
from sidecar.client import AgentClient, connect_unix, open_agent
from sidecar.store.records import RecordFilter
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until
from tests.integration.test_chaos import OutageSwitch

pytestmark = pytest.mark.integration


class BrokerProxy:
    """A TCP forwarder in front of RabbitMQ that a test can switch off (connections cut,
    new ones refused), as when the broker is down or restarting."""

    def __init__(self) -> None:
        self.port = 0
        self.up = trio.Event()
        self._conns: trio.CancelScope | None = None
        self._listener_scope: trio.CancelScope | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Reserve a port now so the URL is stable across restarts.
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        task_status.started()
        while True:
            await self.up.wait()
            async with trio.open_nursery() as nursery:
                self._conns = nursery.cancel_scope
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                await nursery.start(trio.serve_listeners, self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", 5672) as upstream:

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                async for chunk in a:
                    await b.send_all(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)

    def start(self) -> None:
        self.up.set()

    def stop(self) -> None:
        self.up = trio.Event()
        if self._conns is not None:
            self._conns.cancel()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


async def test_broker_down_at_start_then_up_then_restarting_mid_stream(tmp_path, unique_queue):
    queue = unique_queue()
    n = 300
    await publish_many(queue, [f"{i}".encode() for i in range(n)])
    proxy = BrokerProxy()
    seen: set[bytes] = set()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            config = make_config(tmp_path, [queue], broker={"url": proxy.url})
            from sidecar.supervisor import Sidecar

            sidecar = Sidecar(config)
            await nursery.start(sidecar.run)
            # Broker away: the daemon serves, but reports not ready.
            await trio.sleep(0.5)
            ready, detail = sidecar.ready()
            assert not ready and detail["broker_connected"] is False
            proxy.start()
            with trio.fail_after(20):
                await sidecar.broker.connected.wait()
            assert sidecar.ready()[0]
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                restarted = False
                while len(seen) < n:
                    batch = await agent.pull(20, wait=0.5)
                    seen |= {m.body for m in batch}
                    await agent.ack([m.id for m in batch])
                    if not restarted and len(seen) > n // 2:
                        restarted = True
                        proxy.stop()  # the broker "restarts": every connection is cut
                        await trio.sleep(1.0)
                        proxy.start()
                await until(
                    lambda: not (sidecar.broker.unsettled or not sidecar.broker.is_connected)
                )
            reconnects = sidecar.broker.reconnects
            await sidecar.obs.refresh()
            counted = sidecar.metrics.broker_reconnects._value.get()
            sidecar.stop()
            await trio.sleep(config.drain.grace + 0.5)
            nursery.cancel_scope.cancel()
    assert seen == {f"{i}".encode() for i in range(n)}
    assert reconnects >= 1
    assert counted == reconnects  # sidecar_broker_reconnects_total
    assert await queue_count(queue) == 0


async def test_full_disk_stops_taking_work_instead_of_losing_it(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"a", b"b", b"c", b"d"])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            switch = OutageSwitch(sidecar.store.primary)
            sidecar.store.primary = switch
            switch.down = True  # the store is gone...
            spool_append = sidecar.store._append

            def disk_full(record: object) -> None:  # ...and the local disk is full
                from sidecar.store.base import StoreUnavailable

                raise StoreUnavailable("spool: database or disk is full")

            sidecar.store._append = disk_full
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                m = (await agent.pull(1, wait=5))[0]
                await agent.fail(m.id, "VALIDATION_FAILED", "bad")
                await until(lambda: not sidecar.dlq.healthy)
                ready, detail = sidecar.ready()
                assert not ready and detail["store_writable"] is False
                assert await agent.pull(5, wait=0.5) == []  # no new work while unwritable
                assert sidecar.broker.unsettled  # the failed message is not acked
                # The disk frees up and the store returns: the record lands, work resumes.
                sidecar.store._append = spool_append
                switch.down = False
                await until(lambda: not (not sidecar.dlq.healthy or sidecar.store.count() == 0))
                rest = []
                while len(rest) < 3:
                    batch = await agent.pull(5, wait=1)
                    rest += batch
                    await agent.ack([x.id for x in batch])
                await until(lambda: not sidecar.broker.unsettled)
            dead = sidecar.store.find(RecordFilter(queue=queue))
    assert [r.rawBody for r in dead] == [m.body]
    assert await queue_count(queue) == 0


async def test_agent_that_never_reads_is_dropped_and_its_work_requeued(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"x"] * 5)
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            stream = await connect_unix(config.agent.socket)
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(
                    nursery, stream, "localhost", "/", message_queue_size=1
                )
                client = AgentClient(ws)
                await client.send(p.Hello(agent="deaf", queues=[queue]))
                # Flood heartbeats without ever reading an answer: the sidecar's outbox for
                # this agent fills up and it drops the connection rather than buffer forever.
                dropped = False
                with trio.move_on_after(20):
                    try:
                        while True:
                            await client.send(p.Heartbeat(ts=1.0))
                    except (ConnectionClosed, trio.BrokenResourceError):
                        dropped = True
                nursery.cancel_scope.cancel()
            assert dropped, "the sidecar kept a connection it could not write to"
            await until(lambda: not sidecar.engine.sessions)
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                got = []
                while len(got) < 5:
                    batch = await agent.pull(5, wait=1)
                    got += batch
                    await agent.ack([m.id for m in batch])
            not_reading = sidecar.metrics.protocol_errors.labels("not_reading")._value.get()
    assert len(got) == 5
    assert not_reading == 1


async def test_many_agents_connecting_at_once_all_get_served(tmp_path, unique_queue):
    queue = unique_queue()
    n_agents, n = 40, 400
    await publish_many(queue, [f"{i}".encode() for i in range(n)])
    config = make_config(tmp_path, [queue], agent={"batch_size": 5})
    seen: list[bytes] = []
    served: set[int] = set()
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:

            async def one(k: int) -> None:
                async with open_agent(config.agent.socket, agent=f"a{k}", queues=[queue]) as agent:
                    while len(seen) < n:
                        batch = await agent.pull(5, wait=0.3)
                        if batch:
                            served.add(k)
                        seen.extend(m.body for m in batch)
                        await agent.ack([m.id for m in batch])
                        await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                for k in range(n_agents):
                    nursery.start_soon(one, k)
            # Each close reaches the sidecar a moment after its client returns.
            await until(lambda: not sidecar.engine.sessions)
            sessions_gauge = sidecar.metrics.agents._value.get()
    assert sorted(seen) == sorted(f"{i}".encode() for i in range(n))
    assert len(served) > n_agents // 2
    assert sessions_gauge == 0  # every session closed and was counted out
    assert await queue_count(queue) == 0


async def test_slow_agent_extends_its_deadline_and_is_not_charged(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"slow"])
    config = make_config(tmp_path, [queue], agent={"deadline": 0.5})
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            async with open_agent(config.agent.socket, agent="t", queues=[queue]) as agent:
                m = (await agent.pull(1, wait=5))[0]
                for _ in range(6):  # 1.8 s of work, well past the 0.5 s deadline
                    await agent.extend([m.id], 0.5)
                    await trio.sleep(0.3)
                await agent.ack([m.id])
                await until(lambda: not sidecar.broker.unsettled)
            counts = dict(sidecar.engine.counts)
    assert counts["timeouts"] == 0 and counts["acked"] == 1 and counts["failed"] == 0


# --- security ------------------------------------------------------------------------------


async def test_socket_is_created_0660_and_unsafe_paths_are_refused(tmp_path, unique_queue):
    queue = unique_queue()
    config = make_config(tmp_path, [queue])
    async with running_sidecar(config):
        mode = stat.S_IMODE(os.stat(config.agent.socket).st_mode)
    assert mode == 0o660
    target = tmp_path / "elsewhere.sock"
    target.write_text("")
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(SocketPathError, match="symlink"):
        prepare_socket_path(link)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    with pytest.raises(SocketPathError, match="owned by uid 12345"):
        prepare_socket_path(foreign / "agent.sock")


async def test_tcp_listener_requires_the_token(tmp_path, unique_queue):
    queue = unique_queue()
    config = make_config(tmp_path, [queue], agent={"tcp": "127.0.0.1:0", "token": "s3cret"})
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            port = sidecar.agent_server.tcp_port
            codec = p.Codec()
            for token, expect_ok in ((None, False), ("wrong", False), ("s3cret", True)):
                async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send_message(
                        codec.encode(p.Hello(agent="t", token=token), binary=False)
                    )
                    reply = codec.decode_sidecar(await ws.get_message())
                    if expect_ok:
                        assert isinstance(reply, p.Welcome)
                    else:
                        assert (
                            isinstance(reply, p.Error)
                            and reply.code == "unauthorized"
                            and reply.fatal
                        )
                        with pytest.raises(ConnectionClosed):
                            await ws.get_message()


async def test_secrets_never_reach_the_log(tmp_path, unique_queue, caplog):
    queue = unique_queue()
    password_url = "amqp://guest:guest@127.0.0.1:5672/"
    config = make_config(
        tmp_path,
        [queue],
        broker={"url": password_url},
        agent={"token": "tok-ABC-123"},
        alerts={"webhook": "http://user:hook-pass@127.0.0.1:9/"},
    )
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            await publish_many(queue, [b"m"])
            async with open_agent(
                config.agent.socket, agent="t", queues=[queue], token="tok-ABC-123"
            ) as agent:
                m = (await agent.pull(1, wait=5))[0]
                await agent.fail(m.id, "VALIDATION_FAILED", "bad")
                await until(lambda: sidecar.store.count() != 0)
    text = caplog.text
    assert "broker amqp://127.0.0.1:5672/" in text  # the broker URL was logged, redacted
    assert ":guest@" not in text
    assert "tok-ABC-123" not in text
    assert "hook-pass" not in text
