"""``sidecar status``: the seed's "DLQ Health" and "Backpressure Status" views.

From a running sidecar's ``/status`` (``--http``, default http://127.0.0.1:9090), or, with
``--store`` and no ``--http``, DLQ Health read straight from the store.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from sidecar.observability import dlq_health
from sidecar.tools.common import (
    EXIT_OK,
    EXIT_UNREACHABLE,
    ToolError,
    add_common,
    emit_json,
    load,
    store_from,
    table,
    tool,
)

DEFAULT_URL = "http://127.0.0.1:9090"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    target = url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            status: dict[str, Any] = json.loads(response.read())
            return status
    except urllib.error.HTTPError as exc:
        raise ToolError(f"{target}: HTTP {exc.code} {exc.reason}", EXIT_UNREACHABLE) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ToolError(f"cannot reach sidecar at {target}: {reason}", EXIT_UNREACHABLE) from exc
    except ValueError as exc:
        raise ToolError(f"{target}: not a JSON status document", EXIT_UNREACHABLE) from exc


def render_dlq(health: dict[str, Any]) -> str:
    lines = ["DLQ Health", "----------", f"DLQ Size: {health.get('size', 0)}"]
    lines.append("Top Failure Reasons:")
    for item in health.get("top_failures") or []:
        lines.append(f"  {item.get('reason')}: {item.get('count')}")
    if not health.get("top_failures"):
        lines.append("  (none)")
    lines.append(f"Oldest Message: {health.get('oldest') or '-'}")
    lines.append(f"Newest Message: {health.get('newest') or '-'}")
    if health.get("spooled"):
        lines.append(f"Spooled locally (store down): {health['spooled']}")
    return "\n".join(lines)


def render_backpressure(bp: dict[str, Any]) -> str:
    lines = ["Backpressure Status", "-------------------"]
    depths = bp.get("queue_depths") or {}
    rows = []
    for name, q in depths.items():
        if isinstance(q, dict):
            rows.append(
                [
                    name,
                    q.get("depth"),
                    q.get("consumers"),
                    q.get("level"),
                    q.get("recommended_consumers"),
                ]
            )
        else:
            rows.append([name, q, (bp.get("consumer_counts") or {}).get(name), "", ""])
    lines.append("Queue Depths / Consumer Counts:")
    lines.append(
        table(rows, ["QUEUE", "DEPTH", "CONSUMERS", "LEVEL", "RECOMMENDED"]) if rows else "  (none)"
    )
    lines.append(f"System Pressure: {bp.get('system_pressure', '-')}")
    memory = bp.get("memory")
    if memory is not None:
        lines.append(f"Memory: {json.dumps(memory)}")
    degradation = bp.get("degradation") or []
    lines.append(f"Degradation: {', '.join(degradation) if degradation else 'none'}")
    return "\n".join(lines)


@tool
def cmd_status(args: argparse.Namespace) -> int:
    if args.store and not args.http_url:
        config = load(args)
        with store_from(config) as store:
            health = dlq_health(store)
        if args.json:
            emit_json({"dlq_health": health})
        else:
            print(render_dlq(health))
        return EXIT_OK
    status = fetch_status(args.http_url or DEFAULT_URL)
    if args.json:
        emit_json(status)
        return EXIT_OK
    if status.get("host"):
        print(f"Sidecar on {status['host']}\n")
    print(render_dlq(status.get("dlq_health") or {}))
    print()
    print(render_backpressure(status.get("backpressure_status") or {}))
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="DLQ Health and Backpressure Status of a sidecar")
    add_common(p)
    p.add_argument(
        "--http", dest="http_url", metavar="URL", help=f"sidecar HTTP base URL ({DEFAULT_URL})"
    )
    p.set_defaults(func=cmd_status)
