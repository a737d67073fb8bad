"""What the ``sidecar`` command and the operator tools share: exit codes and config flags."""

from __future__ import annotations

import argparse
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
