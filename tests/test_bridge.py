"""The broker hop's crossings: an operation that aiormq cancels from its side (its connection
closed under it) must reach trio code as an ordinary error, never as a cancellation."""

from __future__ import annotations

import asyncio

import pytest
import trio

from sidecar.adapters.aio_loop import OperationCancelled, make_bridge

HOPS = ["trio-asyncio", "thread"]


async def cancelled_by_the_loop() -> None:
    # What aiormq does to pending RPCs when their connection closes.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().call_soon(task.cancel)
    await asyncio.sleep(10)


async def answer() -> int:
    await asyncio.sleep(0)
    return 42


@pytest.mark.parametrize("hop", HOPS)
async def test_cancellation_from_the_loop_is_an_ordinary_error(hop: str) -> None:
    bridge = make_bridge(hop)
    with trio.fail_after(30):
        async with bridge.open():
            with pytest.raises(OperationCancelled) as caught:
                await bridge.call(cancelled_by_the_loop)
            assert isinstance(caught.value, ConnectionError)
            # The bridge still works afterwards.
            assert await bridge.call(answer) == 42


@pytest.mark.parametrize("hop", HOPS)
async def test_trio_cancellation_still_cancels(hop: str) -> None:
    bridge = make_bridge(hop)
    with trio.fail_after(30):
        async with bridge.open():
            with trio.move_on_after(0.2) as scope:
                await bridge.call(asyncio.sleep, 10)
            assert scope.cancelled_caught


@pytest.mark.parametrize("hop", HOPS)
async def test_later_never_runs_at_once_and_keeps_order(hop: str) -> None:
    bridge = make_bridge(hop)
    ran: list[int] = []
    with trio.fail_after(30):
        async with bridge.open():
            for n in range(5):
                bridge.to_asyncio_later(ran.append, n)
            if hop == "trio-asyncio":
                # Same thread: still queued, the caller has not yielded. (On the thread hop
                # the loop's own thread may already be running them.)
                assert ran == []

            async def barrier() -> None:
                await asyncio.sleep(0)

            await bridge.call(barrier)  # the loop has had its pass since
            assert ran == [0, 1, 2, 3, 4]
