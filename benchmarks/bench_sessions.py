"""How far apart fresh ONNX Runtime sessions of one network run (``MODEL_SESSIONS``).

The trained query models of a finished run directory, each exported once and loaded into
``--sessions`` sessions, all timed in the same interleaved pools (``measure_models``). Each
pool's common drift is removed (every figure divided by the mean of its model's sessions in
that pool); then, per model, the spread of its sessions (SD of their median ratio) against
the spread of one session from pool to pool. Where the first is well above the second, a
figure from one session carries its placement, which more pools do not average out; the
report therefore times each query model in several sessions and keeps the median's.

    python benchmarks/bench_sessions.py --run-dir runs/quickstart [runs/omniglot ...] [--sessions 8 --pools 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, save_results, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", nargs="+", default=["runs/quickstart"])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--pools", type=int, default=5)
    args = ap.parse_args()
    if args.sessions < 2 or args.pools < 2:
        raise SystemExit("--sessions and --pools must be at least 2 (a spread needs two figures)")

    import numpy as np

    from hwnas.config import load_config
    from hwnas.errors import HwnasError
    from hwnas.latency.backends import OrtCpuBackend, measure
    from hwnas.nn.models import load_query

    cfg = load_config(ROOT / args.config)
    pre = cfg.preprocess()
    shape = (1, pre.channels, pre.size, pre.size)
    backend = OrtCpuBackend(threads=cfg.latency.threads)
    names = []  # (run, model)
    for run in map(Path, args.run_dir):
        here = sorted(d.parent.name for d in (run / "query").glob("*/model.safetensors"))
        if not here:
            raise HwnasError(f"{run}/query holds no trained query model: give the --run-dir of a finished run")
        names += [(run, n) for n in here]
    t0 = time.time()
    runners = []
    for run, n in names:
        runners.append(backend.prepare_sessions(load_query(run / "query" / n)[0], shape, n=args.sessions))
    flat = [r for g in runners for r in g]
    # pools x (models * sessions), as measure_models times them (40 rounds of 10 runs)
    p = np.array([[m.latency_ms for m in measure(flat, rounds=40, runs=10, warmup=10 if i == 0 else 2, seed=i)]
                  for i in range(args.pools)])
    rows = []
    for i, (run, n) in enumerate(names):
        x = p[:, i * args.sessions:(i + 1) * args.sessions]  # pools x sessions
        r = x / x.mean(axis=1, keepdims=True)  # each pool's common drift removed
        ratios = np.median(r, axis=0)
        rows.append({"run": str(run), "model": n, "median_ms": float(np.median(np.median(x, axis=0))),
                     "session_sd_pct": float(100 * ratios.std(ddof=1)),
                     "session_range_pct": float(100 * (ratios.max() - ratios.min())),
                     "pool_sd_pct": float(100 * np.mean(r.std(axis=0, ddof=1))),
                     "session_ms": [float(v) for v in np.median(x, axis=0)]})
        print(rows[-1], flush=True)
    mach = machine()
    res = {"machine": mach, "run_dirs": args.run_dir, "threads": backend.threads, "sessions": args.sessions,
           "pools": args.pools, "rows": rows, "wall_s": time.time() - t0}
    save_results("sessions", res)
    md = ["## Session placement: one network in fresh ONNX Runtime sessions (issues 4, 7)", "",
          f"Machine: {machine_line(mach)}. Script: `benchmarks/bench_sessions.py --run-dir {' '.join(args.run_dir)} "
          f"--sessions {args.sessions} --pools {args.pools}` ({res['wall_s']:.0f} s): each trained query "
          f"model of the runs exported once and loaded into {args.sessions} sessions ({backend.threads} "
          "thread(s), batch 1), all timed in the same interleaved pools; each pool's common drift "
          "removed before the spreads are taken.", "",
          "| run / model | median ms | SD across sessions | range across sessions | SD of one session across pools |",
          "|---|---|---|---|---|"]
    md += [f"| {Path(r['run']).name} / {r['model']} | {r['median_ms']:.4f} | {r['session_sd_pct']:.1f}% | {r['session_range_pct']:.1f}% | "
           f"{r['pool_sd_pct']:.1f}% |" for r in rows]
    md += ["", "Where sessions spread well beyond one session's pool-to-pool noise, a figure from one "
           "session carries where that session's buffers landed, and more pools do not average it "
           "out: the report, deploy and the budget's reference subnets time each network in "
           "`MODEL_SESSIONS` (5) sessions and keep the median session's figure (the median of 5 "
           "narrows a session spread about 1.8x)."]
    update_benchmarks_md("sessions", "\n".join(md))


if __name__ == "__main__":
    main()
