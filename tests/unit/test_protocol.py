"""Frame defaults, refusals and the agent-side decoder (``decode_sidecar``), without a socket."""

from __future__ import annotations

import json

import msgspec
import pytest

from sidecar import protocol as p

LIMITS = p.Limits(
    max_batch=100,
    max_frame_bytes=1 << 20,
    max_body_bytes=1 << 19,
    max_in_flight=200,
    deadline=30.0,
    heartbeat=10.0,
)


@pytest.fixture
def codec() -> p.Codec:
    # Built inside each test, not at import, so the codec's own construction is under test.
    return p.Codec()


def both_encodings(codec: p.Codec, frame: p.Frame) -> list[bytes | str]:
    return [codec.encode(frame, binary=False), codec.encode(frame, binary=True)]


# --- refusals ------------------------------------------------------------------------------


def test_a_refusal_is_not_fatal_unless_asked():
    error = p.ProtocolError("too_big", "frame too big", ref=7)
    frame = error.to_frame()
    assert frame == p.Error(code="too_big", message="frame too big", ref=7, fatal=False)
    assert error.to_frame(fatal=True).fatal is True
    assert (error.code, error.message, error.ref, str(error)) == (
        "too_big",
        "frame too big",
        7,
        "frame too big",
    )


def test_a_refusal_without_a_ref(codec):
    frame = p.ProtocolError("malformed", "bad").to_frame()
    assert frame.ref is None
    assert json.loads(codec.encode(frame, binary=False)) == {
        "kind": "error",
        "code": "malformed",
        "message": "bad",
    }


# --- defaults ------------------------------------------------------------------------------


def test_agent_frame_defaults():
    assert p.PROTOCOL_VERSION == 1
    hello = p.Hello(agent="a")
    assert (hello.version, hello.pid, hello.queues, hello.token, hello.protocol) == (
        "",
        None,
        [],
        None,
        1,
    )
    pull = p.Pull()
    assert (pull.max, pull.wait) == (1, 1.0)
    fail = p.Fail(id=1, reason="TIMEOUT")
    assert (fail.error, fail.retry_after) == ("", None)
    publish = p.Publish(ref=1, body=b"x")
    assert (publish.queue, publish.exchange, publish.routing_key, publish.headers) == (
        None,
        "",
        "",
        {},
    )
    assert (publish.priority, publish.persistent, publish.content_type, publish.message_id) == (
        None,
        True,
        None,
        None,
    )
    assert p.Heartbeat().ts == 0.0


def test_sidecar_frame_defaults():
    welcome = p.Welcome(session="s", protocol=1, limits=LIMITS)
    assert (welcome.pressure, welcome.batch_size) == ("NORMAL", 1)
    delivery = p.Delivery(id=1, queue="q", body=b"")
    assert (delivery.attempt, delivery.deadline, delivery.redelivered) == (1, 30.0, False)
    assert (delivery.routing_key, delivery.exchange, delivery.headers) == ("", "", {})
    assert (delivery.message_id, delivery.content_type, delivery.priority) == (None, None, None)
    assert delivery.reduced_scope is False
    published = p.Published(ref=1, ok=True)
    assert (published.error, published.throttled, published.retry_after) == (None, False, None)
    assert p.Pressure(level="WARNING", batch_size=5).ratio == 0.0
    error = p.Error(code="c", message="m")
    assert (error.ref, error.fatal) == (None, False)


def test_a_decoded_pull_without_fields_gets_the_defaults(codec):
    pull = codec.decode_agent('{"kind": "pull"}')
    assert pull == p.Pull(max=1, wait=1.0)


def test_failure_reasons_are_the_seeds_four_plus_the_sidecars():
    # Transient reasons first, then permanent ones; the order is the reason book's.
    assert p.FAILURE_REASONS == (
        "TIMEOUT",
        "NETWORK_ERROR",
        "RATE_LIMITED",
        "PROCESSING_ERROR",
        "VALIDATION_FAILED",
        "UNRECOVERABLE",
        "CONSTRAINT_VIOLATION",
    )


def test_the_kind_sets_name_each_direction():
    assert {"hello", "pull", "ack", "fail", "extend", "publish", "heartbeat"} == p.AGENT_KINDS
    assert {"welcome", "batch", "published", "pressure", "heartbeat", "error"} == p.SIDECAR_KINDS


# --- ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("good", [0, 2**63 - 1])
def test_ids_cover_exactly_the_signed_64_bit_range(good, codec):
    assert codec.decode_agent(json.dumps({"kind": "ack", "ids": [good]})) == p.Ack(ids=[good])


@pytest.mark.parametrize("bad", [-1, 2**63])
def test_ids_outside_the_range_are_malformed(bad, codec):
    with pytest.raises(p.ProtocolError) as info:
        codec.decode_agent(json.dumps({"kind": "fail", "id": bad, "reason": "TIMEOUT"}))
    assert info.value.code == "malformed"


# --- encode --------------------------------------------------------------------------------


def test_text_frames_are_json_strings_and_binary_frames_messagepack(codec):
    frame = p.Heartbeat(ts=1.5)
    text = codec.encode(frame, binary=False)
    assert isinstance(text, str)
    assert json.loads(text) == {"kind": "heartbeat", "ts": 1.5}
    binary = codec.encode(frame, binary=True)
    assert isinstance(binary, bytes)
    assert msgspec.msgpack.decode(binary) == {"kind": "heartbeat", "ts": 1.5}


def test_defaults_are_left_out_on_the_wire(codec):
    assert json.loads(codec.encode(p.Pull(), binary=False)) == {"kind": "pull"}


# --- decode_sidecar: what an agent library reads -------------------------------------------


SIDECAR_FRAMES: list[p.Frame] = [
    p.Welcome(session="s1", protocol=1, limits=LIMITS, pressure="WARNING", batch_size=5),
    p.Batch(
        messages=[
            p.Delivery(
                id=3,
                queue="q",
                body=b"\x00\xffbody",
                attempt=2,
                deadline=2.5,
                headers={"tenant": "acme"},
                reduced_scope=True,
            )
        ]
    ),
    p.Batch(messages=[]),
    p.Published(ref=9, ok=False, throttled=True, retry_after=0.25),
    p.Pressure(level="CRITICAL", batch_size=2, ratio=0.85),
    p.Heartbeat(ts=12.0),
    p.Error(code="malformed", message="bad frame", ref=4, fatal=True),
]


@pytest.mark.parametrize("frame", SIDECAR_FRAMES, ids=lambda f: type(f).__name__)
def test_every_sidecar_frame_round_trips_through_decode_sidecar(frame, codec):
    for data in both_encodings(codec, frame):
        assert codec.decode_sidecar(data) == frame


@pytest.mark.parametrize("kind", ["pull", "ack", "hello", "publish", "nonsense"])
def test_decode_sidecar_refuses_kinds_only_an_agent_sends(kind, codec):
    for data in (json.dumps({"kind": kind}), msgspec.msgpack.encode({"kind": kind})):
        with pytest.raises(p.ProtocolError) as info:
            codec.decode_sidecar(data)
        assert info.value.code == "unknown_kind"
        assert info.value.message == f"unknown frame kind {kind!r}"
        assert info.value.ref is None


@pytest.mark.parametrize("kind", ["welcome", "batch", "error", "published", "pressure"])
def test_decode_agent_refuses_kinds_only_a_sidecar_sends(kind, codec):
    with pytest.raises(p.ProtocolError) as info:
        codec.decode_agent(json.dumps({"kind": kind}))
    assert info.value.code == "unknown_kind"


@pytest.mark.parametrize(
    "frame",
    [
        p.Hello(agent="a", version="1", queues=["q"]),
        p.Pull(max=5, wait=0.5),
        p.Ack(ids=[1, 2]),
        p.Fail(id=3, reason="TIMEOUT", error="slow", retry_after=2.0),
        p.Extend(ids=[4], seconds=10.0),
        p.Publish(ref=1, body=b"\x00\xff", queue="q", headers={"k": "v"}),
        p.Heartbeat(ts=1.0),
    ],
    ids=lambda f: type(f).__name__,
)
def test_every_agent_frame_round_trips_through_decode_agent(frame, codec):
    for data in both_encodings(codec, frame):
        assert codec.decode_agent(data) == frame


def test_heartbeat_is_understood_in_both_directions(codec):
    assert codec.decode_sidecar('{"kind": "heartbeat"}') == p.Heartbeat()
    assert codec.decode_agent('{"kind": "heartbeat"}') == p.Heartbeat()


@pytest.mark.parametrize(
    "data",
    [
        "",
        "{",
        "[]",
        '{"kind": "welcome"}',  # a known kind without its required fields
        '{"kind": "pressure", "level": "X", "batch_size": "two"}',
        '{"kind": 5}',
        '{"no": "kind"}',
        b"",
        b"\xc1",  # never used in MessagePack
        msgspec.msgpack.encode({"kind": "batch", "messages": "none"}),
        msgspec.msgpack.encode({"kind": b"\xff"}),
    ],
)
def test_decode_sidecar_calls_a_broken_frame_malformed(data, codec):
    with pytest.raises(p.ProtocolError) as info:
        codec.decode_sidecar(data)
    assert info.value.code == "malformed"
    assert info.value.message.startswith("malformed frame: ")


def test_invalid_utf8_inside_messagepack_is_malformed_not_a_crash(codec):
    # str8 header announcing 2 bytes that are not UTF-8
    data = msgspec.msgpack.encode({"kind": "error", "code": "c"})[:-2] + b"\xa2\xff\xfe"
    with pytest.raises(p.ProtocolError) as info:
        codec.decode_sidecar(data)
    assert info.value.code == "malformed"


def test_unknown_fields_are_ignored_by_both_decoders(codec):
    assert codec.decode_sidecar('{"kind": "heartbeat", "ts": 1, "new": [1, 2]}') == p.Heartbeat(
        ts=1.0
    )
    assert codec.decode_agent('{"kind": "pull", "max": 3, "new": {}}') == p.Pull(max=3)
