import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_png_folder

SUBCOMMANDS = ["data", "space", "train-gallery", "train-supernet", "train-query", "adapt", "evaluate", "run"]


def hwnas(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "hwnas.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def hwnas_here(capsys, *args):
    """``hwnas ARGS`` in this process (no interpreter and torch start per call): its exit code
    and stderr. An exception other than the CLI's own errors propagates and fails the test,
    as a traceback would."""
    import argparse

    from hwnas.cli import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's refusal of a flag's value
        rc = e.code
    except argparse.ArgumentError as e:  # (the same, where a subparser raises it unhandled)
        rc = 2
        print(e, file=sys.stderr)
    return subprocess.CompletedProcess(args, rc, "", capsys.readouterr().err)


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help_is_fast_and_has_examples(sub):
    import resource

    def cpu():  # the finished children's CPU seconds: unlike wall time, the work of other
        # processes on a busy machine does not count
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    args = ["--help"] if sub is None else [sub, "--help"]
    t = cpu()
    r = hwnas(*args)
    dt = cpu() - t
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout
    assert dt < 2.0, f"hwnas {' '.join(args)} took {dt:.2f} s of CPU"


def test_help_imports_no_heavy_modules():
    code = ("import sys; from hwnas.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch','timm','faiss','onnxruntime','optuna') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]"


def test_data_command_writes_splits(tmp_path):
    root = make_png_folder(tmp_path / "imgs", {f"c{i}": 5 for i in range(6)})
    run = tmp_path / "run"
    r = hwnas("data", "--dataset", "folder", "--data-dir", str(root), "--protocol", "open",
              "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    d = json.loads((run / "splits.json").read_text())
    assert d["config"]["protocol"] == "open" and d["counts"]["query"]["images"] > 0
    # same settings: reuses; different seed: refuses rather than silently re-splitting
    assert hwnas("data", "--dataset", "folder", "--data-dir", str(root), "--protocol", "open",
                 "--run-dir", str(run)).returncode == 0
    r = hwnas("data", "--dataset", "folder", "--data-dir", str(root), "--protocol", "open",
              "--seed", "9", "--run-dir", str(run))
    assert r.returncode == 2 and "new --run-dir" in r.stderr
    assert "data.split.seed 9 (made with 0)" in r.stderr  # what differs, both sides
    # other data: named with what the split was made from, and how to give that to a command
    r = hwnas("data", "--dataset", "digits", "--run-dir", str(run))
    assert r.returncode == 2 and "data digits (made from folder:imgs)" in r.stderr
    assert "--set data.dataset" in r.stderr


def test_commands_that_do_not_train_refuse_torchrun(tmp_path, monkeypatch, capsys):
    # each of torchrun's processes would run the whole pipeline, deleting and writing the
    # same files: refused before anything is made
    from hwnas.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rc = main(["run", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "not under torchrun (WORLD_SIZE=2)" in err and "train-supernet" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["space", "--config", "configs/quickstart.yaml"]) == 2
    assert "WORLD_SIZE is 'two', not a process count" in capsys.readouterr().err
    # empty, or RANK alone: one process, which prints as usual
    for world in ("", None):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE")
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert main(["space", "--config", "configs/quickstart.yaml"]) == 0
        assert "MFLOPs" in capsys.readouterr().out


def test_bad_input_exits_nonzero_with_clear_message(tmp_path, capsys):
    r = hwnas("data", "--dataset", "folder", "--data-dir", str(tmp_path / "missing"),
              "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "splits.json").exists()
    r = hwnas("space", "--arch", "k3@1,bogus")
    assert r.returncode == 2 and "bad arch token" in r.stderr
    assert r.stdout == ""  # refused before the space's table prints
    (tmp_path / "c.yaml").write_text("data:\n  datset: x\n")
    r = hwnas("run", str(tmp_path / "c.yaml"))
    assert r.returncode == 2 and "unknown keys ['datset']" in r.stderr
    # a wrong data.unlabeled source fails before any step, not after the gallery's training
    (tmp_path / "u.yaml").write_text(f"run_dir: {tmp_path / 'urun'}\ndata:\n  unlabeled: "
                                     f"[strokes:10, {tmp_path / 'nope.zip'}]\n")
    r = hwnas("run", str(tmp_path / "u.yaml"))
    assert r.returncode == 2 and "nope.zip does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "urun").exists()
    # a setting only a late step reads (the query model's training) fails before the first step
    (tmp_path / "t.yaml").write_text(f"run_dir: {tmp_path / 'trun'}\nquery:\n  train: {{epochs: ten}}\n")
    r = hwnas("run", str(tmp_path / "t.yaml"))
    assert r.returncode == 2 and "query.train.epochs must be a whole number" in r.stderr
    assert f"{tmp_path / 't.yaml'}: " in r.stderr  # the file the setting is in
    assert "Traceback" not in r.stderr and not (tmp_path / "trun").exists()
    # YAML that does not parse: the message names the file and line (not "<unicode string>")
    (tmp_path / "y.yaml").write_text("data:\n  split: {protocol: closed\n")
    r = hwnas("run", str(tmp_path / "y.yaml"))
    assert r.returncode == 2 and f'in "{tmp_path / "y.yaml"}", line' in r.stderr, r.stderr
    # a FAISS factory or an Optuna storage the run could use only at its last steps
    for i, (setting, word) in enumerate([("deploy:\n  index: IVFbogus", "FAISS cannot build index 'IVFbogus'"),
                                         ("search:\n  storage: 'foo'", "cannot open the Optuna storage 'foo'"),
                                         ("gallery:\n  backbone: resnet1000", "unknown timm model 'resnet1000'"),
                                         ("deploy:\n  catalog: nowhere/", "deploy.catalog nowhere (relative to the working directory"),
                                         ("gallery:\n  freeze_backbone: true", "set gallery.backbone_checkpoint"),
                                         ("gallery:\n  backbone_checkpoint: nope.pt", "nope.pt does not exist"),
                                         (f"data:\n  dataset: folder\n  data_dir: {tmp_path / 'nodata'}",
                                          "nodata does not exist")]):
        (tmp_path / "s.yaml").write_text(f"run_dir: {tmp_path / f'srun{i}'}\n{setting}\n")
        r = hwnas_here(capsys, "run", str(tmp_path / "s.yaml"))
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / f"srun{i}").exists()
    # numbers a command cannot use, refused before any timing starts
    for args, word in [(["profile", "--device", "cpu", "--threads", "-1"], "--threads -1 must be at least 0"),
                       (["profile", "--device", "cpu", "--validate", "-3"], "--validate -3 must be at least 0"),
                       (["profile", "--device", "cpu", "--out", str(tmp_path)], "is a folder"),
                       (["space", "--sample", "-3"], "--sample -3 must be 0 or more"),
                       (["space", "--json", "--arch", "k3@1"], "--json prints the space itself"),
                       (["evaluate", "--arch", "k3@1", "--far", "2"], "must be a rate between 0 and 1"),
                       (["search", "--metric", "TAR@FAR=0"], "the FAR must be a number between 0 and 1"),
                       (["profile", "--device", "cpu", "--validate", "2"], "rank correlations need at least 3"),
                       (["profile", "--device", "cpu", "--calibrate", "10"], "give --validate N with it"),
                       (["profile", "--device", "cpu", "--validate", "5", "--calibrate", "1"],
                        "--calibrate 1 must be at least 2"),
                       (["search", "--sampler-seed", "-1"], "--sampler-seed -1 must be a whole number"),
                       (["search", "--run-dir", ""], "run_dir must be a folder path"),
                       (["train-gallery", "--freeze-backbone", "--run-dir", str(tmp_path / "fb")],
                        "set gallery.backbone_checkpoint (--backbone-checkpoint"),
                       (["train-gallery", "--backbone-checkpoint", str(tmp_path / "no.safetensors"),
                         "--run-dir", str(tmp_path / "fb")], "no.safetensors does not exist"),
                       (["train-supernet", "--run-dir", str(tmp_path / "fb")], "run `hwnas train-gallery` first"),
                       # a table path that is a folder or another file: the wrong path, not a file to delete
                       (["search", "--budget-ms", "0.1", "--table", str(tmp_path), "--run-dir", str(tmp_path / "fb")],
                        "is a folder, not a hwnas-latency-v1 latency table"),
                       (["search", "--budget-ms", "0.1", "--table", "README.md", "--run-dir", str(tmp_path / "fb")],
                        "README.md is not a hwnas-latency-v1 latency table"),
                       (["run"], "hwnas run needs a config"),
                       (["space", "--config", str(tmp_path)], "is a folder; give the YAML or JSON config file"),
                       (["run", "--config", str(tmp_path / "c.yaml")], "unknown keys ['datset']"),
                       (["run", "configs/quickstart.yaml", "--config", "configs/omniglot.yaml"], "two configs given"),
                       (["deploy", "--run-dir", str(tmp_path / "fb")], "fb does not exist"),
                       (["deploy", "--run-dir", str(tmp_path / "fb"), "--query", str(tmp_path / "q")],
                        "(--query): give a folder hwnas train-query or hwnas adapt wrote"),
                       # one config named both ways is one config
                       (["run", str(tmp_path / "c.yaml"), "--config", f"{tmp_path}/./c.yaml"], "unknown keys ['datset']")]:
        r = hwnas_here(capsys, *args)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "fb").exists()  # (the splits are not written before a refusal)
    (tmp_path / "a.yaml").write_text(f"run_dir: {tmp_path / 'arun'}\nadapt:\n  epochs: 2\n  images: "
                                     f"{tmp_path / 'catalog'}\n")
    r = hwnas("run", str(tmp_path / "a.yaml"))
    assert r.returncode == 2 and "catalog does not exist" in r.stderr and not (tmp_path / "arun").exists()
    (tmp_path / "a.yaml").write_text("adapt:\n  epochs: -2\n")
    r = hwnas("run", str(tmp_path / "a.yaml"))
    assert r.returncode == 2 and "adapt.epochs must be a whole number" in r.stderr
    r = hwnas("adapt", "--run-dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no trained query model" in r.stderr and "Traceback" not in r.stderr
    # values given on the command line get the section's own checks, before any work
    r = hwnas("adapt", "--run-dir", str(tmp_path / "nothing"), "--epochs", "-3")
    assert r.returncode == 2 and "adapt.epochs must be a whole number" in r.stderr
    r = hwnas("deploy", "--run-dir", str(tmp_path / "nothing"), "--set", "adapt.lr=-1")
    assert r.returncode == 2 and "adapt.lr must be positive" in r.stderr and "Traceback" not in r.stderr
    r = hwnas("train-query", "--run-dir", str(tmp_path / "nothing"), "--from-search", "--set", "query.finalists=-1")
    assert r.returncode == 2 and "query.finalists must be a whole number" in r.stderr and "Traceback" not in r.stderr
    r = hwnas("train-query", "--run-dir", str(tmp_path / "nothing"), "--timm", "resnet18", "--jobs", "2")
    assert r.returncode == 2 and "--jobs trains the finalists side by side" in r.stderr
    r = hwnas("train-query", "--run-dir", str(tmp_path / "nothing"), "--from-search", "--jobs", "2")
    assert r.returncode == 2 and "and query.finalists > 1" in r.stderr  # no finalists: nothing side by side
    r = hwnas("run", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "nothing"), "--jobs", "0")
    assert r.returncode == 2 and "query.jobs must be a whole number >= 1" in r.stderr
    assert not (tmp_path / "nothing").exists()
    # a data error names the fix in settings the failing command takes (hwnas run has no --data-dir)
    r = hwnas("run", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "d"), "--set",
              f"data.data_dir={tmp_path / 'no-fmnist'}")
    assert r.returncode == 2 and "--set data.data_dir=DIR" in r.stderr and "Traceback" not in r.stderr


def test_space_command():
    r = hwnas("space", "--sample", "2")
    assert r.returncode == 0, r.stderr
    assert "c97e7325190f" in r.stdout and "FLOPs range" in r.stdout
    r = hwnas("space", "--config", "configs/quickstart.yaml", "--sample", "3")  # the README's
    assert r.returncode == 0 and "FLOPs range" in r.stdout, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("random ")]) == 3  # three sampled archs
    # --set reaches the space as it does every other command's config
    r = hwnas("space", "--set", "space.width_mult=0.5")
    assert r.returncode == 0, r.stderr
    assert "c97e7325190f" not in r.stdout and "FLOPs range" in r.stdout
    r = hwnas("space", "--set", "space.widht_mult=1.0")
    assert r.returncode == 2 and "unknown keys ['widht_mult']" in r.stderr


def test_run_pipeline_end_to_end_and_resume(tmp_path, fmnist_dir):
    """hwnas run on a tiny config: every step, the report, and resume after a kill."""
    import signal

    from conftest import tiny_config, write_cfg

    d = tiny_config(tmp_path / "run",
                    data={"dataset": "fashion-mnist", "mean": [0.286], "std": [0.353],
                          "split": {"protocol": "closed", "train_per_class": 60,
                                    "eval_per_class": 20, "val_fraction": 0.3}},
                    gallery={"backbone": "resnet10t", "train": {"epochs": 3, "batch_size": 32}},
                    supernet={"train": {"epochs": 1, "batch_size": 32}},
                    query={"train": {"epochs": 1, "batch_size": 32}},
                    latency={"table": str(tmp_path / "table.json"), "validate": 4, "threads": 1},
                    search={"n_trials": 3, "bn_batches": 1}, adapt={"epochs": 1})
    cfg = write_cfg(tmp_path / "c.json", d)
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "hwnas.cli", "run", str(cfg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # an unread pipe can fill and block it
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    t = time.time()
    ckpt = run / "gallery" / "checkpoint.safetensors"
    while not ckpt.exists() and time.time() - t < 240 and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)  # killed during train-gallery
    p.wait()
    steps = json.loads((run / "steps.json").read_text())["done"]
    assert {"data", "profile"} <= set(steps) and "train-gallery" not in steps
    r = hwnas("run", str(cfg), "--jobs", "2", timeout=900)  # the baselines two at a time
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "profile: done earlier, kept" in r.stdout
    assert re.search(r"\[jobs\] 4 trainings, 2 at a time \(\d+ thread\(s\) each\)", r.stdout)
    assert "resuming after epoch" in r.stdout  # the gallery continued from its checkpoint
    assert "exact McNemar p" in r.stdout and "exact McNemar p" in (run / "report.md").read_text()
    rep = json.loads((run / "report.json").read_text())
    assert {"paragon", "rows", "targets", "budget_ms", "searched_pareto_better_than", "searched_dominated_by",
            "pareto_latency_tol", "budget_speedup", "finalists"} <= set(rep)
    assert rep["budget_speedup"] is None  # this config sets no speed-up
    assert all(len(row["measured_pools_ms"]) == len(rep["paragon"]["measured_pools_ms"]) for row in rep["rows"])
    # each query model timed in several fresh sessions, its figure the median session's
    assert all(sorted(row["measured_sessions_ms"])[len(row["measured_sessions_ms"]) // 2] == pytest.approx(row["measured_ms"], abs=1e-6)
               and len(row["measured_sessions_ms"]) == 5 for row in rep["rows"])
    models = [row["model"] for row in rep["rows"]]
    assert models[0] == "searched" and "timm-mobilenetv3_small_050" in models
    # gallery adaptation: its own row and targets, kept out of the Pareto comparison, and the
    # model the bundle ships (same arch, so the same predicted latency)
    adapted = next(row for row in rep["rows"] if row["model"] == "searched-adapted")
    assert adapted["adapted"]["source"] == "split:gallery" and adapted["adapted"]["epochs"] == 1
    assert adapted["arch"] == rep["rows"][0]["arch"] and adapted["predicted_ms"] == rep["rows"][0]["predicted_ms"]
    assert set(rep["targets_adapted"]) == {"flops_reduction>=20", "latency_reduction>=10", "gap_points<=1"}
    assert "searched-adapted" not in rep["searched_pareto_better_than"]
    shipped = json.loads((run / "bundle" / "manifest.json").read_text())
    want = json.loads((run / "query" / "searched-adapted" / "config.json").read_text())
    assert shipped["query"]["fingerprint"] == want["fingerprint"]
    assert shipped["query"]["adapted"] == want["adapted"]
    r = hwnas("deploy", "--config", str(cfg), "--out", str(tmp_path / "b2"))  # alone: the same model
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "b2" / "manifest.json").read_text())["query"]["fingerprint"] == want["fingerprint"]
    assert {"smallest", "largest"} <= set(models)
    # the accuracy comparisons query by query: the paired counts give back the recall difference
    by = {row["model"]: row for row in rep["rows"]}
    pt = rep["searched_vs_baselines_paired"]
    assert set(pt) == set(rep["searched_pareto_better_than"]) and pt
    for name, t in pt.items():
        diff = by["searched"]["M(q,g)_recall@1"] - by[name]["M(q,g)_recall@1"]
        assert t["only_searched"] - t["only_baseline"] == round(t["queries"] * diff) and 0 < t["p_value"] <= 1
    for row in rep["rows"]:
        t = row["vs_paragon_paired"]
        assert t["only_query"] - t["only_paragon"] == round(-t["queries"] * row["gap_points"] / 100)
    for row in rep["rows"]:
        for k in ("mflops", "measured_ms", "flops_reduction", "latency_reduction", "gap_points",
                  "M(q,g)_recall@1", "M(q,q)_recall@1"):
            assert row[k] is not None
    # the query models at the table's thread count, the paragon at its fastest thread count
    par = rep["paragon"]
    assert rep["threads"] == 1 and set(par["measured_ms_by_threads"]) >= {"1"}
    assert par["measured_ms"] == pytest.approx(min(par["measured_ms_by_threads"].values()), abs=1e-5)
    assert par["measured_ms_by_threads"][str(par["threads"])] == pytest.approx(par["measured_ms"], abs=1e-5)
    assert (run / "report.md").exists() and (run / "report_accuracy_vs_latency.png").exists()
    assert (run / "bundle" / "manifest.json").exists()
    r2 = hwnas("run", str(cfg), timeout=600)  # everything done: nothing is redone
    assert r2.returncode == 0 and r2.stdout.count("done earlier, kept") == 10
    assert "latency.validate is" not in r2.stdout  # (the table was validated when built: no note)
    # an edited config does again exactly the steps that read what changed
    manifest = run / "bundle" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    d["deploy"] = {"index": "Flat"}
    write_cfg(tmp_path / "c.json", d)
    r3 = hwnas("run", str(cfg), timeout=600)
    assert r3.returncode == 0, r3.stdout[-2000:] + r3.stderr[-2000:]
    assert "config changed for deploy: doing again deploy" in r3.stdout
    assert r3.stdout.count("done earlier, kept") == 9 and manifest.stat().st_mtime_ns != before
    # --from redoes a step and what builds on it: the models it trains are trained anew
    adapted = run / "query" / "searched-adapted" / "model.safetensors"
    before = adapted.stat().st_mtime_ns
    r4 = hwnas("run", str(cfg), "--from", "adapt", timeout=600)
    assert r4.returncode == 0 and "--from adapt: doing again adapt, deploy, report" in r4.stdout, r4.stdout[-2000:]
    assert r4.stdout.count("done earlier, kept") == 7 and "already adapted" not in r4.stdout
    assert adapted.stat().st_mtime_ns != before and manifest.exists()
    assert "bundle_stale" not in json.loads((run / "steps.json").read_text())  # (replaced, not deleted)
    r5 = hwnas("run", str(cfg), "--from", "nonsense")
    assert r5.returncode != 0 and "not a step" in r5.stderr
    # a product deleted by hand: its step runs again (a traceback before), nothing else; the
    # latency table deleted too (it lies outside the run): put back from the run's copy
    table = (tmp_path / "table.json").read_bytes()
    assert (run / "latency_table.json").read_bytes() == table
    (run / "report.json").unlink()
    (tmp_path / "table.json").unlink()
    r6 = hwnas("run", str(cfg), timeout=600)
    assert r6.returncode == 0, r6.stdout[-2000:] + r6.stderr[-2000:]
    assert "the outputs of report are missing: doing again report" in r6.stdout
    assert r6.stdout.count("done earlier, kept") == 9 and (run / "report.json").exists()
    assert "put back from the run's copy" in r6.stdout and (tmp_path / "table.json").read_bytes() == table


def test_a_run_keeps_its_latency_table(tmp_path):
    """hwnas run keeps a copy of the table it profiled: a table deleted from its shared place
    is put back; one that predicts otherwise since is taken while nothing has predicted on the
    run's (unless it is part-measured), refused once the search has begun while a step would
    predict on it (naming the run's copy and both ways on), and let be once every such step is
    done; a header-only change (hwnas profile --gallery-throughput) is no change."""
    from conftest import tiny_config, write_cfg

    from hwnas.config import load_config
    from hwnas.errors import HwnasError
    from hwnas.latency.table import TABLE_FORMAT
    from hwnas.pipeline import RUN_TABLE, STEPS, TABLE_READERS, Steps, keep_table, redo_outputs

    def table(ms: float, **header) -> str:
        return json.dumps({"header": {"format": TABLE_FORMAT, "call_overhead_ms": 0.01, "complete": True, **header},
                           "entries": {"op": {"median_ms": ms}}})

    shared = tmp_path / "tables" / "t.json"
    run = tmp_path / "run"
    copy = run / RUN_TABLE
    cfg = load_config(write_cfg(tmp_path / "c.json", tiny_config(run, latency={"table": str(shared)})))
    run.mkdir()
    steps = Steps(run / "steps.json")
    steps.state["done"] = {n: {} for n in STEPS[:STEPS.index("search")]}
    said: list[str] = []
    keep_table(cfg, steps, said.append)  # no table anywhere: nothing to keep
    assert not copy.exists()
    shared.parent.mkdir()
    shared.write_text(table(1.0))
    keep_table(cfg, steps, said.append)
    assert copy.read_text() == table(1.0) and not said
    shared.unlink()  # a clean-up of latency_tables/
    keep_table(cfg, steps, said.append)
    assert shared.read_text() == table(1.0) and "put back from the run's copy" in said[-1]
    shared.write_text(table(2.0, complete=False))  # being timed again: not taken, nothing touched
    with pytest.raises(HwnasError, match=f"part-measured.*cp {copy} {shared}"):
        keep_table(cfg, steps, said.append)
    assert copy.read_text() == table(1.0) and shared.read_text() == table(2.0, complete=False)
    shared.write_text(table(2.0))  # timed again before the search began: the run takes it
    keep_table(cfg, steps, said.append)
    assert copy.read_text() == table(2.0) and "takes the new one" in said[-1]
    steps.state["done"]["search"] = {}
    shared.write_text(table(2.0, gallery_throughput={"images_per_s": 5}))  # predicts alike
    n = len(said)
    keep_table(cfg, steps, said.append)
    assert copy.read_text() == table(2.0) and len(said) == n
    shared.write_text(table(3.0))  # recalibrated or timed again after the search
    with pytest.raises(HwnasError) as e:
        keep_table(cfg, steps, said.append)
    msg = str(e.value)
    assert str(copy) in msg and f"cp {copy} {shared}" in msg and "--from profile" in msg
    assert "baselines, deploy, report would predict on it" in msg
    assert shared.read_text() == table(3.0) and copy.read_text() == table(2.0)  # nothing touched
    for n in TABLE_READERS:  # every step that reads it done: nothing to refuse, nothing touched
        steps.state["done"][n] = {}
    keep_table(cfg, steps, said.append)
    assert shared.read_text() == table(3.0) and copy.read_text() == table(2.0)
    shared.write_text(table(4.0, complete=False))  # (part-measured too: the finished run goes on)
    keep_table(cfg, steps, said.append)
    shared.write_text(table(3.0))
    # profiling again (a config change, --from profile) drops the copy, so the new table is kept
    assert copy in redo_outputs(cfg, ["profile"])
    # a table gone from both places: a run that would predict on it stops before it forgets anything
    from hwnas.pipeline import check_table_left

    shared.unlink()
    check_table_left(cfg, steps, [])  # every reader done: nothing needs it
    check_table_left(cfg, steps, ["profile", "search"])  # profiled again: made anew
    copy.unlink()
    for redo in (["search", "train-query"], ["report"]):
        with pytest.raises(HwnasError, match="latency table this run profiled is gone.*--from profile.*latency.table"):
            check_table_left(cfg, steps, redo)


def test_a_run_that_kept_no_table_says_when_its_search_used_another(tmp_path):
    """A run of an hwnas that kept no copy adopts the table it finds; if the search's budget
    was resolved on a table of another latency range, the run says so."""
    from hwnas.config import load_config
    from hwnas.pipeline import RUN_TABLE, STEPS, Steps, keep_table
    from hwnas.search.runner import predictor_for
    from hwnas.utils import write_json

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    cfg.run_dir = str(tmp_path / "run")
    cfg.latency.table = str(ROOT / "latency_tables" / "x86_64-amdepyc-2c-ort1.32-fp32-t1-r32-s7b287ae9.json")
    lo, hi = predictor_for(cfg, cfg.search_space())[0].range()
    steps = Steps(tmp_path / "run" / "steps.json")
    steps.state["done"] = {n: {} for n in STEPS}
    for range_ms, warned in (([round(lo, 5), round(hi, 5)], False), ([0.03, 0.6], True)):
        write_json(tmp_path / "run" / "budget.json", {"key": {"range_ms": range_ms}, "resolved": {}})
        (tmp_path / "run" / RUN_TABLE).unlink(missing_ok=True)
        said: list[str] = []
        keep_table(cfg, steps, said.append)
        assert (tmp_path / "run" / RUN_TABLE).exists()
        assert any("is not the table this run's search used" in m and "0.0300-0.6000" in m for m in said) == warned


def test_a_gallery_replaced_by_hand_redoes_what_was_trained_against_it(tmp_path):
    """The step keys see the config only: a gallery retrained with `hwnas train-gallery
    --restart` (or copied in) keeps its config, so the run must notice its fingerprint."""
    from conftest import tiny_config, write_cfg

    from hwnas.compat.api import gallery_record
    from hwnas.config import load_config
    from hwnas.errors import HwnasError
    from hwnas.pipeline import STEPS, Steps, downstream, redo_plan, step_keys
    from hwnas.rundir import RunDir

    root = make_png_folder(tmp_path / "imgs", {f"c{i}": 6 for i in range(4)})
    run = tmp_path / "run"
    cfg = load_config(write_cfg(tmp_path / "c.json", tiny_config(
        run, data={"dataset": "folder", "data_dir": str(root), "mean": [0.5], "std": [0.5],
                   "split": {"protocol": "open", "val_fraction": 0.0}})))
    rd = RunDir(cfg)
    rd.splits(log=lambda *_: None)
    for p in ("gallery/model.safetensors", "supernet/model.safetensors", "best_arch.json",
              "query/searched/model.safetensors", "bundle/manifest.json", "report.json"):
        (run / p).parent.mkdir(parents=True, exist_ok=True)
        (run / p).write_text("{}")
    gallery = {**json.loads(json.dumps(gallery_record(cfg, rd))), "fingerprint": "bbbb"}
    (run / "gallery" / "config.json").write_text(json.dumps(gallery))
    (run / "supernet" / "config.json").write_text(json.dumps({"gallery_fingerprint": "aaaa"}))
    keys = step_keys(cfg)
    steps = Steps(run / "steps.json")
    steps.state["done"] = {n: {"key": keys[n]} for n in STEPS}
    steps.state["done"]["train-gallery"]["fingerprint"] = "bbbb"
    assert redo_plan(cfg, steps, keys) == ([], [], "")  # the gallery it recorded: nothing to do
    steps.state["done"]["train-gallery"]["fingerprint"] = "aaaa"
    redo, fresh, why = redo_plan(cfg, steps, keys)
    assert set(redo) == downstream(["train-gallery"])
    # what was trained against the old gallery loses its outputs; the new gallery is kept
    assert "train-gallery" not in fresh and {"train-supernet", "search"} <= set(fresh)
    assert "gallery model was replaced since train-gallery recorded it (fingerprint aaaa -> bbbb)" in why
    # a supernet trained again by hand against the new gallery (under torchrun, say) is kept
    (run / "supernet" / "config.json").write_text(json.dumps({"gallery_fingerprint": "bbbb"}))
    redo, fresh, why = redo_plan(cfg, steps, keys)
    assert "train-supernet" in redo and "train-supernet" not in fresh and "search" in fresh
    # a gallery of other settings than the config's: refused before anything is deleted
    (run / "gallery" / "config.json").write_text(json.dumps({**gallery, "seed": 7}))
    with pytest.raises(HwnasError, match="trained with other seed than this config asks"):
        redo_plan(cfg, steps, keys)
    # a config change to the gallery redoes it anyway, outputs and all
    cfg.gallery.train.update(epochs=9)
    redo, fresh, why = redo_plan(cfg, steps, step_keys(cfg))
    assert "train-gallery" in fresh and "replaced" not in why
    # a gallery that turns out another only once train-gallery has run (lost and trained
    # again, or a replacement killed part way): what builds on it loses its outputs then
    from hwnas.pipeline import gallery_settled

    (run / "supernet" / "config.json").write_text(json.dumps({"gallery_fingerprint": "aaaa"}))
    steps.state["done"] = {n: {"key": keys[n]} for n in ("data", "profile", "train-gallery")}
    steps.state["done"]["train-gallery"]["fingerprint"] = "bbbb"
    steps.state["against_gallery"] = "aaaa"
    gallery_settled(cfg, steps, "aaaa", [], log=lambda *_: None)
    assert not (run / "supernet").exists() and not (run / "best_arch.json").exists()
    assert (run / "gallery" / "model.safetensors").exists()
    # (the bundle serves until the deploy done again replaces it)
    assert json.loads((run / "steps.json").read_text())["bundle_stale"] is True
    assert "against_gallery" not in json.loads((run / "steps.json").read_text())
    # --from a step loses the query models it and what builds on it train (a config change
    # keeps those whose own settings are unchanged)
    from hwnas.pipeline import forced_outputs

    q = run / "query"
    (q / "finalist-ab12cd34").mkdir(parents=True)
    # (not the finalists' runs: deterministic, the choice among them would not change)
    assert forced_outputs(cfg, downstream(["train-query"])) == [q / "searched", q / "searched-adapted"]
    assert set(forced_outputs(cfg, downstream(["search"]))) == {
        q / n for n in ("searched", "searched-adapted", "timm-mobilenetv3_small_050",
                        "smallest", "largest", "random-feasible")}
    assert forced_outputs(cfg, downstream(["report"])) == []
    # a step done afresh that cannot train is refused before the models it replaces go: a
    # gallery weights file that is no weights (a config edit redoes the gallery), or --from a
    # training whose device is not here
    from hwnas.pipeline import run_pipeline

    cfg.latency.table = str(tmp_path / "table.json")  # (put back there from the run's copy, not
    keys = step_keys(cfg)  # into the working directory's latency_tables/)
    steps.state["done"] = {n: {"key": keys[n]} for n in STEPS}
    steps.state["done"]["train-gallery"]["fingerprint"] = "bbbb"
    (run / "gallery" / "config.json").write_text(json.dumps(gallery))
    steps.state.pop("against_gallery", None)
    Path(steps.path).write_text(json.dumps(steps.state))
    (run / "latency_table.json").write_text("{}")  # (the run's copy of its table: there)
    (tmp_path / "notes.txt").write_text("not weights")
    cfg.gallery.backbone_checkpoint = str(tmp_path / "notes.txt")
    with pytest.raises(HwnasError, match="neither a safetensors file nor a torch checkpoint"):
        run_pipeline(cfg, log=lambda *_: None)
    assert (run / "gallery" / "model.safetensors").exists()
    cfg.gallery.backbone_checkpoint = None
    cfg.query.train["device"] = "cuda:7"
    with pytest.raises(HwnasError, match="train.device is 'cuda:7' but PyTorch sees no CUDA GPU"):
        run_pipeline(cfg, log=lambda *_: None, redo_from="train-query")
    assert (run / "gallery" / "model.safetensors").exists() and (run / "query" / "searched").exists()
    # nor is a query model that another process trains deleted under it
    from conftest import hold_lock

    cfg.query.train["device"] = "cpu"
    holder = hold_lock(run / "query" / "searched" / "checkpoint.safetensors")
    try:
        with pytest.raises(HwnasError, match=r"process \d+ on .* is training .*query/searched now"):
            run_pipeline(cfg, log=lambda *_: None, redo_from="train-query")
    finally:
        holder.communicate("\n", timeout=30)
    assert (run / "query" / "searched" / "model.safetensors").exists()


def test_step_keys_follow_what_each_step_reads():
    """A config edit changes the keys of the steps that read that section and of every step
    built on them, and no other."""
    from hwnas.config import load_config
    from hwnas.pipeline import STEPS, downstream, step_keys

    cfg = load_config("configs/quickstart.yaml")
    base = step_keys(cfg)

    def changed(edit) -> set[str]:
        c = load_config("configs/quickstart.yaml")
        edit(c)
        k = step_keys(c)
        return {n for n in STEPS if k[n] != base[n]}

    assert changed(lambda c: c.query.train.update(epochs=11)) == {"train-query", "baselines", "deploy", "report"}
    assert changed(lambda c: setattr(c.deploy, "int8", False)) == {"deploy"}
    assert changed(lambda c: setattr(c.deploy, "catalog", "shop/")) == {"deploy"}
    assert changed(lambda c: setattr(c.latency, "threads", 2)) == {"profile", "search", "train-query",
                                                                 "baselines", "deploy", "report"}
    assert changed(lambda c: setattr(c.latency, "validate", 5)) == set()
    # (adapt is off in this config: it stays "off" whatever it would build on)
    assert changed(lambda c: c.gallery.train.update(epochs=9)) == set(STEPS) - {"data", "profile", "adapt"}
    assert changed(lambda c: setattr(c, "run_dir", "elsewhere")) == set()
    # where and on how many threads models train: a run goes on on a GPU without redoing them
    assert changed(lambda c: (c.gallery.train.update(threads=1, device="cpu"),
                              c.supernet.train.update(device="cuda"))) == set()
    # and a run recorded by an hwnas that keyed them (a config that set them) is not redone
    from hwnas.pipeline import Steps

    c = load_config("configs/quickstart.yaml")
    c.gallery.train.update(threads=2)
    old_keys = step_keys(c, with_runtime=True)
    assert old_keys["train-gallery"] != step_keys(c)["train-gallery"]
    st = Steps(Path("/nonexistent/steps.json"))
    st.state["done"] = {n: {"key": old_keys[n]} for n in STEPS}
    assert st.changed(step_keys(c), [old_keys]) == []
    assert st.changed(step_keys(c)) != []
    # unlabeled images feed the compatibility trainings, not the split or the gallery
    assert changed(lambda c: setattr(c.data, "unlabeled", "more/")) == set(STEPS) - {"data", "profile", "train-gallery", "adapt"}
    # the same folder however spelled, and skipping unreadable images, change nothing made
    here = Path("tests").resolve()

    def spelled(value):
        c = load_config("configs/quickstart.yaml")
        c.data.unlabeled = value
        return step_keys(c)

    assert spelled("tests") == spelled(str(here)) == spelled([f"{here}/../tests"]) != spelled("strokes:8")
    assert changed(lambda c: setattr(c.data, "skip_bad_images", True)) == set()
    # a run an earlier hwnas recorded with the spelling as written is not redone for it
    from hwnas.pipeline import legacy_step_keys

    c = load_config("configs/quickstart.yaml")
    c.data.unlabeled, c.data.skip_bad_images = "tests", True
    st.state["done"] = {n: {"key": step_keys(c, as_written=True)[n]} for n in STEPS}
    assert st.changed(step_keys(c)) != [] and st.changed(step_keys(c), legacy_step_keys(c)) == []
    assert downstream(["search"]) == {"search", "train-query", "adapt", "baselines", "deploy", "report"}
    # gallery adaptation turned on: it and what ships or reports its model, nothing else
    assert changed(lambda c: setattr(c.adapt, "epochs", 15)) == {"adapt", "deploy", "report"}
    # the finalists' selection is train-query's (and the random baseline avoids every
    # finalist); off, its settings change no key
    assert changed(lambda c: setattr(c.query, "finalists", 5)) == {"train-query", "baselines", "deploy", "report"}
    assert changed(lambda c: setattr(c.query, "finalist_epochs", 3)) == set()
    # the choice rule picks the searched arch: the default adds nothing (runs from before it
    # keep theirs), another band redoes the search's choice and what builds on it
    assert changed(lambda c: setattr(c.search, "prefer_faster_within", 0)) == downstream(["search"]) - {"adapt"}
    assert changed(lambda c: setattr(c.search, "pick_in_band", "most-flops")) == downstream(["search"]) - {"adapt"}

    def adapted(edit):
        c = load_config("configs/quickstart.yaml")
        c.adapt.epochs = 15
        on = step_keys(c)
        edit(c)
        k = step_keys(c)
        return {n for n in STEPS if k[n] != on[n]}

    assert adapted(lambda c: setattr(c.adapt, "lr", 0.02)) == {"adapt", "deploy", "report"}
    assert adapted(lambda c: c.query.train.update(epochs=11)) == {"train-query", "adapt", "baselines", "deploy", "report"}
    # an hwnas that exports another graph form redoes the table and what builds on it
    import hwnas.export.onnx as exported

    form = exported.GRAPH_FORM
    try:
        exported.GRAPH_FORM = form + 1
        assert changed(lambda c: None) == {"profile", "search", "train-query", "baselines", "deploy", "report"}
    finally:
        exported.GRAPH_FORM = form


def test_run_takes_set_overrides():
    """configs/gpu-large.yaml's example points `hwnas run` at the user's data with --set."""
    from hwnas.cli import _load, build_parser

    args = build_parser().parse_args(["run", "configs/quickstart.yaml", "--set", "search.n_trials=7",
                                      "--set", "data.data_dir=/data/own"])
    cfg = _load(args)
    assert cfg.search.n_trials == 7 and cfg.data.data_dir == "/data/own"


def test_deploy_takes_the_configs_deploy_settings(monkeypatch):
    """`hwnas deploy` builds what `hwnas run` would from the config (deploy.int8, deploy.index);
    its flags add to them or replace them."""
    import hwnas.export.deploy as dep
    from hwnas.cli import main

    got = []
    monkeypatch.setattr(dep, "deploy", lambda cfg, **kw: got.append(kw))
    assert main(["deploy", "--config", "configs/gpu-large.yaml"]) == 0
    assert got[-1]["int8"] is True and got[-1]["factory"] == "HNSW32"
    off = ["--config", "configs/quickstart.yaml", "--set", "deploy.int8=false"]
    assert main(["deploy", *off]) == 0
    assert got[-1]["int8"] is False and got[-1]["factory"] is None
    assert main(["deploy", *off, "--int8", "--index", "Flat"]) == 0
    assert got[-1]["int8"] is True and got[-1]["factory"] == "Flat"


def test_unreadable_images_stop_a_run_at_its_data_step_naming_them_all(tmp_path):
    """A truncated PNG and a manifest row naming no file are found by the data step, before
    anything trains (not hours later by the first step that reads them): all of them named,
    exit 2, no split kept; with --skip-bad-images they are counted and the split is made."""
    root = make_png_folder(tmp_path / "imgs", {f"c{i:02d}": 5 for i in range(20)})
    png = root / "c03" / "img002.png"
    png.write_bytes(png.read_bytes()[:120])  # truncated
    (root / "c07" / "img004.png").write_bytes(b"\x89PNG not really")
    cfg = tmp_path / "own.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  dataset: folder\n  data_dir: {root}\n"
                   "  split: {protocol: open}\n")
    r = hwnas("run", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "2 of 100 images of the split cannot be read (c03/img002.png, c07/img004.png)" in r.stderr
    assert "--skip-bad-images" in r.stderr and "wrote" not in r.stdout  # a split is kept once its images read
    assert not (tmp_path / "run").exists()  # a new run that stops at its data leaves nothing
    r = hwnas("data", "--config", str(cfg), "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    assert "2 unreadable images are left out" in r.stdout + r.stderr
    # the images of data.unlabeled are read at the data step too (training reads them only
    # at train-supernet, after the gallery's training)
    ul = make_png_folder(tmp_path / "ul", {"any": 3})
    (ul / "any" / "img001.png").write_bytes(b"broken")
    cfg_ul = tmp_path / "own-ul.yaml"
    ok = make_png_folder(tmp_path / "imgs-ok", {f"c{i:02d}": 5 for i in range(20)})
    cfg_ul.write_text(f"run_dir: {tmp_path / 'run-ul'}\ndata:\n  dataset: folder\n  data_dir: {ok}\n"
                      f"  split: {{protocol: open}}\n  unlabeled: {ul}\n")
    r = hwnas("data", "--config", str(cfg_ul))
    assert r.returncode == 2 and f"1 of 3 images of data.unlabeled {ul} cannot be read (any/img001.png)" in r.stderr
    assert not (tmp_path / "run-ul" / "splits.json").exists()
    r = hwnas("data", "--config", str(cfg_ul), "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    assert f"1 unreadable image of data.unlabeled {ul} is left out" in r.stdout + r.stderr
    # the README's config for your own images, as the README runs it
    r = hwnas("data", "--config", "configs/own-data.yaml", "--data-dir", str(root), "--skip-bad-images",
              "--run-dir", str(tmp_path / "run-own"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run-own" / "splits.json").read_text())["config"]["protocol"] == "open"

    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(root.rglob("*.png"))
                             if p.parent.name not in ("c03", "c07")] + [f"{root / 'gone.png'},c00"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    r = hwnas("data", "--dataset", "manifest", "--data-dir", str(tmp_path / "m.csv"), "--protocol", "open",
              "--run-dir", str(tmp_path / "run-m"))
    assert r.returncode == 2 and "gone.png does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "run-m" / "splits.json").exists()


def test_a_budget_no_subnet_meets_stops_a_run_before_anything_trains(tmp_path):
    """search.budget_ms below the fastest subnet on the latency table: hwnas run says so, with
    the feasible range, right after profiling (not after the gallery and supernet trained)."""
    from conftest import tiny_config, write_cfg

    root = make_png_folder(tmp_path / "imgs", {f"c{i}": 12 for i in range(6)})
    cfg = write_cfg(tmp_path / "c.json", tiny_config(
        tmp_path / "run", data={"dataset": "folder", "data_dir": str(root), "mean": [0.5], "std": [0.5],
                                "split": {"protocol": "closed", "val_fraction": 0.25}},
        latency={"threads": 1, "validate": 0, "table": str(tmp_path / "table.json")}, search={"budget_ms": 1e-6}))
    r = hwnas("run", str(cfg), timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "latency budget 1e-06 ms (--budget-ms / search.budget_ms) is below the fastest subnet" in r.stderr
    assert "feasible budgets:" in r.stderr and "train-gallery" not in r.stdout
    assert not (tmp_path / "run" / "gallery").exists()
    # a search that cannot run (no supernet yet) leaves no study behind
    lo, hi = re.search(r"feasible budgets: ([0-9.]+) to ([0-9.]+) ms", r.stderr).groups()
    r = hwnas("search", "--config", str(cfg), "--budget-ms", str((float(lo) + float(hi)) / 2))
    assert r.returncode == 2 and "no supernet" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "search.db").exists()


def test_output_piped_into_a_reader_that_stops_early_is_no_traceback(tmp_path):
    """`hwnas space ... | head -2`: the reader closes the pipe while hwnas still writes; hwnas
    stops quietly with a pipe's exit status (141), not a BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "hwnas.cli", "space", "--config", "configs/quickstart.yaml",
                          "--sample", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    p.stdout.readline()
    p.stdout.close()  # (the reader is gone)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_an_error_raised_while_ctrl_c_unwinds_is_the_interrupt(monkeypatch, capsys):
    """Ctrl-C inside a library's bookkeeping (Optuna's tell, between two of its steps) raised
    an UnboundLocalError over the KeyboardInterrupt: hwnas says "interrupted" and exits 130
    as for a plain Ctrl-C, not a traceback; an error of its own is still one."""
    import hwnas.cli as cli

    def interrupted_cleanup(args):
        try:
            raise KeyboardInterrupt
        finally:
            raise UnboundLocalError("cannot access local variable 'updated_state'")

    monkeypatch.setitem(cli.COMMANDS, "space", interrupted_cleanup)
    assert cli.main(["space"]) == 130 and "interrupted" in capsys.readouterr().err

    def bug(args):
        raise UnboundLocalError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "space", bug)
    with pytest.raises(UnboundLocalError):
        cli.main(["space"])
