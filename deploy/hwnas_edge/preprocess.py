"""Image preprocessing: the single definition used in training (hwnas imports it) and on
the edge, so the two can never drift apart.

convert to L or RGB -> resize the shorter side to ``size`` (bilinear) -> center-crop to
``size x size`` -> uint8 (C, H, W); then ``normalize``: /255, minus mean, over std.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESIZE_RULE = "shorter-side-bilinear+center-crop"
#: the file suffixes read as images (training, the deploy catalog, hwnas-edge add)
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})


# Resized whole, a long thin image (1 x 1,000,000 pixels: a 2 KB PNG) grows to gigabytes
# before its centre is cropped. Past this many pixels only the crop's part is resized:
# the same sampling positions, but Pillow's box resize rounds differently (within one grey
# level in half of 3,000 random images), so images under it, every real one, keep the exact
# whole-image pixels that the preprocessing key names.
_WHOLE_RESIZE_MAX_PIXELS = 1 << 24


def _to_8bit(img):
    """A 16-bit, 32-bit or float grey image as 8-bit grey, rescaled. Pillow's ``convert``
    clips these instead (a 16-bit PNG turns nearly all white, a float image in [0, 1] black)."""
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257.0  # the full 16-bit range onto 0..255
    else:  # "I" (a 16-bit PNG may open so) or "F": the range the values use
        hi = float(a.max()) if a.size else 0.0
        if img.mode == "F" and hi <= 1.0:
            a = a * 255.0
        elif hi > 255:
            a = a * (255.0 / (65535.0 if hi <= 65535 else hi))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def image_to_array(img, size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 array (channels, size, size)."""
    from PIL import Image

    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if nw * nh <= _WHOLE_RESIZE_MAX_PIXELS:
            img = img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
        else:  # only the crop's part resized: the same sampling positions, pixels within one level
            sx, sy = w / nw, h / nh
            img = img.resize((size, size), Image.BILINEAR,
                             box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32, scaled to [0, 1] and normalized."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / 255.0) - m) / s
