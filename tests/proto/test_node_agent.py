"""The Node.js example agent (proto/node/agent.js) against a real sidecar and RabbitMQ."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    make_config,
    publish_many,
    queue_count,
    record_session_ends,
    running_sidecar,
    until,
)
from tests.proto._util import PROTO

NODE = shutil.which("node")
NODE_DIR = PROTO / "node"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "ws").is_dir(),
        reason="proto/node/node_modules is missing: run `npm install` in proto/node",
    ),
]


async def test_node_agent_processes_messages_end_to_end(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("node")
    out = unique_queue("nodeout")
    bodies = [f"job {i}" for i in range(8)] + ["please fail this one", "job 9"]
    n = len(bodies)
    with trio.fail_after(60):
        await publish_many(out, [])  # declare the queue the agent publishes to
        await publish_many(queue, [b.encode() for b in bodies])
        config = make_config(tmp_path, [queue])
        async with running_sidecar(config):
            result = await trio.run_process(
                [
                    NODE or "node",
                    str(NODE_DIR / "agent.js"),
                    config.agent.socket,
                    queue,
                    str(n),
                    out,
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()
            summary = json.loads(result.stdout.decode().strip().splitlines()[-1])
            assert summary["processed"] == n
            assert sorted(summary["bodies"]) == sorted(bodies)
            assert summary["acked"] == n - 1
            assert summary["failed"] == 1
            assert summary["published"] == 1
            assert summary["errors"] == []
            # The agent's publish reached the broker.
            await until(lambda: _count_is(out, 1))


async def test_node_agent_ctrl_c_closes_cleanly(
    tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    import signal
    import subprocess

    queue = unique_queue("nodeint")
    out = unique_queue("nodeintout")
    with trio.fail_after(60):
        await publish_many(out, [])
        await publish_many(queue, [b"job 0"])
        config = make_config(tmp_path, [queue])
        async with running_sidecar(config) as sidecar:
            engine = sidecar.engine
            ended = record_session_ends(engine)
            process = await trio.lowlevel.open_process(
                [NODE or "node", str(NODE_DIR / "agent.js"), config.agent.socket, queue, "5", out],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                while engine.counts["acked"] < 1:
                    assert process.poll() is None, "the agent exited early"
                    await trio.sleep(0.05)
                process.send_signal(signal.SIGINT)
                await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.stderr is not None
            stderr = (await process.stderr.receive_some(1 << 20) or b"").decode()
            await until(lambda: not engine.sessions)
    assert process.returncode == 130, stderr
    assert "Error" not in stderr and "at " not in stderr  # no stack trace
    assert ended == [False]  # a clean close (1000), not a crash


async def _count_is(queue: str, expected: int) -> bool:
    return await queue_count(queue) == expected
