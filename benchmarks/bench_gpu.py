"""GPU benchmark (issue 4, gallery side): run on a machine with an NVIDIA GPU.

* the torch-cuda latency table of the default search space at 224 px (and the quickstart's
  32 px), its build time, and its validation on N random subnets measured end to end
  (calibrated and additive MAPE, within 10%, Spearman; FLOPs Spearman);
* the gallery model's indexing throughput (images/s at batch 1, 32, 256; fp32 and fp16)
  for timm resnet50 and resnet101 embedding nets at 224 px (weights do not change speed, so
  untrained nets are timed).

TensorRT is used instead of torch-cuda when it is installed (`pip install 'hwnas[gpu]'`).

    python benchmarks/bench_gpu.py --out DIR          # on the GPU machine
    python benchmarks/bench_gpu.py --render DIR/gpu.json   # here: the BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, save_results, update_benchmarks_md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    ap.add_argument("--render", help="a gpu.json from a GPU run: copy it and its plots here and "
                    "write the BENCHMARKS.md section")
    ap.add_argument("--note", help="with --render: a sentence on how the figures were taken, kept in gpu.json "
                    "and printed under the machine line")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render), args.note)

    import torch

    from hwnas.latency.backends import TorchCudaBackend, get_backend
    from hwnas.latency.profile import gallery_throughput, profile_space, validate_table
    from hwnas.data.images import Preprocess
    from hwnas.nn.models import EmbeddingNet
    from hwnas.space import SearchSpace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = get_backend("gpu")
    res: dict = {"machine": {**machine(), "gpu": torch.cuda.get_device_name()},
                 "backend": backend.settings(), "tables": [], "throughput": []}
    for size in args.sizes:
        space = SearchSpace(input_size=size, name=f"default-{size}")
        path = out / f"latency_gpu_default_r{size}.json"
        path.unlink(missing_ok=True)
        t = time.time()
        table = profile_space(space, backend, path, rounds=10, runs=10)
        build_s = time.time() - t
        v = validate_table(space, table, backend, args.n, path)
        res["tables"].append({"input_size": size, "ops": len(table.entries), "build_s": build_s,
                              "validation": v, "png": path.with_suffix(".validation.png").name})
        print(res["tables"][-1], flush=True)
    for name in args.backbones:
        for half in (False, True):
            b = TorchCudaBackend(half=half) if backend.name == "torch-cuda" else backend
            net = EmbeddingNet(name, 256, 3)
            pre = Preprocess(size=224, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
            tp = gallery_throughput(net, pre, b)
            res["throughput"].append({"backbone": name, "precision": "fp16" if half else "fp32", **tp})
            print(res["throughput"][-1], flush=True)
            if b is backend:
                break  # TensorRT: its precision is the backend's own
    (out / "gpu.json").write_text(json.dumps(res, indent=2))


def render(src: Path, note: str | None = None) -> None:
    res = json.loads(src.read_text())
    if note:
        res["note"] = note
    dst = ROOT / "benchmarks" / "results"
    for t in res["tables"]:
        if (src.parent / t["png"]).exists() and src.parent.resolve() != dst.resolve():
            shutil.copyfile(src.parent / t["png"], dst / t["png"])
    save_results("gpu", res)
    m, bk = res["machine"], res["backend"]
    lines = ["## GPU: latency tables and gallery indexing throughput (issue 4)", "",
             f"Machine: {m['gpu']} ({machine_line({k: v for k, v in m.items() if k != 'gpu'})}). Backend: {bk['backend']} "
             f"({bk['runtime']} {bk['runtime_version']}, {bk['precision']}). Script: "
             "`benchmarks/bench_gpu.py` on a lent GPU machine. TensorRT was not installed there, so "
             "these are the torch-cuda backend's figures (eager PyTorch, CUDA-event timing)."
             + (f" {res['note']}" if res.get("note") else ""), "",
             "| input | ops | build s | n | calibrated MAPE % | within 10 % | Spearman | additive MAPE % "
             "| FLOPs Spearman | measured range ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in res["tables"]:
        v = t["validation"]
        lines.append(f"| {t['input_size']} px | {t['ops']} | {t['build_s']:.0f} | {v['n']} | {v['mape_pct']} | "
                     f"{v['within_10pct']} | {v['spearman']} | {v['additive']['mape_pct']} | "
                     f"{v['flops_spearman']} | {v['measured_range_ms'][0]:.3f}-{v['measured_range_ms'][1]:.3f} |")
    lines += ["", "Gallery indexing throughput (EmbeddingNet: timm backbone + 256-d head, 224 px RGB):", "",
              "| backbone | precision | batch 1 img/s | batch 32 img/s | batch 256 img/s |", "|---|---|---|---|---|"]
    for r in res["throughput"]:
        lines.append(f"| {r['backbone']} | {r['precision']} | {r['1']['images_per_s']:.0f} | "
                     f"{r['32']['images_per_s']:.0f} | {r['256']['images_per_s']:.0f} |")
    by = {(r["backbone"], r["precision"]): r for r in res["throughput"]}
    half = [f"{b} {by[b, 'fp16']['1']['images_per_s'] / by[b, 'fp32']['1']['images_per_s']:.2f}x" for b, p in by
            if p == "fp32" and (b, "fp16") in by]
    lines += ["", "Eager PyTorch at batch 1 is bound by kernel launches: the subnets span only "
              f"{res['tables'][0]['validation']['measured_range_ratio']}x in latency on the GPU"
              + (f", and fp16 at batch 1 runs at {', '.join(half)} fp32's images/s" if half else "")
              + "; the engine path (TensorRT) is what a deployment on this GPU would use, and it was "
              "not installable there."]
    log = src.parent.parent / "train_cuda.log"
    if log.exists():
        res["train_cuda_log"] = log.read_text()
        save_results("gpu", res)
    if res.get("train_cuda_log"):
        lines += ["", "Training on the GPU (the same code path as on the CPU), as it printed:",
                  "", "```", res["train_cuda_log"].strip(), "```"]
    lines += [""] + [f"![gpu {t['input_size']} px](benchmarks/results/{t['png']})" for t in res["tables"]]
    update_benchmarks_md("gpu", "\n".join(lines))


if __name__ == "__main__":
    main()
