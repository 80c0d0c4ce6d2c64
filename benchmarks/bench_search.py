"""Search benchmark (issue 5), on a finished quickstart run (trained gallery and supernet):

* samplers: TPE vs NSGA-II vs regularized evolution vs random at equal numbers of evaluated
  trials (best reward reached after 25/50/100/...), one study each, same budget and reward;
* rewards: R1 vs R2 vs R3 — the best arch of each search is trained (train-query, same
  recipe) and evaluated on the test split;
* budgets: at three budgets across the table's range, the searched model vs the median of
  K random feasible archs trained the same way, and vs MobileNetV3-small;
* cost: seconds per evaluated trial.

    python benchmarks/bench_search.py --config configs/quickstart.yaml --parts samplers rewards budgets cost
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
from pathlib import Path

from _common import ROOT, machine, machine_line, save_results, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "quickstart"))
    ap.add_argument("--parts", nargs="+", default=["samplers", "rewards", "budgets", "cost"])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--random-archs", type=int, default=5)
    ap.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "evolution", "random"])
    ap.add_argument("--budget-fracs", nargs="+", type=float, default=[0.15, 0.3, 0.6],
                    help="budgets as fractions of the table's latency range")
    args = ap.parse_args()

    from hwnas.compat import api
    from hwnas.config import load_config
    from hwnas.pipeline import resolve_budget
    from hwnas.search.runner import plot_progress, predictor_for, run_search

    base = load_config(args.config)
    base.run_dir = args.run_dir
    space = base.search_space()
    pred, _ = predictor_for(base, space)
    lo, hi = pred.range()
    budget = resolve_budget(base, pred)
    res: dict = {"machine": machine(), "run_dir": args.run_dir, "budget_ms": budget, "range_ms": [lo, hi]}
    out = ROOT / "benchmarks" / "results"
    quiet = lambda *_: None  # noqa: E731

    def search(**kw):
        cfg = copy.deepcopy(base)
        for k, v in kw.items():
            setattr(cfg.search, k, v)
        cfg.search.storage = f"sqlite:///{Path(args.run_dir).resolve() / 'bench_search.db'}"
        return cfg, run_search(cfg, log=quiet)

    if "samplers" in args.parts:
        import optuna

        curves, rows = {}, []
        for sampler in args.samplers:
            cfg, r = search(budget_ms=budget, sampler=sampler, n_trials=args.trials,
                            study_name=f"bench-sampler-{sampler}")
            st = optuna.load_study(study_name=r["study"], storage=cfg.search.storage)
            feas = sorted((t for t in st.trials if t.user_attrs.get("feasible")), key=lambda t: t.number)
            vals = [t.user_attrs["reward"] for t in feas]
            curves[sampler] = vals
            marks = sorted({n for n in (10, 25, 50, 100, 200) if n <= len(vals)} | {len(vals)})
            rows.append({"sampler": sampler, "best_at": {n: max(vals[:n]) for n in marks},
                         "sec_per_trial": statistics.median(t.user_attrs["eval_seconds"] for t in feas),
                         "infeasible": sum(1 for t in st.trials if t.user_attrs.get("feasible") is False)})
            print(rows[-1], flush=True)
        plot_progress(curves, out / "search_samplers.png", title=f"budget {budget} ms, R3, recall@1")
        res["samplers"] = rows

    def train_eval(name, **kw):
        cfg = copy.deepcopy(base)
        q = api.train_query(cfg, name=name, resume=True, log=quiet, **kw)
        qdir = Path(args.run_dir) / "query" / q["name"]
        ev = api.evaluate_query(cfg, query_dir=str(qdir), log=quiet)["metrics"]
        return {"name": name, "mflops": q["flops"] / 1e6, "M(q,g)": ev["M(q,g)"]["recall@1"],
                "M(q,q)": ev["M(q,q)"]["recall@1"], "arch": q.get("arch") or q.get("timm"),
                "dir": str(qdir)}

    def measure_rows(rows):
        """End-to-end edge latency of trained query models, measured interleaved (ORT CPU)."""
        from hwnas.export.onnx import export_onnx
        from hwnas.latency.backends import OrtCpuBackend, measure
        from hwnas.nn.models import load_query

        pre = base.preprocess()
        shape = (1, pre.channels, pre.size, pre.size)
        backend = OrtCpuBackend(threads=base.latency.threads)
        runners = [backend.prepare_onnx(export_onnx(load_query(r["dir"])[0], shape), shape) for r in rows]
        for r, m in zip(rows, measure(runners, rounds=15, runs=10, warmup=10)):
            r["measured_ms"] = m.latency_ms

    if "rewards" in args.parts:
        rows = []
        for reward in ("r1", "r2", "r3"):
            _, r = search(budget_ms=budget, reward=reward, n_trials=50, study_name=f"bench-reward-{reward}")
            row = train_eval(f"bench-reward-{reward}", arch=r["arch"])
            row.update(reward=reward, predicted_ms=r["predicted_ms"])
            rows.append(row)
            print(row, flush=True)
        res["rewards"] = rows

    if "budgets" in args.parts:
        rows = []
        mbv3 = train_eval("bench-mobilenetv3_small_050", timm_name="mobilenetv3_small_050")
        for frac in args.budget_fracs:
            b = round(lo + frac * (hi - lo), 4)
            _, r = search(budget_ms=b, n_trials=50, study_name=f"bench-budget-{frac}")
            s = train_eval(f"bench-budget-{frac}-searched", arch=r["arch"])
            rng = random.Random(100 + int(frac * 100))
            rand = []
            while len(rand) < args.random_archs:
                a = space.sample(rng)
                if pred(a) <= b:
                    rand.append(train_eval(f"bench-budget-{frac}-random{len(rand)}", arch=a.to_string(space)))
            measure_rows([s, mbv3, *rand])
            rows.append({"budget_ms": b, "searched": s, "mobilenetv3": dict(mbv3),
                         "random_median_measured_ms": statistics.median(x["measured_ms"] for x in rand),
                         "random_median_M(q,g)": statistics.median(x["M(q,g)"] for x in rand),
                         "random_median_M(q,q)": statistics.median(x["M(q,q)"] for x in rand),
                         "random": rand})
            print(rows[-1]["budget_ms"], s, rows[-1]["random_median_M(q,g)"], flush=True)
        res["budgets"] = rows

    if "cost" in args.parts:
        # seconds per evaluated trial vs the size of the validation set: the test split's
        # images stand in for larger validation sets (timing only; no accuracy is reported)
        import time as _time

        import numpy as np

        from hwnas.compat.api import PartImages, RunDir, gallery_embeddings, load_part, run_gallery
        from hwnas.search.runner import SupernetEvaluator

        ev = SupernetEvaluator(base, log=quiet)
        rd = RunDir(base)
        qi, gi = load_part(rd, "query", ev.pre, log=quiet), load_part(rd, "gallery", ev.pre, log=quiet)
        g_all = gallery_embeddings(rd, run_gallery(rd), "gallery", gi, log=quiet)
        rng = random.Random(7)
        archs = [space.sample(rng) for _ in range(5)]
        rows = [{"val_queries": len(ev.vq.images), "val_gallery": len(ev.vg.images), "kind": "validation split",
                 "sec_per_trial": statistics.median(ev(a)["seconds"] for a in archs)}]
        ev.ids = (None, None)
        for ng in (1000, 2000, 4000, 8000):
            nq = ng // 4
            sq, sg = np.arange(min(nq, len(qi.images))), np.arange(min(ng, len(gi.images)))
            ev.vq = PartImages(qi.images[sq], qi.labels[sq], qi.raw_labels[sq], [])
            ev.vg = PartImages(gi.images[sg], gi.labels[sg], gi.raw_labels[sg], [])
            ev.g_emb, ev.cache = g_all[sg], {}
            t = _time.time()
            secs = [ev(a)["seconds"] for a in archs]
            rows.append({"val_queries": len(sq), "val_gallery": len(sg), "kind": "test images as validation",
                         "sec_per_trial": statistics.median(secs), "wall_s": _time.time() - t})
            print(rows[-1], flush=True)
        res["cost"] = rows

    prev = ROOT / "benchmarks" / "results" / "search.json"
    if prev.exists():  # parts run separately accumulate (a part run again replaces its figures)
        import json

        old = json.loads(prev.read_text())
        if old.get("run_dir") == res["run_dir"]:
            res = {**old, **res}
    save_results("search", res)
    md = ["## Search (issue 5)", "", f"Machine: {machine_line(res['machine'])}. Script: "
          f"`benchmarks/bench_search.py` on the quickstart run (`{args.run_dir}`); latency "
          f"budget {budget} ms unless stated (table range {lo:.3f}-{hi:.3f} ms)."]
    if "samplers" in res:
        marks = sorted({n for r in res["samplers"] for n in r["best_at"]})
        md += ["", "Best R3 reward (validation recall@1) after N evaluated trials:", "",
               "| sampler | " + " | ".join(f"N={n}" for n in marks) + " | s / trial | over-budget samples |",
               "|---|" + "---|" * len(marks) + "---|---|"]
        for r in res["samplers"]:
            md.append(f"| {r['sampler']} | " + " | ".join(f"{r['best_at'].get(n, float('nan')):.4f}" for n in marks)
                      + f" | {r['sec_per_trial']:.2f} | {r['infeasible']} |")
        md += ["", "![samplers](benchmarks/results/search_samplers.png)"]
    if "rewards" in res:
        md += ["", "Reward ablation (best arch of a 50-trial TPE search, then train-query, test split):", "",
               "| reward | MFLOPs | predicted ms | M(q,g) R@1 | M(q,q) R@1 |", "|---|---|---|---|---|"]
        for r in res["rewards"]:
            md.append(f"| {r['reward'].upper()} | {r['mflops']:.2f} | {r['predicted_ms']:.3f} | "
                      f"{100 * r['M(q,g)']:.2f} | {100 * r['M(q,q)']:.2f} |")
    if "budgets" in res:
        md += ["", f"Searched vs the median of {args.random_archs} random feasible archs (same training):", "",
               "| budget ms (pred.) | searched M(q,g) | searched M(q,q) | searched meas. ms | random median M(q,g) "
               "| random median M(q,q) | random median meas. ms | MobileNetV3-small-0.5 M(q,g) / M(q,q) / meas. ms |",
               "|---|---|---|---|---|---|---|---|"]
        for r in res["budgets"]:
            s, m = r["searched"], r["mobilenetv3"]
            md.append(f"| {r['budget_ms']} | {100 * s['M(q,g)']:.2f} | {100 * s['M(q,q)']:.2f} | "
                      f"{s['measured_ms']:.3f} | {100 * r['random_median_M(q,g)']:.2f} | "
                      f"{100 * r['random_median_M(q,q)']:.2f} | {r['random_median_measured_ms']:.3f} | "
                      f"{100 * m['M(q,g)']:.2f} / {100 * m['M(q,q)']:.2f} / {m['measured_ms']:.3f} |")
        md += ["", "MobileNetV3-small at width 0.5 is the narrowest timm registers; where its measured "
               "latency is above a budget it is shown for reference, not as a feasible rival."]
    if "cost" in res:
        md += ["", "Cost of one evaluated trial (BN recalibration + embedding + both accuracies) by "
               "validation-set size (median of 5 random archs):", "",
               "| validation set | queries | gallery | s / trial |", "|---|---|---|---|"]
        for r in res["cost"]:
            md.append(f"| {r['kind']} | {r['val_queries']} | {r['val_gallery']} | {r['sec_per_trial']:.2f} |")
    update_benchmarks_md("search", "\n".join(md))


if __name__ == "__main__":
    main()
