"""A run directory's files damaged (a disk filled, a copy cut short, a hand edit) or a typo
beside --restart: clear errors naming the fix, nothing trained lost, no temp files left."""

import numpy as np
import pytest

from conftest import tiny_config, write_cfg
from hwnas.config import SearchConfig, load_config
from hwnas.errors import HwnasError


def test_a_typo_with_restart_keeps_the_trained_model(tmp_path):
    """--restart empties the model's folder only once the arch or timm name is known good."""
    from hwnas.compat import api

    cfg = load_config(write_cfg(tmp_path / "c.json", tiny_config(tmp_path / "run")))
    victim = tmp_path / "run" / "query" / "victim"
    victim.mkdir(parents=True)
    (victim / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(HwnasError, match="layers"):
        api.train_query(cfg, arch="k3@0.6,skip", name="victim", restart=True)
    with pytest.raises(HwnasError, match="unknown timm model 'mobilenetv3_smal'"):
        api.train_query(cfg, timm_name="mobilenetv3_smal", name="victim", restart=True)
    assert (victim / "model.safetensors").read_bytes() == b"weights"


def test_damaged_json_checkpoint_and_best_arch_name_the_fix(tmp_path):
    from hwnas.compat.train import checkpoint_meta
    from hwnas.search.runner import load_best
    from hwnas.utils import read_json

    (tmp_path / "splits.json").write_text('{"config": {"protocol": "cl')
    with pytest.raises(HwnasError, match="splits.json is damaged.*delete it and run the command again"):
        read_json(tmp_path / "splits.json")
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(HwnasError, match="damaged.*delete it to train from the first epoch"):
        checkpoint_meta(tmp_path / "checkpoint.safetensors")
    (tmp_path / "best_arch.json").write_text("{}")
    with pytest.raises(HwnasError, match="names no arch"):
        load_best(tmp_path)
    (tmp_path / "best_arch.json").write_text('{"arch": "k3')  # (damaged: train-query never writes it)
    with pytest.raises(HwnasError, match="best_arch.json is damaged.*run `hwnas search` again"):
        load_best(tmp_path)
    # a model's config.json: deleted, it is not written anew (the folder is then no model)
    from hwnas.nn.models import load_state

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"format": "hw')
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(HwnasError, match=r"config.json is damaged.*train that model again") as e:
        load_state(tmp_path / "m")
    assert "delete it" not in str(e.value)


def test_a_damaged_embedding_cache_is_recomputed(tmp_path):
    from hwnas.compat.api import _cached

    path = tmp_path / "cache" / "gallery-val.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x50\x00\x00\x00\x00\x00\x00\x00{\"emb\": {\"dtype")  # cut off
    calls = []

    def compute():
        calls.append(1)
        return np.ones((3, 4))

    assert _cached(path, "k", compute).shape == (3, 4)
    assert _cached(path, "k", compute).shape == (3, 4) and len(calls) == 1  # the rewrite is read
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_an_interrupted_write_leaves_neither_a_half_file_nor_a_temp_file(tmp_path):
    from hwnas.utils import atomic_path

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt  # Ctrl-C mid-save
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == [target.name]


def _child(code: str, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})


def test_temp_files_a_kill_left_go_when_the_training_lock_is_next_taken(tmp_path):
    """A checkpoint write cut off by SIGKILL leaves its temp file (and safetensors' own, as
    large as the checkpoint); the next training of that model removes them, and nothing else."""
    import signal

    from hwnas.compat.train import training_lock

    folder = tmp_path / "run" / "gallery"
    folder.mkdir(parents=True)
    keep = ["model.safetensors", "config.json", "notes.tmp", ".tmp", "checkpoint.safetensors"]
    for name in keep:
        (folder / name).write_bytes(b"x")
    p = _child(f"""
from hwnas.utils import atomic_path
with atomic_path({str(folder / "checkpoint.safetensors")!r}) as tmp:
    tmp.write_bytes(b"half")
    print("writing", flush=True)
    import time; time.sleep(60)
""", tmp_path)
    assert p.stdout.readline() == "writing\n"
    p.send_signal(signal.SIGKILL)
    p.wait()
    (folder / ".tmpE3iQCZ").write_bytes(b"y" * 1000)  # safetensors' temp name
    left = sorted(set(q.name for q in folder.iterdir()) - set(keep))
    assert len(left) == 2 and left[0].startswith(".checkpoint.safetensors.") and left[1] == ".tmpE3iQCZ"
    said = []
    with training_lock(folder / "checkpoint.safetensors", "train-gallery", said.append):
        assert sorted(q.name for q in folder.iterdir()) == sorted(keep)
    assert said == [f"[train-gallery] removed 2 temp files (0.0 MB) that writes cut off by a kill left in {folder}"]


def test_sigterm_is_an_interrupt_that_removes_what_was_half_written(tmp_path):
    """kill's default signal ends a command as Ctrl-C does (143, said, no traceback), so its
    half-written file goes, where SIGTERM's default ended it as a kill and left that."""
    import signal

    p = _child(f"""
import sys, time
import hwnas.cli as cli
from hwnas.utils import atomic_path

def slow(args):
    with atomic_path({str(tmp_path / "out.bin")!r}) as tmp:
        tmp.write_bytes(b"half")
        print("writing", flush=True)
        time.sleep(60)

cli.COMMANDS["space"] = slow
sys.exit(cli.main(["space"]))
""", tmp_path)
    assert p.stdout.readline() == "writing\n"
    p.send_signal(signal.SIGTERM)
    err = p.stderr.read()
    assert p.wait(timeout=60) == 143, err
    assert "hwnas space: terminated (finished work is kept; run it again to resume)" in err
    assert "Traceback" not in err and not list(tmp_path.glob("*out.bin*"))


def test_search_settings_and_storage_errors(tmp_path, monkeypatch):
    from hwnas.rundir import RunDir
    from hwnas.search.runner import make_storage

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(HwnasError, match="budget_ms"):
            SearchConfig(budget_ms=bad)
    rd = RunDir(load_config(write_cfg(tmp_path / "c.json", tiny_config(tmp_path / "run"))))
    for url in ("journal:", f"journal:{tmp_path}"):
        with pytest.raises(HwnasError, match="journal file's path"):
            make_storage(url, rd)
    # a file that is no journal (a config given by mistake) is refused and left as it was; a
    # journal whose last record is cut off is refused with the repair, before a record goes on it
    for text in ("run_dir: x\n", "run_dir: x"):  # (one line without its newline: not "cut off")
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(HwnasError, match="c.yaml is not an Optuna journal"):
            make_storage(f"journal:{tmp_path / 'c.yaml'}", rd)
        assert (tmp_path / "c.yaml").read_text() == text
    journal = tmp_path / "j.log"
    storage, _ = make_storage(f"journal:{journal}", rd)
    import optuna

    optuna.create_study(storage=storage, study_name="s")
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 4, "worker')
    with pytest.raises(HwnasError, match=r"ends in a cut-off record.*sed -i '\$ d'"):
        make_storage(f"journal:{journal}", rd)
    journal.write_bytes(whole)
    assert optuna.get_all_study_names(make_storage(f"journal:{journal}", rd)[0]) == ["s"]
    (tmp_path / "bad.db").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(HwnasError, match="cannot open the Optuna storage.*move it away") as e:
        make_storage(f"sqlite:///{tmp_path / 'bad.db'}", rd)
    assert "\n" not in str(e.value)
    # a missing folder is named as such, not as a damaged file; an unknown scheme lists the known
    with pytest.raises(HwnasError, match="the folder .*nowhere does not exist"):
        make_storage(f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}", rd)
    with pytest.raises(HwnasError, match="give sqlite:///PATH, postgresql://"):
        make_storage("bogus://x", rd)
    with pytest.raises(HwnasError, match="give sqlite:///PATH"):  # not "the file is damaged"
        make_storage("sqlite://x.db", rd)
    # the folder check reads the URL as SQLAlchemy does: relative and percent-encoded paths open
    (tmp_path / "a b").mkdir()
    make_storage(f"sqlite:///{tmp_path}/a%20b/x.db", rd)
    assert (tmp_path / "a b" / "x.db").is_file()
    monkeypatch.chdir(tmp_path)
    make_storage("sqlite:///rel.db", rd)
    assert (tmp_path / "rel.db").is_file()


def test_a_model_name_cannot_leave_the_query_folder(tmp_path):
    """--name .. with --restart once emptied the whole run directory."""
    from hwnas.compat import api

    cfg = load_config(write_cfg(tmp_path / "c.json", tiny_config(tmp_path / "run")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "splits.json").write_text("{}")
    arch = cfg.search_space().smallest().to_string()
    for name in ("..", ".", "a/b", ".hidden"):
        with pytest.raises(HwnasError, match="plain folder name"):
            api.train_query(cfg, arch=arch, name=name, restart=True)
    assert (tmp_path / "run" / "splits.json").exists()


def test_steps_whose_outputs_are_gone_are_done_again(tmp_path):
    """hwnas run trusts no step record whose product is missing: that step (and what builds
    on it) is redone, instead of a traceback or a report without the searched model."""
    from hwnas.pipeline import STEPS, lost_steps

    cfg = load_config(write_cfg(tmp_path / "c.json", tiny_config(tmp_path / "run")))
    run = tmp_path / "run"
    for p in ("splits.json", "gallery/model.safetensors", "supernet/model.safetensors",
              "best_arch.json", "query/searched/model.safetensors", "bundle/manifest.json",
              "report.json"):
        (run / p).parent.mkdir(parents=True, exist_ok=True)
        (run / p).write_text("x")
    assert lost_steps(cfg, lambda n: True) == []
    (run / "report.json").unlink()
    (run / "best_arch.json").unlink()
    assert lost_steps(cfg, lambda n: True) == ["search", "report"]
    assert lost_steps(cfg, lambda n: n not in ("search", "report")) == []
    cfg.adapt.epochs = 3  # on: its model is a product too
    assert "adapt" in lost_steps(cfg, lambda n: n in STEPS)


def test_a_latency_table_that_is_not_one_is_named_for_what_it_is(tmp_path):
    """A path the user gave (--table) that is no table is the wrong path; a table hwnas wrote
    that no longer parses is damaged, to write anew; a header without entries says so."""
    import json

    from hwnas.latency.table import TABLE_FORMAT, LatencyTable

    (tmp_path / "t.json").write_text('{"header": ')
    with pytest.raises(HwnasError, match="t.json is not a hwnas-latency-v1 latency table"):
        LatencyTable.load(tmp_path / "t.json", given=True)
    with pytest.raises(HwnasError, match="t.json is damaged.*hwnas writes it anew"):
        LatencyTable.load(tmp_path / "t.json")
    with pytest.raises(HwnasError, match="is a folder, not a hwnas-latency-v1 latency table"):
        LatencyTable.load(tmp_path, given=True)
    (tmp_path / "t.json").write_text(json.dumps({"header": {"format": TABLE_FORMAT}}))
    with pytest.raises(HwnasError, match="header but no entries"):
        LatencyTable.load(tmp_path / "t.json")
