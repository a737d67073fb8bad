"""Stream wrappers for tests that observe what goes over a socket."""

from __future__ import annotations

import trio


class CountedStream(trio.abc.Stream):
    """A stream that records the size of every write made to it (it does not declare
    ``passes_writes_through``, so every write goes through ``send_all`` and is seen)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
