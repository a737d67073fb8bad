"""The reason vocabulary: built-in reasons, operator-declared ones, and rules that cannot apply."""

import pytest

from sidecar.policy.failure import (
    BUILTIN_REASONS,
    DEFAULT_REASONS,
    PERMANENT_REASONS,
    SYSTEMIC_REASONS,
    FailureReason,
    ReasonBook,
    ReasonKind,
    ReasonSpec,
)
from sidecar.policy.retry import (
    DeadLetter,
    ReasonConfigError,
    ReasonDeclaration,
    ReasonRule,
    Retry,
    RetryPolicy,
    decide,
    resolve_reasons,
)


def test_the_breaker_counts_downstream_trouble_not_bad_input():
    assert {"NETWORK_ERROR", "TIMEOUT", "RATE_LIMITED", "AGENT_CRASH"} == SYSTEMIC_REASONS
    assert not SYSTEMIC_REASONS & PERMANENT_REASONS
    for name in PERMANENT_REASONS:
        assert not DEFAULT_REASONS.counts_for_breaker(name)


def test_agents_may_send_every_built_in_reason_but_agent_crash():
    assert DEFAULT_REASONS.agent_reasons() == [
        r for r in BUILTIN_REASONS if r != FailureReason.AGENT_CRASH
    ]
    assert not DEFAULT_REASONS.accepts("AGENT_CRASH")
    assert not DEFAULT_REASONS.accepts("HTTP_503")
    assert not DEFAULT_REASONS.counts_for_breaker("HTTP_503")


def test_a_reason_like_network_error_inherits_its_kind_breaker_and_backoff():
    book, rules = resolve_reasons({"HTTP_503": ReasonDeclaration(like="NETWORK_ERROR")})
    assert book.accepts("HTTP_503") and book.counts_for_breaker("HTTP_503")
    assert not book.permanent("HTTP_503")
    assert rules["HTTP_503"] == rules["NETWORK_ERROR"]
    policy = RetryPolicy(rules=rules, reasons=book)
    assert isinstance(decide("HTTP_503", "", 1, None, policy, 0.5), Retry)
    assert isinstance(decide("HTTP_503", "", 3, None, policy, 0.5), DeadLetter)


def test_a_declared_reason_takes_its_own_backoff_and_breaker_flag():
    book, rules = resolve_reasons(
        {
            "QUOTA": ReasonDeclaration(like="RATE_LIMITED", breaker=False, max_attempts=5),
            "BAD_PDF": ReasonDeclaration(kind="permanent"),
            "FLAKY": ReasonDeclaration(kind="transient", backoff="none"),
        }
    )
    assert rules["QUOTA"] == ReasonRule("retry", "rate_limit", 5)
    assert not book.counts_for_breaker("QUOTA")
    assert book.permanent("BAD_PDF") and rules["BAD_PDF"].action == "dead_letter"
    assert rules["FLAKY"] == ReasonRule("retry", "none")
    assert not book.counts_for_breaker("FLAKY")
    policy = RetryPolicy(rules=rules, reasons=book)
    assert decide("BAD_PDF", "", 1, None, policy, 0.1) == DeadLetter(
        "BAD_PDF", "permanent failure BAD_PDF"
    )


def test_a_built_in_reason_can_be_taken_off_or_put_on_the_breaker():
    book, _ = resolve_reasons(
        {
            "TIMEOUT": ReasonDeclaration(breaker=False),
            "PROCESSING_ERROR": ReasonDeclaration(breaker=True),
        }
    )
    assert not book.counts_for_breaker("TIMEOUT")
    assert book.counts_for_breaker("PROCESSING_ERROR")
    assert not book.permanent("TIMEOUT")


@pytest.mark.parametrize(
    ("declared", "key", "words"),
    [
        (
            {"VALIDATION_FAILED": ReasonDeclaration(action="retry")},
            "VALIDATION_FAILED.action",
            "permanent",
        ),
        ({"HTTP_503": ReasonDeclaration(action="retry")}, "HTTP_503", "could never apply"),
        ({"X": ReasonDeclaration(like="NOPE")}, "X.like", "not a built-in"),
        ({"X": ReasonDeclaration(kind="permanent", action="retry")}, "X.action", "permanent"),
        (
            {"X": ReasonDeclaration(like="VALIDATION_FAILED", action="retry")},
            "X.action",
            "permanent",
        ),
        ({"TIMEOUT": ReasonDeclaration(like="NETWORK_ERROR")}, "TIMEOUT.like", "built-in"),
        ({"TIMEOUT": ReasonDeclaration(kind="permanent")}, "TIMEOUT.kind", "cannot change"),
        ({"X": ReasonDeclaration(kind="sometimes")}, "X.kind", "transient"),
        (
            {"x": ReasonDeclaration(kind="transient"), "X": ReasonDeclaration(kind="transient")},
            "X",
            "twice",
        ),
        ({"bad name": ReasonDeclaration(kind="transient")}, "", "upper-case"),
    ],
)
def test_rules_that_cannot_apply_are_refused_naming_the_key(declared, key, words):
    with pytest.raises(ReasonConfigError) as caught:
        resolve_reasons(declared)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_custom_reasons_are_bounded():
    declared = {f"R{i}": ReasonDeclaration(kind="transient") for i in range(65)}
    with pytest.raises(ReasonConfigError, match="at most 64"):
        resolve_reasons(declared)


def test_a_book_refuses_a_custom_reason_that_shadows_a_built_in_one():
    with pytest.raises(ValueError, match="already"):
        ReasonBook([ReasonSpec("TIMEOUT", ReasonKind.PERMANENT, breaker=False)])


def test_the_policy_refuses_a_retry_rule_for_a_declared_permanent_reason():
    book = ReasonBook([ReasonSpec("BAD_PDF", ReasonKind.PERMANENT, breaker=False)])
    with pytest.raises(ValueError, match="permanent"):
        RetryPolicy(rules={"BAD_PDF": ReasonRule("retry", "exponential")}, reasons=book)


def test_an_override_changes_only_the_breaker_flag_of_a_built_in_reason():
    book = ReasonBook(
        overrides=[
            ReasonSpec(
                "PROCESSING_ERROR", ReasonKind.PERMANENT, breaker=True, agent_may_send=False
            ),
            ReasonSpec("AGENT_CRASH", ReasonKind.PERMANENT, breaker=False, agent_may_send=True),
        ]
    )
    assert book.get("PROCESSING_ERROR") == ReasonSpec(
        "PROCESSING_ERROR", ReasonKind.TRANSIENT, breaker=True, agent_may_send=True
    )
    assert book.get("AGENT_CRASH") == ReasonSpec(
        "AGENT_CRASH", ReasonKind.TRANSIENT, breaker=False, agent_may_send=False
    )


def test_an_override_of_an_unknown_reason_is_refused_by_name():
    with pytest.raises(ValueError) as caught:
        ReasonBook(overrides=[ReasonSpec("HTTP_503", ReasonKind.TRANSIENT, breaker=True)])
    assert str(caught.value) == "HTTP_503 is not a built-in reason"


def test_a_book_takes_up_to_64_custom_reasons():
    specs = [ReasonSpec(f"R{i}", ReasonKind.TRANSIENT, breaker=False) for i in range(65)]
    book = ReasonBook(specs[:64])
    assert book.names() == [*BUILTIN_REASONS, *(f"R{i}" for i in range(64))]
    assert "R63" in book and "R64" not in book and book.get("R64") is None
    with pytest.raises(ValueError) as caught:
        ReasonBook(specs)
    assert str(caught.value) == "at most 64 custom reasons, got 65"


def test_a_custom_reason_name_is_refused_with_the_rule_it_breaks():
    with pytest.raises(ValueError) as caught:
        ReasonBook([ReasonSpec("http_503", ReasonKind.TRANSIENT, breaker=False)])
    assert str(caught.value) == (
        "reason name 'http_503': expected upper-case letters, digits and _"
        " (at most 64, starting with a letter)"
    )
