"""The operator tools keep a durable ledger queue on the broker; the tests remove it once
they are done, so the suite leaves the broker as it found it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.tools.republish import LEDGER_QUEUE
from tests.conftest import delete_queues


@pytest.fixture(scope="package", autouse=True)
def remove_the_ledger_afterwards(rabbitmq: str) -> Iterator[None]:
    yield
    delete_queues([LEDGER_QUEUE])
