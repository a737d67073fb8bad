"""Tolerant AMQP decoding (sidecar.adapters.amqp_decode): values a producer can put on the
wire but pamqp cannot represent decode to placeholders instead of killing the connection,
and what was decoded can be encoded again for a retry."""

from __future__ import annotations

import struct

import msgspec
from pamqp import commands as spec
from pamqp import decode, encode

from sidecar import limits
from sidecar import protocol as p
from sidecar.adapters import (
    amqp_decode,
    broker,  # noqa: F401  # installs the decoders
)
from sidecar.adapters.fast_amqp import decode_properties

amqp_decode.install()


def table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def entry(key: bytes, value: bytes) -> bytes:
    return bytes([len(key)]) + key + value


def test_timestamp_beyond_datetime_is_a_placeholder() -> None:
    raw = struct.pack(">Q", 2**63 - 1)
    consumed, value = decode.by_type(raw, "timestamp")
    assert consumed == 8
    assert isinstance(value, amqp_decode.Unreadable)
    consumed, headers = decode.by_type(
        table(entry(b"t", b"T" + raw) + entry(b"n", b"I" + struct.pack(">i", 5))), "table"
    )
    assert isinstance(headers["t"], amqp_decode.Unreadable) and headers["n"] == 5


def test_short_string_and_key_that_are_not_utf8() -> None:
    consumed, value = decode.by_type(b"\x03\xff\xfe\xfd", "shortstr")
    assert consumed == 4 and isinstance(value, amqp_decode.Unreadable)
    _, headers = decode.by_type(table(entry(b"\xff", b"S" + struct.pack(">I", 1) + b"x")), "table")
    ((key, value),) = headers.items()
    assert key.startswith("<unreadable key>") and value == "x"


def test_tables_deeper_than_the_limit_stop_at_a_placeholder() -> None:
    inner = b"V"
    for _ in range(5000):  # would exhaust the stack of a recursive decoder
        body = entry(b"d", inner)
        inner = b"F" + table(body)
    consumed, headers = decode.by_type(table(entry(b"top", inner)), "table")
    depth, value = 0, headers["top"]
    while isinstance(value, dict):
        value, depth = value["d"], depth + 1
    assert depth == limits.MAX_NESTING - 1
    assert isinstance(value, amqp_decode.Unreadable)
    assert consumed == len(table(entry(b"top", inner)))


def test_what_was_decoded_encodes_again() -> None:
    encoded = encode.field_table(
        {"big": 3e38, "huge": 1e300, "raw": b"\xff\xfe", "u": amqp_decode.Unreadable("<u>")}
    )
    _, back = decode.by_type(encoded, "table")
    assert back["big"] == 3e38 and back["huge"] == 1e300  # doubles, not lossy floats
    assert back["raw"] == b"\xff\xfe" and back["u"] == "<u>"


def test_placeholder_properties_reach_the_agent_as_plain_text() -> None:
    flags = spec.Basic.Properties.flags
    block = b"\x02\xff\xfe" + struct.pack(">Q", 2**63 - 1)  # not UTF-8; beyond datetime
    mine = decode_properties(flags["message_id"] | flags["timestamp"], block)
    assert type(mine.message_id) is str and mine.timestamp is None
    delivery = p.Delivery(id=1, queue="q", body=b"", message_id=mine.message_id)
    assert msgspec.msgpack.encode(delivery) and msgspec.json.encode(delivery)
