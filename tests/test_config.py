"""Config checks: a wrong type or value in any section is a clear error when the config is
loaded (or a --set applied), not a TypeError in the middle of a training hours later."""

import pytest

from hwnas.config import load_config
from hwnas.errors import HwnasError


def _load(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p).validate()


@pytest.mark.parametrize("text, message", [
    ("supernet:\n  train: {epochs: ten}", r"supernet\.train\.epochs must be a whole number, got str 'ten'"),
    ("gallery:\n  train: {batch_size: '64'}", "batch_size must be a whole number.*without quotes"),
    ("data:\n  mean: 0.5", r"data\.mean must be a list.*e\.g\. \[0\.5\]"),
    ("data:\n  skip_bad_images: 'false'", "skip_bad_images must be true or false"),
    ("data:\n  split: {query_fraction: '0.2'}", r"data\.split\.query_fraction must be a number"),
    ("search:\n  metric: TAR@FAR=2", r"search\.metric.*'TAR@FAR=2': the FAR must be a number between 0 and 1"),
    ("search:\n  metric: recall@2", r"search\.metric.*must be one of recall@1"),
    ("data:\n  data_dir: 123", r"data\.data_dir must be text or null"),
    ("run_dir: null", "run_dir must be text"),
    ("seed: abc", "seed must be a whole number"),
    ("space:\n  input_size: '32'", r"space\.input_size must be a whole number"),
    ("supernet:\n  loss: {bct: high}", r"supernet\.loss\.bct must be a number"),
    ("search:\n  sampler: bayes", r"search\.sampler.*'bayes' must be one of tpe, nsga2"),
    ("search:\n  alpha: 2", r"search\.alpha.*between 0 and 1"),
    ("gallery:\n  classifier: softmax", "gallery.classifier 'softmax' must be one of cosface, arcface"),
    ("latency:\n  threads: -2", "latency.threads -2 must be a thread count"),
    ("space:\n  width_mult: 0.5\nadapt:\n  max_images: 2e4", "write 20000: a whole number"),
    ("- a\n- b", "config file must be a mapping"),
    # (a new user's walkthrough: these were tracebacks from numpy or PyTorch, or named no section)
    ("seed: -1", r"seed must be a whole number from 0 to 2\*\*32 - 1, got -1"),
    ("seed: 5000000000", r"seed must be a whole number from 0 to 2\*\*32 - 1"),
    ("data:\n  split: {seed: -5}", r"data\.split: seed=-5 must be a whole number >= 0"),
    ("query:\n  train: {threads: -1}", r"query\.train: train\.threads -1 must be a thread count"),
    ("query:\n  train: {epochs: -3}", r"query\.train: train\.epochs \(-3\)"),
    ("data:\n  split: {val_fraction: 1.5}", r"data\.split: val_fraction=1\.5 must be in \[0, 1\)"),
    # (each of these loaded, and failed or misbehaved only when its step ran, hours in)
    ("query:\n  train: {lr: .nan}", r"query\.train\.lr must be a finite number, got nan"),
    ("adapt:\n  lr: .inf", r"adapt\.lr must be a finite number"),
    ("space:\n  width_mult: 1e400", r"space\.width_mult must be a finite number"),
    ("space:\n  channel_scales: [0.5, .nan]", r"space\.channel_scales must be a finite number"),
    ("search:\n  prefer_faster_within: .nan", r"prefer_faster_within must be a finite number"),
    ("query:\n  finalists: 3\n  train: {epochs: 10}", r"finalist_epochs \(10\) must be fewer than query\.train\.epochs \(10\)"),
    ("search:\n  budget_speedup: 0.5", r"budget_speedup 0\.5 must be above 1"),
    ("search:\n  budget_fraction: 1\n  budget_speedup: null", r"budget_fraction 1 must be between 0 and 1, both left out"),
    ("search:\n  sampler: evolution\n  population: 3", r"tournament \(5\) must be at most search\.population \(3\)"),
    ("supernet:\n  train: {momentum: -0.5}", r"train\.momentum -0\.5 must be in \[0, 1\)"),
    ("supernet:\n  train: {momentum: 9}", r"train\.momentum 9 must be in \[0, 1\)"),
    ("gallery:\n  train: {weight_decay: -1.0e-4}", r"train\.weight_decay -0\.0001 must be >= 0"),
    ("query:\n  train: {grad_clip: -5}", r"train\.grad_clip -5 must be >= 0"),
    ("query:\n  train: {epochs: 3, warmup_epochs: 3}", r"train\.warmup_epochs 3 must be from 0 to fewer than train\.epochs \(3\)"),
    ("query:\n  train: {device: 'cuda:x'}", r"train\.device 'cuda:x' must be auto, cpu, cuda or cuda:N"),
    ("supernet:\n  path_warmup: 1.5", r"supernet\.path_warmup 1\.5 must be in \[0, 1\]"),
    ("supernet:\n  flops_range: [5]", r"supernet\.flops_range \[5\] must be two MFLOPs figures"),
    ("supernet:\n  flops_range: [3, 1]", r"supernet\.flops_range \[3, 1\] must be two MFLOPs figures"),
    ("seed: 1" + "0" * 400, r"seed must be a whole number from 0 to 2\*\*32 - 1"),
    ("query:\n  train: {lr: 1" + "0" * 400 + "}", r"query\.train\.lr must be a finite number"),
    ("data:\n  unlabeled: []", r"data\.unlabeled \[\] must be a source"),
    ("adapt:\n  images: ''", r"adapt\.images '' must be a source"),
    ("query:\n  loss: {scale: 0}", r"loss\.scale \(0\) must be > 0"),
    ("deploy:\n  catalog: ' '", r"deploy\.catalog is empty"),
    ("latency:\n  validate: 2", r"latency\.validate 2 must be 0 \(no end-to-end check\) or at least 3"),
    ("gallery:\n  train: {batch_size: 1}", r"train\.batch_size \(1\) at least 2 \(BatchNorm"),
    ("gallery:\n  backbone_checkpoint: ''", r"gallery\.backbone_checkpoint is empty; give your weights file's path"),
    ("# nothing but a comment\n", r"holds no settings \(it is empty or all comments\).*a file holding \{\}"),
])
def test_wrong_type_or_value_is_named_at_load(tmp_path, text, message):
    with pytest.raises(HwnasError, match=message):
        _load(tmp_path, text)


def test_settings_that_are_not_read_are_not_refused(tmp_path):
    """A budget fraction or speed-up the search does not read (budget_ms set), an empty or
    zero-based flops_range, and freeze_backbone before a flag gives the checkpoint, all load."""
    cfg = _load(tmp_path, "search:\n  budget_ms: 5\n  budget_fraction: 1\n  budget_speedup: 1\n"
                          "supernet:\n  flops_range: [0, 5e-1]\n")
    assert cfg.search.budget_ms == 5 and cfg.supernet.flops_range == [0, 0.5]
    assert _load(tmp_path, "supernet:\n  flops_range: []\n").supernet.flops_range is None
    assert _load(tmp_path, "gallery:\n  freeze_backbone: true\n").gallery.freeze_backbone


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as text; a float field takes it as the number meant."""
    cfg = _load(tmp_path, "query:\n  train: {lr: 1e-3, epochs: 3}\nadapt:\n  lr: 5E-4\n")
    assert cfg.train_config("query").lr == 0.001 and cfg.adapt.lr == 0.0005


def test_set_overrides_are_checked(tmp_path):
    from hwnas.cli import apply_sets

    cfg = load_config(None)
    apply_sets(cfg, ["search.n_trials=7", "data.mean=[0.4]"])
    assert cfg.search.n_trials == 7 and cfg.data.mean == (0.4,)
    for item, message in [("search.n_trials=many", "n_trials must be a whole number"),
                          ("data.split.query_fraction=[", "not valid YAML"),
                          ("data=5", "data is a section; set one of its keys")]:
        with pytest.raises(HwnasError, match=message):
            apply_sets(load_config(None), [item])
    # a key inside a plain-dict part (train, loss, split), and each section's own value
    # checks, run when the config validates (the CLI does so once every --set is in)
    for item, message in [("supernet.train.epochs=ten", r"supernet\.train\.epochs"),
                          ("search.sampler=bayes", "'bayes' must be one of")]:
        cfg = load_config(None)
        apply_sets(cfg, [item])
        with pytest.raises(HwnasError, match=message):
            cfg.validate()


def test_empty_sections_and_set_order(tmp_path):
    """A section whose keys are all commented out (YAML null) means its defaults, as it did;
    --set values that must change together are checked once all are in, in any order."""
    from hwnas.cli import apply_sets

    cfg = _load(tmp_path, "space:\ndata:\n  split:\ngallery:\n  train:\n")
    assert cfg.search_space().name == "default" and cfg.train_config("gallery").epochs >= 1
    assert cfg.data.split == {} and cfg.space == {}  # mappings, which the CLI's flags add to
    import argparse

    from hwnas.cli import _load as cli_load

    args = argparse.Namespace(config=str(tmp_path / "c.yaml"), protocol="open", seed=3)
    assert cli_load(args).data.split == {"protocol": "open", "seed": 3}
    p = tmp_path / "e.yaml"
    p.write_text("search:\n  sampler: evolution\n")
    cfg = load_config(p)
    apply_sets(cfg, ["search.multi_objective=true", "search.sampler=nsga2"])
    assert cfg.validate().search.sampler == "nsga2"
    cfg = load_config(p)
    apply_sets(cfg, ["search.multi_objective=true"])
    with pytest.raises(HwnasError, match="single-objective"):
        cfg.validate()


def test_a_run_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(HwnasError, match="is a file, not a folder"):
        _load(tmp_path, f"run_dir: {tmp_path / 'f'}")


def test_a_run_dir_that_cannot_be_written_is_named_not_a_traceback(tmp_path, capsys):
    # under a file (no folder can be made there): the path and the fix, exit 2
    from hwnas.cli import main

    (tmp_path / "f").write_text("x")
    rc = main(["data", "--dataset", "digits", "--run-dir", str(tmp_path / "f" / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"error: cannot access {tmp_path / 'f'}" in err and "check that path" in err
    from hwnas.cli import _os_problem

    assert "the disk is full (No space left on device)" in _os_problem(OSError(28, "No space left on device"))
    assert _os_problem(ValueError("a bug")) is None and _os_problem(OSError(2, "No such file", "x")) is None


def test_a_weights_file_path_is_the_home_folders_under_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _load(tmp_path, "gallery:\n  backbone_checkpoint: ~/w.safetensors")
    assert cfg.gallery.backbone_checkpoint == str(tmp_path / "w.safetensors")


def test_a_verification_metric_has_one_spelling(tmp_path):
    """search.metric TAR@FAR=f (face verification), however f is written, is the key the
    evaluation writes."""
    assert _load(tmp_path, "search:\n  metric: TAR@FAR=1e-3\n").search.metric == "TAR@FAR=0.001"
    assert _load(tmp_path, "search:\n  metric: TAR@FAR=0.0001\n").search.metric == "TAR@FAR=0.0001"
