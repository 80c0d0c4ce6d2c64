"""Decoding a split part of image files: in memory vs the memory-mapped cache (``HWNAS_IMAGE_CACHE_MB``).

A class-folder data set of JPEGs (made here, or ``--data-dir`` of your own) is decoded at
``--size`` px RGB three ways, each in a fresh process: in memory (what parts under the
cache's size do), into the cache (its first load), and from the cache (every later load,
by any step or process). Each process then reads every row once, as a training epoch
does. Reported: the load's wall time, and the process's memory after the epoch, split into
private memory (RssAnon: a copy of its own per process) and file pages (RssFile: the page
cache's, shared by every process that maps the file and given back under memory pressure).

    python benchmarks/bench_data.py [--images 3000 --size 224] [--data-dir ROOT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, machine_line, save_results, update_benchmarks_md

CHILD = r"""
import json, os, sys, time
import numpy as np
from hwnas.data.images import Preprocess, materialize
from hwnas.data.sources import image_folder

root, cache, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
col = image_folder(root)
t = time.perf_counter()
arr = materialize(col, np.arange(len(col)), Preprocess(size=size, channels=3), cache_dir=cache, progress=False)
load_s = time.perf_counter() - t
t = time.perf_counter()
total = 0
for s in range(0, len(arr.images), 256):  # an epoch's reads, in batches
    total += int(arr.images[s:s + 256].sum(dtype=np.int64) % 7)
epoch_s = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda k: int(status[k].split()[0]) if k in status else None
print(json.dumps({"load_s": load_s, "epoch_s": epoch_s, "images": int(len(arr.images)),
                  "mapped": type(arr.images).__name__ == "memmap",
                  "rss_anon_mb": kb("RssAnon") / 1024, "rss_file_mb": kb("RssFile") / 1024,
                  "peak_rss_mb": kb("VmHWM") / 1024}))
"""


def make_images(root: Path, n: int, classes: int, size: int) -> None:
    """Smooth random JPEGs (quality 90) of a little more than ``size`` px, ``classes`` folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = int(size * 1.15)
    for i in range(n):
        d = root / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        img.save(d / f"img{i:05d}.jpg", quality=90)


def child(root: Path, cache: Path, size: int, threshold_mb: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HWNAS_IMAGE_CACHE_MB": threshold_mb, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(root), str(cache), str(size)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=30)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--data-dir", help="your own class folders (default: JPEGs made here)")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = Path(args.data_dir) if args.data_dir else tmp / "images"
        if not args.data_dir:
            make_images(root, args.images, args.classes, args.size)
        cache = tmp / "cache"
        for p in root.rglob("*"):  # every file read once first: no mode pays for the disk
            if p.is_file():
                p.read_bytes()
        rows = [{"mode": "in memory", **child(root, cache, args.size, "1e9")},
                {"mode": "into the cache (first load)", **child(root, cache, args.size, "0")},
                {"mode": "from the cache (later loads)", **child(root, cache, args.size, "0")}]
        disk = sum(p.stat().st_size for p in cache.iterdir())
    for r in rows:
        print(r, flush=True)
    mach = machine()
    n, size = rows[0]["images"], args.size
    res = {"machine": mach, "images": n, "size": size, "decoded_mb": n * 3 * size * size / 2**20,
           "cache_disk_mb": disk / 2**20, "source": args.data_dir or f"{args.images} JPEGs made by the script",
           "rows": rows, "wall_s": time.time() - t0}
    save_results("data", res)
    md = ["## Decoded images: in memory vs the memory-mapped cache (issue 7, scale)", "",
          f"Machine: {machine_line(mach)}. Script: `benchmarks/bench_data.py --images {args.images} --size {size}` "
          f"({res['wall_s']:.0f} s): {n} images ({res['source']}) decoded at {size} px RGB "
          f"({res['decoded_mb']:.0f} MB decoded; the cache file {res['cache_disk_mb']:.0f} MB), each way in a "
          "fresh process on one thread, which then reads every row once as an epoch does.", "",
          "| load | load s | images/s | epoch read s | private memory MB (RssAnon) | file pages MB (RssFile) | peak RSS MB |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['mode']} | {r['load_s']:.2f} | {r['images'] / r['load_s']:.0f} | {r['epoch_s']:.2f} | "
           f"{r['rss_anon_mb']:.0f} | {r['rss_file_mb']:.0f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    first, again = rows[1], rows[2]
    md += ["", f"A later load reads the cache {rows[0]['load_s'] / again['load_s']:.0f}x faster than decoding "
           f"({again['load_s']:.2f} vs {rows[0]['load_s']:.2f} s; the file was in the page cache, as it is "
           "between one step and the next on a machine with the memory for it; from disk an epoch reads "
           "it at the disk's speed), and holds "
           f"{rows[0]['rss_anon_mb'] - again['rss_anon_mb']:.0f} MB less private memory: the images are file "
           "pages, one copy for every process that maps them (query.jobs, torchrun ranks), which the kernel "
           f"can drop and read again when memory runs short. The first load took "
           f"{first['load_s'] / rows[0]['load_s']:.2f}x the time of an in-memory decode here. Parts of at least "
           "`HWNAS_IMAGE_CACHE_MB` (default 1024) MB of image files go to the cache; smaller ones, and "
           "IDX/zip sources, decode in memory."]
    update_benchmarks_md("data", "\n".join(md))


if __name__ == "__main__":
    main()
