"""``dlq retry``/``dlq move`` with several stores on one vhost: each store has its own
ledger and lock (named by its ``store_id``), against the real RabbitMQ.

Every CLI run is a subprocess bounded by a timeout (``cli``), and every broker call in the
test's own process by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiormq
import pytest

from sidecar.attempts import REPROCESSED_FROM
from sidecar.tools.republish import (
    LEGACY_LEDGER_QUEUE,
    LEGACY_LOCK_QUEUE,
    ledger_queue,
    lock_queue,
)
from tests.helpers import BROKER_URL, run_amqp
from tests.tools.helpers import (
    CLI,
    CRASHING_CLI,
    at,
    cli,
    declare,
    drain,
    open_store,
    peek,
    put,
    queue_exists,
    record,
    store_url,
)

pytestmark = pytest.mark.integration

# A selection that matches no record: the run only recovers.
NOTHING = "matches-no-record"


def _store_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _store_id(path: Path) -> str:
    store = open_store(path)
    try:
        return store.store_id()
    finally:
        store.close()


def _provenance(messages: list[Any]) -> list[str]:
    return sorted(m.header.properties.headers[REPROCESSED_FROM] for m in messages)


def _retry(path: Path, pattern: str = "TIMEOUT", **kwargs: Any) -> dict[str, Any]:
    out = cli("dlq", "retry", "--pattern", pattern, "--json", tmp_path=path, **kwargs)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_recovery_on_one_store_leaves_another_stores_ledger_alone(
    tmp_path: Path, unique_queue: Any
) -> None:
    """The bug this layout fixes: a recovery on store B used to take store A's ledger
    entry, find no record and drop it; A's recovery then released A's published claim and
    sent the record a second time."""
    queue_a, queue_b = unique_queue("store-a"), unique_queue("store-b")
    declare(queue_a, queue_b)
    store_a, store_b = _store_dir(tmp_path, "a"), _store_dir(tmp_path, "b")
    ids_a = {"a0", "a1", "a2"}
    put(store_a, *[record(rid, queue_a, i) for i, rid in enumerate(sorted(ids_a))])
    put(store_b, record("b0", queue_b, 0), record("b1", queue_b, 1))
    id_a, id_b = _store_id(store_a), _store_id(store_b)
    assert id_a != id_b

    # Store A's run dies after its second commit, before the store knows.
    out = cli(
        "dlq", "retry", "--pattern", "TIMEOUT", "--json",
        tmp_path=store_a, env={"CRASH_AT_MARK": "2"}, program=CRASHING_CLI,
    )  # fmt: skip
    assert out.returncode == 137, (out.returncode, out.stderr)
    claimed = [r.id for r in open_store(store_a).in_flight_retries()]
    assert len(claimed) == 1
    left = peek(ledger_queue(id_a))
    assert [(e["id"], e["store"]) for e in left] == [(claimed[0], id_a)]
    # The lock queue is exclusive: the broker deleted it when the process died.
    assert not queue_exists(lock_queue(id_a))

    # Store B: a full retry with its recovery, on the same vhost.
    result_b = _retry(store_b)
    assert result_b["recovered"]["marked"] == [] and result_b["recovered"]["cancelled"] == []
    assert sorted(r["id"] for r in result_b["republished"]) == ["b0", "b1"]
    assert _provenance(drain(queue_b)) == ["b0", "b1"]
    assert peek(ledger_queue(id_a)) == left  # untouched
    assert not queue_exists(ledger_queue(id_b))  # clean run, empty ledger: deleted

    # Store A recovers: the committed record is marked, not sent again.
    result_a = _retry(store_a)
    assert result_a["recovered"]["marked"] == claimed
    assert result_a["recovered"]["cancelled"] == []
    assert len(result_a["republished"]) == 1
    assert _provenance(drain(queue_a)) == sorted(ids_a)  # each exactly once
    store = open_store(store_a)
    try:
        for rid in ids_a:
            got = store.get(rid)
            assert got is not None and got.reprocessCount == 1 and got.retryToken is None
    finally:
        store.close()
    assert not queue_exists(ledger_queue(id_a))


def test_a_held_lock_blocks_only_its_own_store(tmp_path: Path, unique_queue: Any) -> None:
    queue = unique_queue("locks")
    declare(queue)
    store_a, store_b = _store_dir(tmp_path, "a"), _store_dir(tmp_path, "b")
    put(store_a, record("a0", queue, 0))
    put(store_b, record("b0", queue, 1))
    id_a = _store_id(store_a)

    async def while_a_is_locked(channel: Any) -> tuple[Any, Any]:
        async with asyncio.timeout(120):
            await channel.queue_declare(lock_queue(id_a), exclusive=True, auto_delete=True)
            run_b = await asyncio.to_thread(
                cli, "dlq", "retry", "--pattern", "TIMEOUT", tmp_path=store_b
            )
            run_a = await asyncio.to_thread(
                cli, "dlq", "retry", "--pattern", "TIMEOUT", tmp_path=store_a
            )
            return run_a, run_b

    run_a, run_b = run_amqp(while_a_is_locked)
    assert run_b.returncode == 0, run_b.stderr
    assert run_a.returncode == 4, run_a.stderr
    assert lock_queue(id_a) in run_a.stderr and "is running on this store" in run_a.stderr
    assert _provenance(drain(queue)) == ["b0"]


def test_retries_on_two_stores_run_at_the_same_time(tmp_path: Path, unique_queue: Any) -> None:
    queue_a, queue_b = unique_queue("both-a"), unique_queue("both-b")
    declare(queue_a, queue_b)
    store_a, store_b = _store_dir(tmp_path, "a"), _store_dir(tmp_path, "b")
    ids = {path: {f"{path.name}{i}" for i in range(12)} for path in (store_a, store_b)}
    for path, queue in ((store_a, queue_a), (store_b, queue_b)):
        put(path, *[record(rid, queue, i) for i, rid in enumerate(sorted(ids[path]))])
    # At 4 records a second (burst 4) each run lasts over two seconds, so the two overlap.
    argv = ["dlq", "retry", "--pattern", "TIMEOUT", "--rate", "4", "--json"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CLI, *argv, "--store", store_url(path), "--broker", BROKER_URL],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for path in (store_a, store_b)
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        results.append(json.loads(out))
    assert [len(r["republished"]) for r in results] == [12, 12]
    assert _provenance(drain(queue_a)) == sorted(ids[store_a])
    assert _provenance(drain(queue_b)) == sorted(ids[store_b])


# --- entries in the ledger every store shared before store ids


def _legacy_entry(record_id: str, token: str, target: str) -> dict[str, str]:
    """An entry as the tools wrote it before store ids: no store named."""
    return {"id": record_id, "token": token, "target": target, "tool": "dlq retry"}


def _publish_legacy(entries: list[dict[str, str]]) -> None:
    """Into the old shared ledger, under the old shared lock (as a run of then did)."""

    async def go(channel: Any) -> None:
        async with asyncio.timeout(60):
            while True:
                try:
                    await channel.queue_declare(LEGACY_LOCK_QUEUE, exclusive=True, auto_delete=True)
                    break
                except aiormq.exceptions.ChannelLockedResource:
                    channel = await channel.connection.channel()
                    await asyncio.sleep(0.2)
            await channel.queue_declare(LEGACY_LEDGER_QUEUE, durable=True)
            for entry in entries:
                await channel.basic_publish(
                    json.dumps(entry).encode(),
                    routing_key=LEGACY_LEDGER_QUEUE,
                    properties=aiormq.spec.Basic.Properties(delivery_mode=2),
                )

    run_amqp(go)


def _take_legacy(tokens: set[str]) -> list[dict[str, Any]]:
    """This test's entries still in the old ledger, removed (others are put back)."""

    async def go(channel: Any) -> list[dict[str, Any]]:
        async with asyncio.timeout(60):
            ours: list[dict[str, Any]] = []
            others = []
            try:
                while True:
                    m = await channel.basic_get(LEGACY_LEDGER_QUEUE, no_ack=False)
                    if isinstance(m.delivery, aiormq.spec.Basic.GetEmpty):
                        break
                    entry = json.loads(m.body)
                    if entry.get("token") in tokens:
                        ours.append(entry)
                        await channel.basic_ack(m.delivery.delivery_tag)
                    else:
                        others.append(m)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return ours
            for m in others:
                await channel.basic_reject(m.delivery.delivery_tag, requeue=True)
            return ours

    return list(run_amqp(go))


def test_legacy_entries_are_resolved_by_their_own_store_only(
    tmp_path: Path, unique_queue: Any
) -> None:
    queue = unique_queue("legacy")
    declare(queue)
    store_a, store_b = _store_dir(tmp_path, "a"), _store_dir(tmp_path, "b")
    run = uuid.uuid4().hex[:8]
    t_claimed, t_marked, t_shared, t_b, t_ghost = (f"retry-{run}{n}" for n in "abcde")
    put(
        store_a,
        record("claimed", queue, 0),
        record("marked", queue, 1),
        record("shared", queue, 2),
    )
    put(store_b, record("b-claimed", queue, 3), record("shared", queue, 4))
    a, b = open_store(store_a), open_store(store_b)
    try:
        # What a crash after the commit left, in each store, before the upgrade.
        assert a.begin_retry("claimed", t_claimed) and a.begin_retry("shared", t_shared)
        assert a.begin_retry("marked", t_marked)
        assert a.mark_reprocessed(
            "marked", token=t_marked, target_queue=queue, at=at(9), tool="dlq retry"
        )
        assert b.begin_retry("b-claimed", t_b)
    finally:
        a.close()
        b.close()
    tokens = {t_claimed, t_marked, t_shared, t_b, t_ghost}
    _publish_legacy(
        [
            _legacy_entry("claimed", t_claimed, queue),
            _legacy_entry("marked", t_marked, queue),
            _legacy_entry("shared", t_shared, queue),  # A's: B has the id, not the claim
            _legacy_entry("b-claimed", t_b, queue),
            _legacy_entry("ghost", t_ghost, queue),  # a store of neither
        ]
    )
    try:
        result_b = _retry(store_b, pattern=NOTHING)
        assert result_b["recovered"]["marked"] == ["b-claimed"]
        assert result_b["recovered"]["cancelled"] == []
        left = {e["token"] for e in peek(LEGACY_LEDGER_QUEUE)} & tokens
        assert left == {t_claimed, t_marked, t_shared, t_ghost}

        result_a = _retry(store_a, pattern=NOTHING)
        assert sorted(result_a["recovered"]["marked"]) == ["claimed", "shared"]
        assert result_a["recovered"]["cancelled"] == []
        assert queue_exists(LEGACY_LEDGER_QUEUE)  # never deleted by the tools
        assert [e["id"] for e in _take_legacy(tokens)] == ["ghost"]
    finally:
        _take_legacy(tokens)

    # Recovery publishes nothing, and no record was sent or marked twice.
    assert drain(queue) == []
    for path, expected in ((store_a, ("claimed", "marked", "shared")), (store_b, ("b-claimed",))):
        store = open_store(path)
        try:
            for rid in expected:
                got = store.get(rid)
                assert got is not None and got.reprocessCount == 1 and got.retryToken is None
            assert store.in_flight_retries() == []
        finally:
            store.close()
    store = open_store(store_b)
    try:
        shared_b = store.get("shared")
        assert shared_b is not None and not shared_b.reprocessed
    finally:
        store.close()
