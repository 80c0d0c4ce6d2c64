"""Headline benchmark (issue 7): the whole pipeline, `hwnas run`, on Fashion-MNIST
(configs/quickstart.yaml) and Omniglot open-set (configs/omniglot.yaml), and the headline
table of each run against the paragon and the baselines, with the project's targets:
>= 20x lower query FLOPs, >= 10x lower measured edge latency, M(q,g) recall@1 within
1 point of the paragon's M(g,g), and Pareto-better than every baseline.

Each run is resumable (`hwnas run` keeps finished steps), so a finished run directory is
only re-reported. Writes benchmarks/results/headline.json, a PNG per data set and the
BENCHMARKS.md section `headline`.

    python benchmarks/bench_headline.py                       # both configs
    python benchmarks/bench_headline.py --configs configs/quickstart.yaml
    python benchmarks/bench_headline.py --configs configs/omniglot.yaml \
        --set query.train.epochs=180 --run-dir runs/omniglot-180 --from-run   # a variant, beside
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, run_config, save_results, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+",
                    default=[str(ROOT / "configs" / "quickstart.yaml"), str(ROOT / "configs" / "omniglot.yaml")])
    ap.add_argument("--note", default=None,
                    help="a sentence printed under the step times of the configs run this time "
                         "(e.g. that other jobs shared the machine during a step)")
    ap.add_argument("--from-run", action="store_true",
                    help="report each config's finished run directory as it stands (its report and "
                         "step times) without calling hwnas run: e.g. when the latency table it was "
                         "searched with is gone, which hwnas run would make again and search anew")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override (as hwnas run --set) for every config of this call: "
                         "reported as a variant beside the config's own figures")
    ap.add_argument("--run-dir", default=None, help="the run directory (one config only)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="also train the searched model and each baseline at this many training "
                         "seeds in all (the run's own and the next ones, as <model>-seed<k> in the "
                         "run directory, resumable) and judge the Pareto comparison on the seeds' mean "
                         "M(q,g): one training is one draw of training noise")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the BENCHMARKS.md section from benchmarks/results/headline.json")
    args = ap.parse_args()

    import json

    if args.render_only:
        update_benchmarks_md("headline", markdown(json.loads((ROOT / "benchmarks" / "results" / "headline.json").read_text())))
        return

    import re

    from hwnas.cli import apply_sets
    from hwnas.pipeline import run_pipeline
    from hwnas.report import headline_table

    if args.run_dir and len(args.configs) > 1:
        raise SystemExit("--run-dir goes with one config")
    out = ROOT / "benchmarks" / "results"
    runs = []
    for path in args.configs:
        cfg = run_config(path)
        apply_sets(cfg, args.set)
        if args.run_dir:
            cfg.run_dir = str(Path(args.run_dir).resolve())
        cfg.validate()
        run_dir = Path(cfg.run_dir)
        t = time.time()
        if not args.from_run:
            rc = run_pipeline(cfg)
            if rc:
                raise SystemExit(f"hwnas run {path} failed (exit {rc})")
        steps = json.loads((run_dir / "steps.json").read_text()) if (run_dir / "steps.json").exists() else {}
        if "report" not in steps.get("done", {}):
            raise SystemExit(f"{run_dir} holds no finished run: `hwnas run {path}` first (or leave out --from-run)")
        report = json.loads((run_dir / "report.json").read_text())
        name = Path(path).stem + "".join("_" + re.sub(r"[^A-Za-z0-9]+", "_", x) for x in args.set)
        png = out / f"headline_{name}.png"
        shutil.copyfile(run_dir / "report_accuracy_vs_latency.png", png)
        runs.append({"config": " --set ".join([Path(path).name, *args.set]), "run_dir": str(run_dir),
                     "this_call_s": time.time() - t,
                     "step_seconds": {k: v.get("seconds") for k, v in steps["done"].items()},
                     "report": report, "png": png.name, **({"note": args.note} if args.note else {}),
                     **({"from_run": steps["done"]["report"]["finished"]} if args.from_run else {})})
        if args.seeds > 1:
            runs[-1]["seeds"] = train_seeds(cfg, report, args.seeds)
        print(headline_table(report), flush=True)
    # configs not run this time keep their last figures (marked with the date they were run),
    # and their place in the table; a config new to it goes last
    prev = out / "headline.json"
    if prev.exists():
        old = json.loads(prev.read_text())
        new = {r["config"]: r for r in runs}
        runs = [new.pop(r["config"], None) or {**r, "measured": r.get("measured") or old["machine"].get("date"),
                                               "machine": r.get("machine") or old["machine"]}
                for r in old.get("runs", [])] + list(new.values())
    # the Machine line's date is when this call's figures were measured: a --from-run report's own
    m = machine()
    m["date"] = max(r["from_run"][:10] if r.get("from_run") else m["date"] for r in runs if not r.get("measured"))
    res = {"machine": m, "runs": runs}
    save_results("headline", res)
    update_benchmarks_md("headline", markdown(res))


def train_seeds(cfg, report: dict, n: int) -> dict:
    """Each model of ``report`` but the adapted (the searched one and the baselines), trained
    again at training seeds ``cfg.seed + 1 .. + n - 1`` with the run's recipe (the seed sets
    batch order and augmentation, and the initial weights of a model that does not start from
    the supernet's; the split is the run's), and evaluated on the test split:
    {model: [{"seed", "M(q,g)", "M(q,q)"}, ...]}, the run's own training first. The
    architectures, so the latencies, are the report's."""
    import copy

    from hwnas.compat import api

    quiet = lambda *_: None  # noqa: E731
    rows = [r for r in report["rows"] if not r.get("adapted")]
    out = {r["model"]: [{"seed": cfg.seed, "M(q,g)": r["M(q,g)_recall@1"], "M(q,q)": r["M(q,q)_recall@1"]}]
           for r in rows}
    for k in range(1, n):
        c = copy.deepcopy(cfg)
        c.seed = cfg.seed + k
        jobs = [{"name": f"{r['model']}-seed{k}", "resume": True, "retrain_changed": True,
                 **({"timm_name": r["arch"]} if r["kind"] == "timm" else {"arch": r["arch"]})} for r in rows]
        for r, q in zip(rows, api.train_many(c, jobs)):
            m = api.evaluate_query(c, query_dir=str(Path(c.run_dir) / "query" / q["name"]), log=quiet)["metrics"]
            out[r["model"]].append({"seed": c.seed, "M(q,g)": m["M(q,g)"]["recall@1"],
                                    "M(q,q)": m["M(q,q)"]["recall@1"]})
    return out


def _seeds_lines(rep: dict, seeds: dict) -> list[str]:
    """The models' accuracies by training seed, and the Pareto comparison on their means."""
    import statistics

    from hwnas.report import pareto_against

    rows = {r["model"]: r for r in rep["rows"] if r["model"] in seeds}
    mean = {m: {**rows[m], "M(q,g)_recall@1": statistics.mean(x["M(q,g)"] for x in v)} for m, v in seeds.items()}
    ns = sorted({len(v) for v in seeds.values()})
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    out = ["", f"By training seed ({n} trainings of each model, the run's own first; the architectures "
           "and latencies are the table's; the seed sets batch order and augmentation, and the initial "
           "weights of a model trained from scratch — a subnet that inherits the supernet's weights "
           "starts from them at every seed):", "",
           "| model | meas ms | M(q,g) R@1 by seed | mean | SD | M(q,q) R@1 mean | gap pts (mean) |",
           "|---|---|---|---|---|---|---|"]
    g = 100 * rep["paragon"]["M(g,g)_recall@1"]
    for m, v in seeds.items():
        qg = [100 * x["M(q,g)"] for x in v]
        out.append(f"| {m} | {rows[m]['measured_ms']:.3f} | {' / '.join(f'{x:.2f}' for x in qg)} | "
                   f"{statistics.mean(qg):.2f} | {f'{statistics.stdev(qg):.2f}' if len(qg) > 1 else '-'} | "
                   f"{100 * statistics.mean(x['M(q,q)'] for x in v):.2f} | {g - statistics.mean(qg):.2f} |")
    s = mean.get("searched")
    if s is not None:
        pareto, worse = pareto_against(s, [v for b, v in mean.items() if b != "searched"])
        better = [b for b, yes in pareto.items() if yes]
        others = [b for b in mean if b != "searched" and b not in better and b not in worse]
        out += ["", "On the seeds' mean M(q,g): the searched model is Pareto-better than "
                + (", ".join(better) or "none") + "; dominated by " + (", ".join(worse) or "none")
                + ("; neither against " + ", ".join(others) if others else "") + "."]
    return out


def _pools_line(rep: dict) -> str:
    """The spread of the searched model's latency ratio over the report's timing pools."""
    s = next((r for r in rep["rows"] if r["model"] == "searched"), None)
    pools = (s or {}).get("latency_reduction_pools")
    if not pools:
        return ""
    p = rep["paragon"].get("measured_pools_ms") or []
    return (f" Its latency x over the report's {len(pools)} timing pools: {min(pools):.1f}-"
            f"{max(pools):.1f}" + (f" (the paragon {min(p):.3f}-{max(p):.3f} ms)." if p else "."))


def _not_pareto_line(rep: dict) -> str:
    """For each baseline the searched model is not Pareto-better than, what it loses on,
    with the per-pool latency comparison (the pools are timed interleaved, so paired)."""
    rows = {r["model"]: r for r in rep["rows"]}
    s = rows.get("searched")
    if s is None:
        return ""
    out = []
    for name, better in (rep.get("searched_pareto_better_than") or {}).items():
        if better:
            continue
        b, why = rows[name], []
        tol = rep.get("pareto_latency_tol", 0.0)  # (within it the two count as equally fast)
        if s["measured_ms"] > b["measured_ms"] * (1 + tol):
            slower, sp, bp = "", s.get("latency_reduction_pools"), b.get("latency_reduction_pools")
            if sp and bp:  # in a pool, the smaller paragon / model ratio is the slower model
                slower = f", slower in {sum(a < c for a, c in zip(sp, bp))} of {len(sp)} timing pools"
            ss, bs = s.get("measured_sessions_ms"), b.get("measured_sessions_ms")
            if ss and bs:  # each model's spread over its fresh sessions (report.json)
                # four decimals: models a few µs apart would read 0.058-0.058 at three
                slower += (f"; sessions {min(ss):.4f}-{max(ss):.4f} vs {min(bs):.4f}-{max(bs):.4f} ms")
            why.append(f"{1000 * (s['measured_ms'] - b['measured_ms']):.0f} µs slower "
                       f"({s['measured_ms']:.3f} vs {b['measured_ms']:.3f} ms{slower})")
        dq = 100 * (s["M(q,g)_recall@1"] - b["M(q,g)_recall@1"])
        t = (rep.get("searched_vs_baselines_paired") or {}).get(name)
        why.append(f"{abs(dq):.2f} points {'more' if dq >= 0 else 'less'} accurate on M(q,g)"
                   + (f" ({t['only_searched']} test queries right only for searched, {t['only_baseline']} only "
                      f"for {name}: exact McNemar p = {t['p_value']:.2g})" if t else ""))
        out.append(f"{name}: " + ", ".join(why))
    return (" Not Pareto-better than " + "; ".join(out) + ".") if out else ""


def markdown(res: dict) -> str:
    from hwnas.report import PARETO_LATENCY_TOL, headline_table

    lines = ["## Headline: the searched query model vs the paragon and the baselines (issue 7)", "",
             f"Machine: {machine_line(res['machine'])}. Script: `benchmarks/bench_headline.py` "
             "(runs `hwnas run` per config; test split; edge latency = ONNX Runtime CPU, batch 1, "
             "measured end to end). Every baseline is trained with the same compatibility recipe. "
             "`FLOPs x` / `latency x` = paragon ÷ model; `gap pts` = M(g,g) − M(q,g) recall@1.",
             "Targets: FLOPs x >= 20, latency x >= 10, gap <= 1 point, Pareto-better than every "
             "baseline: no slower, no less accurate on M(q,g) recall@1 and better in one, measured "
             f"latencies within {100 * PARETO_LATENCY_TOL:g}% counting as equal (`not_dominated_by_any_baseline` is the weaker: no "
             "baseline is Pareto-better than the searched model).",
             "",
             "Threads: a report times the query models at the latency table's intra-op thread "
             "count and the paragon at 1, the powers of two below the physical cores, their count and the table's, its fastest "
             "counting. At 32 px on these 2 cores one thread runs every query model faster (median 1.35x) "
             "than two (the second thread's wake-up per small op costs more than it saves; "
             "BENCHMARKS.md, latency, thread count), so the configs use `latency.threads: 1`. At 2 threads the "
             "fastest subnets took ~0.1 ms and the paragon / fastest-subnet ratio was 8.4x with "
             "the machine quiet, which put the 10x target at the edge of the space. The ResNet-18 "
             "paragon drifts with this shared VM's state (0.74-2.0 ms over these days) while a "
             "tiny network barely moves; the per-pool range below shows it."]
    for r in res["runs"]:
        rep = r["report"]
        total = sum(v for v in r["step_seconds"].values() if v)
        lines += ["", f"### {rep['dataset']} ({rep['protocol']}-set), `{r['config']}`", ""]
        # every section names its machine and date, whether this call measured it or not
        m = r.get("machine") or (None if r.get("measured") else res["machine"])
        where = ((f" on {m['cpu']}, {m['cores']} cores" if m else "") + ", the query models timed at "
                 f"{rep.get('threads')} thread(s)"
                 + ("" if "threads" in rep["paragon"] else ", the paragon at the same count") + ".*")
        lines += [(f"*Not re-run with the others: these figures are from {r['measured']}" if r.get("measured")
                   else f"*Measured {(r.get('from_run') or res['machine']['date'])[:10]}") + where, ""]
        if r.get("from_run"):
            lines += [f"*Reported from the finished run directory as it stood (its report written "
                      f"{r['from_run'].replace('T', ' ')}), not re-run by this call"
                      + ("; the call trained only the other seeds below" if r.get("seeds") else "") + ".*", ""]
        lines += [
                  f"Step times on this machine, each step's last run (a step redone after a config "
                  f"edit reuses the models it finds trained): {total / 60:.1f} min in all "
                  f"({', '.join(f'{k} {v:.0f} s' for k, v in r['step_seconds'].items() if v is not None)}). "
                  f"Latency budget {rep['budget_ms']} ms (predicted)."
                  + (f" {r['note']}" if r.get("note") else ""), "",
                  headline_table(rep, markdown=True), "",
                  f"Searched model dominated by: {', '.join(rep.get('searched_dominated_by') or []) or 'none'}."
                  + _pools_line(rep) + _not_pareto_line(rep),
                  *(_seeds_lines(rep, r["seeds"]) if r.get("seeds") else []),
                  "", f"![{rep['dataset']} headline](benchmarks/results/{r['png']})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
