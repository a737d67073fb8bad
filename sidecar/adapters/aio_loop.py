"""The asyncio side of the broker adapter: where aiormq's event loop runs, and the bridge
the broker crosses between it and trio.

Two bridges, chosen by ``broker.hop`` and compared side by side in bench/RESULTS.md
(``python -m bench.hops``); neither won clearly, so the stack's trio-asyncio is the default:

* ``trio-asyncio``: aiormq runs on trio-asyncio's loop inside the trio thread. Stock
  trio-asyncio 0.16 runs one asyncio callback per trio scheduler pass and aiormq schedules
  several per frame; ``install_drain_patch`` runs every ready callback per pass instead
  (bounded, so trio tasks are never starved), version-checked.
* ``thread``: aiormq runs on a plain asyncio loop in a dedicated thread. Work crosses in
  coalesced batches: one wake-up per burst of deliveries, acks or publishes, never one per
  message.

Either way the broker code calls the same five methods and never touches a loop itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol

import trio

# How many ready callbacks one pass may run before yielding to trio.
DRAIN_LIMIT = 512
_TESTED_VERSIONS = ("0.15.", "0.16.")


def drain_patch_applicable() -> bool:
    import trio_asyncio

    version: str = trio_asyncio.__version__
    return version.startswith(_TESTED_VERSIONS)


def install_drain_patch() -> bool:
    """Run all ready asyncio callbacks per trio pass. Returns False (and leaves trio-asyncio
    stock, slower but correct) on an untested version. trio_asyncio is imported only here and
    in its bridge: importing it changes plain asyncio for the whole process."""
    if not drain_patch_applicable():
        return False
    from trio_asyncio._base import BaseTrioEventLoop

    stock = BaseTrioEventLoop._main_loop_one
    if getattr(stock, "drained", False):
        return True

    async def drained_main_loop_one(self: Any, no_wait: bool = False) -> None:
        await stock(self, no_wait)
        if no_wait:
            return
        for _ in range(DRAIN_LIMIT):
            if self._stopped.is_set():
                return
            try:
                await stock(self, True)
            except trio.WouldBlock:
                return

    drained_main_loop_one.drained = True  # type: ignore[attr-defined]  # a marker on a function
    BaseTrioEventLoop._main_loop_one = drained_main_loop_one
    return True


CoroutineFunction = Callable[..., Coroutine[Any, Any, Any]]


class OperationCancelled(ConnectionError):
    """aiormq cancelled an operation from its side: the connection or channel closed under it.

    Raised instead of asyncio's CancelledError, a BaseException that trio code would take for
    its own cancellation and let escape every ``except Exception``, stopping the daemon.
    """


class Bridge(Protocol):
    """How trio code and aiormq's loop reach each other."""

    name: str
    # aiormq's loop runs in the trio thread: loop-side state may be touched from trio code
    # between the loop's steps.
    same_thread: bool

    def open(self) -> Any:
        """An async context manager running the loop."""

    async def call(self, fn: CoroutineFunction, *args: Any, **kwargs: Any) -> Any:
        """Run an asyncio coroutine function on the loop; await its result in trio."""

    def to_asyncio(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain function in the loop's context (maybe at once)."""

    def to_asyncio_later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain function in the loop's context on its next pass, never at once, so
        that what the caller queues before it yields is taken in one go."""

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the loop's context, run a plain function in trio's (maybe at once)."""

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start a task; only from the loop's context."""


class TrioAsyncioBridge:
    """aiormq on trio-asyncio's loop, in the trio thread: crossings are plain calls."""

    name = "trio-asyncio"
    same_thread = True

    def __init__(self) -> None:
        self.loop: Any = None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        import trio_asyncio

        install_drain_patch()
        async with trio_asyncio.open_loop() as loop:
            self.loop = loop
            yield

    async def call(self, fn: CoroutineFunction, *args: Any, **kwargs: Any) -> Any:
        import trio_asyncio

        try:
            return await trio_asyncio.aio_as_trio(fn, loop=self.loop)(*args, **kwargs)
        except asyncio.CancelledError as exc:
            # trio's own cancellation arrives as trio.Cancelled, so this one came from aiormq.
            raise OperationCancelled(f"{getattr(fn, '__name__', fn)} cancelled") from exc

    def to_asyncio(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def to_asyncio_later(self, fn: Callable[..., Any], *args: Any) -> None:
        with suppress(RuntimeError):  # the loop closed during shutdown
            self.loop.call_soon(fn, *args)

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.loop.create_task(coro)
        return task


class ThreadBridge:
    """aiormq on a plain asyncio loop in its own thread."""

    name = "thread"
    same_thread = False

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        self._token = trio.lowlevel.current_trio_token()
        # An explicit selector loop: importing trio_asyncio changes what the asyncio policy
        # would hand out, and its loop is the slow one.
        loop = self.loop = asyncio.SelectorEventLoop()
        ready = threading.Event()

        def run_loop() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run_loop, name="sidecar-amqp", daemon=True)
        thread.start()
        await trio.to_thread.run_sync(ready.wait)
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown(loop, thread)

    async def _shutdown(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with trio.move_on_after(5):
            await self.call(cancel_all)
        loop.call_soon_threadsafe(loop.stop)
        await trio.to_thread.run_sync(thread.join, 5)
        if not thread.is_alive():
            loop.close()

    async def call(self, fn: CoroutineFunction, *args: Any, **kwargs: Any) -> Any:
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self.loop)
        done = trio.Event()
        future.add_done_callback(lambda _f: self._wake(done.set))
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
            raise OperationCancelled(f"{getattr(fn, '__name__', fn)} cancelled") from exc

    def _wake(self, fn: Callable[[], Any]) -> None:
        assert self._token is not None
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn)

    def to_asyncio(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.loop is not None
        with suppress(RuntimeError):  # the loop closed during shutdown
            self.loop.call_soon_threadsafe(fn, *args)

    def to_asyncio_later(self, fn: Callable[..., Any], *args: Any) -> None:
        self.to_asyncio(fn, *args)  # another thread's loop: never at once anyway

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._token is not None
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        assert self.loop is not None
        return self.loop.create_task(coro)


def make_bridge(name: str) -> Bridge:
    if name == "thread":
        return ThreadBridge()
    return TrioAsyncioBridge()
