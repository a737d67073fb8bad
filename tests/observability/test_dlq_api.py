"""The dashboard's dead-letter API: browsing is open, retry and move need the admin token,
and hostile requests get a clear 4xx, never a crash."""

from __future__ import annotations

import json
from typing import Any

import aiormq
import pytest
import trio

from sidecar.store.records import DeadLetterRecord
from tests.helpers import amqp, make_config, queue_count, running_sidecar
from tests.observability._http import http
from tests.store.contract import make_record

pytestmark = pytest.mark.integration

TOKEN = "s3cret-admin-token"


async def declare(*queues: str) -> None:
    async def go(channel: Any) -> None:
        for q in queues:
            await channel.queue_declare(q, durable=True)

    await amqp(go)


async def drain(queue: str) -> list[Any]:
    async def go(channel: Any) -> list[Any]:
        out = []
        while True:
            m = await channel.basic_get(queue, no_ack=True)
            if isinstance(m.delivery, aiormq.spec.Basic.GetEmpty):
                return out
            out.append(m)

    result: list[Any] = await amqp(go)
    return result


def records(queue: str) -> list[DeadLetterRecord]:
    return [
        *(
            make_record(
                rid,
                originalQueue=queue,
                failureReason="VALIDATION_FAILED",
                errorMessage="missing field url",
                signature="VALIDATION_FAILED:missing field url",
            )
            for rid in ("v-1", "v-2")
        ),
        make_record("t-1", originalQueue=queue, rawBody=b"\xff\x00binary"),
    ]


async def call(
    port: int, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    status, _, reply = await http(
        port, path, method="POST" if data is not None else "GET", body=data, headers=headers
    )
    return status, json.loads(reply)


async def test_browse_and_act_with_the_token(tmp_path, unique_queue):
    queue, other, missing = unique_queue("api"), unique_queue("api"), unique_queue("api")
    await declare(queue, other)
    config = make_config(tmp_path, [], http={"listen": "127.0.0.1:0", "admin_token": TOKEN})
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:
            for r in records(queue):
                sidecar.store.put(r)
            port = sidecar.http_port

            status, page = await call(port, "/api/dlq?reason=validation_failed&limit=10")
            assert status == 200
            assert page["total"] == 2 and page["actions_enabled"] is True
            assert {r["id"] for r in page["records"]} == {"v-1", "v-2"}
            assert set(page["reasons"]) == {"VALIDATION_FAILED", "TIMEOUT"}
            status, page = await call(port, f"/api/dlq?queue={queue}&pattern=timed%20out")
            assert [r["id"] for r in page["records"]] == ["t-1"]

            status, record = await call(port, "/api/dlq/record?id=v-1")
            assert status == 200 and record["body"]["kind"] == "json"
            assert '"jobId": "v-1"' in record["body"]["text"] and "rawBody" not in record
            status, record = await call(port, "/api/dlq/record?id=t-1")
            assert record["body"] == {
                "kind": "binary", "bytes": 8, "text": "ff 00 62 69 6e 61 72 79", "truncated": False,
            }  # fmt: skip

            # Hostile or mistaken requests: clear errors.
            for path, code in (
                ("/api/dlq?limit=abc", 400),
                ("/api/dlq?limit=0", 400),
                ("/api/dlq?offset=-1", 400),
                ("/api/dlq?pattern=" + "x" * 500, 400),
                ("/api/dlq/record", 400),
                ("/api/dlq/record?id=nope", 404),
                ("/api/dlq/retry", 405),
                ("/api/dlq/elsewhere", 404),
            ):
                status, reply = await call(port, path)
                assert status == code, (path, status, reply)
                assert reply["error"]
            assert (await call(port, "/api/dlq/retry", {"id": "v-1"}, token=None))[0] == 401
            assert (await call(port, "/api/dlq/retry", {"id": "v-1"}, token="wrong"))[0] == 401
            assert (await call(port, "/api/dlq/retry", raw=b"{not json"))[0] == 400
            assert (await call(port, "/api/dlq/retry", raw=b"[" * 100_000))[0] == 413
            assert (await call(port, "/api/dlq/retry", {"id": ["v-1"]}))[0] == 400
            assert (await call(port, "/api/dlq/move", {"id": "v-1", "target_queue": "amq.x"}))[
                0
            ] == 400
            assert await queue_count(queue) == 0

            status, reply = await call(port, "/api/dlq/retry", {"id": "v-1"})
            assert status == 200, reply
            assert reply["targetQueue"] == queue
            assert [m.body for m in await drain(queue)] == [records(queue)[0].rawBody]
            assert sidecar.store.get("v-1").reprocessed

            status, reply = await call(port, "/api/dlq/retry", {"id": "v-1"})
            assert status == 409 and "already reprocessed" in reply["error"]
            status, reply = await call(port, "/api/dlq/retry", {"id": "nope"})
            assert status == 404
            status, reply = await call(
                port, "/api/dlq/move", {"id": "v-2", "target_queue": missing}
            )
            assert status == 409 and "does not exist" in reply["error"]
            status, reply = await call(port, "/api/dlq/move", {"id": "v-2", "target_queue": other})
            assert status == 200, reply
            assert len(await drain(other)) == 1
            status, reply = await call(
                port, "/api/dlq/move", {"id": "v-1", "target_queue": other, "force": True}
            )
            assert status == 200, reply
            assert len(await drain(other)) == 1
            assert sidecar.store.get("v-1").reprocessCount == 2
            assert sidecar.store.get("v-2").reprocessTarget == other
    assert await queue_count(missing) is None


async def test_actions_are_off_without_a_token(tmp_path, unique_queue):
    queue = unique_queue("api")
    await declare(queue)
    config = make_config(tmp_path, [])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            for r in records(queue):
                sidecar.store.put(r)
            status, page = await call(sidecar.http_port, "/api/dlq")
            assert status == 200 and page["actions_enabled"] is False and page["total"] == 3
            status, reply = await call(sidecar.http_port, "/api/dlq/retry", {"id": "v-1"})
            assert status == 403 and "http.admin_token" in reply["error"]
            status, reply = await call(sidecar.http_port, "/api/dlq/retry", {"id": "v-1"}, token="")
            assert status == 403
            # Everything else on the port stays read-only.
            status, _, _ = await http(sidecar.http_port, "/status", method="POST", body=b"{}")
            assert status == 405
    assert await queue_count(queue) == 0
