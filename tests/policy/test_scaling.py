import pytest

from sidecar.policy.scaling import ScalingPolicy, recommended_consumers, scaling_event

P = ScalingPolicy()


@pytest.mark.parametrize(
    ("depth", "consumers"),
    [(0, 1), (1, 1), (10, 1), (11, 2), (42, 5), (200, 20), (500, 50), (501, 50), (10**12, 50)],
)
def test_recommended_consumers(depth, consumers):
    assert recommended_consumers(depth, P) == consumers


def test_min_consumers_floor_and_zero_allowed():
    assert recommended_consumers(0, ScalingPolicy(min_consumers=3)) == 3
    assert recommended_consumers(0, ScalingPolicy(min_consumers=0)) == 0
    assert recommended_consumers(1, ScalingPolicy(min_consumers=0)) == 1


def test_custom_ratio():
    assert recommended_consumers(100, ScalingPolicy(messages_per_consumer=30)) == 4


def test_huge_depth_has_no_float_error():
    policy = ScalingPolicy(messages_per_consumer=1, max_consumers=10**18)
    assert recommended_consumers(10**17 + 1, policy) == 10**17 + 1


def test_negative_depth_is_rejected():
    with pytest.raises(ValueError):
        recommended_consumers(-1, P)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages_per_consumer": 0},
        {"min_consumers": -1},
        {"min_consumers": 5, "max_consumers": 4},
        {"min_consumers": 0, "max_consumers": 0},
    ],
)
def test_invalid_policy(kwargs):
    with pytest.raises(ValueError):
        ScalingPolicy(**kwargs)


def test_scaling_event():
    assert scaling_event(3, 20) == "scale_up"
    assert scaling_event(20, 3) == "scale_down"
    assert scaling_event(5, 5) == "steady"


def test_seed_backlog_scenario_scales_up():
    # The seed's test: a backlog of 200 on a queue with 3 consumers must scale up.
    assert scaling_event(3, recommended_consumers(200, P)) == "scale_up"
