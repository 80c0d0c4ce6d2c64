import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hwnas.errors import HwnasError
from hwnas.latency.backends import BACKENDS, get_backend, measure, physical_cores
from hwnas.latency.profile import kendall, profile_space, spearman, validate_table
from hwnas.latency.table import LatencyPredictor, LatencyTable
from hwnas.space import all_op_specs, resolve_ops


# ---------------------------------------------------------------- the backend contract
def _backend(name):
    cls = BACKENDS[name]
    reason = cls.unavailable_reason()
    if reason:
        pytest.skip(f"{name} not available here: {reason}")
    return get_backend("cpu" if name == "onnxruntime-cpu" else "gpu", name)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_contract(name):
    b = _backend(name)
    s = b.settings()
    assert {"backend", "device", "device_name", "runtime", "runtime_version", "threads",
            "precision"} <= set(s)
    small = torch.nn.Conv2d(3, 4, 3, padding=1)
    big = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)])
    rs = b.prepare(small, (1, 3, 16, 16))
    rb = b.prepare(big, (1, 64, 32, 32))
    t = rs.run_timed(3)
    assert len(t) == 3 and all(x > 0 and np.isfinite(x) for x in t)
    ms, mb = measure([rs, rb], rounds=4, runs=3, warmup=2)
    assert ms.n == 12 and ms.rounds == 4
    assert 0 < ms.min_ms <= ms.median_ms
    assert mb.median_ms > 3 * ms.median_ms  # ~1,000x the FLOPs: clearly slower
    # whole networks against one another: several pools, each figure its median pool's
    from hwnas.latency.backends import measure_models

    ps, pb = measure_models([rs, rb], pools=3)
    assert len(ps.pools_ms) == 3 and ps.latency_ms == sorted(ps.pools_ms)[1]
    assert pb.latency_ms > 3 * ps.latency_ms and "pools_ms" not in ms.to_dict()
    # a network timed in several sessions: its figure is its median session's (of whose
    # pools it is the median)
    sessions = b.prepare_sessions(small, (1, 3, 16, 16), n=3)
    assert len(sessions) == 3 and len({id(x) for x in sessions}) == 3
    pm, pb2 = measure_models([sessions, rb], pools=3)
    assert len(pm.sessions_ms) == 3 and pm.latency_ms == sorted(pm.sessions_ms)[1]
    assert len(pm.pools_ms) == 3 and pm.latency_ms == sorted(pm.pools_ms)[1] and pb2.sessions_ms is None
    assert pb2.latency_ms > 3 * pm.latency_ms


def test_gpu_without_gpu_is_one_clear_line():
    if not BACKENDS["torch-cuda"].unavailable_reason():
        pytest.skip("a GPU is present")
    with pytest.raises(HwnasError, match="no CUDA GPU"):
        get_backend("gpu")
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", "--device", "gpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0] and "hwnas[gpu]" in err[0]


def test_physical_cores():
    assert 1 <= physical_cores() <= (torch.get_num_threads() + 64)


# ---------------------------------------------------------------- tables
@pytest.fixture(scope="module")
def table(tiny_space, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "t.json"
    b = get_backend("cpu", threads=1)
    return profile_space(tiny_space, b, out, rounds=2, runs=2, warmup=1, log=lambda *_: None), out, b


def test_table_covers_every_op(table, tiny_space):
    t, out, _ = table
    keys = {s.key() for s in all_op_specs(tiny_space)}
    assert keys == set(t.entries)
    d = json.loads(out.read_text())
    h = d["header"]
    for k in ("device", "device_name", "runtime_version", "threads", "batch", "input_size",
              "warmup", "rounds", "runs_per_round", "space_hash", "date", "call_overhead_ms"):
        assert k in h, k
    assert h["complete"] and h["threads"] == 1 and h["space_hash"] == tiny_space.hash
    e = next(iter(d["entries"].values()))
    assert {"median_ms", "p10_ms", "cv_pct", "n"} <= set(e)
    assert h["statistic_key"] == "p10_ms"
    # each op's timing holds one call: the overhead, timed among the ops, is never above them
    assert 0 < h["call_overhead_ms"] <= min(e["p10_ms"] for e in d["entries"].values())


def test_call_overhead_above_the_cheapest_op_is_capped():
    """A call overhead measured above the cheapest op's timing (noise: that timing holds one
    call) would count every cheap op as free, and once made a table predict one latency for
    every arch: it is lowered to the cheapest op's timing, with a note."""
    from hwnas.latency.profile import cap_call_overhead
    from hwnas.latency.table import LatencyTable

    t = LatencyTable({"statistic_key": "p10_ms", "call_overhead_ms": 0.025},
                     {"a": {"p10_ms": 0.011}, "b": {"p10_ms": 0.020}})
    logs = []
    cap_call_overhead(t, logs.append)
    assert t.header["call_overhead_ms"] == 0.011
    assert any("0.025" in m and "0.011" in m for m in logs)
    t.header["call_overhead_ms"] = 0.008  # below: kept as measured
    cap_call_overhead(t, logs.append)
    assert t.header["call_overhead_ms"] == 0.008 and len(logs) == 1


def test_resume_measures_only_missing(table, tiny_space, tmp_path):
    t, out, b = table
    d = json.loads(out.read_text())
    keys = sorted(d["entries"])
    for k in keys[:5]:
        del d["entries"][k]
    d["header"]["complete"] = False  # as left by a killed build
    part = tmp_path / "part.json"
    part.write_text(json.dumps(d))
    logs = []
    t2 = profile_space(tiny_space, b, part, rounds=2, runs=2, warmup=1, log=logs.append)
    assert any("5 of" in line for line in logs)
    assert set(t2.entries) == set(t.entries)
    for k in keys[5:]:
        assert t2.entries[k] == t.entries[k]  # finished work kept as it was
    # the overhead is not timed again (only capped, should a re-timed op come in below it)
    low = min(e["p10_ms"] for e in t2.entries.values())
    assert t2.header["call_overhead_ms"] == min(t.header["call_overhead_ms"], low)


def test_mismatches_are_clear_errors(table, tiny_space):
    t, out, b = table
    from hwnas.space import SearchSpace

    other = SearchSpace.from_dict({**tiny_space.to_dict(), "embed_dim": 8})
    with pytest.raises(HwnasError, match="hwnas profile --device cpu"):
        LatencyTable.load(out).check(other)
    with pytest.raises(HwnasError, match="threads"):
        LatencyTable.load(out).check(tiny_space, {**b.settings(), "threads": 7})
    with pytest.raises(HwnasError, match="runtime_version"):
        LatencyTable.load(out).check(tiny_space, {**b.settings(), "runtime_version": "0.1"})
    # a table measured on the graphs an older hwnas exported (no graph_form: form 1)
    old = LatencyTable.load(out)
    del old.header["graph_form"]
    with pytest.raises(HwnasError, match="graph form 1.*--remeasure"):
        old.check(tiny_space, b.settings())
    t3 = LatencyTable.load(out)
    key = sorted(t3.entries)[0]
    del t3.entries[key]
    with pytest.raises(HwnasError, match=f"{key}.*--only-missing"):
        LatencyPredictor(tiny_space, t3)


def test_predictor_is_additive_and_fast(table, tiny_space):
    t, _, _ = table
    p = LatencyPredictor(tiny_space, t, calibrated=False)
    ov = t.header["call_overhead_ms"]
    arch = tiny_space.sample(3)
    manual = ov + sum(max(0.0, t.entries[o.key()]["p10_ms"] - ov)
                      for o in resolve_ops(tiny_space, arch) if o.kind != "skip")
    assert p.additive(arch) == pytest.approx(manual)
    lo, hi = p.range()
    assert lo <= p(arch) <= hi
    assert p(p.extreme_arch(True)) == pytest.approx(lo)
    archs = [tiny_space.sample(i) for i in range(2000)]
    t0 = time.perf_counter()
    for a in archs:
        p(a)
    rate = len(archs) / (time.perf_counter() - t0)
    assert rate > 10_000, f"{rate:.0f} predictions/s"


def test_random_feasible_archs_fit_tight_budgets(table, tiny_space):
    """A budget few uniform archs meet still yields random feasible archs (the report's
    random baseline and the search benchmark need them); below the range is a clear error."""
    import random

    t, _, _ = table
    p = LatencyPredictor(tiny_space, t)
    lo, _ = p.range()
    rng = random.Random(0)
    # at most 2% of uniform archs fit (a budget fixed in ms could leave one feasible arch on a
    # table timed while the machine was slow, and make this test depend on the timings). The
    # budget is the largest predicted time that at most 20 of 1000 sampled archs meet, so archs
    # tied at one predicted time (a coarse table's) cannot make far more of them fit; CI once
    # drew 5 of 50 fresh archs under the sample's 11th-fastest time
    lats = sorted(p(tiny_space.sample(rng)) for _ in range(1000))
    fits = [v for v in lats if sum(u <= v for u in lats) <= 20]
    assert fits, f"{lats.count(lats[0])} of 1000 sampled archs tie at the fastest, {lats[0]} ms"
    tight = fits[-1]  # (at most 2% of the sampled archs fit it, by construction)
    archs = [p.sample_feasible(tight, random.Random(i), tries=50) for i in range(5)]
    assert all(p(a) <= tight for a in archs)
    assert len({a.to_string(tiny_space) for a in archs}) > 1  # random, not one fixed arch
    assert p.sample_feasible(tight, random.Random(3)) == p.sample_feasible(tight, random.Random(3))
    with pytest.raises(Exception, match="fastest is predicted"):
        p.sample_feasible(lo - 0.01, random.Random(0))


def test_validation_writes_header_and_plot(table, tiny_space, tmp_path):
    t, out, b = table
    dst = tmp_path / "v.json"
    dst.write_text(out.read_text())
    tv = LatencyTable.load(dst)
    v = validate_table(tiny_space, tv, b, 6, dst, calibrate=4, rounds=2, runs=2, warmup=1,
                       log=lambda *_: None)
    h = json.loads(dst.read_text())["header"]
    assert {"n", "mape_pct", "within_5pct", "within_10pct", "spearman", "kendall"} <= set(h["validation"])
    assert h["validation"]["n"] == 6 and v["n"] == 6
    assert h["calibration"]["n"] == 4
    assert dst.with_suffix(".validation.png").stat().st_size > 1000
    # the noise floor: the same archs timed again, in a second pool
    assert {"mape_pct", "within_10pct", "spearman"} <= set(h["validation"]["repeatability"])
    rows = json.loads(dst.with_suffix(".validation.json").read_text())["archs"]
    assert len(rows) == 10 and sum(r["role"] == "validation" for r in rows) == 6
    assert all(r["measured_ms"] > 0 and r["measured_again_ms"] > 0 for r in rows)


def test_calibration_picks_the_model_that_predicts_unseen_archs():
    from hwnas.latency.profile import fit_calibration

    rng = np.random.default_rng(0)
    add, mp = rng.uniform(0.1, 1.0, 30), rng.uniform(1, 20, 30)
    noise = 1 + 0.01 * rng.standard_normal(30)
    cal = fit_calibration(add, mp, (0.6 * add + 0.05 * mp - 0.1) * noise)  # weights matter
    assert cal["model"] == "linear+weights"
    assert cal["a"] == pytest.approx(0.6, rel=0.1) and cal["b"] == pytest.approx(0.05, rel=0.1)
    cal = fit_calibration(add, mp, (add + 0.02) * noise)  # a pure offset: no weights term
    assert cal["b"] == pytest.approx(0.0, abs=1e-3) or cal["model"] != "linear+weights"
    assert fit_calibration(add[:3], mp[:3], add[:3] + 0.02)["model"] == "offset"  # too few to fit more
    # a fixed cost per executed layer that the op timings miss: only the layers model sees it
    layers = rng.integers(4, 20, 30).astype(float)
    meas = (0.3 * add + 0.05 * mp + 0.02 * layers + 0.1) * noise
    cal = fit_calibration(add, mp, meas, layers)
    assert cal["model"] == "linear+weights+layers"
    assert cal["d"] == pytest.approx(0.02, rel=0.1) and cal["a"] == pytest.approx(0.3, rel=0.15)
    assert cal["loo_mape_pct"]["linear+weights+layers"] < cal["loo_mape_pct"]["linear+weights"]
    assert "linear+weights+layers" not in fit_calibration(add, mp, meas)["loo_mape_pct"]  # no layer counts


def test_predictor_is_the_calibrated_formula(table, tiny_space):
    import random

    t, _, _ = table
    t = LatencyTable(json.loads(json.dumps(t.header)), dict(t.entries))
    t.header["calibration"] = {"a": 0.8, "b": 0.3, "d": 0.004, "c": 0.01, "model": "linear+weights+layers"}
    p = LatencyPredictor(tiny_space, t)
    rng = random.Random(1)
    for _ in range(20):
        a = tiny_space.sample(rng)
        n_run = sum(op != "skip" for op, _ in a.layers)
        assert p.layers_run(a) == n_run
        assert p(a) == pytest.approx(0.8 * p.additive(a) + 0.3 * p.mparams(a) + 0.004 * n_run + 0.01)
    lo, hi = p.range()
    assert p(p.extreme_arch(True)) == pytest.approx(lo) and p(p.extreme_arch(False)) == pytest.approx(hi)


def test_rank_statistics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    b[:5] = a[:5]
    a[10:13] = 1.0  # ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)


def test_complete_table_is_kept_untouched(table, tiny_space):
    t, out, b = table
    before = out.read_bytes()
    logs = []
    profile_space(tiny_space, b, out, rounds=2, runs=2, warmup=1, log=logs.append)
    assert out.read_bytes() == before and "kept" in logs[-1]


# ---------------------------------------------------------------- thread count
def test_fastest_thread_count_is_the_minimum():
    from hwnas.latency.backends import Measurement, fastest_threads, thread_options

    ms = [Measurement(0.0, v, 0.0, 0.0, 0.0, 1, 1, 0) for v in (0.30, 0.20, 0.25)]
    m, t, by = fastest_threads(ms, [1, 2, 4])
    assert (m.latency_ms, t) == (0.20, 2) and by == {"1": 0.3, "2": 0.2, "4": 0.25}
    opts = thread_options(3)
    assert opts[0] == 1 and 3 in opts and physical_cores() in opts and opts == sorted(set(opts))


def test_compare_threads_times_every_subnet_at_every_count(tiny_space):
    from hwnas.latency.profile import compare_threads

    c = compare_threads(tiny_space, [2, 1], n_random=1, rounds=2, runs=2, warmup=1)
    assert c["threads"] == [1, 2] and len(c["archs"]) == 3
    assert all(set(v) == {"1", "2"} and min(v.values()) > 0 for v in c["archs"].values())
    for t in ("1", "2"):
        geo = np.exp(np.mean([np.log(v[t]) for v in c["archs"].values()]))
        assert c["geomean_ms"][t] == pytest.approx(geo, rel=1e-3)
    assert c["recommended"] == int(min(c["geomean_ms"], key=c["geomean_ms"].get))
    assert sum(c["fastest_count"].values()) == 3
    with pytest.raises(HwnasError, match="1 or more"):
        compare_threads(tiny_space, [0])


def test_profile_cli_uses_the_configs_thread_count(tmp_path):
    from conftest import tiny_config, write_cfg

    cfg = write_cfg(tmp_path / "c.json", tiny_config(tmp_path / "run", latency={"threads": 1}))
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", "--device", "cpu", "--config", str(cfg),
                        "--out", str(out), "--rounds", "2", "--runs", "2", "--validate", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert LatencyTable.load(out).header["threads"] == 1
    # --validate (the README's): the table's predictions against 3 networks timed end to end
    v = json.loads(out.with_suffix(".validation.json").read_text())
    assert len([a for a in v["archs"] if a["role"] == "validation"]) == 3
    assert all(a["measured_ms"] > 0 and a["predicted_ms"] > 0 for a in v["archs"])
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", "--config", str(cfg),
                        "--compare-threads", "1", "2", "--rounds", "2", "--runs", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "geometric mean" in r.stdout and "set latency.threads:" in r.stdout
    # it writes nothing, so a flag that shapes a table is refused, not ignored (nor its folder made)
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", "--config", str(cfg), "--compare-threads",
                        "1", "--out", str(tmp_path / "new" / "t.json"), "--remeasure"], capture_output=True, text=True)
    assert r.returncode == 2 and "writes nothing, so --out, --remeasure would do nothing" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
    # without --out: the config's latency.table, the table hwnas search and hwnas run read
    cfg = write_cfg(tmp_path / "c2.json", tiny_config(tmp_path / "run", latency={
        "threads": 1, "table": str(tmp_path / "mine" / "table.json")}))
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", "--config", str(cfg), "--rounds", "1",
                        "--runs", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert LatencyTable.load(tmp_path / "mine" / "table.json").header["threads"] == 1
    assert not (tmp_path / "latency_tables").exists()
    # at another thread count it is another table: not written over the config's
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", "--config", str(cfg), "--threads", "2",
                        "--rounds", "1", "--runs", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "not the config's latency.table" in r.stdout, r.stderr[-2000:]
    assert LatencyTable.load(tmp_path / "mine" / "table.json").header["threads"] == 1
    assert [LatencyTable.load(p).header["threads"] for p in (tmp_path / "latency_tables").glob("*.json")] == [2]


def test_default_table_name_tells_cpus_apart(tiny_space):
    """A table measured on one CPU model is not found on another (it would mispredict it)."""
    from hwnas.latency.table import cpu_slug

    base = {"runtime": "onnxruntime", "runtime_version": "1.32.0", "device": "cpu",
            "machine": "x86_64", "precision": "fp32", "threads": 1}
    amd = LatencyTable.default_name({**base, "device_name": "AMD EPYC 7763 64-Core Processor"}, tiny_space)
    intel = LatencyTable.default_name({**base, "device_name": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"},
                                      tiny_space)
    assert amd != intel and "-amdepyc" in amd and "-intelxeonplatinum8375c" in intel
    assert cpu_slug("") == "cpu" and cpu_slug("AMD EPYC") == "amdepyc"


def test_timing_parks_torch_threads_and_restores_them():
    """While ONNX Runtime is timed PyTorch's pool holds one thread (after training in the same
    process its threads competed for the cores); afterwards the caller's count is back."""
    import torch

    from hwnas.latency.backends import Runner, measure

    class Probe(Runner):
        seen: set = set()

        def run_timed(self, n):
            self.seen.add(torch.get_num_threads())
            return [0.01] * n

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure([Probe()], rounds=2, runs=2, warmup=1)
        assert Probe.seen == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_table_part_measured_on_another_cpu_is_not_finished_here(tmp_path):
    """Resuming a part-measured table on another machine would mix two CPUs' timings."""
    from hwnas.latency.backends import OrtCpuBackend
    from hwnas.latency.table import make_header
    from hwnas.space import SearchSpace

    space = SearchSpace(input_size=16, in_channels=1, stem_channels=8, stage_layers=(1, 1, 1, 1),
                        stage_widths=(16, 24, 32, 40), head_channels=16, embed_dim=8)
    backend = OrtCpuBackend(threads=1)
    header = make_header(space, backend.settings(), 1, 1, 1)
    header["device_name"] = "Some Other CPU"
    LatencyTable(header, {}).save(tmp_path / "t.json")
    with pytest.raises(HwnasError, match="part-measured on 'Some Other CPU'.*another --out"):
        profile_space(space, backend, tmp_path / "t.json", log=lambda *_: None)


def test_another_devices_table_is_neither_calibrated_nor_re_timed_here(table, tiny_space, tmp_path):
    """A finished table from another device (latency.table) is kept as that device's: this
    machine's end-to-end timings do not calibrate it, and a mismatch's fix does not re-time
    it here over its own timings."""
    from hwnas.latency.profile import validate_table

    t, out, b = table
    other = LatencyTable.load(out)
    other.header["device_name"] = "Some Edge CPU"
    other.save(tmp_path / "edge.json")
    before = (tmp_path / "edge.json").read_bytes()
    with pytest.raises(HwnasError, match="measured on 'Some Edge CPU'.*validate it on that machine"):
        validate_table(tiny_space, LatencyTable.load(tmp_path / "edge.json"), b, 2, tmp_path / "edge.json",
                       calibrate=2, log=lambda *_: None)
    assert (tmp_path / "edge.json").read_bytes() == before
    with pytest.raises(HwnasError, match="runtime_version") as e:
        LatencyTable.load(tmp_path / "edge.json").check(tiny_space, {**b.settings(), "runtime_version": "0.1"})
    assert "--remeasure" not in str(e.value) and "--out ANOTHER.json" in str(e.value)


def test_a_run_times_its_own_table_of_an_older_graph_form_again(tmp_path):
    """hwnas run redoes its profile step after an upgrade that exports another graph form:
    this machine's table is then timed afresh, not refused; another device's is refused."""
    from hwnas.export.onnx import GRAPH_FORM
    from hwnas.latency.backends import OrtCpuBackend
    from hwnas.space import SearchSpace

    space = SearchSpace(input_size=16, in_channels=1, stem_channels=8, stage_layers=(1, 1, 1, 1),
                        stage_widths=(16, 24, 32, 40), head_channels=16, embed_dim=8)
    backend, out, quiet = OrtCpuBackend(threads=1), tmp_path / "t.json", (lambda *_: None)
    fast = {"rounds": 1, "runs": 1, "warmup": 1, "log": quiet}
    t = profile_space(space, backend, out, **fast)
    for device, works in ((t.header["device_name"], True), ("Some Other CPU", False)):
        old = LatencyTable.load(out)
        old.header.update(graph_form=GRAPH_FORM - 1, device_name=device)
        old.save(out)
        if works:
            t2 = profile_space(space, backend, out, retime_old_form=True, **fast)
            assert t2.header["graph_form"] == GRAPH_FORM and t2.header["complete"]
            assert LatencyTable.load(out).header["graph_form"] == GRAPH_FORM
        else:
            with pytest.raises(HwnasError, match=f"graph form {GRAPH_FORM - 1}.*--out ANOTHER.json"):
                profile_space(space, backend, out, retime_old_form=True, **fast)


def test_unlabeled_source_errors_name_the_setting(tmp_path):
    from hwnas.data.sources import unlabeled_images

    with pytest.raises(HwnasError, match=r"adapt.images .*missing does not exist.*set adapt.images"):
        unlabeled_images(tmp_path / "missing", "adapt.images")


def test_a_table_given_by_path_is_checked_against_the_thread_count_asked_for():
    """latency.table from elsewhere (the edge device's) is not checked against this machine's
    runtime, but a latency.threads other than the table's is refused: deploy and the report
    would time the query models at other threads than the predictions."""
    from hwnas.config import load_config
    from hwnas.search.runner import predictor_for

    cfg = load_config("configs/omniglot.yaml")
    cfg.latency.table = "latency_tables/x86_64-amdepyc-2c-ort1.32-fp32-t1-r32-s7b287ae9.json"
    space = cfg.search_space()
    for threads in (None, 1):
        cfg.latency.threads = threads
        predictor_for(cfg, space)
    cfg.latency.threads = 2
    with pytest.raises(HwnasError, match=r"measured with threads=1 but this run uses 2.*set latency.threads: 1"):
        predictor_for(cfg, space)
