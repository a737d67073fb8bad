"""Run the frame sequences of proto/vectors/sessions.json against a real sidecar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from sidecar.client import connect_unix
from tests.helpers import make_config, running_sidecar
from tests.proto._util import PROTO

SPEC: dict[str, Any] = json.loads((PROTO / "vectors" / "sessions.json").read_text("utf-8"))
SESSIONS: list[dict[str, Any]] = SPEC["sessions"]

pytestmark = pytest.mark.integration


def substitute(value: Any, queue: str) -> Any:
    if value == "$QUEUE":
        return queue
    if isinstance(value, dict):
        return {k: substitute(v, queue) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, queue) for v in value]
    return value


def encode(send: dict[str, Any]) -> bytes | str:
    if "json" in send:
        return json.dumps(send["json"])
    if "msgpack" in send:
        obj = dict(send["msgpack"])
        if isinstance(obj.get("body"), str):
            obj["body"] = obj["body"].encode()
        return msgspec.msgpack.encode(obj)
    if "text" in send:
        return str(send["text"])
    return "x" * int(send["oversize"])


async def run_steps(ws: WebSocketConnection, steps: list[dict[str, Any]]) -> None:
    for i, step in enumerate(steps):
        where = f"step {i}: {step}"
        if "send" in step:
            await ws.send_message(encode(step["send"]))
        elif "expect" in step:
            data = await ws.get_message()
            frame = msgspec.msgpack.decode(data) if isinstance(data, bytes) else json.loads(data)
            want = dict(step["expect"])
            binary = want.pop("binary", None)
            if binary is not None:
                assert isinstance(data, bytes) == binary, f"{where}: got {frame}"
            got = {k: frame.get(k) for k in want}
            assert got == want, f"{where}: got {frame}"
        else:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            reason = closed.value.reason
            assert reason is not None and reason.code == step["expect_close"], f"{where}: {reason}"


@pytest.mark.parametrize("session", SESSIONS, ids=[s["name"] for s in SESSIONS])
async def test_session_vector(
    session: dict[str, Any], tmp_path: Path, unique_queue: Callable[[str], str]
) -> None:
    queue = unique_queue("vectors")
    config = make_config(tmp_path, [queue], agent={"max_frame_bytes": SPEC["max_frame_bytes"]})
    steps = substitute(session["steps"], queue)
    with trio.fail_after(60):
        async with running_sidecar(config), trio.open_nursery() as nursery:
            stream = await connect_unix(config.agent.socket)
            ws = await wrap_client_stream(
                nursery, stream, "localhost", "/", max_message_size=1 << 20
            )
            try:
                await run_steps(ws, steps)
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                # After a 1009 the sidecar does not close the stream, so the client's reader
                # would wait for EOF forever: stop it.
                nursery.cancel_scope.cancel()
