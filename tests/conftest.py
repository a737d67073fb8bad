"""Shared fixtures: the real RabbitMQ, unique queues that clean up after themselves, and a
running sidecar.

Direct broker access in tests (publishing fixtures, counting, cleanup) runs aiormq on an
explicit asyncio loop in a worker thread: the sidecar's trio-asyncio must not be mixed with
the test's own broker traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiormq
import pytest
import trio

from sidecar.config import Config, load_config
from sidecar.core.messages import tier_queue_name
from sidecar.supervisor import Sidecar

BROKER_URL = os.environ.get("SIDECAR_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEST_TIERS = [0.2, 0.5, 1.0]


def _ping() -> bool:
    if shutil.which("rabbitmq-diagnostics") is None:
        return False
    result = subprocess.run(
        ["rabbitmq-diagnostics", "-q", "ping"], capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0


def ensure_rabbitmq() -> None:
    """Start the local RabbitMQ when it is not running; fail clearly when it cannot."""
    if _ping():
        return
    if shutil.which("rabbitmq-server") is None:
        pytest.fail("RabbitMQ is not running and rabbitmq-server is not installed")
    env = {**os.environ, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "ERL_EPMD_ADDRESS": "127.0.0.1"}
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=False, timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _ping():
            subprocess.run(["rabbitmqctl", "await_startup"], check=False, timeout=60)
            return
        time.sleep(1)
    pytest.fail("RabbitMQ did not start within 60s (rabbitmq-server -detached; ping fails)")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-broker",
        action="store_true",
        help="fail the run if any test connects to the broker (for broker-free unit runs)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--no-broker"):
        from tests import no_broker

        config.pluginmanager.register(no_broker, "no_broker")


@pytest.fixture(scope="session")
def rabbitmq() -> Any:
    """The broker, started if needed. Every test that touches the broker reaches it through
    this fixture (directly or via ``unique_queue``), so the end-of-session clean-up of the
    operator tools' ledger queue lives here: a unit-only run never sets it up and never
    connects."""
    ensure_rabbitmq()
    yield BROKER_URL
    from sidecar.tools.republish import LEDGER_QUEUE

    with contextlib.suppress(OSError, aiormq.exceptions.AMQPError):
        delete_queues([LEDGER_QUEUE])


def run_amqp(fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``fn(channel)`` with a fresh aiormq connection on a private asyncio loop."""

    async def main() -> Any:
        connection = await aiormq.connect(BROKER_URL)
        try:
            channel = await connection.channel()
            return await fn(channel)
        finally:
            await connection.close()

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def amqp(fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """``run_amqp`` from a trio test, in a worker thread."""
    return await trio.to_thread.run_sync(run_amqp, fn)


async def publish_many(queue: str, bodies: list[bytes], **props: Any) -> None:
    async def go(channel: Any) -> None:
        await channel.queue_declare(queue, durable=True)
        for i, body in enumerate(bodies):
            await channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(
                    message_id=props.get("message_id_prefix", "m") + str(i), delivery_mode=2
                ),
            )

    await amqp(go)


async def queue_count(queue: str) -> int | None:
    async def go(channel: Any) -> int | None:
        try:
            return (await channel.queue_declare(queue, passive=True)).message_count
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None

    return await amqp(go)


def delete_queues(names: list[str]) -> None:
    async def go(channel: Any) -> None:
        for name in names:
            await channel.queue_delete(name)

    run_amqp(go)


@pytest.fixture
def unique_queue(rabbitmq: str) -> Any:
    """A fresh queue name; the queue and its retry tiers are deleted afterwards."""
    created: list[str] = []

    def make(prefix: str = "test") -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:10]}"
        created.append(name)
        return name

    yield make
    names = []
    for queue in created:
        names.append(queue)
        names += [
            tier_queue_name("sidecar.retry", queue, t) for t in (*TEST_TIERS, 1, 5, 30, 120, 600)
        ]
    delete_queues(list(dict.fromkeys(names)))


def make_config(tmp_path: Path, queues: list[str], **sections: dict[str, Any]) -> Config:
    """A sidecar config for tests: short delay tiers, private socket and store, any port."""
    base: dict[str, dict[str, Any]] = {
        "broker": {
            "url": BROKER_URL,
            "queues": queues,
            "reconnect_min": 0.2,
            "reconnect_max": 1.0,
            # The whole suite runs on the default hop; CI runs the broker-heavy part again
            # with SIDECAR_TEST_HOP=thread.
            "hop": os.environ.get("SIDECAR_TEST_HOP", "trio-asyncio"),
        },
        "agent": {"socket": str(tmp_path / "agent.sock"), "deadline": 5.0},
        "retry": {"tiers": TEST_TIERS, "base_delay": 0.2, "max_delay": 1.0},
        "store": {
            "url": f"sqlite:///{tmp_path / 'dlq.sqlite3'}",
            "spool": str(tmp_path / "spool.sqlite3"),
        },
        "http": {"listen": "127.0.0.1:0"},
        "throttle": {"rate": 100000.0, "burst": 100000.0},
        "depth": {"interval": 0.5},
        "drain": {"grace": 2.0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_config(overrides=base, environ={})


@asynccontextmanager
async def running_sidecar(config: Config) -> AsyncIterator[Sidecar]:
    """A sidecar serving until the block exits, then drained and stopped."""
    sidecar = Sidecar(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(sidecar.run)
        with trio.fail_after(20):
            await sidecar.broker.connected.wait()
        try:
            yield sidecar
        finally:
            sidecar.stop()
            with trio.move_on_after(config.drain.grace + 5):
                while not nursery.cancel_scope.cancel_called and nursery.child_tasks:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


def record_session_ends(engine: Any) -> list[bool]:
    """Wrap ``engine.close_session`` to record, per agent session, whether it ended as a
    crash (anything but a WebSocket close 1000/1001)."""
    ended: list[bool] = []
    close_session = engine.close_session

    def recording(session: int, *, crashed: bool) -> None:
        ended.append(crashed)
        close_session(session, crashed=crashed)

    engine.close_session = recording
    return ended
