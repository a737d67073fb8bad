"""The argument types the ``sidecar`` command and the operator tools share."""

from __future__ import annotations

import argparse

import pytest

from sidecar.commands import (
    nonnegative_int,
    positive_float,
    positive_int,
    positive_number,
    whole_number,
)


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_int, "0", "must be at least 1: '0'"),
        (positive_int, "1.5", "not an integer: '1.5'"),
        (nonnegative_int, "-1", "must be at least 0: '-1'"),
        (whole_number(1, 1_000_000), "1000001", "must be between 1 and 1000000: '1000001'"),
        (positive_float, "0", "must be > 0: '0'"),
        (positive_float, "nan", "must be > 0: 'nan'"),
        # An infinite --rate would turn the token bucket's arithmetic into nan.
        (positive_float, "inf", "must be > 0: 'inf'"),
        (positive_float, "fast", "not a number: 'fast'"),
        (positive_number(most=86400), "86401", "must be > 0 and at most 86400: '86401'"),
    ],
)
def test_a_bad_argument_is_refused_with_its_rule(parse, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (positive_int, "1", 1),
        (nonnegative_int, "0", 0),
        (whole_number(1, 1_000_000), "1000000", 1_000_000),
        (positive_float, "0.25", 0.25),
        (positive_number(most=86400), "86400", 86400.0),
    ],
)
def test_the_edges_of_each_range_are_accepted(parse, text: str, value: float) -> None:
    assert parse(text) == value
