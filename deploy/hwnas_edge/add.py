"""Grow a deployed index: embed new gallery images with the bundle's ``gallery.onnx`` and add
them to ``gallery.index`` (``hwnas-edge add``), without PyTorch and without rebuilding.

The index's kind is kept (Flat, IVF: its trained lists take the new vectors, HNSW); the
bundle is rewritten beside itself and swapped in whole, so a kill leaves the old bundle as
it was and a reader never sees half of it. A running ``hwnas-edge serve`` loads the grown
bundle at its next request (:class:`hwnas_edge.service.LiveBundle`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hwnas_edge.bundle import Bundle, BundleError, bundle_lock, ort_session, replace_dir, sha256_file
from hwnas_edge.preprocess import normalize
from hwnas_edge.sources import ZipChanged, ZipImage, image_sources


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _progress(done: int, total: int, t0: float) -> None:
    if not sys.stderr.isatty():
        return
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    print(f"\radd: {done}/{total} images, {rate:.0f} img/s, ETA {eta:.0f} s", end="", file=sys.stderr,
          flush=True)


def add_images(path: str | Path, sources: Sequence[str | Path], label: str | None = None,
               skip_bad: bool = False, skip_existing: bool = False, chunk: int = 256,
               log: Callable = print) -> dict:
    """Add the images of ``sources`` (:func:`hwnas_edge.sources.image_sources`: ids as
    ``hwnas deploy --catalog`` gives them) to the bundle at ``path``; returns what was added.
    Images the index holds (by their file where the bundle records files; by id where it does
    not, as for IDX data sets and .zip catalogs) are refused unless ``skip_existing`` (then
    left out, counted); an id the index gives another file here, and an id or a file given
    twice, always, before anything is embedded. An unreadable image stops the addition unless
    ``skip_bad``, then it is left out and named in the result."""
    path = Path(path).resolve()  # a symlink to the bundle is followed; "." works from inside
    if not (path / "manifest.json").is_file():
        Bundle(path)  # raises the error that says what the path is instead
    with bundle_lock(path, "adding to"):
        return _add(path, sources, label, skip_bad, skip_existing, chunk, log)


def _add(path: Path, sources, label, skip_bad: bool, skip_existing: bool, chunk: int, log: Callable) -> dict:
    import faiss

    b = Bundle(path)  # hashes checked: never grow a bundle that has been tampered with
    if "gallery.onnx" not in b.manifest["artifacts"]:
        raise BundleError(f"{b.path} has no gallery.onnx to embed new images with; deploy the bundle again")
    entries = image_sources(sources, label)
    # each image's file (a zip member: the zip's, then its name; it records no path)
    real = {i: (f"{os.path.realpath(f.zip)}:{f.name}" if isinstance(f, ZipImage) else os.path.realpath(f))
            for f, i, _ in entries}
    seen: set[str] = set()
    twice = [i for _, i, _ in entries if i in seen or seen.add(i)]
    if twice:
        raise BundleError(f"{len(twice)} image id(s) are given twice (e.g. {', '.join(twice[:3])}): ids are "
                          "paths under the folder or manifest given, so two sources hold files of one name; "
                          "give their common folder instead, or rename them")
    files: dict[str, str] = {}
    same = [(i, files[r]) for i, r in real.items() if r in files or files.setdefault(r, i) != i]
    if same:
        raise BundleError(f"{len(same)} image(s) are given twice under two names (e.g. {same[0][0]} and "
                          f"{same[0][1]}: a folder and its subfolder, or a link to a file beside it); give "
                          "each file once")
    # an image is in the index when its file is (its recorded path, as deploy and add write
    # it: no file-system calls per indexed item), or when its id is and the file recorded for
    # that id is gone, or unknown (a data set of IDX files, a .zip), or the same file elsewhere
    # (the bundle copied to another machine); an id whose recorded file is another file here
    # is a clash, not a repeat
    by_id = {it["id"]: it.get("path") for it in b.items}
    indexed = set(filter(None, by_id.values()))

    def known(f, i: str) -> bool:
        zipped = isinstance(f, ZipImage)
        if not zipped and (real[i] in indexed or os.path.abspath(f) in indexed):
            return True
        if i not in by_id:
            return False
        rec = by_id[i]  # (a zip member is known by its id alone: never the same file as one on disk)
        return not rec or not os.path.exists(rec) or (not zipped and os.path.samefile(rec, f))

    held = {i: known(f, i) for f, i, _ in entries}  # (file-system calls once per entry)
    clash = [(i, by_id[i]) for _, i, _ in entries if i in by_id and not held[i]]
    if clash:
        i, other = clash[0]
        raise BundleError(f"{len(clash)} image id(s) already name other images in the index (e.g. {i}: "
                          f"{other}); rename the new files, or add them from another folder level")
    old = [i for _, i, _ in entries if held[i]]
    if old and not skip_existing:
        raise BundleError(f"{len(old)} of the {len(entries)} images are already in the index (e.g. "
                          f"{', '.join(old[:3])}); pass --skip-existing to add only the new ones")
    gone = set(old)
    entries = [e for e in entries if e[1] not in gone]
    if not entries:
        log(f"nothing to add: all {len(old)} images are already in {b.path}")
        return {"added": 0, "existing": len(old), "skipped": 0, "skipped_files": [],
                "n_items": int(b.index.ntotal)}
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
        arrays, kept = [], []
        for f, id_, lab in entries[start:start + chunk]:
            try:
                arrays.append(b.load_images([f])[0])
                kept.append((f, id_, lab))
            except ZipChanged as e:  # (the whole zip's, not one image's: never skipped)
                raise BundleError(f"{e}: nothing was added; run hwnas-edge add again once it stays put") from None
            except BundleError as e:
                if not skip_bad:
                    why = str(e).split(f"{f}: ", 1)[-1]  # (load_images's own words, less the path)
                    raise BundleError(f"cannot read image {f} ({why}); fix or remove it, or pass "
                                      "--skip-bad-images to leave unreadable images out") from None
                skipped.append(str(f))
        if kept:
            x = normalize(np.stack(arrays), b.pre["mean"], b.pre["std"])
            emb = np.ascontiguousarray(sess.run(None, {name: x})[0], dtype=np.float32)
            if not np.isfinite(emb).all():
                raise BundleError("gallery.onnx gave a NaN or infinite embedding for one of "
                                  f"{kept[0][0]} to {kept[-1][0]}: nothing was added; check those images")
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            index.add(emb)
            items += [{"row": len(items) + j, "id": id_, "label": lab,
                       "path": None if isinstance(f, ZipImage) else real[id_]}
                      for j, (f, id_, lab) in enumerate(kept)]
        _progress(min(start + chunk, len(entries)), len(entries), t0)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    added = len(items) - len(b.items)
    if not added:
        raise BundleError(f"none of the {len(entries)} new images could be read (e.g. {skipped[0]}); "
                          "nothing added")

    staging = b.path.parent / f".{b.path.name}.adding"
    if staging.exists():  # a killed addition's leftovers (the lock says none runs now)
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for f in b.path.iterdir():  # what does not change: hard-linked, not copied
            if f.name in ("gallery.index", "gallery_items.json", "manifest.json"):
                continue
            if f.is_dir():
                shutil.copytree(f, staging / f.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(f, staging / f.name)
        faiss.write_index(index, str(staging / "gallery.index"))
        (staging / "gallery_items.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
        m = b.manifest
        for a in ("gallery.index", "gallery_items.json"):
            m["artifacts"][a] = {"sha256": sha256_file(staging / a), "bytes": (staging / a).stat().st_size}
        m["gallery"]["n_items"] = int(index.ntotal)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "added": added, "existing": len(old),
                  "skipped": len(skipped), "sources": [str(s) for s in sources], "n_items": int(index.ntotal)}
        m.setdefault("additions", []).append(record)
        (staging / "manifest.json").write_text(json.dumps(m, indent=1), encoding="utf-8")
        replace_dir(staging, b.path)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"cannot write the grown bundle beside {b.path} ({e}); the bundle is as it "
                          "was: free space or permissions, then add again") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"added {added} images to {b.path} ({int(index.ntotal)} in the index"
        + (f"; {len(old)} already there" if old else "")
        + (f"; {len(skipped)} unreadable left out, e.g. {skipped[0]}" if skipped else "") + ")")
    return {**record, "skipped_files": skipped}
