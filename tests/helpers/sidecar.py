"""A sidecar for tests: its configuration, and running it for the length of a block."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from sidecar.config import Config, load_config
from sidecar.supervisor import Sidecar
from tests.helpers.broker import BROKER_URL, TEST_TIERS


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
async def running_sidecar(config: Config, **options: Any) -> AsyncIterator[Sidecar]:
    """A sidecar serving until the block exits, then drained and stopped; ``options`` go
    to ``Sidecar`` (a tracer, for instance)."""
    sidecar = Sidecar(config, **options)
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
