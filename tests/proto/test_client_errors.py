"""The clients' mapping from exceptions to failure reasons, and from error frames to types."""

from __future__ import annotations

import json

import pytest
import trio

from sidecar import protocol as p
from sidecar.client import (
    DeadlineExpired,
    Failure,
    HandshakeRefused,
    InvalidRequest,
    PublishRefused,
    UnknownDelivery,
    UnknownReason,
    error_for,
    reason_for,
)


class QuotaError(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError("slow"), "TIMEOUT"),
        (trio.TooSlowError(), "TIMEOUT"),
        (ConnectionResetError("reset"), "NETWORK_ERROR"),
        (OSError("no route"), "NETWORK_ERROR"),
        (json.JSONDecodeError("bad", "x", 0), "VALIDATION_FAILED"),
        (KeyError("url"), "VALIDATION_FAILED"),
        (ValueError("nope"), "VALIDATION_FAILED"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "VALIDATION_FAILED"),
        (RuntimeError("bug"), "PROCESSING_ERROR"),
        (QuotaError(), "PROCESSING_ERROR"),
    ],
)
def test_default_mapping(exc: Exception, reason: str) -> None:
    got, error, retry_after = reason_for(exc)
    assert got == reason
    assert type(exc).__name__ in error and retry_after is None


def test_failure_names_its_reason_and_hint() -> None:
    assert reason_for(Failure("HTTP_503", "down", retry_after=2.5)) == ("HTTP_503", "down", 2.5)


def test_caller_mappings_come_first() -> None:
    mapping = [(QuotaError, "RATE_LIMITED"), (Exception, "PROCESSING_ERROR")]
    assert reason_for(QuotaError("429"), mapping)[0] == "RATE_LIMITED"


def test_error_text_is_bounded() -> None:
    assert len(reason_for(RuntimeError("x" * 10_000))[1]) <= 1024


def test_error_frames_become_typed_exceptions() -> None:
    def typed(code: str, **fields: object) -> Exception:
        return error_for(p.Error(code=code, message="m", **fields))  # type: ignore[arg-type]

    unknown = typed("unknown_delivery", ref=3, ids=[3, 4])
    assert isinstance(unknown, UnknownDelivery) and unknown.ids == [3, 4]
    assert isinstance(typed("unknown_reason", ref=1), UnknownReason)
    assert isinstance(typed("deadline_expired", ref=1), DeadlineExpired)
    assert isinstance(typed("invalid_publish", ref=1), PublishRefused)
    assert isinstance(typed("invalid_extend"), InvalidRequest)
    assert isinstance(typed("unauthorized", fatal=True), HandshakeRefused)
    assert typed("malformed").code == "malformed"  # type: ignore[attr-defined]
