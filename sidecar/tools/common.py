"""Shared plumbing for the operator tools: exit codes, errors, output, progress, the store."""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from sidecar.cli import add_config_flags, config_from_args
from sidecar.config import Config
from sidecar.store.base import DeadLetterStore, StoreUnavailable, open_store, redact_url
from sidecar.store.records import RecordFilter

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_REFUSED = 4  # not found, or refused (missing queue, no confirmation)
EXIT_UNREACHABLE = 5  # store or broker unreachable

# Test hook: SIDECAR_TOOLS_CRASH_AFTER=k makes a retry/move process os._exit(137) right after
# the AMQP tx_commit of its k-th record (before marking it), to test crash recovery.
CRASH_AFTER_ENV = "SIDECAR_TOOLS_CRASH_AFTER"


class ToolError(Exception):
    """A clear, expected failure: the message is printed and the code returned."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def tool(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures into a one-line message on stderr and an exit code."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from sidecar.tools.amqp import BrokerUnavailable

        try:
            return fn(args)
        except ToolError as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            return exc.code
        except StoreUnavailable as exc:
            print(f"sidecar: dead-letter store unavailable: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except BrokerUnavailable as exc:
            print(f"sidecar: broker unavailable: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE

    return run


def add_common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    add_config_flags(parser)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def load(args: argparse.Namespace) -> Config:
    return config_from_args(args)


@contextmanager
def store_from(config: Config) -> Iterator[DeadLetterStore]:
    try:
        store = open_store(config.store.url)
    except ValueError as exc:
        raise ToolError(f"bad store URL: {exc}", code=EXIT_CONFIG) from exc
    except StoreUnavailable:
        raise
    except Exception as exc:  # driver errors on open (e.g. sqlite3.OperationalError)
        raise StoreUnavailable(f"{redact_url(config.store.url)}: {exc}") from exc
    try:
        yield store
    finally:
        store.close()


# --- parsing


def parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 30s, 15m, 12h, 7d, 2w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2).lower()])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def add_filter_flags(parser: argparse.ArgumentParser) -> None:
    # dest names avoid config_from_args' own --queue/--http handling.
    parser.add_argument("--queue", dest="f_queue", metavar="Q", help="originalQueue")
    parser.add_argument("--reason", dest="f_reason", metavar="R", help="failureReason")
    parser.add_argument("--host", dest="f_host", metavar="H", help="processingHost")
    parser.add_argument("--since", dest="f_since", type=parse_time, metavar="ISO")
    parser.add_argument("--until", dest="f_until", type=parse_time, metavar="ISO")
    parser.add_argument(
        "--pattern", dest="f_pattern", metavar="P", help="substring of reason/error/signature"
    )


def filter_from(args: argparse.Namespace, **extra: Any) -> RecordFilter:
    fields = {
        "queue": getattr(args, "f_queue", None),
        "reason": getattr(args, "f_reason", None),
        "host": getattr(args, "f_host", None),
        "since": getattr(args, "f_since", None),
        "until": getattr(args, "f_until", None),
        "pattern": getattr(args, "f_pattern", None),
    }
    fields.update(extra)
    return RecordFilter(**{k: v for k, v in fields.items() if v is not None})


# --- output


def to_json(value: Any) -> Any:
    return msgspec.to_builtins(value)


def emit_json(value: Any) -> None:
    print(json.dumps(to_json(value), indent=2, sort_keys=False, default=str))


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def iso(value: datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value else "-"


class Progress:
    """A ``\\r`` counter on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty()
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\r{self.label}: {done}{of}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
