"""trio-asyncio, tuned so that aiormq is not throttled by the bridge.

Stock trio-asyncio 0.16 runs one asyncio callback per trio scheduler pass, and aiormq
schedules several callbacks per frame; measured, that halves the consume rate
(bench/RESULTS.md). ``open_drained_loop`` runs every ready callback in one pass instead,
bounded so that trio tasks are never starved. The change is one method, applied only to
the trio-asyncio versions it was written and tested against.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from trio_asyncio._base import BaseTrioEventLoop

# How many ready callbacks one pass may run before yielding to trio.
DRAIN_LIMIT = 512
_TESTED_VERSIONS = ("0.15.", "0.16.")

_stock_main_loop_one = BaseTrioEventLoop._main_loop_one


async def _drained_main_loop_one(self: Any, no_wait: bool = False) -> None:
    await _stock_main_loop_one(self, no_wait)
    if no_wait:
        return
    for _ in range(DRAIN_LIMIT):
        if self._stopped.is_set():
            return
        try:
            await _stock_main_loop_one(self, True)
        except trio.WouldBlock:
            return


def drain_patch_applicable() -> bool:
    return trio_asyncio.__version__.startswith(_TESTED_VERSIONS)


def install_drain_patch() -> bool:
    """Run all ready asyncio callbacks per trio pass. Returns False (and leaves trio-asyncio
    stock, slower but correct) on an untested version."""
    if not drain_patch_applicable():
        return False
    BaseTrioEventLoop._main_loop_one = _drained_main_loop_one
    return True


@asynccontextmanager
async def open_drained_loop() -> AsyncIterator[Any]:
    install_drain_patch()
    async with trio_asyncio.open_loop() as loop:
        yield loop
