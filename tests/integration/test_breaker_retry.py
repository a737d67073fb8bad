"""The breaker, uncharged parking and failure reasons as an operator expects them, each a
regression test for something seen in black-box runs."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import trio

from sidecar import protocol as p
from sidecar.client import UnknownDelivery, UnknownReason, open_agent
from sidecar.policy.breaker import BreakerState
from sidecar.store.records import RecordFilter
from tests.helpers import make_config, publish_many, queue_count, running_sidecar, until

pytestmark = pytest.mark.integration


async def test_permanent_failures_never_trip_the_breaker(tmp_path, unique_queue):
    """Two VALIDATION_FAILED and three NETWORK_ERROR among the first ten once opened the
    breaker, and six malformed messages tripped it again. Only systemic reasons count."""
    queue = unique_queue()
    bad = ["VALIDATION_FAILED"] * 6 + ["UNRECOVERABLE"] * 2 + ["CONSTRAINT_VIOLATION"] * 3
    await publish_many(queue, [f"bad:{r}".encode() for r in bad] + [b"net"] * 5)
    config = make_config(
        tmp_path,
        [queue],
        breaker={"failure_threshold": 5, "min_calls_in_window": 10, "open_timeout": 30.0},
        retry={"max_attempts": 5},
    )
    answered_bad = 0
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            breaker = sidecar.engine.breaker
            while breaker.trips == 0:
                for m in await agent.pull(1, wait=0.5):
                    if m.body.startswith(b"bad:"):
                        await agent.fail(m.id, m.body[4:].decode(), "missing field url")
                        answered_bad += 1
                    else:
                        # Every permanent failure so far left the breaker alone.
                        assert answered_bad == len(bad)
                        assert breaker.state(trio.current_time()) is BreakerState.CLOSED
                        await agent.fail(m.id, "NETWORK_ERROR", "connect ECONNREFUSED")
            await until(lambda: sidecar.store.count(RecordFilter(queue=queue)) == len(bad))
            counts = dict(sidecar.engine.counts)
    assert breaker.trips == 1  # the five network errors, and only they, opened it
    assert counts["dead_lettered"] == len(bad)


async def test_a_breaker_that_trips_again_and_again_cannot_stall_a_failing_message(
    tmp_path, unique_queue
):
    """With a short open time, messages that always fail NETWORK_ERROR were delivered at
    attempts 1, 2, 3, 3, 3, 3, ... and never reached the DLQ. Now each attempt is parked
    uncharged at most once: at most max_attempts charged deliveries plus one park each."""
    queue = unique_queue()
    n, max_attempts = 10, 3
    await publish_many(queue, [f"always-fails-{i}".encode() for i in range(n)])
    config = make_config(
        tmp_path,
        [queue],
        agent={"batch_size": 5},
        breaker={
            "failure_threshold": 2,
            "open_timeout": 0.3,
            "max_open_timeout": 0.3,
            "min_calls_in_window": 1000,
        },
        retry={"max_attempts": max_attempts},
    )
    seen: dict[str, list[int]] = defaultdict(list)
    with trio.fail_after(90):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            while sidecar.store.count(RecordFilter(queue=queue)) < n:
                for m in await agent.pull(5, wait=0.3):
                    seen[m.message_id or ""].append(m.attempt)
                    await agent.fail(m.id, "NETWORK_ERROR", "read ECONNRESET")
            records = sidecar.store.find(RecordFilter(queue=queue), limit=100)
            trips = sidecar.engine.breaker.trips
            parked = sidecar.metrics.parked.labels(queue, "circuit_open")._value.get()
    assert trips >= 2, "the test needs a breaker that trips repeatedly"
    assert parked >= 1, "the test needs failures that arrive while the breaker is open"
    assert len(seen) == n
    for attempts in seen.values():
        assert attempts == sorted(attempts)
        assert len(attempts) <= 2 * max_attempts
        assert all(attempts.count(a) <= 2 for a in set(attempts))
        assert max(attempts) == max_attempts
    # The DLQ records the attempt the agent saw last.
    assert sorted(r.attemptCount for r in records) == [max_attempts] * n
    assert await queue_count(queue) == 0


async def test_a_deadline_notice_says_truthfully_whether_it_was_charged(tmp_path, unique_queue):
    """Hangs got "charged TIMEOUT" yet came back at attempt 1 without reduced scope, one of
    them eight times."""
    queue = unique_queue()
    n = 4
    await publish_many(queue, [f"hangs-{i}".encode() for i in range(n)])
    config = make_config(
        tmp_path,
        [queue],
        agent={"deadline": 0.3, "batch_size": 4},
        breaker={
            "failure_threshold": 2,
            "open_timeout": 0.3,
            "max_open_timeout": 0.3,
            "min_calls_in_window": 1000,
        },
    )
    handed: dict[int, p.Delivery] = {}
    history: dict[str, list[p.Delivery]] = defaultdict(list)
    with trio.fail_after(90):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            while sidecar.store.count(RecordFilter(queue=queue)) < n:
                for m in await agent.pull(4, wait=0.2):
                    handed[m.id] = m  # never answered: every one expires
                    history[m.message_id or ""].append(m)
            await until(lambda: len([e for e in agent.errors]) >= sum(map(len, history.values())))
            notices = {e.ref: e.message for e in agent.errors if e.code == "deadline_expired"}
            records = sidecar.store.find(RecordFilter(queue=queue), limit=100)
    charged_notices = uncharged_notices = 0
    for deliveries in history.values():
        assert len(deliveries) <= 2 * 3
        for before, after in itertools.pairwise(deliveries):
            notice = notices[before.id]
            if "charged TIMEOUT" in notice:
                charged_notices += 1
                assert (after.attempt, after.reduced_scope) == (before.attempt + 1, True)
            else:
                assert "uncharged" in notice
                uncharged_notices += 1
                assert after.attempt == before.attempt
    assert charged_notices >= n and uncharged_notices >= 1
    assert all(r.failureReason == "TIMEOUT" and r.attemptCount == 3 for r in records)


async def test_half_open_hands_out_one_probe_and_charges_its_failure(tmp_path, unique_queue):
    """In HALF_OPEN three probes were handed out; the first failure reopened the breaker and
    the other two were parked uncharged."""
    queue = unique_queue()
    await publish_many(queue, [f"m{i}".encode() for i in range(12)])
    config = make_config(
        tmp_path,
        [queue],
        breaker={"failure_threshold": 2, "open_timeout": 0.5, "min_calls_in_window": 1000},
        retry={"max_attempts": 5},
    )
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            engine = sidecar.engine
            breaker = engine.breaker
            first = await agent.pull(2, wait=5)
            while len(first) < 2:
                first += await agent.pull(2 - len(first), wait=5)
            for m in first:
                await agent.fail(m.id, "NETWORK_ERROR", "connect ECONNREFUSED")
            await until(lambda: breaker.trips == 1)
            # Half-open: one probe, and nothing more until it is answered.
            probe: list[p.Delivery] = []
            while not probe:
                probe = await agent.pull(10, wait=0.5)
            assert len(probe) == 1
            assert await agent.pull(10, wait=0.3) == []
            retried, parked = engine.counts["retried"], engine.counts["parked"]
            await agent.fail(probe[0].id, "NETWORK_ERROR", "still down")
            await until(lambda: breaker.trips == 2)
            assert engine.counts["retried"] == retried + 1  # charged like any failure
            assert engine.counts["parked"] == parked
            # The next probe succeeds and closes it; work flows in full batches again.
            probe = []
            while not probe:
                probe = await agent.pull(10, wait=0.5)
            assert len(probe) == 1
            await agent.ack([probe[0].id])
            await until(lambda: breaker.state(trio.current_time()) is BreakerState.CLOSED)
            batch = await agent.pull(10, wait=5)
            assert len(batch) > 1
            await agent.ack([m.id for m in batch])


async def test_declared_reasons_are_accepted_and_undeclared_ones_refused_at_once(
    tmp_path, unique_queue
):
    """fail(id, "HTTP_503") got a non-fatal error the client only stored; the message was
    held until its deadline and then charged TIMEOUT."""
    queue = unique_queue()
    await publish_many(queue, [b"job"])
    config = make_config(
        tmp_path,
        [queue],
        agent={"deadline": 30.0},
        retry={"reasons": {"HTTP_503": {"like": "NETWORK_ERROR"}}},
    )
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            assert agent.welcome is not None
            assert "HTTP_503" in agent.welcome.reasons
            assert "AGENT_CRASH" not in agent.welcome.reasons
            (m,) = await agent.pull(1, wait=5)
            with pytest.raises(UnknownReason):
                await agent.fail(m.id, "HTTP_504", "gateway timeout")  # raised at the call
            # A client that does not check sends it anyway: refused at once, still held.
            await agent.send(p.Fail(id=m.id, reason="HTTP_504"))
            await until(lambda: any(e.code == "unknown_reason" for e in agent.errors))
            refused = next(e for e in agent.errors if e.code == "unknown_reason")
            assert refused.ref == m.id and "HTTP_503" in refused.message
            assert sidecar.engine.owned_by(next(iter(sidecar.engine.sessions)), m.id)
            await agent.fail(m.id, "http_503", "503 Service Unavailable")
            again: list[p.Delivery] = []
            while not again:
                again = await agent.pull(1, wait=1)
            assert again[0].attempt == 2  # retried like NETWORK_ERROR
            await agent.ack([again[0].id])
            failures = sidecar.metrics.failures.labels(queue, "HTTP_503")._value.get()
    assert failures == 1


async def test_unknown_delivery_names_the_unknown_ids(tmp_path, unique_queue):
    queue = unique_queue()
    await publish_many(queue, [b"a", b"b"])
    config = make_config(tmp_path, [queue])
    with trio.fail_after(60):
        async with (
            running_sidecar(config) as sidecar,
            open_agent(config.agent.socket, agent="t", queues=[queue]) as agent,
        ):
            held: list[p.Delivery] = []
            while len(held) < 2:
                held += await agent.pull(2, wait=5)
            with pytest.raises(UnknownDelivery) as caught:
                await agent.ack([held[0].id, 999_998])  # caught before anything is sent
            assert caught.value.ids == [999_998]
            await agent.send(p.Ack(ids=[held[0].id, 999_998, 999_999]))
            await agent.send(p.Extend(ids=[999_997, held[1].id], seconds=5))
            await until(lambda: len([e for e in agent.errors if e.code == "unknown_delivery"]) == 2)
            errors = [e for e in agent.errors if e.code == "unknown_delivery"]
            await agent.ack([held[1].id])
            await until(lambda: sidecar.engine.counts["acked"] == 2)
    assert [e.ids for e in errors] == [[999_998, 999_999], [999_997]]
