"""``sidecar scale recommend``: consumers wanted per queue (the seed's depth / 10, clamped)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

from sidecar.commands import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from sidecar.policy.scaling import ScalingPolicy, recommended_consumers, scaling_event
from sidecar.tools.amqp import Amqp, QueueMissing
from sidecar.tools.common import ToolError, add_common, emit_json, load, table, tool


@tool
def cmd_recommend(args: argparse.Namespace) -> int:
    config = load(args)
    queues = list(dict.fromkeys(args.scale_queues or config.broker.queues))
    if not queues:
        raise ToolError("no queues: give --queue (repeatable) or broker.queues", EXIT_USAGE)
    policy = ScalingPolicy(
        messages_per_consumer=config.scaling.messages_per_consumer,
        min_consumers=config.scaling.min_consumers,
        max_consumers=config.scaling.max_consumers,
    )
    rows, missing = asyncio.run(_inspect(config.broker.url, queues, policy))
    if args.json:
        emit_json({"broker": _where(config.broker.url), "queues": rows, "missing": missing})
    else:
        if rows:
            print(
                table(
                    [
                        [r["queue"], r["depth"], r["consumers"], r["recommended"], r["event"]]
                        for r in rows
                    ],
                    ["QUEUE", "DEPTH", "CONSUMERS", "RECOMMENDED", "EVENT"],
                )
            )
        where = _where(config.broker.url)
        for q in missing:
            print(f"queue {q!r} does not exist on {where}", file=sys.stderr)
    return EXIT_REFUSED if missing else EXIT_OK


def _where(url: str) -> str:
    """The broker and vhost asked, without credentials."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return f"{parts.hostname or '?'}:{parts.port or 5672} vhost {vhost!r}"


async def _inspect(
    url: str, queues: list[str], policy: ScalingPolicy
) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    async with Amqp(url) as amqp:
        for queue in queues:
            try:
                depth, consumers = await amqp.queue_info(queue)
            except QueueMissing:
                missing.append(queue)
                continue
            wanted = recommended_consumers(depth, policy)
            rows.append(
                {
                    "queue": queue,
                    "depth": depth,
                    "consumers": consumers,
                    "recommended": wanted,
                    "event": scaling_event(consumers, wanted),
                }
            )
    return rows, missing


def register(sub: Any) -> None:
    scale = sub.add_parser("scale", help="consumer scaling")
    ssub = scale.add_subparsers(dest="scale_command", required=True)
    p = ssub.add_parser("recommend", help="recommended consumers per queue")
    add_common(p)
    p.add_argument("--queue", dest="scale_queues", action="append", metavar="Q")
    p.set_defaults(func=cmd_recommend)
