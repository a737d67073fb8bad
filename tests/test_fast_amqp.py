"""The broker adapter's own frame parser and publisher (sidecar.adapters.fast_amqp), without
a broker: frames are built with pamqp and fed through a StreamReader in every split.

The first tests fail loudly when aiormq or pamqp change an internal the fast path relies on:
upgrading past the versions it was written for must be a decision, not a surprise."""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections.abc import Coroutine
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import FrameReceiver
from pamqp import commands as spec
from pamqp import decode as pamqp_decode
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
