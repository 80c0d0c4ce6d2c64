"""Helpers of the benchmark scripts whose figures BENCHMARKS.md states as findings."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_search = pytest.importorskip("bench_search")


def _runs(values, name="m"):
    return [{"name": f"{name}-{i}", "M(q,g)": v} for i, v in enumerate(values)]


def _budget(random_qg, searched_qg, finalists_qg=None, finalists_own=True):
    s = _runs(searched_qg, "bench-budget-0.6-searched")
    row = {"random": _runs(random_qg, "r"), "searched": s[0], "searched_seeds": s[1:]}
    if finalists_qg:
        f = _runs(finalists_qg, "bench-budget-0.6-finalists")
        f[0]["name"] = "bench-budget-0.6-finalists"
        seeds = f[1:] if finalists_own else s[1:]
        row["finalists"] = {**f[0], "seeds": seeds, "own_seeds": finalists_own}
    return row


def test_noise_components_split_random_spread_into_training_noise_and_architecture():
    rng = random.Random(0)
    # archs that differ by 2 points, each trained with 0.5 points of noise
    arch = [rng.gauss(0.80, 0.02) for _ in range(400)]
    rand = [a + rng.gauss(0, 0.005) for a in arch]
    searched = [0.81 + rng.gauss(0, 0.005) for _ in range(200)]
    c = bench_search.noise_components(_budget(rand, searched))
    assert c["within_df"] == 199
    assert c["within_sd"] == pytest.approx(0.005, rel=0.15)
    assert c["random_sd"] == pytest.approx(statistics.stdev(rand))
    assert c["arch_sd"] == pytest.approx(0.02, rel=0.15)
    # where the random archs spread no more than one arch's seeds, architecture adds nothing
    flat = bench_search.noise_components(_budget([0.80, 0.801, 0.799, 0.80], [0.79, 0.81, 0.80]))
    assert flat["arch_sd"] == 0.0


def test_noise_components_pool_by_degrees_of_freedom_the_finalists_own_seeds_only():
    searched, best, fin = [0.80, 0.82], [0.79, 0.80, 0.81, 0.84], [0.78, 0.84, 0.80]
    row = _budget([0.80, 0.81, 0.82], searched, finalists_qg=fin)
    row["best_reward"] = {**_runs(best[:1], "b")[0], "seeds": _runs(best[1:], "b")}
    c = bench_search.noise_components(row)
    # three archs trained 2, 4 and 3 times: df 1 + 3 + 2, each variance weighted by its df
    assert c["within_df"] == 6
    pooled = (1 * statistics.variance(searched) + 3 * statistics.variance(best) + 2 * statistics.variance(fin)) / 6
    assert c["within_sd"] ** 2 == pytest.approx(pooled)
    assert c["within_sd"] ** 2 != pytest.approx(statistics.mean(statistics.variance(g) for g in (searched, best, fin)))
    # a finalists' choice that is the searched arch borrows its seeds: not counted twice
    row = _budget([0.80, 0.81, 0.82], searched, finalists_qg=fin, finalists_own=False)
    assert bench_search.noise_components(row)["within_df"] == 1
    # no arch trained twice: nothing to tell training noise from
    assert bench_search.noise_components(_budget([0.80, 0.81, 0.82], [0.80])) is None
