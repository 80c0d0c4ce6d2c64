"""What `hwnas run --jobs N` (query.jobs) saves: the baselines step of a finished run, its four
query models trained one after another (query.jobs 1, each on every core torch takes) and N at
a time (each in its own process on cores / N threads), from the same inherited weights.

The run's gallery, supernet, split and search are copied into a scratch run directory
(benchmarks/runs/jobs-<config>), so the run itself is not touched; each setting trains the
four models afresh there.

    python benchmarks/bench_jobs.py [--config configs/quickstart.yaml] [--jobs 1 2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, run_config, save_results, update_benchmarks_md


def scratch_run(cfg, name: str) -> Path:
    """A copy of a finished run without its query models and bundle."""
    src = Path(cfg.run_dir)
    for need in ("gallery/model.safetensors", "supernet/model.safetensors", "best_arch.json", "splits.json"):
        if not (src / need).exists():
            raise SystemExit(f"{src / need} is missing: run `hwnas run` on the config first")
    dst = ROOT / "benchmarks" / "runs" / f"jobs-{name}"
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise SystemExit(f"the config's run directory {src} lies in the scratch copy {dst}: give a config "
                         "whose run_dir is elsewhere")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("query", "bundle", "*.png", "search.db*"))
    return dst


def time_jobs(cfg, jobs: int) -> dict:
    import copy

    from hwnas.compat import api
    from hwnas.report import baseline_models

    cfg = copy.deepcopy(cfg)
    cfg.query.jobs = jobs
    shutil.rmtree(Path(cfg.run_dir) / "query", ignore_errors=True)
    todo = [{"name": n, **kw} for n, kw in baseline_models(cfg, cfg.search_space()).items()]
    t = time.time()
    done = api.train_many(cfg, todo, log=print)
    wall = time.time() - t
    return {"jobs": jobs, "wall_s": wall, "threads": api.job_threads(cfg, min(jobs, len(todo))),
            "models": [{"name": d["name"], "train_s": d["train_seconds"], "epochs": len(d["history"]),
                        "final_loss": d["history"][-1]["loss"]} for d in done]}


def markdown(res: dict) -> str:
    rows, cfg_name = res["rows"], res["config"]
    base = rows[0]["wall_s"]
    lines = [
        f"## Parallel query trainings: `hwnas run --jobs N` (issue 7, `{cfg_name}`)", "",
        f"Machine: {machine_line(res['machine'])} ({res['physical_cores']} physical cores). Script: "
        f"`benchmarks/bench_jobs.py --config {cfg_name}`. The baselines step of the finished run "
        f"(its four query models, {res['epochs']} epochs each, inheriting the supernet's weights), "
        "trained in a scratch copy of the run, one setting after the other, one run each. "
        "`threads`: torch intra-op threads per training; side by side, the last trainings "
        "take the freed cores once none is left to start." + (f" {res['note']}" if res.get("note") else ""), "",
        "| query.jobs | threads each at start | wall min | speed-up | " + " | ".join(
            f"{d['name']} train min / final loss" for d in rows[0]["models"]) + " |",
        "|---|---|---|---|" + "---|" * len(rows[0]["models"]),
    ]
    for r in rows:
        lines.append(f"| {r['jobs']} | {r['threads']} | {r['wall_s'] / 60:.1f} | {base / r['wall_s']:.2f}x | "
                     + " | ".join(f"{d['train_s'] / 60:.1f} / {d['final_loss']:.3f}" for d in r["models"]) + " |")
    diff = max(abs(a["final_loss"] - b["final_loss"]) / abs(a["final_loss"])
               for r in rows[1:] for a, b in zip(rows[0]["models"], r["models"])) if len(rows) > 1 else 0.0
    lines += ["", f"Side by side, each model's own training minutes overlap, so they add up to more than the "
              f"wall time. The largest relative difference of a final training loss from query.jobs "
              f"{rows[0]['jobs']}: {100 * diff:.2f}% (another thread count rounds the sums apart)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--note", default=None, help="a sentence printed under the machine line")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the BENCHMARKS.md section from benchmarks/results/jobs_<config>.json")
    args = ap.parse_args()
    import json

    from hwnas.latency.backends import physical_cores

    name = Path(args.config).stem
    if args.render_only:
        res = json.loads((ROOT / "benchmarks" / "results" / f"jobs_{name}.json").read_text())
        if args.note:
            res["note"] = args.note
            save_results(f"jobs_{name}", res)
    else:
        cfg = run_config(ROOT / args.config)
        cfg.run_dir = str(scratch_run(cfg, name))
        m = machine()
        rows = [time_jobs(cfg, j) for j in args.jobs]
        res = {"machine": m, "config": args.config, "physical_cores": physical_cores(),
               "epochs": cfg.train_config("query").epochs, "rows": rows,
               **({"note": args.note} if args.note else {})}
        save_results(f"jobs_{name}", res)
    text = markdown(res)
    update_benchmarks_md(f"jobs-{name}", text)
    print(text)


if __name__ == "__main__":
    main()
