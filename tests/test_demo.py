"""``sidecar demo --keep`` as a new user runs it, and the README's commands as written."""

from __future__ import annotations

import json
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sidecar.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from sidecar.cli import main; sys.exit(main(sys.argv[1:]))"


def _lines(stream: object, out: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        out.put(line)
    out.put("")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.mark.integration
def test_demo_keep_leaves_everything_running_until_ctrl_c(rabbitmq: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--keep", "--messages", "40",
         "--seconds", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("until Ctrl-C" in line for line in output):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, f"demo ended early:\n{''.join(output)}{proc.communicate()[1]}"
            output.append(line)
        while not output[-1].strip().startswith("curl"):
            output.append(lines.get(timeout=30))
        text = "".join(output)
        assert "lost 0" in text, text
        assert "ALERT" not in text and " INFO " not in text  # logs go to the file
        config = re.search(r"--config (\S+)", text)
        assert config, text
        toml = config.group(1)
        log_file = Path(re.search(r"logs: (\S+)", text).group(1))  # type: ignore[union-attr]
        assert log_file.exists()

        # The printed commands work on the running demo.
        listed = cli("dlq", "list", "--config", toml, "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["total"] >= 1
        status = cli("status", "--config", toml, "--json")
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)["summary"]
        assert [s["agent"] for s in summary["sessions"]] == ["demo-scraper"]
        show = re.search(r"dlq show (.+)$", text, re.MULTILINE)
        assert show
        shown = cli("dlq", "show", *shlex.split(show.group(1)))
        assert shown.returncode == 0, shown.stderr

        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    while not lines.empty():
        rest += lines.get()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.strip() == "", err
    assert "removed the demo queues" in "".join(output) + rest
    assert not Path(toml).parent.exists()


def readme_commands(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", body, re.DOTALL):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(".venv/bin/sidecar "):
                commands.append(line)
    return commands


@pytest.mark.parametrize("section", ["Operator tools", "Running the daemon"])
def test_readme_commands_are_runnable_as_written(section: str) -> None:
    commands = readme_commands(section)
    assert commands, f"no commands in README section {section!r}"
    parser = build_parser()
    for command in commands:
        # With and without the optional parts written in [brackets].
        for variant in (re.sub(r"\s*\[[^\]]*\]", "", command), re.sub(r"[\[\]]", "", command)):
            try:
                parser.parse_args(shlex.split(variant)[1:])
            except SystemExit as exc:
                raise AssertionError(f"README command does not parse: {variant}") from exc


@pytest.mark.integration
def test_demo_cut_short_reports_in_flight_not_lost(rabbitmq: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--messages", "400", "--seconds", "3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    tally = out.stdout.strip().splitlines()[-2]
    assert "not yet published" in tally and tally.endswith("lost 0"), tally
    assert out.stderr == ""


def test_demo_options_have_help() -> None:
    out = cli("demo", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for option, help_text in (
        ("--seconds", "stop after this long"),
        ("--messages", "messages to publish (default: 400)"),
        ("--broker", "AMQP URL of RabbitMQ"),
        ("--keep", "until Ctrl-C"),
    ):
        assert option in text and help_text in text, option
    out = cli("demo", "--messages", "0")
    assert out.returncode == 2
