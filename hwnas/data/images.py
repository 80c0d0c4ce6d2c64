"""Decoding and preprocessing: one definition shared by training, evaluation and export.

``Preprocess`` is recorded with every model (and in the exported ONNX metadata), so the edge
runtime can reproduce it exactly: convert to L or RGB, resize the shorter side to ``size``
(bilinear), center-crop to ``size x size``, scale to [0, 1], normalize with mean/std.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hwnas.data.sources import Collection
from hwnas.errors import DataError, HwnasError
from hwnas.utils import bars_off


@dataclass(frozen=True)
class Preprocess:
    size: int = 32
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, self.channels):
                raise DataError(f"preprocess {name} {list(v)} must have "
                                f"{'1 value' if self.channels == 1 else f'1 or {self.channels} values'} "
                                f"(one per input channel; space.in_channels is {self.channels}): set "
                                f"data.{name} to match")
        if any(s <= 0 for s in self.std):
            raise DataError(f"preprocess std {list(self.std)} must be positive")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        from hwnas_edge.preprocess import RESIZE_RULE

        d["resize"] = RESIZE_RULE
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = {k: v for k, v in d.items() if k != "resize"}
        return cls(**d)

    def image_to_array(self, img) -> np.ndarray:
        """PIL image -> uint8 array (C, size, size), exactly as the edge runtime does it."""
        from hwnas_edge.preprocess import image_to_array

        return image_to_array(img, self.size, self.channels)

    def normalize(self, x):
        """uint8 (N, C, H, W) torch tensor or numpy array -> normalized float32."""
        if isinstance(x, np.ndarray):
            from hwnas_edge.preprocess import normalize

            return normalize(x, self.mean, self.std)
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


@dataclass
class ImageArray:
    """Decoded images of one part: uint8 (N, C, H, W), labels, and which indices survived."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray  # indices into the collection
    skipped: list[str]

    def ids(self, col: Collection) -> list[str]:
        return [col.ids[i] for i in self.indices]


#: the EXIF tag of a camera's orientation (1: as stored; 2-8: mirrored and/or rotated)
EXIF_ORIENTATION = 0x0112


def _turned(img) -> bool:
    """Whether an image carries a camera orientation other than as stored. A damaged EXIF
    block (Pillow raises SyntaxError or ValueError, or warns) is no orientation: the pixels
    decode, and only this note reads it."""
    import warnings

    if not hasattr(img, "getexif"):  # (a collection of arrays)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = img.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:
            return False
    return value in range(2, 9)


def check_readable(col: Collection, indices: Sequence[int], skip_bad: bool = False, progress: bool = True,
                   desc: str = "check images", what: str = "the split", of: int | None = None,
                   log=None) -> list[str]:
    """Open and decode every image of ``indices`` once, before anything trains on them, so a
    broken file or a manifest row naming no file stops a run at its start rather than at the
    step that first reads it (hours later at scale). All unreadable images are named at once
    (a DataError) unless ``skip_bad``; then their ids are returned (later steps leave them out).
    ``what`` names the images in the message, ``of`` how many it has (default ``len(indices)``).
    ``log``: told how many images carry an EXIF orientation, which preprocessing does not apply
    (training and the edge alike read the pixels as stored)."""
    from tqdm import tqdm

    bad: list[tuple[str, str]] = []
    turned: list[str] = []
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    for i in tqdm(indices, desc=desc, unit="img", disable=bars_off(not progress or len(indices) < 2000),
                  mininterval=1.0, leave=False):
        try:
            img = col.read(int(i))
        except DataError as e:
            bad.append((col.ids[int(i)], str(e)))
            continue
        if log is not None and _turned(img):
            turned.append(col.ids[int(i)])
    if turned:
        log(f"[data] NOTE: {len(turned)} image{'s carry' if len(turned) > 1 else ' carries'} a camera "
            f"orientation tag (EXIF; e.g. {turned[0]}), which hwnas does not apply: training and the edge "
            "read the pixels as stored, so such photos are seen on their side. If your queries come "
            "upright, rotate these files upright first (e.g. exiftran -ai, or mogrify -auto-orient)")
    if bad and not skip_bad:
        named = ", ".join(b for b, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} of {of or len(indices)} images of {what} cannot be read ({named}); "
                        f"the first: {bad[0][1]}")
    return [b for b, _ in bad]


IMAGE_CACHE_ENV = "HWNAS_IMAGE_CACHE_MB"
IMAGE_CACHE_MB = 1024  # decoded parts at least this large are cached on disk, memory-mapped


def image_cache_bytes() -> int:
    """The size from which a decoded part goes to the disk cache (``HWNAS_IMAGE_CACHE_MB``)."""
    text = os.environ.get(IMAGE_CACHE_ENV, str(IMAGE_CACHE_MB))
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise DataError(f"{IMAGE_CACHE_ENV}={text!r} must be a number of megabytes >= 0 (0: cache "
                        f"every part of a data set of image files; default {IMAGE_CACHE_MB})")
    return int(mb * 2**20)


def materialize(
    col: Collection,
    indices: Sequence[int],
    pre: Preprocess,
    skip_bad: bool = False,
    desc: str = "decode",
    progress: bool = True,
    cache_dir=None,
) -> ImageArray:
    """Decode and preprocess ``indices`` of ``col`` into one uint8 array (progress bar).

    An unreadable image raises a DataError naming it, unless ``skip_bad``: then it is left
    out and listed in ``skipped``.

    ``cache_dir``: a part of image files (a class folder or a manifest) whose decoded images
    take at least :func:`image_cache_bytes` is decoded once into a file there and memory-
    mapped (:func:`_cached`): later steps and processes read it rather than decoding again,
    and a data set larger than the memory trains from the page cache."""
    indices = np.asarray(indices, dtype=np.int64)
    row = pre.channels * pre.size * pre.size
    if cache_dir is not None and col.paths is not None and len(indices) * row >= image_cache_bytes():
        return _cached(col, indices, pre, skip_bad, desc, progress, Path(cache_dir))
    out = np.empty((len(indices), pre.channels, pre.size, pre.size), np.uint8)
    kept, skipped = _decode_into(out, col, indices, pre, skip_bad, desc, progress)
    if not skipped:  # (a masked copy took 0.6 s and a second copy's memory for 400 images at 224 px)
        return ImageArray(out, col.labels[indices], indices, skipped)
    return ImageArray(out[kept], col.labels[indices[kept]], indices[kept], skipped)


def _decode_into(out, col: Collection, indices: np.ndarray, pre: Preprocess, skip_bad: bool, desc: str,
                 progress: bool, compact: bool = False) -> tuple[np.ndarray, list[str]]:
    """Decode ``indices`` into the rows of ``out``: (which were readable, ids of those not).
    ``compact``: readable images fill the first rows in turn (else row j is image j)."""
    from tqdm import tqdm

    kept = np.ones(len(indices), bool)
    skipped: list[str] = []
    it = tqdm(range(len(indices)), desc=desc, unit="img", disable=bars_off(not progress or len(indices) < 2000),
              mininterval=1.0, leave=False)
    n = 0
    for j in it:
        i = int(indices[j])
        try:
            out[n if compact else j] = pre.image_to_array(col.read(i))
            n += 1
        except DataError:
            if not skip_bad:
                raise
            kept[j] = False
            skipped.append(col.ids[i])
    return kept, skipped


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


def _cache_part(meta_p: Path) -> str | None:
    from hwnas.utils import read_json

    try:
        return read_json(meta_p).get("part")
    except (HwnasError, OSError, AttributeError):
        return None


def _cached(col: Collection, indices: np.ndarray, pre: Preprocess, skip_bad: bool, desc: str,
            progress: bool, cache_dir: Path) -> ImageArray:
    """The decoded images of ``indices`` from ``cache_dir`` (decoded into it on a miss): raw
    uint8 rows, ``images-KEY.u8``, memory-mapped copy-on-write, with ``images-KEY.json``
    (rows, skipped images). KEY covers the images (ids, and each file's size and mtime: a
    file replaced or edited decodes afresh), the preprocessing and the skipping. Written
    atomically, the data before the record, so a kill leaves no cache that reads as whole."""
    from hwnas.utils import atomic_path, content_hash, read_json, write_json

    shape = (pre.channels, pre.size, pre.size)
    what = {"source": col.name, "preprocess": pre.to_dict(), "skip_bad": skip_bad}
    part = content_hash({**what, "ids": [col.ids[i] for i in indices]}, 16)  # these images, however stamped
    key = content_hash({**what, "files": [(col.ids[i], *_file_stamp(col.paths[i])) for i in indices]}, 16)
    data_p, meta_p = cache_dir / f"images-{key}.u8", cache_dir / f"images-{key}.json"
    meta = None
    if meta_p.exists() and data_p.exists():
        try:
            meta = read_json(meta_p)
            if (data_p.stat().st_size != meta["rows"] * int(np.prod(shape))
                    or not isinstance(meta["left_out"], list) or not isinstance(meta["skipped"], list)):
                meta = None
        except (HwnasError, KeyError, TypeError, ValueError):  # damaged: decoded again
            meta = None
    if meta is None:
        with atomic_path(data_p) as tmp:
            mm = np.memmap(tmp, np.uint8, mode="w+", shape=(max(len(indices), 1), *shape))
            kept, skipped = _decode_into(mm, col, indices, pre, skip_bad, desc, progress, compact=True)
            mm.flush()
            del mm
            os.truncate(tmp, int(kept.sum()) * int(np.prod(shape)))  # (the skipped images' rows)
        meta = {"rows": int(kept.sum()), "shape": list(shape), "left_out": np.flatnonzero(~kept).tolist(),
                "skipped": skipped, "part": part}
        write_json(meta_p, meta)
        for old in cache_dir.glob("images-*.json"):  # the same part decoded before its files changed
            if old != meta_p and _cache_part(old) == part:
                old.unlink(missing_ok=True)
                old.with_suffix(".u8").unlink(missing_ok=True)
    kept = np.ones(len(indices), bool)
    kept[np.asarray(meta["left_out"], np.int64)] = False
    images = (np.memmap(data_p, np.uint8, mode="c", shape=(meta["rows"], *shape)) if meta["rows"]
              else np.empty((0, *shape), np.uint8))
    return ImageArray(images, col.labels[indices[kept]], indices[kept], list(meta["skipped"]))

