"""Message types without a broker: properties as recorded, the inbox across connection
generations, delay-tier names, and header values made JSON-safe."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sidecar import limits
from sidecar.core.messages import (
    Inbound,
    Inbox,
    MessageProps,
    headers_json_safe,
    tier_queue_name,
)


def inbound(tag: int, generation: int) -> Inbound:
    return Inbound(generation, tag, "work", b"", MessageProps(), "work", "", False)


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": value}
    return value


def test_as_dict_names_every_property_that_is_set_and_nothing_else():
    props = MessageProps(
        headers={"h": 1},
        message_id="m",
        content_type="application/json",
        content_encoding="gzip",
        correlation_id="c",
        reply_to="r",
        priority=0,
        delivery_mode=2,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        type="t",
        app_id="app",
        expiration="1000",
    )
    assert props.as_dict() == {
        "message_id": "m",
        "content_type": "application/json",
        "content_encoding": "gzip",
        "correlation_id": "c",
        "reply_to": "r",
        "priority": 0,
        "delivery_mode": 2,
        "type": "t",
        "app_id": "app",
    }
    assert MessageProps().as_dict() == {}


def test_replace_headers_copies_every_property_and_leaves_the_original_alone():
    props = MessageProps(
        headers={"old": 1},
        message_id="m",
        content_type="text/plain",
        content_encoding="utf-8",
        correlation_id="c",
        reply_to="r",
        priority=5,
        delivery_mode=1,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        type="t",
        app_id="app",
        expiration="60000",
    )
    copy = props.replace_headers({"new": 2})
    assert copy == MessageProps(
        headers={"new": 2},
        message_id="m",
        content_type="text/plain",
        content_encoding="utf-8",
        correlation_id="c",
        reply_to="r",
        priority=5,
        delivery_mode=1,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        type="t",
        app_id="app",
        expiration="60000",
    )
    copy.expiration = "1"
    assert props.headers == {"old": 1} and props.expiration == "60000"


def test_a_new_inbox_hands_out_generation_zero_only():
    inbox = Inbox()
    assert inbox.generation == 0
    inbox.append(inbound(1, 1))
    inbox.append(inbound(2, 0))
    assert inbox.peek() is not None and inbox.peek().tag == 2  # type: ignore[union-attr]
    assert len(inbox) == 1


def test_the_inbox_skips_stale_deliveries_and_keeps_arrival_order():
    inbox = Inbox()
    inbox.start_generation(2)
    for tag, generation in [(1, 1), (2, 2), (3, 1), (4, 2)]:
        inbox.append(inbound(tag, generation))
    assert [m.tag for m in inbox] == [1, 2, 3, 4]
    assert inbox.peek().tag == 2  # type: ignore[union-attr]
    assert [m.tag for m in inbox] == [2, 3, 4]  # the stale one in front is gone
    assert inbox.pop().tag == 2
    assert inbox.peek().tag == 4  # type: ignore[union-attr]
    assert inbox.pop().tag == 4
    assert inbox.peek() is None and len(inbox) == 0


def test_ending_a_generation_forgets_only_its_deliveries():
    inbox = Inbox()
    inbox.start_generation(3)
    for tag, generation in [(1, 2), (2, 3), (3, 2), (4, 4)]:
        inbox.append(inbound(tag, generation))
    inbox.end_generation(2)
    assert [m.tag for m in inbox] == [2, 4]
    assert inbox.generation == 3
    held = inbox.clear()
    assert [m.tag for m in held] == [2, 4] and len(inbox) == 0


@pytest.mark.parametrize(
    ("ttl", "name"),
    [
        (1.0, "sidecar.delay.work.1000ms"),
        (0.25, "sidecar.delay.work.250ms"),
        (600, "sidecar.delay.work.600000ms"),
    ],
)
def test_a_tier_queue_is_named_by_its_ttl_in_milliseconds(ttl: float, name: str):
    assert tier_queue_name("sidecar.delay", "work", ttl) == name


def test_header_values_become_json_safe_with_text_keys():
    headers: dict[Any, Any] = {
        "at": datetime(2026, 1, 1, tzinfo=UTC),
        "raw": b"caf\xc3\xa9",
        7: "seven",
    }
    assert headers_json_safe(headers) == {
        "at": "2026-01-01T00:00:00+00:00",
        "raw": "café",
        "7": "seven",
    }


def test_a_header_counts_as_the_first_level_of_nesting():
    # A header value is one level down already: MAX_NESTING - 1 tables inside it are fine.
    fits = {"h": nested(limits.MAX_NESTING - 1)}
    assert headers_json_safe(fits) == fits
    too_deep = {"h": nested(limits.MAX_NESTING)}
    with pytest.raises(limits.TooDeep):
        headers_json_safe(too_deep)
    kept = headers_json_safe(too_deep, lenient=True)
    inner = kept["h"]
    for _ in range(limits.MAX_NESTING - 1):
        inner = inner["k"]
    assert inner == f"<nested deeper than {limits.MAX_NESTING}>"


def test_plain_header_values_pass_as_they_are_and_look_alikes_are_still_converted():
    class Text(str):
        pass

    class Number(int):
        def __repr__(self) -> str:
            return "Number()"

    plain = {"s": "text", "i": 7, "b": True, "n": None, "f": 1.5}
    converted = headers_json_safe(plain)
    assert converted == plain
    assert all(type(converted[k]) is type(v) for k, v in plain.items())
    odd = headers_json_safe(
        {"sub": Text("x"), "num": Number(3), "inf": float("inf"), "nan": float("nan")}
    )
    assert type(odd["sub"]) is str and odd["sub"] == "x"
    assert type(odd["num"]) is int and odd["num"] == 3
    assert odd["inf"] == "inf" and odd["nan"] == "nan"
