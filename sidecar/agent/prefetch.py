"""The per-message loop's bookkeeping, free of I/O and of any event loop: which deliveries
are buffered ahead of the agent, how many to pull next, which acks wait to go out together,
and which buffered deliveries need their deadline moved. The clients drive it with the
clock they run on (``now`` is always passed in).

Rules it keeps:

* at most one batch is buffered ahead of the agent, and never more than the agent could
  handle in ``BUFFER_SHARE`` of a deadline at the pace it has shown so far;
* a pull never asks for more than the Welcome's limits leave (``max_in_flight`` minus what
  the agent holds, ``max_batch``, the batch size the sidecar's pressure allows);
* acks wait to be sent together for at most ``ACK_DELAY`` (the clients also send them as
  soon as the agent blocks, whichever comes first);
* a buffered delivery that has used half of its deadline is extended by a full deadline
  while the agent is still working on the message it was handed last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable
from dataclasses import dataclass

from sidecar import protocol as p

ACK_DELAY = 0.02  # seconds an ack may wait for others to share its frame
BUFFER_SHARE = 0.25  # of a deadline: the most buffered work (at the agent's pace) to hold
PACE_WEIGHT = 0.2  # weight of the newest handling time in the moving average


@dataclass(slots=True)
class Buffered:
    delivery: p.Delivery
    expires_at: float  # the deadline as this side sees it (from arrival, moved by extends)


class Prefetch:
    """State shared by ``messages()`` and ``pull()`` of one client connection."""

    def __init__(self) -> None:
        self.buffer: deque[Buffered] = deque()
        self.pulling = False  # a pull frame is out and its batch not taken yet
        self.pending_acks: list[int] = []
        self._first_ack_at = 0.0
        self.last_handed: int | None = None  # the id handed to the agent last
        self._handed_at: float | None = None
        self.pace = 0.0  # seconds the agent spends per message (moving average; 0 unknown)

    # --- pulling -------------------------------------------------------------------------

    def want(self, *, batch: int, held: int, limits: p.Limits | None, batch_size: int) -> int:
        """How many deliveries to pull now; 0 means none (a pull is out, enough is
        buffered, or the limits leave no room while something is still buffered)."""
        if self.pulling:
            return 0
        target = max(1, batch)
        if limits is not None:
            target = min(target, max(1, limits.max_batch))
        target = min(target, max(1, batch_size))
        buffered = len(self.buffer)
        if buffered > target:  # the batch being worked on, and the next one on its way
            return 0
        want = target
        if limits is not None:
            want = min(want, limits.max_in_flight - held)
            if self.pace > 0:
                affordable = int(limits.deadline * BUFFER_SHARE / self.pace)
                want = min(want, affordable - buffered)
        if buffered == 0:
            # Nothing to hand out: ask anyway, the sidecar answers within its own limits
            # (an empty batch after the wait when the agent holds all it may).
            return max(1, want)
        return max(0, want)

    def pulled(self) -> None:
        self.pulling = True

    def arrived(self, messages: Iterable[p.Delivery], now: float) -> None:
        self.pulling = False
        self.buffer.extend(Buffered(m, now + m.deadline) for m in messages)

    def pull_answered(self) -> None:
        """The pull was answered with an error instead of a batch."""
        self.pulling = False

    # --- handing out ---------------------------------------------------------------------

    def resumed(self, now: float) -> None:
        """The agent asks for the next message: the time since the last one was handed out
        is what handling it took."""
        if self._handed_at is not None:
            spent = max(0.0, now - self._handed_at)
            self.pace = spent if self.pace == 0 else self.pace + PACE_WEIGHT * (spent - self.pace)
            self._handed_at = None

    def take(self, held: Container[int], now: float) -> p.Delivery | None:
        """The next buffered delivery still held (one the sidecar took back meanwhile is
        dropped: it was charged and will come again), or None when the buffer is empty."""
        while self.buffer:
            delivery = self.buffer.popleft().delivery
            if delivery.id in held:
                self.last_handed = delivery.id
                self._handed_at = now
                return delivery
        return None

    def take_many(self, most: int, held: Container[int]) -> list[p.Delivery]:
        """Up to ``most`` buffered deliveries at once, for a plain ``pull``."""
        out: list[p.Delivery] = []
        while self.buffer and len(out) < most:
            delivery = self.buffer.popleft().delivery
            if delivery.id in held:
                out.append(delivery)
        return out

    # --- acks ----------------------------------------------------------------------------

    def ack_later(self, delivery_id: int, now: float) -> None:
        if not self.pending_acks:
            self._first_ack_at = now
        self.pending_acks.append(delivery_id)

    def acks_overdue(self, now: float) -> bool:
        return bool(self.pending_acks) and now - self._first_ack_at >= ACK_DELAY

    def take_acks(self) -> list[int]:
        ids, self.pending_acks = self.pending_acks, []
        return ids

    # --- deadlines of buffered deliveries -------------------------------------------------

    def head_due(self, now: float) -> bool:
        """Cheap check before handing out: has the oldest buffered delivery used half of
        its deadline?"""
        return bool(self.buffer) and _due_at(self.buffer[0]) <= now

    def extensions(self, now: float) -> dict[float, list[int]]:
        """Buffered deliveries that have used half of their deadline, grouped by the
        seconds to extend them by (their own deadline); marked as extended."""
        due: dict[float, list[int]] = {}
        for item in self.buffer:
            if _due_at(item) <= now:
                due.setdefault(item.delivery.deadline, []).append(item.delivery.id)
                item.expires_at = now + item.delivery.deadline
        return due

    def next_due(self, engaged: bool) -> float | None:
        """When the earliest buffered delivery needs extending, if the agent is engaged
        (still working on the message it was handed last); None otherwise."""
        if not engaged or not self.buffer:
            return None
        return min(_due_at(item) for item in self.buffer)


def _due_at(item: Buffered) -> float:
    return item.expires_at - item.delivery.deadline / 2
