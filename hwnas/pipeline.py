"""``hwnas run CONFIG``: the pipeline, step by step, resumable.

Each step writes its result into the run directory and is recorded as done in
``steps.json``; a run that is killed continues with the first unfinished step.

Steps implemented so far: ``data`` (load, split, record), ``space`` (the spec and its cost
range) and ``supernet-check`` (the weight-sharing supernet on real images: BN
recalibration, subnet extraction parity, analytic FLOPs vs torch's counter, retrieval
metrics of untrained subnets as the chance-level reference). The training, search and
deploy steps arrive with their issues; the run says so at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

from hwnas.config import Config
from hwnas.report import format_table
from hwnas.rundir import RunDir
from hwnas.utils import read_json, write_json

NOT_YET = ["profile", "train-gallery", "train-supernet", "search", "train-query", "deploy"]


class Steps:
    """``steps.json``: which steps are done, with their summaries."""

    def __init__(self, path: Path):
        self.path = path
        self.state = read_json(path) if path.exists() else {"done": {}}

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def mark(self, name: str, summary: dict) -> None:
        self.state["done"][name] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}
        write_json(self.path, self.state)


def run_pipeline(cfg: Config, log=print) -> int:
    rd = RunDir(cfg)
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.save_config()
    steps = Steps(rd.path / "steps.json")
    t0 = time.time()

    col = rd.collection()
    splits = rd.splits(col, log=log)
    if not steps.done("data"):
        steps.mark("data", {"fingerprint": splits.fingerprint, "counts": splits.counts()})
    log(f"[data] {col.name}: " + ", ".join(f"{p} {c['images']}" for p, c in splits.counts().items()))

    space = cfg.search_space()
    if not steps.done("space"):
        write_json(rd.path / "space.json", {**space.to_dict(), "hash": space.hash})
        steps.mark("space", {"hash": space.hash})
    log(f"[space] hash {space.hash}, {space.num_layers} layers, input {space.input_size}px")

    if not steps.done("supernet-check"):
        summary = supernet_check(cfg, splits, rd.path, log=log)
        steps.mark("supernet-check", summary)
    res = read_json(rd.path / "supernet_check.json")
    log(format_table(
        ["arch", "MFLOPs", "torch MFLOPs", "Mparams", "extract max|diff|", "M(q,q) R@1 (untrained)"],
        [[r["name"], f"{r['flops'] / 1e6:.2f}", f"{r['torch_flops'] / 1e6:.2f}",
          f"{r['params'] / 1e6:.3f}", f"{r['extract_max_abs_diff']:.1e}",
          f"{100 * r['metrics']['recall@1']:.1f}%"] for r in res["archs"]],
    ))
    log(f"done in {time.time() - t0:.1f} s. Not implemented yet (later issues): "
        f"{', '.join(NOT_YET)}. Results in {rd.path}/")
    return 0


def supernet_check(cfg: Config, splits, out_dir: Path, log=print, n_archs: int = 3) -> dict:
    """Build the supernet and check it on real images (see module docstring)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hwnas.data.images import materialize
    from hwnas.nn.supernet import Supernet, recalibrate_bn
    from hwnas.retrieval import evaluate
    from hwnas.space import arch_flops, arch_params

    torch.manual_seed(cfg.seed)
    space, pre = cfg.search_space(), cfg.preprocess()
    col = splits.collection
    rng = np.random.default_rng(cfg.seed)
    train_ix = rng.choice(splits.parts["train"], size=min(512, len(splits.parts["train"])), replace=False)
    calib = materialize(col, train_ix, pre, cfg.data.skip_bad_images, "calibration images")
    q = materialize(col, splits.parts["query"], pre, cfg.data.skip_bad_images, "query images")
    g = materialize(col, splits.parts["gallery"], pre, cfg.data.skip_bad_images, "gallery images")
    to_t = lambda a: pre.normalize(torch.from_numpy(a))  # noqa: E731
    calib_batches = [to_t(calib.images[i:i + 64]) for i in range(0, len(calib.images), 64)]

    net = Supernet(space)
    archs = [("smallest", space.smallest()), ("largest", space.largest())]
    archs += [(f"random-{i}", space.sample(cfg.seed + i)) for i in range(n_archs)]
    rows = []
    for name, arch in archs:
        recalibrate_bn(net, calib_batches, arch)
        sub = net.extract(arch).eval()
        with torch.no_grad():
            x = to_t(q.images[:256])
            diff = float((net(x, arch) - sub(x)).abs().max())
            with FlopCounterMode(display=False) as fc:
                sub(x[:1])
            qe = torch.cat([sub(to_t(q.images[i:i + 256])) for i in range(0, len(q.images), 256)])
            ge = torch.cat([sub(to_t(g.images[i:i + 256])) for i in range(0, len(g.images), 256)])
        ids = (q.ids(col), g.ids(col)) if splits.shared_eval else (None, None)
        m = evaluate(qe, q.labels, ge, g.labels, query_ids=ids[0], gallery_ids=ids[1])
        rows.append({"name": name, "arch": arch.to_string(space), "flops": arch_flops(space, arch),
                     "torch_flops": int(fc.get_total_flops()), "params": arch_params(space, arch),
                     "extract_max_abs_diff": diff, "metrics": m})
        log(f"[supernet-check] {name}: extract diff {diff:.1e}, untrained R@1 {m['recall@1']:.3f}")
    res = {"space_hash": space.hash, "archs": rows,
           "skipped_images": calib.skipped + q.skipped + g.skipped}
    write_json(out_dir / "supernet_check.json", res)
    return {"archs": len(rows), "max_extract_diff": max(r["extract_max_abs_diff"] for r in rows)}
