"""A deployment bundle, read without PyTorch.

Layout (written by ``hwnas deploy``)::

    manifest.json        versions, sha256 of every artifact, fingerprints, index factory,
                         accuracies, latency, parity figures
    query.onnx           the edge query model (metadata: preprocessing, fingerprints)
    query.int8.onnx      optional static-QDQ int8 query model
    gallery.onnx         the gallery model
    gallery.plan         optional TensorRT engine
    gallery.index        FAISS index of the gallery embeddings (inner product)
    gallery_items.json   index row -> image id, label, path
    parity_probe.npz     a few preprocessed images with reference (PyTorch) embeddings
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from hwnas_edge.preprocess import image_to_array, normalize

BUNDLE_FORMAT = "hwnas-bundle-v1"


class BundleError(Exception):
    """A bundle that is missing, tampered with, or used with the wrong model."""


# what every reader of the manifest relies on (dotted: nested keys)
MANIFEST_KEYS = ("artifacts", "embed_dim", "preprocess.size", "preprocess.channels",
                 "preprocess.mean", "preprocess.std", "query.fingerprint", "gallery.fingerprint")


# the files a reader of a whole bundle uses, which its manifest must list (and so hash);
# of the query side's alone (a device whose gallery a service searches), query.onnx
CORE_ARTIFACTS = ("query.onnx", "gallery.index", "gallery_items.json", "parity_probe.npz")
# every file deploy may write: one of them present but unlisted was slipped in (or its entry
# taken out), so its hash is checked by nothing
KNOWN_ARTIFACTS = CORE_ARTIFACTS + ("query.int8.onnx", "gallery.onnx", "gallery.plan")


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the types of a manifest's fields that readers use (a hand edit, a
    damaged file), or None."""
    def num(x) -> bool:
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            return False
        try:
            return bool(np.isfinite(float(x)))
        except OverflowError:  # (an integer beyond any float)
            return False

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    arts = m["artifacts"]
    if not isinstance(arts, dict):
        return f"artifacts is a {type(arts).__name__}, not a mapping of file names to their sha256"
    for name, a in arts.items():
        if not (isinstance(a, dict) and isinstance(a.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", a["sha256"])):
            return f"artifacts[{name!r}] has no sha256 (64 hex digits): {a!r}"
    if not count(m["embed_dim"]):
        return f"embed_dim is {m['embed_dim']!r}, not a whole number >= 1"
    pre = m["preprocess"]
    if not count(pre["size"]):
        return f"preprocess.size is {pre['size']!r}, not a whole number >= 1"
    if pre["channels"] not in (1, 3) or isinstance(pre["channels"], bool):
        return f"preprocess.channels is {pre['channels']!r}, not 1 or 3"
    for k in ("mean", "std"):
        v = pre[k]
        if not (isinstance(v, list) and len(v) in (1, pre["channels"]) and all(num(x) for x in v)
                and (k == "mean" or all(x > 0 for x in v))):  # (one value: every channel's)
            return (f"preprocess.{k} is {v!r}, not one number or {pre['channels']}"
                    + (" above 0" if k == "std" else "") + " (one per channel)")
    for k in ("query", "gallery"):
        if not isinstance(m[k]["fingerprint"], str):
            return f"{k}.fingerprint is {m[k]['fingerprint']!r}, not a string"
    lat = m.get("latency")
    threads = ((lat.get("measured_onnxruntime_cpu") or {}) if isinstance(lat, dict) else {})
    threads = threads.get("threads") if isinstance(threads, dict) else None
    if threads is not None and not count(threads):
        return f"latency.measured_onnxruntime_cpu.threads is {threads!r}, not a whole number >= 1"
    return None


def _has(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``| head`` stopped early): what a
    BrokenPipeError means only then (one from a socket or a child's pipe is an error)."""
    try:
        sys.stdout.flush()  # (what the failed write left in the buffer fails again)
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        import select

        poll = select.poll()  # (a pipe without a reader polls as an error on its write end)
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # (no poll, or stdout is no file)
        return False


def reader_gone() -> int:
    """A command's output piped into a reader that stopped early (:func:`stdout_gone`): stdout
    goes to the null device, so the interpreter's last flush raises nothing either, and the
    exit status is a pipe's (128 + SIGPIPE), without a traceback."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # (stdout is no file: nothing is flushed to it at exit)
        pass
    return 141


def first_line(e: Exception) -> str:
    """An exception's first message line (native libraries append pages of context), without
    the C++ function and source location FAISS puts before its own words ("Error in
    <function> at <file>:<line>: <words>")."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text.splitlines()[0])


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"cannot read the bundle's {what} {path}: {e}; deploy the bundle "
                          "again (or restore it from where it was copied)") from None


@contextlib.contextmanager
def bundle_lock(path: Path, doing: str = "changing"):
    """One writer at a time per bundle (``.NAME.lock`` beside it; ``hwnas-edge add``, ``hwnas
    deploy``): a second would start from the same bundle and its swap would drop the first
    one's work. Where the file system has no locks (some network mounts), none is taken."""
    import os

    try:
        import fcntl
    except ImportError:  # (not POSIX)
        yield
        return
    path = Path(path).resolve()  # one lock file however the bundle is named (a symlink, ".")
    lock = path.parent / f".{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # read-only, never truncated; readable and writable by all, so that a deploy by the
        # training user and an add by the service's user share it
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise BundleError(f"cannot open the lock file {lock} ({e.strerror or e}); {doing} {path} needs "
                          "to create or read it: check that folder's permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BundleError(f"{path} is locked by another hwnas-edge add or hwnas deploy ({lock}); wait "
                              f"for it to finish, then run this again") from None
        except OSError:  # ENOLCK / EOPNOTSUPP: a file system without locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def replace_dir(staging: Path, out: Path) -> None:
    """Put the finished folder ``staging`` in the place of ``out``: the old one is moved aside
    (``.NAME.old``) and removed only once the new one is in place, so a reader never finds
    half a bundle; if the second rename fails or is interrupted, the old one goes back."""
    import shutil

    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old"
    if old.is_symlink() or old.is_file():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile, ...
        raise BundleError(f"ONNX Runtime cannot load {path}: {first_line(e)}; deploy the bundle again") from None


def _same_value(recorded: str, want) -> bool:
    """Whether a model's metadata value (a string: a number, or a JSON list of numbers) is
    the manifest's ``want``."""
    if isinstance(want, (list, int, float)) and not isinstance(want, bool):
        try:
            a = np.atleast_1d(np.asarray(json.loads(recorded), dtype=float))
        except (ValueError, TypeError):
            return False
        b = np.atleast_1d(np.asarray(want, dtype=float))
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=0))
    return str(recorded) == str(want)


class Bundle:
    def __init__(self, path: str | Path, check_hashes: bool = True, query_only: bool = False):
        """``query_only``: the device embeds only (its gallery searched by a service), so it
        need carry, and have checked, only the query side's files (``query*.onnx``)."""
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            old = self.path.parent / f".{self.path.name}.old"
            if not self.path.exists() and (old / "manifest.json").exists():
                raise BundleError(f"{self.path} is missing and {old} holds a bundle: a replacement of "
                                  f"it was stopped half-way; move {old} back to {self.path}")
            if self.path.is_file() and (self.path.parent / "manifest.json").is_file():
                raise BundleError(f"{self.path} is a file of a bundle; give the bundle's folder, {self.path.parent}")
            raise BundleError(f"{self.path} is not an hwnas bundle (no manifest.json"
                              + ("" if self.path.exists() else ": it does not exist") + "); create one "
                              "with `hwnas deploy`")
        self.manifest = _read_json(mpath, "manifest")
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != BUNDLE_FORMAT:
            got = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise BundleError(f"{mpath} has format {got!r}, expected {BUNDLE_FORMAT!r}")
        missing = [k for k in MANIFEST_KEYS if not _has(self.manifest, k)]
        if missing:
            raise BundleError(f"{mpath} lacks {', '.join(missing)}: it is damaged or was not "
                              "written by `hwnas deploy`; deploy the bundle again")
        problem = _manifest_problem(self.manifest)
        if problem:
            raise BundleError(f"{mpath}: {problem}: it is damaged or was edited by hand; deploy the "
                              "bundle again")
        self._check = check_hashes
        self._checked: set[str] = set()
        if check_hashes:
            bad = self.check_hashes(query_only)
            if bad:
                raise BundleError(f"{self.path}: artifacts do not match the manifest: {'; '.join(bad)}")
        self.pre = self.manifest["preprocess"]
        self._session = None
        self._index = None
        self._items = None

    # ---------------------------------------------------------------- integrity
    def check_hashes(self, query_only: bool = False, names: Sequence[str] | None = None) -> list[str]:
        """What is wrong with the bundle's files against the manifest's list and hashes: every
        listed file (``query_only``: query.onnx alone; ``names``: those), the core files
        listed, and none of deploy's files lying there unlisted."""
        arts = self.manifest["artifacts"]
        if names is None:
            names = ["query.onnx"] if query_only else list(arts)
            bad = [f"{n} is not listed in the manifest (an entry taken out: nothing would check "
                   "that file)" for n in (("query.onnx",) if query_only else CORE_ARTIFACTS) if n not in arts]
            if not query_only:
                bad += [f"{n} lies in the bundle but is not listed in the manifest" for n in KNOWN_ARTIFACTS
                        if n not in arts and n not in CORE_ARTIFACTS and (self.path / n).exists()]
        else:
            bad = []
        for name in names:
            if name not in arts:
                continue
            p = self.path / name
            if not p.exists():
                bad.append(f"{name} is missing")
            elif sha256_file(p) != arts[name]["sha256"]:
                bad.append(f"{name} has changed (sha256 mismatch)")
            else:
                self._checked.add(name)
        return bad

    @property
    def query_fingerprint(self) -> str:
        return self.manifest["query"]["fingerprint"]

    @property
    def gallery_fingerprint(self) -> str:
        return self.manifest["gallery"]["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    # ---------------------------------------------------------------- query side
    @property
    def query_threads(self) -> int | None:
        """The intra-op thread count the query model was measured at when deployed (the
        latency table's; on small inputs one thread is the fastest on a 2-core CPU), or None
        (ONNX Runtime's default) for bundles that do not record it."""
        m = (self.manifest.get("latency") or {}).get("measured_onnxruntime_cpu") or {}
        return m.get("threads")

    def session(self, int8: bool = False, threads: int | None = None):
        """The query model's session, at ``threads`` intra-op threads (default: the deployed
        thread count, :attr:`query_threads`)."""
        name = "query.int8.onnx" if int8 else "query.onnx"
        if int8 and name not in self.manifest["artifacts"]:
            raise BundleError(f"{self.path} has no int8 query model (deploy with --int8)")
        if threads is not None and threads < 1:
            raise BundleError(f"threads must be 1 or more, not {threads}")
        if self._check and name not in self._checked:  # (a device that embeds only checked query.onnx)
            bad = self.check_hashes(names=[name])
            if bad:
                raise BundleError(f"{self.path}: artifacts do not match the manifest: {'; '.join(bad)}")
        if self._session is None or int8 or threads is not None:
            s = ort_session(self.path / name, threads or self.query_threads)
            meta = s.get_modelmeta().custom_metadata_map
            if meta.get("gallery_fingerprint") != self.gallery_fingerprint:
                raise BundleError(f"{name} is compatible with gallery {meta.get('gallery_fingerprint')} "
                                  f"but this index was built by gallery {self.gallery_fingerprint}")
            # the model's own record of what it is and takes, against the manifest's: an edited
            # normalisation would give wrong neighbours with no error
            for key, want in (("query_fingerprint", self.query_fingerprint), ("input_size", self.pre["size"]),
                              ("channels", self.pre["channels"]), ("embed_dim", self.dim),
                              ("mean", self.pre["mean"]), ("std", self.pre["std"])):
                if key in meta and not _same_value(meta[key], want):
                    raise BundleError(f"{name} records {key} {meta[key]} but the manifest says {want}: "
                                      "the two come from different deployments, or the manifest was "
                                      "edited; deploy the bundle again")
            if int8 or threads is not None:
                return s
            self._session = s
        return self._session

    def load_images(self, paths: Sequence) -> np.ndarray:
        """Image files (paths, or :class:`hwnas_edge.sources.ZipImage` members) as the model's
        uint8 input."""
        from PIL import Image, UnidentifiedImageError

        from hwnas_edge.sources import ZipImage

        out = []
        for p in paths:
            try:
                with Image.open(p.open() if isinstance(p, ZipImage) else p) as img:
                    img.load()
                    out.append(image_to_array(img, self.pre["size"], self.pre["channels"]))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                raise BundleError(f"cannot read image {p}: {e}") from None
        return np.stack(out)

    def embed(self, images_u8: np.ndarray, int8: bool = False, threads: int | None = None) -> np.ndarray:
        s = self.session(int8, threads)
        x = normalize(images_u8, self.pre["mean"], self.pre["std"])
        out = [s.run(None, {s.get_inputs()[0].name: x[i:i + 256]})[0] for i in range(0, len(x), 256)]
        return np.concatenate(out).astype(np.float32)

    # ---------------------------------------------------------------- gallery side
    @property
    def index(self):
        if self._index is None:
            import faiss

            try:
                self._index = faiss.read_index(str(self.path / "gallery.index"))
            except RuntimeError as e:
                raise BundleError(f"FAISS cannot read {self.path / 'gallery.index'} ({first_line(e)}); "
                                  "deploy the bundle again") from None
            if self._index.d != self.dim:
                raise BundleError(f"gallery.index has dimension {self._index.d}, manifest says {self.dim}")
        return self._index

    @property
    def items(self) -> list[dict]:
        if self._items is None:
            items = _read_json(self.path / "gallery_items.json", "gallery items")  # (kept once checked)
            if not isinstance(items, list) or len(items) != self.index.ntotal:
                raise BundleError(f"{self.path / 'gallery_items.json'} does not list the index's "
                                  f"{self.index.ntotal} rows; deploy the bundle again")
            bad = next((i for i, it in enumerate(items) if not (
                isinstance(it, dict) and isinstance(it.get("id"), str) and "label" in it
                and (it["label"] is None or isinstance(it["label"], str)))), None)
            if bad is not None:
                raise BundleError(f"{self.path / 'gallery_items.json'} row {bad} is {items[bad]!r}, not an "
                                  "item with a string id and a label (a string or null); deploy the "
                                  "bundle again")
            self._items = items
        return self._items

    def search(self, emb: np.ndarray, k: int = 5) -> list[list[dict]]:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise BundleError(f"embeddings must have shape (n, {self.dim}), got {emb.shape}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.maximum(norms, 1e-12)
        k = max(1, min(int(k), self.index.ntotal))
        scores, rows = self.index.search(emb, k)
        out = []
        for srow, rrow in zip(scores, rows):
            out.append([{**self.items[int(r)], "score": float(s)} for s, r in zip(srow, rrow) if r >= 0])
        return out

    # ---------------------------------------------------------------- parity
    def parity(self) -> dict:
        """Re-run the probe images through query.onnx (and gallery.onnx) and compare with the
        reference PyTorch embeddings stored at deploy time."""
        import zipfile

        try:  # (allow_pickle off, as np.load's default: the probe holds arrays alone)
            with np.load(self.path / "parity_probe.npz") as z:
                probe = {k: z[k] for k in z.files}  # (a damaged member fails here, not later)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise BundleError(f"cannot read {self.path / 'parity_probe.npz'} ({first_line(e)}); "
                              "deploy the bundle again") from None
        out = {}
        for side, onnx_name in (("query", "query.onnx"), ("gallery", "gallery.onnx")):
            if f"{side}_reference" not in probe:
                continue
            s = ort_session(self.path / onnx_name)
            x = normalize(probe[f"{side}_images"], self.pre["mean"], self.pre["std"])
            y = s.run(None, {s.get_inputs()[0].name: x})[0]
            ref = probe[f"{side}_reference"]
            cos = (y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
            out[side] = {"n": int(len(y)), "min_cosine": float(cos.min()),
                         "max_abs_diff": float(np.abs(y - ref).max())}
        return out


def verify(path: str | Path, min_cosine: float = 0.9999) -> dict:
    """Hashes of every artifact, then ONNX-vs-reference parity; raises BundleError on failure."""
    b = Bundle(path, check_hashes=True)
    par = b.parity()
    for side, p in par.items():
        if not p["min_cosine"] >= min_cosine:  # (a NaN output fails too)
            raise BundleError(f"{side}.onnx parity failed: min cosine {p['min_cosine']:.6f} < {min_cosine}")
    b.session()  # metadata fingerprint check
    len(b.items)  # the index and its rows load
    return {"bundle": str(path), "artifacts": len(b.manifest["artifacts"]), "hashes": "ok",
            "parity": par, "query_fingerprint": b.query_fingerprint,
            "gallery_fingerprint": b.gallery_fingerprint}
