"""What the ``sidecar`` command and the operator tools share: exit codes, config flags and
argument types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from sidecar.config import Config, load_config

EXIT_OK = 0
EXIT_FAILURE = 1  # the daemon failed
EXIT_PARTIAL = 1  # a tool did part of its work
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_REFUSED = 4  # not found, or refused (missing queue, no confirmation)
EXIT_UNREACHABLE = 5  # store or broker unreachable


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--broker", metavar="URL", help="AMQP URL (overrides broker.url)")
    parser.add_argument(
        "--store",
        metavar="URL",
        help="DLQ store: sqlite:///path, postgresql://... or mongodb://...",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "broker", None):
        overrides.setdefault("broker", {})["url"] = args.broker
    if getattr(args, "store", None):
        overrides.setdefault("store", {})["url"] = args.store
    if getattr(args, "socket", None):
        overrides.setdefault("agent", {})["socket"] = args.socket
    if getattr(args, "http", None):
        overrides.setdefault("http", {})["listen"] = args.http
    for queue in getattr(args, "queue", None) or []:
        overrides.setdefault("broker", {}).setdefault("queues", []).append(queue)
    return load_config(args.config, overrides=overrides)


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least`` (and at most ``most``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if most is not None and not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be between {least} and {most}: {text!r}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}: {text!r}")
        return value

    return parse


def positive_number(most: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number above 0 (and at most ``most``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0 < value <= most and math.isfinite(value)):
            limit = f" and at most {most:g}" if math.isfinite(most) else ""
            raise argparse.ArgumentTypeError(f"must be > 0{limit}: {text!r}")
        return value

    return parse


nonnegative_int = whole_number(0)
positive_int = whole_number(1)
positive_float = positive_number()
