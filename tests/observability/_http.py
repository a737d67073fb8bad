"""A tiny blocking HTTP client for the sidecar's read-only port, run in a worker thread."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import trio


def _lower(items: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in items}


def _fetch(
    url: str, method: str, body: bytes | None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _lower(exc.headers.items()), exc.read()


async def http(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers with lower-case names, body)`` for one request to 127.0.0.1:port."""
    url = f"http://127.0.0.1:{port}{path}"
    return await trio.to_thread.run_sync(_fetch, url, method, body, headers)


async def get_json(port: int, path: str) -> Any:
    status, _, body = await http(port, path)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)
