"""Launching role processes and reading their JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import BROKER_URL

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "bench" / "out" / "logs"


class RoleError(RuntimeError):
    pass


class Proc:
    """One ``python -m bench.<role>`` child (or ``command``, another program speaking the
    same JSON lines); stdout is JSON lines, stderr goes to a log."""

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}.log"
        self._log = self.log_path.open("w")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.p = subprocess.Popen(
            [*(command or [sys.executable, "-m", module]), *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.p.pid

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                self._log.write(f"[stdout] {line}\n")
        self.events.put({"event": "_eof"})

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RoleError(f"{self.name}: no {name!r} within {timeout}s (see {self.log_path})")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("event") == name:
                return ev
            if ev.get("event") == "_eof":
                self.p.wait()
                tail = self.log_path.read_text()[-1500:]
                raise RoleError(
                    f"{self.name}: exited {self.p.returncode} before {name!r}; log tail:\n{tail}"
                )

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            return self.wait_event("result", timeout)
        finally:
            self.stop()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.p.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(timeout=2)
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()
        return self.p.returncode


def direct(name: str, mode: str, *args: str) -> Proc:
    return Proc(name, "bench.direct", [mode, *args])


def direct_run(mode: str, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    return direct(f"direct-{mode}", mode, *args).result(timeout)


def agent(name: str, mode: str, socket: str, *args: str) -> Proc:
    return Proc(name, "bench.agent", [mode, "--socket", socket, *args])


TIERS = [0.05, 0.1, 0.2]


def sidecar_overrides(tmp: Path, *, batch: int, prefetch: int) -> dict[str, Any]:
    big = 10**9
    return {
        "broker": {
            "url": BROKER_URL,
            "prefetch": prefetch,
            "hop": os.environ.get("BENCH_HOP", "trio-asyncio"),
        },
        "agent": {
            "socket": str(tmp / "agent.sock"),
            "socket_mode": 0o600,
            "batch_size": batch,
            "max_in_flight": 100_000,
            "deadline": 60.0,
        },
        "retry": {
            "max_attempts": 3,
            "tiers": TIERS,
            "base_delay": 0.05,
            "max_delay": 0.2,
        },
        # The failure scenario fails every message: keep the breaker from pausing consumption.
        "breaker": {"failure_threshold": big, "min_calls_in_window": big, "failure_ratio": 0.99},
        "depth": {"warning": big, "critical": 2 * big, "emergency": 3 * big},
        "pressure": {"warning": 0.97, "critical": 0.98, "emergency": 0.99},
        "throttle": {"rate": 1e9, "burst": 1e9},
        "store": {
            "url": f"sqlite:///{tmp / 'dlq.sqlite3'}",
            "spool": str(tmp / "spool.sqlite3"),
            "metrics_interval": 3600.0,
        },
        "http": {"listen": "127.0.0.1:0"},
        "drain": {"grace": 2.0},
        # BENCH_TRACING_ENDPOINT=http://HOST:PORT/v1/traces measures with spans exported
        # there (an OTLP/HTTP receiver must answer); unset, tracing stays off, the default.
        **(
            {"tracing": {"enabled": True, "endpoint": os.environ["BENCH_TRACING_ENDPOINT"]}}
            if os.environ.get("BENCH_TRACING_ENDPOINT")
            else {}
        ),
    }


@contextlib.contextmanager
def sidecar(
    name: str, *, batch: int = 10, prefetch: int = 100, drain_patch: bool = True
) -> Iterator[tuple[Proc, dict[str, Any], Path]]:
    """A sidecar process on a fresh temp dir; yields (proc, ready event, tmp dir)."""
    with tempfile.TemporaryDirectory(prefix="bench-sc-") as tmpdir:
        tmp = Path(tmpdir)
        args = ["--config", json.dumps(sidecar_overrides(tmp, batch=batch, prefetch=prefetch))]
        if not drain_patch:
            args.append("--no-drain-patch")
        proc = Proc(name, "bench.sidecar_role", args)
        try:
            ready = proc.wait_event("ready", 60)
            yield proc, ready, tmp
        finally:
            proc.stop(timeout=20)


def store_url(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'dlq.sqlite3'}"
