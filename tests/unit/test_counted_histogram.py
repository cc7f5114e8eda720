"""``CountedHistogram`` reads as prometheus_client's ``Histogram`` observed k times."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cyllm.telemetry import TOKEN_GAP_BUCKETS, CountedHistogram


def series(text: str) -> dict[str, float]:
    """Sample lines (no comments, no ``_created``) by name and labels."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_k_observations_at_once_expose_what_k_single_ones_do():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counted = CountedHistogram("gaps_seconds", "gaps", "model", TOKEN_GAP_BUCKETS, ours)
    reference = Histogram("gaps_seconds", "gaps", ["model"], buckets=TOKEN_GAP_BUCKETS, registry=theirs)
    # on a bound (le is inclusive), between bounds, beyond the last, and two labels
    for model, gap, k in [("a", 0.001, 3), ("a", 0.003, 1), ("a", 7.5, 2), ("b", 0.05, 5), ("a", 0.0, 4)]:
        counted.observe(model, gap, k)
        for _ in range(k):
            reference.labels(model).observe(gap)
    mine, expected = series(generate_latest(ours).decode()), series(generate_latest(theirs).decode())
    assert mine.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(mine[key] - value) < 1e-9, key
    assert mine['gaps_seconds_count{model="a"}'] == 10
    assert mine['gaps_seconds_bucket{le="0.001",model="a"}'] == 7
