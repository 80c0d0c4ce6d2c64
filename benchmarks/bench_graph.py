"""What the deploy form of a subnet saves (``SubNet.deploy_form``, graph form 2).

A skipped layer leaves its channel shuffle as a permutation of the next unit's input. Before
graph form 2 the exported graph applied it with a Gather (which also makes ONNX Runtime
convert the blocked NCHWc layout back and forth around it); now the permutations before
stride-2 units and before the head are folded into their weights, and the L2 normalization
is three nodes instead of five. This times, for random subnets of a space, the graph as
exported before (``export_onnx(..., deploy_form=False)``, same normalization) and after, in
one interleaved pool per network pair, at the thread count the space is deployed with.

    python benchmarks/bench_graph.py [--n 40]     # results/graph.json, BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import random
import time

from _common import machine, machine_line, save_results, update_benchmarks_md


def compare(space, threads: int, n: int, seed: int = 0, archs=None, names=None) -> dict:
    import numpy as np
    import onnx

    from hwnas.export.onnx import export_onnx
    from hwnas.latency.backends import OrtCpuBackend, measure_models
    from hwnas.nn.supernet import SubNet
    from hwnas.space.ops import arch_flops

    rng = random.Random(seed)
    if archs is None:
        archs = [space.smallest()] + [space.sample(rng) for _ in range(n - 1)]
    backend = OrtCpuBackend(threads=threads)
    shape = (1, space.in_channels, space.input_size, space.input_size)
    from tqdm import tqdm

    rows = []
    names = names or [None] * len(archs)
    for name, a in tqdm(list(zip(names, archs)), desc=f"{space.name} {space.input_size} px", unit="subnet"):
        net = SubNet(space, a).eval()
        graphs = [export_onnx(net, shape, dynamic_batch=True, deploy_form=f) for f in (False, True)]
        nodes = [len(onnx.load_from_string(g).graph.node) for g in graphs]
        before, after = measure_models([backend.prepare_onnx(g, shape) for g in graphs], pools=3)
        rows.append({"name": name, "arch": a.to_string(space), "mflops": arch_flops(space, a) / 1e6,
                     "nodes_before": nodes[0], "nodes_after": nodes[1],
                     "ms_before": before.latency_ms, "ms_after": after.latency_ms,
                     "saving_pct": 100 * (1 - after.latency_ms / before.latency_ms)})
    s = np.array([r["saving_pct"] for r in rows])
    return {"space": space.name, "input_size": space.input_size, "threads": backend.threads, "n": len(rows),
            "saving_pct_median": float(np.median(s)), "saving_pct_q1": float(np.percentile(s, 25)),
            "saving_pct_q3": float(np.percentile(s, 75)), "faster_after": int((s > 0).sum()),
            "nodes_removed_median": float(np.median([r["nodes_before"] - r["nodes_after"] for r in rows])),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--pipeline-only", action="store_true",
                    help="time only the subnets the pipeline runs trained (runs/quickstart, "
                         "runs/omniglot) and keep the random subnets' figures of the last run")
    args = ap.parse_args()

    import numpy as np

    from hwnas.config import load_config
    from hwnas.space import SearchSpace

    from _common import ROOT

    import json

    from hwnas.space import Arch

    t0 = time.time()
    quick = load_config(ROOT / "configs" / "quickstart.yaml")
    space, threads = quick.search_space(), quick.latency.threads or 1
    prev = ROOT / "benchmarks" / "results" / "graph.json"
    if args.pipeline_only:
        old = json.loads(prev.read_text())
        res, wall = old["cases"], old["wall_s"]
    else:
        cases = [(space, threads), (SearchSpace(input_size=224, name="default-224"), 2)]
        res, wall = [compare(sp, th, args.n) for sp, th in cases], None
    # the subnets the two pipeline runs trained (same space): searched near the budget, so
    # rich in skips — what is deployed
    names, archs = [], []
    for run in ("quickstart", "omniglot"):
        for d in sorted((ROOT / "runs" / run / "query").glob("*/config.json")):
            c = json.loads(d.read_text())
            if (c.get("kind") == "subnet" and not d.parent.name.startswith("recipe-")
                    and c.get("space", {}).get("hash", space.hash) == space.hash):
                names.append(f"{run}/{d.parent.name}")
                archs.append(Arch.parse(c["arch"], space))
    pipe = compare(space, threads, len(archs), archs=archs, names=names) if archs else None
    if wall is None:
        wall = time.time() - t0
    mach = machine()
    save_results("graph", {"machine": mach, "cases": res, "pipeline": pipe, "wall_s": wall})
    md = ["## Deploy form: permutations folded into weights (issue 4)", "",
          f"Machine: {machine_line(mach)}. Script: `benchmarks/bench_graph.py --n {args.n}` "
          f"({(time.time() - t0) / 60:.0f} min): the smallest and {args.n - 1} random subnets, each exported as "
          "before (Gathers for the permutations skips leave before stride-2 units and the head) and "
          "as deployed now (folded into those weights), timed in one interleaved pool per pair "
          "(ONNX Runtime CPU, batch 1, three pools, 10th percentile of round medians).", "",
          "| space | input | threads | subnets | latency saved, median (IQR) | faster after | nodes removed (median) | low-latency half: saved |",
          "|---|---|---|---|---|---|---|---|"]
    for c in res:
        ms = np.array([r["ms_before"] for r in c["rows"]])
        low = [r["saving_pct"] for r in c["rows"] if r["ms_before"] <= np.median(ms)]
        md.append(f"| {c['space']} | {c['input_size']} | {c['threads']} | {c['n']} | "
                  f"{c['saving_pct_median']:.1f}% ({c['saving_pct_q1']:.1f} to {c['saving_pct_q3']:.1f}) | "
                  f"{c['faster_after']} of {c['n']} | {c['nodes_removed_median']:.0f} | {np.median(low):.1f}% |")
    if pipe:
        md += ["", f"The subnets the two pipeline runs trained ({pipe['space']} space, {pipe['input_size']} px, "
               f"{pipe['threads']} thread(s); searched archs sit near the budget and skip many layers):", "",
               "| run / model | MFLOPs | ms before | ms after | saved | nodes removed |", "|---|---|---|---|---|---|"]
        md += [f"| {r['name']} | {r['mflops']:.2f} | {r['ms_before']:.4f} | {r['ms_after']:.4f} | "
               f"{r['saving_pct']:.1f}% | {r['nodes_before'] - r['nodes_after']} |" for r in pipe["rows"]]
    md += ["", "Outputs agree to 1e-5 (tests/test_supernet.py). Tables measured on the old graphs "
           "are refused (`graph_form` in the table header)."]
    update_benchmarks_md("graph", "\n".join(md))


if __name__ == "__main__":
    main()
