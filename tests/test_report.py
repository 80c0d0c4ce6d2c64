"""The report's Pareto rule and its plot's labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from hwnas.report import PARETO_LATENCY_TOL, dominates, headline_table  # noqa: E402
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
    # nor over another model's marker (6 pt around its point), nor across the axes' edge
    rad = 6 * fig.dpi / 72
    marks = [Bbox.from_extents(x - rad, y - rad, x + rad, y + rad) for x, y in ax.transData.transform(pts)]
    assert not any(boxes[i].overlaps(marks[j]) for i in range(3) for j in range(3) if i != j)
    frame = ax.get_window_extent(r)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)


def test_place_labels_keeps_a_label_at_the_edge_inside_the_axes():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.scatter([0.98], [0.5])
    place_labels(ax, [(0.98, 0.5)], ["paragon (resnet18)"])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box, frame = ax.texts[0].get_window_extent(r), ax.get_window_extent(r)
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1
    plt.close(fig)


def test_the_budget_speedup_is_the_one_the_search_ran_at(tmp_path):
    """The plot's target line: the speed-up budget.json resolved the search's budget from —
    not one of a budget given in ms, nor of a search run by hand at another budget."""
    import json

    from hwnas.report import _budget_speedup

    assert _budget_speedup(tmp_path, 0.08) is None  # no budget.json: a search run by hand
    b = {"key": {"budget_ms": None, "budget_speedup": 12, "budget_fraction": 0.15},
         "resolved": {"budget_ms": 0.0798, "target_ms": 0.115}}
    (tmp_path / "budget.json").write_text(json.dumps(b))
    assert _budget_speedup(tmp_path, 0.0798) == 12
    assert _budget_speedup(tmp_path, 0.2) is None
    b["resolved"]["clamped_from_ms"] = 0.031  # below the fastest subnet: moved into the range
    (tmp_path / "budget.json").write_text(json.dumps(b))
    assert _budget_speedup(tmp_path, 0.0798) is None
    del b["resolved"]["clamped_from_ms"]
    b["key"]["budget_ms"] = 0.0798
    (tmp_path / "budget.json").write_text(json.dumps(b))
    assert _budget_speedup(tmp_path, 0.0798) is None


def _row(model, ms, r1, **extra):
    return {"model": model, "mflops": 1.0, "predicted_ms": ms, "measured_ms": ms, "flops_reduction": 50.0,
            "latency_reduction": 13.0, "M(q,g)_recall@1": r1, "M(q,q)_recall@1": r1,
            "gap_points": 100 * (0.7855 - r1), **extra}


def test_the_headline_names_each_paired_test_and_an_older_report_still_renders():
    old = {"paragon": {"model": "resnet18", "mflops": 70.9, "measured_ms": 0.9, "M(g,g)_recall@1": 0.7855},
           "rows": [_row("searched", 0.068, 0.8055), _row("smallest", 0.062, 0.807)],
           "targets": {"gap_points<=1": True}}
    assert "McNemar" not in headline_table(old)  # a report from before the paired tests
    new = {**old, "searched_vs_baselines_paired": {
        "smallest": {"queries": 2000, "only_searched": 40, "only_baseline": 43, "p_value": 0.83}}}
    new["rows"] = [_row("searched", 0.068, 0.8055, vs_paragon_paired={
        "queries": 2000, "only_query": 150, "only_paragon": 110, "p_value": 0.015}), old["rows"][1]]
    t = headline_table(new, markdown=True)
    assert "over the 2000 test queries" in t and "exact McNemar p" in t
    assert "the paragon's M(g,g) +2.00 (150 / 110, p = 0.015)" in t
    assert "smallest -0.15 (40 / 43, p = 0.83)" in t


def test_a_verification_search_shows_its_metric_beside_recall():
    """search.metric TAR@FAR=f: report.json carries it for the paragon and each model, and the
    headline shows M(q,g) at it beside recall@1 (the verdicts stay on recall@1)."""
    rep = {"paragon": {"model": "resnet18", "mflops": 70.9, "measured_ms": 0.9, "M(g,g)_recall@1": 0.78,
                       "M(g,g)_TAR@FAR=0.001": 0.912},
           "rows": [_row("searched", 0.068, 0.80, **{"M(q,g)_TAR@FAR=0.001": 0.874})],
           "verification": "TAR@FAR=0.001"}
    t = headline_table(rep, markdown=True)
    assert "M(q,g) TAR@FAR=0.001" in t.splitlines()[0] and "91.20" in t and "87.40" in t
    assert "TAR@FAR" not in headline_table({**rep, "verification": None})
