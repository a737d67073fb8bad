import pytest

from sidecar.policy.depth import DepthLevel, DepthThresholds, depth_actions, depth_level

T = DepthThresholds()


def test_defaults_follow_the_seed():
    assert (T.warning, T.critical, T.emergency) == (50, 200, 500)


@pytest.mark.parametrize(
    ("depth", "level"),
    [
        (0, DepthLevel.NORMAL),
        (50, DepthLevel.NORMAL),  # strict >, as in the seed
        (51, DepthLevel.WARNING),
        (200, DepthLevel.WARNING),
        (201, DepthLevel.CRITICAL),
        (500, DepthLevel.CRITICAL),
        (501, DepthLevel.EMERGENCY),
        (10**9, DepthLevel.EMERGENCY),
    ],
)
def test_depth_level(depth, level):
    assert depth_level(depth, T) is level


def test_custom_thresholds():
    t = DepthThresholds(warning=0, critical=1, emergency=2)
    assert [depth_level(d, t) for d in range(4)] == list(DepthLevel)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warning": 200, "critical": 200},
        {"critical": 600},
        {"warning": -1},
    ],
)
def test_invalid_thresholds(kwargs):
    with pytest.raises(ValueError):
        DepthThresholds(**kwargs)


def test_depth_actions():
    assert depth_actions(DepthLevel.NORMAL) == ()
    assert depth_actions(DepthLevel.WARNING) == ("alert",)
    assert depth_actions(DepthLevel.CRITICAL) == ("alert", "throttle_producers")
    assert depth_actions(DepthLevel.EMERGENCY) == (
        "alert",
        "throttle_producers",
        "hold_producers",
        "shrink_prefetch",
    )


def test_levels_are_ordered_with_labels():
    assert DepthLevel.NORMAL < DepthLevel.WARNING < DepthLevel.CRITICAL < DepthLevel.EMERGENCY
    assert DepthLevel.CRITICAL.label == "CRITICAL"
