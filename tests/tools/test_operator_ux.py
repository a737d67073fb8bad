"""What an operator meets first: missing stores, usage errors, filters, ``dlq show``, --force,
closed pipes and a broker lost half-way. Each test is one finding of the usability review."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sidecar.store.records import RecordFilter
from sidecar.tools.republish import ledger_queue
from tests.tools.helpers import (
    CLI,
    cli,
    declare,
    drain,
    open_store,
    put,
    queue_exists,
    record,
    store_url,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_in(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


# --- read-only commands never create a store


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "list"],
        ["dlq", "show", "abcd1234"],
        ["dlq", "analyze"],
        ["dlq", "purge", "--older-than", "7d", "--yes"],
        ["dlq", "retry", "--pattern", "TIMEOUT", "--dry-run"],
        ["status", "--store", "sqlite:///sidecar-dlq.sqlite3"],
    ],
)
def test_default_store_missing_is_an_error_and_nothing_is_created(
    tmp_path: Path, argv: list[str]
) -> None:
    out = run_in(tmp_path, *argv)
    assert out.returncode == 5, out.stderr
    assert "no dead-letter store at sidecar-dlq.sqlite3" in out.stderr
    assert "nothing was created" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_store_in_a_missing_directory_creates_no_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.sqlite3"
    for argv in (
        ["dlq", "list"],
        ["dlq", "purge", "--yes", "--pattern", "x"],
        ["dlq", "retry", "--pattern", "x"],
        ["dlq", "move", "--message-id", "m1", "--target-queue", "q"],
    ):
        out = cli(*argv, "--store", f"sqlite:///{missing}")
        assert out.returncode == 5, (argv, out.stderr)
        assert f"no directory {missing.parent}" in out.stderr
    assert not (tmp_path / "nonexistent").exists()


# --- usage


def test_usage_errors_name_the_subcommands_and_limit_zero_is_refused(tmp_path: Path) -> None:
    put(tmp_path, record("a1", "q", 1))
    out = cli("dlq", "list", "--limit", "0", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "--limit: must be at least 1" in out.stderr
    out = run_in(tmp_path, "dlq")
    assert out.returncode == 2
    assert "dlq_command" not in out.stderr
    assert "{list,show,analyze,retry,move,purge}" in out.stderr


def test_help_shows_defaults_and_what_low_priority_means() -> None:
    out = run_in(ROOT, "dlq", "retry", "--help")
    assert out.returncode == 0
    assert "(default: 50.0)" in " ".join(out.stdout.split())
    assert "(default: 100)" in out.stdout
    out = run_in(ROOT, "queue", "purge", "--help")
    assert "priority <= 3" in out.stdout and "header priority=low" in out.stdout


# --- filters


def test_filters_are_case_insensitive_and_times_take_durations(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    put(
        tmp_path,
        record("old", "url.to_scrape", 1, failureReason="VALIDATION_FAILED"),
        record(
            "new",
            "url.to_scrape",
            0,
            failureReason="VALIDATION_FAILED",
            lastFailureAt=now - timedelta(minutes=2),
            deadLetteredAt=now - timedelta(minutes=2),
        ),
        record("other", "url.to_scrape", 2),
    )
    out = cli("dlq", "list", "--json", "--reason", "validation_failed", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert {r["id"] for r in json.loads(out.stdout)["records"]} == {"old", "new"}
    out = cli("dlq", "list", "--json", "--queue", "URL.TO_SCRAPE", "--host", "Scraper-Agent-1",
              tmp_path=tmp_path)  # fmt: skip
    assert json.loads(out.stdout)["total"] == 3
    out = cli("dlq", "list", "--json", "--since", "10m", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)["records"]] == ["new"]
    out = cli("dlq", "list", "--json", "--until", "1h", tmp_path=tmp_path)
    assert {r["id"] for r in json.loads(out.stdout)["records"]} == {"old", "other"}

    # --older-than takes the same forms as --since: an ISO time here.
    cutoff = (now - timedelta(hours=1)).isoformat()
    out = cli("dlq", "purge", "--older-than", cutoff, "--reason", "validation_failed", "--yes",
              "--json", tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"matched": 1, "deleted": 1}
    store = open_store(tmp_path)
    assert store.get("old") is None and store.get("new") is not None
    store.close()
    out = cli("dlq", "list", "--since", "yesterday", tmp_path=tmp_path)
    assert out.returncode == 2 and "bad time 'yesterday'" in out.stderr


def test_an_offset_past_the_end_says_so(tmp_path: Path) -> None:
    put(tmp_path, record("a1", "q", 1))
    out = cli("dlq", "list", "--offset", "5", tmp_path=tmp_path)
    assert out.returncode == 0
    assert "1 match, --offset 5 is past them" in out.stdout


# --- dlq show


def test_show_prints_json_payload_failures_and_takes_a_prefix(tmp_path: Path) -> None:
    failures = [
        {"attempt": n, "reason": "NETWORK_ERROR", "error": f"reset {n}",
         "at": f"2024-01-01T09:5{n}:00Z", "host": "h1", "agentVersion": "1.2.3"}
        for n in (1, 2, 3)
    ]  # fmt: skip
    rid = "9f86d081884c7d659a2feaa0c55ad015"
    put(
        tmp_path,
        record(rid, "q", 1, rawBody=b'{"jobId": "j1", "tags": ["a", "b"]}', failures=failures),
        record("9f86ffff", "q", 2),
        record("bin00001", "q", 3, rawBody=b"\xff\x00\x01binary"),
    )
    out = cli("dlq", "show", "9f86d0", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert rid in text
    assert '"jobId": "j1"' in text and "{'jobId'" not in text  # JSON, not a Python repr
    assert "failures (3)" in text
    assert "reset 1" in text and "reset 3" in text and "NETWORK_ERROR" in text
    assert "never reprocessed" in text

    out = cli("dlq", "show", "9f86", tmp_path=tmp_path)
    assert out.returncode == 4
    assert "ambiguous" in out.stderr and rid in out.stderr and "9f86ffff" in out.stderr

    out = cli("dlq", "show", "bin0", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ff 00 01 62 69 6e" in out.stdout

    out = cli("dlq", "show", rid[:10], "--json", tmp_path=tmp_path)
    shown = json.loads(out.stdout)
    assert shown["id"] == rid and shown["failures"] == failures


# --- --force


def test_move_and_retry_of_reprocessed_records_need_force(
    tmp_path: Path, unique_queue: Any
) -> None:
    queue, target = unique_queue("tools"), unique_queue("tools")
    declare(queue, target)
    put(tmp_path, record("f1", queue, 1), record("f2", queue, 2))
    out = cli("dlq", "move", "--message-id", "f1", "--target-queue", target, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(drain(target)) == 1

    out = cli("dlq", "move", "--message-id", "f1", "--target-queue", target, tmp_path=tmp_path)
    assert out.returncode == 4
    assert "already reprocessed" in out.stderr and "--force" in out.stderr
    assert drain(target) == []

    out = cli("dlq", "retry", "--queue", queue, "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)["republished"]] == ["f2"]
    out = cli("dlq", "retry", "--queue", queue, "--dry-run", "--json", tmp_path=tmp_path)
    assert json.loads(out.stdout)["already_reprocessed_left_out"] == 2
    out = cli("dlq", "retry", "--queue", queue, tmp_path=tmp_path)
    assert "2 matching dead letter(s) were already reprocessed" in out.stderr
    assert "republished 0 of 0" in out.stdout

    out = cli("dlq", "move", "--message-id", "f1", "--target-queue", target, "--force",
              tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(drain(target)) == 1
    out = cli("dlq", "retry", "--queue", queue, "--force", "--json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(r["id"] for r in json.loads(out.stdout)["republished"]) == ["f1", "f2"]
    assert len(drain(queue)) == 3
    store = open_store(tmp_path)
    assert store.get("f1").reprocessCount == 3
    store.close()


# --- pipes, drivers and a broker lost half-way


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    put(tmp_path, *[record(f"p{i:04d}", "q", i) for i in range(400)])
    argv = [sys.executable, "-c", CLI, "dlq", "list", "--json", "--limit", "400",
            "--store", store_url(tmp_path)]  # fmt: skip
    read_end, write_end = os.pipe()
    reader = subprocess.Popen(["head", "-c", "100"], stdin=read_end, stdout=subprocess.DEVNULL)
    writer = subprocess.Popen(argv, stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(read_end)
    os.close(write_end)
    _, err = writer.communicate(timeout=60)
    reader.wait(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert err == b""
    assert writer.returncode == 0


def test_unreachable_mongodb_is_one_short_line(tmp_path: Path) -> None:
    url = "mongodb://user:secret@127.0.0.1:1/sidecar?serverSelectionTimeoutMS=300"
    out = cli("dlq", "list", "--store", url, timeout=120)
    assert out.returncode == 5, out.stderr
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1 and len(line) <= 300
    assert "secret" not in line
    verbose = cli("dlq", "list", "--store", url, "--verbose", timeout=120)
    assert verbose.returncode == 5
    assert "secret" not in verbose.stderr


class CuttableProxy:
    """A TCP relay to the broker that can be cut, to lose the broker mid-command."""

    def __init__(self, port: int = 5672) -> None:
        self.target = ("127.0.0.1", port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.relayed = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self.lock:
                    self.relayed += len(data)
        except OSError:
            pass

    def cut(self) -> None:
        self.server.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def test_broker_lost_during_retry_is_exit_5_in_one_line(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue("tools")
    declare(queue)
    put(tmp_path, *[record(f"r{i:03d}", queue, i) for i in range(200)])
    proxy = CuttableProxy()
    argv = [sys.executable, "-c", CLI, "dlq", "retry", "--queue", queue, "--limit", "200",
            "--rate", "20", "--store", store_url(tmp_path),
            "--broker", f"amqp://guest:guest@127.0.0.1:{proxy.port}/"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    try:
        # Wait (bounded) until some records were republished, then cut the broker away.
        deadline = datetime.now(UTC) + timedelta(seconds=60)
        while len(drain(queue)) == 0:
            assert datetime.now(UTC) < deadline, "no record was republished"
            assert proc.poll() is None, proc.communicate()
            threading.Event().wait(0.1)
        proxy.cut()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 5, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "lost the broker connection" in err or "broker unavailable" in err
    # A rerun recovers what the lost connection left in the store's ledger and finishes,
    # and leaves no ledger queue behind.
    rerun = cli("dlq", "retry", "--queue", queue, "--limit", "200", "--rate", "1000",
                tmp_path=tmp_path)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    store = open_store(tmp_path)
    try:
        assert store.in_flight_retries() == []
        assert store.count(RecordFilter(reprocessed=False)) == 0
        store_id = store.store_id()
    finally:
        store.close()
    assert not queue_exists(ledger_queue(store_id))
    drain(queue)


def test_retry_shows_a_progress_bar_only_on_a_terminal(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue("tools")
    declare(queue)
    put(tmp_path, *[record(f"g{i:02d}", queue, i) for i in range(30)])
    main, replica = pty.openpty()
    argv = [sys.executable, "-c", CLI, "dlq", "retry", "--queue", queue, "--rate", "1000",
            "--store", store_url(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=replica, cwd=ROOT)
    os.close(replica)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, seen
    assert b"republished 30 of 30" in out
    assert b"retrying" in seen and b"/30" in seen and b"%|" in seen, seen
    assert len(drain(queue)) == 30

    # Not a terminal (a script, a pipe): no bar, only the summary.
    put(tmp_path, *[record(f"h{i:02d}", queue, 100 + i) for i in range(3)])
    plain = cli("dlq", "retry", "--queue", queue, tmp_path=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "%|" not in plain.stderr and "retrying" not in plain.stderr
    drain(queue)


def test_ctrl_c_during_retry_ends_quietly_and_a_rerun_finishes(
    tmp_path: Path, unique_queue: Any
) -> None:
    queue = unique_queue("tools")
    declare(queue)
    put(tmp_path, *[record(f"c{i:03d}", queue, i) for i in range(100)])
    # At 2 records/s the run lasts 50 s, so on a loaded machine it cannot finish on its own
    # before the interrupt lands (at 10/s it once did, and exited 0).
    argv = [sys.executable, "-c", CLI, "dlq", "retry", "--queue", queue, "--rate", "2",
            "--store", store_url(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=60)
        sent: list[Any] = []
        while not sent:
            assert datetime.now(UTC) < deadline, "nothing was republished"
            assert proc.poll() is None, proc.communicate()
            sent = drain(queue)
            threading.Event().wait(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "sidecar: interrupted", err
    assert "Traceback" not in err
    # Run again: every record ends up sent exactly once.
    out = cli("dlq", "retry", "--queue", queue, "--limit", "200", "--rate", "1000",
              tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    bodies = [m.body for m in sent] + [m.body for m in drain(queue)]
    assert len(bodies) == len(set(bodies)) == 100
    store = open_store(tmp_path)
    assert store.count() == 100 and all(r.reprocessed for r in store.find(limit=200))
    assert store.in_flight_retries() == []
    store.close()
