"""``/status`` and friends against what the store and the broker actually hold."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import trio

from sidecar.client import open_agent
from tests.helpers import amqp, make_config, publish_many, queue_count, running_sidecar
from tests.observability._http import get_json, http

pytestmark = pytest.mark.integration

TOTAL, ACK, FAIL, PREFETCH = 20, 6, 4, 5


async def broker_counts(queue: str) -> tuple[int, int]:
    """(ready messages, consumers) as the broker reports them."""

    async def go(channel: Any) -> tuple[int, int]:
        ok = await channel.queue_declare(queue, passive=True)
        return ok.message_count, ok.consumer_count

    return await amqp(go)


def metric_value(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_status_matches_store_and_broker(tmp_path, unique_queue):
    queue = unique_queue("obs")
    await publish_many(queue, [b'{"n": %d}' % i for i in range(TOTAL)])
    config = make_config(tmp_path, [queue], broker={"prefetch": PREFETCH})
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            port = sidecar.http_port
            assert port
            async with open_agent(config.agent.socket, agent="checker", queues=[queue]) as agent:
                handled = 0
                while handled < ACK + FAIL:
                    for m in await agent.pull(ACK + FAIL - handled, wait=0.5):
                        if handled < ACK:
                            await agent.ack([m.id])
                        else:
                            await agent.fail(m.id, "VALIDATION_FAILED", f"missing field n{m.id}")
                        handled += 1
                # The agent stays connected but stops pulling: the sidecar holds PREFETCH
                # unacked, the rest stays ready in the broker.
                expected_ready = TOTAL - ACK - FAIL - PREFETCH
                while True:
                    status = await get_json(port, "/status")
                    ready, consumers = await broker_counts(queue)
                    depth = status["backpressure_status"]["queue_depths"].get(queue, {})
                    if (
                        status["dlq_health"]["size"] == FAIL
                        and ready == expected_ready
                        and depth.get("depth") == ready
                        and status["engine"]["counts"]["acked"] == ACK
                    ):
                        break
                    await trio.sleep(0.2)

                store_count = sidecar.store.count()
                patterns = sidecar.store.failure_patterns()
                assert await queue_count(queue) == expected_ready

                dlq = status["dlq_health"]
                assert dlq["size"] == store_count == FAIL
                assert dlq["top_failures"] == [
                    {"reason": r.key, "count": r.count} for r in patterns[:5]
                ]
                assert dlq["top_failures"] == [{"reason": "VALIDATION_FAILED", "count": FAIL}]
                assert dlq["oldest"] is not None and dlq["newest"] is not None
                assert dlq["oldest"] <= dlq["newest"]

                bp = status["backpressure_status"]
                assert bp["queue_depths"][queue]["depth"] == ready == expected_ready
                assert bp["queue_depths"][queue]["level"] == "normal"
                assert bp["consumer_counts"][queue] == consumers == 1
                assert bp["system_pressure"] == "NORMAL"

                counts = status["engine"]["counts"]
                assert counts["acked"] == ACK
                assert counts["dead_lettered"] == FAIL
                assert counts["delivered"] == ACK + FAIL
                assert counts["retried"] == 0
                assert counts == sidecar.engine.counts
                assert [s["agent"] for s in status["engine"]["sessions"]] == ["checker"]
                assert status["broker"]["connected"] is True
                assert queue in status["broker"]["queues"]

                code, _, body = await http(port, "/healthz")
                assert code == 200 and body == b"ok\n"
                code, _, body = await http(port, "/readyz")
                assert code == 200 and json.loads(body)["ready"] is True

                code, headers, body = await http(port, "/metrics")
                assert code == 200
                assert headers["content-type"].startswith("text/plain")
                text = body.decode()
                assert metric_value(text, "sidecar_dlq_size") == FAIL
                assert metric_value(text, 'sidecar_dlq_records{reason="VALIDATION_FAILED"}') == FAIL
                assert metric_value(text, f'sidecar_messages_acked_total{{queue="{queue}"}}') == ACK

                code, headers, _ = await http(port, "/status", method="POST", body=b"{}")
                assert code == 405
                assert headers.get("allow") == "GET, HEAD"
                for path in ("/metrics", "/readyz", "/"):
                    code, _, _ = await http(port, path, method="DELETE")
                    assert code == 405

                code, headers, body = await http(port, "/")
                assert code == 200 and headers["content-type"].startswith("text/html")
                assert b'id="dlq-size"' in body and b"/live" in body


async def test_readyz_is_503_while_draining(tmp_path, unique_queue):
    queue = unique_queue("obs")
    config = make_config(tmp_path, [queue])
    with trio.fail_after(30):
        async with running_sidecar(config) as sidecar:
            sidecar.engine.ledger.draining = True
            try:
                code, _, body = await http(sidecar.http_port, "/readyz")
            finally:
                sidecar.engine.ledger.draining = False
    assert code == 503
    assert json.loads(body) == {
        "ready": False,
        "broker_connected": True,
        "publish_path": True,
        "store_writable": True,
        "not_draining": False,
    }
