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


def test_finalists_borrow_seeds_only_from_a_trained_kind_of_the_same_network():
    from hwnas.space import Arch, SearchSpace

    # the quickstart's space: its first stage rounds several scales to one width
    sp = SearchSpace(input_size=32, in_channels=1, width_mult=0.5, head_channels=512, embed_dim=128)
    first = sp.layers()[0]
    ops = list(sp.smallest().layers)
    a06, a08 = (Arch(tuple([(first.choices[0], s)] + ops[1:])).to_string(sp) for s in (0.6, 0.8))
    assert a06 != a08 and sp.canonical(sp.parse(a06)) == sp.canonical(sp.parse(a08))  # one network, two spellings
    other = sp.largest().to_string(sp)
    src = bench_search.finalists_seed_source
    both = {"bench-budget-0.6-searched": {}, "bench-budget-0.6-chosen": {}}
    # the choice is the best reward's arch: no "chosen" was trained, so the searched kind lends
    assert src(sp, 0.6, a08, (("searched", a06), ("chosen", a06)), {"bench-budget-0.6-searched": {}}) == "searched"
    assert src(sp, 0.6, a08, (("searched", other), ("chosen", a06)), both) == "chosen"
    assert src(sp, 0.6, other, (("searched", a06), ("chosen", a08)), both) is None
    # another budget's trainings lend nothing
    assert src(sp, 0.05, a06, (("searched", a06), ("chosen", a08)), both) is None


def _model(name, arch, seed=0, **kw):
    return {"name": name, "kind": "subnet", "arch": arch, "seed": seed, "M(q,g)": 0.8, "M(q,q)": 0.8,
            "measured_ms": 0.05, "measured_pools_ms": [0.05], **kw}


def test_a_lost_run_directory_keeps_the_models_its_results_file_reported_with_the_same_weights():
    budget = {"mobilenetv3": {**_model("mb", "mobilenetv3_small_050"), "kind": "timm"},
              "searched": _model("s", "A", weights_digest="d1"),
              "searched_seeds": [_model("s-seed1", "A", seed=1, weights_digest="d1")],
              "random": [_model("r0", "B", weights_digest="d1"), _model("r1", "C", weights_digest="d0")],
              "finalists": {**_model("f", "A", weights_digest="d1"), "chosen": "A", "seeds": [], "own_seeds": False}}
    prev = bench_search.result_rows([budget])
    assert set(prev) == {"mb", "s", "s-seed1", "r0", "r1", "f"}
    # latencies are measured again with the others; a finalists' row keeps its finalists.json
    assert not any(k.startswith("measured") for x in prev.values() for k in x)
    assert prev["f"]["chosen"] == "A" and "seeds" not in prev["f"]

    def same(row, kw):
        return row["arch"] == kw["arch"] and row["seed"] == kw.get("seed", 0)

    jobs = [("s", {"arch": "A"}), ("s-seed1", {"arch": "A", "seed": 1}), ("r0", {"arch": "X"}),
            ("r1", {"arch": "C"}), ("new", {"arch": "D"}), ("mb", {"arch": "mobilenetv3_small_050"})]
    got = bench_search.carry_rows(prev, jobs, "d1", same)
    # r0 is another arch now, r1 was made against other weights, mb predates the digest
    assert set(got) == {"s", "s-seed1"} and got["s"]["weights_digest"] == "d1"
    got = bench_search.carry_rows(prev, jobs, "d1", same, unstamped_ok=True)
    assert set(got) == {"s", "s-seed1", "mb"} and got["mb"]["weights_digest"] == "d1"
    # an adopted row says so for good, a stamped one does not
    assert got["mb"]["adopted_by"] and "adopted_by" not in got["s"]
    again = bench_search.carry_rows({**prev, "mb": got["mb"]}, jobs, "d1", same)
    assert again["mb"]["adopted_by"]
    assert bench_search.carry_rows(prev, jobs, "d2", same) == {}
    # the finished models of a budget not reported yet carry too
    late = bench_search.result_rows([budget], [_model("new", "D", weights_digest="d1")])
    assert set(bench_search.carry_rows(late, jobs, "d1", same)) == {"s", "s-seed1", "new"}


def test_models_kept_as_they_finish_survive_a_run_that_never_wrote_its_results(tmp_path):
    import json

    path = tmp_path / "search_x.json"
    reported = {"mobilenetv3": {**_model("mb", "mobilenetv3_small_050"), "kind": "timm"},
                "searched": _model("s", "A", weights_digest="d0"), "random": []}
    path.write_text(json.dumps({"budgets": [reported], "script": "bench_search.py --set a=1"}))
    bench_search.keep_in_progress(path, _model("s", "B", weights_digest="d1"))
    bench_search.keep_in_progress(path, _model("r0", "C", weights_digest="d1"))
    bench_search.keep_in_progress(path, _model("r0", "D", weights_digest="d1"))  # trained again: replaces
    res = json.loads(path.read_text())
    # nothing else in the file moves (a later run's --adopt-unstamped reads its script)
    assert res["script"] == "bench_search.py --set a=1" and res["budgets"] == [reported]
    assert [(x["name"], x["arch"]) for x in res["budgets_in_progress"]] == [("r0", "D"), ("s", "B")]
    # the kept rows of this run's weights win over the reported row of the same name
    prev = bench_search.result_rows(res["budgets"], [], res["budgets_in_progress"])
    assert prev["s"]["arch"] == "B" and prev["r0"]["arch"] == "D" and prev["mb"]["kind"] == "timm"

    def same(row, kw):
        return row["arch"] == kw["arch"]

    got = bench_search.carry_rows(prev, [("s", {"arch": "B"}), ("r0", {"arch": "D"})], "d1", same)
    assert set(got) == {"s", "r0"}


def test_unstamped_rows_are_adopted_only_where_the_supernet_scores_them_as_before():
    prev = {f"r{i}": _model(f"r{i}", f"a{i}", proxy_all=0.7 + i / 800, proxy_split=0.6 + i / 400) for i in range(12)}
    scores = {x["arch"]: {"all": x["proxy_all"], "split": x["proxy_split"]} for x in prev.values()}
    assert bench_search.unstamped_scores_agree(prev, scores)[0]
    moved = {**scores, "a3": {"all": scores["a3"]["all"] + 1 / 800, "split": scores["a3"]["split"]}}
    ok, why = bench_search.unstamped_scores_agree(prev, moved)
    assert not ok and "1 of 24" in why
    # too few recorded scores prove nothing
    few = {k: v for k, v in prev.items() if k in ("r0", "r1")}
    assert not bench_search.unstamped_scores_agree(few, scores)[0]


def test_a_carried_row_must_be_the_model_the_job_would_train():
    from hwnas.space import SearchSpace

    sp = SearchSpace(input_size=32, in_channels=1, width_mult=0.5, head_channels=512, embed_dim=128)
    small, large = sp.smallest().to_string(sp), sp.largest().to_string(sp)
    fin_search = {"runs/x/bench_search/bench-budget-0.3": small}

    def same(row, kw):
        return bench_search.same_model(row, kw, sp, 0, 4, 2, fin_search)

    row = {**_model("s", small), "train_loss_by_epoch": [4.0, 3.0, 2.0, 1.0]}
    assert same(row, {"arch": small})
    assert not same(row, {"arch": large})
    assert not same(row, {"arch": small, "seed": 1})  # another training seed
    assert not same({**row, "train_loss_by_epoch": [1.0] * 3}, {"arch": small})  # another schedule
    assert not same({**row, "arch": "k9@7,nonsense"}, {"arch": small})  # another space's arch
    mb = {**row, "kind": "timm", "arch": "mobilenetv3_small_050"}
    assert same(mb, {"timm_name": "mobilenetv3_small_050"}) and not same(mb, {"arch": small})
    # the finalists' choice: from the same search's choice, with as many finalist epochs
    fin = {**row, "search_best": small, "epochs": 2, "finalists": [{"arch": small}, {"arch": large}]}
    kw = {"finalists": 5, "finalists_from": "runs/x/bench_search/bench-budget-0.3"}
    assert same(fin, kw)
    assert not same({**fin, "search_best": large}, kw)
    assert not same({**fin, "epochs": 3}, kw)
    assert not same(fin, {**kw, "finalists": 1})
    # one that only finished (its budget not reported yet) carries too
    prev = bench_search.result_rows([], [{**fin, "name": "f", "weights_digest": "d"}])
    assert set(bench_search.carry_rows(prev, [("f", kw)], "d", same)) == {"f"}


def _width(w, qg, ms, seeds=()):
    return {**_model(f"bench-mobilenetv3_small_{w}", f"mobilenetv3_small_{w}", kind="timm"), "M(q,g)": qg,
            "mflops": {"050": 1.9, "075": 3.3, "100": 5.1}[w], "measured_ms": ms,
            "seeds": [{"name": f"bench-mobilenetv3_small_{w}-seed{k}", "M(q,g)": v, "M(q,q)": 0.8}
                      for k, v in enumerate(seeds, 1)]}


def test_the_baseline_is_the_best_mobilenetv3_width_within_a_budget_and_none_where_none_fits():
    widths = [_width("050", 0.78, 0.12), _width("075", 0.805, 0.155), _width("100", 0.81, 0.19, seeds=(0.79, 0.80))]
    searched = {**_model("s", "A"), "M(q,g)": 0.802, "M(q,q)": 0.81, "measured_ms": 0.17}
    rows = {}
    for b in (0.06, 0.16, 0.2076):
        r = {"budget_ms": b, "searched": searched, "random": [_model("r", "B", **{"M(q,g)": 0.79})],
             "random_median_M(q,g)": 0.79, "random_median_M(q,q)": 0.80, "random_median_measured_ms": 0.17,
             "mobilenetv3": widths[0], "mobilenetv3_widths": [dict(w) for w in widths]}
        bench_search.fit_baseline(r)
        rows[b] = r
    assert [rows[b]["mobilenetv3_fit"] for b in rows] == [
        [], ["bench-mobilenetv3_small_050", "bench-mobilenetv3_small_075"],
        ["bench-mobilenetv3_small_050", "bench-mobilenetv3_small_075", "bench-mobilenetv3_small_100"]]
    assert [rows[b]["mobilenetv3"]["fits_budget"] for b in rows] == [False, True, True]
    # over every width, no rival: the target is judged on the random median alone
    assert rows[0.06]["mobilenetv3"]["arch"] == "mobilenetv3_small_050"
    assert bench_search._shortfalls(searched, rows[0.06]) == []
    assert "no MobileNetV3-small width" in bench_search._target(searched, rows[0.06])
    # two widths fit: the rival is 0.75, the better on M(q,g), ahead of the searched arch and faster
    assert rows[0.16]["mobilenetv3"]["arch"] == "mobilenetv3_small_075"
    assert bench_search._shortfalls(searched, rows[0.16]) == ["M(q,g) below MobileNetV3-small-0.75",
                                                              "slower than MobileNetV3-small-0.75 (9.7%)"]
    # width 1.0 reaches 0.81 once, 0.80 over its three seeds: on the mean 0.75 is the better
    # rival, not the widest
    assert rows[0.2076]["mobilenetv3"]["arch"] == "mobilenetv3_small_075"
    assert bench_search._shortfalls(searched, rows[0.2076]) == ["M(q,g) below MobileNetV3-small-0.75",
                                                                "slower than MobileNetV3-small-0.75 (9.7%)"]
    assert bench_search._target({**searched, "M(q,g)": 0.81, "measured_ms": 0.15}, rows[0.2076]) == "searched >= both"
    # the widths' rows and their seeds carry to a later run; what the fit derived does not
    prev = bench_search.result_rows([{**rows[0.2076], "random": []}])
    assert {"bench-mobilenetv3_small_075", "bench-mobilenetv3_small_100-seed2"} <= set(prev)
    assert not any(k in x for x in prev.values() for k in ("fits_budget", "seeds", "measured_ms"))
    # a results file from before the widths (width 0.5 alone): unfitted, 0.5 is the rival
    # anywhere, as it was; fitted (the report fits every row), it is one only within budget
    old = {**rows[0.06], "mobilenetv3": widths[0]}
    del old["mobilenetv3_widths"], old["mobilenetv3_fit"]
    assert bench_search._shortfalls({**searched, "M(q,g)": 0.77}, old) == [
        "M(q,g) below the random median", "M(q,g) below MobileNetV3-small-0.5", "slower than MobileNetV3-small-0.5 (41.7%)"]
    bench_search.fit_baseline(old)
    assert old["mobilenetv3"]["fits_budget"] is False
    assert bench_search._shortfalls({**searched, "M(q,g)": 0.77}, old) == ["M(q,g) below the random median"]
