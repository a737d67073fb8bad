"""Run every decoder test vector in proto/vectors/frames.json through the sidecar's Codec."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from sidecar import protocol as p
from tests.proto._util import PROTO

VECTORS: list[dict[str, Any]] = json.loads(
    (PROTO / "vectors" / "frames.json").read_text(encoding="utf-8")
)
CODEC = p.Codec()
# Vectors whose decoded frame cannot round-trip, and why.
NO_ROUND_TRIP = {
    "extend with NaN seconds (msgpack)": "NaN != NaN",
    "ack id beyond 64 bits (json)": "MessagePack cannot encode integers beyond 64 bits",
}


def raw(vector: dict[str, Any]) -> bytes | str:
    if vector["encoding"] == "json":
        return str(vector["frame"])
    assert vector["encoding"] == "msgpack-hex", vector["encoding"]
    return bytes.fromhex(vector["frame"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    expect = vector["expect"]
    data = raw(vector)
    if expect["ok"]:
        frame = CODEC.decode_agent(data)
        assert frame.__struct_config__.tag == expect["kind"]
        decoded = msgspec.to_builtins(frame)
        for field, value in expect.get("fields", {}).items():
            # omit_defaults drops defaults from to_builtins; read those off the struct.
            got = decoded[field] if field in decoded else getattr(frame, field)
            assert got == value, f"{field}: {got!r} != {value!r}"
    else:
        with pytest.raises(p.ProtocolError) as caught:
            CODEC.decode_agent(data)
        assert caught.value.code == expect["code"]
        assert caught.value.message


def test_vector_file_is_well_formed() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "vector names must be unique"
    assert len(VECTORS) >= 30
    for v in VECTORS:
        assert set(v) <= {"name", "encoding", "frame", "expect", "note"}, v["name"]
        assert v["encoding"] in ("json", "msgpack-hex"), v["name"]
        assert isinstance(v["expect"]["ok"], bool), v["name"]
        assert ("kind" in v["expect"]) == v["expect"]["ok"], v["name"]


@pytest.mark.parametrize("encoding", ["json", "msgpack-hex"])
def test_every_agent_kind_has_a_valid_vector(encoding: str) -> None:
    covered = {
        v["expect"]["kind"] for v in VECTORS if v["expect"]["ok"] and v["encoding"] == encoding
    }
    assert covered == set(p.AGENT_KINDS)


def test_every_decoder_error_code_is_covered() -> None:
    codes = {v["expect"]["code"] for v in VECTORS if not v["expect"]["ok"]}
    assert codes == {"malformed", "unknown_kind"}


def test_round_trip_exceptions_name_real_vectors() -> None:
    assert set(NO_ROUND_TRIP) <= {v["name"] for v in VECTORS}


def test_valid_vectors_round_trip_through_the_encoder() -> None:
    """Re-encoding a decoded frame in either encoding decodes to the same frame."""
    for v in VECTORS:
        if not v["expect"]["ok"] or v["name"] in NO_ROUND_TRIP:
            continue
        frame = CODEC.decode_agent(raw(v))
        for binary in (False, True):
            again = CODEC.decode_agent(CODEC.encode(frame, binary=binary))
            assert again == frame, (v["name"], binary)
