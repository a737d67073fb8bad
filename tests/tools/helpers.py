"""Helpers for the operator-tool tests (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiormq
import aiormq.exceptions

from sidecar.store.records import DeadLetterRecord, payload_from_body
from sidecar.store.sqlite import SqliteStore
from tests.helpers import BROKER_URL, run_amqp

T0 = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
CLI = "import sys; from sidecar.cli import main; sys.exit(main(sys.argv[1:]))"
# The CLI, killed (exit 137) when it is about to mark its CRASH_AT_MARK-th republished record:
# after the AMQP commit, before the store knows, the window the recovery must close.
CRASHING_CLI = """
import os, sys
from sidecar.store.sqlite import SqliteStore
from sidecar.cli import main
mark = SqliteStore.mark_reprocessed
calls = []
def dying(self, *args, **kwargs):
    calls.append(1)
    if len(calls) >= int(os.environ["CRASH_AT_MARK"]):
        os._exit(137)
    return mark(self, *args, **kwargs)
SqliteStore.mark_reprocessed = dying
sys.exit(main(sys.argv[1:]))
"""


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def record(id: str, queue: str, minute: float = 0, **overrides: Any) -> DeadLetterRecord:
    body = overrides.pop("rawBody", None) or json.dumps({"jobId": id}).encode()
    fields: dict[str, Any] = {
        "id": id,
        "originalQueue": queue,
        "payload": payload_from_body(body),
        "rawBody": body,
        "failureReason": "TIMEOUT",
        "errorMessage": f"Request timed out after {5000 + int(minute)}ms",
        "signature": "TIMEOUT:request timed out after <n>ms",
        "attemptCount": 3,
        "firstFailureAt": at(minute - 1),
        "lastFailureAt": at(minute),
        "processingHost": "scraper-agent-1",
        "agentVersion": "1.2.3",
        "deadLetteredAt": at(minute),
        "headers": {"tenant": "acme", "x-sidecar-attempts": 3},
        "properties": {"message_id": id, "content_type": "application/json", "delivery_mode": 2},
    }
    fields.update(overrides)
    return DeadLetterRecord(**fields)


def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dlq.sqlite3'}"


def put(tmp_path: Path, *records: DeadLetterRecord) -> None:
    store = SqliteStore(tmp_path / "dlq.sqlite3")
    try:
        for r in records:
            store.put(r)
    finally:
        store.close()


def open_store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "dlq.sqlite3")


def cli(
    *args: str,
    tmp_path: Path | None = None,
    env: dict[str, str] | None = None,
    input: str = "",
    timeout: float = 60,
    broker: str = BROKER_URL,
    program: str = CLI,
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", program, *args]
    if tmp_path is not None and "--store" not in args:
        argv += ["--store", store_url(tmp_path)]
    if "--broker" not in args and args[0] not in ("status",):
        argv += ["--broker", broker]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )


def declare(*queues: str) -> None:
    async def go(channel: Any) -> None:
        for q in queues:
            await channel.queue_declare(q, durable=True)

    run_amqp(go)


def publish(queue: str, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
    async def go(channel: Any) -> None:
        await channel.queue_declare(queue, durable=True)
        for body, props in messages:
            await channel.basic_publish(
                body, routing_key=queue, properties=aiormq.spec.Basic.Properties(**props)
            )

    run_amqp(go)


def drain(queue: str) -> list[Any]:
    """Every message in the queue (acked: the queue ends empty)."""

    async def go(channel: Any) -> list[Any]:
        out = []
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if isinstance(message.delivery, aiormq.spec.Basic.GetEmpty):
                return out
            out.append(message)

    return run_amqp(go)


def props_of(message: Any) -> dict[str, Any]:
    p = message.header.properties
    names = ("message_id", "content_type", "priority", "delivery_mode", "correlation_id")
    return {
        "body": message.body,
        **{n: getattr(p, n) for n in names},
        "headers": dict(p.headers or {}),
    }


def queue_exists(queue: str) -> bool:
    async def go(channel: Any) -> bool:
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    return bool(run_amqp(go))


def peek(queue: str) -> list[dict[str, Any]]:
    """The JSON entries in a queue, all put back; [] when the queue does not exist."""

    async def go(channel: Any) -> list[dict[str, Any]]:
        held = []
        try:
            while True:
                m = await channel.basic_get(queue, no_ack=False)
                if isinstance(m.delivery, aiormq.spec.Basic.GetEmpty):
                    break
                held.append(m)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return []
        for m in held:
            await channel.basic_reject(m.delivery.delivery_tag, requeue=True)
        return [json.loads(m.body) for m in held]

    return list(run_amqp(go))
