"""Decoding and preprocessing: one definition shared by training, evaluation and export.

``Preprocess`` is recorded with every model (and in the exported ONNX metadata), so the edge
runtime can reproduce it exactly: convert to L or RGB, resize the shorter side to ``size``
(bilinear), center-crop to ``size x size``, scale to [0, 1], normalize with mean/std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from hwnas.data.sources import Collection
from hwnas.errors import DataError
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
                raise DataError(f"preprocess {name} {list(v)} must have 1 or {self.channels} values")
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


def check_readable(col: Collection, indices: Sequence[int], skip_bad: bool = False, progress: bool = True,
                   desc: str = "check images") -> list[str]:
    """Open and decode every image of ``indices`` once, before anything trains on them, so a
    broken file or a manifest row naming no file stops a run at its start rather than at the
    step that first reads it (hours later at scale). All unreadable images are named at once
    (a DataError) unless ``skip_bad``; then their ids are returned (later steps leave them out)."""
    from tqdm import tqdm

    bad: list[tuple[str, str]] = []
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    for i in tqdm(indices, desc=desc, unit="img", disable=bars_off(not progress or len(indices) < 2000),
                  mininterval=1.0, leave=False):
        try:
            col.read(int(i))
        except DataError as e:
            bad.append((col.ids[int(i)], str(e)))
    if bad and not skip_bad:
        named = ", ".join(b for b, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} of {len(indices)} images of the split cannot be read ({named}); "
                        f"the first: {bad[0][1]}")
    return [b for b, _ in bad]


def materialize(
    col: Collection,
    indices: Sequence[int],
    pre: Preprocess,
    skip_bad: bool = False,
    desc: str = "decode",
    progress: bool = True,
) -> ImageArray:
    """Decode and preprocess ``indices`` of ``col`` into one uint8 array (progress bar).

    An unreadable image raises a DataError naming it, unless ``skip_bad``: then it is left
    out and listed in ``skipped``."""
    from tqdm import tqdm

    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), pre.channels, pre.size, pre.size), np.uint8)
    kept = np.ones(len(indices), bool)
    skipped: list[str] = []
    it = tqdm(range(len(indices)), desc=desc, unit="img", disable=bars_off(not progress or len(indices) < 2000),
              mininterval=1.0, leave=False)
    for j in it:
        i = int(indices[j])
        try:
            out[j] = pre.image_to_array(col.read(i))
        except DataError:
            if not skip_bad:
                raise
            kept[j] = False
            skipped.append(col.ids[i])
    return ImageArray(out[kept], col.labels[indices[kept]], indices[kept], skipped)
