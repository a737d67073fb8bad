"""The broker adapter's own frame parser and publisher (sidecar.adapters.fast_amqp), without
a broker: frames are built with pamqp and fed through a StreamReader in every split.

The first tests fail loudly when aiormq or pamqp change an internal the fast path relies on:
upgrading past the versions it was written for must be a decision, not a surprise."""

from __future__ import annotations

import asyncio
import enum
import inspect
import struct
import time
from collections import OrderedDict
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from importlib.metadata import version
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import FrameReceiver
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from sidecar.adapters import amqp_decode, fast_amqp
from sidecar.adapters.broker import _settle_frames  # installs the tolerant decoders
from sidecar.adapters.fast_amqp import (
    FastConnection,
    Nacked,
    Publisher,
    Returned,
)
from sidecar.core.messages import Inbound

# --- the internals the fast path relies on --------------------------------------------


def test_versions_are_the_ones_the_fast_path_was_written_for() -> None:
    assert fast_amqp.versions_supported(), (
        f"aiormq {version('aiormq')} / pamqp {version('pamqp')}: the fast receive path "
        "reaches into aiormq's internals; re-check sidecar/adapters/fast_amqp.py against "
        "the new aiormq.connection / aiormq.channel before widening SUPPORTED_*"
    )


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    # An explicit selector loop: trio_asyncio (imported by other tests) swaps the policy.
    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def test_aiormq_connection_internals_are_where_the_fast_path_expects() -> None:
    async def build() -> aiormq.Connection:
        return aiormq.Connection("amqp://guest:guest@127.0.0.1/?heartbeat=0")

    connection = _run(build())
    for name in fast_amqp.CONNECTION_INTERNALS:
        assert hasattr(connection, name), f"aiormq.Connection lost {name}"
    # The reader is what connect() starts with the handshake's FrameReceiver, by this name.
    connect_source = inspect.getsource(aiormq.Connection.connect)
    assert "self.__reader(frame_receiver)" in connect_source
    assert "FrameReceiver(reader)" in connect_source
    reader = aiormq.Connection._Connection__reader  # type: ignore[attr-defined]
    assert list(inspect.signature(reader).parameters) == ["self", "frame_receiver"]
    assert "reader" in inspect.signature(FrameReceiver).parameters
    # What the reader must keep doing in aiormq's place.
    reader_source = inspect.getsource(reader)
    for duty in ("connection_unblocked.set()", "connected.set()", "__heartbeat()"):
        assert duty in reader_source, f"aiormq's reader no longer does {duty}"
    assert "await ch.frames.put((weight, frame))" in reader_source
    # ``send`` writes past the queue only when it is empty: that is safe because aiormq's
    # writer writes each frame it takes from the queue with no await in between.
    writer_source = inspect.getsource(aiormq.Connection._Connection__writer)  # type: ignore[attr-defined]
    assert "async for channel_frame in frame_iterator:" in writer_source
    assert "writer.write(channel_frame.payload)" in writer_source
    generator_source = inspect.getsource(aiormq.connection.FrameGenerator.__anext__)
    assert "await self.queue.get()" in generator_source
    for handler in ("CloseOk", "Close", "Heartbeat", "Blocked", "Unblocked", "UpdateSecretOk"):
        assert f"{handler}()" in reader_source
    assert {f.name for f in ChannelFrame.__dataclass_fields__.values()} == {
        "payload",
        "should_close",
        "drain_future",
    }


def test_aiormq_channel_and_pamqp_internals_are_where_the_fast_path_expects() -> None:
    channel_init = inspect.getsource(aiormq.Channel.__init__)
    for attribute in ("self.frames", "self.number", "self.max_content_size", "self.consumers"):
        assert attribute in channel_init
    assert "consumer_tag" in inspect.signature(aiormq.Channel.basic_consume).parameters
    assert (spec.Basic.Deliver.index, spec.Basic.Ack.index) == (0x003C003C, 0x003C0050)
    assert (spec.Basic.Nack.index, spec.Basic.Return.index) == (0x003C0078, 0x003C0032)
    assert spec.Basic.Publish.index == 0x003C0028
    assert list(spec.Basic.Properties.__slots__) == [p[0] for p in fast_amqp._PROPERTIES]
    assert {"shortstr", "table", "octet", "timestamp"} <= set(pamqp_decode.METHODS)


# --- the receive path ------------------------------------------------------------------


class _Receiver:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader


def _frames(*frames: tuple[int, Any]) -> bytes:
    return b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in frames)


def _delivery(
    channel: int, tag: int, body: bytes, props: spec.Basic.Properties, max_body: int = 4096
) -> bytes:
    frames: list[tuple[int, Any]] = [
        (
            channel,
            spec.Basic.Deliver(
                consumer_tag="ct", delivery_tag=tag, exchange="ex", routing_key=f"rk{tag}"
            ),
        ),
        (channel, ContentHeader(0, len(body), props)),
    ]
    frames += [
        (channel, ContentBody(body[i : i + max_body])) for i in range(0, len(body), max_body)
    ]
    return _frames(*frames)


async def _read(
    chunks: list[bytes], channel: int = 1, reads: list[int] | None = None
) -> tuple[list[Inbound], FastConnection]:
    """What the parser delivers from ``chunks``; ``reads`` gets, per read, how many
    deliveries had been handed over when that read's frames were done."""
    connection = FastConnection("amqp://guest:guest@127.0.0.1/?heartbeat=0")
    got: list[Inbound] = []
    connection.consume_fast(channel, "ct", got.append, queue="q1", generation=7)
    if reads is not None:
        connection.after_read = lambda: reads.append(len(got))
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    await connection._Connection__reader(_Receiver(reader))
    return got, connection


def _summary(deliveries: list[Inbound]) -> list[tuple[Any, ...]]:
    return [
        (
            d.tag,
            d.redelivered,
            d.exchange,
            d.routing_key,
            d.body,
            d.props.headers,
            d.props.message_id,
            d.props.timestamp,
            d.props.delivery_mode,
        )
        for d in deliveries
    ]


def test_deliveries_come_out_whole_however_the_reads_split_them() -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    stream = b"".join(
        [
            _delivery(1, 1, b"a" * 200, spec.Basic.Properties(message_id="m1", delivery_mode=2)),
            _frames((0, Heartbeat())),
            _delivery(1, 2, b"", spec.Basic.Properties(headers={"x": [1, "two", {"d": 3.5}]})),
            _delivery(1, 3, bytes(range(256)) * 40, spec.Basic.Properties(timestamp=stamp), 1000),
        ]
    )
    whole, _ = _run(_read([stream]))
    (stamped,) = [d for d in whole if d.tag == 3]
    assert stamped.props.timestamp == stamp
    assert _summary(whole)[:2] == [
        (1, False, "ex", "rk1", b"a" * 200, {}, "m1", None, 2),
        (2, False, "ex", "rk2", b"", {"x": [1, "two", {"d": 3.5}]}, None, None, None),
    ]
    assert {(d.queue, d.generation) for d in whole} == {("q1", 7)}
    assert whole[2].body == bytes(range(256)) * 40
    # Every split point of the stream in two, and a byte at a time.
    for cut in range(0, len(stream), 7):
        split, _ = _run(_read([stream[:cut], stream[cut:]]))
        assert _summary(split) == _summary(whole), cut
    trickle, _ = _run(_read([stream[i : i + 1] for i in range(len(stream))]))
    assert _summary(trickle) == _summary(whole)


def test_a_whole_delivery_for_an_unknown_consumer_is_dropped_and_the_next_served() -> None:
    stranger = _frames(
        (1, spec.Basic.Deliver(consumer_tag="other", delivery_tag=1, exchange="", routing_key="k")),
        (1, ContentHeader(0, 1, spec.Basic.Properties())),
        (1, ContentBody(b"s")),
    )
    got, _ = _run(_read([stranger + _delivery(1, 2, b"mine", spec.Basic.Properties())]))
    assert [(d.tag, d.body) for d in got] == [(2, b"mine")]


def test_deliveries_of_one_read_are_handed_over_before_its_after_read_hook() -> None:
    first = _delivery(1, 1, b"a", spec.Basic.Properties()) + _delivery(
        1, 2, b"b", spec.Basic.Properties()
    )
    second = _delivery(1, 3, b"c", spec.Basic.Properties())
    reads: list[int] = []
    got, _ = _run(_read([first, second[:10], second[10:]], reads=reads))
    assert [d.tag for d in got] == [1, 2, 3]
    # Once per read that was handled: two deliveries after the first, the third only once
    # its last bytes arrived. (A StreamReader fed ahead may hand several chunks to one read.)
    assert reads[0] in (2, 3) and reads[-1] == 3 and reads == sorted(reads)


def test_properties_become_message_props_as_the_agent_gets_them() -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    wire = spec.Basic.Properties(
        content_type="text/plain",
        content_encoding="gzip",
        headers={"h": 1},
        delivery_mode=2,
        priority=5,
        correlation_id="c",
        reply_to="r",
        expiration="1000",
        message_id="m",
        timestamp=stamp,
        message_type="t",
        user_id="guest",
        app_id="a",
    )
    got, _ = _run(_read([_delivery(1, 1, b"x", wire), _delivery(1, 2, b"y", wire)]))
    props = got[0].props
    assert props.as_dict() == {
        "message_id": "m",
        "content_type": "text/plain",
        "content_encoding": "gzip",
        "correlation_id": "c",
        "reply_to": "r",
        "priority": 5,
        "delivery_mode": 2,
        "type": "t",
        "app_id": "a",
    }
    assert props.headers == {"h": 1} and props.timestamp == stamp
    assert props.expiration == "1000"
    # Each message has its own props and headers: the ledger may change one's headers.
    assert got[1].props == props and got[1].props is not props
    assert got[1].props.headers is not props.headers


def test_placeholder_text_in_properties_is_plain_text() -> None:
    amqp_decode.take_repairs()
    bad = b"\x02\xff\xfe"
    # A message_id whose bytes are not UTF-8, then a timestamp no datetime can hold.
    block = bad + struct.pack(">Q", 2**63)
    flags = spec.Basic.Properties.flags
    payload = struct.pack(">HHQH", 60, 0, 1, flags["message_id"] | flags["timestamp"]) + block
    header = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    deliver = _frames(
        (1, spec.Basic.Deliver(consumer_tag="ct", delivery_tag=1, exchange="", routing_key="k"))
    )
    got, _ = _run(_read([deliver + header + _frames((1, ContentBody(b"z")))]))
    (message,) = got
    assert type(message.props.message_id) is str and "unreadable" in message.props.message_id
    assert message.props.timestamp is None
    assert amqp_decode.take_repairs() == 2


def test_a_property_block_that_cannot_be_decoded_costs_only_its_properties() -> None:
    good = _delivery(1, 2, b"fine", spec.Basic.Properties(message_id="ok"))
    # Flags announce headers, and the table holds a field of an unknown type ("?").
    table = b"\x01k?" + b"zzzz"
    block = struct.pack(">I", len(table)) + table
    payload = struct.pack(">HHQH", 60, 0, 3, 0x2000) + block
    header = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    deliver = _frames(
        (1, spec.Basic.Deliver(consumer_tag="ct", delivery_tag=1, exchange="", routing_key="k"))
    )
    body = _frames((1, ContentBody(b"bad")))
    amqp_decode.take_repairs()
    got, _ = _run(_read([deliver + header + body + good]))
    assert [d.body for d in got] == [b"bad", b"fine"]
    assert fast_amqp.UNREADABLE_PROPERTIES in got[0].props.headers
    assert got[1].props.message_id == "ok"
    assert amqp_decode.take_repairs() >= 1


def test_a_routing_key_that_is_not_utf8_is_a_placeholder_not_an_error() -> None:
    method = struct.pack(">I", spec.Basic.Deliver.index) + b"\x02ct" + struct.pack(">QB", 9, 1)
    method += b"\x00" + b"\x02\xff\xfe"
    deliver = struct.pack(">BHI", 1, 1, len(method)) + method + b"\xce"
    header = _frames((1, ContentHeader(0, 0, spec.Basic.Properties())))
    got, _ = _run(_read([deliver + header]))
    (delivery,) = got
    assert delivery.tag == 9 and delivery.redelivered
    # Plain text (a placeholder), so it can be carried to the agent in a frame.
    assert type(delivery.routing_key) is str and "unreadable" in delivery.routing_key


@pytest.mark.parametrize(
    "stream",
    [
        struct.pack(">BHI", 3, 1, 2**31) + b"x" * 16,  # beyond the negotiated frame size
        struct.pack(">BHI", 3, 1, 1) + b"x" + b"\x00",  # no frame end marker
        _frames(
            (1, spec.Basic.Deliver(consumer_tag="ct", delivery_tag=1, exchange="", routing_key="k"))
        )
        + _frames(
            (1, spec.Basic.Deliver(consumer_tag="ct", delivery_tag=2, exchange="", routing_key="k"))
        ),  # no content
        # Whole deliveries in one read whose header or body frame is broken: the one-go
        # path leaves them to the frame-by-frame one, which reports them.
        _frames(
            (1, spec.Basic.Deliver(consumer_tag="ct", delivery_tag=1, exchange="", routing_key="k"))
        )
        + _frames((1, ContentHeader(0, 3, spec.Basic.Properties())))[:-1]
        + b"\x00"
        + _frames((1, ContentBody(b"abc"))),  # the header's end marker
        _delivery(1, 1, b"abc", spec.Basic.Properties())[:-1] + b"\x00" + b"\x00" * 8,  # body's
        _frames(
            (
                1,
                spec.Basic.Deliver(consumer_tag="ct", delivery_tag=1, exchange="", routing_key="k"),
            ),
            (1, ContentHeader(0, 3, spec.Basic.Properties())),
            (1, ContentBody(b"abcd")),
        ),  # a body longer than announced
    ],
)
def test_a_broken_frame_stream_is_a_connection_error_not_a_hang(stream: bytes) -> None:
    with pytest.raises(aiormq.exceptions.AMQPError):
        _run(_read([stream]))


def test_eof_inside_a_frame_is_an_error_and_between_frames_is_the_end() -> None:
    stream = _delivery(1, 1, b"x", spec.Basic.Properties())
    got, _ = _run(_read([stream]))
    assert len(got) == 1
    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        _run(_read([stream[:-3]]))


# --- the publisher ---------------------------------------------------------------------


class _Channel:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.number = 5
        self.max_content_size = 100
        self.closing: asyncio.Future[Any] = loop.create_future()


def test_publishes_go_out_as_one_write_and_confirms_settle_each_once() -> None:
    async def scenario() -> dict[str, Any]:
        connection = FastConnection("amqp://guest:guest@127.0.0.1/?heartbeat=0")
        channel = _Channel(asyncio.get_running_loop())
        publisher = Publisher(connection, channel)
        outcomes: dict[int, list[BaseException | None]] = {}

        def publish(n: int, body: bytes = b"b") -> None:
            publisher.publish(
                body,
                exchange="",
                routing_key=f"q{n}",
                properties=spec.Basic.Properties(message_id=f"m{n}"),
                mandatory=True,
                on_done=lambda error: outcomes.setdefault(n, []).append(error),
            )

        for n in range(1, 6):
            publish(n, b"x" * 250 if n == 2 else b"b")
        with pytest.raises(TypeError):  # what the broker adapter reports as UNENCODABLE
            publisher.publish(
                b"x",
                exchange="e" * 300,  # a short string cannot carry it
                routing_key="",
                properties=spec.Basic.Properties(),
                mandatory=True,
                on_done=lambda error: None,
            )
        publisher.flush()
        assert connection.write_queue.qsize() == 1
        written: ChannelFrame = connection.write_queue.get_nowait()
        frames = []
        data = written.payload
        while data:
            used, number, frame = pamqp.frame.unmarshal(data)
            assert number == 5
            frames.append(frame)
            data = data[used:]
        publishes = [f for f in frames if isinstance(f, spec.Basic.Publish)]
        assert [p.routing_key for p in publishes] == [f"q{n}" for n in range(1, 6)]
        assert all(p.mandatory for p in publishes)
        assert sum(isinstance(f, ContentBody) for f in frames) == 7  # 250 B in 3 parts
        # The broker returns #3 (unroutable), acks 1..3 at once, nacks 4, acks 5.
        returned = _frames(
            (5, spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="q3")),
            (5, ContentHeader(0, 1, spec.Basic.Properties(message_id="m3"))),
            (5, ContentBody(b"b")),
            (5, spec.Basic.Ack(delivery_tag=3, multiple=True)),
            (5, spec.Basic.Nack(delivery_tag=4)),
            (5, spec.Basic.Ack(delivery_tag=5)),
            (5, spec.Basic.Ack(delivery_tag=5)),  # a duplicate is ignored
        )
        assert await connection._frames(returned, 1 << 20) == len(returned)
        return {"outcomes": outcomes, "pending": dict(publisher.pending)}

    result = _run(scenario())
    outcomes = result["outcomes"]
    assert outcomes[1] == [None] and outcomes[2] == [None] and outcomes[5] == [None]
    (ret,) = outcomes[3]
    assert isinstance(ret, Returned) and ret.reply_code == 312
    (nack,) = outcomes[4]
    assert isinstance(nack, Nacked)
    assert result["pending"] == {}


def test_a_closed_channel_fails_every_unconfirmed_publish_once() -> None:
    async def scenario() -> list[Any]:
        connection = FastConnection("amqp://guest:guest@127.0.0.1/?heartbeat=0")
        channel = _Channel(asyncio.get_running_loop())
        publisher = Publisher(connection, channel)
        outcomes: list[Any] = []
        for _ in range(3):
            publisher.publish(
                b"b",
                exchange="gone",
                routing_key="k",
                properties=spec.Basic.Properties(),
                mandatory=True,
                on_done=outcomes.append,
            )
        publisher.flush()
        await connection._frames(_frames((5, spec.Basic.Ack(delivery_tag=1))), 1 << 20)
        channel.closing.set_exception(aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND"))
        await asyncio.sleep(0)
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            publisher.publish(
                b"b",
                exchange="",
                routing_key="k",
                properties=spec.Basic.Properties(),
                mandatory=True,
                on_done=outcomes.append,
            )
        return outcomes

    outcomes = _run(scenario())
    assert outcomes[0] is None
    assert [type(o) for o in outcomes[1:]] == [aiormq.exceptions.ChannelNotFoundEntity] * 2


def test_lingering_publishes_leave_together_or_with_the_next_immediate_write() -> None:
    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        connection = FastConnection("amqp://guest:guest@127.0.0.1/?heartbeat=0", loop=loop)
        publisher = Publisher(connection, _Channel(loop))
        outcomes: list[BaseException | None] = []

        def publish(routing_key: str) -> None:
            publisher.publish(
                b"b",
                exchange="",
                routing_key=routing_key,
                properties=spec.Basic.Properties(),
                mandatory=True,
                on_done=outcomes.append,
            )

        seen: dict[str, Any] = {}
        # Lingering copies wait for their timer: nothing is written until it fires.
        publish("tier-1")
        publisher.flush_later(0)
        publish("tier-2")
        publisher.flush_later(0)  # already pending: still one timer
        seen["before_timer"] = connection.write_queue.qsize()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen["timer_writes"] = connection.write_queue.qsize()
        seen["timer_keys"] = _routing_keys(connection.write_queue.get_nowait())
        # An immediate flush (an agent's publish) takes a waiting copy along.
        publish("tier-3")
        publisher.flush_later(3600)
        publish("agent")
        publisher.flush()
        seen["flush_keys"] = _routing_keys(connection.write_queue.get_nowait())
        # A closed channel cancels the timer and fails what is unconfirmed, once.
        publish("tier-4")
        publisher.flush_later(3600)
        timer = publisher._flush_timer
        publisher.fail_all(aiormq.exceptions.ChannelInvalidStateError("closed"))
        seen["timer_cancelled"] = timer is not None and timer.cancelled()
        seen["failed"] = sum(isinstance(o, BaseException) for o in outcomes)
        seen["left"] = connection.write_queue.qsize()
        return seen

    seen = _run(scenario())
    assert seen["before_timer"] == 0
    assert seen["timer_writes"] == 1 and seen["timer_keys"] == ["tier-1", "tier-2"]
    assert seen["flush_keys"] == ["tier-3", "agent"]
    assert seen["timer_cancelled"] and seen["failed"] == 5 and seen["left"] == 0


def _routing_keys(written: ChannelFrame) -> list[str]:
    keys, data = [], written.payload
    while data:
        used, _channel, frame = pamqp.frame.unmarshal(data)
        if isinstance(frame, spec.Basic.Publish):
            keys.append(frame.routing_key)
        data = data[used:]
    return keys


def test_settle_frames_are_the_acks_and_nacks_aiormq_would_send() -> None:
    blob = _settle_frames(3, [(7, True, False), (9, False, True), (10, False, False)])
    frames = []
    while blob:
        used, channel, frame = pamqp.frame.unmarshal(blob)
        assert channel == 3
        frames.append(frame)
        blob = blob[used:]
    assert [(type(f).__name__, f.delivery_tag, f.multiple) for f in frames] == [
        ("Ack", 7, True),
        ("Nack", 9, False),
        ("Ack", 10, False),
    ]
    assert frames[1].requeue is True


# --- the property encoder: byte for byte what pamqp writes ----------------------------


class _Level(enum.IntEnum):
    HIGH = 300


def _pamqp_frame(properties: spec.Basic.Properties, body_size: int = 200) -> bytes:
    return pamqp.frame.marshal(ContentHeader(0, body_size, properties), 7)


def _same_as_pamqp(properties: spec.Basic.Properties) -> bytes:
    """The fast frame, asserted equal to pamqp's (or raising what pamqp raises)."""
    try:
        expected = _pamqp_frame(properties)
    except Exception as exc:
        with pytest.raises(type(exc)):
            fast_amqp.content_header_frame(7, 200, properties)
        return b""
    got = fast_amqp.content_header_frame(7, 200, properties)
    assert got == expected
    return got


_WIDE_TABLE: dict[str, Any] = {
    # ints at every width boundary pamqp chooses between
    **{
        f"int{i}": n
        for i, n in enumerate(
            (
                0,
                1,
                -1,
                127,
                128,
                -128,
                -129,
                255,
                256,
                32767,
                32768,
                -32768,
                -32769,
                65535,
                65536,
                2**31 - 1,
                2**31,
                -(2**31),
                -(2**31) - 1,
                2**32 - 1,
                2**32,
                2**63 - 1,
                -(2**63),
            )
        )
    },
    "float": 1.5,
    "float-big": 3.5e300,  # beyond single precision: a double, as amqp_decode writes it
    "float-neg": -0.0,
    "float-inf": float("inf"),
    "decimal": Decimal("3.14159"),
    "decimal-int": Decimal("12E+2"),
    "decimal-neg": Decimal("-0.001"),
    "ts-naive": datetime(2026, 12, 4, 16, 0, 0),
    "ts-aware": datetime(2026, 12, 4, 16, 0, 0, 999, tzinfo=UTC),
    "ts-offset": datetime(2026, 12, 4, 18, 0, tzinfo=timezone(timedelta(hours=2))),
    "ts-struct": time.gmtime(1_700_000_000),
    "bytes": b"\xff\xfe not utf-8",
    "bytearray": bytearray(b"\x00\x01\x02"),
    "true": True,
    "false": False,
    "none": None,
    "empty-str": "",
    "long-str": "x" * 70_000,
    "non-ascii": "héllo wörld ✓ 𝄞 日本語",
    "unreadable": amqp_decode.Unreadable("<unreadable timestamp>"),
    "int-enum": _Level.HIGH,
    "empty-table": {},
    "empty-array": [],
    "nested": {
        "b": [1, "two", 3.0, None, True, {"deep": [[], [{"x": b"y"}], {"z": Decimal("1.5")}]}],
        "a": {"ü-key": "ü-value", "n": -(2**40)},
    },
    "x-death": [
        {
            "count": 2,
            "reason": "expired",
            "queue": "sidecar.retry.q.50",
            "time": datetime(2026, 12, 4, 16, 0, tzinfo=UTC),
            "exchange": "",
            "routing-keys": ["sidecar.retry.q.50"],
            "original-expiration": "50",
        }
    ],
    "ключ": "non-ASCII key",
    "k" * 128: "a key of exactly 128 bytes",
}


def test_the_property_encoder_writes_what_pamqp_writes_for_a_wide_table() -> None:
    properties = spec.Basic.Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers=_WIDE_TABLE,
        delivery_mode=2,
        priority=9,
        correlation_id="c-é",
        reply_to="amq.rabbitmq.reply-to",
        expiration="100",
        message_id="m" * 255,
        timestamp=datetime(2026, 12, 4, 16, 0, tzinfo=UTC),
        message_type="t",
        user_id="guest",
        app_id="app",
    )
    frame = _same_as_pamqp(properties)
    # ... and by the fast path itself, not by falling back to pamqp.
    assert fast_amqp._fast_properties(properties) == properties.marshal()
    # It decodes back: the frame is a real content header.
    _used, channel, header = pamqp.frame.unmarshal(frame)
    assert channel == 7 and isinstance(header, ContentHeader) and header.body_size == 200
    assert header.properties.headers["non-ascii"] == _WIDE_TABLE["non-ascii"]
    for each in (
        spec.Basic.Properties(),
        spec.Basic.Properties(headers={}, message_id=""),  # {} is written, '' is not
        spec.Basic.Properties(headers={"only": 1}, delivery_mode=1),
        spec.Basic.Properties(timestamp=datetime(2026, 1, 1)),
    ):
        assert _same_as_pamqp(each)


@pytest.mark.parametrize(
    "properties",
    [
        spec.Basic.Properties(headers={"k" * 129: "over-long key: pamqp truncates it"}),
        spec.Basic.Properties(headers={"ü" * 70: "over-long once encoded"}),
        spec.Basic.Properties(headers={"nested": {"k" * 200: 1}}),
        spec.Basic.Properties(headers={1: "a key that is not text"}),  # type: ignore[dict-item]
        spec.Basic.Properties(headers={"big": 2**64}),
        spec.Basic.Properties(headers={"obj": object()}),
        spec.Basic.Properties(headers={"nan": Decimal("NaN")}),
        spec.Basic.Properties(headers={"surrogate": "\ud800"}),
        spec.Basic.Properties(headers={"\ud800": "surrogate key"}),
        spec.Basic.Properties(headers={"pre-epoch": datetime(1960, 1, 1)}),
        spec.Basic.Properties(headers={"ordered": OrderedDict(b=1, a=2)}),
        spec.Basic.Properties(message_id="m" * 256),
        spec.Basic.Properties(message_id=b"bytes"),  # type: ignore[arg-type]
        spec.Basic.Properties(priority=256),
        spec.Basic.Properties(delivery_mode=True),  # type: ignore[arg-type]
        spec.Basic.Properties(correlation_id=amqp_decode.Unreadable("<unreadable>")),
        spec.Basic.Properties(timestamp=time.gmtime(0)),  # type: ignore[arg-type]
    ],
    ids=lambda p: repr(p)[:60],
)
def test_what_the_fast_encoder_does_not_handle_is_pamqps_bytes_or_pamqps_error(
    properties: spec.Basic.Properties,
) -> None:
    _same_as_pamqp(properties)


def test_the_fast_encoder_hands_unhandled_blocks_to_pamqp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[spec.Basic.Properties] = []
    marshal = spec.Basic.Properties.marshal

    def counted(self: spec.Basic.Properties) -> bytes:
        calls.append(self)
        return marshal(self)

    monkeypatch.setattr(spec.Basic.Properties, "marshal", counted)
    fast_amqp.encode_properties(spec.Basic.Properties(headers={"a": [1, {"b": "c"}]}))
    assert calls == []  # the fast path wrote it
    over_long = spec.Basic.Properties(headers={"k" * 129: 1})
    fast_amqp.encode_properties(over_long)
    assert calls == [over_long]
    monkeypatch.setattr(amqp_decode, "_installed", False)
    plain = spec.Basic.Properties(headers={"f": 1.5})
    # Without amqp_decode's encoder pamqp writes a float in single precision: pamqp decides.
    assert fast_amqp.encode_properties(plain) == marshal(plain)
    assert calls[-1] is plain


_KEYS = st.text(max_size=40)
_SCALARS = st.one_of(
    st.text(max_size=300),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.binary(max_size=50),
    st.binary(max_size=20).map(bytearray),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9000, 1, 1)),
    st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(_KEYS, inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.one_of(st.none(), st.dictionaries(_KEYS, _VALUES, max_size=8)),
    message_id=st.one_of(st.none(), st.text(max_size=300)),
    priority=st.one_of(st.none(), st.integers(min_value=-5, max_value=300)),
    timestamp=st.one_of(st.none(), st.datetimes(min_value=datetime(1971, 1, 1))),
)
def test_any_header_table_encodes_as_pamqp_encodes_it(
    headers: dict[str, Any] | None,
    message_id: str | None,
    priority: int | None,
    timestamp: datetime | None,
) -> None:
    _same_as_pamqp(
        spec.Basic.Properties(
            headers=headers, message_id=message_id, priority=priority, timestamp=timestamp
        )
    )


def test_a_publish_carries_the_content_header_pamqp_would_write() -> None:
    async def scenario() -> bytes:
        connection = FastConnection("amqp://guest:guest@127.0.0.1/?heartbeat=0")
        publisher = Publisher(connection, _Channel(asyncio.get_running_loop()))
        publisher.publish(
            b"body",
            exchange="",
            routing_key="q",
            properties=spec.Basic.Properties(message_id="m1", headers=_WIDE_TABLE),
            mandatory=True,
            on_done=lambda error: None,
        )
        publisher.flush()
        written: ChannelFrame = connection.write_queue.get_nowait()
        return written.payload

    payload = _run(scenario())
    used, _channel, _method = pamqp.frame.unmarshal(payload)
    header = pamqp.frame.marshal(
        ContentHeader(0, 4, spec.Basic.Properties(message_id="m1", headers=_WIDE_TABLE)), 5
    )
    assert payload[used : used + len(header)] == header


# --- the header table decoder: pamqp's values, or the tolerant decoders decide ---------


def _tolerant_table(data: bytes) -> Any:
    """What the receive path decoded a table with before: pamqp + amqp_decode."""
    return pamqp_decode.METHODS["table"](data)


_DECODABLE = st.recursive(
    st.one_of(
        st.text(max_size=300),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False),
        st.booleans(),
        st.none(),
        st.binary(max_size=20).map(bytearray),
        st.decimals(allow_nan=False, allow_infinity=False, places=3).filter(
            lambda d: abs(d) < 2_000_000
        ),
        st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ).map(lambda d: d.replace(microsecond=0)),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=20), inner, max_size=5)
    ),
    max_leaves=25,
)


def test_the_table_decoder_reads_what_pamqp_reads_for_a_wide_table() -> None:
    table = {k: v for k, v in _WIDE_TABLE.items() if k != "ts-struct"}
    encoded = pamqp_encode.field_table(table) + b"trailing bytes are not the table's"
    expected = _tolerant_table(encoded)
    assert fast_amqp._fast_table(encoded, 0, len(encoded)) == expected
    assert expected[1]["non-ascii"] == _WIDE_TABLE["non-ascii"]
    # A whole content header decodes the same through the receive path.
    props = spec.Basic.Properties(headers=table, message_id="m", delivery_mode=2)
    block = props.marshal()
    flags = struct.unpack(">H", block[:2])[0]
    decoded = fast_amqp.decode_properties(flags, block[2:])
    assert decoded.headers == expected[1] and decoded.message_id == "m"


@settings(max_examples=300, deadline=None)
@given(table=st.dictionaries(st.text(max_size=40), _DECODABLE, max_size=8))
def test_any_well_formed_table_decodes_as_pamqp_decodes_it(table: dict[str, Any]) -> None:
    encoded = pamqp_encode.field_table(table)
    assert fast_amqp._fast_table(encoded, 0, len(encoded)) == _tolerant_table(encoded)


@settings(max_examples=500, deadline=None)
@given(
    table=st.dictionaries(st.text(max_size=10), _DECODABLE, max_size=4),
    cut=st.integers(min_value=0, max_value=400),
    flip=st.integers(min_value=0, max_value=400),
    byte=st.integers(min_value=0, max_value=255),
)
def test_a_damaged_table_is_pamqps_value_or_left_to_the_tolerant_decoders(
    table: dict[str, Any], cut: int, flip: int, byte: int
) -> None:
    data = bytearray(pamqp_encode.field_table(table))
    if flip < len(data):
        data[flip] = byte
    damaged = bytes(data[: max(cut, 4)])
    try:
        fast = fast_amqp._fast_table(damaged, 0, len(damaged))
    except Exception:
        return  # given up: the tolerant decoders decide, as before
    # Whatever the fast decoder accepts, the tolerant decoders read the same way.
    assert fast == _tolerant_table(damaged)


def test_hostile_tables_still_get_the_tolerant_decoders_repairs() -> None:
    bad_key = b"\x02\xff\xfeS\x00\x00\x00\x01x"
    far_future = b"\x01tT" + struct.pack(">Q", 2**63 - 1)
    deep = pamqp_encode.field_table(
        {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {}}}}}}}}}}
    )
    for table in (struct.pack(">I", len(bad_key)) + bad_key, struct.pack(">I", 10) + far_future):
        amqp_decode.take_repairs()
        props = fast_amqp.decode_properties(1 << 13, table)  # headers only
        assert amqp_decode.take_repairs() == 1  # repaired once, by the tolerant decoders
        assert any(isinstance(v, amqp_decode.Unreadable) for v in props.headers.values()) or any(
            isinstance(k, str) and k.startswith("<unreadable") for k in props.headers
        )
    with pytest.raises(fast_amqp._Unhandled):
        fast_amqp._fast_table(deep, 0, len(deep))
    assert fast_amqp.decode_properties(1 << 13, deep).headers == _tolerant_table(deep)[1]
