"""``observe_many`` reaches into prometheus-client's Histogram: n equal observations must
read exactly as n calls of ``observe`` (buckets, sum, count), or this fails on upgrade."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from sidecar.runtime.engine import _HISTOGRAM_INTERNALS, observe_many


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in histogram.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_many_equal_observations_read_as_that_many_observes():
    registry = CollectorRegistry()
    one = Histogram("one", "", ["queue"], registry=registry, buckets=(0.1, 1.0, 5.0))
    many = Histogram("many", "", ["queue"], registry=registry, buckets=(0.1, 1.0, 5.0))
    for amount, count in ((0.05, 3), (0.7, 50), (9.0, 2), (1.0, 1)):
        for _ in range(count):
            one.labels("q").observe(amount)
        observe_many(many.labels("q"), amount, count)
    assert all(hasattr(many.labels("q"), name) for name in _HISTOGRAM_INTERNALS)
    mine = {(n.replace("many", "one"), le): v for (n, le), v in samples(many).items()}
    theirs = samples(one)
    # The sum is one multiplication instead of n additions: equal up to rounding.
    assert abs(mine.pop(("one_sum", "")) - theirs.pop(("one_sum", ""))) < 1e-9
    assert mine == theirs
    assert samples(one)[("one_count", "")] == 56
