"""Latency benchmark (issue 4): how well do per-op tables predict whole networks?

For the default search space at two input sizes (the quickstart's 32 px and 224 px), builds
the ONNX Runtime CPU table (timed), then measures N random subnets end to end and compares
the plain additive sum, the calibrated predictor and FLOPs as predictors of the measured
latency. Writes benchmarks/results/latency.json, the scatter plots and a BENCHMARKS.md
section.

    python benchmarks/bench_latency.py [--n 100] [--sizes 32 224] [--threads 1 2] [--calibrate 40]

Each (input size, thread count) gets its own table: on this 2-core VM at 32 px one intra-op
thread runs every subnet faster and steadier than two (the futex wake-up of the second thread
per op costs more than it saves on such small ops), at 224 px two threads are faster.
"""

from __future__ import annotations

import argparse
import time

from _common import ROOT, machine, machine_line, save_results, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--calibrate", type=int, default=40)
    args = ap.parse_args()

    from hwnas.latency.backends import OrtCpuBackend
    from hwnas.latency.profile import profile_space, validate_table
    from hwnas.space import SearchSpace

    out_dir = ROOT / "benchmarks" / "results"
    rows, mach = [], machine()
    for size, threads in [(s, t) for s in args.sizes for t in args.threads]:
        space = SearchSpace(input_size=size, name=f"default-{size}")
        backend = OrtCpuBackend(threads=threads)
        path = out_dir / f"latency_default_r{size}_t{backend.threads}.json"
        path.unlink(missing_ok=True)
        rounds, runs = (15, 10) if size <= 64 else (10, 5)
        t = time.time()
        table = profile_space(space, backend, path, rounds=rounds, runs=runs)
        build_s = time.time() - t
        t = time.time()
        v = validate_table(space, table, backend, args.n, path, calibrate=args.calibrate,
                           rounds=rounds, runs=runs)
        rows.append({"input_size": size, "threads": backend.threads, "ops": len(table.entries),
                     "build_seconds": build_s, "validate_seconds": time.time() - t,
                     "table_spread": table.header["spread"], "validation": v,
                     "calibration": table.header["calibration"], "plot": path.with_suffix(".validation.png").name})
        print(rows[-1], flush=True)
        save_results("latency", {"machine": mach, "calibrate": args.calibrate, "rows": rows,
                                 "partial": True})  # a kill keeps the finished tables' figures
    speed = threads_speedup(rows, out_dir)
    save_results("latency", {"machine": mach, "calibrate": args.calibrate, "rows": rows,
                             "threads_speedup": speed})
    md = ["## Latency tables vs end-to-end measurement (issue 4)", "",
          f"Machine: {machine_line(mach)}. Script: `benchmarks/bench_latency.py --n {args.n} --threads "
          f"{' '.join(map(str, args.threads))} --calibrate {args.calibrate}`. Default "
          "search space (width 1.0, RGB), ONNX Runtime CPU EP, batch 1, all graph optimizations, "
          "spinning off; latency = 10th percentile of interleaved round medians; every op (and "
          f"every validation network) timed in one interleaved pool. Calibration: fitted on {args.calibrate} "
          "other archs (smallest and largest included); four models — offset (sum+c), linear "
          "(a*sum+c), linear+weights (a*sum+b*Mparams+c), linear+weights+layers "
          "(a*sum+b*Mparams+d*layers+c, layers: those not skipped) — the one with the lowest leave-one-out "
          "error on the calibration archs is the table's (marked *). *Noise floor*: the same "
          f"{args.n} archs timed again in a second pool, as a predictor of the first measurement: no "
          "predictor can be expected to beat it.", "",
          "| input | threads | ops | table build s | measured range (ms) | predictor | MAPE % | within 5% | within 10% | Spearman | Kendall |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["validation"]
        rng = f"{v['measured_range_ms'][0]:.2f}-{v['measured_range_ms'][1]:.2f} ({v['measured_range_ratio']:.1f}x)"
        first = f"| {r['input_size']} | {r['threads']} | {r['ops']} | {r['build_seconds']:.0f} | {rng} | "
        preds = [("additive sum", v["additive"])] + [
            (f"{name}{' *' if name == v.get('model') else ''}", st) for name, st in v.get("models", {}).items()]
        preds.append(("noise floor (measured again)", v["repeatability"]))
        for i, (name, a) in enumerate(preds):
            md.append((first if i == 0 else "| | | | | | ") + f"{name} | {a['mape_pct']} | {a['within_5pct']} | "
                      f"{a['within_10pct']} | {a['spearman']} | {a['kendall']} |")
        md.append(f"| | | | | | FLOPs (rank only) | - | - | - | {v['flops_spearman']} | - |")
    md += ["", f"Targets: >= 95% within 10% and Spearman >= 0.95; table build <= 10 min; measured "
           f"range >= 5x (the range here is over the {args.n} random archs plus the {args.calibrate} calibration "
           "archs, which include the smallest and largest). End-to-end spread (median CV across "
           "rounds): " + ", ".join(f"{r['input_size']} px {r['threads']} thread(s) "
                                   f"{r['validation']['median_cv_pct_end_to_end']}%" for r in rows) + ".", ""]
    if speed:
        md += ["Thread count: the same archs (the validation seed draws the same ones for every "
               "table), each measured in its table's validation pool — median latency of the "
               f"{args.n} validation subnets, and how many ran faster at one thread than at the other:", "",
               "| input | " + " | ".join(f"median ms, {t} thr" for t in args.threads) + " | faster at 1 thread |",
               "|---|" + "---|" * len(args.threads) + "---|"]
        for size, d in speed.items():
            md.append(f"| {size} | " + " | ".join(f"{d['median_ms'][t]:.3f}" for t in args.threads)
                      + f" | {d['faster_at_1']} of {d['n']} |")
        md.append("")
    md += [f"![{r['input_size']} px, {r['threads']} thread(s)](benchmarks/results/{r['plot']})" for r in rows]
    update_benchmarks_md("latency", "\n".join(md))


def threads_speedup(rows: list, out_dir) -> dict:
    """Per input size with a 1-thread table and another: the validation subnets' median
    measured latency at each thread count, and how many ran faster at one thread."""
    import json

    import numpy as np

    out = {}
    for size in sorted({r["input_size"] for r in rows}):
        per = {r["threads"]: out_dir / r["plot"].replace(".validation.png", ".validation.json")
               for r in rows if r["input_size"] == size}
        if 1 not in per or len(per) < 2:
            continue
        meas = {t: {a["arch"]: a["measured_ms"] for a in json.loads(p.read_text())["archs"]
                    if a["role"] == "validation"} for t, p in per.items()}
        archs = sorted(set.intersection(*(set(m) for m in meas.values())))
        other = max(t for t in meas if t != 1)
        out[size] = {"n": len(archs), "median_ms": {t: float(np.median([m[a] for a in archs])) for t, m in meas.items()},
                     "faster_at_1": sum(meas[1][a] < meas[other][a] for a in archs)}
    return out


if __name__ == "__main__":
    main()
