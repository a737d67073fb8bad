"""aiormq with a receive path that costs per read, not per frame, and publishes per burst.

Measured (bench/RESULTS.md): most of the sidecar's CPU went to aiormq's per-frame and
per-delivery bookkeeping, not to AMQP itself. ``FrameReceiver.get_frame`` makes three
``readexactly`` calls, takes a lock and builds a ``BytesIO`` for every frame; each frame
then crosses an ``asyncio.Queue`` into ``Channel._reader``; each delivery gets a task and
two FutureStore callbacks. ``FastConnection`` replaces only the connection's reader loop:
it reads what the socket has, cuts every complete frame out of it, and

* hands Basic.Deliver + content header + body on a *consuming* channel to a plain
  callback, in wire order, without a task or a queue hop;
* takes Basic.Ack / Nack / Return on a *publishing* channel straight to its
  ``Publisher``, which keeps the confirm table (``publish`` writes one frame blob per
  burst, no task per message);
* gives every other frame to aiormq exactly as aiormq's own reader would (channel 0 to the
  connection's handlers, the rest into the channel's frame queue), so channel open and
  close, RPCs, heartbeats, blocking and errors are still aiormq's.

It reaches into aiormq's private names (``_Connection__reader`` and friends), so it is
bounded to the versions it was written for (``SUPPORTED_AIORMQ``) and
tests/test_fast_amqp.py fails loudly when one of those internals moves.

Hostile input: header values are decoded with pamqp's decoders, which ``amqp_decode``
makes tolerant, so a value pamqp cannot represent becomes a placeholder. A property block
that cannot be decoded at all (truncated, an unknown field type) costs only that message's
properties (a placeholder header says so), never the connection: killing the connection
would make the broker redeliver the same message to the next one, forever.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any
from uuid import uuid4

import aiormq
import pamqp.frame
from aiormq.abc import ChannelFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands as spec
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from sidecar.adapters import amqp_decode
from sidecar.core.messages import Inbound, MessageProps

log = logging.getLogger("sidecar.broker")

SUPPORTED_AIORMQ = ("7.2.",)
SUPPORTED_PAMQP = ("4.0.",)

# aiormq private names this module relies on; tests/test_fast_amqp.py checks each exists.
CONNECTION_INTERNALS = (
    "_Connection__reader",
    "_Connection__writer",
    "_Connection__heartbeat",
    "_Connection__connection_unblocked",
    "_Connection__last_frame_time",
    "_Connection__heartbeat_grace_timeout",
    "_Connection__handle_close_ok",
    "_Connection__handle_close",
    "_Connection__handle_heartbeat",
    "_Connection__handle_channel_close_ok",
    "_Connection__handle_channel_update_secret_ok",
    "_Connection__handle_connection_blocked",
    "_Connection__handle_connection_unblocked",
)

READ_SIZE = 256 * 1024
# Above this many bytes waiting in the socket's buffer, writes go through aiormq's writer,
# which drains: the broker is not reading (a resource alarm), so stop piling up here.
WRITE_BUFFER_HIGH = 1024 * 1024
_HEADER = struct.Struct(">BHI")
_METHOD = struct.Struct(">I")
_CONTENT = struct.Struct(">HHQH")
_LONGLONG = struct.Struct(">Q")
_SHORT = struct.Struct(">H")
_FRAME_END = 0xCE
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME = 1, 2, 3

_DELIVER = spec.Basic.Deliver.index
_ACK = spec.Basic.Ack.index
_NACK = spec.Basic.Nack.index
_RETURN = spec.Basic.Return.index

UNREADABLE_PROPERTIES = "x-sidecar-unreadable-properties"

# Basic.Properties in wire order: (attribute, flag bit, pamqp type name).
_PROPERTIES = tuple(
    (name, spec.Basic.Properties.flags[name], getattr(spec.Basic.Properties, "_" + name))
    for name in spec.Basic.Properties.__slots__
)


def versions_supported() -> bool:
    return version("aiormq").startswith(SUPPORTED_AIORMQ) and version("pamqp").startswith(
        SUPPORTED_PAMQP
    )


class Consumer:
    """A consumer served by the fast path: deliveries for its tag become ``Inbound``
    records of ``queue`` and ``generation``, handed to ``callback`` in wire order."""

    __slots__ = ("callback", "generation", "queue")

    def __init__(self, callback: DeliveryCallback, queue: str, generation: int) -> None:
        self.callback = callback
        self.queue = queue
        self.generation = generation


DeliveryCallback = Callable[[Inbound], None]


def _short_str(data: bytes, offset: int) -> tuple[int, str]:
    """A short string at ``offset``; text that is not UTF-8 becomes a placeholder."""
    length = data[offset]
    end = offset + 1 + length
    if end > len(data):
        raise ValueError("short string exceeds the frame")
    raw = data[offset + 1 : end]
    try:
        return end, raw.decode("utf-8")
    except UnicodeDecodeError:
        return end, amqp_decode.repaired("short string")


# --- decoding header tables --------------------------------------------------------------
#
# A retried message comes back with its failure history and the broker's x-death (a list of
# tables with timestamps and arrays); pamqp decodes it one sliced copy and one dispatch per
# value. ``_fast_table`` reads the same values in place for well-formed tables only: at the
# first thing that is not plainly well formed (an unknown type, a key or length out of
# bounds, a key that is not UTF-8, a timestamp Python cannot represent, deep nesting) it
# gives up, and the table is decoded by pamqp's decoders with amqp_decode's tolerant
# repairs, exactly as before.

_FAST_DEPTH = 8  # deeper tables go to the tolerant decoders, which bound nesting
_S8 = struct.Struct(">b").unpack_from
_S16 = struct.Struct(">h").unpack_from
_U16 = struct.Struct(">H").unpack_from
_S32 = struct.Struct(">l").unpack_from
_U32_AT = struct.Struct(">I").unpack_from
_S64 = struct.Struct(">q").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from
# Fixed-size values: tag -> (size, unpack).
_FIXED: dict[int, tuple[int, Callable[[bytes, int], tuple[Any, ...]]]] = {
    ord("b"): (1, _S8),
    ord("s"): (2, _S16),
    ord("u"): (2, _U16),
    ord("I"): (4, _S32),
    ord("i"): (4, _U32_AT),
    ord("l"): (8, _S64),
    ord("L"): (8, _S64),
    ord("f"): (4, _F32),
    ord("d"): (8, _F64),
}
_TAG_S, _TAG_F, _TAG_A, _TAG_T = ord("S"), ord("F"), ord("A"), ord("T")
_TAG_TRUE, _TAG_UBYTE, _TAG_DECIMAL, _TAG_BYTES = ord("t"), ord("B"), ord("D"), ord("x")
_TAG_VOID = (ord("V"), 0)


def _fast_value(data: bytes, offset: int, end: int, depth: int) -> tuple[int, Any]:
    """The value at ``offset`` (its type tag first), which must end by ``end``."""
    if offset >= end:
        raise _Unhandled
    tag = data[offset]
    offset += 1
    if tag == _TAG_S:
        (length,) = _U32_AT(data, offset)
        start = offset + 4
        stop = start + length
        if stop > end:
            raise _Unhandled
        raw = data[start:stop]
        try:
            return stop, raw.decode("utf-8")
        except UnicodeDecodeError:
            return stop, raw  # what pamqp returns for a long string that is not UTF-8
    fixed = _FIXED.get(tag)
    if fixed is not None:
        size, unpack = fixed
        if offset + size > end:
            raise _Unhandled
        return offset + size, unpack(data, offset)[0]
    if tag == _TAG_F:
        if depth >= _FAST_DEPTH:
            raise _Unhandled
        return _fast_table(data, offset, end, depth + 1)
    if tag == _TAG_A:
        if depth >= _FAST_DEPTH:
            raise _Unhandled
        (length,) = _U32_AT(data, offset)
        offset += 4
        stop = offset + length
        if stop > end:
            raise _Unhandled
        items = []
        while offset < stop:
            offset, item = _fast_value(data, offset, stop, depth + 1)
            items.append(item)
        return offset, items
    if tag == _TAG_T:
        if offset + 8 > end:
            raise _Unhandled
        (stamp,) = _U64(data, offset)
        seconds: float = stamp / 1000.0 if stamp > 0xFFFFFFFF else stamp  # pamqp's rule
        try:
            return offset + 8, datetime.fromtimestamp(seconds, tz=UTC)
        except (ValueError, OverflowError, OSError):
            raise _Unhandled from None  # the tolerant decoder makes it a placeholder
    if tag == _TAG_TRUE:
        if offset + 1 > end:
            raise _Unhandled
        return offset + 1, bool(data[offset])
    if tag == _TAG_UBYTE:
        if offset + 1 > end:
            raise _Unhandled
        return offset + 1, data[offset]
    if tag in _TAG_VOID:
        return offset, None
    if tag == _TAG_BYTES:
        (length,) = _U32_AT(data, offset)
        stop = offset + 4 + length
        if stop > end:
            raise _Unhandled
        return stop, bytearray(data[offset + 4 : stop])
    if tag == _TAG_DECIMAL:
        if offset + 5 > end:
            raise _Unhandled
        consumed, value = pamqp_decode.decimal(data[offset : offset + 5])
        return offset + consumed, value
    raise _Unhandled


def _fast_table(data: bytes, offset: int, end: int, depth: int = 0) -> tuple[int, Any]:
    """The field table at ``offset`` (its length first), which must end by ``end``:
    (offset after it, dict). Raises (anything) when it is not plainly well formed."""
    (length,) = _U32_AT(data, offset)
    offset += 4
    stop = offset + length
    if stop > end:
        raise _Unhandled
    table: dict[str, Any] = {}
    while offset < stop:
        key_length = data[offset]
        offset += 1
        key_end = offset + key_length
        if key_end > stop:
            raise _Unhandled
        key = data[offset:key_end].decode("utf-8")
        offset, table[key] = _fast_value(data, key_end, stop, depth)
    return stop, table


def _plain(value: Any) -> str | None:
    """A short-string property as plain text: a placeholder for an undecodable one
    (amqp_decode.Unreadable, a str subclass) would not encode in a frame to the agent."""
    if value is None or type(value) is str:
        return value  # the common cases, without a conversion
    return str.__str__(value) if isinstance(value, str) else None


def _table(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else {}


def _integer(value: Any) -> int | None:
    return value if type(value) is int else None


def _timestamp(value: Any) -> datetime | None:
    # A placeholder for an unreadable timestamp (see amqp_decode) is dropped, not fatal.
    return value if isinstance(value, datetime) else None


# What each property becomes on ``MessageProps``: (attribute, conversion); user_id and
# cluster_id are not kept (None: decoded, to move past them, and dropped).
_KEPT: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    "content_type": ("content_type", _plain),
    "content_encoding": ("content_encoding", _plain),
    "headers": ("headers", _table),
    "delivery_mode": ("delivery_mode", _integer),
    "priority": ("priority", _integer),
    "correlation_id": ("correlation_id", _plain),
    "reply_to": ("reply_to", _plain),
    "expiration": ("expiration", _plain),
    "message_id": ("message_id", _plain),
    "timestamp": ("timestamp", _timestamp),
    "message_type": ("type", _plain),
    "user_id": None,
    "app_id": ("app_id", _plain),
    "cluster_id": None,
}
_Field = tuple[str, str | None, Callable[[Any], Any] | None]
# Property flags seen so far -> the fields they announce, in wire order: messages of one
# producer carry the same set, so the flag bits are walked once, not per message.
_FIELDS_BY_FLAGS: dict[int, tuple[_Field, ...]] = {}
_MAX_FLAG_SETS = 1024


def _fields_for(flags: int) -> tuple[_Field, ...]:
    fields = _FIELDS_BY_FLAGS.get(flags)
    if fields is None:
        found: list[_Field] = []
        for name, flag, kind in _PROPERTIES:
            if flags & flag:
                kept = _KEPT[name]
                found.append((kind, *kept) if kept is not None else (kind, None, None))
        fields = tuple(found)
        if len(_FIELDS_BY_FLAGS) < _MAX_FLAG_SETS:
            _FIELDS_BY_FLAGS[flags] = fields
    return fields


def _table_at(data: bytes, offset: int) -> tuple[int, Any]:
    """The header table at ``offset``: read in place when plainly well formed, else by
    pamqp's decoder (looked up at call time: amqp_decode's tolerant one when installed)."""
    try:
        return _fast_table(data, offset, len(data))
    except Exception:  # not plainly well formed: the tolerant decoder decides
        consumed, value = pamqp_decode.METHODS["table"](data[offset:] if offset else data)
        return offset + consumed, value


def decode_properties(flags: int, data: bytes) -> MessageProps:
    """The daemon's ``MessageProps`` straight from a content header's property block,
    through pamqp's decoders (looked up at call time, so the tolerant ones from
    ``amqp_decode`` apply); text that cannot be carried to an agent is plain text here.
    A header table that is plainly well formed is read by ``_fast_table`` instead."""
    if flags & 1:
        raise ValueError("property flags continue beyond Basic's 14 properties")
    props = MessageProps()
    methods = pamqp_decode.METHODS
    offset = 0
    for kind, attribute, convert in _fields_for(flags):
        if offset > len(data):
            raise ValueError("property block truncated")
        if kind == "table":
            offset, value = _table_at(data, offset)
        else:
            consumed, value = methods[kind](data[offset:] if offset else data)
            offset += consumed
        if attribute is not None and convert is not None:
            setattr(props, attribute, convert(value))
    if offset > len(data):
        raise ValueError("property block truncated")
    return props


# --- encoding properties -----------------------------------------------------------------
#
# pamqp encodes a header table in pure Python through a chain of type checks per value
# (about 120 us per republish of a message carrying its failure history, under the
# profiler). The encoder below writes the same bytes for the types the sidecar's headers
# hold, dispatching on the exact type; any other value is encoded by pamqp's own
# ``encode_table_value`` in place, and anything the fast path does not handle as pamqp
# would (a non-text or over-long key, a property of an unexpected type, any error) sends
# the whole property block through pamqp, which then encodes it or raises its own error.

_U32 = struct.Struct(">I").pack
_DOUBLE = struct.Struct(">d").pack
_CONTENT_HEADER = struct.Struct(">HHQ")
_MAX_KEY_BYTES = 128  # pamqp truncates longer keys (with a warning): left to it


class _Unhandled(Exception):
    """A value or property the fast encoder leaves to pamqp."""


def _table_int(value: int) -> bytes:
    # pamqp's table_integer: the smallest signed/unsigned width that holds the value.
    if -128 <= value <= 127:
        return b"b" + struct.pack(">b", value)
    if -32768 <= value <= 32767:
        return b"s" + struct.pack(">h", value)
    if 0 <= value <= 65535:
        return b"u" + struct.pack(">H", value)
    if -2147483648 <= value <= 2147483647:
        return b"I" + struct.pack(">i", value)
    if 0 <= value <= 4294967295:
        return b"i" + struct.pack(">I", value)
    if -9223372036854775808 <= value <= 9223372036854775807:
        return b"l" + struct.pack(">q", value)
    raise _Unhandled  # pamqp raises TypeError for it


def _table_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"S" + _U32(len(raw)) + raw


def _table_bytes(value: bytes) -> bytes:
    # amqp_decode's encoder: bytes (a long string that was not UTF-8) go out as they came.
    return b"S" + _U32(len(value)) + value


def _table_bytearray(value: bytearray) -> bytes:
    return b"x" + _U32(len(value)) + value


def _table_bool(value: bool) -> bytes:
    return b"t\x01" if value else b"t\x00"


def _table_float(value: float) -> bytes:
    # amqp_decode's encoder: a double, where pamqp alone would pack single precision.
    return b"d" + _DOUBLE(value)


def _table_none(_value: None) -> bytes:
    return b"V"


def _table_dict(value: dict[Any, Any]) -> bytes:
    return b"F" + _field_table(value)


def _table_list(value: list[Any]) -> bytes:
    parts = [_table_value(item) for item in value]
    data = b"".join(parts)
    return b"A" + _U32(len(data)) + data


_TABLE_VALUE: dict[type, Callable[[Any], bytes]] = {
    str: _table_str,
    int: _table_int,
    bool: _table_bool,
    bytes: _table_bytes,
    bytearray: _table_bytearray,
    float: _table_float,
    type(None): _table_none,
    dict: _table_dict,
    list: _table_list,
}


def _table_value(value: Any) -> bytes:
    encode = _TABLE_VALUE.get(type(value))
    if encode is None or (encode is _table_int and pamqp_encode.DEPRECATED_RABBITMQ_SUPPORT):
        # Decimal, datetime, struct_time, subclasses (Unreadable, IntEnum, ...), or a type
        # pamqp refuses: exactly what pamqp does with it, raising as it would.
        encoded: bytes = pamqp_encode.encode_table_value(value)
        return encoded
    return encode(value)


# Encoded key prefixes (length byte + UTF-8): the same few keys recur in every republish.
_KEY_PREFIXES: dict[str, bytes] = {}
_KEY_PREFIXES_MAX = 1024


def _key_prefix(key: str) -> bytes:
    raw = key.encode("utf-8")
    if len(raw) > _MAX_KEY_BYTES:
        raise _Unhandled
    if len(_KEY_PREFIXES) >= _KEY_PREFIXES_MAX:
        _KEY_PREFIXES.clear()  # hostile headers with endless new keys stay bounded
    prefix = _KEY_PREFIXES[key] = bytes((len(raw),)) + raw
    return prefix


def _field_table(value: dict[Any, Any]) -> bytes:
    if not value:
        return b"\x00\x00\x00\x00"
    parts: list[bytes] = []
    append = parts.append
    for key in sorted(value):  # pamqp sorts the items; text keys are unique, so the same
        if type(key) is not str:
            raise _Unhandled
        append(_KEY_PREFIXES.get(key) or _key_prefix(key))
        item = value[key]
        if type(item) is str:  # most header values: inline
            raw = item.encode("utf-8")
            append(b"S" + _U32(len(raw)))
            append(raw)
        else:
            append(_table_value(item))
    data = b"".join(parts)
    return _U32(len(data)) + data


def _shortstr_property(value: Any) -> bytes:
    if type(value) is not str:
        raise _Unhandled
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise _Unhandled  # pamqp raises TypeError for it
    return bytes((len(raw),)) + raw


def _octet_property(value: Any) -> bytes:
    if type(value) is not int or not 0 <= value <= 255:
        raise _Unhandled
    return bytes((value,))


def _table_property(value: Any) -> bytes:
    if type(value) is not dict:
        raise _Unhandled
    return _field_table(value)


def _timestamp_property(value: Any) -> bytes:
    if type(value) is not datetime:
        raise _Unhandled
    encoded: bytes = pamqp_encode.timestamp(value)
    return encoded


_PROPERTY_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "shortstr": _shortstr_property,
    "octet": _octet_property,
    "table": _table_property,
    "timestamp": _timestamp_property,
}
# Basic.Properties in wire order: (attribute, flag bit, encoder).
_PROPERTY_WRITERS = tuple(
    (name, flag, _PROPERTY_ENCODERS[kind]) for name, flag, kind in _PROPERTIES
)


def _fast_properties(properties: spec.Basic.Properties) -> bytes:
    flags = 0
    parts = [b""]  # the flag word goes first
    for name, flag, encode in _PROPERTY_WRITERS:
        value = getattr(properties, name)
        if value is None or (type(value) is str and value == ""):
            continue  # pamqp leaves out None and ''
        flags |= flag
        parts.append(encode(value))
    parts[0] = _SHORT.pack(flags)
    return b"".join(parts)


def encode_properties(properties: spec.Basic.Properties) -> bytes:
    """The property block of a content header, byte for byte what pamqp's
    ``Basic.Properties.marshal`` writes (and raising what it raises)."""
    if type(properties) is spec.Basic.Properties and amqp_decode.installed():
        try:
            return _fast_properties(properties)
        except Exception:  # pamqp encodes it, or raises its own error
            pass
    return properties.marshal()


def content_header_frame(channel: int, body_size: int, properties: spec.Basic.Properties) -> bytes:
    """A whole content header frame, as ``pamqp.frame.marshal(ContentHeader(0, body_size,
    properties), channel)`` writes it."""
    payload = _CONTENT_HEADER.pack(spec.Basic.frame_id, 0, body_size) + encode_properties(
        properties
    )
    return _HEADER.pack(_HEADER_FRAME, channel, len(payload)) + payload + b"\xce"


class _Incoming:
    """Content being assembled on one channel: after a method with content, its header,
    then body frames until ``body_size`` bytes arrived. A delivery's method fields are kept
    here until the ``Inbound`` is built, once, when its body is complete."""

    __slots__ = (
        "body_size",
        "consumer_tag",
        "exchange",
        "message_id",
        "parts",
        "props",
        "received",
        "redelivered",
        "returned",
        "routing_key",
        "slow",
        "tag",
    )

    def __init__(self) -> None:
        self.consumer_tag: str | None = None  # set for a Basic.Deliver
        self.tag = 0
        self.redelivered = False
        self.exchange = ""
        self.routing_key = ""
        self.props: MessageProps | None = None
        self.returned: tuple[int, str] | None = None  # (reply code, text) of a Basic.Return
        self.message_id: str | None = None  # what a Basic.Return is matched by
        self.body_size = -1  # -1: header not seen yet
        self.parts: list[bytes] = []
        self.received = 0
        self.slow = False  # content of a frame aiormq handles: passed to its queue


class Publisher:
    """Publishes with confirms on one aiormq channel (opened with confirms on a
    ``FastConnection``), one write per burst, its own confirm table.

    ``publish`` marshals and buffers; ``flush`` writes the buffer as one blob, straight to
    the socket when nothing is queued ahead of it, else through aiormq's write queue (so it
    stays ordered with every other frame on the connection).
    Each publish's ``on_done`` is called once: None when the broker acked it, else the
    exception (``Returned``, ``Nacked``, or why the channel closed)."""

    def __init__(self, connection: FastConnection, channel: Any) -> None:
        self.connection = connection
        self.channel = channel
        self.number: int = channel.number
        self.max_body: int = channel.max_content_size
        self.tag = 0
        # Tags grow with each publish, and dicts keep insertion order: the oldest first.
        self.pending: dict[int, Callable[[BaseException | None], None]] = {}
        self.returned: dict[int, BaseException] = {}
        self.by_message_id: dict[str, int] = {}
        self.tag_message_id: dict[int, str] = {}
        self.out: list[bytes] = []
        self.closed: BaseException | None = None
        self._putting = False
        self._flush_timer: asyncio.TimerHandle | None = None
        connection.publishers[self.number] = self
        channel.closing.add_done_callback(self._on_channel_closed)

    def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: spec.Basic.Properties,
        mandatory: bool,
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        """Queue one publish for the next ``flush``. Raises (TypeError, ValueError,
        OverflowError, struct.error) before anything is queued when the message cannot be
        marshalled."""
        if self.closed is not None:
            raise self.closed
        if not properties.message_id:
            # Basic.Return names a message only by its properties: give each an id.
            properties.message_id = uuid4().hex
        method = (
            b"\x00\x3c\x00\x28\x00\x00"
            + pamqp_encode.short_string(exchange)
            + pamqp_encode.short_string(routing_key)
            + (b"\x01" if mandatory else b"\x00")
        )
        number = self.number
        frames = [
            _HEADER.pack(_METHOD_FRAME, number, len(method)),
            method,
            b"\xce",
            content_header_frame(number, len(body), properties),
        ]
        step = self.max_body
        for start in range(0, len(body), step):
            part = body[start : start + step]
            frames.append(_HEADER.pack(_BODY_FRAME, number, len(part)))
            frames.append(part)
            frames.append(b"\xce")
        self.tag += 1
        tag = self.tag
        self.pending[tag] = on_done
        message_id = str(properties.message_id)
        self.by_message_id[message_id] = tag
        self.tag_message_id[tag] = message_id
        self.out.extend(frames)

    def flush(self) -> None:
        """Write everything published since the last flush as one frame blob."""
        if not self.out or self._putting:
            return
        payload = b"".join(self.out)
        self.out.clear()
        if self.connection.send(payload):
            return
        frame = ChannelFrame(payload=payload, should_close=False)
        try:
            self.connection.write_queue.put_nowait(frame)
        except asyncio.QueueFull:
            # The writer is behind: wait for room, and keep later bursts behind this one.
            self._putting = True
            self.connection.create_task(self._put(frame))

    def flush_later(self, delay: float) -> None:
        """Write the buffer within ``delay`` seconds (with whatever else is published
        meanwhile); an earlier ``flush`` takes it along."""
        if self.out and self._flush_timer is None and self.closed is None:
            self._flush_timer = self.connection.loop.call_later(delay, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        self.flush()

    async def _put(self, frame: ChannelFrame) -> None:
        try:
            await self.connection.write_queue.put(frame)
        finally:
            self._putting = False
        self.flush()

    def _settle(self, tag: int, error: BaseException | None) -> None:
        on_done = self.pending.pop(tag, None)
        message_id = self.tag_message_id.pop(tag, None)
        if message_id is not None and self.by_message_id.get(message_id) == tag:
            del self.by_message_id[message_id]
        if on_done is None:
            return
        error = self.returned.pop(tag, error)
        try:
            on_done(error)
        except Exception:
            log.exception("publish callback failed")

    def on_confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        error = None if ack else Nacked(tag)
        if not multiple:
            self._settle(tag, error)
            return
        pending = self.pending
        while pending:
            oldest = next(iter(pending))
            if oldest > tag:
                break
            self._settle(oldest, error)

    def on_return(self, reply_code: int, reply_text: str, message_id: str | None) -> None:
        tag = self.by_message_id.get(message_id) if message_id else None
        if tag is None or tag not in self.pending:
            log.warning("returned message matches no publish (%s %s)", reply_code, reply_text)
            return
        # The broker still confirms a returned message: report the return then.
        self.returned[tag] = Returned(reply_code, reply_text)

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        if closing.cancelled():
            reason: BaseException = aiormq.exceptions.ChannelInvalidStateError("channel closed")
        else:
            reason = closing.exception() or aiormq.exceptions.ChannelInvalidStateError(
                "channel closed"
            )
        self.fail_all(reason)

    def fail_all(self, reason: BaseException) -> None:
        """Every publish not yet confirmed fails with ``reason`` (the channel is gone)."""
        self.closed = reason
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.connection.publishers.get(self.number) is self:
            del self.connection.publishers[self.number]
        self.out.clear()
        self.returned.clear()
        while self.pending:
            self._settle(next(iter(self.pending)), reason)


class Returned(Exception):
    """The broker returned a mandatory publish: no queue is bound for it."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code


class Nacked(Exception):
    """The broker refused a publish (basic.nack)."""


class FastConnection(aiormq.Connection):
    """An aiormq connection whose reader parses every complete frame per read and serves
    registered consuming and publishing channels synchronously (see the module doc)."""

    def __init__(self, url: Any, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        # channel number -> consumer tag -> consumer
        self.consumers: dict[int, dict[str, Consumer]] = {}
        self.publishers: dict[int, Publisher] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._stream_writer: asyncio.StreamWriter | None = None
        # Called after the frames of each read are handled: deliveries of one read cross
        # to their consumer's side together (one crossing per burst, not per message).
        self.after_read: Callable[[], None] | None = None

    async def _Connection__writer(self, writer: asyncio.StreamWriter) -> None:
        # aiormq's writer, unchanged; the stream is kept for ``send``.
        self._stream_writer = writer
        internals: Any = aiormq.Connection
        await internals._Connection__writer(self, writer)

    def send(self, payload: bytes) -> bool:
        """Write whole frames straight to the socket, sparing the writer task a wake-up
        per burst. Only when nothing is queued for aiormq's writer (so nothing can be
        overtaken: its writer writes what it takes from the queue without awaiting in
        between) and the socket buffer is not backed up. False: use the write queue."""
        writer = self._stream_writer
        if (
            writer is None
            or not self.write_queue.empty()
            or writer.is_closing()
            or self.is_closed
            or writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH
        ):
            return False
        writer.write(payload)
        return True

    def consume_fast(
        self,
        channel_number: int,
        consumer_tag: str,
        callback: DeliveryCallback,
        *,
        queue: str = "",
        generation: int = 0,
    ) -> None:
        """Route deliveries for ``consumer_tag`` on the channel to ``callback`` as
        ``Inbound`` records of ``queue`` and ``generation`` (register it before
        Basic.Consume: deliveries may arrive before its ConsumeOk is read)."""
        self.consumers.setdefault(channel_number, {})[consumer_tag] = Consumer(
            callback, queue, generation
        )

    async def _Connection__reader(self, frame_receiver: Any) -> None:
        # aiormq's name-mangled privates, listed in CONNECTION_INTERNALS.
        internals: Any = self
        internals._Connection__connection_unblocked.set()
        self.connected.set()
        if self.heartbeat_timeout > 0:
            self.create_task(internals._Connection__heartbeat())
        reader: asyncio.StreamReader = frame_receiver.reader
        tune = getattr(self, "connection_tune", None)
        # A frame beyond the negotiated maximum is a protocol error, not a reason to buffer.
        max_frame = max(int(getattr(tune, "frame_max", 0) or 0), 4096) + 8
        rest = b""
        try:
            while True:
                try:
                    chunk = await reader.read(READ_SIZE)
                except OSError as exc:
                    raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
                if not chunk:
                    if rest:
                        raise AMQPConnectionError(
                            "Server connection unexpectedly closed "
                            f"with {len(rest)} bytes of a frame read"
                        )
                    return
                internals._Connection__last_frame_time = self.loop.time()
                data = rest + chunk if rest else chunk
                offset = await self._frames(data, max_frame)
                if self.after_read is not None:
                    self.after_read()
                if offset < 0:
                    return  # Connection.Close-Ok: the last frame on the connection
                rest = data[offset:]
        except asyncio.CancelledError:
            if self.is_connection_was_stuck:
                log.warning("broker connection %r was stuck: no frames for too long", self)
                self._writer_task.cancel()
            raise

    async def _frames(self, data: bytes, max_frame: int) -> int:
        """Dispatch every complete frame in ``data``; returns where the rest starts, or -1
        after Connection.Close-Ok."""
        try:
            return await self._frames_of(data, max_frame)
        except (ValueError, struct.error, IndexError) as exc:
            # Fields the broker framed wrongly: a protocol error, as in aiormq's reader.
            raise InvalidFrameError(f"{type(exc).__name__}: {exc}") from exc

    async def _frames_of(self, data: bytes, max_frame: int) -> int:
        offset = 0
        size_all = len(data)
        consumers = self.consumers
        publishers = self.publishers
        while size_all - offset >= 8:
            kind, channel, size = _HEADER.unpack_from(data, offset)
            if size > max_frame:
                raise InvalidFrameError(f"frame of {size} bytes exceeds the negotiated maximum")
            end = offset + 7 + size
            if end >= size_all:
                break
            if data[end] != _FRAME_END:
                raise InvalidFrameError("frame end marker missing")
            start = offset + 7
            if (
                kind == _METHOD_FRAME
                and channel in consumers
                and channel not in self._incoming
                and _METHOD.unpack_from(data, start)[0] == _DELIVER
            ):
                after = self._whole_delivery(channel, data, start, end, size_all, max_frame)
                if after > 0:
                    offset = after
                    continue
            offset = end + 1
            if (
                channel
                and (channel in consumers or channel in publishers)
                and self._fast_frame(kind, channel, data, start, end)
            ):
                continue
            if await self._slow_frame(data[start - 7 : end + 1]):
                return -1
        return offset

    def _fast_frame(self, kind: int, channel: int, data: bytes, start: int, end: int) -> bool:
        """Handle a frame of a registered channel; False to give it to aiormq instead."""
        incoming = self._incoming.get(channel)
        if kind == _METHOD_FRAME:
            if incoming is not None:
                raise InvalidFrameError(f"method frame inside content on channel {channel}")
            index = _METHOD.unpack_from(data, start)[0]
            if index == _DELIVER and channel in self.consumers:
                self._incoming[channel] = self._deliver(data, start + 4, end)
                return True
            publisher = self.publishers.get(channel)
            if publisher is not None:
                if index in (_ACK, _NACK):
                    if end - start < 13:
                        raise InvalidFrameError("Basic.Ack or Nack shorter than its fields")
                    tag = _LONGLONG.unpack_from(data, start + 4)[0]
                    publisher.on_confirm(tag, bool(data[start + 12] & 1), index == _ACK)
                    return True
                if index == _RETURN:
                    if end - start < 7:
                        raise InvalidFrameError("Basic.Return shorter than its fields")
                    code = _SHORT.unpack_from(data, start + 4)[0]
                    _, text = _short_str(data, start + 6)
                    pending = _Incoming()
                    pending.returned = (code, text)
                    self._incoming[channel] = pending
                    return True
            return False
        if incoming is None or incoming.slow:
            return False
        if kind == _HEADER_FRAME:
            if incoming.body_size >= 0 or end - start < 14:
                raise InvalidFrameError(f"unexpected content header on channel {channel}")
            _class, _weight, body_size, flags = _CONTENT.unpack_from(data, start)
            properties = self._properties(flags, data[start + 14 : end])
            incoming.body_size = body_size
            if incoming.consumer_tag is not None:
                incoming.props = properties
            else:
                incoming.message_id = properties.message_id
        elif kind == _BODY_FRAME:
            if incoming.body_size < 0:
                raise InvalidFrameError(f"content body before its header on channel {channel}")
            incoming.parts.append(data[start:end])
            incoming.received += end - start
            if incoming.received > incoming.body_size:
                raise InvalidFrameError(f"content body longer than announced on {channel}")
        else:
            raise InvalidFrameError(f"unexpected frame type {kind} on channel {channel}")
        if incoming.received >= incoming.body_size >= 0:
            del self._incoming[channel]
            self._complete(channel, incoming)
        return True

    def _whole_delivery(
        self, channel: int, data: bytes, start: int, end: int, size_all: int, max_frame: int
    ) -> int:
        """A Basic.Deliver (its method frame at ``start``..``end``) whose content header and
        one body frame follow it in ``data``, as almost every delivery of a small message
        arrives: handled in one go, without the per-frame state. Returns where the next
        frame starts, or -1 to go frame by frame (not all of it here yet, another shape,
        or something the frame-by-frame path must report)."""
        head = end + 1
        if size_all - head < 8:
            return -1
        after: int
        kind, number, size = _HEADER.unpack_from(data, head)
        head_end = head + 7 + size
        if (
            kind != _HEADER_FRAME
            or number != channel
            or size < 14
            or size > max_frame
            or head_end >= size_all
            or data[head_end] != _FRAME_END
        ):
            return -1
        _class, _weight, body_size, flags = _CONTENT.unpack_from(data, head + 7)
        if body_size:
            part = head_end + 1
            if size_all - part < 8:
                return -1
            kind, number, size = _HEADER.unpack_from(data, part)
            part_end = part + 7 + size
            if (
                kind != _BODY_FRAME
                or number != channel
                or size != body_size
                or part_end >= size_all
                or data[part_end] != _FRAME_END
            ):
                return -1
            body = data[part + 7 : part_end]
            after = part_end + 1
        else:
            body = b""
            after = head_end + 1
        offset, consumer_tag = _short_str(data, start + 4)
        tag = _LONGLONG.unpack_from(data, offset)[0]
        redelivered = bool(data[offset + 8] & 1)
        offset, exchange = _short_str(data, offset + 9)
        offset, routing_key = _short_str(data, offset)
        if offset > end:
            raise InvalidFrameError("Basic.Deliver exceeds its frame")
        consumer = self.consumers[channel].get(consumer_tag)
        if consumer is None:
            log.warning("delivery for unknown consumer %r dropped", consumer_tag)
            return after
        message = Inbound(
            consumer.generation,
            tag,
            consumer.queue,
            body,
            self._properties(flags, data[head + 21 : head_end]),
            # A placeholder (a str subclass) would not encode in a frame to the agent.
            routing_key if type(routing_key) is str else str.__str__(routing_key),
            exchange if type(exchange) is str else str.__str__(exchange),
            redelivered,
        )
        try:
            consumer.callback(message)
        except Exception:
            log.exception("delivery callback failed")
        return after

    def _deliver(self, data: bytes, offset: int, end: int) -> _Incoming:
        incoming = _Incoming()
        offset, incoming.consumer_tag = _short_str(data, offset)
        incoming.tag = _LONGLONG.unpack_from(data, offset)[0]
        incoming.redelivered = bool(data[offset + 8] & 1)
        offset, exchange = _short_str(data, offset + 9)
        offset, routing_key = _short_str(data, offset)
        if offset > end:
            raise InvalidFrameError("Basic.Deliver exceeds its frame")
        # A placeholder (a str subclass) would not encode in a frame to the agent.
        incoming.exchange = exchange if type(exchange) is str else str.__str__(exchange)
        incoming.routing_key = routing_key if type(routing_key) is str else str.__str__(routing_key)
        return incoming

    @staticmethod
    def _properties(flags: int, block: bytes) -> MessageProps:
        try:
            return decode_properties(flags, block)
        except (ValueError, struct.error, IndexError, KeyError, TypeError, RecursionError) as exc:
            log.warning("message properties cannot be decoded (%s): delivered without", exc)
            return MessageProps(headers={UNREADABLE_PROPERTIES: amqp_decode.repaired("properties")})

    def _complete(self, channel: int, incoming: _Incoming) -> None:
        parts = incoming.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        consumer_tag = incoming.consumer_tag
        if consumer_tag is None:
            publisher = self.publishers.get(channel)
            if publisher is not None and incoming.returned is not None:
                publisher.on_return(*incoming.returned, incoming.message_id)
            return
        consumer = self.consumers.get(channel, {}).get(consumer_tag)
        if consumer is None:
            log.warning("delivery for unknown consumer %r dropped", consumer_tag)
            return
        props = incoming.props
        message = Inbound(
            consumer.generation,
            incoming.tag,
            consumer.queue,
            body,
            props if props is not None else MessageProps(),
            incoming.routing_key,
            incoming.exchange,
            incoming.redelivered,
        )
        try:
            consumer.callback(message)
        except Exception:
            log.exception("delivery callback failed")

    async def _slow_frame(self, raw: bytes) -> bool:
        """A frame as aiormq's reader handles it; True after Connection.Close-Ok."""
        try:
            _, channel, frame = pamqp.frame.unmarshal(raw)
        except Exception as exc:  # pamqp raises more than its own exception type
            raise InvalidFrameError(str(exc)) from exc
        if channel == 0:
            internals: Any = self  # aiormq's name-mangled handlers (CONNECTION_INTERNALS)
            match frame:
                case spec.Connection.CloseOk():
                    await internals._Connection__handle_close_ok(frame)
                    return True
                case spec.Connection.Close():
                    await internals._Connection__handle_close(frame)
                case Heartbeat():
                    await internals._Connection__handle_heartbeat(frame)
                case spec.Channel.CloseOk():
                    await internals._Connection__handle_channel_close_ok(frame)
                case spec.Connection.UpdateSecretOk():
                    await internals._Connection__handle_channel_update_secret_ok(frame)
                case spec.Connection.Blocked():
                    await internals._Connection__handle_connection_blocked(frame)
                case spec.Connection.Unblocked():
                    await internals._Connection__handle_connection_unblocked(frame)
                case _:
                    log.error("Unexpected frame %r", frame)
            return False
        ch = self.channels.get(channel)
        if ch is None:
            log.error("Got frame for closed channel %d: %r", channel, frame)
            return False
        if channel in self.publishers or channel in self.consumers:
            self._track_slow_content(channel, frame, len(raw) - 8)
        if isinstance(frame, spec.Channel.Close | spec.Channel.CloseOk):
            self.channels.pop(channel, None)
            self.consumers.pop(channel, None)
            self._incoming.pop(channel, None)
        await ch.frames.put((0, frame))
        return False

    def _track_slow_content(self, channel: int, frame: Any, size: int) -> None:
        """On a registered channel, keep the content of a frame aiormq handles (a
        Basic.GetOk, a Deliver for a consumer not registered here) going to aiormq too."""
        if isinstance(frame, spec.Basic.GetOk | spec.Basic.Return | spec.Basic.Deliver):
            pending = _Incoming()
            pending.slow = True
            self._incoming[channel] = pending
            return
        pending_slow = self._incoming.get(channel)
        if pending_slow is None:
            return
        if isinstance(frame, ContentHeader):
            pending_slow.body_size = frame.body_size
        elif isinstance(frame, ContentBody):
            pending_slow.received += size
        if pending_slow.received >= pending_slow.body_size >= 0:
            del self._incoming[channel]
