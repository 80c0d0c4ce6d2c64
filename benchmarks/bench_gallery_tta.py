"""Gallery-side test-time augmentation (issues 3 and 7): does indexing each gallery image as
the mean gallery embedding of several shifted views narrow the gap between M(q,g) and the
paragon M(g,g)?

The index is built on the GPU server, so K views cost K gallery forwards per indexed image
and nothing on the edge: the query model still embeds one view. The paragon is measured
against the same index (the gallery model's plain query embedding vs the augmented index),
so the comparison stays like for like. Views: reflect-pad by 4 pixels, then crops at the
offsets listed (the training augmentation `crop` draws such offsets at random).

On the run directory of a finished `hwnas run configs/omniglot.yaml`, for each query model
named, on the test split (780 queries, 156 unseen characters): M(g,g) and M(q,g) recall@1
and mAP for each view set, and per query how many were fixed and how many broken against
the plain index (the paired counts behind the change). Inference only (about a minute per
model on 2 cores). Writes results/gallery_tta_omniglot.json, a PNG and the BENCHMARKS.md
section `gallery-tta`.

    python benchmarks/bench_gallery_tta.py
    python benchmarks/bench_gallery_tta.py --models searched smallest
"""

from __future__ import annotations

import argparse
import time

from _common import ROOT, machine, machine_line, run_config, save_results, update_benchmarks_md

VIEWS = {
    "1 (plain)": [(4, 4)],
    "5 (cross, +-2 px)": [(4, 4), (2, 4), (6, 4), (4, 2), (4, 6)],
    "9 (grid, +-2 px)": [(a, b) for a in (2, 4, 6) for b in (2, 4, 6)],
    "25 (grid, +-4 px)": [(a, b) for a in (0, 2, 4, 6, 8) for b in (0, 2, 4, 6, 8)],
}
PAD = 4


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact sign test: P(a split of fixed + broken queries at least this uneven
    | each discordant query equally likely either way)."""
    from math import comb

    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "omniglot.yaml"))
    ap.add_argument("--models", nargs="+",
                    default=["searched", "smallest", "timm-mobilenetv3_small_050", "searched-adapted"],
                    help="query models of the run (names under RUN_DIR/query/)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from hwnas.compat import api
    from hwnas.data.images import Preprocess
    from hwnas.nn.models import load_query
    from hwnas.retrieval import evaluate
    from hwnas.retrieval.metrics import knn, l2_normalize
    from hwnas.rundir import RunDir
    from hwnas.utils import save_figure

    torch.set_num_threads(args.threads)
    rd = RunDir(run_config(args.config))
    gallery = api.run_gallery(rd)
    gpre = Preprocess.from_dict(gallery.config["preprocess"])
    quiet = lambda *a, **k: None  # noqa: E731
    qi, gi = api.load_part(rd, "query", gpre, log=quiet), api.load_part(rd, "gallery", gpre, log=quiet)

    def embed_views(net, images, pre, offsets):
        h, w = images.shape[-2:]
        padded = F.pad(images, (PAD,) * 4, mode="reflect")
        total = sum(l2_normalize(api.embed(net, padded[:, :, y:y + h, x:x + w], pre.normalize, desc="views"))
                    for y, x in offsets)
        return l2_normalize(total)

    def scores(q, g):
        m = evaluate(q, qi.raw_labels, g, gi.raw_labels)
        hits = gi.raw_labels[knn(q, g, 1)[1][:, 0]] == qi.raw_labels  # per-query top-1
        assert abs(hits.mean() - m["recall@1"]) < 1e-9, "per-query hits disagree with recall@1"
        return {"recall@1": m["recall@1"], "mAP": m["mAP"]}, hits

    t0 = time.time()
    index = {name: embed_views(gallery.net, gi.images, gpre, offs) for name, offs in VIEWS.items()}
    g_query = l2_normalize(api.embed(gallery.net, qi.images, gpre.normalize, desc="paragon queries"))
    paragon, paragon_hits = {}, {}
    for name, idx in index.items():
        paragon[name], paragon_hits[name] = scores(g_query, idx)
    rows = []
    for model in args.models:
        net, qcfg = load_query(rd.path / "query" / model)
        qpre = Preprocess.from_dict(qcfg["preprocess"])
        q = l2_normalize(api.embed(net, qi.images, qpre.normalize, desc=f"{model} queries"))
        plain_m, plain_hits = scores(q, index["1 (plain)"])
        for name, idx in index.items():
            m, hits = scores(q, idx)
            rows.append({
                "model": model, "views": name, "n_views": len(VIEWS[name]),
                "mflops": (qcfg.get("flops") or 0) / 1e6,
                "M(g,g)": paragon[name], "M(q,g)": m,
                "gap_points": 100 * (paragon[name]["recall@1"] - m["recall@1"]),
                "fixed": int((hits & ~plain_hits).sum()), "broken": int((~hits & plain_hits).sum()),
            })
            rows[-1]["sign_test_p"] = sign_test(rows[-1]["fixed"], rows[-1]["broken"])
    seconds = time.time() - t0
    mach = machine()
    save_results("gallery_tta_omniglot", {"machine": mach, "run_dir": str(rd.path), "pad": PAD,
                                          "views": {k: v for k, v in VIEWS.items()},
                                          "test_queries": len(qi.raw_labels), "rows": rows,
                                          "seconds": seconds})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(VIEWS)
    xs = [len(VIEWS[n]) for n in names]
    for model in args.models:
        ax.plot(xs, [next(r["gap_points"] for r in rows if r["model"] == model and r["views"] == n)
                     for n in names], marker="o", label=model)
    ax.axhline(1.0, ls="--", c="gray", label="target: gap <= 1 point")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("gallery views averaged per indexed image")
    ax.set_ylabel("M(g,g) - M(q,g) recall@1 (points)")
    ax.set_title("Omniglot open-set: gallery-side test-time augmentation")
    ax.legend(fontsize=8)
    save_figure(fig, ROOT / "benchmarks" / "results" / "gallery_tta_omniglot.png")

    lines = [
        "## Gallery-side test-time augmentation on Omniglot open-set (issues 3, 7)", "",
        f"Machine: {machine_line(mach)}. Script: `benchmarks/bench_gallery_tta.py` on the "
        f"`configs/omniglot.yaml` run ({len(qi.raw_labels)} test queries of 156 unseen characters; "
        f"inference only, {seconds / 60:.1f} min). Each gallery image is indexed as the mean "
        f"gallery embedding of shifted views (reflect-pad {PAD} px, crops at fixed offsets); the "
        "query side is unchanged (one view, no edge cost). M(g,g) is the gallery model's plain "
        "query embedding against the same index. `fixed` / `broken`: test queries whose top-1 "
        "turned right / wrong against the plain index; `p`: the two-sided sign test on those "
        "queries (how likely so uneven a split is if the index changed nothing).", "",
        "| query model | views | M(g,g) R@1 | M(q,g) R@1 | M(q,g) mAP | gap pts | fixed | broken | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['views']} | {100 * r['M(g,g)']['recall@1']:.2f} | "
                     f"{100 * r['M(q,g)']['recall@1']:.2f} | {100 * r['M(q,g)']['mAP']:.2f} | "
                     f"{r['gap_points']:.2f} | {r['fixed']} | {r['broken']} | {r['sign_test_p']:.2f} |")
    best = min(rows, key=lambda r: r["gap_points"])
    plain = {r["model"]: r["gap_points"] for r in rows if r["n_views"] == 1}
    mean_change = {n: sum(r["gap_points"] - plain[r["model"]] for r in rows if r["views"] == n)
                   / len(args.models) for n in names[1:]}
    lines += ["", "Mean change of the gap over the models (negative: narrower): "
              + ", ".join(f"{n} views {v:+.2f} points" for n, v in mean_change.items()) + "."]
    lines += ["", f"Smallest gap: {best['model']}, views {best['views']}: {best['gap_points']:.2f} "
              f"points (plain index: {plain[best['model']]:.2f}); target: within 1 point.", "",
              "![gallery TTA](benchmarks/results/gallery_tta_omniglot.png)"]
    update_benchmarks_md("gallery-tta", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
