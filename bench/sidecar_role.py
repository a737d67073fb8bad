"""Run one Sidecar in this process until SIGTERM.

    python -m bench.sidecar_role --config '{"agent": {...}, ...}' [--no-drain-patch]

``--no-drain-patch`` (or BENCH_NO_DRAIN_PATCH=1) leaves trio-asyncio stock, to measure what
the drained loop (sidecar/adapters/aio_loop.py) buys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import trio

from bench.common import emit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.sidecar_role")
    ap.add_argument("--config", required=True, help="JSON overrides for load_config")
    ap.add_argument("--no-drain-patch", action="store_true")
    a = ap.parse_args(argv)
    no_drain = a.no_drain_patch or os.environ.get("BENCH_NO_DRAIN_PATCH") == "1"
    if no_drain:
        import sidecar.adapters.aio_loop as aio_loop

        aio_loop.install_drain_patch = lambda: False
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    from sidecar.config import load_config
    from sidecar.supervisor import Sidecar

    config = load_config(environ={}, overrides=json.loads(a.config))
    sidecar = Sidecar(config)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.run)
            while not sidecar.broker.is_connected:
                await trio.sleep(0.01)
            emit(
                event="ready",
                pid=os.getpid(),
                socket=config.agent.socket,
                http_port=sidecar.http_port,
                drain_patch=not no_drain,
            )

    profile_to = os.environ.get("BENCH_CPROFILE")
    if profile_to:
        # Where the sidecar's time goes, when py-spy is not at hand (slower, but in proportion).
        import cProfile

        cProfile.runctx("trio.run(run)", globals(), {"trio": trio, "run": run}, profile_to)
    else:
        trio.run(run)
    emit(event="stopped", counts=dict(sidecar.engine.counts))


if __name__ == "__main__":
    main()
