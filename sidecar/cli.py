"""The ``sidecar`` command: the daemon, config checks, the demo and the operator tools."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sidecar import __version__
from sidecar.adapters.agent_socket import SocketPathError
from sidecar.commands import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_config_flags,
    config_from_args,
    positive_number,
    whole_number,
)
from sidecar.config import ConfigError, example_toml, load_config

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from sidecar.adapters.agent_socket import prepare_socket_path, raise_fd_limit
    from sidecar.preflight import check_buildable
    from sidecar.supervisor import Sidecar

    config = config_from_args(args)
    check_buildable(config)
    # Checked before anything starts, so an unsafe directory is one clear line, exit 3.
    prepare_socket_path(Path(config.agent.socket), config.agent.socket_mode)
    _setup_logging(args.verbose)
    soft, hard = raise_fd_limit()
    logging.getLogger("sidecar").info("open-files limit %d (hard %d)", soft, hard)
    trio.run(Sidecar(config).run)
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from sidecar.preflight import check_buildable

    check_buildable(load_config(args.file), args.file)
    print(f"{args.file}: ok")
    return EXIT_OK


def cmd_config_example(args: argparse.Namespace) -> int:
    print(example_toml())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar import demo

    return demo.main(
        seconds=args.seconds, messages=args.messages, broker=args.broker, keep=args.keep
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    add_config_flags(run)
    run.add_argument("--socket", metavar="PATH", help="agent Unix socket path")
    run.add_argument("--http", metavar="HOST:PORT", help="health/metrics/dashboard listener")
    run.add_argument(
        "--queue", action="append", metavar="NAME", help="queue to consume (repeatable)"
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="configuration helpers")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file without starting")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    example = config_sub.add_parser("example", help="print the defaults as TOML")
    example.set_defaults(func=cmd_config_example)

    demo = sub.add_parser(
        "demo",
        help="sidecar + demo agent + demo publisher on the local broker",
        description="Runs a sidecar, a demo publisher and a demo scraper agent (which fails "
        "some messages on purpose) against the local RabbitMQ, prints counts every two "
        "seconds and a tally. Logs go to a file in the demo's directory.",
    )
    demo.add_argument(
        "--seconds",
        type=positive_number(most=86400),
        default=40.0,
        help="stop after this long even if messages are still in flight",
    )
    demo.add_argument(
        "--messages", type=whole_number(1, 1_000_000), default=400, help="messages to publish"
    )
    demo.add_argument(
        "--broker", default="amqp://guest:guest@127.0.0.1:5672/", help="AMQP URL of RabbitMQ"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="after the tally, keep the sidecar, dashboard and DLQ running until Ctrl-C "
        "and print operator commands to try on them",
    )
    demo.set_defaults(func=cmd_demo)

    try:
        from sidecar.tools import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default in --help when it has a real one (not unset or off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.option_strings
            and "%(default)" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def _name_subcommands(parser: argparse.ArgumentParser) -> None:
    """Usage errors list the subcommands instead of an internal dest like ``dlq_command``;
    every --help shows the defaults."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action.metavar is None or action.metavar == "COMMAND":
                action.metavar = "{" + ",".join(action.choices) + "}"
            for child in action.choices.values():
                _name_subcommands(child)


def _quiet_stdout() -> None:
    """The reader went away (``| head``): drop what is still buffered, silently."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _name_subcommands(parser)
    try:
        args = parser.parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except ConfigError as exc:
        print(f"sidecar: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except SocketPathError as exc:
        print(f"sidecar: unsafe agent socket: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("sidecar: interrupted", file=sys.stderr)
        return 130
    except BaseExceptionGroup as group:
        # trio wraps a Ctrl-C that lands inside a nursery; only that case ends quietly.
        _, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
        print("sidecar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
