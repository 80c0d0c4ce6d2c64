"""Compatibility training on real data (Fashion-MNIST subset), tiny configs."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hwnas.compat import api
from hwnas.config import load_config
from conftest import TINY_SPACE, hold_lock, tiny_config, write_cfg
from hwnas.errors import HwnasError

@pytest.fixture(scope="session")
def trained_gallery(tmp_path_factory, fmnist_dir):
    """One gallery model for the session (resnet10t, 2,000 training images)."""
    root = tmp_path_factory.mktemp("compat")
    cfg_path = write_cfg(root / "c.json", tiny_config(root / "run"))
    from hwnas.cli import main

    assert main(["train-gallery", "--config", str(cfg_path)]) == 0  # (the README's command)
    return root


def _clone_run(src_root: Path, dst: Path, **over) -> Path:
    """A new run dir that shares the trained gallery (copied) and the split."""
    import shutil

    run = dst / "run"
    run.mkdir(parents=True)
    shutil.copytree(src_root / "run" / "gallery", run / "gallery",
                    ignore=shutil.ignore_patterns("checkpoint*"))
    shutil.copy(src_root / "run" / "splits.json", run / "splits.json")
    return write_cfg(dst / "c.json", tiny_config(run, **over))


def test_compatibility_is_learned_not_accidental(trained_gallery, tmp_path):
    cfg = load_config(_clone_run(trained_gallery, tmp_path))
    arch = cfg.search_space().largest().to_string()
    quiet = lambda *_: None  # noqa: E731
    api.train_query(cfg, arch=arch, name="with", inherit=False, log=quiet)
    api.train_query(cfg, arch=arch, name="without", inherit=False,
                    loss_override={"own_cls": 1.0, "bct": 0.0, "regress": 0.0}, log=quiet)
    w = api.evaluate_query(cfg, query_dir=str(tmp_path / "run/query/with"), log=quiet)["metrics"]
    wo = api.evaluate_query(cfg, query_dir=str(tmp_path / "run/query/without"), log=quiet)["metrics"]
    chance = 0.1  # 10 balanced classes
    assert w["M(g,g)"]["recall@1"] > 0.6
    assert w["M(q,g)"]["recall@1"] > 0.5  # compatible: far above chance
    assert wo["M(q,q)"]["recall@1"] > 0.5  # the model itself is fine...
    assert wo["M(q,g)"]["recall@1"] < chance + 0.15  # ...but it cannot search the gallery index
    assert w["M(q,g)"]["recall@1"] > wo["M(q,g)"]["recall@1"] + 0.3
    # the contrastive part alone (no classifier, no regression) also makes it compatible
    c = api.train_query(cfg, arch=arch, name="contrast", inherit=False, log=quiet,
                        loss_override={"own_cls": 0.0, "bct": 0.0, "regress": 0.0, "contrast": 1.0})
    assert c["loss"]["contrast"] == 1.0 and "contrast" in c["history"][-1]
    mc = api.evaluate_query(cfg, query_dir=str(tmp_path / "run/query/contrast"), log=quiet)["metrics"]
    assert mc["M(q,g)"]["recall@1"] > wo["M(q,g)"]["recall@1"] + 0.3


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gallery_is_never_updated(trained_gallery, tmp_path):
    cfg = load_config(_clone_run(trained_gallery, tmp_path))
    w = tmp_path / "run" / "gallery" / "model.safetensors"
    before = _sha(w)
    gallery = api.run_gallery(api.RunDir(cfg))
    snap = {k: v.clone() for k, v in gallery.net.state_dict().items()}
    snap_cls = gallery.classifier.weight.clone()
    # train the supernet with the very objects the gallery consists of
    from hwnas.compat.losses import CompatLoss, LossConfig
    from hwnas.compat.tasks import ArchSampler, CompatTask
    from hwnas.compat.train import TrainConfig, fit
    from hwnas.nn.supernet import Supernet

    space, pre = cfg.search_space(), cfg.preprocess()
    data = api.load_part(api.RunDir(cfg), "train", pre, gallery.class_names, log=lambda *_: None)
    net = Supernet(space)
    loss = CompatLoss(LossConfig(), space.embed_dim, len(gallery.class_names), gallery.classifier)
    task = CompatTask(net, loss, gallery.net, None, ArchSampler(space, 0))  # gallery forward each step
    fit(task, data.images[:256], data.labels[:256], pre.normalize,
        TrainConfig(epochs=1, batch_size=64, augment="crop"), tmp_path / "ck.safetensors",
        log=lambda *_: None)
    for k, v in gallery.net.state_dict().items():
        assert torch.equal(v, snap[k]), k  # bit-identical, BN statistics included
    assert torch.equal(gallery.classifier.weight, snap_cls)
    api.train_supernet(cfg, log=lambda *_: None)
    assert _sha(w) == before


def test_incompatible_pairs_are_clear_errors(trained_gallery, tmp_path):
    cfg = load_config(_clone_run(trained_gallery, tmp_path / "a",
                                 space={**TINY_SPACE, "embed_dim": 16}))
    with pytest.raises(HwnasError, match="embed_dim"):
        api.train_supernet(cfg, log=lambda *_: None)
    cfg = load_config(_clone_run(trained_gallery, tmp_path / "b",
                                 data={**tiny_config(Path("x"))["data"], "mean": [0.5]}))
    with pytest.raises(HwnasError, match="normalization differs"):
        api.train_supernet(cfg, log=lambda *_: None)
    # a gallery whose classifier lacks some training classes
    run = tmp_path / "b" / "run"
    c = json.loads((run / "gallery" / "config.json").read_text())
    cfg = load_config(_clone_run(trained_gallery, tmp_path / "c"))
    gdir = tmp_path / "c" / "run" / "gallery"
    c["classifier"]["classes"] = c["classifier"]["classes"][:-1]
    (gdir / "config.json").write_text(json.dumps(c))
    with pytest.raises(HwnasError, match="fingerprint"):  # tampering is caught first
        api.train_supernet(cfg, log=lambda *_: None)


def test_uncovered_classes_error(tmp_path, fmnist_dir):
    """BCT needs every training class in the gallery classifier."""
    from hwnas.data.images import Preprocess

    rd = api.RunDir(load_config(write_cfg(tmp_path / "c.json", tiny_config(tmp_path / "run"))))
    with pytest.raises(HwnasError, match="not among the gallery classifier"):
        api.load_part(rd, "train", Preprocess(32, 1, (0.286,), (0.353,)),
                      class_names=["T-shirt/top", "Trouser"], log=lambda *_: None)


def _env():
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def test_kill_and_resume(trained_gallery, tmp_path):
    cfg_path = _clone_run(trained_gallery, tmp_path,
                          supernet={"train": {"epochs": 4, "batch_size": 32}})
    ckpt = tmp_path / "run" / "supernet" / "checkpoint.safetensors"
    cmd = [sys.executable, "-m", "hwnas.cli", "train-supernet", "--config", str(cfg_path)]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # never an unread pipe
    t = time.time()
    while not ckpt.exists() and time.time() - t < 120 and p.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint after the first epoch"
    p.send_signal(signal.SIGKILL)
    p.wait()
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["hwnas"])
    done = meta["epoch"] + 1
    assert done < 4, "the run finished before it could be killed"
    first = meta["history"][0]
    # without --resume an existing checkpoint is not silently overwritten
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming after epoch {done}/4" in r.stdout
    hist = json.loads((tmp_path / "run" / "supernet" / "config.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[0] == first  # the finished epoch was kept, not redone


def test_torchrun_two_cpu_processes(trained_gallery, tmp_path):
    cfg_path = _clone_run(trained_gallery, tmp_path, supernet={"train": {"epochs": 1, "batch_size": 32}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hwnas.cli", "train-supernet", "--config", str(cfg_path)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    cfg = json.loads((tmp_path / "run" / "supernet" / "config.json").read_text())
    assert len(cfg["history"]) == 1
    # each of the 2 ranks took half of every epoch: 2000 images / 2 / 32 = 31 steps per rank
    assert cfg["history"][0]["images_per_s"] > 0


def test_torchrun_train_query_and_adapt(trained_gallery, tmp_path):
    # the README names them beside train-gallery and train-supernet for torchrun
    cfg_path = _clone_run(trained_gallery, tmp_path, query={"train": {"epochs": 1, "batch_size": 32}})
    arch = load_config(cfg_path).search_space().smallest().to_string()
    query = tmp_path / "run" / "query"
    for args in (["train-query", "--arch", arch, "--no-inherit", "--name", "small"],
                 ["adapt", "--query", str(query / "small"), "--epochs", "1"]):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "hwnas.cli", *args, "--config", str(cfg_path)],
                           env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "2 processes" in r.stdout
    assert sorted(p.name for p in query.iterdir()) == ["small", "small-adapted"]
    assert len(json.loads((query / "small-adapted" / "config.json").read_text())["history"]) == 1


def test_evaluate_cli_json(trained_gallery, tmp_path):
    cfg_path = _clone_run(trained_gallery, tmp_path, query={"train": {"epochs": 1, "batch_size": 64}})
    arch = load_config(cfg_path).search_space().smallest().to_string()
    env = _env()
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "train-query", "--config", str(cfg_path),
                        "--arch", arch, "--no-inherit", "--name", "small"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "M(q,g)" in r.stdout and "BCT criterion" in r.stdout
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "evaluate", "--config", str(cfg_path),
                        "--query", str(tmp_path / "run/query/small"), "--json"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["metrics"]) == {"M(g,g)", "M(q,g)", "M(q,q)"}
    for m in res["metrics"].values():
        assert {"recall@1", "recall@5", "mAP"} <= set(m)
    assert isinstance(res["bct_criterion_M(q,g)>M(q,q)"], bool)
    # + verification at a false accept rate (the README's --far 1e-3)
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "evaluate", "--config", str(cfg_path),
                        "--query", str(tmp_path / "run/query/small"), "--far", "1e-3", "--json"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tar = json.loads(r.stdout)["metrics"]["M(q,g)"]["TAR@FAR=0.001"]
    assert 0 <= tar <= 1 and json.loads(r.stdout)["metrics"]["M(q,g)"]["recall@1"] == res["metrics"]["M(q,g)"]["recall@1"]
    # a FAR the split's pairs cannot resolve: an error naming the smallest that works, not a NaN
    ev = tmp_path / "run/query/small/evaluation-test.json"
    before = ev.read_bytes()
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "evaluate", "--config", str(cfg_path),
                        "--query", str(tmp_path / "run/query/small"), "--far", "1e-9"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "FAR 1e-09 needs at least 1,000,000,000 other-class pairs" in r.stderr, r.stderr
    want = re.search(r"the smallest FAR they resolve is (\S+);", r.stderr).group(1)
    assert float(want) * int(re.search(r"there are ([0-9,]+):", r.stderr).group(1).replace(",", "")) >= 1
    assert ev.read_bytes() == before


def test_timm_baseline_query(trained_gallery, tmp_path):
    cfg_path = _clone_run(trained_gallery, tmp_path, query={"train": {"epochs": 1, "batch_size": 64}})
    from hwnas.cli import main

    # the README's train-query --timm, in this process
    assert main(["train-query", "--config", str(cfg_path), "--timm", "mobilenetv3_small_050"]) == 0
    q = json.loads((tmp_path / "run/query/timm-mobilenetv3_small_050/config.json").read_text())
    assert q["kind"] == "timm" and q["timm"] == "mobilenetv3_small_050" and q["flops"] > 0
    # the command evaluated it on the test split
    res = json.loads((tmp_path / "run/query" / q["name"] / "evaluation-test.json").read_text())
    assert res["metrics"]["M(q,g)"]["n_queries"] == 120  # 20% of 60 test images x 10 classes


def test_train_device_choice_and_clear_errors(monkeypatch):
    from hwnas.compat.train import TrainConfig, train_device

    assert train_device(TrainConfig()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert train_device(TrainConfig(device="cpu")).type == "cpu"
    with pytest.raises(HwnasError, match="train.device 'tpu'"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(HwnasError, match="no CUDA GPU.*train.device=cpu"):
            train_device(TrainConfig(device="cuda"))
    else:  # under torchrun a named GPU would take every process: refused, naming the fix
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert train_device(TrainConfig(device="cuda:0")) == torch.device("cuda:0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process a node: cuda:0 is its own GPU
        assert train_device(TrainConfig(device="cuda:0")) == torch.device("cuda:0")
        if torch.cuda.device_count() >= 2:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
            with pytest.raises(HwnasError, match="under torchrun.*train.device=cuda"):
                train_device(TrainConfig(device="cuda:0"))


def test_affine_augmentation_is_deterministic_and_keeps_edges():
    from hwnas.compat.train import augment_batch

    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 12:20, 14:18] = 1.0  # a stroke on a blank page
    a = augment_batch(x, "affine", torch.Generator().manual_seed(3))
    b = augment_batch(x, "affine", torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, x, atol=1e-3)          # it moves the stroke
    assert abs(a.sum() / x.sum() - 1) < 0.35            # scale 0.9-1.1: the ink is roughly kept
    page = torch.full((4, 1, 32, 32), 0.7)               # a blank page stays blank (edges extended)
    assert torch.allclose(augment_batch(page, "affine", torch.Generator().manual_seed(0)), page, atol=1e-5)


def test_a_resumed_run_trains_the_same_model_as_an_unbroken_one(tmp_path):
    """Stopped after an epoch (stop_after, or a kill) and resumed in a fresh process — whose
    setup seeds torch's global generator again — a run ends bit-identical to an unbroken
    one, random draws from that generator (the mix part's blend weights) included."""
    from hwnas.compat.train import TrainConfig, fit

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y, idx):
            noise = torch.rand(len(x), 1)  # the global generator, as mix_images draws
            return ((self.lin(x.flatten(1)) + noise - y.float().unsqueeze(1)) ** 2).mean(), {}

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 2, 2, generator=g), torch.randint(0, 3, (64,), generator=g)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    quiet = lambda *_: None  # noqa: E731

    def run(path, stops):
        for stop in stops:  # each call as a fresh process would make it
            torch.manual_seed(0)
            m = Noisy()
            fit(m, images, labels, lambda x: x, cfg, path, seed=0, resume=True, stop_after=stop, log=quiet)
        return m.state_dict()

    unbroken = run(tmp_path / "a.safetensors", [None])
    resumed = run(tmp_path / "b.safetensors", [1, 2, None])
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


def test_a_finished_model_of_another_arch_is_not_silently_kept(trained_gallery, tmp_path):
    """A new search may choose a new arch for the same name ('searched'): the old model is an
    error naming --restart, or (hwnas run) trained again — never reported as the new one."""
    cfg = load_config(_clone_run(trained_gallery, tmp_path, query={"train": {"epochs": 1, "batch_size": 64}}))
    space, quiet = cfg.search_space(), (lambda *_: None)
    small, large = space.smallest().to_string(space), space.largest().to_string(space)
    first = api.train_query(cfg, arch=small, name="searched", inherit=False, log=quiet)
    again = api.train_query(cfg, arch=small, name="searched", inherit=False, log=quiet)
    assert again["fingerprint"] == first["fingerprint"]  # the same model: kept
    with pytest.raises(HwnasError, match="other arch.*--restart"):
        api.train_query(cfg, arch=large, name="searched", inherit=False, log=quiet)
    new = api.train_query(cfg, arch=large, name="searched", inherit=False, retrain_changed=True, log=quiet)
    assert new["arch"] == large and new["fingerprint"] != first["fingerprint"]


def test_contrastive_part_rewards_keeping_the_gallery_neighbourhoods():
    """InfoNCE over the batch: low when each query embedding is nearest its own image's
    gallery embedding, high when the queries are shuffled. On by default (weight 5); when
    set to 0 it is left out of the stored loss settings, so models trained without it keep
    their fingerprints."""
    from hwnas.compat.losses import CompatLoss, LossConfig

    assert LossConfig().contrast == 5.0 and LossConfig().to_dict()["contrast"] == 5.0
    off = LossConfig(own_cls=1.0, bct=0.0, regress=1.0, contrast=0.0)
    assert "contrast" not in off.to_dict()
    assert not LossConfig(own_cls=1.0, bct=0.0, regress=0.0, contrast=0.0).needs_gallery_emb
    cfg = LossConfig(own_cls=0.0, bct=0.0, regress=0.0, contrast=1.0, contrast_temp=0.1)
    assert cfg.needs_gallery_emb and cfg.to_dict()["contrast"] == 1.0
    loss = CompatLoss(cfg, embed_dim=16, num_classes=4)
    g = torch.nn.functional.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.zeros(32, dtype=torch.long)
    aligned, parts = loss(g.clone(), y, g)
    shuffled, _ = loss(g[torch.randperm(32, generator=torch.Generator().manual_seed(1))], y, g)
    assert set(parts) == {"contrast"} and float(aligned) < 0.5 < 2.0 < float(shuffled)
    with pytest.raises(HwnasError, match="needs the gallery embeddings"):
        loss(g, y, None)
    with pytest.raises(HwnasError, match="contrast_temp"):
        LossConfig(contrast=1.0, contrast_temp=0.0)


def test_bank_part_matches_the_gallery_ranking_over_a_queue_of_earlier_batches(tmp_path):
    """The bank part: KL between the gallery's and the query's similarity distributions over
    a queue of earlier batches' gallery embeddings. Zero while the queue holds less than a
    batch; then zero for a query equal to the gallery and positive (with a gradient) for one
    that ranks the queue differently; the queue wraps at bank_size, fills only in training,
    never holds the current batch at its own step, and travels in the training checkpoint so
    a resumed run goes on with it. Off by default and left out of stored settings."""
    from hwnas.compat.losses import CompatLoss, LossConfig
    from hwnas.compat.train import load_checkpoint, save_checkpoint

    assert "bank" not in LossConfig().to_dict() and not LossConfig(
        own_cls=1.0, bct=0.0, regress=0.0, contrast=0.0).needs_gallery_emb
    cfg = LossConfig(own_cls=0.0, bct=0.0, regress=0.0, contrast=0.0, bank=1.0, bank_size=80)
    assert cfg.needs_gallery_emb and cfg.to_dict()["bank_size"] == 80
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=1)
    y = torch.zeros(32, dtype=torch.long)
    loss = CompatLoss(cfg, embed_dim=16, num_classes=4).train()
    first, parts = loss(emb[:32].clone(), y, emb[:32])
    assert set(parts) == {"bank"} and float(first) == 0 and int(loss.bank_fill) == 32
    loss.eval()
    loss(emb[32:64].clone(), y, emb[32:64])
    assert int(loss.bank_fill) == 32  # evaluation leaves the queue alone
    loss.train()
    for i in (1, 2, 3):  # 4 batches of 32 through an 80-row queue: it wraps
        g = emb[32 * i:32 * (i + 1)]
        same, _ = loss(g.clone(), y, g)
        assert float(same) < 1e-5
    assert int(loss.bank_fill) == 80 and int(loss.bank_ptr) == 128 % 80
    torch.testing.assert_close(loss.bank, torch.cat([emb[80:128], emb[48:80]]))
    q = torch.randn(32, 16, generator=gen, requires_grad=True)
    other, _ = loss(q, y, emb[128:160])
    assert float(other.detach()) > 1.0
    other.backward()
    assert q.grad.abs().sum() > 0
    # a checkpoint of the training module carries the queue; a fresh loss resumes with it
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    save_checkpoint(tmp_path / "c.safetensors", loss, opt, {})
    resumed = CompatLoss(cfg, embed_dim=16, num_classes=4)
    load_checkpoint(tmp_path / "c.safetensors", resumed, opt)
    assert torch.equal(resumed.bank, loss.bank) and int(resumed.bank_ptr) == int(loss.bank_ptr)
    # a queue shorter than a batch works once full (it stayed 0 for good)
    short = CompatLoss(LossConfig(own_cls=0.0, bct=0.0, regress=0.0, contrast=0.0, bank=1.0, bank_size=8),
                       embed_dim=16, num_classes=4).train()
    short(emb[:32].clone(), y, emb[:32])
    q = torch.randn(32, 16, generator=gen)
    assert int(short.bank_fill) == 8 and float(short(q, y, emb[32:64])[0]) > 0
    for bad, match in (({"bank_temp": 0.0}, "bank_temp"), ({"bank_size": 0}, "bank_size"),
                       ({"bank_size": 2.5}, "bank_size")):
        with pytest.raises(HwnasError, match=match):
            LossConfig(bank=1.0, **bad)


def test_rank_part_keeps_the_gallery_order_of_each_images_queued_neighbours():
    """The rank part: over each image's rank_k nearest queued gallery embeddings, the query's
    pairwise similarity differences must match the gallery's. Zero for a query equal to the
    gallery (at any scale); positive, with a gradient, for one that reorders them, and 5x for
    a flipped pair's error. It shares the bank's queue (filled once per step when both are
    on); both parts leave an image's own earlier entries out of its neighbours; a batch of one
    gives 0, not NaN; an older training checkpoint resumes. Off: left out of stored settings."""
    from hwnas.compat.losses import CompatLoss, LossConfig

    off = dict(own_cls=0.0, bct=0.0, regress=0.0, contrast=0.0)
    assert "rank" not in LossConfig().to_dict() and "bank_size" not in LossConfig().to_dict()
    cfg = LossConfig(**off, rank=1.0, rank_k=4, bank_size=64)
    assert cfg.needs_gallery_emb and cfg.uses_unlabeled
    assert cfg.to_dict()["rank_k"] == 4 and cfg.to_dict()["bank_size"] == 64 and "bank" not in cfg.to_dict()
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(96, 8, generator=gen), dim=1)
    y = torch.zeros(32, dtype=torch.long)
    loss = CompatLoss(cfg, embed_dim=8, num_classes=2).train()
    first, parts = loss(emb[:32].clone(), y, emb[:32])
    assert set(parts) == {"rank"} and float(first) == 0 and int(loss.bank_fill) == 32
    loss(emb[32:64].clone(), y, emb[32:64])
    g = emb[64:96]
    assert float(loss(g.clone(), y, g)[0]) < 1e-6
    assert float(loss(g * 3.0, y, g)[0]) < 1e-5  # (the query is normalized: scale is free)
    q = torch.randn(32, 8, generator=gen, requires_grad=True)
    other, _ = loss(q, y, g)
    assert float(other.detach()) > 0.5
    other.backward()
    assert q.grad.abs().sum() > 0
    # flips weigh more. Keys e1, e2, e3: similarities are coordinates. Gallery 0.6 > 0.5 > 0.4;
    # two queries with the same absolute errors on the same pairs (0.15 on (e2, e3) and on
    # (e1, e3)), one keeping the order (e3 at 0.25), one putting e3 above e2 (at 0.55)
    def unit(*xs):
        return torch.tensor([[*xs, (1 - sum(x * x for x in xs)) ** 0.5]])

    k3 = torch.eye(4)[:3]
    r3 = CompatLoss(LossConfig(**off, rank=1.0, rank_k=3), 4, 2)
    g3 = unit(0.6, 0.5, 0.4)
    kept, flipped = (float(r3._rank_order(unit(0.6, 0.5, s3), g3, (k3, None))) for s3 in (0.25, 0.55))
    assert kept == pytest.approx((0.15 / 0.2 + 0.15 / 0.3) / 3, rel=1e-5)
    assert flipped == pytest.approx((5 * 0.15 / 0.2 + 0.15 / 0.3) / 3, rel=1e-5)
    # with the bank on too, both parts share one queue filled once per step
    both = CompatLoss(LossConfig(**off, bank=1.0, rank=1.0, rank_k=4, bank_size=64), 8, 2).train()
    _, parts = both(emb[:32].clone(), y, emb[:32])
    assert set(parts) == {"bank", "rank"} and int(both.bank_fill) == 32
    # an image's own earlier entries (another epoch's view of it) are not its neighbours: given
    # the images' indices, each image scores as against the queue without its own entry
    for part in ("rank", "bank"):
        c = LossConfig(**off, **{part: 1.0}, rank_k=4, bank_size=64)
        m, ids = CompatLoss(c, 8, 2).train(), torch.arange(64)
        m(emb[:32].clone(), y, emb[:32], ids[:32])
        m(emb[32:64].clone(), y, emb[32:64], ids[32:64])  # the queue: images 0-63
        fn = m._rank_order if part == "rank" else m._bank_kl
        q = torch.randn(32, 8, generator=gen)
        alone = [float(fn(q[i:i + 1], emb[i:i + 1], (emb[:64][torch.arange(64) != i], None))) for i in range(32)]
        got = float(m(q, y, emb[:32], ids[:32])[0])
        assert got == pytest.approx(sum(alone) / 32, rel=1e-4) and got > 0
        assert float(m(q, y, emb[:32])[0]) != pytest.approx(got, rel=1e-3)  # (no indices: they count)
    # a batch of one: a single queued key makes no pair, a zero rather than NaN
    one = CompatLoss(LossConfig(**off, rank=1.0, rank_k=4), 8, 2).train()
    one(emb[:1].clone(), y[:1], emb[:1], torch.tensor([0]))
    assert float(one(emb[1:2] * -1, y[:1], emb[1:2], torch.tensor([1]))[0]) == 0
    # a training checkpoint from before the queue recorded its images resumes, none recorded
    old_state = {k: v for k, v in both.state_dict().items() if k != "bank_idx"}
    fresh = CompatLoss(LossConfig(**off, bank=1.0, rank=1.0, rank_k=4, bank_size=64), 8, 2)
    fresh.load_state_dict(old_state)
    assert torch.equal(fresh.bank, both.bank) and bool((fresh.bank_idx == -1).all())
    for bad in ({"rank_k": 1}, {"rank_k": 2.5}, {"rank_k": 100, "bank_size": 50}):
        with pytest.raises(HwnasError, match="rank_k"):
            LossConfig(rank=1.0, **bad)
    LossConfig(rank=0.0, rank_k=1)  # off: its settings are not checked


def test_mix_part_matches_the_gallery_on_blended_images():
    """The mix part: both models on blends of two batch images; zero when the query computes
    the gallery's function, positive (with a gradient into the query) when it does not; only
    in training; off by default and then left out of the stored loss settings."""
    import copy

    from hwnas.compat.losses import CompatLoss, LossConfig
    from hwnas.compat.tasks import CompatTask

    assert "mix" not in LossConfig().to_dict()
    cfg = LossConfig(own_cls=0.0, bct=0.0, regress=1.0, contrast=0.0, mix=2.0)
    assert cfg.needs_gallery and cfg.to_dict()["mix"] == 2.0
    torch.manual_seed(0)
    gallery = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x, y, idx = torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long), torch.arange(16)
    same = CompatTask(copy.deepcopy(gallery), CompatLoss(cfg, 8, 2), gallery).train()
    _, parts = same(x, y, idx)
    assert set(parts) == {"regress", "mix"} and parts["mix"] < 1e-6
    other = CompatTask(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)), CompatLoss(cfg, 8, 2), gallery)
    total, parts = other.train()(x, y, idx)
    assert parts["mix"] > 0.1
    total.backward()
    assert other.net[1].weight.grad.abs().sum() > 0 and all(p.grad is None for p in gallery.parameters())
    assert "mix" not in other.eval()(x, y, idx)[1]
    # cutmix: each pixel from one of the two images, a box of the second in the first
    from hwnas.compat.tasks import mix_images

    a, b = torch.zeros(64, 1, 16, 16), torch.ones(64, 1, 16, 16)
    m = mix_images(a, b, "cutmix")
    frac = m.mean((1, 2, 3))
    assert set(m.unique().tolist()) <= {0.0, 1.0} and 0.2 < float(frac.mean()) < 0.5
    assert float(frac.min()) < 0.1 and float(frac.max()) > 0.6  # box sizes vary with l
    assert LossConfig(mix=1.0, mix_kind="cutmix").to_dict()["mix_kind"] == "cutmix"
    assert "mix_kind" not in LossConfig(mix=1.0).to_dict()
    with pytest.raises(HwnasError, match="mix_kind"):
        LossConfig(mix=1.0, mix_kind="mosaic")


def test_feat_part_matches_the_gallery_feature_maps_through_trained_adapters(tmp_path):
    """The feat part: a subnet's stage ends and a timm backbone's feature_info are read at
    their reductions; the query's maps, through 1x1 convolutions, are compared with the frozen
    gallery's at each reduction of feat_at. Zero for the gallery's own maps through identity
    convolutions, positive with a gradient into the query and the convolutions (never the
    gallery) otherwise; only in training; the convolutions travel in the training checkpoint
    and no hook stays on either network. Refused for the supernet and where a reduction is
    missing; off by default and left out of the stored settings."""
    import copy

    from hwnas.compat.features import check_feature_maps, feature_points
    from hwnas.compat.losses import CompatLoss, LossConfig
    from hwnas.compat.tasks import ArchSampler, CompatTask
    from hwnas.compat.train import load_checkpoint, save_checkpoint
    from hwnas.nn.models import EmbeddingNet
    from hwnas.nn.supernet import Supernet, SubNet
    from hwnas.space import SearchSpace

    assert "feat" not in LossConfig().to_dict() and "feat_at" not in LossConfig().to_dict()
    cfg = LossConfig(own_cls=0.0, bct=0.0, regress=1.0, contrast=0.0, feat=2.0)
    assert cfg.needs_gallery and cfg.uses_unlabeled and cfg.to_dict()["feat_at"] == [8, 16]
    cfg_816 = LossConfig(feat=1.0).to_dict()
    space = SearchSpace(**TINY_SPACE)
    sub = SubNet(space, space.smallest())
    points = feature_points(sub)
    assert sorted(points) == [4, 8, 16, 32]
    assert [c for c, _ in (points[r] for r in (4, 8, 16, 32))] == list(TINY_SPACE["stage_widths"])
    torch.manual_seed(0)
    gallery = EmbeddingNet("resnet10t", 32, 1).eval()
    x = torch.randn(2, 1, 32, 32)
    maps = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, r=r: maps.__setitem__(r, o.shape))
             for r, (_, m) in feature_points(gallery).items()]
    gallery(x)
    for h in hooks:
        h.remove()
    assert {r: s[-1] for r, s in maps.items()} == {2: 16, 4: 8, 8: 4, 16: 2, 32: 1}  # 32 px / r
    x, y, idx = torch.randn(8, 1, 32, 32), torch.zeros(8, dtype=torch.long), torch.arange(8)
    # the gallery's own network as the query, identity adapters: nothing to learn
    same = CompatTask(copy.deepcopy(gallery), CompatLoss(cfg, 32, 2), gallery).train()
    same.net.eval()  # (the same BatchNorm statistics as the gallery's)
    with torch.no_grad():
        for conv in same.loss.adapters.values():
            conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight))
    _, parts = same(x, y, idx)
    assert set(parts) == {"regress", "feat"} and parts["feat"] < 1e-5
    task = CompatTask(sub, CompatLoss(cfg, 32, 2), gallery)
    total, parts = task.train()(x, y, idx)
    assert parts["feat"] > 0.1
    total.backward()
    assert all(float(c.weight.grad.abs().sum()) > 0 for c in task.loss.adapters.values())
    assert float(sub.stem[0].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in gallery.parameters())
    assert not any(m._forward_hooks for m in [*sub.modules(), *gallery.modules()])
    assert "feat" not in task.eval()(x, y, idx)[1]
    # the adapters are the training's, saved and resumed with it (not part of the model)
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.safetensors", task, opt, {})
    again = CompatTask(SubNet(space, space.smallest()), CompatLoss(cfg, 32, 2), gallery)
    load_checkpoint(tmp_path / "c.safetensors", again, torch.optim.SGD(again.parameters(), lr=0.1))
    assert torch.equal(again.loss.adapters["8"].weight, task.loss.adapters["8"].weight)
    assert not any("adapters" in k for k in sub.state_dict())
    with pytest.raises(HwnasError, match="supernet"):
        CompatTask(Supernet(space), CompatLoss(cfg, 32, 2), gallery, sampler=ArchSampler(space, 0))
    with pytest.raises(HwnasError, match=r"reduction \[64\].*give reductions of \[4, 8, 16, 32\]"):
        CompatTask(sub, CompatLoss(LossConfig(bct=0.0, feat=1.0, feat_at=(8, 64)), 32, 2), gallery)
    for bad in ((8, 8), (12,), ()):
        with pytest.raises(HwnasError, match="feat_at"):
            LossConfig(feat=1.0, feat_at=bad)
    assert LossConfig(feat=1.0, feat_at=(16, 8)).to_dict() == cfg_816  # (the same loss in any order)
    # maps not laid out (batch, channels, h, w), e.g. a ViT's tokens: named, not a shape error
    with pytest.raises(HwnasError, match=r"reduction 8 should be \(batch, 128, height, width\), got shape \(8, 4, 128\)"):
        task.loss.feature_loss({8: torch.randn(8, 32, 4, 4), 16: torch.randn(8, 64, 2, 2)},
                               {8: torch.randn(8, 4, 128), 16: torch.randn(8, 256, 2, 2)})
    check_feature_maps(sub, gallery, (8, 16), (1, 1, 32, 32))  # (a pair that has them passes)
    with pytest.raises(HwnasError, match="supernet.loss.feat"):
        load_config(write_cfg(tmp_path / "f.json", tiny_config(tmp_path / "run", supernet={
            "train": {"epochs": 1}, "loss": {"feat": 1.0}}))).validate()


def test_train_query_with_the_feat_part_keeps_its_adapters_out_of_the_model(trained_gallery, tmp_path):
    """train-query with query.loss.feat: the training logs the part, the model records the
    loss, carries no adapter and evaluates; a reduction the query lacks is refused before
    --restart deletes the model."""
    from hwnas.nn.models import load_state

    cfg = load_config(_clone_run(trained_gallery, tmp_path, query={
        "train": {"epochs": 1, "lr": 0.1, "batch_size": 64},
        "loss": {"own_cls": 1.0, "bct": 1.0, "regress": 30.0, "contrast": 5.0, "feat": 3.0, "feat_at": [8]}}))
    lines = []
    api.train_query(cfg, arch=cfg.search_space().smallest().to_string(), name="f", inherit=False,
                    log=lines.append)
    assert any("feat 3" in line for line in lines) and any(" feat " in line for line in lines if "epoch 1/1" in line)
    qcfg, states = load_state(tmp_path / "run/query/f")
    assert qcfg["loss"]["feat"] == 3.0 and qcfg["loss"]["feat_at"] == [8]
    assert set(states) == {"net"} and not any("adapter" in k for k in states["net"])
    m = api.evaluate_query(cfg, query_dir=str(tmp_path / "run/query/f"), log=lambda *_: None)["metrics"]
    assert m["M(q,g)"]["recall@1"] > 0.2
    # a reduction the subnet lacks is refused before --restart deletes the trained model
    cfg.query.loss = {**cfg.query.loss, "feat_at": [2, 8]}
    with pytest.raises(HwnasError, match=r"no feature map at reduction \[2\]"):
        api.train_query(cfg, arch=cfg.search_space().smallest().to_string(), name="f", inherit=False,
                        restart=True, log=lambda *_: None)
    assert (tmp_path / "run/query/f/model.safetensors").exists()


def test_unlabeled_images_feed_only_the_parts_without_labels(trained_gallery, tmp_path, monkeypatch):
    """Label -1 (an image of data.unlabeled) is left out of both classifier parts and kept
    in the regression; a supernet or query trained with unlabeled images records them, is
    kept when the same folder is named by another path, and is retrained when they change;
    a loss with no part that can use them is refused."""
    from PIL import Image

    from hwnas.compat.losses import CompatLoss, LossConfig
    from hwnas.data.sources import fashion_mnist
    from hwnas.nn.heads import CosineClassifier

    torch.manual_seed(0)
    q, g = torch.randn(8, 16), torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    y = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1])
    loss = CompatLoss(LossConfig(contrast=0.0), 16, 4, CosineClassifier(16, 4, 30.0, 0.2))
    _, mixed = loss(q, y, g)
    _, lab = loss(q[:4], y[:4], g[:4])
    assert mixed["own_cls"] == pytest.approx(lab["own_cls"]) and mixed["bct"] == pytest.approx(lab["bct"])
    assert mixed["regress"] != pytest.approx(lab["regress"])
    total, none = loss(q.requires_grad_(), torch.full((8,), -1), g)
    assert none["own_cls"] == 0 == none["bct"] and none["regress"] > 0
    total.backward()
    assert loss.own.weight.grad is not None and float(loss.own.weight.grad.abs().sum()) == 0

    col = fashion_mnist()
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i in [i for i, s in enumerate(col.splits) if s == "train"][-96:]:  # Fashion-MNIST's own train split
        Image.fromarray(np.asarray(col.read(i))).save(folder / f"{i}.png")
    quiet = lambda *_: None  # noqa: E731
    cfg = load_config(_clone_run(trained_gallery, tmp_path, data={"unlabeled": str(folder)},
                                 supernet={"train": {"epochs": 1, "batch_size": 64}},
                                 query={"train": {"epochs": 1, "lr": 0.1, "batch_size": 64}}))
    arch = cfg.search_space().smallest().to_string()
    q = api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet)
    assert q["unlabeled"]["images"] == 96 and q["unlabeled"]["source"] == str(folder)
    sup = api.train_supernet(cfg, log=quiet)
    monkeypatch.chdir(tmp_path)
    cfg.data.unlabeled = "unlabeled"  # the same folder, named relative to the working directory
    assert api.train_supernet(cfg, log=quiet)["fingerprint"] == sup["fingerprint"]
    assert api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet)["fingerprint"] == q["fingerprint"]
    cfg.data.unlabeled = "strokes:32"
    with pytest.raises(HwnasError, match=r"supernet trained with other data\.unlabeled than this run asks.*restore the config"):
        api.train_supernet(cfg, log=quiet)
    cfg.data.unlabeled = str(folder)
    cfg.query.train["threads"] = 1  # another thread count is not another model: kept as trained
    assert api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet)["fingerprint"] == q["fingerprint"]
    cfg.seed = 1  # another seed is another model
    with pytest.raises(HwnasError, match="seed"):
        api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet)
    cfg.seed = q["seed"]
    cfg.data.unlabeled = None
    with pytest.raises(HwnasError, match="data.unlabeled"):
        api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet)
    cfg.data.unlabeled = [str(folder), "strokes:32"]  # several sources: one more changes the model
    with pytest.raises(HwnasError, match="data.unlabeled"):
        api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet)
    both = api.train_query(cfg, arch=arch, name="u", inherit=False, log=quiet, restart=True)
    assert both["unlabeled"]["images"] == 128 and both["unlabeled"]["source"] == f"{folder}, strokes:32"
    cfg.data.unlabeled = str(folder)
    with pytest.raises(HwnasError, match="no part that can use images"):
        api.train_query(cfg, arch=arch, name="v", inherit=False, log=quiet,
                        loss_override={"own_cls": 1.0, "bct": 1.0})


def test_gallery_adaptation_pulls_the_query_onto_the_index_and_nothing_else(trained_gallery, tmp_path):
    """hwnas adapt: the query model, fine-tuned on the gallery part's images without labels,
    lands closer to the gallery model's embeddings of them; the gallery model is untouched,
    the arch is the same, a finished adaptation is kept, and bad requests are clear errors."""
    from hwnas.compat.api import embed, load_part, run_gallery
    from hwnas.nn.models import load_query
    from hwnas.rundir import RunDir

    quiet = lambda *_: None  # noqa: E731
    cfg = load_config(_clone_run(trained_gallery, tmp_path, adapt={"epochs": 3},
                                 query={"train": {"epochs": 2, "lr": 0.1, "batch_size": 64}}))
    run = tmp_path / "run"
    arch = cfg.search_space().smallest().to_string()
    api.train_query(cfg, arch=arch, name="searched", inherit=False, log=quiet)
    g_sha = _sha(run / "gallery" / "model.safetensors")
    rd = RunDir(cfg)
    pre = cfg.preprocess()
    gal = load_part(rd, "gallery", pre, log=quiet)
    g_emb = torch.nn.functional.normalize(torch.from_numpy(
        embed(run_gallery(rd).net, gal.images, pre.normalize)), dim=1)

    def align(qdir) -> float:
        q = torch.from_numpy(embed(load_query(qdir)[0], gal.images, pre.normalize))
        return float((torch.nn.functional.normalize(q, dim=1) * g_emb).sum(1).mean())

    a = api.adapt_query(cfg, log=quiet)
    assert a["name"] == "searched-adapted" and a["arch"] == api.read_json(run / "query/searched/config.json")["arch"]
    assert a["adapted"]["source"] == "split:gallery" and a["adapted"]["images"] == len(gal.images)
    assert a["adapt_loss"]["own_cls"] == 0 and a["adapt_loss"]["regress"] > 0  # own classifier: not saved
    assert align(run / "query/searched-adapted") > align(run / "query/searched") + 0.01
    assert _sha(run / "gallery" / "model.safetensors") == g_sha  # the index's model never changes
    assert api.adapt_query(cfg, log=quiet)["fingerprint"] == a["fingerprint"]  # finished: kept
    cfg.adapt.lr = 0.02
    with pytest.raises(HwnasError, match="--restart"):
        api.adapt_query(cfg, log=quiet)
    cfg.adapt.max_images = 50  # a large gallery is sampled down
    assert api.adapt_query(cfg, log=quiet, restart=True)["adapted"]["images"] == 50
    # killed before it saved, then the config changed: hwnas run (retrain_changed) starts over
    (run / "query/searched-adapted/model.safetensors").unlink()
    cfg.adapt.lr = 0.03
    with pytest.raises(HwnasError, match=r"made with other train\.lr, adapt than this run's; pass --restart"):
        api.adapt_query(cfg, resume=True, log=quiet)
    assert api.adapt_query(cfg, resume=True, retrain_changed=True, log=quiet)["adapted"]["lr"] == 0.03
    with pytest.raises(HwnasError, match="directory of its own"):
        api.adapt_query(cfg, name="searched", restart=True, log=quiet)  # never over its own source
    assert (run / "query/searched/model.safetensors").exists()
    with pytest.raises(HwnasError, match="already an adapted model"):
        api.adapt_query(cfg, query=str(run / "query/searched-adapted"), name="twice", log=quiet)
    # adapt.images unset follows deploy.catalog (the images the deployed index will hold),
    # sampled down to adapt.max_images before any is decoded; the adapt step's key follows it
    from PIL import Image

    from hwnas.pipeline import step_keys

    (tmp_path / "catalog").mkdir()
    for i in range(12):
        Image.fromarray(gal.images[i, 0].numpy()).save(tmp_path / "catalog" / f"c{i}.png")
    key = step_keys(cfg)["adapt"]
    cfg.deploy.catalog = str(tmp_path / "catalog")
    assert step_keys(cfg)["adapt"] != key
    cfg.adapt.max_images = 5
    c = api.adapt_query(cfg, name="to-catalog", log=quiet)
    assert c["adapted"]["source"] == str(tmp_path / "catalog") and c["adapted"]["images"] == 5
    cfg.adapt.images = str(tmp_path / "catalog")  # named: the catalog no longer counts
    key = step_keys(cfg)["adapt"]
    cfg.deploy.catalog = None
    assert step_keys(cfg)["adapt"] == key
    cfg.adapt.epochs = 0
    with pytest.raises(HwnasError, match="adaptation is off"):
        api.adapt_query(cfg, log=quiet)
    cfg.adapt.epochs = -1
    with pytest.raises(HwnasError, match="adapt.epochs"):
        api.adapt_query(cfg, log=quiet)
    cfg.adapt.epochs = 1
    api.train_query(cfg, arch=arch, name="cls-only", inherit=False, log=quiet,
                    loss_override={"own_cls": 1.0, "bct": 1.0})
    with pytest.raises(HwnasError, match="nothing to adapt with"):
        api.adapt_query(cfg, query=str(run / "query/cls-only"), log=quiet)
    with pytest.raises(HwnasError, match="not an adapted one"):  # nor over another trained model
        api.adapt_query(cfg, name="cls-only", restart=True, log=quiet)
    with pytest.raises(HwnasError, match="no trained query model"):
        api.adapt_query(cfg, query=str(run / "query/none"), log=quiet)


def test_models_built_on_another_gallery_or_config_are_not_silently_kept(trained_gallery, tmp_path):
    """A finished gallery, supernet or query model is kept only if it is what the config asks
    for — settings and the gallery it was trained against — else an error naming what differs
    and --restart; a supernet of another gallery cannot be inherited from or evaluated; and an
    evaluation against another gallery does not overwrite the model's own."""
    quiet = lambda *_: None  # noqa: E731
    cfg_path = _clone_run(trained_gallery, tmp_path, supernet={"train": {"epochs": 1, "batch_size": 64}},
                          query={"train": {"epochs": 1, "batch_size": 64}})
    cfg = load_config(cfg_path)
    fp = json.loads((tmp_path / "run" / "gallery" / "config.json").read_text())["fingerprint"]
    assert api.train_gallery(cfg, log=quiet)["fingerprint"] == fp  # the same model: kept
    cfg.gallery.margin = 0.35
    with pytest.raises(HwnasError, match=r"other classifier than this run asks: --restart to train it again \(hwnas run: --from train-gallery\), or restore"):
        api.train_gallery(cfg, log=quiet)
    cfg = load_config(cfg_path)
    cfg.gallery.train = {**cfg.gallery.train, "threads": 1}  # a runtime setting: still the same model
    assert api.train_gallery(cfg, log=quiet)["fingerprint"] == fp
    small = cfg.search_space().smallest().to_string()
    api.train_supernet(cfg, log=quiet)
    q = api.train_query(cfg, arch=small, name="q", inherit=True, log=quiet)
    ev_path = tmp_path / "run" / "query" / "q" / "evaluation-test.json"
    api.evaluate_query(cfg, query_dir=str(ev_path.parent), log=quiet)
    ev_before = ev_path.read_bytes()
    cfg.supernet.loss = {**cfg.supernet.loss, "bct": 0.0}
    with pytest.raises(HwnasError, match="supernet trained with other loss"):
        api.train_supernet(cfg, log=quiet)

    # the gallery retrained (one epoch): what was built on the old one is refused
    cfg2 = load_config(cfg_path)
    cfg2.gallery.train = {**cfg2.gallery.train, "epochs": 1}
    assert api.train_gallery(cfg2, restart=True, log=quiet)["fingerprint"] != fp
    with pytest.raises(HwnasError, match=r"other gallery model \(retrained since\)"):
        api.train_supernet(cfg2, log=quiet)
    with pytest.raises(HwnasError, match=r"other .*gallery model \(retrained since\)"):
        api.train_query(cfg2, arch=small, name="q", inherit=False, log=quiet)
    # (refused before --restart deletes the model)
    with pytest.raises(HwnasError, match="supernet was trained against gallery model"):
        api.train_query(cfg2, arch=small, name="q", inherit=True, restart=True, log=quiet)
    assert (ev_path.parent / "model.safetensors").exists()
    with pytest.raises(HwnasError, match="supernet was trained against gallery model"):
        api.train_query(cfg2, arch=small, name="q2", inherit=True, log=quiet)
    with pytest.raises(HwnasError, match="supernet was trained against gallery model"):
        api.evaluate_query(cfg2, arch=small, log=quiet)
    api.evaluate_query(cfg2, query_dir=str(tmp_path / "run" / "query" / "q"), log=quiet)
    assert ev_path.read_bytes() == ev_before and q["gallery_fingerprint"] == fp


class _Lin(torch.nn.Module):
    """A task for fit with one linear layer: what the checkpoint and lock tests train."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y, idx):
        return ((self.lin(x.flatten(1)) - y.float().unsqueeze(1)) ** 2).mean(), {}


def test_a_resume_refusal_names_what_differs_and_ignores_runtime_settings(tmp_path):
    """A checkpoint resumes at another thread count (a runtime setting), and a checkpoint
    of an older hwnas (keyed with the thread count) still resumes; other settings are refused
    by name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hwnas.compat.train import TrainConfig, _legacy_key, fit

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 2, 2, generator=g), torch.randint(0, 3, (64,), generator=g)
    quiet = lambda *_: None  # noqa: E731
    ck = tmp_path / "c.safetensors"
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    fit(_Lin(), images, labels, lambda x: x, cfg, ck, settings={"seed": 0}, stop_after=1, log=quiet)
    with pytest.raises(HwnasError, match=r"other train\.lr, seed than this run's; pass --restart"):
        fit(_Lin(), images, labels, lambda x: x, TrainConfig(epochs=3, batch_size=16, lr=0.1), ck,
            settings={"seed": 1}, resume=True, log=quiet)
    hist = fit(_Lin(), images, labels, lambda x: x, TrainConfig(epochs=3, batch_size=16, lr=0.05, threads=1),
               ck, settings={"seed": 0}, resume=True, stop_after=2, log=quiet)
    assert [h["epoch"] for h in hist] == [1, 2]
    # an older hwnas's checkpoint: its key hashed the thread count, and it kept no key inputs
    with safe_open(str(ck), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["hwnas"]), {k: f.get_tensor(k) for k in f.keys()}
    del meta["key_inputs"]
    meta["key"] = "b783d4cc6ef2"  # what hwnas of stop 25 computed for this training (pinned)
    assert _legacy_key(cfg, {"seed": 0}, 1) == meta["key"]
    save_file(tensors, str(ck), metadata={"hwnas": json.dumps(meta)})
    hist = fit(_Lin(), images, labels, lambda x: x, cfg, ck, settings={"seed": 0}, resume=True, log=quiet)
    assert [h["epoch"] for h in hist] == [1, 2, 3]


def test_a_partial_torchrun_environment_is_an_error_before_anything_is_deleted(trained_gallery, tmp_path):
    cfg_path = _clone_run(trained_gallery, tmp_path)
    model = tmp_path / "run" / "gallery" / "model.safetensors"
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "train-gallery", "--config", str(cfg_path), "--restart"],
                       env={**_env(), "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "RANK, MASTER_ADDR, MASTER_PORT are not set" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and model.exists()


def test_a_restart_that_cannot_train_keeps_the_trained_gallery(trained_gallery, tmp_path):
    """--restart deletes the trained model only once the new training can start: weights of
    another architecture, a file that is no weights, a backbone that cannot take the run's
    images or a device that is not here leave the model as it was."""
    from safetensors.torch import save_file

    from hwnas.nn.models import EmbeddingNet

    cfg_path = _clone_run(trained_gallery, tmp_path)
    model = tmp_path / "run" / "gallery" / "model.safetensors"
    before = _sha(model)
    save_file({k: v.contiguous() for k, v in EmbeddingNet("resnet18", 16, 1).backbone.state_dict().items()},
              str(tmp_path / "r18.safetensors"))
    (tmp_path / "notes.txt").write_text("not weights")
    for flags, msg in ((["--backbone-checkpoint", str(tmp_path / "r18.safetensors")], "is not the ResNet backbone"),
                       (["--backbone-checkpoint", str(tmp_path / "notes.txt")], "neither a safetensors file nor"),
                       (["--backbone", "vit_tiny_patch16_224"], "cannot embed this run's 1-channel 32 px images"),
                       (["--set", "gallery.train.device=cuda:7"], "train.device")):
        r = subprocess.run([sys.executable, "-m", "hwnas.cli", "train-gallery", "--config", str(cfg_path),
                            "--restart", *flags], env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, (flags, r.stderr)
        assert "Traceback" not in r.stderr and _sha(model) == before, flags
    # without --restart, the model of other settings is named with its values, to keep it
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "train-gallery", "--config", str(cfg_path),
                        "--backbone-checkpoint", str(tmp_path / "r18.safetensors")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "other backbone_checkpoint than this run asks" in r.stderr, r.stderr
    assert "or set the config to the model's (gallery.backbone_checkpoint: null) to keep it" in r.stderr


def test_a_weights_file_replaced_under_its_name_is_another_start(trained_gallery, tmp_path):
    """The gallery records its backbone file's sha256: the same name holding other weights
    is named as a difference (hwnas run does train-gallery again for it); the same content
    reached by another path (a link) is the same start. A file with NaN weights, or an empty
    path, is refused before --restart deletes anything."""
    from safetensors.torch import save_file

    from hwnas.compat.api import checkpoint_replaced
    from hwnas.nn.models import EmbeddingNet
    from hwnas.pipeline import STEPS, Steps, redo_plan, step_keys

    cfg_path = _clone_run(trained_gallery, tmp_path)
    state = {k: v.contiguous() for k, v in EmbeddingNet("resnet10t", 16, 1).backbone.state_dict().items()}
    w = tmp_path / "w.safetensors"
    save_file(state, str(w))
    # the gallery as if trained from w (its record, written as train-gallery writes it)
    gcfg = tmp_path / "run" / "gallery" / "config.json"
    rec = json.loads(gcfg.read_text())
    rec.update(backbone_checkpoint=str(w), backbone_checkpoint_sha256=_sha(w))
    gcfg.write_text(json.dumps(rec))
    d = json.loads(cfg_path.read_text())
    d["gallery"]["backbone_checkpoint"] = str(w)
    cfg_path.write_text(json.dumps(d))
    cfg = load_config(cfg_path)
    assert checkpoint_replaced(cfg) is None
    keys = step_keys(cfg)
    st = Steps(tmp_path / "steps.json")
    st.state["done"] = {n: {"key": keys[n]} for n in STEPS}
    assert "train-gallery" not in redo_plan(cfg, st, keys)[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "hwnas.cli", "train-gallery", "--config", str(cfg_path), *a],  # noqa: E731
                                    env=_env(), capture_output=True, text=True, timeout=120)
    link = tmp_path / "link.safetensors"
    link.symlink_to(w)
    r = run("--backbone-checkpoint", str(link))
    assert r.returncode == 0 and "is already trained" in r.stdout, r.stderr
    model = tmp_path / "run" / "gallery" / "model.safetensors"
    before = _sha(model)
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(w))
    assert "holds other weights than the gallery model was trained from" in checkpoint_replaced(load_config(cfg_path))
    # hwnas run trains the gallery again for it, and what builds on it (the file's contents are
    # not in the step's key: the config is the same)
    redo, fresh, why = redo_plan(cfg, st, keys)
    assert "train-gallery" in fresh and "holds other weights than the gallery model was trained from" in why
    assert "the config changed" not in why
    r = run()
    assert r.returncode == 2 and "the contents of gallery.backbone_checkpoint (the file changed since)" in r.stderr, r.stderr
    save_file({k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}, str(w))
    r = run("--restart")
    assert r.returncode == 2 and "weights hold NaN or infinite values (e.g. " in r.stderr, r.stderr
    assert _sha(model) == before
    r = run("--backbone-checkpoint", "")
    assert r.returncode == 2 and "--backbone-checkpoint is empty" in r.stderr, r.stderr
    # the file gone since: the finished gallery needs it no more
    w.unlink()
    r = run()
    assert r.returncode == 0 and "is already trained" in r.stdout, r.stderr


def test_a_stem_of_other_channels_and_a_timm_tag(tmp_path):
    from safetensors.torch import save_file

    from hwnas.nn.models import EmbeddingNet, check_timm_name, load_backbone_checkpoint

    # a grey stem onto RGB images: each channel a third of the grey weights
    grey = EmbeddingNet("resnet10t", 16, 1).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in grey.items()}, str(tmp_path / "grey.safetensors"))
    rgb = EmbeddingNet("resnet10t", 16, 3)
    info = load_backbone_checkpoint(rgb, tmp_path / "grey.safetensors")
    assert info["adapted"] == "conv1.0.weight: 1 -> 3 input channels"
    stem = rgb.backbone.state_dict()["conv1.0.weight"]
    assert torch.allclose(stem.sum(1, keepdim=True), grey["conv1.0.weight"], atol=1e-6)
    # an RGBA stem onto RGB: timm hands it back unchanged; named, not a load_state_dict traceback
    save_file({k: v.contiguous() for k, v in EmbeddingNet("resnet10t", 16, 4).backbone.state_dict().items()},
              str(tmp_path / "rgba.safetensors"))
    with pytest.raises(HwnasError, match=r"conv1.0.weight: \(24, 4, 3, 3\) in the file, \(24, 3, 3, 3\) here"):
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 3), tmp_path / "rgba.safetensors")
    # a pretrained tag: weights hwnas never downloads, said (not a silent training under that
    # name); a model saved under such a name still builds; a tag timm does not know is refused
    assert "names pretrained weights, which hwnas does not download" in check_timm_name("resnet10t.c3_in1k")
    assert EmbeddingNet("resnet10t.c3_in1k", 16, 3)(torch.zeros(2, 3, 16, 16)).shape == (2, 16)
    assert check_timm_name("resnet10t") is None
    with pytest.raises(HwnasError, match=r"'resnet10t' has no pretrained tag 'in1k_typo' \(timm's: .*'c3_in1k'"):
        check_timm_name("resnet10t.in1k_typo")


def test_a_gallery_at_another_input_size_is_refused():
    from hwnas.data.images import Preprocess

    pre = Preprocess(size=32, channels=1, mean=(0.5,), std=(0.5,))
    g = {"embed_dim": 32, "preprocess": {**pre.to_dict(), "size": 64}}
    with pytest.raises(HwnasError, match="gallery model takes 64 px images but the query space takes 32 px"):
        api.check_compatible(g, 32, pre)
    api.check_compatible({**g, "preprocess": pre.to_dict()}, 32, pre)


def test_a_non_finite_loss_stops_training_with_the_fix(tmp_path):
    from hwnas.compat.train import TrainConfig, fit

    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y, idx):
            return self.lin(x.flatten(1)).sum() * float("nan"), {}

    images, labels = torch.rand(32, 1, 2, 2), torch.zeros(32, dtype=torch.long)
    with pytest.raises(HwnasError, match=r"loss became nan at epoch 1 step 0; lower train.lr \(now 0.05\)"):
        fit(Diverged(), images, labels, lambda x: x, TrainConfig(epochs=1, batch_size=16, lr=0.05),
            tmp_path / "c.safetensors", log=lambda *_: None)
    assert not (tmp_path / "c.safetensors").exists()


def test_weight_average_is_the_model_kept_and_resumes_exactly(tmp_path):
    """train.ema: the training path is the one without it (the checkpoint's raw weights are
    bit-identical), the model kept at the end is the exponential average of the weights after
    each step (recomputed here step by step), a run stopped and resumed keeps the same average,
    and at its default (0) the training key is what it was before the setting existed."""
    from safetensors import safe_open

    from hwnas.compat.train import TrainConfig, fit, training_key

    seen: list[torch.Tensor] = []

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y, idx):
            seen.append(self.lin.weight.detach().clone())  # the weights after the step before
            return ((self.lin(x.flatten(1)) - y.float().unsqueeze(1)) ** 2).mean(), {}

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 2, 2, generator=g), torch.randint(0, 3, (64,), generator=g)
    quiet = lambda *_: None  # noqa: E731
    plain, avg = TrainConfig(epochs=3, batch_size=16, lr=0.05), TrainConfig(epochs=3, batch_size=16, lr=0.05, ema=0.9)
    assert training_key(plain, {"seed": 0}, 1) == "67d78dbdccda"  # pinned: hwnas of stop 27
    assert training_key(avg, {"seed": 0}, 1) != training_key(plain, {"seed": 0}, 1)

    raw = Lin()
    fit(raw, images, labels, lambda x: x, plain, tmp_path / "raw.safetensors", log=quiet)
    seen.clear()
    m = Lin()
    fit(m, images, labels, lambda x: x, avg, tmp_path / "avg.safetensors", log=quiet)
    after_steps = seen[1:] + [None]  # the last step's weights: the checkpoint's raw ones
    with safe_open(str(tmp_path / "avg.safetensors"), framework="pt") as f:
        kept_raw = f.get_tensor("model.lin.weight")
        assert torch.equal(f.get_tensor("ema.lin.weight"), m.lin.weight.detach())
    assert torch.equal(kept_raw, raw.lin.weight.detach())
    expect = seen[0].clone()
    for t, w in enumerate(after_steps):
        d = min(0.9, (1 + t) / (10 + t))
        expect = d * expect + (1 - d) * (kept_raw if w is None else w)
    assert torch.allclose(m.lin.weight.detach(), expect, atol=1e-6)
    assert not torch.allclose(m.lin.weight.detach(), kept_raw, atol=1e-4)

    resumed = Lin()
    for stop in (1, 2, None):  # killed after each epoch and resumed
        resumed = Lin()
        fit(resumed, images, labels, lambda x: x, avg, tmp_path / "b.safetensors", resume=True,
            stop_after=stop, log=quiet)
    assert torch.equal(resumed.lin.weight, m.lin.weight)
    with pytest.raises(HwnasError, match="train.ema"):
        TrainConfig(ema=1.0)
    # a finished model recorded by an earlier hwnas (no ema in its training) is what the
    # default asks, and not what an average asks
    from dataclasses import asdict

    from hwnas.compat.api import _same_training

    earlier = {k: v for k, v in asdict(plain).items() if k != "ema"}
    assert _same_training(earlier, asdict(plain)) and not _same_training(earlier, asdict(avg))


@pytest.mark.gpu
def test_training_on_a_gpu_is_the_cpu_training_and_moves_between_them(tmp_path):
    """train.device=cuda: the model trained (with the weight average, BatchNorm statistics
    included) is the CPU's to float tolerance (cuDNN may use TF32), it ends on the CPU, and its
    checkpoint is resumed on the CPU: a run moved off the GPU mid-way ends where an unbroken
    CPU run does."""
    from hwnas.compat.train import TrainConfig, fit

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                            torch.nn.Linear(8, 3))

        def forward(self, x, y, idx):
            return torch.nn.functional.cross_entropy(self.body(x), y), {}

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(128, 1, 8, 8, generator=g), torch.randint(0, 3, (128,), generator=g)
    quiet = lambda *_: None  # noqa: E731

    def run(path, devices):
        for i, dev in enumerate(devices):  # each a fresh process's call, the last to the end
            m = Net()
            cfg = TrainConfig(epochs=len(devices), batch_size=16, lr=0.05, ema=0.9, device=dev)
            fit(m, images, labels, lambda x: x, cfg, path, resume=True,
                stop_after=None if i == len(devices) - 1 else i + 1, log=quiet)
        assert all(t.device.type == "cpu" for t in m.state_dict().values())
        return m.state_dict()

    cpu = run(tmp_path / "cpu.safetensors", ["cpu", "cpu", "cpu"])
    gpu = run(tmp_path / "gpu.safetensors", ["cuda", "cuda", "cuda"])
    moved = run(tmp_path / "moved.safetensors", ["cuda", "cuda", "cpu"])
    for k, v in cpu.items():
        if v.is_floating_point():
            assert torch.allclose(gpu[k], v, atol=2e-3), k
            assert torch.allclose(moved[k], v, atol=2e-3), k
        else:
            assert torch.equal(gpu[k], v) and torch.equal(moved[k], v), k
    assert not torch.allclose(cpu["body.5.weight"], Net().state_dict()["body.5.weight"], atol=1e-3)


def test_unlabeled_sources_are_compared_as_files_not_spellings(tmp_path, monkeypatch):
    """A finished model trained with data.unlabeled given one way (relative to the working
    directory) is the one asked for when the same file is given another way (absolute)."""
    from hwnas.compat.api import _same_sources

    (tmp_path / "a.zip").write_bytes(b"")
    (tmp_path / "b.zip").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _same_sources("a.zip", str(tmp_path / "a.zip"))
    assert _same_sources("a.zip, strokes:2400", f"{tmp_path / 'sub' / '..' / 'a.zip'}, strokes:2400")
    assert not _same_sources("a.zip", "b.zip")
    assert not _same_sources("a.zip, strokes:2400", "a.zip, strokes:800")
    assert not _same_sources("a.zip", None) and _same_sources(None, None)
    # what is not on disk is compared as written, wherever it is read from
    assert _same_sources("split:gallery", "split:gallery") and not _same_sources("gone.zip", str(tmp_path / "gone.zip"))


class _NotWeights:  # a pickled object: what a weights-only load must refuse
    pass


def test_a_users_backbone_checkpoint_loads_and_a_bad_one_is_named(tmp_path):
    """--backbone-checkpoint: the backbone from a user's timm weights (safetensors, or a torch
    file read weights-only; a DDP 'module.' prefix and a {'state_dict': ...} wrapper are taken);
    a pickled object or another architecture's weights are errors that say why, and none
    suggests unpickling."""
    from safetensors.torch import save_file

    from hwnas.nn.models import EmbeddingNet, load_backbone_checkpoint

    torch.manual_seed(0)
    src = EmbeddingNet("resnet10t", 16, 1)
    own = src.backbone.state_dict()
    save_file({k: v.contiguous() for k, v in own.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in own.items()}, "epoch": 3}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        torch.manual_seed(1)
        dst = EmbeddingNet("resnet10t", 16, 1)
        info = load_backbone_checkpoint(dst, tmp_path / f)
        assert info["loaded"] == len(own) and not info["missing"]
        assert all(torch.equal(v, dst.backbone.state_dict()[k]) for k, v in own.items())
    torch.save({"model": _NotWeights()}, tmp_path / "pickled.pt")
    with pytest.raises(HwnasError) as e:
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "pickled.pt")
    assert "weights-only torch checkpoint (Unsupported global: GLOBAL" in str(e.value)
    assert "does not unpickle" in str(e.value)
    for advice in ("weights_only=False", "safe_globals", "\x1b["):  # none of PyTorch's ways to unpickle
        assert advice not in str(e.value)
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HwnasError, match="holds no weights of this backbone"):
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "other.safetensors")
    torch.save({"model": {k: v for k, v in own.items()}}, tmp_path / "wrapped.pt")  # {"model": ...}
    assert load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "wrapped.pt")["loaded"] == len(own)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(HwnasError, match="holds a Tensor, not a state dict"):
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "tensor.pt")
    torch.save({"epoch": 3, **own}, tmp_path / "mixed.pt")
    with pytest.raises(HwnasError, match="not tensors \\('epoch'\\)"):
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "mixed.pt")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    with pytest.raises(HwnasError, match="cannot read .*cut.safetensors as safetensors"):
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "cut.safetensors")
    # safetensors by content whatever the name; an hwnas model file's "net.backbone." prefix
    (tmp_path / "w.ST").write_bytes((tmp_path / "w.safetensors").read_bytes())
    save_file({f"net.backbone.{k}": v.contiguous() for k, v in own.items()} | {"net.embed.weight": torch.zeros(16, 2)},
              str(tmp_path / "model.safetensors"))
    for f in ("w.ST", "model.safetensors"):
        dst = EmbeddingNet("resnet10t", 16, 1)
        assert load_backbone_checkpoint(dst, tmp_path / f)["loaded"] == len(own), f
        assert all(torch.equal(v, dst.backbone.state_dict()[k]) for k, v in own.items())
    # part of a backbone is not taken for the whole, nor a bigger model of its family: errors
    # that say which; a stem of another channel count is adapted as timm adapts pretrained ones
    for other, mine, why in (("resnet18", "resnet10t", r"\d+ of its \d+ weights differ in shape .* are not in the file"),
                             ("resnet34", "resnet18", r"the file holds \d+ weights it does not have \(e.g. layer1.2")):
        save_file({k: v.contiguous() for k, v in EmbeddingNet(other, 16, 1).backbone.state_dict().items()},
                  str(tmp_path / f"{other}.safetensors"))
        with pytest.raises(HwnasError, match=r"is not the ResNet backbone of gallery.backbone \(--backbone\): " + why):
            load_backbone_checkpoint(EmbeddingNet(mine, 16, 1), tmp_path / f"{other}.safetensors")
    rgb = EmbeddingNet("resnet10t", 16, 3).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in rgb.items()} | {"fc.weight": torch.zeros(5, 512)},
              str(tmp_path / "rgb.safetensors"))
    gray = EmbeddingNet("resnet10t", 16, 1)
    info = load_backbone_checkpoint(gray, tmp_path / "rgb.safetensors")
    assert info["adapted"] == "conv1.0.weight: 3 -> 1 input channels" and info["ignored"] == ["fc.weight"]
    got = gray.backbone.state_dict()
    assert torch.allclose(got["conv1.0.weight"], rgb["conv1.0.weight"].sum(1, keepdim=True))
    assert all(torch.equal(v, got[k]) for k, v in rgb.items() if k != "conv1.0.weight")
    # a stem timm cannot adapt (5 channels to 1) is a weight of another shape, named
    save_file({k: v.contiguous() for k, v in EmbeddingNet("resnet10t", 16, 5).backbone.state_dict().items()},
              str(tmp_path / "five.safetensors"))
    with pytest.raises(HwnasError, match=r"1 of its \d+ weights differ in shape \(e.g. conv1.0.weight: \(24, 5, 3, 3\)"):
        load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / "five.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("my weights are elsewhere")
    from hwnas.nn.models import load_state

    with pytest.raises(HwnasError, match="w.safetensors is not a saved hwnas model .*train-gallery --backbone-checkpoint"):
        load_state(tmp_path / "w.safetensors")  # (deploy --gallery given a user's weights file)
    for f, why in (("empty.pt", "empty"), ("notes.txt", "it starts with b'my weigh'")):
        with pytest.raises(HwnasError, match=f"neither a safetensors file nor a torch checkpoint \\({why}"):
            load_backbone_checkpoint(EmbeddingNet("resnet10t", 16, 1), tmp_path / f)


def test_a_frozen_backbone_keeps_its_weights_and_batchnorm_statistics():
    """gallery.freeze_backbone: a training step moves neither the backbone's weights nor its
    BatchNorm running statistics (train mode would), while the head trains."""
    from hwnas.compat.tasks import GalleryTask
    from hwnas.nn.heads import CosineClassifier
    from hwnas.nn.models import EmbeddingNet

    torch.manual_seed(0)
    net = EmbeddingNet("resnet10t", 16, 1, bn=True)
    task = GalleryTask(net, CosineClassifier(16, 4, 30.0, 0.2, "cosface"), frozen_backbone=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss, _ = task(torch.randn(8, 1, 32, 32), torch.arange(8) % 4, None)
    loss.backward()
    torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1).step()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("backbone."))
    assert not net.backbone.training and net.training


def test_a_folder_another_process_trains_in_is_left_alone(trained_gallery, tmp_path):
    """--restart empties a model's folder and a changed model is deleted before its training
    loop starts: with another process training in that folder, the call is refused before
    any of it, and the other's files stay; under torchrun every rank is refused, none left
    waiting at a barrier."""
    cfg_path = _clone_run(trained_gallery, tmp_path, query={"train": {"epochs": 1, "batch_size": 32}})
    cfg = load_config(cfg_path)
    arch = cfg.search_space().smallest().to_string()
    folder = tmp_path / "run" / "query" / "small"
    api.train_query(cfg, arch=arch, name="small", inherit=False, log=lambda *_: None)  # (of other settings below)
    files = {f.name: f.read_bytes() for f in folder.iterdir()}
    (folder / "checkpoint.safetensors").write_bytes(b"the other's epochs")
    files["checkpoint.safetensors"] = b"the other's epochs"
    gallery = (tmp_path / "run" / "gallery" / "config.json").read_text()
    holders = [hold_lock(folder / "checkpoint.safetensors"),
               hold_lock(tmp_path / "run" / "gallery" / "checkpoint.safetensors")]
    try:
        cfg.query.train = {**cfg.query.train, "lr": 0.01}  # a changed model: retrain_changed deletes it
        for kw in ({"restart": True}, {"resume": True, "retrain_changed": True}):
            with pytest.raises(HwnasError, match=rf"process {holders[0].pid} on .* is training {re.escape(str(folder))} now"):
                api.train_query(cfg, arch=arch, name="small", inherit=False, log=lambda *_: None, **kw)
        with pytest.raises(HwnasError, match="is training"):
            api.train_gallery(cfg, restart=True, log=lambda *_: None)
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == files
        assert (tmp_path / "run" / "gallery" / "config.json").read_text() == gallery
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "hwnas.cli", "train-query", "--arch", arch, "--no-inherit", "--name", "small",
                            "--restart", "--config", str(cfg_path)],
                           env=_env(), capture_output=True, text=True, timeout=240)
        assert r.returncode != 0 and r.stderr.count("is training") >= 2, r.stdout[-2000:] + r.stderr[-3000:]
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == files
    finally:
        for h in holders:
            h.communicate("\n", timeout=60)
    # once the other is done, the changed model is trained again
    q = api.train_query(cfg, arch=arch, name="small", inherit=False, resume=True, retrain_changed=True,
                        log=lambda *_: None)
    assert q["train"]["lr"] == 0.01 and not list((tmp_path / "run" / "query").glob(".*.lock"))


def test_the_training_lock_is_reentrant_within_a_process(tmp_path):
    """A training function holds its folder's lock and its loop takes it again: the inner
    release keeps it held (the file stays, another process is refused), the outer removes it."""
    from hwnas.compat.train import training_lock

    ck = tmp_path / "m" / "checkpoint.safetensors"
    lock = tmp_path / ".m.checkpoint.safetensors.lock"
    other = [sys.executable, "-c", "from pathlib import Path; from hwnas.compat.train import training_lock\n"
             f"with training_lock(Path({str(ck)!r}), 'other'): pass"]
    with training_lock(ck, "outer"):
        with training_lock(ck, "inner"):
            assert lock.exists()
        assert lock.exists()
        r = subprocess.run(other, env=_env(), capture_output=True, text=True)
        assert r.returncode != 0 and "is training" in r.stderr
    assert not lock.exists()
    assert subprocess.run(other, env=_env()).returncode == 0  # free again


def test_a_training_lock_that_cannot_be_taken_is_said_once(tmp_path):
    """Where no lock can be taken (here its folder is a file), the training goes on with a
    warning, said once though the training function and its loop both take the lock."""
    from hwnas.compat.train import training_lock

    (tmp_path / "f").write_text("")
    ck = tmp_path / "f" / "m" / "checkpoint.safetensors"
    logs = []
    with training_lock(ck, "outer", logs.append):
        with training_lock(ck, "inner", logs.append):
            pass
    assert sum("no training lock" in m for m in logs) == 1, logs
    with training_lock(ck, "again", logs.append):  # released: a later training says it again
        pass
    assert sum("no training lock" in m for m in logs) == 2, logs


def test_one_process_at_a_time_trains_a_checkpoint(tmp_path):
    """A second training of the same checkpoint (hwnas train-query by hand beside hwnas run)
    is refused, naming the process that holds it, instead of both writing one checkpoint; once
    that one is done the training goes ahead. The lock lies beside the model's folder, so a
    --restart that empties the folder leaves it held."""
    from hwnas.compat.train import TrainConfig, fit

    images, labels = torch.rand(32, 1, 2, 2), torch.randint(0, 3, (32,))
    ck = tmp_path / "m" / "checkpoint.safetensors"
    holder = hold_lock(ck)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    with pytest.raises(HwnasError, match=rf"process {holder.pid} on .* is training {re.escape(str(ck.parent))} now: wait"):
        fit(_Lin(), images, labels, lambda x: x, cfg, ck, log=lambda *_: None)
    assert not ck.exists()  # nothing written
    ck.parent.mkdir(exist_ok=True)
    shutil.rmtree(ck.parent)  # what --restart does to the model's folder: the lock is not in it
    with pytest.raises(HwnasError, match="is training"):
        fit(_Lin(), images, labels, lambda x: x, cfg, ck, log=lambda *_: None)
    holder.communicate("\n", timeout=60)
    hist = fit(_Lin(), images, labels, lambda x: x, cfg, ck, log=lambda *_: None)
    assert len(hist) == 1 and ck.exists()
    assert not list(tmp_path.glob(".*.lock"))  # a finished training takes its lock file away
    # and in one process, one training after another (a finalist stopped, then finished)
    fit(_Lin(), images, labels, lambda x: x, TrainConfig(epochs=2, batch_size=16, lr=0.05), tmp_path / "f.safetensors",
        stop_after=1, log=lambda *_: None)
    fit(_Lin(), images, labels, lambda x: x, TrainConfig(epochs=2, batch_size=16, lr=0.05), tmp_path / "f.safetensors",
        resume=True, log=lambda *_: None)
