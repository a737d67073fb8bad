import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.policy.failure import FailureReason
from sidecar.policy.retry import (
    DeadLetter,
    ReasonRule,
    Retry,
    RetryPolicy,
    apply_jitter,
    choose_tier,
    decide,
    exponential_backoff,
    parse_retry_after,
)

POLICY = RetryPolicy()


# --- RetryPolicy ---------------------------------------------------------------------------


def test_defaults_follow_the_seed():
    assert POLICY.max_attempts == 3
    assert POLICY.tiers == (1.0, 5.0, 30.0, 120.0, 600.0)
    assert POLICY.rules["NETWORK_ERROR"] == ReasonRule("retry", "exponential")
    assert POLICY.rules["RATE_LIMITED"] == ReasonRule("retry", "rate_limit")
    assert POLICY.rules["TIMEOUT"] == ReasonRule("retry", "reduced_scope")
    assert POLICY.rules["AGENT_CRASH"].action == "retry"
    assert POLICY.rules["PROCESSING_ERROR"].action == "retry"
    for reason in ("VALIDATION_FAILED", "UNRECOVERABLE", "CONSTRAINT_VIOLATION"):
        assert POLICY.rules[reason].action == "dead_letter"
    assert set(POLICY.rules) == set(FailureReason)


def test_policy_is_immutable_and_hashable():
    with pytest.raises(AttributeError):
        POLICY.max_attempts = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        POLICY.rules["TIMEOUT"] = ReasonRule("dead_letter", "none")  # type: ignore[index]
    assert hash(RetryPolicy()) == hash(RetryPolicy())


def test_rules_are_copied_not_aliased():
    rules = {"PROCESSING_ERROR": ReasonRule("retry", "exponential")}
    policy = RetryPolicy(rules=rules)
    rules["PROCESSING_ERROR"] = ReasonRule("dead_letter", "none")
    assert policy.rule_for("PROCESSING_ERROR").action == "retry"


def test_tiers_given_as_list_become_a_tuple():
    assert RetryPolicy(tiers=[1.0, 600.0]).tiers == (1.0, 600.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base_delay": 0}, "base_delay"),
        ({"max_delay": -1}, "max_delay"),
        ({"rate_limit_default_delay": 0}, "rate_limit_default_delay"),
        ({"base_delay": 10, "max_delay": 5}, "max_delay must be >= base_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"tiers": ()}, "tiers must not be empty"),
        ({"tiers": (1.0, 1.0, 600.0)}, "strictly increasing"),
        ({"tiers": (5.0, 1.0, 600.0)}, "strictly increasing"),
        ({"tiers": (0.0, 600.0)}, "positive"),
        ({"tiers": (1.0, 60.0)}, "exceeds the largest tier"),
        ({"rules": {"TIMEOUT": ReasonRule("retry", "linear")}}, "unknown action or backoff"),
        ({"rules": {"TIMEOUT": ReasonRule("maybe", "none")}}, "unknown action or backoff"),
        ({"rules": {"TIMEOUT": ReasonRule("retry", "exponential", 0)}}, "max_attempts"),
        ({"rules": {"UNRECOVERABLE": ReasonRule("retry", "exponential")}}, "permanent"),
    ],
)
def test_invalid_policies_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


def test_unknown_reason_uses_processing_error_rule():
    policy = RetryPolicy(
        rules={"PROCESSING_ERROR": ReasonRule("retry", "exponential", max_attempts=7)}
    )
    assert policy.rule_for("SOMETHING_NEW").max_attempts == 7


def test_rule_set_without_processing_error_still_retries_unknown_reasons():
    policy = RetryPolicy(rules={"TIMEOUT": ReasonRule("retry", "reduced_scope")})
    assert policy.rule_for("WHATEVER") == ReasonRule("retry", "exponential")


# --- helpers -------------------------------------------------------------------------------


def test_exponential_backoff_doubles_and_caps():
    assert [exponential_backoff(a, POLICY) for a in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert exponential_backoff(9, POLICY) == 256.0
    assert exponential_backoff(10, POLICY) == 300.0
    assert exponential_backoff(100_000, POLICY) == 300.0  # no OverflowError


def test_exponential_backoff_respects_custom_shape():
    policy = RetryPolicy(base_delay=0.5, multiplier=3.0, max_delay=10.0)
    assert [exponential_backoff(a, policy) for a in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 10.0]


def test_exponential_backoff_rejects_attempt_zero():
    with pytest.raises(ValueError):
        exponential_backoff(0, POLICY)


def test_apply_jitter_only_shortens():
    assert apply_jitter(10.0, 0.2, 0.0) == 10.0
    assert apply_jitter(10.0, 0.2, 0.5) == pytest.approx(9.0)
    assert apply_jitter(10.0, 0.2, 0.999999) == pytest.approx(8.0, abs=1e-4)
    assert apply_jitter(10.0, 0.0, 0.7) == 10.0


@pytest.mark.parametrize(("fraction", "u"), [(1.0, 0.5), (-0.1, 0.5), (0.2, 1.0), (0.2, -0.1)])
def test_apply_jitter_rejects_out_of_range(fraction, u):
    with pytest.raises(ValueError):
        apply_jitter(1.0, fraction, u)


@pytest.mark.parametrize(
    ("delay", "tier"),
    [(0.1, 1.0), (1.0, 1.0), (1.01, 5.0), (5.0, 5.0), (29.9, 30.0), (600.0, 600.0), (900, 600.0)],
)
def test_choose_tier(delay, tier):
    assert choose_tier(delay, POLICY.tiers) == tier


def test_choose_tier_needs_tiers():
    with pytest.raises(ValueError):
        choose_tier(1.0, [])


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Retry-After: 30", 30.0),
        ("retry after 2.5s", 2.5),
        ("rate limited, try again in 1500ms", 1.5),
        ("429 Too Many Requests; retry-after=120", 120.0),
        ("RETRY_AFTER=7", 7.0),
        ("please retry in 3 seconds", 3.0),
        ("retry after 2 minutes", 120.0),
        ("try again in 1 min", 60.0),
        ("retry after 30 more requests", 30.0),
        ("retry-after: 250 milliseconds", 0.25),
    ],
)
def test_parse_retry_after(message, seconds):
    assert parse_retry_after(message) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "message", ["", "429 Too Many Requests", "retry later", "timed out after 5000ms"]
)
def test_parse_retry_after_absent(message):
    assert parse_retry_after(message) is None


# --- decide --------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["VALIDATION_FAILED", "UNRECOVERABLE", "CONSTRAINT_VIOLATION"])
def test_permanent_failures_dead_letter_on_first_attempt(reason):
    result = decide(reason, "bad input", 1, None, POLICY, 0.3)
    assert result == DeadLetter(reason, f"permanent failure {reason}")


def test_network_error_retries_with_exponential_backoff():
    first = decide("NETWORK_ERROR", "ECONNRESET", 1, None, POLICY, 0.0)
    second = decide("NETWORK_ERROR", "ECONNRESET", 2, None, POLICY, 0.0)
    assert first == Retry(delay=1.0, tier=1.0, reduced_scope=False, next_attempt=2)
    assert second == Retry(delay=2.0, tier=5.0, reduced_scope=False, next_attempt=3)


def test_attempt_limit_dead_letters():
    result = decide("NETWORK_ERROR", "ECONNRESET", 3, None, POLICY, 0.0)
    assert result == DeadLetter("NETWORK_ERROR", "attempt limit 3 reached")
    assert isinstance(decide("NETWORK_ERROR", "x", 99, None, POLICY, 0.0), DeadLetter)


def test_max_attempts_one_means_no_retry():
    policy = RetryPolicy(max_attempts=1)
    assert decide("AGENT_CRASH", "", 1, None, policy, 0.0) == DeadLetter(
        "AGENT_CRASH", "attempt limit 1 reached"
    )


def test_per_reason_limit_overrides_the_global_one():
    rules = dict(POLICY.rules, RATE_LIMITED=ReasonRule("retry", "rate_limit", max_attempts=10))
    policy = RetryPolicy(rules=rules)
    assert isinstance(decide("RATE_LIMITED", "", 5, None, policy, 0.0), Retry)
    assert decide("RATE_LIMITED", "", 10, None, policy, 0.0) == DeadLetter(
        "RATE_LIMITED", "attempt limit 10 reached"
    )
    assert isinstance(decide("NETWORK_ERROR", "", 3, None, policy, 0.0), DeadLetter)


def test_timeout_retries_with_reduced_scope_and_growing_delay():
    first = decide("TIMEOUT", "Request timed out after 5000ms", 1, None, POLICY, 0.0)
    second = decide("TIMEOUT", "Request timed out after 5000ms", 2, None, POLICY, 0.0)
    assert isinstance(first, Retry)
    assert isinstance(second, Retry)
    assert first.reduced_scope
    assert second.reduced_scope
    assert second.delay > first.delay


@pytest.mark.parametrize("reason", ["NETWORK_ERROR", "AGENT_CRASH", "PROCESSING_ERROR"])
def test_only_timeout_reduces_scope(reason):
    result = decide(reason, "", 1, None, POLICY, 0.0)
    assert isinstance(result, Retry)
    assert not result.reduced_scope


def test_rate_limit_prefers_agent_reported_retry_after():
    result = decide("RATE_LIMITED", "Retry-After: 45", 1, 12.0, POLICY, 0.0)
    assert result == Retry(delay=12.0, tier=30.0, reduced_scope=False, next_attempt=2)


def test_rate_limit_parses_the_error_message():
    result = decide("RATE_LIMITED", "429; retry-after=45", 1, None, POLICY, 0.0)
    assert isinstance(result, Retry)
    assert (result.delay, result.tier) == (45.0, 120.0)


def test_rate_limit_defaults_when_nothing_says_how_long():
    result = decide("RATE_LIMITED", "429 Too Many Requests", 1, None, POLICY, 0.0)
    assert isinstance(result, Retry)
    assert (result.delay, result.tier) == (30.0, 30.0)


def test_rate_limit_delay_is_capped_at_max_delay():
    result = decide("RATE_LIMITED", "", 1, 86_400.0, POLICY, 0.0)
    assert isinstance(result, Retry)
    assert (result.delay, result.tier) == (300.0, 600.0)


def test_rate_limit_zero_is_not_a_hot_loop():
    result = decide("RATE_LIMITED", "", 1, 0.0, POLICY, 0.0)
    assert isinstance(result, Retry)
    assert result.delay == POLICY.base_delay


@pytest.mark.parametrize("bad", [-5.0, math.nan, math.inf])
def test_rate_limit_ignores_nonsense_retry_after(bad):
    result = decide("RATE_LIMITED", "retry after 7s", 1, bad, POLICY, 0.0)
    assert isinstance(result, Retry)
    assert result.delay == 7.0


def test_rate_limit_delay_is_not_exponential():
    a = decide("RATE_LIMITED", "", 1, 10.0, POLICY, 0.0)
    b = decide("RATE_LIMITED", "", 2, 10.0, POLICY, 0.0)
    assert isinstance(a, Retry)
    assert isinstance(b, Retry)
    assert a.delay == b.delay == 10.0


def test_jitter_shortens_the_delay_but_keeps_the_tier():
    plain = decide("NETWORK_ERROR", "", 2, None, POLICY, 0.0)
    jittered = decide("NETWORK_ERROR", "", 2, None, POLICY, 0.5)
    assert isinstance(plain, Retry)
    assert isinstance(jittered, Retry)
    assert jittered.delay == pytest.approx(2.0 * 0.9)
    assert jittered.tier == plain.tier == 5.0


def test_tier_comes_from_the_unjittered_delay():
    # 1.0 s exactly fits the 1 s tier; jitter must not push it to a different tier.
    result = decide("NETWORK_ERROR", "", 1, None, POLICY, 0.99)
    assert isinstance(result, Retry)
    assert result.tier == 1.0
    assert result.delay < 1.0


def test_unknown_reason_is_retried_like_processing_error():
    assert decide("MARTIAN", "?", 1, None, POLICY, 0.0) == decide(
        "PROCESSING_ERROR", "?", 1, None, POLICY, 0.0
    )


def test_dead_letter_rule_for_a_transient_reason():
    rules = dict(POLICY.rules, AGENT_CRASH=ReasonRule("dead_letter", "none"))
    result = decide("AGENT_CRASH", "", 1, None, RetryPolicy(rules=rules), 0.0)
    assert result == DeadLetter("AGENT_CRASH", "no retry configured for AGENT_CRASH")


def test_retry_without_backoff_uses_a_constant_base_delay():
    rules = dict(POLICY.rules, AGENT_CRASH=ReasonRule("retry", "none", max_attempts=9))
    policy = RetryPolicy(rules=rules, base_delay=2.0)
    results = [decide("AGENT_CRASH", "", a, None, policy, 0.0) for a in range(1, 9)]
    assert all(isinstance(r, Retry) and r.delay == 2.0 for r in results)


def test_decide_rejects_attempt_zero():
    with pytest.raises(ValueError):
        decide("TIMEOUT", "", 0, None, POLICY, 0.0)


def test_seeded_random_gives_reproducible_decisions():
    a = [decide("TIMEOUT", "", 1, None, POLICY, random.Random(7).random()) for _ in range(3)]
    b = [decide("TIMEOUT", "", 1, None, POLICY, random.Random(7).random()) for _ in range(3)]
    assert a == b


@given(
    reason=st.sampled_from([*FailureReason, "UNKNOWN"]),
    attempt=st.integers(min_value=1, max_value=50),
    retry_after=st.none() | st.floats(min_value=-10, max_value=1e6, allow_nan=False),
    u=st.floats(min_value=0, max_value=1, exclude_max=True),
    jitter=st.floats(min_value=0, max_value=0.99),
)
def test_every_retry_waits_within_its_tier(reason, attempt, retry_after, u, jitter):
    policy = RetryPolicy(jitter=jitter)
    result = decide(reason, "", attempt, retry_after, policy, u)
    if isinstance(result, Retry):
        assert 0 < result.delay <= result.tier
        assert result.tier in policy.tiers
        assert result.delay >= policy.base_delay * (1 - jitter) - 1e-12
        assert result.next_attempt == attempt + 1
        assert attempt < policy.max_attempts
    else:
        assert result.reason == reason
