"""``hwnas deploy``: the bundle an edge device and a gallery server need.

Everything is written into a staging directory beside the target and renamed into place at
the end, so a failed deploy leaves no half bundle behind; every check's figures go into
``manifest.json``. See ``hwnas_edge.bundle`` for the layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from hwnas_edge.bundle import first_line

from hwnas.config import Config
from hwnas.errors import DataError, HwnasError
from hwnas.rundir import RunDir
from hwnas.utils import atomic_write_bytes, write_json

PARITY_MIN_COSINE = 0.9999
TRT_MIN_COSINE = 0.999  # the fp16 engine's embeddings against the fp32 graph


def default_factory(n: int) -> str:
    """Exact search while it is cheap, an inverted file beyond. On 1M x 128 vectors here,
    IVF4096,Flat (nprobe 16) gave recall@10 0.95 at 4,385 queries/s (batch 1) and built in
    31 s, where HNSW32 needed efSearch 128 for the same recall at 1,782 queries/s and
    built in 145 s (BENCHMARKS.md, deploy)."""
    if n <= 50_000:
        return "Flat"
    return f"IVF{int(4 * np.sqrt(n))},Flat"


def _search_params(index, nlist_probe_ratio: int = 256) -> dict:
    """Search-time parameters stored with the index (FAISS serializes nprobe/efSearch)."""
    import faiss

    params = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(8, ivf.nlist // nlist_probe_ratio)
        params["nprobe"] = int(ivf.nprobe)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = 128
        params["efSearch"] = 128
    return params


def make_index(d: int, factory: str):
    """An empty FAISS inner-product index of dimension ``d`` from a factory string; a string
    FAISS cannot parse is an error naming it (deploy checks it before exporting anything)."""
    import faiss

    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise HwnasError(f"FAISS cannot build index {factory!r}: {first_line(e)}; see "
                         "the FAISS index factory docs (e.g. Flat, HNSW32, IVF1024,Flat)") from None


def build_index(emb: np.ndarray, factory: str, use_gpu: bool | None = None) -> tuple[object, dict]:
    """A FAISS inner-product index from a factory string; built on the GPU when faiss-gpu and
    a GPU are present (and the index type supports it), always returned as a CPU index."""
    import faiss

    index = make_index(emb.shape[1], factory)
    info = {"factory": factory, "metric": "inner_product", "built_on": "cpu"}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if (use_gpu is None or use_gpu) and gpus > 0 and hasattr(faiss, "StandardGpuResources"):
        try:
            res = faiss.StandardGpuResources()
            g = faiss.index_cpu_to_gpu(res, 0, index)
            if not g.is_trained:
                g.train(emb)
            g.add(emb)
            index = faiss.index_gpu_to_cpu(g)
            info["built_on"] = "gpu"
        except RuntimeError as e:  # e.g. HNSW has no GPU version
            info["gpu_skipped"] = first_line(e)
    elif use_gpu:
        info["gpu_skipped"] = "faiss-gpu or a GPU is not present"
    if info["built_on"] == "cpu":
        if not index.is_trained:
            nlist = getattr(faiss.extract_index_ivf(index), "nlist", 0) if "IVF" in factory else 0
            if len(emb) < max(40, nlist):
                raise HwnasError(f"index {factory!r} needs training data: at least "
                                 f"{max(40, nlist)} items, and the gallery has {len(emb)}: use "
                                 f"--index Flat, or fewer lists (IVF{max(1, len(emb) // 39)},Flat)")
            try:
                index.train(emb)
            except RuntimeError as e:
                raise HwnasError(f"FAISS cannot train index {factory!r} on {len(emb)} gallery "
                                 f"items: {first_line(e)}; use --index Flat") from None
        index.add(emb)
    info["search_params"] = _search_params(index)
    return index, info


def _sha(path: Path) -> dict:
    from hwnas_edge.bundle import sha256_file

    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _ort_embed(sess, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _parity(ref: np.ndarray, got: np.ndarray) -> dict:
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {"n": int(len(ref)), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_diff": float(np.abs(ref - got).max())}


def _check_parity(what: str, p: dict, min_cosine: float, images: str, reference: str = "PyTorch") -> None:
    """Refuse an export whose outputs stray from the reference (a NaN anywhere fails too:
    ``not nan >= x``)."""
    if not p["min_cosine"] >= min_cosine:
        raise HwnasError(f"{what} differs from {reference}: min cosine {p['min_cosine']:.6f} < {min_cosine} "
                         f"on {p['n']} {images} (NaN: a non-finite output)")


def _versions() -> dict:
    import faiss
    import onnx
    import onnxruntime
    import timm
    import torch

    from hwnas import __version__

    return {"hwnas": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "faiss": faiss.__version__, "python": platform.python_version()}


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, input_name: str) -> None:
    """Static QDQ int8 quantization calibrated on training images (per-channel weights),
    after ORT's recommended pre-processing (shape inference, graph cleanup)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    prep = out.with_name(f".{out.stem}.prep.onnx")
    try:
        quant_pre_process(str(fp32), str(prep))
        quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    finally:
        prep.unlink(missing_ok=True)


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces a bundle (or an empty folder), nothing else: an ``--out`` that names
    a run directory or any other folder is refused before anything is built, never deleted."""
    from hwnas_edge.bundle import BUNDLE_FORMAT

    from hwnas.utils import read_json

    if not out.is_dir():
        raise HwnasError(f"{out} is a file, not a bundle folder: give another --out")
    entries = list(out.iterdir())
    if not entries:
        return
    fmt = None
    try:
        m = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else None
        fmt = m.get("format") if isinstance(m, dict) else None
    except (OSError, ValueError, HwnasError):
        pass
    if fmt != BUNDLE_FORMAT:
        raise HwnasError(f"{out} is not an hwnas bundle (no manifest.json of format {BUNDLE_FORMAT}) "
                         f"and holds {len(entries)} entries; --overwrite replaces only a bundle: give "
                         "hwnas deploy another --out, or move that folder away yourself")


def _gallery_runtime(staging: Path, g, shape: tuple) -> tuple[str, Callable, dict]:
    """The fastest runtime present for the gallery model: a TensorRT engine (written into the
    bundle as gallery.plan), else PyTorch on CUDA, else ONNX Runtime on the CPU (the bundle's
    gallery.onnx). Returns its name, a function from a normalized float32 batch (at most 256
    images) to embeddings, and the bundle's TensorRT record."""
    import torch

    from hwnas.latency.backends import TensorRTBackend

    reason = TensorRTBackend.unavailable_reason()
    if reason is None:
        from hwnas.export.tensorrt import TrtEngine, build_engine, fp16_supported

        plan = build_engine((staging / "gallery.onnx").read_bytes(), fp16=True,
                            input_shape=(256,) + shape[1:], max_batch=256)
        atomic_write_bytes(staging / "gallery.plan", plan)
        eng = TrtEngine(plan)
        return ("tensorrt", lambda x: eng.infer(torch.from_numpy(x).cuda()).cpu().numpy(),
                {"built": True, "fp16": fp16_supported()})
    if torch.cuda.is_available():
        net = g.net.cuda().eval()

        def run_cuda(x):
            with torch.no_grad():
                return net(torch.from_numpy(x).cuda()).cpu().numpy()

        return "torch-cuda", run_cuda, {"built": False, "skipped": reason}
    # its own session on every physical core: the parity session runs at the query models'
    # latency.threads (1 on small inputs), which would index a catalog on one core
    from hwnas.latency.backends import OrtCpuBackend

    gs = OrtCpuBackend().session((staging / "gallery.onnx").read_bytes())
    name = gs.get_inputs()[0].name
    return "onnxruntime-cpu", lambda x: gs.run(None, {name: x})[0], {"built": False, "skipped": reason}


def _embed_batches(fn: Callable, x: np.ndarray, desc: str, batch: int = 256) -> np.ndarray:
    from tqdm import tqdm

    return np.concatenate([fn(np.ascontiguousarray(x[i:i + batch]))
                           for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch",
                                         disable=None if len(x) > 2048 else True)])


def _unit(emb: np.ndarray) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def check_finite(emb: np.ndarray, what: str, runtime: str) -> None:
    """Embeddings bound for an index: a NaN or an infinity (an fp16 overflow, say) would be
    indexed unseen and never found, or found for everything."""
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        fix = ("deploy on ONNX Runtime (without TensorRT: its fp16 engine overflows) or check those images"
               if runtime == "tensorrt" else "check those images and the gallery model's weights")
        raise HwnasError(f"{int(bad.sum())} of {len(emb)} {what} embeddings from {runtime} are not finite "
                         f"(NaN or infinity; e.g. row {int(np.flatnonzero(bad)[0])}); {fix}")


def _embed_catalog(col, labels: list | None, pre, fn: Callable, skip_bad: bool, log: Callable,
                   chunk: int = 256, desc: str = "catalog embeddings",
                   what: str = "the catalog") -> tuple[np.ndarray, list[dict], list[str]]:
    """The gallery model's embeddings of a catalog, decoded and embedded ``chunk`` images at a
    time (a catalog larger than the memory is never held decoded), with the index's items."""
    from tqdm import tqdm

    from hwnas.data.images import check_readable, materialize

    parts, items, skipped = [], [], []
    bar = tqdm(total=len(col), desc=desc, unit="img", disable=None if len(col) > 2048 else True)
    for start in range(0, len(col), chunk):
        try:
            arr = materialize(col, np.arange(start, min(start + chunk, len(col))), pre, skip_bad, progress=False)
        except DataError:  # (not skip_bad) stop embedding; name every unreadable image left,
            bar.close()  # not one a run, so that one fix (or --skip-bad-images) does
            check_readable(col, range(start, len(col)), desc="check the rest of the catalog",
                           what=what, of=len(col))
            raise
        skipped += arr.skipped
        if len(arr.images):
            parts.append(fn(np.ascontiguousarray(pre.normalize(arr.images))))
            for i in arr.indices:
                items.append({"row": len(items), "id": col.ids[i],
                              "label": labels[i] if labels is not None else None,
                              "path": os.path.realpath(col.paths[i]) if col.paths else None})
        bar.update(min(chunk, len(col) - start))
    bar.close()
    if not items:
        raise HwnasError(f"no image of the catalog could be read ({len(skipped)} skipped, e.g. "
                         f"{skipped[0]}): nothing to index")
    if skipped:
        log(f"[deploy] catalog: {len(skipped)} unreadable images left out (e.g. {skipped[0]})")
    return _unit(np.concatenate(parts)), items, skipped


def _added_images(out: Path, drop: bool, skip_bad: bool, log: Callable) -> list[dict] | None:
    """The index items ``hwnas-edge add`` put in the bundle at ``out`` since it was deployed (its
    manifest's ``additions``: the last items), for the new bundle to embed again with the gallery
    model it ships; None where there are none (an empty folder), or with ``drop``. Their files
    are looked for now, before anything is exported: one gone (or a .zip's member, which records
    no path) is an error naming the choices, or with ``skip_bad`` left out (logged)."""
    from hwnas.utils import read_json

    if not (out / "manifest.json").is_file():
        return None
    try:
        m = read_json(out / "manifest.json")
        n = sum(int(a["added"]) for a in m.get("additions") or [])
        if drop:
            if n:
                log(f"[deploy] the {n} images hwnas-edge add put in {out} are left out (--drop-additions)")
            return None
        items = read_json(out / "gallery_items.json") if n else []
        if n > len(items):
            raise ValueError(f"{n} added images recorded but {len(items)} items")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, HwnasError) as e:
        if drop:
            return None
        raise HwnasError(f"cannot tell which images of {out} hwnas-edge add put there ({first_line(e)}); "
                         f"{DROP_FIX} to replace the bundle without them") from None
    if not n:
        return None
    added = items[len(items) - n:]
    lost = [(it["id"], "added from a .zip, which records no path" if not it.get("path") else
             f"{it['path']} is gone") for it in added if not it.get("path") or not os.path.isfile(it["path"])]
    if lost and not skip_bad:
        raise HwnasError(f"{out} holds {n} images added with hwnas-edge add; this deploy embeds them again "
                         f"with the gallery model it ships, but {len(lost)} cannot be read again (e.g. "
                         f"{lost[0][0]}: {lost[0][1]}): pass --skip-bad-images to leave those out, or "
                         f"{DROP_FIX} to leave all of them out (hwnas-edge add them again after)")
    if lost:
        log(f"[deploy] {len(lost)} of the {n} images hwnas-edge add put in {out} cannot be read again "
            f"(e.g. {lost[0][0]}: {lost[0][1]}): left out")
        gone = {i for i, _ in lost}
        added = [it for it in added if it["id"] not in gone]
    return added


# how to leave out the images hwnas-edge add put in a bundle a deploy replaces
DROP_FIX = "pass --drop-additions (hwnas deploy, hwnas run)"


def _new_added(added: list[dict], base: dict[str, str | None], log: Callable) -> list[dict]:
    """Of ``added`` (:func:`_added_images`), those the new index does not hold already: ``base``
    maps its own images' ids to their files. An image of the same file is left out; an id that
    names another file is an error (before anything is exported)."""
    have = set(filter(None, base.values()))
    again = [it for it in added if it["path"] in have]
    added = [it for it in added if it["path"] not in have]
    clash = [it for it in added if it["id"] in base]
    if clash:
        raise HwnasError(f"{len(clash)} image(s) hwnas-edge add put in the bundle have an id that names "
                         f"another image of the new index (e.g. {clash[0]['id']}: {clash[0]['path']}); "
                         f"{DROP_FIX} and add them again under other names")
    log(f"[deploy] {len(added)} images hwnas-edge add put in the bundle go into the new index, embedded "
        "again" + (f" ({len(again)} more are among its own images)" if again else ""))
    return added


def _embed_added(added: list[dict], emb: np.ndarray, items: list[dict], pre, fn: Callable, skip_bad: bool,
                 log: Callable) -> tuple[np.ndarray, list[dict], dict]:
    """The index's embeddings and items with ``added`` (:func:`_new_added`) after them, embedded
    by ``fn``, and the manifest's record of them."""
    from hwnas.data.sources import Collection, open_image

    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "added": 0, "existing": 0, "skipped": 0,
              "sources": ["embedded again by hwnas deploy from the bundle it replaced"]}
    if added:
        paths = [it["path"] for it in added]
        col = Collection("images added with hwnas-edge add", [it["id"] for it in added], [0] * len(added),
                         ["-"], read=lambda i: open_image(paths[i], paths[i]), paths=paths)
        try:
            e2, it2, skipped = _embed_catalog(col, [it.get("label") for it in added], pre, fn, skip_bad, log,
                                              desc="added images' embeddings", what="the added images")
        except DataError as e:
            raise DataError(f"{e}; or {DROP_FIX} to leave every added image out") from None
        emb = np.concatenate([emb, e2])
        items = items + [{**it, "row": len(items) + j} for j, it in enumerate(it2)]
        record.update(added=len(it2), skipped=len(skipped))
    record["n_items"] = len(items)
    return emb, items, record


def deploy(cfg: Config, out: str | Path | None = None, query: str | None = None,
           gallery: str | None = None, factory: str | None = None, int8: bool = False,
           overwrite: bool = False, catalog: str | None = None, drop_additions: bool = False,
           log: Callable = print) -> dict:
    """Export the run's query and gallery models, index the gallery (the test split's gallery
    part, or ``catalog``) and write the bundle at ``out`` (default RUN_DIR/bundle), checked and
    swapped in whole. A bundle there is replaced only with ``overwrite``; the images
    ``hwnas-edge add`` put in it go into the new one (:func:`_added_images`) unless
    ``drop_additions``."""
    from hwnas_edge.bundle import BundleError, bundle_lock

    rd = RunDir(cfg)
    # resolved: a symlink to the bundle (current -> v3) is followed, not replaced by a folder
    out = (Path(out) if out else rd.path / "bundle").resolve()
    old = out.parent / f".{out.name}.old"
    if not out.exists() and (old / "manifest.json").exists():  # (a swap stopped half-way)
        raise HwnasError(f"{out} is missing and {old} holds a bundle: a replacement of it was stopped "
                         f"half-way; move {old} back to {out}, then deploy again")
    lock = contextlib.ExitStack()  # no hwnas-edge add (or other deploy) swaps it meanwhile
    with lock:
        added, locked = None, out.exists()
        if locked:
            _check_replaceable(out)  # (a file, or a folder that is not a bundle: never replaced)
            if not overwrite:
                raise HwnasError(f"{out} exists; pass --overwrite to replace it (the old bundle stays until "
                                 "the new one is complete)")
            try:  # held from before its additions are read until the new bundle is in place
                lock.enter_context(bundle_lock(out, "deploying"))
            except BundleError as e:
                raise HwnasError(str(e)) from None
            added = _added_images(out, drop_additions, cfg.data.skip_bad_images, log)
        return _deploy(cfg, rd, out, query, gallery, factory, int8, catalog, added, lock, locked, log)


def _deploy(cfg: Config, rd: RunDir, out: Path, query: str | None, gallery: str | None, factory: str | None,
            int8: bool, catalog: str | None, added: list[dict] | None, lock: contextlib.ExitStack,
            locked: bool, log: Callable) -> dict:
    """:func:`deploy`, once ``out`` is checked (and locked where it exists)."""
    import torch
    from hwnas_edge.bundle import BUNDLE_FORMAT, BundleError, bundle_lock, replace_dir

    from hwnas.compat import api
    from hwnas.data.images import Preprocess
    from hwnas.export.onnx import export_onnx
    from hwnas.latency.backends import OrtCpuBackend, measure_models
    from hwnas.nn.models import load_gallery, load_query
    from hwnas.retrieval import evaluate

    if not query and not rd.path.is_dir():
        raise HwnasError(f"run directory {rd.path} does not exist; give the run directory the pipeline "
                         "trained in (--run-dir, or the config's run_dir)")
    qdir = Path(query) if query else rd.path / "query" / "searched"
    if not query and cfg.adapt.epochs:
        # gallery adaptation on: the adapted model is the one to ship, as hwnas run does
        from hwnas.pipeline import ADAPTED
        from hwnas.utils import read_json

        adir = rd.path / "query" / ADAPTED
        if not (adir / "config.json").exists():
            raise HwnasError(f"adapt.epochs is {cfg.adapt.epochs} but {adir} is not there yet: run "
                             "hwnas adapt first, or pass --query DIR to ship another model")
        src = qdir / "config.json"
        if src.exists() and read_json(adir / "config.json")["adapted"]["from"] != read_json(src)["fingerprint"]:
            raise HwnasError(f"{adir} was adapted from an earlier {qdir.name} model than the one there now: "
                             "run hwnas adapt again (--restart), or pass --query DIR")
        qdir = adir
        log(f"[deploy] shipping the adapted query model {qdir} (adapt.epochs > 0)")
    if not (qdir / "config.json").exists():
        have = sorted(p.name for p in (rd.path / "query").glob("*") if (p / "config.json").exists()) \
            if (rd.path / "query").exists() else []
        here = f" (trained here: {have})" if have else ""
        if query:  # the user's own folder
            raise HwnasError(f"no query model at {qdir} (--query): give a folder hwnas train-query or "
                             f"hwnas adapt wrote, with config.json and model.safetensors{here}")
        raise HwnasError(f"no query model at {qdir}; train one (hwnas train-query --from-search) or "
                         f"pass --query DIR{here}")
    gdir = Path(gallery) if gallery else rd.path / "gallery"
    g = load_gallery(gdir)
    qnet, qcfg = load_query(qdir)
    if qcfg.get("gallery_fingerprint") not in (None, g.fingerprint):
        raise HwnasError(f"query model {qdir} was trained against gallery {qcfg['gallery_fingerprint']} "
                         f"but {gdir} is gallery {g.fingerprint}: they are not compatible")
    if qcfg["embed_dim"] != g.config["embed_dim"]:
        raise HwnasError(f"query embed_dim {qcfg['embed_dim']} != gallery embed_dim {g.config['embed_dim']}")
    if factory:  # a bad --index fails now, not after both models are exported
        make_index(g.config["embed_dim"], factory)
    qpre = Preprocess.from_dict(qcfg["preprocess"])
    gpre = Preprocess.from_dict(g.config["preprocess"])
    if (qpre.size, qpre.channels, qpre.mean, qpre.std) != (gpre.size, gpre.channels, gpre.mean, gpre.std):
        raise HwnasError("query and gallery preprocessing differ; the bundle records one preprocessing")

    catalog = cfg.deploy.catalog if catalog is None else catalog
    if catalog:  # a missing or empty catalog fails now, before anything is exported
        from hwnas.data.sources import catalog_images

        cat, cat_labels = catalog_images(catalog)
        log(f"[deploy] catalog {catalog}: {len(cat)} images{' with labels' if cat_labels else ''}")
    splits = rd.splits(log=log)  # (read once: the additions' check, the parity images, the index)
    if added:  # against the new index's own images, before anything is exported
        if catalog:
            base = {i: os.path.realpath(p) for i, p in zip(cat.ids, cat.paths)} if cat.paths else dict.fromkeys(cat.ids)
        else:
            col = splits.collection
            base = {col.ids[i]: os.path.realpath(col.paths[i]) if col.paths else None for i in splits.parts["gallery"]}
        added = _new_added(added, base, log)

    staging = out.parent / f".{out.name}.staging"
    if not locked:  # (where there was a bundle, it is locked since its additions were read)
        try:
            lock.enter_context(bundle_lock(out, "deploying"))
        except BundleError as e:
            raise HwnasError(str(e)) from None
    t0 = time.time()
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        qi = api.load_part(rd, "query", qpre, log=log)
        gi = api.load_part(rd, "gallery", qpre, log=log)
        shape = (1, qpre.channels, qpre.size, qpre.size)
        meta = {"hwnas_format": "hwnas-query-v1", "input_size": qpre.size, "channels": qpre.channels,
                "mean": json.dumps(list(qpre.mean)), "std": json.dumps(list(qpre.std)),
                "resize": qpre.to_dict()["resize"], "embed_dim": qcfg["embed_dim"],
                "gallery_fingerprint": g.fingerprint, "query_fingerprint": qcfg["fingerprint"],
                "arch": qcfg.get("arch") or qcfg.get("timm")}
        log("[deploy] exporting query.onnx")
        atomic_write_bytes(staging / "query.onnx",
                           export_onnx(qnet, shape, dynamic_batch=True, metadata=meta))
        gmeta = {**meta, "hwnas_format": "hwnas-gallery-v1", "arch": g.config["backbone"]}
        log("[deploy] exporting gallery.onnx")
        atomic_write_bytes(staging / "gallery.onnx",
                           export_onnx(g.net, shape, dynamic_batch=True, metadata=gmeta))

        backend = OrtCpuBackend(threads=cfg.latency.threads)
        qs, gs = (backend.session((staging / n).read_bytes()) for n in ("query.onnx", "gallery.onnx"))
        # parity against PyTorch on real test images
        xq = qpre.normalize(qi.images.numpy())
        xg = qpre.normalize(gi.images.numpy())
        # each model on the images it embeds when deployed: test queries, test gallery images
        n_par, n_pg = min(256, len(xq)), min(256, len(xg))
        with torch.no_grad():
            ref_q = qnet.eval()(torch.from_numpy(xq[:n_par])).numpy()
            ref_g = g.net.eval()(torch.from_numpy(xg[:n_pg])).numpy()
        par_q = _parity(ref_q, _ort_embed(qs, xq[:n_par]))
        par_g = _parity(ref_g, onnx_g := _ort_embed(gs, xg[:n_pg]))
        _check_parity("query.onnx", par_q, PARITY_MIN_COSINE, "test query images")
        _check_parity("gallery.onnx", par_g, PARITY_MIN_COSINE, "test gallery images")
        n_probe = min(16, n_par, n_pg)
        np.savez(staging / "parity_probe.npz", query_images=qi.images[:n_probe].numpy(),
                 query_reference=ref_q[:n_probe], gallery_images=gi.images[:n_probe].numpy(),
                 gallery_reference=ref_g[:n_probe])
        log(f"[deploy] parity: query min cosine {par_q['min_cosine']:.7f}, gallery "
            f"{par_g['min_cosine']:.7f}")

        # gallery embeddings with the best runtime present, then the index
        runtime, embed_g, tensorrt = _gallery_runtime(staging, g, shape)
        g_emb = _unit(_embed_batches(embed_g, xg, "test gallery embeddings"))
        if runtime == "tensorrt":
            # what goes into the index, against the ONNX graph it was built from (fp16 strays a
            # little; an overflow or NaN would otherwise reach the index unseen)
            tensorrt["parity_vs_onnx"] = _parity(onnx_g, g_emb[:n_pg])
            _check_parity("the TensorRT gallery engine", tensorrt["parity_vs_onnx"], TRT_MIN_COSINE,
                          "test gallery images", reference="gallery.onnx")
        check_finite(g_emb, "test gallery", runtime)
        if catalog:
            idx_emb, items, skipped = _embed_catalog(cat, cat_labels, gpre, embed_g, cfg.data.skip_bad_images, log)
            check_finite(idx_emb, "catalog", runtime)
            index_source = {"catalog": str(catalog), "skipped": skipped}
        else:
            col = splits.collection
            where = {id_: i for i, id_ in enumerate(col.ids)}
            # real paths: a relative --data-dir meant the deploying shell's folder, nothing on a server
            items = [{"row": r, "id": id_, "label": col.class_names[int(lab)],
                      "path": os.path.realpath(col.paths[where[id_]]) if col.paths else None}
                     for r, (id_, lab) in enumerate(zip(gi.ids, gi.raw_labels))]
            idx_emb, index_source = g_emb, {"split": "test", "part": "gallery"}
        additions = None
        if added:  # the images hwnas-edge add put in the bundle this one replaces
            idx_emb, items, additions = _embed_added(added, idx_emb, items, gpre, embed_g,
                                                     cfg.data.skip_bad_images, log)
            check_finite(idx_emb, "added images'", runtime)
        factory = factory or default_factory(len(idx_emb))
        index, index_info = build_index(idx_emb, factory)
        index_info["source"] = index_source
        import faiss

        tmp = staging / ".gallery.index.tmp"
        faiss.write_index(index, str(tmp))
        tmp.replace(staging / "gallery.index")
        write_json(staging / "gallery_items.json", items)
        log(f"[deploy] {factory} index of {index.ntotal} gallery embeddings ({runtime}"
            + (f", catalog {catalog}" if catalog else "") + ")")

        # accuracies of what is deployed (ONNX models, FAISS exact kNN)
        qe_q, qe_g = _ort_embed(qs, xq), _ort_embed(qs, xg)
        ge_q = _ort_embed(gs, xq)
        ids = (qi.ids, gi.ids) if splits.shared_eval else (None, None)
        acc = {"M(g,g)": evaluate(ge_q, qi.raw_labels, g_emb, gi.raw_labels, query_ids=ids[0], gallery_ids=ids[1]),
               "M(q,g)": evaluate(qe_q, qi.raw_labels, g_emb, gi.raw_labels, query_ids=ids[0], gallery_ids=ids[1]),
               "M(q,q)": evaluate(qe_q, qi.raw_labels, qe_g, gi.raw_labels, query_ids=ids[0], gallery_ids=ids[1])}

        # latency on this CPU, next to the table's prediction
        runners = [backend.prepare_onnx_sessions((staging / "query.onnx").read_bytes(), shape)]
        int8_info = None
        if int8:
            log("[deploy] int8: static QDQ quantization calibrated on training images")
            from hwnas.data.images import materialize

            # 128 training images, decoded alone (not the whole training part: ~15 GB at 224 px
            # for 100k images)
            calib_ids = splits.parts["train"][np.random.default_rng(0).permutation(len(splits.parts["train"]))[:128]]
            arr = materialize(splits.collection, calib_ids, qpre, cfg.data.skip_bad_images, desc="int8 calibration")
            if arr.skipped:
                log(f"[deploy] int8: {len(arr.skipped)} unreadable calibration images skipped "
                    f"(e.g. {arr.skipped[0]}); calibrated on {len(arr.images)}")
            calib = qpre.normalize(arr.images)
            quantize_int8(staging / "query.onnx", staging / "query.int8.onnx", calib,
                          qs.get_inputs()[0].name)
            s8 = backend.session((staging / "query.int8.onnx").read_bytes())
            q8 = _ort_embed(s8, xq)
            m8 = evaluate(q8, qi.raw_labels, g_emb, gi.raw_labels, query_ids=ids[0], gallery_ids=ids[1])
            runners.append(backend.prepare_onnx_sessions((staging / "query.int8.onnx").read_bytes(), shape))
            int8_info = {"M(q,g)": m8, "delta_recall@1_points":
                         100 * (m8["recall@1"] - acc["M(q,g)"]["recall@1"]),
                         "parity_vs_fp32": _parity(qe_q, q8)}
        lat = measure_models(runners)
        measured = {"latency_ms": lat[0].latency_ms, "statistic": f"p10 of round medians, median of {len(lat[0].pools_ms)} pools, median of {len(lat[0].sessions_ms or [0])} sessions", "cv_pct": lat[0].cv_pct, "threads": backend.threads}
        if int8_info is not None:
            int8_info["latency_ms"] = lat[1].latency_ms
            int8_info["speedup"] = lat[0].latency_ms / lat[1].latency_ms
            int8_info["faster"] = bool(lat[1].latency_ms < lat[0].latency_ms * 0.97)
            log(f"[deploy] int8: {lat[1].latency_ms:.3f} ms vs fp32 {lat[0].latency_ms:.3f} ms "
                f"({'faster' if int8_info['faster'] else 'NOT faster'} here), M(q,g) R@1 change "
                f"{int8_info['delta_recall@1_points']:+.2f} points")
        predicted = None
        if qcfg["kind"] == "subnet":
            try:
                from hwnas.search.runner import predictor_for
                from hwnas.space import SearchSpace

                space = SearchSpace.from_dict(qcfg["space"])
                pred, tpath = predictor_for(cfg, space)
                predicted = {"ms": pred(space.parse(qcfg["arch"])), "table": str(tpath)}
            except HwnasError as e:
                predicted = {"skipped": str(e)}

        manifest = {
            "format": BUNDLE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": _versions(), "preprocess": qpre.to_dict(), "embed_dim": qcfg["embed_dim"],
            "query": {"fingerprint": qcfg["fingerprint"], "kind": qcfg["kind"],
                      "arch": qcfg.get("arch"), "timm": qcfg.get("timm"), "mflops": qcfg["flops"] / 1e6,
                      "source": str(qdir),
                      # gallery adaptation (hwnas adapt): what it was fine-tuned on, or None
                      "adapted": qcfg.get("adapted")},
            "gallery": {"fingerprint": g.fingerprint, "backbone": g.config["backbone"],
                        "source": str(gdir), "embeddings_runtime": runtime, "tensorrt": tensorrt,
                        "n_items": int(index.ntotal)},
            "index": index_info, "parity": {"query": par_q, "gallery": par_g,
                                            "min_cosine_required": PARITY_MIN_COSINE},
            "accuracy": {"split": "test", "metrics": acc},
            "latency": {"predicted": predicted, "measured_onnxruntime_cpu": measured},
            "int8": int8_info, "splits_fingerprint": splits.fingerprint,
        }
        if additions:
            manifest["additions"] = [additions]
        artifacts = [p for p in sorted(staging.iterdir()) if p.is_file() and not p.name.startswith(".")]
        manifest["artifacts"] = {p.name: _sha(p) for p in artifacts}
        write_json(staging / "manifest.json", manifest)
        replace_dir(staging, out)  # the old bundle (if any) goes only once the new one is complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.close()  # (the new bundle is in place: others may change it)
    log(f"[deploy] bundle {out} in {time.time() - t0:.0f} s: M(q,g) R@1 "
        f"{100 * acc['M(q,g)']['recall@1']:.2f} (paragon {100 * acc['M(g,g)']['recall@1']:.2f}), "
        f"query {measured['latency_ms']:.3f} ms measured"
        + (f" vs {predicted['ms']:.3f} ms predicted" if predicted and "ms" in predicted else ""))
    return manifest
