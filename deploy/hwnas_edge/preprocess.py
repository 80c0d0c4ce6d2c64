"""Image preprocessing: the single definition used in training (hwnas imports it) and on
the edge, so the two can never drift apart.

convert to L or RGB -> resize the shorter side to ``size`` (bilinear) -> center-crop to
``size x size`` -> uint8 (C, H, W); then ``normalize``: /255, minus mean, over std.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESIZE_RULE = "shorter-side-bilinear+center-crop"


def image_to_array(img, size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 array (channels, size, size)."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32, scaled to [0, 1] and normalized."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / 255.0) - m) / s
