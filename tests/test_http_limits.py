"""The HTTP port closes clients that connect and never send a request, on the virtual
clock, and keeps serving the ones that do."""

from __future__ import annotations

from typing import Any

import trio

from sidecar.adapters.http import HTTP_IDLE_TIMEOUT, HttpProviders, serve_http
from sidecar.metrics import Metrics


async def _status() -> dict[str, Any]:
    return {}


def providers() -> HttpProviders:
    return HttpProviders(
        ready=lambda: (True, {"ready": True}),
        status=_status,
        registry=Metrics().registry,
        dashboard_html=lambda: b"<html></html>",
    )


async def test_silent_http_clients_are_closed(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, providers(), "127.0.0.1", 0)
        port = int(binds[0].rsplit(":", 1)[1])
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(30)]
        start = trio.current_time()
        with trio.fail_after(HTTP_IDLE_TIMEOUT * 4):
            for stream in silent:
                assert await stream.receive_some(1024) == b""
        assert trio.current_time() - start >= HTTP_IDLE_TIMEOUT * 0.9
        talker = await trio.open_tcp_stream("127.0.0.1", port)
        await talker.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        with trio.fail_after(10):
            while chunk := await talker.receive_some(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
