"""Gallery adaptation benchmark (issues 3 and 7): how much `hwnas adapt` closes the gap to the
paragon, against a control that spends the same fine-tuning on the training images alone.

On the run directory of a finished `hwnas run configs/omniglot.yaml`, for each query model
named (default: the searched model and the smallest subnet) and each seed:

* adapted: `hwnas adapt` as the pipeline runs it — the config's `adapt` section, the split's
  gallery part (2,340 drawings of the 156 test characters) without labels;
* control: the same fine-tune (epochs, lr, loss, training and unlabeled images) with no
  gallery images, so what is left of the gain is what the gallery's images bring.

Each is evaluated on the test split (780 queries never seen by either). Finished models are
kept (`query/bench-adapt-*`), so the script resumes. Writes results/adapt_omniglot.json, a
PNG and the BENCHMARKS.md section `adapt`.

    python benchmarks/bench_adapt.py
    python benchmarks/bench_adapt.py --models searched --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, run_config, save_results, se_points, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "omniglot.yaml"))
    ap.add_argument("--models", nargs="+", default=["searched", "smallest"],
                    help="query models of the run (names under RUN_DIR/query/)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=None, help="default: the config's adapt.epochs (15 if 0)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import json

    import numpy as np
    import torch

    from hwnas.compat import api

    torch.set_num_threads(args.threads)
    cfg = run_config(args.config)
    run = Path(cfg.run_dir)
    cfg.adapt.epochs = args.epochs or cfg.adapt.epochs or 15
    pre = cfg.preprocess()
    none = ("none (control: the training images alone)",
            np.zeros((0, pre.channels, pre.size, pre.size), np.uint8))
    from hwnas.pipeline import ADAPTED

    run_seed = cfg.seed
    rows = []
    for model in args.models:
        qdir = run / "query" / model
        if not (qdir / "config.json").exists():
            raise SystemExit(f"{qdir} is not trained: run `hwnas run {args.config}` first")
        base = json.loads((qdir / "config.json").read_text())
        ev = api.evaluate_query(cfg, query_dir=str(qdir), log=lambda *_: None)
        row = {"model": model, "mflops": base["flops"] / 1e6, "arch": base.get("arch") or base.get("timm"),
               "paragon": ev["metrics"]["M(g,g)"], "base": ev["metrics"], "runs": []}
        for seed in args.seeds:
            cfg.seed = seed
            for mode in ("adapted", "control"):
                name = f"bench-adapt-{model}-{mode}-s{seed}"
                if (model, mode, seed) == ("searched", "adapted", run_seed) and not args.epochs:
                    name = ADAPTED  # the pipeline's own adapted model: the same settings, kept
                t = time.time()
                m = api.adapt_query(cfg, query=str(qdir), name=name, resume=True,
                                    images=none if mode == "control" else None)
                res = api.evaluate_query(cfg, query_dir=str(run / "query" / name), log=lambda *_: None)
                row["runs"].append({"seed": seed, "mode": mode, "images": m["adapted"]["images"],
                                    "train_seconds": m.get("train_seconds"), "wall_s": time.time() - t,
                                    "metrics": res["metrics"]})
                print(f"{model} seed {seed} {mode}: M(q,g) R@1 {100 * res['metrics']['M(q,g)']['recall@1']:.2f}",
                      flush=True)
        rows.append(row)
    res = {"machine": machine(), "config": Path(args.config).name, "run_dir": str(run),
           "adapt": {"epochs": cfg.adapt.epochs, "lr": cfg.adapt.lr}, "seeds": args.seeds, "rows": rows}
    png = ROOT / "benchmarks" / "results" / "adapt_omniglot.png"
    _plot(res, png)
    save_results("adapt_omniglot", res)
    update_benchmarks_md("adapt", markdown(res, png.name))


def _r1(m: dict, key: str = "M(q,g)") -> float:
    return 100 * m[key]["recall@1"]


def _mean(row: dict, mode: str, key: str = "M(q,g)", metric: str = "recall@1") -> float:
    return statistics.mean(100 * r["metrics"][key][metric] for r in row["runs"] if r["mode"] == mode)


def markdown(res: dict, png: str) -> str:
    a = res["adapt"]
    nq = res["rows"][0]["runs"][0]["metrics"]["M(q,g)"]["n_queries"]
    p = statistics.mean(row["base"]["M(q,g)"]["recall@1"] for row in res["rows"])
    lines = ["## Gallery adaptation (issues 3, 7)", "",
             f"Machine: {machine_line(res['machine'])}. Script: `benchmarks/bench_adapt.py` on the "
             f"`{res['config']}` run. `adapted`: `hwnas adapt` ({a['epochs']} epochs, lr {a['lr']}) on the "
             "test split's gallery images without labels; `control`: the same fine-tune with no gallery "
             f"images. Test split: characters never in training, {nq} queries never seen by any model "
             f"(one standard error of recall@1 about {se_points(p, nq):.1f} points, at the models' mean "
             "before adaptation). Adapted models have seen the gallery's images, so their figures are "
             "transductive.", "",
             "| query model | MFLOPs | M(g,g) R@1 | before M(q,g) R@1 | control M(q,g) R@1 (seeds) | "
             "adapted M(q,g) R@1 (seeds) | adapted mean gap (points) | before / control / adapted "
             "M(q,g) mAP | adapted M(q,q) R@1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        per = {mode: " / ".join(f"{_r1(r['metrics']):.2f}" for r in row["runs"] if r["mode"] == mode)
               for mode in ("control", "adapted")}
        g = 100 * row["paragon"]["recall@1"]
        lines.append(
            f"| {row['model']} | {row['mflops']:.2f} | {g:.2f} | {_r1(row['base']):.2f} | {per['control']} | "
            f"{per['adapted']} | {g - _mean(row, 'adapted'):.2f} | {100 * row['base']['M(q,g)']['mAP']:.2f} / "
            f"{_mean(row, 'control', metric='mAP'):.2f} / {_mean(row, 'adapted', metric='mAP'):.2f} | "
            f"{_mean(row, 'adapted', 'M(q,q)'):.2f} |")
    lines += ["", "Gain over the control (mean over seeds, recall@1 points): "
              + "; ".join(f"{r['model']} {_mean(r, 'adapted') - _mean(r, 'control'):+.2f}" for r in res["rows"])
              + ".", "", f"![gallery adaptation](benchmarks/results/{png})"]
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hwnas.utils import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(res["rows"]):
        ax.scatter([i - 0.2], [_r1(row["base"])], c="0.4", marker="s", label="before" if i == 0 else None)
        for mode, dx, c in (("control", 0.0, "tab:blue"), ("adapted", 0.2, "tab:orange")):
            ys = [_r1(r["metrics"]) for r in row["runs"] if r["mode"] == mode]
            ax.scatter([i + dx] * len(ys), ys, c=c, label=mode if i == 0 else None)
        g = 100 * row["paragon"]["recall@1"]
        ax.hlines(g, i - 0.35, i + 0.35, colors="k", linestyles="--", label="paragon M(g,g)" if i == 0 else None)
    ax.set_xticks(range(len(res["rows"])), [f"{r['model']}\n{r['mflops']:.2f} MFLOPs" for r in res["rows"]])
    ax.set_ylabel("M(q,g) recall@1 (%), test split")
    ax.set_title("Gallery adaptation vs the same fine-tune without gallery images", fontsize=9)
    ax.legend(fontsize=8, loc="lower center")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
