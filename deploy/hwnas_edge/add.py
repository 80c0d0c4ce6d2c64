"""Grow a deployed index: embed new gallery images with the bundle's ``gallery.onnx`` and add
them to ``gallery.index`` (``hwnas-edge add``), without PyTorch and without rebuilding.

The index's kind is kept (Flat, IVF: its trained lists take the new vectors, HNSW); the
bundle is rewritten beside itself and swapped in whole, so a kill leaves the old bundle as
it was and a reader never sees half of it. A running ``hwnas-edge serve`` loads the grown
bundle at its next request (:class:`hwnas_edge.service.LiveBundle`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hwnas_edge.bundle import Bundle, BundleError, ort_session, replace_dir, sha256_file
from hwnas_edge.preprocess import IMAGE_EXTS, normalize


def image_sources(sources: Sequence[str | Path], label: str | None = None) -> list[tuple[Path, str, str | None]]:
    """(file, id, label) of every image ``sources`` name: an image file (id: its name), a
    folder (every image under it at any depth; id: the folder's name / the path under it), or
    a CSV manifest with a ``path`` column and an optional ``label`` column (paths relative to
    the CSV; id: the path as written). ``label`` labels what a manifest does not."""
    out: list[tuple[Path, str, str | None]] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                           and not f.name.startswith("."))
            if not files:
                raise BundleError(f"{p} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            out += [(f, f"{p.name}/{f.relative_to(p).as_posix()}", label) for f in files]
        elif p.suffix.lower() == ".csv" and p.is_file():
            with open(p, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
            if not rows or "path" not in rows[0]:
                raise BundleError(f"manifest {p} needs a header row with a path column (and, if you "
                                  "like, a label column) and at least one row")
            for r in rows:
                rel = (r.get("path") or "").strip()
                if rel:
                    lab = (r.get("label") or "").strip() or label
                    out.append((Path(rel) if Path(rel).is_absolute() else p.parent / rel, rel, lab))
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.append((p, p.name, label))
        else:
            raise BundleError(f"{src} is not an image file, a folder of images or a CSV manifest "
                              f"(image suffixes: {', '.join(sorted(IMAGE_EXTS))})")
    return out


def _progress(done: int, total: int, t0: float) -> None:
    if not sys.stderr.isatty():
        return
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    print(f"\radd: {done}/{total} images, {rate:.0f} img/s, ETA {eta:.0f} s", end="", file=sys.stderr,
          flush=True)


def add_images(path: str | Path, sources: Sequence[str | Path], label: str | None = None,
               skip_bad: bool = False, chunk: int = 256, log: Callable = print) -> dict:
    """Add the images of ``sources`` (:func:`image_sources`) to the bundle at ``path``; returns
    what was added. Ids already in the index, or given twice, are refused before anything is
    embedded; an unreadable image stops the addition unless ``skip_bad``, then it is left
    out and named in the result."""
    import faiss

    b = Bundle(path)  # hashes checked: never grow a bundle that has been tampered with
    if "gallery.onnx" not in b.manifest["artifacts"]:
        raise BundleError(f"{b.path} has no gallery.onnx to embed new images with; deploy the bundle again")
    entries = image_sources(sources, label)
    have = {it["id"] for it in b.items}
    seen: set[str] = set()
    dup = [i for _, i, _ in entries if i in have or i in seen or seen.add(i)]
    if dup:
        raise BundleError(f"{len(dup)} image id(s) are already in the index or given twice (e.g. "
                          f"{', '.join(dup[:3])}); leave them out, or rename them")
    sess = ort_session(b.path / "gallery.onnx")
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("gallery_fingerprint") != b.gallery_fingerprint:
        raise BundleError(f"gallery.onnx is gallery {meta.get('gallery_fingerprint')} but the index was "
                          f"built by gallery {b.gallery_fingerprint}; deploy the bundle again")
    index, items = b.index, list(b.items)
    name = sess.get_inputs()[0].name
    skipped: list[str] = []
    t0 = time.time()
    for start in range(0, len(entries), chunk):
        part = entries[start:start + chunk]
        arrays, kept = [], []
        for f, id_, lab in part:
            try:
                arrays.append(b.load_images([f])[0])
                kept.append((f, id_, lab))
            except BundleError:
                if not skip_bad:
                    raise BundleError(f"cannot read image {f}; fix or remove it, or pass --skip-bad-images "
                                      "to leave unreadable images out") from None
                skipped.append(str(f))
        if kept:
            x = normalize(np.stack(arrays), b.pre["mean"], b.pre["std"])
            emb = np.ascontiguousarray(sess.run(None, {name: x})[0], dtype=np.float32)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            index.add(emb)
            items += [{"row": len(items) + j, "id": id_, "label": lab, "path": os.path.abspath(f)}
                      for j, (f, id_, lab) in enumerate(kept)]
        _progress(min(start + chunk, len(entries)), len(entries), t0)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    added = len(items) - len(b.items)
    if not added:
        raise BundleError(f"none of the {len(entries)} images could be read (e.g. {skipped[0]}); nothing added")

    staging = b.path.parent / f".{b.path.name}.adding"
    if staging.exists():  # a killed addition's leftovers
        import shutil

        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for f in b.path.iterdir():  # the files that do not change: linked, not copied
            if f.is_file() and f.name not in ("gallery.index", "gallery_items.json", "manifest.json"):
                try:
                    os.link(f, staging / f.name)
                except OSError:
                    import shutil

                    shutil.copy2(f, staging / f.name)
        faiss.write_index(index, str(staging / "gallery.index"))
        (staging / "gallery_items.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
        m = b.manifest
        for a in ("gallery.index", "gallery_items.json"):
            m["artifacts"][a] = {"sha256": sha256_file(staging / a), "bytes": (staging / a).stat().st_size}
        m["gallery"]["n_items"] = int(index.ntotal)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "added": added, "skipped": len(skipped),
                  "sources": [str(s) for s in sources], "n_items": int(index.ntotal)}
        m.setdefault("additions", []).append(record)
        (staging / "manifest.json").write_text(json.dumps(m, indent=1), encoding="utf-8")
        replace_dir(staging, b.path)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"added {added} images to {b.path} ({int(index.ntotal)} in the index"
        + (f"; {len(skipped)} unreadable left out, e.g. {skipped[0]}" if skipped else "") + ")")
    return {**record, "skipped_files": skipped}
