"""Small shared helpers: atomic writes, stable hashing, JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hwnas.errors import HwnasError


def stable_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace) used for content hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(stable_json(obj).encode()).hexdigest()[:n]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside ``path`` to write to. On success it replaces ``path`` in one
    rename; on any failure (Ctrl-C and a kill's KeyboardInterrupt included) it is removed,
    so neither a half-written file nor a stray temp file is left. The name is unique, so
    several workers may write the same file at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; artifacts get the usual umask mode
        fd = os.open(tmp, os.O_RDONLY)  # on disk before the rename: after a power loss the
        try:  # name holds the old file or the new one, never an empty one
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# what a writer killed outright (SIGKILL, a power cut) leaves: atomic_path's temp files
# (mkstemp: 8 of [a-z0-9_]), and the one safetensors (0.5 and later) writes its file through
# before renaming it to the name it was given (Rust's tempfile: ".tmp" and 6 letters or digits)
_LEFT_BY_A_KILL = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")


def remove_left_temps(folder: str | os.PathLike) -> tuple[int, int]:
    """Remove the temp files that writes into ``folder`` cut off by a kill left there: (how
    many, their bytes). Only for a folder that no other process writes to now (its training
    lock held): a live writer's temp file would go from under it."""
    n = size = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # (none yet, not a folder, not readable: nothing to do here)
        return 0, 0
    for e in entries:
        if _LEFT_BY_A_KILL.fullmatch(e.name) and e.is_file(follow_symlinks=False):
            try:
                size += e.stat(follow_symlinks=False).st_size
                os.unlink(e.path)
                n += 1
            except OSError:  # (gone meanwhile, or not ours to remove: left)
                pass
    return n, size


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, rename.

    A reader (or a killed writer) never sees a half-written file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # (atomic_path syncs it)
        f.write(data)
    return Path(path)


def _file_mode() -> int:
    """0666 less the process umask: what open() would have given the file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, given_as: str | None = None, fix: str | None = None) -> Any:
    """A JSON file hwnas wrote; a damaged one (cut off by a full disk, edited by hand) is an
    error naming it and the fix, not a decoder traceback. ``given_as`` names what the user
    passed it as (e.g. "a latency table"): a file of the user's that is not JSON is the wrong
    file, not one to delete so hwnas writes it anew. ``fix``: what to do about a damaged one,
    where deleting it would not bring it back."""
    from hwnas.errors import HwnasError

    if Path(path).is_dir():
        raise HwnasError(f"{path} is a folder, not {given_as or 'a JSON file'}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if given_as:
                raise HwnasError(f"{path} is not {given_as} (not valid JSON: {e})") from None
            raise HwnasError(f"{path} is damaged (not valid JSON: {e}); " + (fix or (
                "restore it, or delete it and run the command again: hwnas writes it anew"))) from None


def place_labels(ax, points, labels, fontsize: float = 7, marker_pts: float = 6) -> None:
    """Annotate each of ``points`` (data coordinates) with its label, at the first of eight
    offsets around the marker whose text box overlaps no label placed before it and no other
    marker, and stays inside the axes (a fixed offset wrote labels over neighbouring markers
    where models cluster); failing that, where it clashes least. Call after the axes' limits
    and scales are final."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # positions and text sizes in display units
    renderer = fig.canvas.get_renderer()
    disp = ax.transData.transform(points)
    r = marker_pts * fig.dpi / 72
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in disp]
    offsets = [(5, -11), (5, 4), (-5, 4), (-5, -11), (0, 9), (0, -16), (12, -3), (-12, -3)]
    frame = ax.get_window_extent(renderer)
    placed: list = []
    for i, ((x, y), text) in enumerate(zip(points, labels)):
        best = None
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            a = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx, dy),
                            textcoords="offset points", ha=ha)
            box = a.get_window_extent(renderer)
            clash = sum(box.overlaps(b) for b in placed) + sum(
                box.overlaps(m) for j, m in enumerate(markers) if j != i)
            # (a label across the axes' edge is cut off or runs into the legend)
            clash += not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
            if best is None or clash < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clash, a, box)
            else:
                a.remove()
            if clash == 0:
                break
        placed.append(best[2])


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:  # (atomic_path's unique temp name: several search workers may write one plot at once)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def bars_off(off: bool = False) -> bool | None:
    """tqdm's ``disable`` for a progress bar: off when asked, or in one of several trainings
    that share a terminal (``HWNAS_NO_BARS``, set by :func:`hwnas.compat.api.train_many`: their
    per-epoch lines say the rate and ETA), else tqdm's own choice (off where not a terminal)."""
    return True if off or os.environ.get("HWNAS_NO_BARS") else None


def env_world_size() -> int:
    """The process count torchrun set in ``WORLD_SIZE`` (unset or empty: 1); anything but a
    whole number >= 1 is an error naming it."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise HwnasError(f"WORLD_SIZE is {raw!r}, not a process count: unset it to run as one "
                         "process (torchrun sets it for each of the processes it starts)")
    return world
