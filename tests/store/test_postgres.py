"""PostgreSQL beyond the shared contract, all against the real server (never faked):
hostile text, documents that carry every field, a connection the server kills, an outage
covered by the spool, several sidecar processes writing at once, and the operator tools
pointed at the shared store from outside any pod.

Without a reachable server every test here is skipped with the reason (see conftest).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from sidecar.store.base import StoreUnavailable
from sidecar.store.opening import open_store
from sidecar.store.postgres import PostgresStore
from sidecar.store.records import DeadLetterRecord, RecordFilter, normalise_record
from sidecar.store.spool import SpoolingStore
from tests.store.conftest import POSTGRES_DEFAULT, POSTGRES_ENV, postgres_url_with_schema
from tests.store.contract import at, make_record

pytestmark = pytest.mark.postgres


def _sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


# --- without a server: URLs, laziness, credentials


def test_open_store_postgres_urls_are_lazy_and_redacted() -> None:
    for url in (
        "postgresql://alice:s3cret@db.invalid:5432/dlq?sslmode=require",
        "postgres://alice:s3cret@db.invalid/dlq",
        "POSTGRESQL://alice:s3cret@db.invalid/dlq",
    ):
        started = time.monotonic()
        store = open_store(url)  # nothing is resolved or connected yet
        try:
            assert isinstance(store, PostgresStore)
            assert store.name == "postgresql"
            assert "s3cret" not in store.describe() and "alice" not in store.describe()
            assert "db.invalid" in store.describe() and "dlq" in store.describe()
        finally:
            store.close()
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "url", ["postgresql://alice:s3cret@host/db?bogus_option=1", "postgresql://alice:s3cret@[::1/db"]
)
def test_bad_postgres_url_is_value_error_without_credentials(url: str) -> None:
    with pytest.raises(ValueError, match="bad PostgreSQL URL") as info:
        open_store(url)
    assert "s3cret" not in str(info.value)


def test_bad_schema_name_is_refused() -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresStore("postgresql://127.0.0.1/x", schema="a" * 64)


def test_unreachable_server_is_store_unavailable_without_credentials() -> None:
    store = PostgresStore("postgresql://alice:s3cret@127.0.0.1:1/dlq", connect_timeout_s=3)
    try:
        for call in (store.ping, store.count, lambda: store.put(make_record("x"))):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert "s3cret" not in str(info.value)
            assert "127.0.0.1" in str(info.value)
    finally:
        store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.ping()


# --- the real server


def test_nul_characters_round_trip_exactly(postgres_store: PostgresStore) -> None:
    """PostgreSQL text and JSONB refuse NUL; an agent's error text may carry one anyway."""
    body = b'{"k\\u0000ey": "va\\u0000lue"}'
    record = make_record(
        "nul\x00id",
        rawBody=body,
        errorMessage="boom\x00tail",
        failureReason="WEIRD\x00",
        signature="sig\x00",
        headers={"h\x00": "v\x00"},
        processingHost="host\x00",
    )
    assert record.payload == {"k\x00ey": "va\x00lue"}
    assert postgres_store.put(record) is True
    got = postgres_store.get("nul\x00id")
    assert got == normalise_record(record)
    assert got.rawBody == body
    assert postgres_store.put(record) is False
    assert postgres_store.count(RecordFilter(pattern="boom")) == 1
    assert [r.id for r in postgres_store.find(RecordFilter(reason="WEIRD\x00"))] == ["nul\x00id"]
    assert postgres_store.failure_patterns()[0].count == 1
    # A clean record next to it is stored without the exact copy.
    postgres_store.put(make_record("clean"))
    assert postgres_store.get("clean") == normalise_record(make_record("clean"))


def test_numbers_jsonb_would_change_round_trip_exactly(postgres_store: PostgresStore) -> None:
    """JSONB keeps numbers as decimals (1e300 would come back as a 301-digit integer)."""
    body = b'{"f": 1e300, "g": 1.5e20, "small": 0.1, "x": 1.5e-7, "big": 123456789012345678901234567890}'
    record = make_record("num", rawBody=body, attemptCount=2**70)
    postgres_store.put(record)
    got = postgres_store.get("num")
    assert got == normalise_record(record)
    assert type(got.payload["f"]) is float and got.payload["f"] == 1e300
    assert got.attemptCount == 2**70
    assert postgres_store.count(RecordFilter(ids=["num"])) == 1


def test_document_holds_every_record_field(
    postgres_store: PostgresStore, postgres_database: str, postgres_schema: str
) -> None:
    """The JSONB document is the whole record, so a field added to DeadLetterRecord is
    stored and read back without a schema change; operators can query it in SQL."""
    postgres_store.put(make_record("full", headers={"traceparent": "00-abc-def-01"}))
    ((keys, traceparent, exact),) = _sql(
        postgres_database,
        sql.SQL(
            "SELECT array(SELECT jsonb_object_keys(doc)), doc->'headers'->>'traceparent',"
            " doc_exact FROM {}.dead_letter WHERE id = 'full'"
        )
        .format(sql.Identifier(postgres_schema))
        .as_string(None),
    )
    assert set(keys) == {f.encode_name for f in msgspec.structs.fields(DeadLetterRecord)}
    assert traceparent == "00-abc-def-01"
    assert exact is None


def test_unknown_document_fields_are_ignored_on_read(
    postgres_store: PostgresStore, postgres_database: str, postgres_schema: str
) -> None:
    """A newer sidecar's extra field in a shared store does not break an older reader."""
    postgres_store.put(make_record("newer"))
    _sql(
        postgres_database,
        sql.SQL(
            "UPDATE {}.dead_letter SET doc = doc || '{{\"fieldFromTheFuture\": [1, 2]}}'::jsonb"
        )
        .format(sql.Identifier(postgres_schema))
        .as_string(None),
    )
    assert postgres_store.get("newer") == normalise_record(make_record("newer"))


def test_store_reconnects_after_the_server_drops_its_connection(
    postgres_store: PostgresStore, postgres_database: str
) -> None:
    """A failover or restart kills the connection between two calls: the next call finds
    it dead and runs again on a new one, instead of sending the dead letter to the spool."""

    def backend_pid() -> int:
        (pid,) = {
            row[0]
            for row in _sql(
                postgres_database,
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'sidecar'"
                " AND datname = current_database()",
            )
        }
        return int(pid)

    postgres_store.put(make_record("before"))
    first = backend_pid()
    assert _sql(postgres_database, "SELECT pg_terminate_backend(%s)", first) == [(True,)]
    assert postgres_store.put(make_record("during")) is True
    assert backend_pid() != first
    assert {r.id for r in postgres_store.find()} == {"before", "during"}


def test_only_a_lost_connection_is_retried() -> None:
    """Timeouts and lock waits are not retried: that would double a wait already long."""
    from psycopg import errors

    from sidecar.store.postgres import _connection_lost

    assert _connection_lost(errors.AdminShutdown("terminating connection"))  # 57P01
    assert _connection_lost(errors.ConnectionFailure("gone"))  # 08006
    assert _connection_lost(psycopg.OperationalError("server closed the connection"))
    assert not _connection_lost(errors.QueryCanceled("statement timeout"))  # 57014
    assert not _connection_lost(errors.LockNotAvailable("lock timeout"))  # 55P03
    assert not _connection_lost(errors.UndefinedTable("no table"))
    assert not _connection_lost(None)


def test_newer_schema_version_is_refused(postgres_database: str, postgres_schema: str) -> None:
    PostgresStore(postgres_database, schema=postgres_schema).ping()
    _sql(
        postgres_database,
        sql.SQL("UPDATE {}.sidecar_schema SET version = 99")
        .format(sql.Identifier(postgres_schema))
        .as_string(None),
    )
    store = PostgresStore(postgres_database, schema=postgres_schema)
    try:
        with pytest.raises(StoreUnavailable, match="schema version 99 is newer"):
            store.ping()
    finally:
        store.close()


# --- an outage of the shared store, covered by the local spool


@pytest.fixture
def outage(postgres_database: str) -> Iterator[Any]:
    """Switch the test database off and on at the server (connections refused, existing
    ones terminated): a real outage as the sidecar sees it, not a simulated one."""
    admin_url = os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT
    name = psycopg.conninfo.conninfo_to_dict(postgres_database)["dbname"]

    def switch(up: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(str(name)), sql.Literal(up)
                )
            )
            if not up:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )

    try:
        yield switch
    finally:
        switch(True)


def test_spool_covers_an_outage_and_drains_into_postgres(
    postgres_store: PostgresStore, outage: Any, tmp_path: Path
) -> None:
    spool = SpoolingStore(postgres_store, tmp_path / "spool.db", retry_primary_after=0)
    try:
        assert spool.put(make_record("up-1")) is True
        assert spool.spooled() == 0

        outage(False)
        batch = [make_record(f"down-{i}", lastFailureAt=at(i)) for i in range(5)]
        for record in batch:
            assert spool.put(record) is True  # durable locally: the message may be acked
        assert spool.spooled() == 5
        assert spool.primary_available is False
        assert spool.drain() == 0  # still down: nothing moves, nothing is lost
        with pytest.raises(StoreUnavailable):
            spool.count()

        outage(True)
        assert spool.drain() == 5
        assert spool.spooled() == 0
        assert spool.primary_available is True
        assert spool.count() == 6
        for record in batch:
            assert spool.get(record.id) == normalise_record(record)
    finally:
        spool.close()


# --- several sidecars writing at once


N_WRITERS = 4
SHARED_IDS = 120
OWN_IDS = 40


def _writer(url: str, schema: str, index: int, start: Any, results: Any) -> None:
    """One sidecar process: its own store and connection, on a schema nobody created yet."""
    store = PostgresStore(url, schema=schema)
    outcome: list[tuple[str, bool]] = []
    try:
        start.wait(60)
        shared = [f"shared-{i:03d}" for i in range(SHARED_IDS)]
        random.Random(index).shuffle(shared)
        own = [f"own-{index}-{i:03d}" for i in range(OWN_IDS)]
        for id_ in [*shared, *own]:
            record = make_record(
                id_,
                attemptCount=index + 1,
                lastFailureAt=at(index),
                deadLetteredAt=at(index),
                processingHost=f"sidecar-{index}",
            )
            outcome.append((id_, store.put(record)))
        results.put(("ok", index, outcome))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        results.put(("error", index, repr(exc)))
    finally:
        store.close()


def test_concurrent_sidecars_store_each_id_once_and_lose_nothing(
    postgres_database: str, postgres_schema: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(postgres_database, postgres_schema, i, start, results))
        for i in range(N_WRITERS)
    ]
    for p in procs:
        p.start()
    try:
        start.set()
        reports = [results.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [r for r in reports if r[0] != "ok"]
    assert not errors, errors

    new_by_id: dict[str, int] = {}
    for _, _, outcome in reports:
        for id_, new in outcome:
            new_by_id[id_] = new_by_id.get(id_, 0) + int(new)
    expected = SHARED_IDS + N_WRITERS * OWN_IDS
    assert len(new_by_id) == expected
    # Exactly one writer saw each id as new: no duplicate rows, no lost insert.
    assert all(n == 1 for n in new_by_id.values()), {k: v for k, v in new_by_id.items() if v != 1}

    store = PostgresStore(postgres_database, schema=postgres_schema)
    try:
        assert store.count() == expected
        # The latest failure (the last writer's) won on every shared id, whatever the order.
        latest = store.find(RecordFilter(since=at(N_WRITERS - 1)), limit=1000)
        shared = [r for r in latest if r.id.startswith("shared-")]
        assert len(shared) == SHARED_IDS
        assert {r.attemptCount for r in shared} == {N_WRITERS}
        by_host = {row.key: row.count for row in store.failure_patterns(by="processingHost")}
        assert sum(by_host.values()) == expected
        for i in range(N_WRITERS):
            own_ids = [f"own-{i}-{j:03d}" for j in range(OWN_IDS)]
            own = store.find(RecordFilter(ids=own_ids), limit=1000)
            assert sorted(r.id for r in own) == own_ids
            assert {r.processingHost for r in own} == {f"sidecar-{i}"}
    finally:
        store.close()
    (rows,) = _sql(
        postgres_database,
        sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}.dead_letter")
        .format(sql.Identifier(postgres_schema))
        .as_string(None),
    )
    assert rows == (expected, expected)


# --- the operator tools, from outside any pod


@pytest.mark.integration
def test_operator_tools_on_the_shared_store(
    postgres_database: str, postgres_schema: str, unique_queue: Any, tmp_path: Path
) -> None:
    from tests.tools.helpers import cli, declare, drain, record

    queue = unique_queue("pgtools")
    declare(queue)
    url = postgres_url_with_schema(postgres_database, postgres_schema)
    _sql(
        postgres_database,
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(postgres_schema)).as_string(None),
    )
    # Two sidecars of the fleet dead-letter into the one store.
    for host, ids in (("pod-a", ("a1", "a2")), ("pod-b", ("b1",))):
        store = PostgresStore(url)
        try:
            for i, rid in enumerate(ids):
                store.put(
                    record(rid, queue, i + (3 if host == "pod-b" else 0), processingHost=host)
                )
        finally:
            store.close()

    out = cli("dlq", "list", "--json", "--store", url)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["total"] == 3
    assert [r["id"] for r in listed["records"]] == ["b1", "a2", "a1"]
    assert {r["processingHost"] for r in listed["records"]} == {"pod-a", "pod-b"}

    out = cli("dlq", "show", "a1", "--json", "--store", url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["originalQueue"] == queue

    out = cli("dlq", "analyze", "--report", "failure-patterns", "--json", "--store", url)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {r["processingHost"]: r["count"] for r in report["by_host"]} == {
        "pod-a": 2,
        "pod-b": 1,
    }

    # The URL from a mounted file, as the pod's sidecar reads it.
    url_file = tmp_path / "store-url"
    url_file.write_text(url + "\n")
    out = cli(
        "dlq", "retry", "--host", "pod-a", "--json", env={"SIDECAR_STORE_URL_FILE": str(url_file)}
    )
    assert out.returncode == 0, out.stderr
    assert {r["id"] for r in json.loads(out.stdout)["republished"]} == {"a1", "a2"}
    assert len(drain(queue)) == 2
    store = PostgresStore(url)
    try:
        assert store.get("a1").reprocessed and store.get("a2").reprocessed
        assert not store.get("b1").reprocessed
        assert store.in_flight_retries() == []
    finally:
        store.close()

    out = cli("dlq", "purge", "--host", "pod-b", "--yes", "--json", "--store", url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"matched": 1, "deleted": 1}

    out = cli("dlq", "list", "--store", "postgresql://alice:s3cret@127.0.0.1:1/dlq")
    assert out.returncode == 5, out.stderr
    assert "store unavailable" in out.stderr and "s3cret" not in out.stderr


# --- a fleet of running sidecars on one store


async def _failing_agent(socket_path: str, queue: str, handled: list[bytes]) -> None:
    from sidecar.client import open_agent

    async with open_agent(socket_path, agent="fleet", version="1.0", queues=[queue]) as agent:
        while True:
            for m in await agent.pull(10, wait=0.5):
                await agent.fail(m.id, "VALIDATION_FAILED", f"bad record {m.body.decode()}")
                handled.append(m.body)


@pytest.mark.integration
async def test_two_running_sidecars_dead_letter_into_one_store(
    postgres_database: str, postgres_schema: str, unique_queue: Any, tmp_path: Path
) -> None:
    """The daemon's own path (DLQ writer thread, spool in front) from two pods at once:
    every dead letter lands once in the shared store, attributed to its pod."""
    import trio

    from tests.helpers import make_config, publish_many, running_sidecar, until

    queue = unique_queue("fleet")
    _sql(
        postgres_database,
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(postgres_schema)).as_string(None),
    )
    url = postgres_url_with_schema(postgres_database, postgres_schema)
    configs = [
        make_config(
            tmp_path / pod,
            [queue],
            store={"url": url},
            identity={"host": pod},
            # Every message fails on purpose: the breaker must not pause the test's flow.
            breaker={"failure_threshold": 1000, "min_calls_in_window": 1000},
        )
        for pod in ("pod-a", "pod-b")
    ]
    bodies = [b"m%03d" % i for i in range(40)]
    handled: list[bytes] = []
    reader = PostgresStore(url)
    try:
        with trio.fail_after(90):
            async with (
                running_sidecar(configs[0]) as a,
                running_sidecar(configs[1]) as b,
                trio.open_nursery() as nursery,
            ):
                for config in configs:
                    nursery.start_soon(_failing_agent, config.agent.socket, queue, handled)
                # Both consuming before the messages arrive, so both pods write.
                await until(lambda: a.engine.sessions and b.engine.sessions, 0.05)
                await publish_many(queue, bodies)

                async def stored() -> bool:
                    return await trio.to_thread.run_sync(reader.count) == len(bodies)

                await until(stored, 0.2)
                nursery.cancel_scope.cancel()
        records = await trio.to_thread.run_sync(lambda: reader.find(limit=1000))
    finally:
        reader.close()
    assert sorted(r.rawBody for r in records) == bodies
    assert len({r.id for r in records}) == len(bodies)
    assert {r.processingHost for r in records} == {"pod-a", "pod-b"}
    assert all(r.failureReason == "VALIDATION_FAILED" for r in records)


def test_store_id_is_shared_by_the_store_and_kept_in_it(
    postgres_database: str, postgres_schema: str
) -> None:
    first = PostgresStore(postgres_database, schema=postgres_schema)
    second = PostgresStore(postgres_database, schema=postgres_schema)
    other = PostgresStore(postgres_database, schema=postgres_schema + "_other")
    try:
        store_id = first.store_id()
        # Another sidecar of the same store, and the same store reopened, read the same id.
        assert second.store_id() == store_id
        first.close()
        first = PostgresStore(postgres_database, schema=postgres_schema)
        assert first.store_id() == store_id
        # Another schema is another store.
        assert other.store_id() != store_id
        rows = _sql(postgres_database, f"SELECT value FROM {postgres_schema}.sidecar_meta")
        assert rows == [(store_id,)]
    finally:
        for s in (first, second, other):
            s.close()
        _sql(
            postgres_database,
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
            .format(sql.Identifier(postgres_schema + "_other"))
            .as_string(None),
        )


def test_store_from_before_store_ids_gets_one_on_first_open(
    postgres_database: str, postgres_schema: str
) -> None:
    old = PostgresStore(postgres_database, schema=postgres_schema)
    old.put(make_record("kept"))
    old.close()
    _sql(postgres_database, f"DROP TABLE {postgres_schema}.sidecar_meta")
    upgraded = PostgresStore(postgres_database, schema=postgres_schema)
    try:
        store_id = upgraded.store_id()
        assert len(store_id) == 32 and upgraded.get("kept") is not None
    finally:
        upgraded.close()
    reopened = PostgresStore(postgres_database, schema=postgres_schema)
    try:
        assert reopened.store_id() == store_id
    finally:
        reopened.close()
