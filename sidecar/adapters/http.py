"""The HTTP port: health for orchestrators, Prometheus metrics, status JSON, the dashboard
and its live WebSocket. Served by hypercorn (a well-kept HTTP/1.1 and WebSocket server on
trio) around a small ASGI app, so no HTTP is parsed by hand.

The port is read-only except two dead-letter actions (retry and move one record), which
answer only to ``Authorization: Bearer <http.admin_token>`` and are off without a token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("sidecar.http")

HTTP_IDLE_TIMEOUT = 5.0

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class ApiError(Exception):
    """An HTTP error answer: the status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class HttpProviders:
    """What the HTTP port reports, supplied by the supervisor."""

    ready: Callable[[], tuple[bool, dict[str, Any]]]
    status: Callable[[], Awaitable[dict[str, Any]]]
    registry: Any
    dashboard_html: Callable[[], bytes]
    live: Callable[[], Awaitable[dict[str, Any]]] | None = None
    live_interval: float = 1.0
    dlq: Any = None  # sidecar.dlq_browser.DlqBrowser: browse and act on dead letters
    metrics_read: Callable[[], None] = lambda: None  # a scrape: values it reads may be stale


MAX_REQUEST_BODY = 16 * 1024
ACTIONS = {"/api/dlq/retry": "retry", "/api/dlq/move": "move"}


class HttpApp:
    def __init__(self, providers: HttpProviders) -> None:
        self.p = providers
        self._json = msgspec.json.Encoder()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path.startswith("/api/dlq") and self.p.dlq is not None:
            await self._dlq_api(scope, receive, send)
            return
        if method not in ("GET", "HEAD"):
            await self._respond(
                send, 405, b"read-only: GET only\n", "text/plain", [(b"allow", b"GET, HEAD")]
            )
            return
        if path == "/healthz":
            # Answering at all proves the event loop is alive.
            await self._respond(send, 200, b"ok\n", "text/plain")
        elif path == "/readyz":
            ready, detail = self.p.ready()
            await self._respond(
                send, 200 if ready else 503, self._json.encode(detail), "application/json"
            )
        elif path == "/metrics":
            # OpenMetrics when the scraper asks for it (Prometheus does by default).
            accept = b", ".join(v for k, v in scope.get("headers", []) if k.lower() == b"accept")
            encoder, content_type = choose_encoder(accept.decode("latin-1"))
            self.p.metrics_read()
            await self._respond(send, 200, encoder(self.p.registry), content_type)
        elif path == "/status":
            await self._respond(
                send, 200, self._json.encode(await self.p.status()), "application/json"
            )
        elif path in ("/", "/dashboard"):
            await self._respond(send, 200, self.p.dashboard_html(), "text/html; charset=utf-8")
        else:
            await self._respond(send, 404, b"not found\n", "text/plain")

    async def _dlq_api(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"")
        try:
            if path in ACTIONS:
                if method != "POST":
                    raise ApiError(405, "POST only")
                header = _header(scope, b"authorization")
                self.p.dlq.authorize(header)
                body = await _read_body(receive, MAX_REQUEST_BODY)
                result = await self.p.dlq.act(ACTIONS[path], body)
            elif method not in ("GET", "HEAD"):
                raise ApiError(405, "GET only")
            elif path == "/api/dlq":
                result = await self.p.dlq.list(query)
            elif path == "/api/dlq/record":
                result = await self.p.dlq.get(query)
            else:
                raise ApiError(404, "not found")
        except ApiError as exc:
            await self._respond(
                send, exc.status, self._json.encode({"error": str(exc)}), "application/json"
            )
            return
        await self._respond(send, 200, self._json.encode(result), "application/json")

    async def _respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        content_type: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
        )
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """``/live``: pushes the live view every interval until the browser goes away."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if scope["path"] != "/live" or self.p.live is None:
            await send({"type": "websocket.close", "code": 4404})
            return
        await send({"type": "websocket.accept"})
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            while True:
                payload = self._json.encode(await self.p.live()).decode()
                await send({"type": "websocket.send", "text": payload})
                await trio.sleep(self.p.live_interval)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ApiError(400, "request ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def serve_http(
    providers: HttpProviders,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("sidecar.http.server")
    config.graceful_timeout = 1.0
    # hypercorn accepts through trio.serve_listeners, which waits out EMFILE on its own.
    # Limits for clients that connect and stall: a connection that sends no complete
    # request within keep_alive_timeout is closed (from the moment it connects, not only
    # between requests), request heads are bounded, and the dashboard's live socket takes
    # no large messages (the browser only listens).
    config.keep_alive_timeout = HTTP_IDLE_TIMEOUT
    config.h11_max_incomplete_size = 16 * 1024
    config.websocket_max_message_size = 64 * 1024
    await serve(HttpApp(providers), config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]  # hypercorn types only its own ASGI app class
