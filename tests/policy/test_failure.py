import pytest

from sidecar.policy.failure import PERMANENT_REASONS, FailureReason, error_signature


def test_reason_values_equal_names():
    assert {r.name for r in FailureReason} == {
        "TIMEOUT",
        "NETWORK_ERROR",
        "RATE_LIMITED",
        "VALIDATION_FAILED",
        "AGENT_CRASH",
        "UNRECOVERABLE",
        "CONSTRAINT_VIOLATION",
        "PROCESSING_ERROR",
    }
    for reason in FailureReason:
        assert reason.value == reason.name
        assert str(reason) == reason.name
    assert FailureReason("TIMEOUT") is FailureReason.TIMEOUT


def test_permanent_reasons():
    assert {
        FailureReason.VALIDATION_FAILED,
        FailureReason.UNRECOVERABLE,
        FailureReason.CONSTRAINT_VIOLATION,
    } == PERMANENT_REASONS
    assert "VALIDATION_FAILED" in PERMANENT_REASONS  # plain strings from the wire match
    assert "TIMEOUT" not in PERMANENT_REASONS


def test_seed_example_timeouts_share_a_signature():
    a = error_signature("TIMEOUT", "Request timed out after 5000ms")
    b = error_signature("TIMEOUT", "Request timed out after 300ms")
    assert a == b == "TIMEOUT:request timed out after <n>ms"


def test_different_reasons_differ():
    msg = "Request timed out after 5000ms"
    assert error_signature("TIMEOUT", msg) != error_signature("NETWORK_ERROR", msg)
    assert error_signature("NETWORK_ERROR", msg).startswith("NETWORK_ERROR:")


def test_different_texts_differ():
    assert error_signature("X", "connection refused") != error_signature("X", "connection reset")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("GET https://example.com/page?id=7 failed", "get <url> failed"),
        ("fetch http://a.b/c. next", "fetch <url>. next"),
        ("mail to Bob.Smith+x@Example.co.uk bounced", "mail to <email> bounced"),
        ("job 550E8400-E29B-41D4-A716-446655440000 lost", "job <uuid> lost"),
        ("doc 65a1f0c2e4b0a1b2c3d4e5f6 missing", "doc <hex> missing"),
        ("commit abc12345 broke", "commit <hex> broke"),
        ("pointer 0xDEADBEEF", "pointer <hex>"),
        ("connect 10.0.0.12:5672 refused", "connect <ip>:<n> refused"),
        ("took 2.5s and 12 tries", "took <n>s and <n> tries"),
        ("field 'email' is invalid", "field <str> is invalid"),
        ('field "url" is invalid', "field <str> is invalid"),
        ("can't parse 'x'", "can't parse <str>"),
        ("  lots \t of\n\nspace  ", "lots of space"),
        ("", ""),
    ],
)
def test_normalisation(message, expected):
    assert error_signature("R", message) == f"R:{expected}"


def test_short_words_and_plain_numbers_are_not_hex():
    # "deadline" is not all hex; "12345678" is a number, not an id.
    assert error_signature("R", "deadline 12345678") == "R:deadline <n>"


def test_variable_parts_collapse_to_one_signature():
    a = error_signature("NETWORK_ERROR", "ECONNRESET from 10.1.2.3 for https://x.io/a (req 1)")
    b = error_signature("NETWORK_ERROR", "ECONNRESET from 192.168.0.9 for https://y.io/b (req 99)")
    assert a == b


def test_truncated_to_200_chars_after_the_reason():
    sig = error_signature("UNRECOVERABLE", "x" * 1000)
    assert sig == "UNRECOVERABLE:" + "x" * 200


def test_placeholders_survive_later_rules():
    sig = error_signature("R", "uuid 550e8400-e29b-41d4-a716-446655440000 at 1.2.3.4")
    assert "<uuid>" in sig
    assert "<ip>" in sig
    assert "<n>" not in sig
