"""The per-store ledger and lock queue names (no broker needed)."""

from __future__ import annotations

import pytest

from sidecar.commands import EXIT_REFUSED
from sidecar.store.base import new_store_id
from sidecar.tools.common import ToolError
from sidecar.tools.republish import checked_store_id, ledger_queue, lock_queue


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
