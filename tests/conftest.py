"""Shared fixtures: the real RabbitMQ and unique queues that clean up after themselves.

Helpers the test modules import (broker access, a running sidecar, waiting for a
condition) live in ``tests.helpers``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from typing import Any

import aiormq
import pytest

from sidecar.core.messages import tier_queue_name
from tests.helpers.broker import BROKER_URL, TEST_TIERS, delete_queues, run_amqp


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
    ledger queue from before store ids (which the tests of its recovery declare) lives
    here: a unit-only run never sets it up and never connects. Only when empty: another
    run on this broker may be using it. Each store's own ledger queue is deleted by the
    tools when a run ends with it empty."""
    ensure_rabbitmq()
    yield BROKER_URL
    from sidecar.tools.republish import LEGACY_LEDGER_QUEUE

    async def delete_if_empty(channel: Any) -> None:
        await channel.queue_delete(LEGACY_LEDGER_QUEUE, if_empty=True)

    with contextlib.suppress(OSError, aiormq.exceptions.AMQPError):
        run_amqp(delete_if_empty)


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
