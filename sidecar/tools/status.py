"""``sidecar status``: the seed's "DLQ Health" and "Backpressure Status" views.

From a running sidecar's ``/status``: the address is ``--http`` (HOST:PORT or a URL), else
the configuration's ``http.listen`` (``--config``, environment, default 127.0.0.1:9090). With
``--store`` and no ``--http``, DLQ Health is read straight from the store instead.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from sidecar.commands import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from sidecar.config import parse_host_port
from sidecar.runtime.observability import dlq_health
from sidecar.tools.common import ToolError, add_common, emit_json, load, store_from, table, tool

DEFAULT_URL = "http://127.0.0.1:9090"
# A daemon listening on every interface is reached on loopback from the same machine.
_ANY_HOST = {"", "0.0.0.0", "::", "[::]", "*"}


def base_url(address: str) -> str:
    """``HOST:PORT``, ``:PORT`` or an http(s) URL -> the sidecar's base URL."""
    address = address.strip()
    if "://" in address:
        scheme = address.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ToolError(f"--http {address!r}: expected HOST:PORT or an http:// URL", EXIT_USAGE)
        return address.rstrip("/")
    parsed = parse_host_port(address)
    if parsed is None:
        raise ToolError(f"--http {address!r}: expected HOST:PORT or an http:// URL", EXIT_USAGE)
    host, port = parsed
    host = "127.0.0.1" if host in _ANY_HOST else host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


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
    memory = bp.get("memory") or {}
    if memory.get("limit_bytes"):
        lines.append(
            f"Memory: {_pct(memory.get('ratio'))} of {_mib(memory.get('limit_bytes'))} "
            f"({memory.get('source', '?')}); agent {_mib(memory.get('agent_rss_bytes'))}, "
            f"sidecar {_mib(memory.get('sidecar_rss_bytes'))}"
        )
    degradation = bp.get("degradation") or []
    lines.append(f"Degradation: {', '.join(degradation) if degradation else 'none'}")
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, int | float) else "-"


def _mib(value: Any) -> str:
    return f"{value / 1048576:.0f} MiB" if isinstance(value, int | float) else "-"


def render_summary(summary: dict[str, Any]) -> str:
    """Breaker, sessions, broker, pressure, depth and spool: what an operator checks first."""
    lines = []
    broker = summary.get("broker") or {}
    state = "connected" if broker.get("connected") else "DISCONNECTED"
    blocked = "publishers BLOCKED by the broker" if broker.get("blocked") else "not blocked"
    lines.append(
        f"Broker: {state} (connection generation {broker.get('generation', '-')}, "
        f"{broker.get('reconnects', 0)} reconnects), {blocked}"
    )
    breaker = summary.get("breaker") or {}
    text = f"Breaker: {breaker.get('state', '-')}"
    if breaker.get("since"):
        text += f" since {breaker['since']}"
    if breaker.get("next_probe_at"):
        text += f", next probe at {breaker['next_probe_at']} (in {breaker['next_probe_in']:.0f}s)"
    text += f"; {breaker.get('trips', 0)} trips"
    if breaker.get("open_keys"):
        text += f"; open keys: {', '.join(map(str, breaker['open_keys']))}"
    lines.append(text)
    sessions = summary.get("sessions") or []
    lines.append(f"Agent sessions: {len(sessions)}")
    if sessions:
        rows = [[s.get("agent"), s.get("version"), s.get("pid"), s.get("held")] for s in sessions]
        lines.append(table(rows, ["AGENT", "VERSION", "PID", "HELD"]))
    pressure = summary.get("pressure") or {}
    degradation = pressure.get("degradation") or []
    lines.append(
        f"Pressure: {pressure.get('level', '-')} (memory {_pct(pressure.get('memory_ratio'))})"
        f"; degradation: {', '.join(degradation) if degradation else 'none'}"
    )
    lines.append(f"Depth level: {summary.get('depth_level', '-')}")
    spool = summary.get("spool") or {}
    spool_text = f"Spool: {spool.get('records', 0)} record(s) waiting for the store"
    if spool.get("store_error"):
        spool_text += f"; store error: {spool['store_error']}"
    if spool.get("writable") is False:
        spool_text += "; dead letters CANNOT be written"
    lines.append(spool_text)
    if summary.get("draining"):
        lines.append("Draining: no new work is taken")
    return "\n".join(lines)


def daemon_url(args: argparse.Namespace) -> str:
    if args.http_url:
        return base_url(args.http_url)
    return base_url(load(args).http.listen)


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
    url = daemon_url(args)
    status = fetch_status(url)
    if args.json:
        emit_json(status)
        return EXIT_OK
    print(f"Sidecar on {status.get('host', '?')} ({url})\n")
    if status.get("summary"):
        print(render_summary(status["summary"]))
        print()
    print(render_dlq(status.get("dlq_health") or {}))
    print()
    print(render_backpressure(status.get("backpressure_status") or {}))
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="DLQ Health and Backpressure Status of a sidecar")
    add_common(p)
    p.add_argument(
        "--http",
        dest="http_url",
        metavar="ADDR",
        help="the daemon's HTTP listener: HOST:PORT (as run --http takes) or a URL; "
        "default: http.listen of --config, else 127.0.0.1:9090",
    )
    p.set_defaults(func=cmd_status)
