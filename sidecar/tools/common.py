"""Shared plumbing for the operator tools: exit codes, errors, output, progress, the store."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from sidecar.commands import (
    EXIT_CONFIG,
    EXIT_PARTIAL,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    add_config_flags,
    config_from_args,
)
from sidecar.config import Config
from sidecar.store.base import (
    DeadLetterStore,
    PatternKey,
    StoreUnavailable,
    redact_url,
)
from sidecar.store.opening import open_store
from sidecar.store.records import RecordFilter


class ToolError(Exception):
    """A clear, expected failure: the message is printed and the code returned."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def _one_line(text: str, limit: int = 240) -> str:
    """Drivers put pages of detail in their messages; the default output is one line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    verbose = bool(getattr(args, "verbose", False))
    text = message if verbose else _one_line(message)
    hint = "" if verbose or text == " ".join(message.split()) else " (--verbose for details)"
    print(f"sidecar: {text}{hint}", file=sys.stderr)
    return code


def tool(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures into a one-line message on stderr and an exit code."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:

        from sidecar.core.port import BrokerUnavailable
        from sidecar.tools.amqp import BROKER_LOST

        try:
            return fn(args)
        except (BrokenPipeError, KeyboardInterrupt):
            raise  # handled once, quietly, by cli.main (BrokenPipeError is a ConnectionError)
        except ToolError as exc:
            return _fail(args, str(exc), exc.code)
        except StoreUnavailable as exc:
            return _fail(args, f"dead-letter store unavailable: {exc}", EXIT_UNREACHABLE)
        except BrokerUnavailable as exc:
            return _fail(args, f"broker unavailable: {exc}", EXIT_UNREACHABLE)
        except BROKER_LOST as exc:
            # The broker went away mid-run; the ledger makes a rerun safe.
            detail = str(exc) or type(exc).__name__
            return _fail(
                args,
                f"lost the broker connection: {detail}; nothing already sent is sent twice "
                "when the command is run again",
                EXIT_UNREACHABLE,
            )
        except Exception as exc:
            if getattr(args, "verbose", False):
                raise
            return _fail(args, f"unexpected error: {type(exc).__name__}: {exc}", EXIT_PARTIAL)

    return run


def add_common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    add_config_flags(parser)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="full error details (and tracebacks)"
    )


def load(args: argparse.Namespace) -> Config:
    return config_from_args(args)


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite store URL (or plain path) names; None for other stores."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None if url.lower().startswith("sqlite:") else Path(url).expanduser()
    if scheme.lower() != "sqlite" or not rest.startswith("/"):
        return None  # other schemes, or a malformed URL that open_store reports
    path = rest[1:]
    return None if path in ("", ":memory:") else Path(path).expanduser()


@contextmanager
def store_from(config: Config) -> Iterator[DeadLetterStore]:
    """The configured store, which must exist already: the tools read and change dead
    letters, so a mistyped path is an error, never a new empty database."""
    path = sqlite_file(config.store.url)
    if path is not None and not path.is_file():
        if path.parent.is_dir():
            where = "no such file"
        elif path.parent.exists():
            where = f"{path.parent} is not a directory"
        else:
            where = f"no directory {path.parent}"
        raise ToolError(
            f"no dead-letter store at {path} ({where}); nothing was created. Give the "
            "daemon's store with --store URL or --config FILE",
            EXIT_UNREACHABLE,
        )
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


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
WHEN_HELP = "ISO 8601 time (2024-05-01T12:00Z) or a duration back from now (30s, 15m, 12h, 7d, 2w)"


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 30s, 15m, 12h, 7d, 2w")
    try:
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2).lower()])
    except OverflowError as exc:
        raise argparse.ArgumentTypeError(f"duration {text!r} is too long") from exc


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time: ISO 8601 (UTC when no zone is given) or a duration ago."""
    if _DURATION.match(text):
        try:
            return (now or datetime.now(UTC)) - parse_duration(text)
        except OverflowError as exc:
            raise argparse.ArgumentTypeError(f"duration {text!r} is too long") from exc
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use ISO 8601 (2024-05-01T12:00Z) or a duration (7d, 12h)"
        ) from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_filter_flags(parser: argparse.ArgumentParser) -> None:
    # dest names avoid config_from_args' own --queue/--http handling.
    parser.add_argument("--queue", dest="f_queue", metavar="Q", help="original queue")
    parser.add_argument(
        "--reason", dest="f_reason", metavar="R", help="failure reason (any case: timeout)"
    )
    parser.add_argument("--host", dest="f_host", metavar="H", help="processing host")
    parser.add_argument(
        "--since",
        dest="f_since",
        type=parse_when,
        metavar="WHEN",
        help=f"last failure at or after: {WHEN_HELP}",
    )
    parser.add_argument(
        "--until",
        dest="f_until",
        type=parse_when,
        metavar="WHEN",
        help=f"last failure before: {WHEN_HELP}",
    )
    parser.add_argument(
        "--pattern",
        dest="f_pattern",
        metavar="P",
        help="case-insensitive substring of reason, error or signature",
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


_SPELLED: tuple[tuple[str, PatternKey], ...] = (
    ("reason", "failureReason"),
    ("queue", "originalQueue"),
    ("host", "processingHost"),
)


def match_case(store: DeadLetterStore, flt: RecordFilter) -> RecordFilter:
    """The filter with reason, queue and host spelled as stored, so ``--reason timeout``
    finds TIMEOUT on every backend without changing how stores compare."""
    changes: dict[str, str] = {}
    for field, key in _SPELLED:
        wanted = getattr(flt, field)
        if not wanted:
            continue
        known = [row.key for row in store.failure_patterns(by=key)]
        if wanted in known:
            continue
        folded = [k for k in known if k.casefold() == wanted.casefold()]
        if folded:
            changes[field] = folded[0]
    return msgspec.structs.replace(flt, **changes) if changes else flt


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
    """A tqdm progress bar on stderr, shown only when stderr is a terminal (scripts and
    pipes get the final summary alone)."""

    def __init__(self, label: str, total: int | None = None) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the lock

        self.enabled = sys.stderr.isatty()
        try:
            width, height = os.get_terminal_size(sys.stderr.fileno())
        except (OSError, ValueError):
            width = height = 0
        self.bar: Any = tqdm(
            total=total,
            desc=label,
            unit="msg",
            file=sys.stderr,
            disable=not self.enabled,
            leave=False,
            # Some terminals (serial consoles, fresh ptys) report a 0 x 0 size; tqdm would
            # then draw nothing at all.
            ncols=width or 80,
            nrows=height or 24,
        )

    def update(self, done: int) -> None:
        if self.enabled:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()
