"""The README's agent is a complete program: it runs as written, maps its exceptions to
reasons, and a Ctrl-C ends it with a clean close and no traceback."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from sidecar.store.records import RecordFilter
from tests.helpers import (
    make_config,
    publish_many,
    queue_count,
    record_session_ends,
    running_sidecar,
    until,
)

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_agent() -> str:
    section = README.read_text().split("## Writing an agent", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's agent section has no python program"
    return match.group(1)


async def test_readme_agent_runs_as_written_and_stops_cleanly_on_ctrl_c(tmp_path, unique_queue):
    queue = unique_queue()
    jobs = [
        json.dumps({"url": "https://example.com/a"}).encode(),
        b"not json at all",
        json.dumps({"page": 3}).encode(),
        json.dumps({"url": "https://example.com/b"}).encode(),
    ]
    await publish_many(queue, jobs)
    script = tmp_path / "agent.py"
    script.write_text(readme_agent())
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            engine = sidecar.engine
            ended = record_session_ends(engine)
            process = await trio.lowlevel.open_process(
                [sys.executable, str(script), config.agent.socket, queue],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                while engine.counts["acked"] < 2 or sidecar.store.count() < 2:
                    assert process.poll() is None, "the README agent exited early"
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
            records = sidecar.store.find(RecordFilter(queue=queue), limit=10)
            counts = dict(engine.counts)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr
    assert ended == [False]  # a clean close (1000), not a crash
    assert sorted(r.failureReason for r in records) == ["VALIDATION_FAILED"] * 2
    assert counts["acked"] == 2
    assert await queue_count(queue) == 0


ASYNCIO_AGENT = """
import sys

from sidecar.client_asyncio import AsyncioAgent, run_agent_asyncio


async def handle(message):
    pass


async def main():
    async with await AsyncioAgent.connect(sys.argv[1], agent="aio", queues=[sys.argv[2]]) as agent:
        await agent.run(handle, wait=0.5)


run_agent_asyncio(main)
"""


async def test_asyncio_agent_stops_cleanly_on_ctrl_c(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"one"])
    script = tmp_path / "aio_agent.py"
    script.write_text(ASYNCIO_AGENT)
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with running_sidecar(config) as sidecar:
            engine = sidecar.engine
            ended = record_session_ends(engine)
            process = await trio.lowlevel.open_process(
                [sys.executable, str(script), config.agent.socket, queue],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                while engine.counts["acked"] < 1:
                    assert process.poll() is None, "the asyncio agent exited early"
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
    assert "Traceback" not in stderr
    assert ended == [False]  # a clean close (1000), not a crash
