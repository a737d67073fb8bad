"""The dead-letter writer's group commit: what is submitted while the store thread is busy
is written as one batch, and no message of a batch is acked before the batch is durable.

Real stores throughout (SQLite files, the real spool); the only thing added is a gate in
front of ``put_many`` that lets a test hold the store thread busy for as long as it likes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from sidecar.config import load_config
from sidecar.core.messages import Inbound, MessageProps
from sidecar.metrics import Metrics
from sidecar.policies import ledger_from
from sidecar.runtime import dlq
from sidecar.runtime.dlq import DeadLetterWriter
from sidecar.runtime.engine import Engine, MetricsMeter
from sidecar.store.base import PutResult
from sidecar.store.records import DeadLetterRecord
from sidecar.store.spool import SpoolingStore
from sidecar.store.sqlite import SqliteStore
from tests.helpers.fake_broker import FakeBroker
from tests.store.contract import at, make_record
from tests.store.test_spool import FlakyPrimary


class GatedSpool(SpoolingStore):
    """The real spool in front of a real store; each ``put_many`` first waits at a gate
    (open unless a test closes it) and tells the test it has started."""

    def __init__(self, primary: SqliteStore | FlakyPrimary, spool_path: Path, **kw: int) -> None:
        super().__init__(primary, spool_path, retry_primary_after=0, **kw)
        self.batches: list[list[str]] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.gate.set()

    def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
        self.batches.append([r.id for r in records])
        self.started.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().put_many(records)


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "dlq.db")
    yield store
    store.close()


@pytest.fixture
def reader(tmp_path: Path, primary: SqliteStore) -> Iterator[SqliteStore]:
    """A second connection to the same file: it sees only what was committed."""
    store = SqliteStore(tmp_path / "dlq.db")
    yield store
    store.close()


@pytest.fixture
def store(primary: SqliteStore, tmp_path: Path) -> Iterator[GatedSpool]:
    spool = GatedSpool(primary, tmp_path / "spool.db")
    yield spool
    spool.close()


def message(tag: int) -> Inbound:
    return Inbound(1, tag, "work", f"m{tag}".encode(), MessageProps(), "work", "", False)


async def test_no_message_of_a_batch_is_acked_before_the_batch_commits(
    store: GatedSpool, reader: SqliteStore
) -> None:
    """Driven through the engine: dead letters submitted while the store thread is busy
    form one batch, and every ack finds its own record already committed."""
    config = load_config(environ={}, overrides={})
    acked_durable: list[tuple[int, bool]] = []

    class CheckingBroker(FakeBroker):
        def settle(
            self, generation: int, tag: int, *, requeue: bool = False, linger: bool = False
        ) -> bool:
            stored = {bytes(r.rawBody) for r in reader.find(limit=100)}
            acked_durable.append((tag, f"m{tag}".encode() in stored))
            return super().settle(generation, tag, requeue=requeue, linger=linger)

    broker = CheckingBroker()
    writer = DeadLetterWriter(store)
    metrics = Metrics()
    ledger = ledger_from(config, random=random.Random(7).random, meter=MetricsMeter(metrics))
    engine = Engine(ledger, broker, writer, metrics)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await nursery.start(engine.run)
            engine.open_session(1, "a", "1.0", None)
            broker.deliver(*(message(tag) for tag in range(1, 7)))
            deliveries = await engine.pull(1, 6, wait=1.0)
            assert len(deliveries) == 6
            store.gate.clear()
            assert engine.fail(1, deliveries[0].id, "VALIDATION_FAILED", "bad", None)
            await trio.to_thread.run_sync(store.started.acquire)  # the thread is busy now
            for delivery in deliveries[1:]:
                assert engine.fail(1, delivery.id, "VALIDATION_FAILED", "bad", None)
            await trio.testing.wait_all_tasks_blocked()
            assert broker.settled == []  # nothing is durable yet, so nothing is acked
            assert reader.count() == 0
            store.gate.set()
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert [len(batch) for batch in store.batches] == [1, 5]
    assert sorted(broker.settled) == [(tag, False) for tag in range(1, 7)]
    assert acked_durable and all(durable for _, durable in acked_durable), acked_durable
    assert reader.count() == 6


def submit_all(
    writer: DeadLetterWriter, records: list[DeadLetterRecord], durable: list[str]
) -> None:
    for record in records:
        writer.submit(record, on_durable=_appender(durable, record.id))


def _appender(into: list[str], value: str) -> Callable[[], None]:
    return lambda: into.append(value)


async def test_batches_are_bounded_in_records(store: GatedSpool, reader: SqliteStore) -> None:
    writer = DeadLetterWriter(store)
    durable: list[str] = []
    records = [make_record(f"m{i:04d}", lastFailureAt=at(i)) for i in range(600)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            store.gate.clear()
            submit_all(writer, records[:1], durable)
            await trio.to_thread.run_sync(store.started.acquire)
            submit_all(writer, records[1:], durable)
            store.gate.set()
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert [len(batch) for batch in store.batches] == [1, 256, 256, 87]
    assert durable == [r.id for r in records]  # acked in the order they were submitted
    assert reader.count() == 600


async def test_batches_are_bounded_in_bytes(
    store: GatedSpool, reader: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "MAX_BATCH_BYTES", 2500)
    writer = DeadLetterWriter(store)
    durable: list[str] = []
    records = [
        make_record(f"m{i}", rawBody=bytes([65 + i]) * size, lastFailureAt=at(i))
        for i, size in enumerate([10, 1000, 1000, 1000, 4000, 10])
    ]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            store.gate.clear()
            submit_all(writer, records[:1], durable)
            await trio.to_thread.run_sync(store.started.acquire)
            submit_all(writer, records[1:], durable)
            store.gate.set()
            await writer.flush()
            nursery.cancel_scope.cancel()
    # A record larger than the bound still goes, alone.
    assert store.batches == [["m0"], ["m1", "m2"], ["m3"], ["m4"], ["m5"]]
    assert durable == [r.id for r in records]
    assert reader.count() == 6


async def test_a_batch_that_fits_nowhere_is_not_acked_and_is_written_whole_later(
    tmp_path: Path,
) -> None:
    """The primary is down and the spool's disk is full: nothing of the batch is acked,
    the writer reports itself unhealthy, and once the primary is back the same batch is
    written and acked, in order."""
    primary = FlakyPrimary(tmp_path / "primary.db")
    store = GatedSpool(primary, tmp_path / "spool.db", max_bytes=64 * 1024)
    writer = DeadLetterWriter(store, retry_interval=0.01)
    durable: list[str] = []
    records = [
        make_record(f"big{i}", rawBody=bytes([65 + i]) * 40_000, payload=None) for i in range(3)
    ]
    try:
        primary.down = True
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                submit_all(writer, records, durable)
                while writer.healthy:
                    await trio.sleep(0.001)
                assert durable == []
                assert "not stored" in writer.last_error and "full" in writer.last_error
                assert store.spooled() == 0
                primary.down = False
                await writer.flush()
                nursery.cancel_scope.cancel()
        assert writer.healthy
        assert durable == [r.id for r in records]
        assert primary.inner.count() == 3
        assert all(batch == [r.id for r in records] for batch in store.batches)
    finally:
        store.close()
        primary.inner.close()


async def test_a_refused_record_is_kept_bare_and_the_rest_of_its_batch_as_it_is(
    store: GatedSpool, reader: SqliteStore
) -> None:
    writer = DeadLetterWriter(store)
    durable: list[str] = []
    records = [
        make_record("ok1", lastFailureAt=at(1)),
        make_record("huge", attemptCount=2**70),  # SQLite cannot hold the number
        make_record("ok2", lastFailureAt=at(2)),
    ]
    written: list[tuple[str, bool]] = []
    writer.on_written = lambda record, new: written.append((record.id, new))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            submit_all(writer, records, durable)
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert durable == ["ok1", "huge", "ok2"]
    assert written == [("ok1", True), ("huge", True), ("ok2", True)]
    assert store.batches == [["ok1", "huge", "ok2"], ["huge"]]
    ok1, huge = reader.get("ok1"), reader.get("huge")
    assert ok1 is not None and ok1.headers == records[0].headers and ok1.attemptCount == 3
    assert huge is not None and huge.attemptCount == 1_000_000
    assert "record refused by the store: OverflowError" in huge.errorMessage
    assert huge.rawBody == records[1].rawBody


async def test_a_batch_write_that_fails_unexpectedly_falls_back_to_one_put_each(
    primary: SqliteStore, reader: SqliteStore, tmp_path: Path
) -> None:
    """A fault in ``put_many`` that should have stayed with one record (a bug, say) must
    not stop the writer: each record is put alone and acked once durable."""

    class FaultyBatches(SpoolingStore):
        def put_many(self, records: Sequence[DeadLetterRecord]) -> list[PutResult]:
            raise RuntimeError("a fault in the batch path")

    store = FaultyBatches(primary, tmp_path / "faulty-spool.db")
    writer = DeadLetterWriter(store)
    durable: list[str] = []
    records = [make_record(f"m{i}", lastFailureAt=at(i)) for i in range(3)]
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                submit_all(writer, records, durable)
                await writer.flush()
                nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert writer.healthy
    assert durable == ["m0", "m1", "m2"]
    assert reader.count() == 3
