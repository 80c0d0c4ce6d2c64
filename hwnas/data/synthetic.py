"""Procedural images without labels, for the label-free loss parts (``data.unlabeled``).

The query model learns to match the frozen gallery model on whatever images it is shown;
images that are neither training nor test images widen what it matches on. When a domain
has few such images, a procedural source can stand in: here, *strokes* — handwriting-like
pen strokes (1-4 smooth Catmull-Rom curves through random points, most starting on an
earlier stroke, black on white, drawn at Omniglot's 105 px with its 5-6 px pen). Measured on
Omniglot open-set (BENCHMARKS.md, recipe-omniglot): they move the query model's M(q,g)
toward the paragon's. They are for handwriting, sketches and glyphs; for natural images
bring a folder of your own unlabeled images instead.

Image ``i`` of ``strokes:N[:SEED]`` depends only on (SEED, i): the set is reproducible and
a larger N extends a smaller one.
"""

from __future__ import annotations

import numpy as np

from hwnas.errors import DataError

STROKES = "strokes"
STROKES_VERSION = 1  # bump when the drawing changes (models record the spec and fingerprint)


def is_synthetic(spec: str) -> bool:
    return str(spec).split(":", 1)[0] == STROKES


def parse_spec(spec: str) -> tuple[int, int]:
    """``strokes:N`` or ``strokes:N:SEED`` -> (N, SEED)."""
    parts = str(spec).split(":")
    try:
        if parts[0] != STROKES or len(parts) not in (2, 3):
            raise ValueError
        n, seed = int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise DataError(f"data.unlabeled entry {spec!r} is not a synthetic source: write "
                        "strokes:N or strokes:N:SEED (N images, e.g. strokes:2400)") from None
    if not 1 <= n <= 1_000_000 or seed < 0:
        raise DataError(f"data.unlabeled {spec!r}: in strokes:N:SEED, N must be 1 to 1,000,000 "
                        "and SEED at least 0")
    return n, seed


def _curve(pts: np.ndarray, steps: int = 12) -> list[tuple[float, float]]:
    """A Catmull-Rom spline through ``pts`` (end points repeated), as a polyline."""
    p = np.vstack([pts[0], pts, pts[-1]])
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        seg = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                     + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)
        out.extend(map(tuple, seg))
    out.append(tuple(pts[-1]))
    return out


def stroke_image(seed: int, i: int, size: int = 105):
    """Image ``i`` of the strokes source with ``seed``: a 1-bit PIL image, black on white."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([STROKES_VERSION, seed, i])
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    lo, hi = 0.2 * size, 0.8 * size
    width = int(rng.integers(5, 7)) * size // 105 or 1
    drawn: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(1, 5))):
        start = (np.asarray(drawn[rng.integers(len(drawn))]) if drawn and rng.random() < 0.7
                 else rng.uniform(lo, hi, 2))
        pts = [start]
        for _ in range(int(rng.integers(2, 5))):
            pts.append(np.clip(pts[-1] + rng.normal(0, 0.3 * size, 2), lo, hi))
        line = _curve(np.array(pts))
        drawn += line
        draw.line(line, fill=0, width=width, joint="curve")
        r = width / 2
        for x, y in (line[0], line[-1]):  # round pen ends
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
    return img.convert("1")


def strokes_collection(spec: str):
    """The :class:`~hwnas.data.sources.Collection` of ``strokes:N[:SEED]`` (drawn lazily)."""
    from hwnas.data.sources import Collection

    n, seed = parse_spec(spec)
    ids = [f"{STROKES}-v{STROKES_VERSION}-s{seed}/{i:06d}" for i in range(n)]
    return Collection(f"unlabeled:{spec}", ids, np.zeros(n), ["unlabeled"],
                      read=lambda i: stroke_image(seed, i), info={"source": spec})
