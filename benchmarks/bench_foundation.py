"""Foundation benchmark (issue 2): supernet training-step throughput, subnet extraction
time, and retrieval evaluation time for 10k x 10k embeddings, on this machine's CPU.

    python benchmarks/bench_foundation.py [--config configs/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine, machine_line, save_results, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from hwnas.config import load_config
    from hwnas.data import load_source, make_splits, materialize
    from hwnas.nn.supernet import Supernet
    from hwnas.retrieval import evaluate
    from hwnas.space import arch_flops

    cfg = load_config(args.config)
    space, pre = cfg.search_space(), cfg.preprocess()
    col = load_source(cfg.data.dataset, cfg.data.data_dir)
    splits = make_splits(col, cfg.split_config())
    imgs = materialize(col, splits.parts["train"][: args.batch * 4], pre, desc="images")
    x_all = pre.normalize(torch.from_numpy(imgs.images))
    y_all = torch.from_numpy(imgs.labels)
    torch.manual_seed(0)
    net = Supernet(space)
    cls = torch.nn.Linear(space.embed_dim, col.num_classes)
    opt = torch.optim.SGD(list(net.parameters()) + list(cls.parameters()), lr=0.05, momentum=0.9)

    rows = {}
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        times = []
        for step in range(args.steps + 3):
            i = (step % 4) * args.batch
            x, y = x_all[i : i + args.batch], y_all[i : i + args.batch]
            t = time.perf_counter()
            loss = F.cross_entropy(cls(net(x, arch)) * 16, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= 3:  # warm-up
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        ext = []
        for _ in range(5):
            t = time.perf_counter()
            net.extract(arch)
            ext.append(time.perf_counter() - t)
        rows[name] = {
            "arch": arch.to_string(space),
            "mflops": arch_flops(space, arch) / 1e6,
            "train_images_per_s": args.batch / med,
            "step_ms_median": 1000 * med,
            "extract_ms_median": 1000 * statistics.median(ext),
        }
        print(name, rows[name])

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(100, 128)).astype(np.float32)
    lab_q, lab_g = rng.integers(0, 100, 10000), rng.integers(0, 100, 10000)
    q = centers[lab_q] + 2.5 * rng.normal(size=(10000, 128)).astype(np.float32)
    g = centers[lab_g] + 2.5 * rng.normal(size=(10000, 128)).astype(np.float32)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        m = evaluate(q, lab_q, g, lab_g)
        times.append(time.perf_counter() - t)
    ev = {"seconds_median": statistics.median(times), "recall@1": m["recall@1"], "mAP": m["mAP"]}
    print("evaluate 10k x 10k", ev)

    mach = machine()
    res = {"machine": mach, "config": args.config, "batch": args.batch, "space_hash": space.hash,
           "supernet": rows, "evaluate_10k_x_10k": ev}
    save_results("foundation", res)
    md = [
        "## Foundation (issue 2): supernet training step, extraction, evaluation",
        "",
        f"Machine: {machine_line(mach)}. Script: `benchmarks/bench_foundation.py` "
        f"(config `{args.config}`, space hash `{space.hash}`, batch {args.batch}, "
        f"{space.input_size} px, median of {args.steps} steps after 3 warm-up).",
        "",
        "| subnet | MFLOPs | train images/s | step ms | extract ms |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(f"| {name} | {r['mflops']:.2f} | {r['train_images_per_s']:.0f} | "
                  f"{r['step_ms_median']:.1f} | {r['extract_ms_median']:.1f} |")
    md += ["", f"Evaluation of 10,000 queries against 10,000 gallery items (dim 128, FAISS "
           f"exact kNN for recall@1/5/10, full-ranking mAP): **{ev['seconds_median']:.2f} s** "
           "(median of 3; clustered synthetic embeddings)."]
    update_benchmarks_md("foundation", "\n".join(md))


if __name__ == "__main__":
    main()
