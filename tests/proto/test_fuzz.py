"""Fuzz the agent-facing input path: no input may raise anything but ProtocolError.

Covered:
* ``Codec.decode_agent`` on random bytes (the MessagePack path), random text (the JSON
  path), random JSON/MessagePack objects with a valid or random ``kind`` and random fields,
  and mutated valid frames (byte flips, truncations, insertions) taken from the vectors.
* ``Session._dispatch`` (the per-frame handler table: pull, ack, fail, extend, publish,
  heartbeat, hello) on a Session built with a fake engine, gate and nursery (no broker, no
  socket), including ``_check_publish``; every frame the session answers with must encode in
  both encodings. And ``Session._check_hello`` on random Hello structs.

Not covered: the handshake coroutine, the WebSocket layer (frame sizes: see the session
vectors), and the real Engine.

Frame budget: random bytes 1000 examples x 4 frames, random text 500 x 4, random objects
1000 x 2 (one JSON, one MessagePack), mutated frames 500 x 4, session dispatch 800 x 2,
Hello checks 400: 4000 + 2000 + 2000 + 2000 + 1600 + 400 = 12,000 frames.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import protocol as p
from sidecar.config import load_config
from sidecar.metrics import Metrics
from sidecar.policy.failure import DEFAULT_REASONS
from sidecar.runtime.session import Session
from tests.proto._util import PROTO

CODEC = p.Codec()
FAST = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "database": None}
VALID_FRAMES: list[bytes | str] = [
    v["frame"] if v["encoding"] == "json" else bytes.fromhex(v["frame"])
    for v in json.loads((PROTO / "vectors" / "frames.json").read_text(encoding="utf-8"))
    if v["expect"]["ok"]
]
FIELDS = sorted(
    {
        f
        for t in p.AgentFrame.__args__  # type: ignore[attr-defined]
        for f in t.__struct_fields__
    }
)


def check_decode(data: bytes | str) -> p.Frame | None:
    """decode_agent returns an agent frame or raises ProtocolError with a code and message."""
    try:
        frame = CODEC.decode_agent(data)
    except p.ProtocolError as exc:
        assert exc.code in ("malformed", "unknown_kind"), exc.code
        assert exc.message
        return None
    assert frame.__struct_config__.tag in p.AGENT_KINDS
    return frame


base_scalars = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_scalars = base_scalars | st.integers(min_value=-(2**70), max_value=2**70)
mp_scalars = (
    base_scalars
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=16)
    | st.floats()
)


def shallow(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Scalars, or one level of list/object around them (deep nesting only slows the fuzz)."""
    return (
        scalars
        | st.lists(scalars, max_size=3)
        | st.dictionaries(st.text(max_size=6), scalars, max_size=3)
    )


json_values = shallow(json_scalars)
mp_values = shallow(mp_scalars)
kinds = (
    st.sampled_from(sorted(p.AGENT_KINDS | p.SIDECAR_KINDS))
    | st.text(max_size=10)
    | st.none()
    | st.integers(-5, 5)
)


def frame_objects(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda kind, fields, extra: {"kind": kind, **fields, **extra},
        kinds,
        st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
        st.dictionaries(st.text(max_size=8), values, max_size=2),
    )


@settings(max_examples=1000, **FAST)
@given(st.lists(st.binary(max_size=200), min_size=4, max_size=4))
def test_random_bytes(frames: list[bytes]) -> None:
    for data in frames:
        check_decode(data)


@settings(max_examples=500, **FAST)
@given(
    st.lists(
        st.text(max_size=200) | st.from_regex(r'\{"kind": ?"[a-z]{0,8}".{0,40}\}', fullmatch=True),
        min_size=4,
        max_size=4,
    )
)
def test_random_text(frames: list[str]) -> None:
    for data in frames:
        check_decode(data)


@settings(max_examples=1000, **FAST)
@given(frame_objects(json_values), frame_objects(mp_values))
def test_random_objects(json_obj: dict[str, Any], mp_obj: dict[str, Any]) -> None:
    json_frame = check_decode(json.dumps(json_obj))
    if json_frame is not None:
        assert json_obj["kind"] in p.AGENT_KINDS
    elif isinstance(json_obj["kind"], str) and json_obj["kind"] in p.AGENT_KINDS:
        pass  # a known kind with bad fields: malformed
    check_decode(msgspec.msgpack.encode(mp_obj))


@st.composite
def mutated(draw: st.DrawFn) -> bytes | str:
    original = draw(st.sampled_from(VALID_FRAMES))
    data = bytearray(original.encode() if isinstance(original, str) else original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    if isinstance(original, str):
        return bytes(data).decode("utf-8", errors="replace")
    return bytes(data)


@settings(max_examples=500, **FAST)
@given(st.lists(mutated(), min_size=4, max_size=4))
def test_mutated_valid_frames(frames: list[bytes | str]) -> None:
    for data in frames:
        check_decode(data)


# --- session level ----------------------------------------------------------------------


class FakeBroker:
    is_connected = True

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish_nowait(self, body: bytes, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})
        kwargs["on_done"](None)


class FakeEngine:
    """Holds delivery ids 1..5; everything else is unknown, like the real engine."""

    held = frozenset(range(1, 6))
    reasons = DEFAULT_REASONS

    def __init__(self) -> None:
        self.broker = FakeBroker()

    def must_pause(self) -> bool:
        # A pull goes to a task (which FakeNursery only records): this fake holds no
        # deliveries to answer it with, and these tests run outside trio.
        return True

    def ack(self, session: int, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self.held]

    def extend(self, session: int, ids: list[int], seconds: float) -> list[int]:
        assert seconds > 0
        return [i for i in ids if i not in self.held]

    def fail(
        self, session: int, delivery_id: int, reason: str, error: str, retry_after: float | None
    ) -> bool:
        assert reason in p.FAILURE_REASONS
        return delivery_id in self.held


class FakeGate:
    clock = staticmethod(lambda: 0.0)

    def check(self, target: str) -> tuple[float, str]:
        return (0.25, "rate_limited") if target.endswith("slow") else (0.0, "")

    def current_rate(self, target: str) -> float:
        return 4.0 if target.endswith("slow") else 1000.0


class FakeNursery:
    def __init__(self) -> None:
        self.started: list[Any] = []

    def start_soon(self, fn: Any, *args: Any) -> None:
        self.started.append((fn, args))


CONFIG = load_config(environ={}, overrides={"throttle": {"queue": 1}})


def make_session(*, over_tcp: bool = False) -> Session:
    engine = FakeEngine()
    session = Session(
        None,  # type: ignore[arg-type]  # never touched by _dispatch
        agent=CONFIG.agent,
        throttle=CONFIG.throttle,
        host=CONFIG.identity.host,
        engine=engine,  # type: ignore[arg-type]
        broker=engine.broker,  # type: ignore[arg-type]
        gate=FakeGate(),  # type: ignore[arg-type]
        metrics=Metrics(),
        codec=CODEC,
        over_tcp=over_tcp,
        consume=lambda queue: None,
    )
    session._nursery = FakeNursery()  # type: ignore[assignment]
    return session


def answers(session: Session) -> list[p.Frame]:
    out = []
    while True:
        try:
            out.append(session._outbox.receive_nowait())
        except trio.WouldBlock:
            return out


SESSION = make_session()
# Values an agent can really send; integers beyond 64 bits are a known bug (see below).
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(-3, 8)
finite = st.floats(allow_nan=False, allow_infinity=False)
session_values = shallow(
    st.none() | st.booleans() | ints | finite | st.text(max_size=12) | st.binary(max_size=12)
)
targeted = st.fixed_dictionaries(
    {"kind": st.sampled_from(sorted(p.AGENT_KINDS))},
    optional={
        "ids": st.lists(ints, max_size=4),
        "id": ints,
        "ref": ints,
        "max": ints,
        "wait": finite,
        "seconds": finite,
        "reason": st.sampled_from([*p.FAILURE_REASONS, "timeout", "BOGUS", ""]),
        "retry_after": finite | st.none(),
        "body": st.binary(max_size=64),
        "queue": st.none() | st.sampled_from(["q", "amq.x", "", "a\x00b", "slow", "x" * 300]),
        "exchange": st.sampled_from(["", "ex", "e" * 300]),
        "routing_key": st.sampled_from(["", "rk", "slow", "r" * 300]),
        "headers": st.dictionaries(st.text(max_size=6), session_values, max_size=4)
        | st.dictionaries(st.text(max_size=3), st.none(), min_size=60, max_size=70),
        "priority": st.none() | ints,
        "persistent": st.booleans(),
        "ts": finite,
        "agent": st.text(max_size=6),
    },
)
SESSION_CODES = {
    "malformed",
    "unknown_kind",
    "invalid_pull",
    "pull_in_progress",
    "unknown_delivery",
    "unknown_reason",
    "invalid_fail",
    "invalid_extend",
    "invalid_publish",
    "duplicate_hello",
}


@settings(max_examples=800, **FAST)
@given(st.lists(st.tuples(targeted, st.booleans()), min_size=2, max_size=2), st.booleans())
def test_session_dispatch(frames: list[tuple[dict[str, Any], bool]], pulling: bool) -> None:
    session = SESSION
    session.pulling = pulling
    for obj, binary in frames:
        data = msgspec.msgpack.encode(obj) if binary else msgspec.json.encode(obj).decode()
        session.dispatch(data)  # must not raise
    for frame in answers(session):
        assert isinstance(frame, p.Error | p.Published | p.Heartbeat), frame
        if isinstance(frame, p.Error):
            assert frame.code in SESSION_CODES, frame.code
            assert not frame.fatal
        # Whatever the session answers must be sendable in either encoding.
        CODEC.encode(frame, binary=True)
        CODEC.encode(frame, binary=False)


@settings(max_examples=400, **FAST)
@given(
    st.builds(
        p.Hello,
        agent=st.text(max_size=8),
        queues=st.lists(st.text(max_size=12), max_size=3),
        token=st.none() | st.text(max_size=8),
        protocol=st.integers(-2, 3),
    ),
    st.booleans(),
)
def test_check_hello(hello: p.Hello, over_tcp: bool) -> None:
    problem = make_session(over_tcp=over_tcp)._check_hello(hello)
    if problem is None:
        assert hello.agent and hello.protocol == p.PROTOCOL_VERSION and not over_tcp
    else:
        assert problem.code in {
            "unauthorized",
            "unsupported_protocol",
            "invalid_queue",
            "invalid_hello",
        }
        if over_tcp:
            assert problem.code == "unauthorized"  # no token configured: TCP always refused


def test_session_dispatch_answers_in_order() -> None:
    """A sanity check that the fake-engine session really answers (the fuzz is not vacuous)."""
    session = make_session()
    session.dispatch('{"kind":"ack","ids":[1,99]}')
    session.dispatch('{"kind":"heartbeat","ts":5}')
    session.dispatch(
        msgspec.msgpack.encode({"kind": "publish", "ref": 3, "body": b"x", "queue": "q"})
    )
    session.dispatch('{"kind":"publish","ref":4,"body":"","queue":"slow"}')  # queued
    session.dispatch('{"kind":"publish","ref":5,"body":"","queue":"slow"}')  # queue full
    session.dispatch('{"kind":"pull","max":0}')
    session.dispatch('{"kind":"pull","max":2}')
    session.dispatch('{"kind":"pull","max":2}')
    got = answers(session)
    assert [type(f).__name__ for f in got] == [
        "Error",
        "Heartbeat",
        "Published",
        "Published",
        "Error",
        "Error",
    ]
    assert isinstance(got[0], p.Error) and got[0].code == "unknown_delivery"
    assert got[0].ids == [99]
    assert isinstance(got[2], p.Published) and got[2].ok and got[2].ref == 3
    # Only beyond the queue is a publish throttled, told to wait for the queue ahead of it
    # (one queued, one more: 2 / 4 per second).
    assert isinstance(got[3], p.Published) and got[3].ref == 5
    assert got[3].throttled and got[3].retry_after == 0.5
    assert isinstance(got[4], p.Error) and got[4].code == "invalid_pull"
    assert isinstance(got[5], p.Error) and got[5].code == "pull_in_progress"


# --- regressions: inputs the fuzz found that once escaped validation ------------------------


def test_invalid_utf8_in_msgpack_is_malformed() -> None:
    """msgspec raises UnicodeDecodeError (not DecodeError) for a MessagePack str that is not
    UTF-8; it must be refused as malformed, not escape into the agent server."""
    with pytest.raises(p.ProtocolError) as caught:
        CODEC.decode_agent(b"\x81\xa4kind\xa4\xff\xfe\xfd\xfc")
    assert caught.value.code == "malformed"


def test_error_ref_beyond_64_bits_is_encodable() -> None:
    """A JSON text frame may carry any integer; ids beyond 64 bits are refused at decode, so
    every answer (which may echo the id as ``ref``) stays encodable as MessagePack."""
    session = make_session()
    session.dispatch('{"kind":"fail","id":18446744073709551616,"reason":"TIMEOUT"}')
    for frame in answers(session):
        CODEC.encode(frame, binary=True)


def test_nan_extend_is_refused() -> None:
    """MessagePack carries NaN; ``seconds <= 0`` is False for NaN, so a NaN deadline once
    reached the engine's deadline watcher."""
    session = make_session()
    session.dispatch(msgspec.msgpack.encode({"kind": "extend", "ids": [1], "seconds": math.nan}))
    codes = [f.code for f in answers(session) if isinstance(f, p.Error)]
    assert codes == ["invalid_extend"]


def test_a_late_frame_to_a_closing_session_is_dropped_not_raised() -> None:
    """Found by the chaos test: a deadline expiring just as its agent disconnected sent a
    notice to a session whose writer had gone; the BrokenResourceError escaped the deadline
    watcher and stopped the whole sidecar."""
    session = make_session()
    session._outbox.close()  # the writer has finished; the session is closing
    session.send(p.Error(code="deadline_expired", message="late", ref=7))
    session.send(p.Heartbeat())


# --- nesting depth and sizes -------------------------------------------------------------
# Frames nested far past the documented limit (protocol.MAX_DEPTH) anywhere, in known and
# unknown fields, in both encodings: refused as malformed, never a RecursionError. And the
# session answers every such frame with an encodable error, headers included.


def nested(depth: int, shape: str) -> Any:
    value: Any = 1
    for level in range(depth):
        as_list = shape == "list" or (shape == "mixed" and level % 2)
        value = [value] if as_list else {"k": value}
    return value


@settings(max_examples=300, **FAST)
@given(
    kind=st.sampled_from(sorted(p.AGENT_KINDS)),
    field=st.sampled_from([*FIELDS, "unknown_field"]),
    depth=st.integers(min_value=1, max_value=3000) | st.integers(min_value=28, max_value=36),
    shape=st.sampled_from(["list", "map", "mixed"]),
    binary=st.booleans(),
)
def test_any_nesting_depth_is_decoded_or_malformed(
    kind: str, field: str, depth: int, shape: str, binary: bool
) -> None:
    # Written out here, not drawn or encoded: both would recurse on a deep value.
    levels = [shape == "list" or (shape == "mixed" and i % 2) for i in range(depth)]
    data: bytes | str
    if binary:
        head = b"\x82" + msgspec.msgpack.encode("kind") + msgspec.msgpack.encode(kind)
        opened = b"".join(b"\x91" if as_list else b"\x81\xa1k" for as_list in levels)
        data = head + msgspec.msgpack.encode(field) + opened + b"\x01"
    else:
        opened_text = "".join("[" if as_list else '{"k":' for as_list in levels)
        closed = "".join("]" if as_list else "}" for as_list in reversed(levels))
        data = f'{{"kind":"{kind}","{field}":{opened_text}1{closed}}}'
    frame = check_decode(data)
    if frame is not None:
        assert depth + 1 <= p.MAX_DEPTH or binary  # JSON deeper than the limit never decodes
    # The session answers it too, encodably, without raising.
    session = make_session()
    session.dispatch(data)
    for answer in answers(session):
        CODEC.encode(answer, binary=True)
        CODEC.encode(answer, binary=False)


@settings(max_examples=200, **FAST)
@given(
    depth=st.integers(min_value=1, max_value=200),
    binary=st.booleans(),
)
def test_publish_headers_deeper_than_the_limit_are_refused(depth: int, binary: bool) -> None:
    obj = {
        "kind": "publish",
        "ref": 1,
        "body": b"" if binary else "",
        "queue": "q",
        "headers": {"h": nested(depth, "list")},
    }
    data = msgspec.msgpack.encode(obj) if binary else msgspec.json.encode(obj).decode()
    session = make_session()
    session.dispatch(data)
    (answer,) = answers(session)
    frame_depth = depth + 2  # the frame, then headers, then the lists
    if frame_depth <= p.MAX_DEPTH:
        assert isinstance(answer, p.Published), answer
    else:
        assert isinstance(answer, p.Error) and answer.code in ("malformed", "invalid_publish")


@settings(max_examples=40, **FAST)
@given(
    size=st.integers(min_value=0, max_value=2 * 1024 * 1024),
    filler=st.sampled_from(["a", "[", "{", '"', "\\", "\u00e9", "a@", "'"]),
    binary=st.booleans(),
)
def test_large_frames_of_hostile_characters(size: int, filler: str, binary: bool) -> None:
    """Big frames made of what the depth scan and the error signature rules look at:
    decoded or malformed, in one pass (a quadratic scan would time out the suite)."""
    text = filler * (size // len(filler.encode()) or 1)
    for obj in (
        {"kind": "fail", "id": 1, "reason": "TIMEOUT", "error": text},
        {"kind": "publish", "ref": 1, "body": b"", "queue": "q", "routing_key": text[:300]},
    ):
        data = msgspec.msgpack.encode(obj) if binary else msgspec.json.encode(obj).decode()
        check_decode(data)
        session = make_session()
        session.dispatch(data)
        for answer in answers(session):
            CODEC.encode(answer, binary=binary)
    raw = text if not binary else text.encode()
    check_decode(raw)
