"""Waiting for a condition owned by another task or thread (a store, an HTTP server, the
broker): the one wait-until helper, instead of hand-rolled sleep loops."""

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
