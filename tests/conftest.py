import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# Keep torch/ORT from oversubscribing the 2-core machine in tests.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is present here"))


@pytest.fixture(scope="session")
def omniglot_dir():
    if not (OMNIGLOT / "images_background_small1.zip").exists():
        pytest.skip(f"Omniglot zips not found in {OMNIGLOT} (../shared/data/omniglot)")
    return OMNIGLOT


@pytest.fixture(scope="session")
def fmnist_dir():
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist "
                    "(make test does this when run as root)")
    return FMNIST


@pytest.fixture(scope="session")
def tiny_space():
    from hwnas.space import SearchSpace

    return SearchSpace(input_size=32, in_channels=1, stem_channels=8, stage_layers=(2, 2, 3, 2),
                       stage_widths=(16, 32, 48, 64), head_channels=64, embed_dim=16,
                       channel_scales=(0.5, 1.0, 1.5), channel_divisor=4, name="tiny")


def make_png_folder(root: Path, classes: dict[str, int], size=(20, 24), seed=0) -> Path:
    """Class folders with small random PNGs (RGB, non-square) for loader tests."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i:03d}.png")
    return root


TINY_SPACE = dict(input_size=32, in_channels=1, stem_channels=8, stage_layers=[2, 2, 3, 2],
                  stage_widths=[16, 32, 64, 96], head_channels=128, embed_dim=32,
                  channel_scales=[0.5, 1.0, 1.5], channel_divisor=4, name="tiny")


def tiny_config(run_dir: Path, **over) -> dict:
    cfg = {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "mean": [0.286], "std": [0.353],
                 "split": {"protocol": "closed", "train_per_class": 200, "eval_per_class": 60,
                           "val_fraction": 0.0}},
        "space": TINY_SPACE,
        "gallery": {"backbone": "resnet10t", "train": {"epochs": 4, "lr": 0.1, "batch_size": 64}},
        "supernet": {"train": {"epochs": 2, "batch_size": 64}},
        "query": {"train": {"epochs": 4, "lr": 0.1, "batch_size": 64}},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def write_cfg(path: Path, d: dict) -> Path:
    path.write_text(json.dumps(d))
    return path


def hold_lock(ck: Path):
    """Another process holding ``ck``'s training lock until a line comes on its stdin."""
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from hwnas.compat.train import training_lock
        with training_lock(Path({str(ck)!r}), "other"):
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert holder.stdout.readline().strip() == "held"
    return holder
