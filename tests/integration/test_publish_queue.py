"""Publish backpressure without busy loops: the sidecar queues an agent's publishes behind
the token bucket, and only beyond its queue answers throttled with a useful retry_after."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio

from sidecar import protocol as p
from sidecar.client import open_agent
from tests.helpers import drain_bodies, make_config, publish_many, running_sidecar, until

pytestmark = pytest.mark.integration


async def test_an_agent_flooding_at_100_times_the_rate_sends_under_two_frames_per_message(
    tmp_path, unique_queue
):
    """An agent obeying retry_after exactly once sent 44-52 publish frames per accepted
    message: retry_after was the time to the next token, whatever the backlog."""
    target = unique_queue("out")
    await publish_many(target, [])
    rate, n = 50.0, 300
    config = make_config(tmp_path, [], throttle={"rate": rate, "burst": 5.0, "queue": 100})
    frames = 0
    throttled: list[float] = []
    results: list[p.Published] = []
    with trio.fail_after(120):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="producer", queues=[]) as agent,
        ):
            publish_once = agent.publish_once

            async def counted(body: bytes, **fields: Any) -> p.Published:
                nonlocal frames
                frames += 1
                answer = await publish_once(body, **fields)
                if answer.throttled:
                    throttled.append(answer.retry_after or 0.0)
                return answer

            agent.publish_once = counted  # type: ignore[method-assign]

            async def one(i: int) -> None:
                results.append(await agent.publish(f"m{i}".encode(), queue=target))

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
                    await trio.sleep(1 / (100 * rate))  # 100x what the bucket allows
            await until(lambda: not sidecar.broker.unsettled)
    assert len(results) == n and all(r.ok for r in results)
    assert throttled, "the flood must overflow the queue for this test to mean anything"
    assert min(throttled) > 0  # never "retry after 0"
    assert max(throttled) > 10 / rate  # reflects the queue ahead, not one token
    assert frames / n < 2
    bodies = Counter(await drain_bodies(target))
    assert bodies == Counter(f"m{i}".encode() for i in range(n))  # each exactly once
