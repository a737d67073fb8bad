"""Tolerant AMQP value decoding (and re-encoding), installed into pamqp's tables.

pamqp raises on values a producer can legally put on the wire but Python cannot represent:
a timestamp property or header of 2^63-1 (beyond year 9999), a short string or table key
that is not UTF-8, tables nested deep enough to exhaust the stack. The exception escapes
aiormq's frame reader and kills the connection; the broker redelivers the same message to
the next connection, and the sidecar loops reconnecting while one message blocks the queue.

Here each such value decodes to an ``Unreadable`` text placeholder instead (a ``str``, so
it travels on as an ordinary header value), and the count of repairs is kept for the
metrics. Only the values change: consumed byte counts are those of the wire, so the rest of
the frame decodes as before. Well-formed values decode exactly as pamqp decodes them.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

from pamqp import common
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode

from sidecar import limits

_Decoder = Callable[[bytes], tuple[int, Any]]


class Unreadable(str):
    """A value that could not be decoded; its text says what it was."""

    __slots__ = ()


_repairs = 0
_depth = threading.local()
_lock = threading.Lock()
_installed = False


def _repaired(what: str) -> Unreadable:
    global _repairs
    with _lock:
        _repairs += 1
    return Unreadable(f"<unreadable {what}>")


def repaired(what: str) -> Unreadable:
    """A placeholder for an undecodable ``what``, counted as a repair (for decoders
    outside pamqp's tables: the broker adapter's own frame parser)."""
    return _repaired(what)


def take_repairs() -> int:
    """Values repaired since the last call (for a counter metric)."""
    global _repairs
    with _lock:
        count, _repairs = _repairs, 0
    return count


def _timestamp(original: _Decoder) -> _Decoder:
    def timestamp(value: bytes) -> tuple[int, Any]:
        try:
            return original(value)
        except (ValueError, OverflowError, OSError):
            if len(value) < 8:
                raise  # truncated frame: a real protocol error, not a value we can skip
            return 8, _repaired("timestamp")

    return timestamp


def _short_str(value: bytes) -> tuple[int, Any]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except struct.error as err:
        raise ValueError("Could not unpack short string value") from err
    raw = value[1 : length + 1]
    try:
        return length + 1, raw.decode("utf-8")
    except UnicodeDecodeError:
        return length + 1, _repaired("short string")


def _nested(original: _Decoder, what: str) -> _Decoder:
    """A table or array decoder that stops descending at ``limits.MAX_NESTING``: deeper
    values are skipped by their length prefix and replaced by a placeholder."""

    def decode(value: bytes) -> tuple[int, Any]:
        depth = getattr(_depth, "value", 0)
        if depth >= limits.MAX_NESTING:
            try:
                length = common.Struct.integer.unpack(value[0:4])[0]
            except struct.error as err:
                raise ValueError(f"Could not unpack {what}") from err
            if 4 + length > len(value):
                raise ValueError(f"{what} length exceeds available data")
            return 4 + length, _repaired(f"{what} nested deeper than {limits.MAX_NESTING}")
        _depth.value = depth + 1
        try:
            return original(value)
        finally:
            _depth.value = depth

    return decode


def _field_table(value: bytes) -> tuple[int, Any]:
    """pamqp's field_table, with keys that are not UTF-8 repaired instead of raising."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            raw_key = value[offset : offset + key_length]
            try:
                key: str = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                key = _repaired("key") + raw_key.hex()
            offset += key_length
            consumed, result = pamqp_decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except struct.error as err:
        raise ValueError("Could not unpack data") from err


def _table_value_encoder(original: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """pamqp's encode_table_value, with what it decoded itself made encodable again: a
    float goes out as a double (pamqp packs single precision: lossy, and OverflowError
    past 3.4e38, so a header a Java producer sent could not be republished), and a long
    string that was not UTF-8 (decoded as bytes) goes out as the same bytes."""

    def encode_table_value(value: Any) -> bytes:
        if type(value) is float:
            return b"d" + common.Struct.double.pack(value)
        if isinstance(value, bytes):
            return b"S" + common.Struct.integer.pack(len(value)) + value
        return original(value)

    return encode_table_value


def installed() -> bool:
    """Whether ``install`` ran (the fast encoder in fast_amqp matches pamqp only then)."""
    return _installed


def install() -> None:
    """Put the tolerant decoders (and the matching encoders) into pamqp (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    timestamp = _timestamp(pamqp_decode.timestamp)
    table = _nested(_field_table, "table")
    array = _nested(pamqp_decode.field_array, "array")
    pamqp_decode.METHODS.update(
        {"timestamp": timestamp, "shortstr": _short_str, "table": table, "array": array}
    )
    pamqp_decode.TABLE_MAPPING.update({b"T": timestamp, b"F": table, b"A": array})
    # field_table and field_array look the name up in their module at call time.
    pamqp_encode.encode_table_value = _table_value_encoder(  # type: ignore[assignment]
        pamqp_encode.encode_table_value
    )
