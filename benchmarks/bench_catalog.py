"""Indexing a catalog: `hwnas deploy --catalog` and `hwnas-edge add`, images per second and memory.

On a deployed bundle (default the quickstart's), a catalog of JPEGs (made here: smooth
random images a little over ``--size`` px, as photos arrive; or ``--data-dir`` of your own)
is embedded by the gallery model the way ``hwnas deploy --catalog`` does it (decode and
embed 256 at a time, ONNX Runtime on every core, here without a GPU), each way in a fresh
process; then ``hwnas-edge add`` (no PyTorch) grows a copy of the bundle by ``--add`` more
images and the grown bundle is verified. Reported: wall time, images/s and peak RSS.

    python benchmarks/bench_catalog.py [--bundle runs/quickstart/bundle --images 2000 --add 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, save_results, update_benchmarks_md
from bench_data import make_images

EMBED = r"""
import json, sys, time
import numpy as np
from hwnas_edge.bundle import Bundle
from hwnas.data.images import Preprocess
from hwnas.data.sources import catalog_images
from hwnas.export.deploy import _embed_catalog, _unit
from hwnas.latency.backends import OrtCpuBackend

bundle, root = Bundle(sys.argv[1]), sys.argv[2]
pre = Preprocess.from_dict(bundle.manifest["preprocess"])
t = time.perf_counter()
col, labels = catalog_images(root)
gs = OrtCpuBackend().session((bundle.path / "gallery.onnx").read_bytes())
name = gs.get_inputs()[0].name
emb, items, skipped = _embed_catalog(col, labels, pre, lambda x: gs.run(None, {name: x})[0], False, lambda *_: None)
wall = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"images": len(items), "wall_s": wall, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
                  "threads": OrtCpuBackend().threads}))
"""

ADD = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run([sys.executable, "-m", "hwnas_edge.cli", "add", *sys.argv[1:]], capture_output=True, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.exit(r.stderr)
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/quickstart/bundle")
    ap.add_argument("--images", type=int, default=2000, help="catalog images embedded as deploy does")
    ap.add_argument("--add", type=int, default=500, help="images hwnas-edge add puts into a copy of the bundle")
    ap.add_argument("--size", type=int, default=224, help="side of the JPEGs made here (px)")
    ap.add_argument("--data-dir", help="your own catalog folder (default: JPEGs made here)")
    args = ap.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").exists():
        sys.exit(f"{bundle} is not a bundle: run `hwnas run configs/quickstart.yaml` (or give --bundle)")
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'deploy'}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cat = Path(args.data_dir) if args.data_dir else tmp / "catalog"
        if not args.data_dir:
            make_images(cat, args.images, 20, args.size)
        new = tmp / "new"
        make_images(new, args.add, 5, args.size)
        for p in [*cat.rglob("*"), *new.rglob("*")]:  # read once first: neither pays for the disk
            if p.is_file():
                p.read_bytes()
        r = subprocess.run([sys.executable, "-c", EMBED, str(bundle), str(cat)], env=env,
                           capture_output=True, text=True, check=True)
        embed = json.loads(r.stdout.strip().splitlines()[-1])
        copy = tmp / "bundle"
        shutil.copytree(bundle, copy)
        from hwnas_edge.bundle import Bundle, verify

        n0 = Bundle(copy).index.ntotal
        r = subprocess.run([sys.executable, "-c", ADD, str(copy), str(new)], env=env,
                           capture_output=True, text=True, check=True)
        add = json.loads(r.stdout.strip().splitlines()[-1])
        grown = Bundle(copy)
        add.update(images=int(grown.index.ntotal) - n0, index_before=int(n0), index_after=int(grown.index.ntotal),
                   verified=verify(copy)["hashes"] == "ok", factory=grown.manifest["index"]["factory"])
    m = grown.manifest
    res = {"machine": machine(), "bundle": str(bundle), "gallery": m["gallery"]["backbone"],
           "input": f"{m['preprocess']['size']} px, {m['preprocess']['channels']} channel(s)",
           "source": args.data_dir or f"JPEGs of about {args.size} px made by the script",
           "embed": embed, "add": add, "wall_s": time.time() - t0}
    for k in ("embed", "add"):
        print(k, res[k], flush=True)
    save_results("catalog", res)
    md = ["## Indexing a catalog: `deploy --catalog` and `hwnas-edge add` (issue 6, scale)", "",
          f"Machine: {machine_line(res['machine'])}. Script: `benchmarks/bench_catalog.py --images {args.images} "
          f"--add {args.add}` ({res['wall_s']:.0f} s) on `{bundle}` (gallery {res['gallery']}, input "
          f"{res['input']}); the images: {res['source']}, decoded, resized and embedded by `gallery.onnx` on "
          f"ONNX Runtime ({embed['threads']} threads, no GPU), 256 at a time, each way in a fresh process.", "",
          "| what | images | wall s | images/s | peak RSS MB |", "|---|---|---|---|---|",
          f"| catalog embedding, as `hwnas deploy --catalog` does it | {embed['images']} | {embed['wall_s']:.1f} | "
          f"{embed['images'] / embed['wall_s']:.0f} | {embed['peak_rss_mb']:.0f} |",
          f"| `hwnas-edge add` into the bundle's {add['factory']} index ({add['index_before']} -> "
          f"{add['index_after']} items; a fresh process, no PyTorch) | {add['images']} | {add['wall_s']:.1f} | "
          f"{add['images'] / add['wall_s']:.0f} | {add['peak_rss_mb']:.0f} |", "",
          f"The grown bundle verifies (hashes and parity): {'yes' if add['verified'] else 'NO'}. `add`'s time "
          "includes its start (ONNX Runtime, FAISS), checking every artifact's hash before and writing the "
          "bundle beside itself after. Neither holds more than 256 decoded images at once, so the peak RSS is "
          "the libraries' (the deploy side imports PyTorch; `add` does not) and the embeddings', whatever "
          "the catalog's size."]
    update_benchmarks_md("catalog", "\n".join(md))


if __name__ == "__main__":
    main()
