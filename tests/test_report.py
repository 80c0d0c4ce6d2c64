"""The report's Pareto rule and its plot's labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from hwnas.report import PARETO_LATENCY_TOL, dominates  # noqa: E402
from hwnas.utils import place_labels  # noqa: E402


def _m(ms, r1):
    return {"measured_ms": ms, "M(q,g)_recall@1": r1}


def test_dominates_counts_near_latencies_as_equal():
    a = _m(1.0, 0.80)
    assert dominates(_m(1.0, 0.81), a) and not dominates(a, _m(1.0, 0.81))
    assert not dominates(a, a)  # equal on both: neither is better
    # within the tolerance a slower, more accurate model still dominates; beyond it, not
    inside, outside = 1.0 + PARETO_LATENCY_TOL / 2, 1.0 + 2 * PARETO_LATENCY_TOL
    assert dominates(_m(inside, 0.81), a) and not dominates(_m(outside, 0.81), a)
    # faster by more than the tolerance at equal accuracy dominates; by less, it does not
    assert dominates(_m(1.0 - 2 * PARETO_LATENCY_TOL, 0.80), a)
    assert not dominates(_m(1.0 - PARETO_LATENCY_TOL / 2, 0.80), a)


def test_place_labels_keeps_clustered_labels_apart():
    """Three models at nearly one point: each label lands where it overlaps no other label
    and no other marker (a fixed offset wrote all three over each other)."""
    fig, ax = plt.subplots(figsize=(4, 3))
    pts = [(1.0, 1.0), (1.02, 1.01), (1.0, 1.03)]
    ax.scatter(*zip(*pts))
    ax.set_xlim(0.5, 1.5)
    ax.set_ylim(0.5, 1.5)
    place_labels(ax, pts, ["searched", "random-feasible", "smallest"])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == ["searched", "random-feasible", "smallest"]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(3) for j in range(i + 1, 3))
    plt.close(fig)
