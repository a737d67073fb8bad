"""Many hostile connections at once against a real sidecar (and the real broker): silent
clients, garbage before the upgrade, the 1-2 KB deep hello that used to kill the daemon
before authentication (Unix socket and TCP, no token), frames nested past the limit,
oversized and stalled frames, random frames after a valid hello, abrupt disconnects.
Afterwards the daemon still serves a real agent, and every hostile connection is gone."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, wrap_client_stream

from sidecar import protocol as p
from sidecar.client import open_agent
from tests.helpers import make_config, publish_many, running_sidecar, until

pytestmark = pytest.mark.integration

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: sidecar\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
DEEP_HELLO = '{"kind":"hello","agent":"x","queues":[],"pid":' + "[" * 1000 + "]" * 1000 + "}"


def random_frame(rng: random.Random) -> bytes | str:
    kind = rng.choice([*sorted(p.AGENT_KINDS), "bogus"])
    depth = rng.choice([1, 5, 31, 33, 200, 2000])
    value: Any = rng.choice([1, "x", None, 2**64 - 1, -1, 1e308])
    if depth < 100:
        for _ in range(depth):
            value = [value]
        obj = {"kind": kind, rng.choice(["ids", "headers", "x", "id", "ref"]): value}
        return (
            msgspec.json.encode(obj).decode() if rng.random() < 0.5 else msgspec.msgpack.encode(obj)
        )
    return f'{{"kind":"{kind}","x":' + "[" * depth + "]" * depth + "}"


async def hostile_client(path: str, tcp_port: int | None, rng: random.Random) -> None:
    mode = rng.choice(["silent", "garbage", "deep_hello", "deep_hello_tcp", "stall", "random"])
    with trio.move_on_after(30):
        try:
            if mode == "deep_hello_tcp" and tcp_port is not None:
                stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", tcp_port)
            else:
                stream = await trio.open_unix_socket(path)
            async with stream:
                if mode == "silent":
                    await stream.receive_some(1024)  # until the server gives up on us
                elif mode == "garbage":
                    await stream.send_all(bytes(rng.getrandbits(8) for _ in range(2000)))
                    await stream.receive_some(1024)
                elif mode == "stall":
                    await stream.send_all(UPGRADE)
                    await stream.receive_some(4096)
                    await stream.send_all(b"\x82\xff" + (8 * 2**20).to_bytes(8, "big") + b"\0" * 4)
                    await stream.send_all(b"\0" * rng.randrange(1, 2**20))
                    # and vanish, mid-frame
                else:
                    async with trio.open_nursery() as nursery:
                        ws = await wrap_client_stream(nursery, stream, "sidecar", "/")
                        if mode.startswith("deep_hello"):
                            await ws.send_message(DEEP_HELLO)
                        else:
                            await ws.send_message(
                                p.Codec().encode(p.Hello(agent="fuzz", queues=[]), binary=False)
                            )
                            for _ in range(rng.randrange(1, 30)):
                                await ws.send_message(random_frame(rng))
                        with trio.move_on_after(2):
                            while True:
                                await ws.get_message()
                        nursery.cancel_scope.cancel()
        except* (
            OSError,
            ConnectionClosed,
            HandshakeError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass  # the sidecar cutting us off is the expected outcome


async def test_many_concurrent_hostile_connections(tmp_path, unique_queue):
    queue = unique_queue()
    config = make_config(
        tmp_path,
        [queue],
        agent={
            "tcp": "127.0.0.1:0",
            "token": "fuzz-token",
            "handshake_timeout": 2.0,
            "max_frame_bytes": 16 * 2**20,
            "max_buffered_bytes": 16 * 2**20,
            "max_sessions": 64,
        },
    )
    rng = random.Random(1306)
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:
            server = sidecar.agent_server
            async with trio.open_nursery() as nursery:
                for i in range(120):
                    nursery.start_soon(
                        hostile_client,
                        config.agent.socket,
                        server.tcp_port,
                        random.Random(rng.getrandbits(32)),
                    )
                    if i % 40 == 39:
                        await trio.sleep(0.2)
            # Every hostile connection is gone; the daemon serves a real agent.
            await until(lambda: not server.active)
            assert not sidecar.engine.sessions
            # The silent ones were timed out, not left to leak their descriptors.
            assert server.refused.get("handshake_timeout", 0) >= 1, server.refused
            await publish_many(queue, [b"still-serving"])
            async with open_agent(
                config.agent.socket, agent="real", queues=[queue], token="fuzz-token"
            ) as agent:
                got: list[p.Delivery] = []
                while not got:
                    got = await agent.pull(1, wait=1)
                assert got[0].body == b"still-serving"
                await agent.ack([got[0].id])
            assert sidecar.broker.reconnects == 0
            await until(lambda: not sidecar.broker.unsettled)
