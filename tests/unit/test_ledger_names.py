"""The per-store ledger and lock queue names, and the ledger clean-up when the broker is
gone (no broker needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sidecar.commands import EXIT_REFUSED
from sidecar.store.base import new_store_id
from sidecar.store.sqlite import SqliteStore
from sidecar.tools.amqp import Amqp
from sidecar.tools.common import ToolError
from sidecar.tools.republish import Republisher, checked_store_id, ledger_queue, lock_queue


def test_names_carry_the_store_id_within_amqps_limit() -> None:
    store_id = new_store_id()
    assert ledger_queue(store_id) == f"sidecar.dlq.ledger.{store_id}"
    assert lock_queue(store_id) == f"sidecar.dlq.lock.{store_id}"
    longest = checked_store_id("x" * 128)
    assert len(ledger_queue(longest).encode()) <= 255
    assert len(lock_queue(longest).encode()) <= 255
    assert new_store_id() != store_id


@pytest.mark.parametrize(
    "store_id", ["", "x" * 129, "a.b", "../x", "id with space", "é", "a\x00b", "a\nb"]
)
def test_an_id_unfit_for_a_queue_name_is_refused(store_id: str) -> None:
    with pytest.raises(ToolError) as caught:
        checked_store_id(store_id)
    assert caught.value.code == EXIT_REFUSED
    assert "not usable in a queue name" in str(caught.value)


class _LostChannel:
    """A getter channel whose connection has just dropped."""

    is_closed = False

    def __init__(self) -> None:
        self.deleted: list[tuple[str, bool]] = []

    async def queue_delete(self, queue: str, *, if_empty: bool = False) -> Any:
        self.deleted.append((queue, if_empty))
        raise ConnectionResetError("connection reset by peer")


def test_a_lost_broker_at_clean_up_does_not_fail_a_finished_run(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "dlq.db")
    try:
        rp = Republisher(Amqp("amqp://unused/"), store, tool="dlq retry", token="retry-x")
        rp.store_id = store.store_id()
        rp.ledger_queue = ledger_queue(rp.store_id)
        rp._locked = True
        lost = _LostChannel()
        rp._get = lost
        assert asyncio.run(rp.delete_ledger_if_empty()) is False
        assert lost.deleted == [(rp.ledger_queue, True)]  # only ever if empty
    finally:
        store.close()
