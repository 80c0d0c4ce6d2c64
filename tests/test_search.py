"""The search: budget handling, constraints, samplers, persistence, workers, outputs."""

import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from conftest import tiny_config, write_cfg
from hwnas.compat import api
from hwnas.config import load_config
from hwnas.errors import HwnasError
from hwnas.search.evolution import RegularizedEvolutionSampler
from hwnas.search.runner import SupernetEvaluator, pareto_front, reward, run_search

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, fmnist_dir):
    """A run with a gallery, a supernet, a validation split and a latency table."""
    from hwnas.latency.backends import get_backend
    from hwnas.latency.profile import profile_space

    root = tmp_path_factory.mktemp("search")
    d = tiny_config(root / "run",
                    data={"dataset": "fashion-mnist", "mean": [0.286], "std": [0.353],
                          "split": {"protocol": "closed", "train_per_class": 100,
                                    "eval_per_class": 30, "val_fraction": 0.3}},
                    gallery={"backbone": "resnet10t", "train": {"epochs": 2, "batch_size": 64}},
                    supernet={"train": {"epochs": 1, "batch_size": 64}},
                    query={"train": {"epochs": 1, "batch_size": 64}},
                    latency={"table": str(root / "table.json"), "threads": 1},
                    search={"n_trials": 4, "bn_batches": 1})
    cfg_path = write_cfg(root / "c.json", d)
    cfg = load_config(cfg_path)
    quiet = lambda *_: None  # noqa: E731
    api.train_gallery(cfg, log=quiet)
    api.train_supernet(cfg, log=quiet)
    profile_space(cfg.search_space(), get_backend("cpu", threads=1), root / "table.json",
                  rounds=2, runs=2, warmup=1, log=quiet)
    return root, cfg_path


def _budget(cfg):
    from hwnas.search.runner import predictor_for

    p, _ = predictor_for(cfg, cfg.search_space())
    lo, hi = p.range()
    return lo, hi, p


def _quantile_budget(cfg, pred, q: float) -> float:
    """The budget that a fraction ``q`` of uniform archs meets (not a fixed ms value, which a
    table timed while the machine was slow or fast would turn into another test)."""
    import random

    space, rng = cfg.search_space(), random.Random(0)
    return sorted(pred(space.sample(rng)) for _ in range(1000))[int(q * 1000)]


def test_reward_and_pareto():
    assert reward(0.6, 0.8, "r1") == 0.6
    assert reward(0.6, 0.8, "r2") == 0.8
    assert reward(0.6, 0.8, "r3", 0.25) == pytest.approx(0.25 * 0.8 + 0.75 * 0.6)
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.6), (0.5, 0.1)]
    assert sorted(pareto_front(pts)) == [0, 2, 4]


def test_a_bad_storage_fails_before_the_supernet_loads(search_run, tmp_path, monkeypatch):
    """--storage of a URL Optuna cannot open (a typo, a server down) is the error, said before
    the supernet, gallery and validation images load (minutes at scale), and no study is made."""
    from hwnas.search import runner

    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, _ = _budget(cfg)
    cfg.search.budget_ms = hi * 0.99
    built = []
    monkeypatch.setattr(runner, "SupernetEvaluator", lambda *a, **k: built.append(1))
    cfg.search.storage = "nosuchdb://host/db"
    with pytest.raises(HwnasError, match="cannot open the Optuna storage 'nosuchdb://host/db'.*give sqlite:///PATH"):
        runner.run_search(cfg, log=lambda *_: None)
    cfg.search.storage = f"sqlite:///{tmp_path / 'missing' / 's.db'}"
    with pytest.raises(HwnasError, match="missing does not exist"):
        runner.run_search(cfg, log=lambda *_: None)
    assert built == [] and not (tmp_path / "missing").exists()


def test_an_arch_proposed_again_is_not_evaluated_again(search_run, tmp_path):
    """A sampler's repeat of an evaluated arch (evolution proposes them) takes the first
    evaluation's result at no cost, and n_trials counts distinct archs."""
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms = hi * 0.99
    cfg.search.storage = f"sqlite:///{tmp_path / 'r.db'}"
    space = cfg.search_space()
    real = SupernetEvaluator(cfg, log=lambda *_: None)
    seen = []

    def evaluator(arch):
        seen.append(arch.to_string(space))
        return real(arch)

    a = space.smallest().to_string(space)
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, enqueue=[a, a])
    study = optuna.load_study(study_name=res["study"], storage=cfg.search.storage)
    first, again = study.trials[:2]
    assert again.user_attrs["repeat_of"] == first.number and again.values == first.values
    assert again.user_attrs["M(q,g)"] == first.user_attrs["M(q,g)"]
    assert seen.count(a) == 1 and len(seen) == len(set(seen)) == cfg.search.n_trials
    assert res["n_evaluated"] == cfg.search.n_trials
    from hwnas.rundir import RunDir

    with open(RunDir(cfg).path / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["repeat_of"] == str(first.number) and rows[0]["repeat_of"] == ""


def test_budget_outside_range_is_clear(search_run):
    _, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, _ = _budget(cfg)
    for b, word in ((lo * 0.5, "below"), (hi * 2, "above")):
        cfg.search.budget_ms = b
        with pytest.raises(HwnasError, match=f"{word}.*feasible budgets: {lo:.3f} to {hi:.3f} ms"):
            run_search(cfg, log=lambda *_: None)


def test_over_budget_archs_are_never_evaluated(search_run, tmp_path):
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, pred = _budget(cfg)
    # 30% of uniform archs fit: TPE's own uniform start-up trials (a budget this loose gets
    # no feasible start-up archs enqueued) are mostly over budget
    cfg.search.budget_ms = _quantile_budget(cfg, pred, 0.3)
    cfg.search.storage = f"sqlite:///{tmp_path / 's.db'}"
    cfg.search.sampler = "tpe"
    real = SupernetEvaluator(cfg, log=lambda *_: None)
    seen = []

    def evaluator(arch):
        seen.append(pred(arch))
        return real(arch)

    # (an over-budget --enqueue is refused up front now, so the over-budget trials are TPE's
    # own: 10 uniform start-up draws at a budget 30% of uniform archs meet)
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    assert seen and max(seen) <= cfg.search.budget_ms
    study = optuna.load_study(study_name=res["study"], storage=cfg.search.storage)
    infeasible = [t for t in study.trials if t.user_attrs.get("feasible") is False]
    assert infeasible
    for tr in infeasible:
        assert tr.constraints["latency_ms"] > 0 and "M(q,g)" not in tr.user_attrs
    # the evaluator ran once per evaluated trial and never on an over-budget arch (a wall-clock
    # bound on the infeasible trials stood here: it failed with the CPU busy, asserting nothing more)
    assert res["predicted_ms"] <= cfg.search.budget_ms
    assert res["n_evaluated"] == 4 and len(seen) == 4


def test_leave_one_out_validation_scores_every_image(search_run):
    """val_queries all: every validation image is a query against all the others, never
    matching itself; split: the split's own query/gallery division."""
    from hwnas.retrieval import evaluate

    cfg = load_config(search_run[1])
    loo = SupernetEvaluator(cfg, log=lambda *_: None)
    cfg.search.val_queries = "split"
    split = SupernetEvaluator(cfg, log=lambda *_: None)
    n = len(split.vq.images) + len(split.vg.images)
    arch = cfg.search_space().smallest()
    a, b = loo(arch), split(arch)
    assert a["M(q,g)"]["n_queries"] == a["M(q,g)"]["n_gallery"] == n
    assert b["M(q,g)"]["n_queries"] == len(split.vq.images) < n
    # the same images with self-matches kept: each query finds itself first
    from hwnas.compat.api import embed

    q = embed(loo.net, loo.vq.images, loo.pre.normalize, arch=arch)
    assert evaluate(q, loo.vq.raw_labels, q, loo.vq.raw_labels)["recall@1"] == 1.0
    assert a["M(q,q)"]["recall@1"] < 1.0
    assert a["M(q,q)"]["recall@1"] == pytest.approx(evaluate(
        q, loo.vq.raw_labels, q, loo.vq.raw_labels, query_ids=loo.ids[0], gallery_ids=loo.ids[1])["recall@1"])
    cfg.search.val_queries = "bogus"
    with pytest.raises(HwnasError, match="val_queries"):
        SupernetEvaluator(cfg, log=lambda *_: None)
    # data.split.query_mode all (the test parts share their images): the validation parts
    # are still divided, and every validation image is scored all the same
    import shutil

    cfg = load_config(search_run[1])
    cfg.data.split = {**cfg.data.split, "query_mode": "all"}
    src, cfg.run_dir = cfg.run_dir, str(search_run[0] / "run-query-mode-all")
    for d in ("gallery", "supernet"):
        shutil.copytree(Path(src) / d, Path(cfg.run_dir) / d)
    every = SupernetEvaluator(cfg, log=lambda *_: None)
    v = api.RunDir(cfg).splits(log=lambda *_: None)
    assert v.shared_eval and every.n_queries == len(v.parts["val_query"]) + len(v.parts["val_gallery"])


def test_a_search_on_verification_accuracy(search_run, tmp_path):
    """search.metric TAR@FAR=f: each trial scores verification at that FAR over the
    validation pairs and rewards it, as it does recall@1; hwnas evaluate reports it too."""
    from hwnas.compat.api import evaluate_query

    cfg = load_config(search_run[1])
    lo, hi, _ = _budget(cfg)
    cfg.search.budget_ms, cfg.search.n_trials, cfg.search.metric = hi * 0.99, 2, "TAR@FAR=1e-2"
    cfg.search.storage = f"sqlite:///{tmp_path / 'v.db'}"
    cfg.search.check()
    res = run_search(cfg, log=lambda *_: None, seed=0, out=tmp_path)
    assert res["metric"] == "TAR@FAR=0.01"
    study = optuna.load_study(study_name=res["study"], storage=cfg.search.storage)
    for t in [t for t in study.trials if t.user_attrs.get("feasible") and "repeat_of" not in t.user_attrs]:
        qq, qg = t.user_attrs["M(q,q)"]["TAR@FAR=0.01"], t.user_attrs["M(q,g)"]["TAR@FAR=0.01"]
        assert 0 <= qg <= 1 and t.user_attrs["reward"] == pytest.approx(reward(qq, qg, "r3", cfg.search.alpha))
    ev = evaluate_query(cfg, arch=res["arch"], part="val", log=lambda *_: None, fars=(0.01, 1e-3))
    m = ev["metrics"]["M(q,g)"]
    assert {"TAR@FAR=0.01", "TAR@FAR=0.001", "n_genuine_pairs", "n_impostor_pairs"} <= set(m)
    # a FAR finer than the validation pairs can tell: refused before any trial (each would be NaN)
    cfg.search.metric = "TAR@FAR=1e-9"
    with pytest.raises(HwnasError, match="TAR@FAR=1e-09 on the validation split: FAR 1e-09 needs at least 1,000,000,000 other-class pairs"):
        SupernetEvaluator(cfg, log=lambda *_: None)


def test_search_without_a_budget_takes_the_configs_as_hwnas_run_does(search_run, tmp_path):
    """`hwnas search --config c` with no --budget-ms resolves search.budget_fraction on the
    table, as `hwnas run` does (not an error), says so, and keeps it in budget.json."""
    import shutil

    root, cfg_path = search_run
    lo, hi, _ = _budget(load_config(cfg_path))
    run = tmp_path / "run"
    for part in ("gallery", "supernet"):
        shutil.copytree(root / "run" / part, run / part)
    shutil.copy(root / "run" / "splits.json", run / "splits.json")
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "search", "--config", str(cfg_path), "--run-dir",
                        str(run), "--set", "search.budget_fraction=0.6", "--set", "search.n_trials=1",
                        "--sampler", "random"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    want = round(lo + 0.6 * (hi - lo), 4)
    assert f"[search] budget {want} ms: search.budget_fraction 0.6 of the table's range" in r.stdout
    assert json.loads((run / "budget.json").read_text())["resolved"]["budget_ms"] == want
    assert json.loads((run / "best_arch.json").read_text())["predicted_ms"] <= want


def _dashboard(storage: str):
    """GET from optuna-dashboard's web app on ``storage`` (its WSGI app, called in process: the
    requests its browser front end makes), as parsed JSON."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage)

    def get(path: str):
        env: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(env)
        status: list = []
        body = b"".join(app(env, lambda s, h, *_: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return json.loads(body)

    return get


def test_outputs_and_from_search(search_run):
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, _ = _budget(cfg)
    known = cfg.search_space().smallest().to_string()
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "search", "--config", str(cfg_path),
                        "--budget-ms", f"{lo + 0.5 * (hi - lo):.4f}", "--reward", "r3", "--alpha", "0.5",
                        "--sampler", "evolution", "--set", "search.population=2", "--set", "search.tournament=2", "--enqueue", known],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    run = root / "run"
    first = next(csv.DictReader(open(run / "trials.csv")))  # the user's known arch went first
    assert first["baseline"] == "user" and cfg.search_space().parse(first["arch"]) == cfg.search_space().parse(known)
    best = json.loads((run / "best_arch.json").read_text())
    for k in ("arch", "predicted_ms", "mflops", "M(q,q)", "M(q,g)", "reward", "pareto_front"):
        assert k in best
    # the choice: the fastest within one standard error of the best reward on its validation queries
    w = best["chosen_within"]
    assert w["setting"] == "se" and w["n_val_queries"] > 0
    r = w["best_reward"]
    assert w["band"] == pytest.approx((r * (1 - r) / w["n_val_queries"]) ** 0.5)
    assert best["reward"] >= r - w["band"] - 1e-9 and best["predicted_ms"] <= w["best_reward_predicted_ms"]
    rows = [x for x in csv.DictReader(open(run / "trials.csv")) if x["feasible"] == "True"]
    assert not [x for x in rows if float(x["reward"]) >= r - w["band"] and float(x["predicted_ms"]) < best["predicted_ms"]]
    rows = list(csv.DictReader(open(run / "trials.csv")))
    assert {"arch", "predicted_ms", "mflops", "M(q,q)", "M(q,g)", "reward"} <= set(rows[0])
    # optuna-dashboard reads the run's study: every trial of trials.csv, its arch recorded
    dash = _dashboard(best["storage"])
    sid = next(s["study_id"] for s in dash("/api/studies")["study_summaries"] if s["study_name"] == best["study"])
    trials = dash(f"/api/studies/{sid}")["trials"]
    archs = [next(a["value"] for a in t["user_attrs"] if a["key"] == "arch") for t in trials]
    assert archs == [row["arch"] for row in rows]
    assert any(row["baseline"] == "fastest" for row in rows)  # baselines were enqueued
    for png in ("search_reward_vs_latency.png", "search_best_so_far.png"):
        assert (run / png).stat().st_size > 5000
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "train-query", "--config", str(cfg_path),
                        "--from-search"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads((run / "query" / "searched" / "config.json").read_text())
    assert q["arch"] == best["arch"] and q["inherit"] is True
    assert (run / "query" / "searched" / "evaluation-test.json").exists()
    from hwnas.report import baseline_models

    space = cfg.search_space()  # the random feasible baseline is another arch than the searched
    assert space.parse(baseline_models(cfg, space)["random-feasible"]["arch"]) != space.parse(best["arch"])
    # with finalists on, training may choose any of them: the baseline is none of them
    from hwnas.search.runner import top_archs

    cfg.query.finalists = 3
    finalists = {space.parse(a["arch"]) for a in top_archs(run, 3)}
    assert len(finalists) == 3
    assert space.parse(baseline_models(cfg, space)["random-feasible"]["arch"]) not in finalists


def test_finalists_pick_by_training_loss_and_continue(search_run):
    """query.finalists: the search's best K archs train part way; the lowest training loss
    goes on from its own checkpoint (not from scratch) and the choice is recorded."""
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, _ = _budget(cfg)
    cfg.search.budget_ms = round(lo + 0.8 * (hi - lo), 4)
    cfg.search.study_name = "finalists"
    quiet = lambda *_: None  # noqa: E731
    run_search(cfg, log=quiet)
    cfg.query.train = {**cfg.query.train, "epochs": 2}
    cfg.query.finalists, cfg.query.finalist_epochs = 3, 1
    logged: list[str] = []
    q = api.train_searched(cfg, name="picked", log=logged.append)
    run = root / "run"
    fin = json.loads((run / "query" / "picked" / "finalists.json").read_text())
    archs = [f["arch"] for f in fin["finalists"]]
    assert len(archs) == len(set(archs)) >= 2
    assert archs[0] == json.loads((run / "best_arch.json").read_text())["arch"]  # the search's best first
    chosen = min(fin["finalists"], key=lambda f: f["train_loss"])
    assert fin["chosen"] == chosen["arch"] == q["arch"]
    for f in fin["finalists"]:  # part way: a checkpoint, no model
        d = run / "query" / f["name"]
        assert (d / "checkpoint.safetensors").exists() and not (d / "model.safetensors").exists()
    # the chosen run went on from the finalist's checkpoint: its first epoch is the finalist's
    # record (timing included), and only the second epoch trained
    from hwnas.compat.train import checkpoint_meta

    first = checkpoint_meta(run / "query" / chosen["name"] / "checkpoint.safetensors")["history"][0]
    assert len(q["history"]) == 2 and q["history"][0] == first
    assert any("[train-query picked] resuming after epoch 1/2" in m for m in logged)
    assert fin["chosen_rank"] == archs.index(chosen["arch"]) + 1
    assert (run / "query" / "picked" / "model.safetensors").exists()
    # asked again, nothing trains: the finalists' checkpoints are read back, the model is kept
    files = [run / "query" / f["name"] / "checkpoint.safetensors" for f in fin["finalists"]]
    files.append(run / "query" / "picked" / "model.safetensors")
    before = [f.stat().st_mtime_ns for f in files]
    again = api.train_searched(cfg, name="picked", log=quiet)
    assert again["fingerprint"] == q["fingerprint"]
    assert [f.stat().st_mtime_ns for f in files] == before
    cfg.query.finalist_epochs = 2  # not part way
    with pytest.raises(HwnasError, match="finalist_epochs"):
        api.train_searched(cfg, name="picked", log=quiet)
    # a model the search chose alone (finalists off) is refused before any finalist trains
    cfg.query.finalist_epochs = 1
    (run / "query" / "alone").mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(run / "query" / "picked" / f, run / "query" / "alone" / f)
    before = sorted(p.name for p in (run / "query").iterdir())
    with pytest.raises(HwnasError, match="trained without query.finalists .*--restart"):
        api.train_searched(cfg, name="alone", log=quiet)
    assert sorted(p.name for p in (run / "query").iterdir()) == before


def test_train_many_in_processes_trains_what_one_at_a_time_does(search_run):
    """query.jobs: independent trainings side by side, each in its own process, give the
    models one process gives; a failed job is named after the others finish."""
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    cfg.query.train = {**cfg.query.train, "threads": 1}
    space = cfg.search_space()
    archs = [space.smallest().to_string(space), space.largest().to_string(space)]
    quiet = lambda *_: None  # noqa: E731
    cfg.query.jobs = 2
    bad = {"arch": "k3@1", "name": "bad"}  # not an arch of the space: refused in its process
    with pytest.raises(HwnasError, match=r"1 of 3 trainings failed .*: bad: arch has 1 layers"):
        api.train_many(cfg, [{"arch": a, "name": f"many-{i}"} for i, a in enumerate(archs)] + [bad], log=quiet)
    run = root / "run"
    side = [json.loads((run / "query" / f"many-{i}" / "config.json").read_text()) for i in range(2)]
    cfg.query.jobs = 1
    alone = api.train_many(cfg, [{"arch": a, "name": f"one-{i}"} for i, a in enumerate(archs)], log=quiet)
    from hwnas.nn.models import load_state

    for i, (s, a) in enumerate(zip(side, alone)):
        assert s["arch"] == a["arch"]
        assert [h["loss"] for h in s["history"]] == [h["loss"] for h in a["history"]]
        w1, w2 = (load_state(run / "query" / f"{p}-{i}")[1]["net"] for p in ("many", "one"))
        # the same weights (the BN recalibration before training ran here on this process's
        # thread count, which may round its statistics apart)
        assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], rtol=0, atol=1e-6) for k in w1)
    cfg.query.jobs = 2  # asked again, the trained models come back in the jobs' order
    again = api.train_many(cfg, [{"arch": a, "name": f"many-{i}"} for i, a in reversed(list(enumerate(archs)))],
                           log=quiet)
    assert [q["name"] for q in again] == ["many-1", "many-0"]
    assert [q["fingerprint"] for q in again] == [side[1]["fingerprint"], side[0]["fingerprint"]]
    # threads unset: each starts on cores / 2, and the one left running takes the freed cores
    from hwnas.latency.backends import physical_cores

    cfg.query.train = {**cfg.query.train, "threads": 0, "epochs": 5}
    logged: list[str] = []
    api.train_many(cfg, [{"arch": archs[0], "name": "short", "stop_after": 1},
                         {"arch": archs[1], "name": "long"}], log=logged.append)
    assert logged[0].startswith("[jobs] 2 trainings, 2 at a time") and logged[0].endswith(": long, short")  # costliest first
    if physical_cores() >= 2:  # (whichever ends last: their processes' start-up times vary)
        assert any(re.fullmatch(rf"\[jobs\] (long|short): {physical_cores()} threads from its next epoch "
                                r"\(no training is left to start\)", m) for m in logged), logged
    with pytest.raises(HwnasError, match="query.jobs must be a whole number >= 1"):
        cfg.query.jobs = 0
        cfg.validate()


def test_resume_after_kill_keeps_trials(search_run, tmp_path):
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, _ = _budget(cfg)
    db = tmp_path / "k.db"
    cmd = [sys.executable, "-m", "hwnas.cli", "search", "--config", str(cfg_path), "--budget-ms",
           f"{hi * 0.99:.4f}", "--storage", f"sqlite:///{db}", "--study-name", "k",
           "--n-trials", "8", "--sampler", "random"]
    # output to a file, not a pipe nobody reads: a full pipe would block the worker
    out = open(tmp_path / "worker.log", "wb")
    p = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 240

    def done():
        # read-only: opening the storage through Optuna while the worker creates it would race
        # it to create the schema
        import sqlite3

        if not db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:  # no trials table yet, or locked for a moment
            return 0

    while done() < 3 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    out.close()
    st = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    # the arch the worker was evaluating when killed (if it had one whole): evaluated on resume
    n_ops = max(sum(k.endswith("_op") for k in t.params) for t in st.trials)
    cut = [t.params for t in st.trials if t.state == optuna.trial.TrialState.RUNNING
           and sum(k.endswith("_op") for k in t.params) == n_ops
           and all(f"{k[:-3]}_scale" in t.params for k, v in t.params.items() if k.endswith("_op") and v != "skip")]
    # counted through Optuna, read-write: a kill in the middle of a commit leaves a rollback
    # journal that only a writer undoes (the read-only poll above then reads 0 trials)
    s0 = {t.number: t.values for t in optuna.load_study(study_name="k", storage=f"sqlite:///{db}").trials
          if t.state == optuna.trial.TrialState.COMPLETE}
    assert 3 <= len(s0) < 10, (tmp_path / "worker.log").read_text()[-3000:]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    for n, v in s0.items():  # finished trials survive unchanged
        assert s1.trials[n].values == v
    assert len({t.user_attrs["arch"] for t in s1.trials if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get("feasible") and "repeat_of" not in t.user_attrs}) >= 8
    assert not [t for t in s1.trials if t.state == optuna.trial.TrialState.RUNNING]
    done_params = [t.params for t in s1.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for ps in cut:
        assert ps in done_params, (ps, r.stdout[-2000:])


def test_resume_queues_again_what_a_killed_worker_was_evaluating(tiny_space, monkeypatch):
    from hwnas.search import runner
    from hwnas.search.runner import _boot_and_pid_namespace, _requeue_lost, worker_record

    if _boot_and_pid_namespace() is None:
        pytest.skip("no /proc: the worker's process is told by its pid alone there")
    ts = optuna.trial.TrialState
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    rng = random.Random(0)
    archs = []
    while len(archs) < 9:  # nine different networks
        a = tiny_space.canonical(tiny_space.sample(rng))
        if a not in archs:
            archs.append(a)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    host, here = __import__("socket").gethostname(), _boot_and_pid_namespace()
    workers = [lambda n: f"{host}|{p.pid}|{here}/{p.pid}/123#{n}",  # killed on this machine: lost
               None,  # killed before its first write, long enough ago: lost
               worker_record,  # alive (this process): left alone
               lambda n: f"elsewhere.example|1|x/1/1/1#{n}",  # another machine's: its heartbeat decides
               "ctrl-c",  # stopped by Ctrl-C: FAIL
               "ctrl-c",  # FAIL, but its arch was evaluated since: not queued again
               lambda n: f"{host}|{p.pid}|{here.split('/')[0]}/1/{p.pid}/123#{n}",  # another pid namespace
               lambda n: f"{host}|{p.pid}|{here}/{p.pid}/123#{n + 100}"]  # a retry's copy of another's record
    for i, (a, w) in enumerate(zip(archs, workers)):
        study.enqueue_trial(tiny_space.params_of(a), user_attrs={"baseline": f"b{i}"})
        t = study.ask()
        if callable(w):
            t.set_user_attr("worker_process", w(t.number))
        if w == "ctrl-c":
            study.tell(t, state=ts.FAIL)
    study.enqueue_trial(tiny_space.params_of(archs[5]))
    t = study.ask()
    tiny_space.suggest(t)
    study.tell(t, 0.5)
    monkeypatch.setattr(runner, "UNCLAIMED_TRIAL_S", 0.5)  # (10 s: a test waits less)
    time.sleep(0.6)  # trials 1 and 7 are old enough now; trial 9, begun below, is not
    study.enqueue_trial(tiny_space.params_of(archs[8]))
    study.ask()  # no worker yet, started just now: another live worker's, perhaps
    logged = []
    assert _requeue_lost(study, tiny_space, logged.append, local=False) == 2  # shared: 1 and 7 wait
    assert _requeue_lost(study, tiny_space, logged.append) == 2  # the run's own study: they are lost
    states = [t.state for t in study.trials]
    assert states[:10] == [ts.FAIL, ts.FAIL, ts.RUNNING, ts.RUNNING, ts.FAIL, ts.FAIL, ts.RUNNING,
                           ts.FAIL, ts.COMPLETE, ts.RUNNING]
    waiting = [t for t in study.trials if t.state == ts.WAITING]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [tiny_space.params_of(archs[i]) for i in (0, 4, 1, 7)]
    assert [(t.user_attrs["retry_of"], t.user_attrs["baseline"]) for t in waiting] == [
        (0, "b0"), (4, "b4"), (1, "b1"), (7, "b7")]
    assert logged == ["[search] trials 0, 4 stopped before their arch was evaluated (a kill or Ctrl-C): queued again",
                      "[search] trials 1, 7 stopped before their arch was evaluated (a kill or Ctrl-C): queued again"]
    assert _requeue_lost(study, tiny_space, logged.append) == 0  # queued already: not twice
    # a retry stopped too (an arch that kills its worker each time): not queued a third time
    retry = study.ask()
    assert retry.user_attrs["retry_of"] == 0
    study.tell(retry, state=ts.FAIL)
    assert _requeue_lost(study, tiny_space, logged.append) == 0
    assert logged[-1] == f"[search] the arch of trial {retry.number} stopped its evaluation twice (queued again once already): left out"


def _postgres_url() -> str:
    url = os.environ.get("HWNAS_TEST_POSTGRES_URL", "")
    if not url:
        pytest.skip("no PostgreSQL server: set HWNAS_TEST_POSTGRES_URL (e.g. postgresql:///hwnas, "
                    "README: Scaling out) and pip install -e '.[postgres]' to run this")
    return url


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_two_workers_share_one_storage(search_run, tmp_path, kind):
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, _ = _budget(cfg)
    if kind == "journal":
        storage = f"journal:{tmp_path / 'journal.log'}"
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        load = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    else:  # loaded through psycopg 3 as hwnas opens it, whichever driver SQLAlchemy defaults to
        from hwnas.search.runner import make_storage

        storage = _postgres_url()
        load = make_storage(storage, None)[0]
    # a server's studies outlive the test (and pytest reuses tmp_path names across sessions):
    # a new name each run
    study = f"shared-{tmp_path.name}-{uuid.uuid4().hex[:12]}"
    budget = math.ceil((lo + 0.9 * (hi - lo)) * 1e4) / 1e4  # within the range, however narrow
    n = 24  # both started at once: their start-ups (imports, the study's gallery embeddings)
    # end within a second or two of each other, well before 24 archs are evaluated
    cmd = [sys.executable, "-m", "hwnas.cli", "search", "--config", str(cfg_path), "--budget-ms",
           f"{budget:.4f}", "--storage", storage, "--study-name", study, "--n-trials", str(n),
           "--sampler", "random"]
    procs = [subprocess.Popen(cmd + ["--sampler-seed", str(i)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"range {lo:.5f}-{hi:.5f} ms: " + err[-3000:]
        outs.append(out)
    st = optuna.load_study(study_name=study, storage=load)
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    evaluated = [t.user_attrs["worker"] for t in done if t.user_attrs.get("feasible") and "repeat_of" not in t.user_attrs]
    by = {w: evaluated.count(w) for w in set(evaluated)}
    assert len(by) == 2 and min(by.values()) >= 1, by  # both evaluated archs of the one study
    assert sum(bool(t.user_attrs.get("feasible")) for t in done) >= n
    # each reports the study's evaluated archs (its own and the other's), not only its own
    for o in outs:
        assert int(re.search(r"chosen of (\d+) evaluated archs", o).group(1)) >= n
    # optuna-dashboard reads the shared study from the same storage: every trial, each worker's
    dash = _dashboard(load)
    sid = next(x["study_id"] for x in dash("/api/studies")["study_summaries"] if x["study_name"] == study)
    trials = dash(f"/api/studies/{sid}")["trials"]
    assert len(trials) == len(st.trials)
    assert {a["value"] for t in trials for a in t["user_attrs"] if a["key"] == "worker"} == set(by)


def _proposals(space, sampler, n: int) -> list:
    """The archs ``sampler`` proposes over ``n`` feasible trials (rewards rising: later is better)."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    seen = []

    def obj(trial):
        a = space.suggest(trial)
        trial.set_user_attr("arch", a.to_string())
        trial.set_constraint("latency_ms", -1.0)
        seen.append(a)
        return float(len(seen))

    study.optimize(obj, n_trials=n)
    return seen


def test_evolution_sampler_mutates_the_population(tiny_space):
    s = RegularizedEvolutionSampler(tiny_space, population=4, tournament=2, mutation_prob=0.0,
                                    crossover_prob=0.0, seed=0)
    pool = [a.to_string() for a in _proposals(tiny_space, s, 12)]
    # with no mutation or crossover, every child after the first 4 copies a member of the
    # aging population (the last 4 completed trials)
    for i in range(4, 12):
        assert pool[i] in pool[i - 4:i]


def test_evolution_never_proposes_an_arch_that_does_not_fit(tiny_space):
    """Where no child of the population fits (a high mutation_prob at a tight budget), the
    sampler draws afresh from init rather than spending a trial over the budget."""
    rng = random.Random(1)
    ok = {tiny_space.sample(rng) for _ in range(4)}  # the only archs that "fit"
    s = RegularizedEvolutionSampler(tiny_space, population=3, tournament=2, mutation_prob=1.0,
                                    crossover_prob=0.0, seed=0, fits=ok.__contains__,
                                    init=lambda r: r.choice(sorted(ok, key=str)), max_redraws=3)
    assert all(a in ok for a in _proposals(tiny_space, s, 15))


@pytest.mark.parametrize("sampler", ["random", "evolution"])
def test_random_and_evolution_draw_only_feasible_archs(search_run, tmp_path, sampler):
    """At a tight budget (about 2% of uniform archs fit) these samplers spend no trial on an
    over-budget arch: they draw under the predictor's check, as SPOS's evolution does."""
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms = _quantile_budget(cfg, pred, 0.02)
    cfg.search.storage = f"sqlite:///{tmp_path / 's.db'}"
    cfg.search.sampler, cfg.search.n_trials = sampler, 8
    cfg.search.population, cfg.search.tournament = 3, 2  # evolution: 5 children after the pool
    cfg.search.mutation_prob = 0.5
    res = run_search(cfg, evaluator=lambda a: {"M(q,q)": {"recall@1": 0.5, "recall@5": 0.5, "mAP": 0.5},
                                               "M(q,g)": {"recall@1": pred(a), "recall@5": 0.5, "mAP": 0.5},
                                               "seconds": 0.0}, log=lambda *_: None, seed=0)
    study = optuna.load_study(study_name=res["study"], storage=cfg.search.storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # 8 distinct archs evaluated (a repeat of one takes its result and does not count)
    assert all(t.user_attrs["feasible"] for t in done)
    assert len({t.user_attrs["arch"] for t in done if "repeat_of" not in t.user_attrs}) == 8
    assert len({t.user_attrs["arch"] for t in done}) >= 4  # it explores, not one arch


def test_budget_as_a_speedup_over_the_paragon(search_run):
    """search.budget_speedup: the paragon is timed beside the fastest and slowest subnets and
    put on the predictor's scale; the run resolves it once (budget.json) so a resumed search
    continues the same study."""
    from hwnas.pipeline import paragon_budget, resolve_budget, run_budget
    from hwnas.rundir import RunDir

    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, pred = _budget(cfg)
    quiet = lambda *_: None  # noqa: E731
    cfg.search.budget_speedup = 3.0
    info = paragon_budget(cfg, pred, api.run_gallery(RunDir(cfg)).net, log=quiet)
    assert info["paragon_ms"] > 0 and info["target_ms"] == pytest.approx(info["paragon_ms"] / 3.0)
    # the paragon counts at its fastest thread count
    assert info["paragon_ms"] == pytest.approx(min(info["paragon_ms_by_threads"].values()), abs=1e-5)
    assert info["paragon_ms_by_threads"][str(info["paragon_threads"])] == pytest.approx(info["paragon_ms"], abs=1e-5)
    # the measured target maps onto the predictor's scale through the two subnets timed beside
    # it: log-linearly, so each of them would map onto its own prediction
    (mf, ms), (pf, ps) = info["refs_measured_ms"], info["refs_predicted_ms"]
    slope = (math.log(ps) - math.log(pf)) / (math.log(ms) - math.log(mf))
    assert math.log(info["budget_ms"]) == pytest.approx(math.log(pf) + slope * (math.log(info["target_ms"]) - math.log(mf)))
    assert resolve_budget(cfg, pred, lambda: {"budget_ms": (lo + hi) / 2}) == round((lo + hi) / 2, 4)
    assert resolve_budget(cfg, pred, lambda: {"budget_ms": 2 * hi}) < hi  # every arch fits: clamped
    warned = []  # a speed-up this machine cannot reach: the fastest subnets, with a warning
    assert lo <= resolve_budget(cfg, pred, lambda: {"budget_ms": lo / 2}, warn=warned.append) < hi
    assert warned and "below the fastest subnet" in warned[0]
    with pytest.raises(HwnasError, match="needs the trained gallery"):
        resolve_budget(cfg, pred)
    cfg.search.budget_speedup = 0.5
    with pytest.raises(HwnasError, match="must be above 1"):
        resolve_budget(cfg, pred, lambda: {"budget_ms": 1.0})
    # a speed-up that lands mid-range, resolved once and kept
    mid_measured = math.exp(math.log(mf) + (math.log((lo + hi) / 2) - math.log(pf)) / slope)
    cfg.search.budget_speedup = max(1.01, info["paragon_ms"] / mid_measured)
    first = run_budget(cfg, pred, log=quiet)
    assert lo <= first["budget_ms"] < hi and first["paragon_ms"] == pytest.approx(info["paragon_ms"], rel=1.0)
    assert run_budget(cfg, pred, log=quiet) == first
    assert (RunDir(cfg).path / "budget.json").exists()
    assert "clamped_from_ms" not in first
    # a speed-up no subnet reaches: the budget moved into the range says so (report.md then
    # does not call it the paragon's latency / that speed-up)
    cfg.search.budget_speedup = 1000.0
    far = run_budget(cfg, pred, log=quiet)
    assert far["budget_ms"] >= lo and far["clamped_from_ms"] < lo


def test_tpe_starts_from_feasible_archs_at_a_tight_budget(search_run, tmp_path):
    """At a budget only ~1% of uniform archs meet, TPE's start-up trials are random feasible
    archs (enqueued), not uniform archs that nearly all fail the budget."""
    root, cfg_path = search_run
    cfg = load_config(cfg_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms = _quantile_budget(cfg, pred, 0.01)
    cfg.search.storage = f"sqlite:///{tmp_path / 's.db'}"
    cfg.search.sampler, cfg.search.n_trials = "tpe", 12
    fake = {"M(q,q)": {"recall@1": 0.5, "recall@5": 0.5, "mAP": 0.5}, "seconds": 0.0}
    res = run_search(cfg, evaluator=lambda a: {**fake, "M(q,g)": fake["M(q,q)"]}, log=lambda *_: None, seed=0)
    study = optuna.load_study(study_name=res["study"], storage=cfg.search.storage)
    enqueued = [t for t in study.trials if "baseline" in t.user_attrs]
    assert sum(t.user_attrs["baseline"] == "random-feasible start-up" for t in enqueued) == 10
    assert all(t.user_attrs["feasible"] for t in enqueued)
    assert max(t.number for t in enqueued) < len(enqueued)  # they went first


def test_the_choice_is_the_fastest_arch_the_validation_cannot_tell_from_the_best():
    """search.prefer_faster_within: among the archs whose reward is within the band of the
    best, the fastest (predicted); "se" sizes the band by the validation queries; 0 is the
    best reward's arch; bad settings are refused with the fix."""
    from types import SimpleNamespace

    from hwnas.config import SearchConfig
    from hwnas.search.runner import choose

    def trial(n, reward, ms, nq=900):
        return SimpleNamespace(number=n, user_attrs={"reward": reward, "predicted_ms": ms, "n_val_queries": nq})

    feas = [trial(0, 0.640, 0.060), trial(1, 0.630, 0.050), trial(2, 0.620, 0.040), trial(3, 0.635, 0.050)]
    se = (0.64 * 0.36 / 900) ** 0.5  # 0.016
    chosen, best, band = choose(feas, SearchConfig())
    assert best is feas[0] and band == pytest.approx(se)
    assert chosen is feas[3]  # 0.050 ms like trial 1, the higher reward of the two; trial 2 is 0.02 below
    assert choose(feas, SearchConfig(prefer_faster_within=0))[0] is feas[0]
    assert choose(feas, SearchConfig(prefer_faster_within=0.05))[0] is feas[2]
    # more validation queries resolve smaller differences: the band narrows
    assert choose([trial(t.number, t.user_attrs["reward"], t.user_attrs["predicted_ms"], 90000) for t in feas],
                  SearchConfig())[0].number == 0
    # a study from before the count was recorded keeps the best reward's arch
    old = [SimpleNamespace(number=t.number, user_attrs={k: v for k, v in t.user_attrs.items() if k != "n_val_queries"})
           for t in feas]
    assert choose(old, SearchConfig())[0].number == 0
    assert choose(old, SearchConfig(), n_val_queries=900)[0] is old[3]  # resumed by an evaluator that counts
    for bad in (-0.1, 1.5, "sd", True, float("nan")):
        with pytest.raises(HwnasError, match="prefer_faster_within"):
            SearchConfig(prefer_faster_within=bad)
    # search.pick_in_band most-flops: of the same band, the arch with the most FLOPs (ties: reward)
    for t, mf in zip(feas, (1.5, 1.9, 2.4, 1.9)):
        t.user_attrs["mflops"] = mf
    assert choose(feas, SearchConfig(pick_in_band="most-flops"))[0] is feas[3]  # trial 2 is outside the band
    assert choose(feas, SearchConfig(pick_in_band="most-flops", prefer_faster_within=0.05))[0] is feas[2]
    assert choose(feas, SearchConfig(pick_in_band="most-flops", prefer_faster_within=0))[0] is feas[0]
    with pytest.raises(HwnasError, match="pick_in_band.*fastest, most-flops"):
        SearchConfig(pick_in_band="largest")


def test_best_so_far_plot_takes_several_runs_per_sampler(tmp_path, monkeypatch):
    """The samplers benchmark passes one run per sampler seed: the plot draws their mean over
    the trial counts every run reached, and a single run as before."""
    from hwnas.search import runner

    drawn = {}
    real = runner.save_figure

    def keep(fig, path):  # look at the lines before the figure is written
        drawn.update((ln.get_label(), list(ln.get_ydata())) for ln in fig.axes[0].lines)
        real(fig, path)

    monkeypatch.setattr(runner, "save_figure", keep)
    runner.plot_progress({"tpe": [[0.1, 0.3, 0.2], [0.2, 0.1]], "random": [0.5, 0.4, 0.6]}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert drawn["tpe (mean of 2)"] == pytest.approx([0.15, 0.25])  # best-so-far 0.1,0.3 / 0.2,0.2; 2 trials
    assert drawn["random"] == pytest.approx([0.5, 0.5, 0.6])


def _quickstart_cfg(tmp_path):
    """The quickstart config on the shipped AMD table, its run and Optuna storage in ``tmp_path``."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    cfg.run_dir = str(tmp_path / "run")
    cfg.latency.table = str(ROOT / "latency_tables" / "x86_64-amdepyc-2c-ort1.32-fp32-t1-r32-s7b287ae9.json")
    cfg.search.storage = f"sqlite:///{tmp_path / 's.db'}"
    return cfg


def _quickstart_study(tmp_path):
    """The quickstart's search space and the shipped AMD table, an evaluator that only counts
    (these tests check the search's bookkeeping, not accuracy), and a first run that makes the
    study (its queued baselines, then the smallest subnet): ``(cfg, space, seen, evaluator)``."""
    cfg = _quickstart_cfg(tmp_path)
    cfg.search.budget_ms, cfg.search.n_trials = 0.2, 1
    sp = cfg.search_space()
    seen = []

    def evaluator(arch):
        seen.append(arch.to_string(sp))
        m = {"recall@1": 0.5, "recall@5": 0.5, "mAP": 0.5}
        return {"M(q,q)": m, "M(q,g)": m, "seconds": 0.0}

    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, enqueue=[sp.smallest().to_string(sp)])
    assert seen == [sp.smallest().to_string(sp)]
    seen.clear()
    return cfg, sp, seen, evaluator


def _add_evaluated(study, sp, arch, reward: float = 0.5, predicted_ms: float = 0.05) -> int:
    """Record ``arch`` in ``study`` as evaluated, as another (or an older) search would; its number."""
    from optuna.distributions import CategoricalDistribution

    params = sp.params_of(arch)
    dists = {}
    for layer in sp.layers():
        dists[f"L{layer.index:02d}_op"] = CategoricalDistribution(list(layer.choices))
        dists[f"L{layer.index:02d}_scale"] = CategoricalDistribution(list(sp.channel_scales))
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions={k: dists[k] for k in params}, value=reward, user_attrs={
            "arch": arch.to_string(sp), "feasible": True, "reward": reward, "predicted_ms": predicted_ms,
            "mflops": 1.0, "M(q,q)": {"recall@1": reward}, "M(q,g)": {"recall@1": reward}}))
    return study.trials[-1].number


def test_a_resumed_old_study_knows_a_network_under_either_spelling(tmp_path):
    """A study begun before the search recorded canonical arch strings may hold a network
    under a scale that rounds to another's width (the quickstart's first stage: 0.6 and 0.8
    give one width), evaluated under both. Resumed, that network is not evaluated again, its
    repeats point to its first evaluation, it counts once towards n_trials, and the outputs
    name it by its canonical string."""
    from hwnas.space import Arch

    cfg, sp, seen, evaluator = _quickstart_study(tmp_path)
    first = sp.layers()[0]
    rest = list(sp.smallest().layers)[1:]
    a06, a08 = (Arch(tuple([(first.choices[0], s)] + rest)) for s in (0.6, 0.8))
    assert sp.canonical(a08) == a06 != a08  # one network, two spellings
    study = optuna.load_study(study_name=optuna.get_all_study_names(cfg.search.storage)[0],
                              storage=cfg.search.storage)
    # the old search's records of the network: evaluated at 0.8, then again at 0.6; the
    # first is the fastest of the study's archs at the best reward, so the search's choice
    old_number = _add_evaluated(study, sp, a08, predicted_ms=0.01)
    _add_evaluated(study, sp, a06, predicted_ms=0.01)
    cfg.search.n_trials = 6  # the first run's queued baselines go first, then a06 (as a sampler
    study.enqueue_trial(sp.params_of(a06))  # proposing it again would: --enqueue skips known archs)
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    trials = optuna.load_study(study_name=res["study"], storage=cfg.search.storage).trials
    again = [t for t in trials if t.user_attrs.get("arch") == a06.to_string(sp) and t.number > old_number + 1]
    assert again and again[0].user_attrs["repeat_of"] == old_number
    assert a06.to_string(sp) not in seen  # known under its old spelling: not evaluated again
    # the old records and the repeat count once: the smallest, the old network, 4 new ones
    assert len(seen) == len(set(seen)) == 4 and res["n_evaluated"] == 6
    # best_arch.json names the choice (the old record at 0.8) by its canonical string
    assert res["trial"] == old_number and res["arch"] == a06.to_string(sp)
    assert all(p["arch"] == sp.network(p["arch"]).to_string(sp) for p in res["pareto_front"])


def test_a_worker_takes_another_workers_evaluation_of_an_arch(tmp_path):
    """In a study that workers share, an arch another worker evaluated after this one started
    is looked up in the storage, not evaluated again."""
    cfg, sp, seen, count = _quickstart_study(tmp_path)
    storage, name = cfg.search.storage, optuna.get_all_study_names(cfg.search.storage)[0]
    theirs = sp.canonical(_budget(cfg)[2].sample_feasible(cfg.search.budget_ms, random.Random(3)))
    key = theirs.to_string(sp)
    other = {}

    def evaluator(arch):  # while this worker evaluates its first arch, another finishes `theirs`
        if not other:
            other["number"] = _add_evaluated(optuna.load_study(study_name=name, storage=storage), sp,
                                             theirs, reward=0.7)
        return count(arch)

    # the first run's queued baselines (fastest, uniform) go first, then theirs, then one more
    cfg.search.n_trials = 5
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, enqueue=[key])
    assert other and key not in seen and len(seen) == 3
    again = [t for t in optuna.load_study(study_name=name, storage=storage).trials
             if t.user_attrs.get("arch") == key and t.number != other["number"]]
    assert [t.user_attrs.get("repeat_of") for t in again] == [other["number"]] and again[0].value == 0.7


def test_a_resumed_study_does_not_queue_a_known_arch_again(tmp_path):
    """--enqueue of an arch the study already holds (evaluated, or still queued) adds no
    trial when the study resumes."""
    cfg, sp, seen, evaluator = _quickstart_study(tmp_path)
    name = optuna.get_all_study_names(cfg.search.storage)[0]
    before = len(optuna.load_study(study_name=name, storage=cfg.search.storage).trials)
    said = []
    run_search(cfg, evaluator=evaluator, log=said.append, seed=0, enqueue=[sp.smallest().to_string(sp)])
    assert len(optuna.load_study(study_name=name, storage=cfg.search.storage).trials) == before
    assert any("in the study already" in m for m in said) and not seen
    # one still queued (not run yet) counts as held too
    queued = sp.canonical(_budget(cfg)[2].sample_feasible(cfg.search.budget_ms, random.Random(5)))
    optuna.load_study(study_name=name, storage=cfg.search.storage).enqueue_trial(sp.params_of(queued))
    run_search(cfg, evaluator=evaluator, log=said.append, seed=0, enqueue=[queued.to_string(sp)])
    assert len(optuna.load_study(study_name=name, storage=cfg.search.storage).trials) == before + 1


def test_an_arch_queued_on_a_finished_study_is_evaluated(tmp_path):
    """--enqueue of a new arch on a study that has its n_trials already: the arch is evaluated
    (it stayed queued, a WAITING row of trials.csv, before); an arch over the budget is refused
    up front (it would be recorded as over budget, never scored)."""
    cfg, sp, seen, evaluator = _quickstart_study(tmp_path)
    lo, hi, pred = _budget(cfg)
    new = sp.canonical(pred.sample_feasible(cfg.search.budget_ms, random.Random(11)))
    before = len(seen)
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, enqueue=[new.to_string(sp)])
    assert seen[-1] == new.to_string(sp) and res["n_evaluated"] == cfg.search.n_trials + len(seen) - before
    slow = sp.largest().to_string(sp)
    with pytest.raises(HwnasError, match=r"--enqueue .* is predicted at .* ms, over the budget"):
        run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, enqueue=[slow])


def _counting_study_cfg(tmp_path):
    """The quickstart space and the shipped AMD table, a storage in ``tmp_path``, and an
    evaluator whose reward is a fixed pseudo-random function of the arch (no training)."""
    import zlib

    cfg = _quickstart_cfg(tmp_path)
    sp = cfg.search_space()
    seen = []

    def evaluator(arch):
        key = arch.to_string(sp)
        seen.append(key)
        r = (zlib.crc32(key.encode()) % 1000) / 1000
        m = {"recall@1": r, "recall@5": r, "mAP": 0.5}
        return {"M(q,q)": m, "M(q,g)": m, "seconds": 0.0}

    return cfg, sp, seen, evaluator


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_multi_objective_search_returns_the_pareto_front(tmp_path, sampler):
    """--multi-objective: the study maximizes the reward and minimizes predicted latency;
    an over-budget arch is a constrained trial (reward 0, never evaluated); best_arch.json's
    front is exactly the evaluated archs no other beats on both."""
    cfg, sp, seen, evaluator = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms = _quantile_budget(cfg, pred, 0.5)
    cfg.search.sampler, cfg.search.multi_objective, cfg.search.n_trials = sampler, True, 6
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    study = optuna.load_study(study_name=res["study"], storage=cfg.search.storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    over = [t for t in done if t.user_attrs["feasible"] is False]
    assert over and all(t.values[0] == 0 and t.constraints["latency_ms"] > 0 for t in over)
    assert not {t.user_attrs["arch"] for t in over} & set(seen)
    feas = {t.user_attrs["arch"]: (t.user_attrs["predicted_ms"], t.user_attrs["reward"])
            for t in done if t.user_attrs["feasible"]}
    assert len(feas) >= 6 and all(v[0] <= cfg.search.budget_ms for v in feas.values())
    front = {p["arch"] for p in res["pareto_front"]}
    beaten = {a for a, (ms, r) in feas.items()
              if any(ms2 <= ms and r2 >= r and (ms2, r2) != (ms, r) for ms2, r2 in feas.values())}
    assert front == set(feas) - beaten


def test_an_interrupted_trial_is_not_logged_with_optunas_traceback(tmp_path):
    """Ctrl-C (or an hwnas error) during an evaluation goes up as itself, for the CLI to say in
    one line, without Optuna's warning and traceback of the failed trial before it; another
    error keeps Optuna's log."""
    import logging

    cfg, sp, seen, evaluator = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms, cfg.search.n_trials = _quantile_budget(cfg, pred, 0.5), 3
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    try:
        for i, (err, logged) in enumerate(((KeyboardInterrupt(), False), (HwnasError("x"), False),
                                           (ValueError("y"), True))):
            def fails(arch, err=err):
                raise err

            cfg.search.study_name = f"i{i}"
            with pytest.raises(type(err)):
                run_search(cfg, evaluator=fails, log=lambda *_: None, seed=0)
            said = [r.getMessage() for r in records]
            assert any("failed with parameters" in m for m in said) == logged, said
            assert any("failed with value" in m for m in said) == logged, said
            records.clear()
    finally:
        logging.getLogger("optuna").removeHandler(handler)


def test_a_worker_that_finds_a_study_it_did_not_make_waits_for_its_settings(tmp_path, monkeypatch):
    """Of the workers that start a study at one moment, exactly one makes it; one that finds it
    made, but its settings not yet recorded, waits for them and joins at the maker's budget
    (under search.budget_speedup each measures its own); a study whose maker never recorded
    them (killed in between) is taken as new after STAMP_WAIT_S. An --enqueue arch over the
    budget of the study it joins is refused."""
    import threading

    from hwnas.search import runner

    cfg, sp, _, evaluator = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    b = round(_quantile_budget(cfg, pred, 0.5), 4)
    cfg.search.n_trials, cfg.search.budget_speedup, cfg.search.budget_ms = 3, 10.0, b
    cfg.search.study_name = "ref"
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=lambda _: None)
    ref = optuna.load_study(study_name="ref", storage=cfg.search.storage).user_attrs["hwnas"]
    made = optuna.create_study(study_name="shared", storage=cfg.search.storage)  # the maker, not yet stamped
    later = threading.Timer(0.5, made.set_user_attr, ("hwnas", {**ref, "budget_ms": round(b * 1.02, 4)}))
    later.start()
    took, said = [], []
    cfg.search.study_name = "shared"
    res = run_search(cfg, evaluator=evaluator, log=said.append, seed=0, adopt_budget=took.append)
    later.join()
    assert took == [round(b * 1.02, 4)] == [res["budget_ms"]] and any("this worker takes that budget" in m for m in said)
    assert optuna.load_study(study_name="shared", storage=cfg.search.storage).user_attrs["hwnas"]["budget_ms"] == took[0]
    # an --enqueue arch within this worker's budget but over the study's it joins is refused
    import random

    low = round(b * 0.97, 4)
    rng = random.Random(0)
    arch = next(a for a in (sp.sample(rng) for _ in range(20000)) if low < pred(a) <= b).to_string(sp)
    optuna.create_study(study_name="low", storage=cfg.search.storage).set_user_attr("hwnas", {**ref, "budget_ms": low})
    cfg.search.study_name, cfg.search.budget_ms, took = "low", b, []
    with pytest.raises(HwnasError, match=f"--enqueue .* over study 'low''s budget {low} ms"):
        run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append, enqueue=[arch])
    assert took == [] and not optuna.load_study(study_name="low", storage=cfg.search.storage).trials
    monkeypatch.setattr(runner, "STAMP_WAIT_S", 0.3)
    optuna.create_study(study_name="orphan", storage=cfg.search.storage)  # its maker killed before recording
    cfg.search.study_name, cfg.search.budget_ms, took = "orphan", b, []
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append)
    study = optuna.load_study(study_name="orphan", storage=cfg.search.storage)
    assert took == [] and study.user_attrs["hwnas"]["budget_ms"] == b == res["budget_ms"]
    assert any("baseline" in t.user_attrs for t in study.trials)  # queued as a new study's


def test_a_sampler_stuck_over_budget_says_so(tmp_path):
    """search.max_infeasible over-budget proposals in a row stop the study, and the search
    says so (how many archs it reached of n_trials, and what to change) rather than stop short
    without a word."""
    cfg, sp, seen, evaluator = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms = _quantile_budget(cfg, pred, 0.02)  # 2% of uniform archs fit
    cfg.search.sampler, cfg.search.n_trials, cfg.search.max_infeasible = "tpe", 50, 5
    said = []
    res = run_search(cfg, evaluator=evaluator, log=said.append, seed=0)
    assert res["n_evaluated"] < 50
    assert any("5 over-budget archs in a row" in m and f"stopped at {res['n_evaluated']} distinct archs" in m
               for m in said), said


def test_a_study_resumed_with_other_settings_is_refused(tmp_path):
    """A study keeps the settings it was started with: resuming it under another reward or
    budget (same study name) is refused naming what changed, with the study as it was; a bad
    --enqueue arch names the flag."""
    cfg, sp, seen, evaluator = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms, cfg.search.n_trials, cfg.search.study_name = _quantile_budget(cfg, pred, 0.5), 2, "s1"
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    n = len(optuna.load_study(study_name="s1", storage=cfg.search.storage).trials)
    b = cfg.search.budget_ms
    for key, value, word in (("reward", "r1", "'reward': {'study': 'r3', 'here': 'r1'}"),
                             ("budget_ms", 0.9 * hi, f"'budget_ms': {{'study': {b}, 'here': {0.9 * hi}}}}}; "
                                                     f"pass --budget-ms {b} to join it")):
        old = getattr(cfg.search, key)
        setattr(cfg.search, key, value)
        with pytest.raises(HwnasError, match=re.escape(word) + ".*another --study-name"):
            run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
        setattr(cfg.search, key, old)
    # ... nor with trials scored otherwise: another supernet (trained again since), another
    # validation scoring; alpha, which r1 and r2 do not read, is no difference to them
    (Path(cfg.run_dir) / "supernet").mkdir(parents=True)
    (Path(cfg.run_dir) / "supernet" / "config.json").write_text('{"fingerprint": "trained-again"}')
    with pytest.raises(HwnasError, match="'run': .*scored with another gallery, supernet or split"):
        run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    shutil.rmtree(Path(cfg.run_dir) / "supernet")
    cfg.search.val_queries = "split"
    with pytest.raises(HwnasError, match="'val_queries': {'study': 'all', 'here': 'split'}"):
        run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    cfg.search.val_queries = "all"
    assert len(optuna.load_study(study_name="s1", storage=cfg.search.storage).trials) == n
    cfg.search.reward, cfg.search.study_name = "r1", "s1-r1"
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    cfg.search.alpha = 0.3
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    cfg.search.reward, cfg.search.alpha, cfg.search.study_name = "r3", 0.5, "s1"
    # a worker whose budget budget_speedup resolved (a measurement of the paragon, a little
    # different each time) joins a study started at that speed-up at the study's budget, and
    # says so; at another speed-up, or from another rule, it is refused
    took, said = [], []
    cfg.search.study_name, cfg.search.budget_speedup = "s2", 10.0
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append)
    cfg.search.budget_ms = b * 1.01
    run_search(cfg, evaluator=evaluator, log=said.append, seed=0, adopt_budget=took.append)
    assert took == [b] and cfg.search.budget_ms == b and any(
        f"10x faster than the paragon as the worker that started it measured it; this worker takes "
        f"that budget (its own measurement: {b * 1.01}" in m for m in said), said
    for speedup, adopt in ((5.0, took.append), (10.0, None)):
        cfg.search.budget_ms, cfg.search.budget_speedup = b * 1.01, speedup
        with pytest.raises(HwnasError, match=f"pass --budget-ms {b} to join it"):
            run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=adopt)
    assert took == [b]
    # without --study-name: each worker's default name holds its own measured budget, so a
    # worker joins the storage's study of the same settings and speed-up by its name, and a
    # study of other settings (here another speed-up) is not joined
    cfg.search.study_name, cfg.search.budget_ms, cfg.search.budget_speedup, said = None, b, 7.0, []
    first = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append)["study"]
    cfg.search.budget_ms = b * 1.02
    res = run_search(cfg, evaluator=evaluator, log=said.append, seed=0, adopt_budget=took.append)
    assert res["study"] == first != f"search-r3-evolution-{b * 1.02:g}ms" and took == [b, b], said
    assert any(f"joining study {first!r}" in m for m in said), said
    cfg.search.budget_ms, cfg.search.budget_speedup = b * 1.02, 6.0
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append)
    assert res["study"] == f"search-r3-evolution-{b * 1.02:g}ms" and took == [b, b]
    # nor a study of another run (its gallery or supernet another: its trials scored other
    # models), nor one whose budget lies far from this worker's own measurement
    (Path(cfg.run_dir) / "gallery").mkdir(parents=True)
    (Path(cfg.run_dir) / "gallery" / "config.json").write_text('{"fingerprint": "another"}')
    cfg.search.budget_ms, cfg.search.budget_speedup = b * 1.03, 7.0
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append)
    assert res["study"] == f"search-r3-evolution-{b * 1.03:g}ms" and took == [b, b]
    shutil.rmtree(Path(cfg.run_dir) / "gallery")
    cfg.search.budget_ms = b * 1.3
    res = run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, adopt_budget=took.append)
    assert res["study"] == f"search-r3-evolution-{b * 1.3:g}ms" and took == [b, b]
    cfg.search.study_name, cfg.search.budget_ms, cfg.search.budget_speedup = "s1", b, 10.0
    # ... and records it as its run's budget (budget.json), its own resolution beside it
    from hwnas.pipeline import adopt_study_budget, set_search_budget

    cfg.search.budget_ms = None
    cfg.search.budget_speedup, cfg.search.budget_fraction = None, 0.5
    own = set_search_budget(cfg, log=lambda *_: None)["budget_ms"]
    adopt_study_budget(cfg, b)
    cfg.search.budget_ms = None  # (a worker started again)
    assert set_search_budget(cfg, log=lambda *_: None)["budget_ms"] == b == cfg.search.budget_ms
    resolved = json.loads((Path(cfg.run_dir) / "budget.json").read_text())["resolved"]
    assert resolved["own_budget_ms"] == own and resolved["from_study"] == "s1"
    # the study's table is what it predicts: the same table at another path, or with another
    # header (hwnas profile --gallery-throughput's figures), is the same; other timings are not
    table = Path(cfg.latency.table)
    cfg.latency.table = str(tmp_path / "copy.json")
    t = json.loads(table.read_text())
    t["header"]["gallery_throughput"] = {"note": "a header-only change"}
    Path(cfg.latency.table).write_text(json.dumps(t))
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    first = next(iter(t["entries"]))
    t["entries"][first] = {**t["entries"][first], "median_ms": t["entries"][first]["median_ms"] * 2}
    Path(cfg.latency.table).write_text(json.dumps(t))
    with pytest.raises(HwnasError, match=r"'table': \{'study': '.*x86_64-amdepyc.* \(predictions \w+\)', "
                                         r"'here': '.*copy.json \(predictions \w+\)'\}"):
        run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    assert len(optuna.load_study(study_name="s1", storage=cfg.search.storage).trials) == n
    with pytest.raises(HwnasError, match="--enqueue 'bogus': bad arch token"):
        run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0, enqueue=["bogus"])
    # a config's multi_objective can be turned off for one search
    from hwnas.cli import build_parser

    assert build_parser().parse_args(["search", "--no-multi-objective"]).multi_objective is False
    assert build_parser().parse_args(["search"]).multi_objective is None  # (the config's)


def test_a_shared_study_plots_each_samplers_progress(tmp_path, monkeypatch):
    """Two workers of one study with different samplers: trials.csv names each trial's sampler
    and worker, and the best-so-far plot draws one line per sampler, not all under the last
    worker's."""
    from hwnas.search import runner

    cfg, sp, seen, evaluator = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    cfg.search.budget_ms, cfg.search.study_name = _quantile_budget(cfg, pred, 0.5), "shared"
    cfg.search.sampler, cfg.search.n_trials = "random", 3
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=0)
    drawn = {}
    monkeypatch.setattr(runner, "plot_progress", lambda curves, path, title="": drawn.update(curves))
    cfg.search.sampler, cfg.search.n_trials = "evolution", 6
    run_search(cfg, evaluator=evaluator, log=lambda *_: None, seed=1)
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "trials.csv")) if r["feasible"] == "True"]
    assert {r["sampler"] for r in rows} == {"random", "evolution"} and all(r["worker"] for r in rows)
    assert set(drawn) == {"random", "evolution"}
    assert sum(map(len, drawn.values())) == len({r["arch"] for r in rows})


def test_two_workers_starting_a_study_queue_its_baselines_once(tmp_path):
    """Each worker that finds a new study queues the known baselines; a second worker's finds
    the first's there and adds none (the fastest subnet and the largest uniform one)."""
    from hwnas.search.runner import _enqueue_baselines

    cfg, sp, _, _ = _counting_study_cfg(tmp_path)
    lo, hi, pred = _budget(cfg)
    study = optuna.create_study(storage=cfg.search.storage, study_name="two")
    for _ in range(2):
        _enqueue_baselines(study, sp, pred, 0.5 * (lo + hi), sampler="evolution")
    queued = [t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)]
    assert sorted(queued) == ["fastest", "uniform"]
