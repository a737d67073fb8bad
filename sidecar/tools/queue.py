"""``sidecar queue purge``: remove low-priority messages, keep everything else.

RabbitMQ has no selective purge, so the tool takes up to the queue's current depth with
``basic_get`` (held unacked, so none is seen twice), drops the low-priority ones (up to
``--limit``) and republishes every other message to the same queue with all its properties
and headers; each original is acked only after its copy is confirmed. A crash half-way
leaves the unacked originals to be requeued by the broker: nothing is lost, at worst a kept
message appears twice.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiormq

from sidecar.commands import EXIT_OK, EXIT_PARTIAL, EXIT_REFUSED, positive_int
from sidecar.tools.amqp import Amqp, QueueMissing, copy_properties
from sidecar.tools.common import (
    Progress,
    ToolError,
    add_common,
    emit_json,
    load,
    tool,
)
from sidecar.tools.dlq import confirm

LOW_PRIORITY_MAX = 3  # AMQP priority property <= 3 counts as "low"


def is_low(message: Any) -> bool:
    props = message.header.properties
    if props.priority is not None and props.priority <= LOW_PRIORITY_MAX:
        return True
    headers = props.headers or {}
    value = headers.get("priority")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return isinstance(value, str) and value.strip().lower() == "low"


@tool
def cmd_purge(args: argparse.Namespace) -> int:
    config = load(args)
    return asyncio.run(_purge(config.broker.url, args))


async def _purge(url: str, args: argparse.Namespace) -> int:
    async with Amqp(url) as amqp:
        try:
            depth, _ = await amqp.queue_info(args.queue_name)
        except QueueMissing as exc:
            raise ToolError(f"queue {args.queue_name!r} does not exist", EXIT_REFUSED) from exc
        if not args.yes and not confirm(
            f"remove up to {args.limit} low-priority message(s) of {depth} in "
            f"{args.queue_name!r}? type 'yes' to confirm:"
        ):
            raise ToolError("not confirmed: queue left untouched (use --yes in scripts)")
        channel = await amqp.channel(confirms=True)
        progress = Progress(f"scanning {args.queue_name}", depth)
        held: list[Any] = []
        removed = kept = failed = 0
        try:
            while len(held) < depth:
                message = await channel.basic_get(args.queue_name, no_ack=False)
                if isinstance(message.delivery, aiormq.spec.Basic.GetEmpty):
                    break
                held.append(message)
            for n, message in enumerate(held, 1):
                tag = message.delivery.delivery_tag
                if removed < args.limit and is_low(message):
                    await channel.basic_ack(tag)
                    removed += 1
                else:
                    confirmation = await channel.basic_publish(
                        message.body,
                        exchange="",
                        routing_key=args.queue_name,
                        properties=copy_properties(message),
                        mandatory=True,
                    )
                    if isinstance(confirmation, aiormq.spec.Basic.Ack):
                        await channel.basic_ack(tag)
                        kept += 1
                    else:
                        await channel.basic_reject(tag, requeue=True)
                        failed += 1
                progress.update(n)
        finally:
            progress.close()
    result = {
        "queue": args.queue_name,
        "scanned": len(held),
        "removed": removed,
        "kept": kept,
        "failed": failed,
    }
    if args.json:
        emit_json(result)
    else:
        print(
            f"{args.queue_name}: scanned {len(held)}, removed {removed} low-priority, "
            f"kept {kept}" + (f", {failed} not confirmed (left in the queue)" if failed else "")
        )
    return EXIT_PARTIAL if failed else EXIT_OK


def register(sub: Any) -> None:
    queue = sub.add_parser("queue", help="queue maintenance")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    p = qsub.add_parser(
        "purge",
        help="remove low-priority messages from a queue",
        description=(
            f"Remove low-priority messages and keep every other one. Low means the AMQP "
            f"priority property is {LOW_PRIORITY_MAX} or less, or a 'priority' header is "
            "'low' (any case); a message with neither is kept."
        ),
    )
    add_common(p)
    p.add_argument("queue_name", metavar="QUEUE")
    p.add_argument(
        "--priority",
        choices=["low"],
        required=True,
        help=f"what to remove: low = priority <= {LOW_PRIORITY_MAX} or header priority=low",
    )
    p.add_argument("--limit", type=positive_int, default=1000, help="remove at most N (>= 1)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_purge)
