"""A pytest plugin that fails the run when a test opens a connection to the broker.

``pytest --no-broker`` loads it (see tests/conftest.py), as does ``-p tests.no_broker``, on
runs that are meant to be broker-free (the unit tests, the mutation runs): a unit test that quietly needs RabbitMQ would otherwise pass here only
because a broker happens to be running, and the whole suite's teardown would connect to it.
Any socket connection to the broker's port, or setting up the ``rabbitmq`` fixture, counts.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest

_BROKER = urlsplit(os.environ.get("SIDECAR_TEST_BROKER_URL", "amqp://127.0.0.1:5672/"))
BROKER_PORT = _BROKER.port or 5672

attempts: list[str] = []
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


def _is_broker(address: Any) -> bool:
    return isinstance(address, tuple) and len(address) >= 2 and address[1] == BROKER_PORT


def _refuse(what: str) -> None:
    attempts.append(what)
    raise ConnectionRefusedError(f"broker-free run: {what}")


def _connect(self: socket.socket, address: Any) -> None:
    if _is_broker(address):
        _refuse(f"connect to {address!r}")
    _original_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    if _is_broker(address):
        _refuse(f"connect_ex to {address!r}")
    return _original_connect_ex(self, address)


def pytest_configure(config: pytest.Config) -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    socket.socket.connect = _original_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _original_connect_ex  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> None:
    if fixturedef.argname == "rabbitmq":
        _refuse(f"{request.node.nodeid} set up the rabbitmq fixture")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A refused connect inside a suppressing teardown would not fail any test, so the
    # session itself fails.
    if attempts and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if attempts:
        terminalreporter.section("broker-free run touched the broker")
        for what in dict.fromkeys(attempts):
            terminalreporter.write_line(what)
