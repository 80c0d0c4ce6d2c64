"""What a gallery's images are called and how a manifest of them is read: one definition for
``hwnas deploy --catalog`` (training side) and ``hwnas-edge add`` (server side), so an image
gets the same id from both and a repeat is recognized."""

from __future__ import annotations

import csv
import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

from hwnas_edge.bundle import BundleError
from hwnas_edge.preprocess import IMAGE_EXTS


def item_id(file: str | Path, root: str | Path, follow_links: bool = False) -> str:
    """An image's id: its path under ``root`` with forward slashes (the folder given, or a
    manifest's folder), however either is spelled (relative, absolute). ``follow_links``: how
    training data sets are named — symlinks resolved first; a file whose path lies under
    ``root`` but that resolves elsewhere (a linked class folder) keeps the path as given, as
    it always has, so recorded splits stay valid; a file outside ``root`` by its path (a
    manifest's ``../images/x.png``) is named by its resolved absolute path (it was once the
    path as typed, which changed with the working directory and let one file in twice under
    two spellings: :func:`legacy_item_id`). A catalog and hwnas-edge add do not follow
    links, and name a file outside ``root`` by its ``../`` path from it."""
    if follow_links:
        resolved = Path(file).resolve()
        try:
            return resolved.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
        try:
            rel = os.path.relpath(os.path.abspath(file), os.path.abspath(root))
        except ValueError:  # (another drive on Windows: outside)
            rel = os.pardir
        outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
        return resolved.as_posix() if outside else Path(file).as_posix()
    # (a file outside root: ../ steps from it, however either was spelled)
    return Path(os.path.relpath(os.path.abspath(file), os.path.abspath(root))).as_posix()


def legacy_item_id(file: str | Path, root: str | Path) -> str:
    """The id hwnas named a training image by before 2026-12-07 (``item_id(follow_links=True)``
    then): as now inside ``root``; outside it, the path as given. A split recorded with such ids
    is still read (:meth:`hwnas.data.splits.Splits.load`)."""
    try:
        return Path(file).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(file).as_posix()


def zip_image_names(zf: zipfile.ZipFile, suffixes=IMAGE_EXTS) -> list[str]:
    """The image members of an open zip (hidden files left out), sorted."""
    return sorted(n for n in zf.namelist()
                  if Path(n).suffix.lower() in suffixes and not Path(n).name.startswith("."))


def zip_item_id(zpath: str | Path, name: str) -> str:
    """A zip member's id: the zip's name without its suffix, then the member's path in it."""
    return f"{Path(zpath).stem}/{name}"


#: what reading one zip member can raise: a CRC error, a broken deflate stream, truncation,
#: encryption, an unsupported method, a name gone from a changed zip
ZIP_MEMBER_ERRORS = (KeyError, zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError)


class ZipChanged(Exception):
    """A zip replaced or changed since its members were listed: a whole-archive problem, not
    one image's (never skipped as an unreadable image); each caller words its own fix."""


class ZipArchive:
    """A zip's image members, listed once and read one at a time when asked: a zip larger than
    the memory is never held whole (each read decompresses one member). The archive stays
    open for this process's reads (ZipFile serializes concurrent reads of one archive; a
    forked worker opens its own). A zip replaced or changed since it was listed (one stat per
    read) raises :class:`ZipChanged` rather than read other images under the listed names; a
    damaged member raises one of :data:`ZIP_MEMBER_ERRORS`. Opening a file that is no zip
    raises ``zipfile.BadZipFile`` or ``OSError``: each caller words it."""

    def __init__(self, zpath: str | Path, suffixes=IMAGE_EXTS):
        self.path = Path(zpath)
        # stat first: a zip replaced between the two is then refused at the first read
        self._stamp = self._stat()
        self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
        self.names = zip_image_names(self._zf, suffixes)

    def _stat(self) -> tuple:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self, name: str) -> bytes:
        if self._pid != os.getpid():  # (a forked worker: its own handle, checked below like the first)
            try:
                self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
            except (zipfile.BadZipFile, OSError) as e:
                raise ZipChanged(f"{self.path} cannot be opened again ({e})") from None
        try:  # (after the open: a zip replaced before it, or between the two, differs here)
            same = self._stat() == self._stamp
        except OSError:
            same = False
        if not same:
            raise ZipChanged(f"{self.path} was replaced or changed since its images were listed")
        return self._zf.read(name)


class ZipImage:
    """An image inside a .zip, read when opened (``Image.open(member.open())``) from its
    :class:`ZipArchive` (one per zip given, shared by its members)."""

    def __init__(self, archive: ZipArchive, name: str):
        self.name, self._archive = name, archive

    @property
    def zip(self) -> Path:
        return self._archive.path

    def open(self) -> io.BytesIO:
        try:
            return io.BytesIO(self._archive.read(self.name))
        except ZIP_MEMBER_ERRORS as e:
            raise OSError(f"damaged zip member ({e})") from None

    def __str__(self) -> str:
        return f"{self.zip}:{self.name}"


def zip_images(zpath: Path) -> list[tuple[ZipImage, str]]:
    """(member, id) of every image in a .zip."""
    try:
        archive = ZipArchive(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{zpath} is not a readable zip file ({e})") from None
    return [(ZipImage(archive, n), zip_item_id(zpath, n)) for n in archive.names]


def folder_images(root: str | Path) -> list[Path]:
    """Every image file under ``root``, at any depth (hidden files left out), sorted."""
    return sorted(p for p in Path(root).rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def read_csv(path: str | Path, required: Sequence[str], what: str, want: str,
             optional: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
    """A CSV's (stripped) header and rows, each row's line number under the key 0 (a column
    read, given in another case and alone of its name, is taken under its own name); a missing
    required column, a column read (``required``, ``optional``) named twice, or a row with
    more fields than the header names is a :class:`BundleError` naming it."""
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f)
            known = (*required, *optional)
            given = [c.strip() for c in (reader.fieldnames or [])]
            cols = list(given)
            for name in known:  # a column read in another case ("Path,Label" from a spreadsheet):
                # taken where it is the one column of that name in any case and none has it exactly
                other = [i for i, c in enumerate(given) if c.lower() == name]
                if name not in given and len(other) == 1:
                    cols[other[0]] = name
            if not set(required) <= set(cols):
                raise BundleError(f"{what} {path} must have a header row with {want}; found {given or 'no header'}")
            # a column read here, named twice: DictReader would keep the last one's values
            twice = sorted({c for c in cols if c in known and cols.count(c) > 1})
            if twice:
                raise BundleError(f"{what} {path}: the header names {', '.join(twice)} more than once "
                                  f"({', '.join(given)}); keep one column of each name")
            reader.fieldnames = cols
            rows = []
            for r in reader:  # each row keeps its line in the file under the key 0 (no column's
                r[0] = reader.line_num  # name: blank lines are skipped, so counting rows is not it)
                rows.append(r)
            # more fields than the header names, with text in them (a comma inside an unquoted
            # path, a column without a name), would be dropped without a word; empty ones (a
            # spreadsheet's trailing commas) are nothing
            over = [r[0] for r in rows if any((v or "").strip() for v in r.get(None) or ())]
            if over:
                raise BundleError(f"{what} {path}: line{'s' if len(over) > 1 else ''} "
                                  f"{', '.join(map(str, over[:5]))}{' ...' if len(over) > 5 else ''} "
                                  f"{'have' if len(over) > 1 else 'has'} more fields than the header "
                                  f"({', '.join(cols)}); quote a path that holds a comma, or name the column")
            return cols, rows
        except UnicodeDecodeError as e:
            raise BundleError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it "
                              "as CSV UTF-8") from None
        except csv.Error as e:
            raise BundleError(f"{what} {path} is not a readable CSV ({e})") from None


def manifest_entries(path: str | Path, what: str) -> list[tuple[Path, str, str | None]]:
    """(file, id, label) of a CSV manifest's rows: a ``path`` column (relative to the CSV's
    folder, or absolute) and an optional ``label`` column (an empty cell: no label)."""
    path = Path(path)
    cols, rows = read_csv(path, ("path",), what, "a path column (and, if you like, a label column)",
                          optional=("label",))
    out = []
    for r in rows:
        rel = (r.get("path") or "").strip()
        if rel:
            f = Path(rel) if Path(rel).is_absolute() else path.parent / rel
            out.append((f, item_id(f, path.parent), (r.get("label") or "").strip() or None))
    return out


def image_sources(sources: Sequence[str | Path], label: str | None = None) -> list[tuple[Path | ZipImage, str, str | None]]:
    """(file, id, label) of every image ``sources`` name: an image file (id: its name), a
    folder (every image under it at any depth; id: the path under the folder), a CSV
    manifest (:func:`manifest_entries`) or a .zip (:class:`ZipImage` members; id: the zip's
    stem, then the path in it). ``label`` labels what a manifest does not."""
    out: list[tuple[Path | ZipImage, str, str | None]] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files = folder_images(p)
            if not files:
                raise BundleError(f"{p} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            out += [(f, item_id(f, p), label) for f in files]
        elif p.suffix.lower() == ".csv" and p.is_file():
            out += [(f, i, lab or label) for f, i, lab in manifest_entries(p, "manifest")]
        elif p.suffix.lower() == ".zip" and p.is_file():
            members = zip_images(p)
            if not members:
                raise BundleError(f"{p} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            out += [(m, i, label) for m, i in members]
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.append((p, p.name, label))
        elif not p.exists():
            raise BundleError(f"{src} does not exist; give an image file, a folder of images, a .zip of "
                              "images or a CSV manifest")
        else:
            raise BundleError(f"{src} is not an image file, a folder of images, a .zip of images or a CSV "
                              f"manifest (image suffixes: {', '.join(sorted(IMAGE_EXTS))})")
    if not out:
        raise BundleError(f"{', '.join(map(str, sources))} list no images")
    for f, id_, lab in out:  # ids, labels and paths go into JSON and HTTP answers: UTF-8 alone
        for what, text in (("file", str(f)), ("label", lab)):
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:
                raise BundleError(f"the {what} name {ascii(text)} is not UTF-8 (files unpacked from an "
                                  "archive made on another system, often): rename it to UTF-8 (convmv -f "
                                  "latin1 -t utf8 --notest FILE, or by hand) and run this again") from None
    return out
