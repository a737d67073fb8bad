"""Unit-only runs never touch the broker, and the ``--no-broker`` guard that proves it works.

Each case runs pytest in a child process: the guard patches sockets for a whole session, and
what is checked is a session's outcome (its exit status), teardown included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Broker-free modules across the layers; each loads tests/conftest.py and its session fixtures.
UNIT_MODULES = [
    "tests/core/test_ledger.py",
    "tests/core/test_engine_driver.py",
    "tests/policy/test_breaker.py",
    "tests/unit/test_attempts.py",
    "tests/unit/test_protocol.py",
    "tests/unit/test_records.py",
    "tests/test_config.py",
    "tests/store/test_sqlite.py",
]


def pytest_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_unit_only_run_opens_no_broker_connection():
    result = pytest_run("--no-broker", *UNIT_MODULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "touched the broker" not in result.stdout
    assert " passed" in result.stdout


def test_the_guard_fails_a_test_that_connects(tmp_path):
    (tmp_path / "test_connects.py").write_text(
        "import socket\n"
        "def test_connects():\n"
        "    socket.create_connection(('127.0.0.1', 5672), timeout=5).close()\n"
    )
    result = pytest_run("-p", "tests.no_broker", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broker-free run: connect to ('127.0.0.1', 5672)" in result.stdout
    assert "touched the broker" in result.stdout


def test_the_guard_fails_the_session_when_a_teardown_swallows_the_refusal(tmp_path):
    # The shape of the old end-of-session ledger clean-up: it suppressed connection errors,
    # so only the session's exit status can show that it tried.
    (tmp_path / "test_teardown.py").write_text(
        "import contextlib, socket\n"
        "import pytest\n"
        "@pytest.fixture(scope='session', autouse=True)\n"
        "def cleanup():\n"
        "    yield\n"
        "    with contextlib.suppress(OSError):\n"
        "        socket.create_connection(('127.0.0.1', 5672), timeout=5).close()\n"
        "def test_nothing():\n"
        "    assert 1 + 1 == 2\n"
    )
    result = pytest_run("-p", "tests.no_broker", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "touched the broker" in result.stdout


def test_the_guard_fails_a_test_that_asks_for_the_broker_fixture(tmp_path):
    (tmp_path / "test_fixture.py").write_text(
        "import pytest\n"
        "@pytest.fixture\n"
        "def rabbitmq():\n"
        "    return 'amqp://'\n"
        "def test_uses_it(rabbitmq):\n"
        "    assert rabbitmq\n"
    )
    result = pytest_run("-p", "tests.no_broker", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "set up the rabbitmq fixture" in result.stdout


def test_other_ports_are_not_refused(tmp_path):
    (tmp_path / "test_other.py").write_text(
        "import socket\n"
        "def test_local_listener():\n"
        "    server = socket.create_server(('127.0.0.1', 0))\n"
        "    port = server.getsockname()[1]\n"
        "    socket.create_connection(('127.0.0.1', port), timeout=5).close()\n"
        "    server.close()\n"
    )
    result = pytest_run("-p", "tests.no_broker", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
