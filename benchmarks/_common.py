"""Shared helpers for benchmark scripts: machine description, results files, BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hwnas.utils import atomic_write_text, write_json  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import numpy
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("faiss", "onnxruntime", "timm", "optuna"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    return info


def machine_line(m: dict) -> str:
    libs = ", ".join(f"{k} {m[k]}" for k in ("torch", "faiss", "onnxruntime", "timm") if k in m)
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']}, {m['cores']} cores{gpu}, Python {m['python']}, {libs}; measured {m['date']}"


def se_points(p: float, n: int) -> float:
    """One binomial standard error, in points, of a recall@1 of ``p`` (a fraction) over ``n`` queries."""
    return 100 * (p * (1 - p) / max(1, n)) ** 0.5


def run_config(path: str | Path):
    """A config whose run directory, if relative, is taken from the project root (where
    `hwnas run` puts it), not from where the benchmark is started."""
    from hwnas.config import load_config

    cfg = load_config(path)
    if not Path(cfg.run_dir).is_absolute():
        cfg.run_dir = str(ROOT / cfg.run_dir)
    return cfg


def save_results(name: str, results: dict) -> Path:
    return write_json(ROOT / "benchmarks" / "results" / f"{name}.json", results)


def update_benchmarks_md(section: str, markdown: str) -> Path:
    """Replace (or append) the section between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEvery figure here is written by a script under `benchmarks/` "
        "(results also in `benchmarks/results/*.json`). Re-run with `make bench`.\n"
    )
    block = f"<!-- begin:{section} -->\n{markdown.strip()}\n<!-- end:{section} -->"
    pat = re.compile(rf"<!-- begin:{re.escape(section)} -->.*?<!-- end:{re.escape(section)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    return path


def compat_table(rows: list[dict], label: str, label_of, digits: int = 1) -> list[str]:
    """Markdown lines: one query model per row with M(g,g), M(q,g), M(q,q) (recall@1, in %),
    M(q,g) mAP, the gap to the paragon in points and the training minutes."""
    f = f".{digits}f"
    lines = [f"| query model | {label} | MFLOPs | M(g,g) R@1 | M(q,g) R@1 | M(q,q) R@1 | M(q,g) mAP "
             "| gap to M(g,g) (points) | train min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pts = [100 * r[k] for k in ("M(g,g)_r1", "M(q,g)_r1", "M(q,q)_r1", "M(q,g)_mAP")]
        pts.append(100 * (r["M(g,g)_r1"] - r["M(q,g)_r1"]))
        lines.append(f"| {r['model']} | {label_of(r)} | {r['mflops']:.2f} | "
                     + " | ".join(format(v, f) for v in pts) + f" | {r['train_s'] / 60:.1f} |")
    return lines


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
