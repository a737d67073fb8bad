"""Polling for conditions owned by other tasks or threads (a store, an HTTP server)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio


async def until(check: Callable[[], object | Awaitable[object]], interval: float = 0.02) -> None:
    """Return once ``check()`` (sync or async) is truthy; bound it with ``trio.fail_after``."""
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await trio.sleep(interval)
