"""The per-message loop: the pure bookkeeping (``Prefetch``), then the trio client driving it
against a scripted sidecar on trio's virtual clock (coalesced acks, acks sent when the
agent waits, deadlines of buffered deliveries kept, pull sizes within the limits)."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from sidecar import protocol as p
from sidecar.agent.client import AgentClient
from sidecar.agent.prefetch import ACK_DELAY, Prefetch

LIMITS = p.Limits(
    max_batch=50,
    max_frame_bytes=1 << 20,
    max_body_bytes=1 << 20,
    max_in_flight=100,
    deadline=30.0,
    heartbeat=10.0,
)


def deliveries(first: int, n: int, deadline: float = 30.0) -> list[p.Delivery]:
    return [
        p.Delivery(id=i, queue="q", body=b"%d" % i, deadline=deadline)
        for i in range(first, first + n)
    ]


# --- Prefetch alone -------------------------------------------------------------------------


def test_pulls_one_batch_ahead_and_no_more() -> None:
    prefetch = Prefetch()
    assert prefetch.want(batch=10, held=0, limits=LIMITS, batch_size=10) == 10
    prefetch.pulled()
    assert prefetch.want(batch=10, held=0, limits=LIMITS, batch_size=10) == 0  # one pull out
    prefetch.arrived(deliveries(1, 10), now=0.0)
    # Ten buffered and held: the next batch is asked for while they are worked on.
    assert prefetch.want(batch=10, held=10, limits=LIMITS, batch_size=10) == 10
    prefetch.pulled()
    prefetch.arrived(deliveries(11, 10), now=0.0)
    assert prefetch.want(batch=10, held=20, limits=LIMITS, batch_size=10) == 0  # two batches


def test_pull_size_respects_every_limit() -> None:
    prefetch = Prefetch()
    small = p.Limits(**{**_fields(LIMITS), "max_in_flight": 6, "max_batch": 4})
    assert prefetch.want(batch=50, held=0, limits=small, batch_size=10) == 4  # max_batch
    assert prefetch.want(batch=50, held=0, limits=LIMITS, batch_size=3) == 3  # pressure
    prefetch.arrived(deliveries(1, 2), now=0.0)
    assert prefetch.want(batch=50, held=5, limits=small, batch_size=10) == 1  # 6 - 5 held
    assert prefetch.want(batch=50, held=6, limits=small, batch_size=10) == 0
    empty = Prefetch()
    # Nothing buffered and no room: ask for one anyway, the sidecar holds the line.
    assert empty.want(batch=50, held=6, limits=small, batch_size=10) == 1


def test_a_slow_agent_gets_fewer_ahead() -> None:
    prefetch = Prefetch()
    prefetch.arrived(deliveries(1, 2), now=0.0)
    assert prefetch.take({1, 2}, now=0.0) is not None
    prefetch.resumed(now=2.0)  # two seconds per message
    assert prefetch.pace == 2.0
    # A quarter of a 30 s deadline is 7.5 s: three messages' worth, one is buffered.
    assert prefetch.want(batch=50, held=2, limits=LIMITS, batch_size=50) == 2
    prefetch.resumed(now=2.0)  # no message was handed out since: nothing to learn
    assert prefetch.pace == 2.0
    assert prefetch.take({2}, now=2.0) is not None
    prefetch.resumed(now=32.0)  # thirty seconds for that one
    assert prefetch.pace == 2.0 + 0.2 * (30.0 - 2.0)
    # Slower than a quarter deadline per message: one at a time, nothing ahead.
    assert prefetch.want(batch=50, held=0, limits=LIMITS, batch_size=50) == 1
    prefetch.arrived(deliveries(3, 1), now=32.0)
    assert prefetch.want(batch=50, held=1, limits=LIMITS, batch_size=50) == 0


def test_take_skips_deliveries_the_sidecar_took_back() -> None:
    prefetch = Prefetch()
    prefetch.arrived(deliveries(1, 4), now=0.0)
    first = prefetch.take({1, 2, 3, 4}, now=0.0)
    assert first is not None and first.id == 1 and prefetch.last_handed == 1
    second = prefetch.take({3, 4}, now=0.0)  # 2 expired meanwhile
    assert second is not None and second.id == 3
    assert [m.id for m in prefetch.take_many(5, {4})] == [4]
    assert prefetch.take({4}, now=0.0) is None


def test_acks_wait_together_at_most_the_ack_delay() -> None:
    prefetch = Prefetch()
    assert not prefetch.acks_overdue(now=5.0)
    prefetch.ack_later(1, now=1.0)
    prefetch.ack_later(2, now=1.0 + ACK_DELAY / 2)
    assert not prefetch.acks_overdue(now=1.0 + ACK_DELAY / 2)
    assert prefetch.acks_overdue(now=1.0 + ACK_DELAY)
    assert prefetch.take_acks() == [1, 2]
    assert prefetch.take_acks() == [] and not prefetch.acks_overdue(now=9.0)


def test_buffered_deliveries_are_extended_at_half_their_deadline() -> None:
    prefetch = Prefetch()
    prefetch.arrived(deliveries(1, 2, deadline=10.0), now=0.0)
    prefetch.arrived(deliveries(3, 1, deadline=4.0), now=1.0)
    assert prefetch.next_due(engaged=False) is None
    assert prefetch.next_due(engaged=True) == 3.0  # 1 + 4 / 2
    assert not prefetch.head_due(now=4.9)
    assert prefetch.extensions(now=3.0) == {4.0: [3]}
    assert prefetch.next_due(engaged=True) == 5.0
    assert prefetch.head_due(now=5.0)
    assert prefetch.extensions(now=5.0) == {10.0: [1, 2], 4.0: [3]}
    assert prefetch.extensions(now=5.0) == {}  # done until they are half spent again
    assert prefetch.next_due(engaged=True) == 7.0


def _fields(limits: p.Limits) -> dict[str, Any]:
    return {f: getattr(limits, f) for f in limits.__struct_fields__}


# --- the trio client against a scripted sidecar ----------------------------------------------


class ScriptedSidecar:
    """The far end of a fake WebSocket: answers pulls from ``queue`` (an empty batch once
    the pull's wait has passed), records every frame the client sends."""

    def __init__(self, limits: p.Limits = LIMITS) -> None:
        self.codec = p.Codec()
        self.sent: list[p.Frame] = []
        self.queue: deque[p.Delivery] = deque()
        self.arrived = trio.Event()
        self._to_client, self._from_sidecar = trio.open_memory_channel[bytes](100)
        self._to_client.send_nowait(
            self.codec.encode(
                p.Welcome(session="s/1", protocol=1, limits=limits, batch_size=50), binary=True
            )
        )
        self._nursery: trio.Nursery | None = None
        self.pulling = False

    # the client's side of the socket
    async def send_message(self, data: bytes | str) -> None:
        frame = self.codec.decode_agent(data)
        self.sent.append(frame)
        if isinstance(frame, p.Pull):
            if self.pulling:  # one pull at a time, as the sidecar requires
                error = p.Error(code="pull_in_progress", message="wait for the batch")
                await self._to_client.send(self.codec.encode(error, binary=True))
                return
            self.pulling = True
            assert self._nursery is not None
            self._nursery.start_soon(self._answer, frame)

    async def get_message(self) -> bytes:
        return await self._from_sidecar.receive()

    async def _answer(self, pull: p.Pull) -> None:
        with trio.move_on_after(pull.wait):
            while not self.queue:
                await self.arrived.wait()
                self.arrived = trio.Event()
        batch = [self.queue.popleft() for _ in range(min(pull.max, len(self.queue)))]
        self.pulling = False
        await self._to_client.send(self.codec.encode(p.Batch(messages=batch), binary=True))

    def offer(self, messages: list[p.Delivery]) -> None:
        self.queue.extend(messages)
        self.arrived.set()

    def frames(self, kind: type[p.Frame]) -> list[Any]:
        return [f for f in self.sent if isinstance(f, kind)]


async def connected(nursery: trio.Nursery, sidecar: ScriptedSidecar) -> AgentClient:
    sidecar._nursery = nursery
    client = AgentClient(sidecar)  # type: ignore[arg-type]
    nursery.start_soon(client.reader)
    nursery.start_soon(client.keeper)
    await client.hello("test", ["q"])
    return client


async def test_acks_of_a_burst_share_one_frame(autojump_clock: trio.abc.Clock) -> None:
    sidecar = ScriptedSidecar()
    sidecar.offer(deliveries(1, 10))
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, sidecar)
        seen = []
        with trio.move_on_after(5):
            async for message in client.messages(batch=10, wait=1.0):
                seen.append(message.id)
                await message.ack()
        nursery.cancel_scope.cancel()
    assert seen == list(range(1, 11))
    # All ten answered before the loop waited for more, in one frame.
    assert [a.ids for a in sidecar.frames(p.Ack)] == [list(range(1, 11))]
    assert all(pull.max <= 10 for pull in sidecar.frames(p.Pull))


async def test_an_ack_goes_out_while_the_handler_waits(autojump_clock: trio.abc.Clock) -> None:
    sidecar = ScriptedSidecar()
    sidecar.offer(deliveries(1, 3))
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, sidecar)
        async for message in client.messages(batch=3, wait=1.0):
            await message.ack()
            await trio.sleep(1)  # the next message's work, started before asking for it
            break
        assert [a.ids for a in sidecar.frames(p.Ack)] == [[1]]
        nursery.cancel_scope.cancel()


async def test_buffered_deliveries_are_kept_alive_while_the_agent_works(
    autojump_clock: trio.abc.Clock,
) -> None:
    sidecar = ScriptedSidecar()
    sidecar.offer(deliveries(1, 3, deadline=4.0))
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, sidecar)
        start = trio.current_time()
        async for message in client.messages(batch=3, wait=1.0):
            assert message.id == 1
            await trio.sleep(7)  # far past the others' deadline of 4 s
            await message.ack()
            break
        extends = sidecar.frames(p.Extend)
        # At 2 s, 4 s and 6 s after arrival: every time half of the deadline was spent.
        assert [(e.ids, e.seconds) for e in extends] == [([2, 3], 4.0)] * 3
        assert trio.current_time() - start >= 7
        # Answered and the loop left: the buffered ones are no longer kept alive.
        await trio.sleep(10)
        assert len(sidecar.frames(p.Extend)) == 3
        nursery.cancel_scope.cancel()


async def test_the_next_loop_and_a_plain_pull_take_the_buffer_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    sidecar = ScriptedSidecar()
    sidecar.offer(deliveries(1, 6))
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, sidecar)
        async for message in client.messages(batch=4, wait=1.0):
            await message.ack()
            break
        pulls_before = len(sidecar.frames(p.Pull))
        pulled = await client.pull(2, wait=1.0)
        assert [m.id for m in pulled] == [2, 3]
        assert len(sidecar.frames(p.Pull)) == pulls_before  # no new pull for them
        await client.ack([m.id for m in pulled])
        rest = []
        async for message in client.messages(batch=4, wait=1.0):
            rest.append(message.id)
            await message.ack()
            if len(rest) == 3:
                break
        assert rest == [4, 5, 6]
        nursery.cancel_scope.cancel()


async def test_a_stop_ends_the_loop_with_its_acks_sent(autojump_clock: trio.abc.Clock) -> None:
    sidecar = ScriptedSidecar()
    sidecar.offer(deliveries(1, 5))
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, sidecar)
        seen: list[int] = []
        async for message in client.messages(batch=5, wait=1.0, stop=lambda: len(seen) == 2):
            seen.append(message.id)
            await message.ack()
        assert seen == [1, 2]
        assert [i for a in sidecar.frames(p.Ack) for i in a.ids] == [1, 2]
        nursery.cancel_scope.cancel()


async def test_a_pull_sent_by_a_cancelled_caller_is_waited_for(
    autojump_clock: trio.abc.Clock,
) -> None:
    sidecar = ScriptedSidecar()
    async with trio.open_nursery() as nursery:
        client = await connected(nursery, sidecar)
        # A pull whose caller was cancelled right after the frame went out: the client
        # did not get to note it, so its next pull is refused as pull_in_progress.
        await client.send(p.Pull(max=5, wait=3.0))
        sidecar.offer(deliveries(1, 2))
        seen = []
        async for message in client.messages(batch=5, wait=1.0):
            seen.append(message.id)
            await message.ack()
            if len(seen) == 2:
                break
        assert seen == [1, 2] and not client.errors
        nursery.cancel_scope.cancel()
