"""Image sources, read with no download: Fashion-MNIST IDX files, the Omniglot zips, a
user's class folders and a CSV manifest (``path,label[,split]``).

Every source yields a :class:`Collection`: ids, integer labels with class names, an
optional source split per image (``train``/``test``) and a way to read image ``i`` as a
PIL image. Reading is lazy; :func:`hwnas.data.images.materialize` decodes and resizes.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from hwnas_edge.preprocess import IMAGE_EXTS  # one list of image suffixes for training and the edge
from hwnas_edge.sources import ZIP_MEMBER_ERRORS, ZipArchive, ZipChanged, zip_image_names, zip_item_id  # (ids deploy --catalog and hwnas-edge add share)

from hwnas.errors import DataError, HwnasError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = ("train", "test")
# folder names that mark a split layout (root/<split>/<class>/<image>), in any case
SPLIT_FOLDER_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation", "dev",
                      "eval", "evaluation", "query", "gallery"}
# how a message names the settings every command takes (--set); hwnas data (and, for the
# skipping, hwnas run and hwnas deploy) take flags for them too
DATA_DIR_FIX = "set data.data_dir (--set data.data_dir=DIR; hwnas data takes --data-dir DIR)"
SKIP_BAD_FIX = ("set data.skip_bad_images: true (--set data.skip_bad_images=true on each command; "
                "hwnas data, hwnas run and hwnas deploy take --skip-bad-images) to skip unreadable "
                "images, counted")


@dataclass
class Collection:
    """A labelled image collection. ``read(i)`` returns a PIL image (any mode)."""

    name: str
    ids: list[str]
    labels: np.ndarray  # int64 index into class_names
    class_names: list[str]
    read: Callable[[int], "object"] = field(repr=False)
    splits: list[str] | None = None  # per-image source split, if the source has one
    paths: list[str] | None = None  # per-image path (for the deploy mapping), if any
    info: dict = field(default_factory=dict)
    # {index: the id an older hwnas gave the image} where it differs from today's (files
    # outside a manifest's folder): a split recorded with those is still read
    legacy_ids: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.ids) != len(self.labels):
            raise ValueError("ids and labels differ in length")
        if len(set(self.ids)) != len(self.ids):
            seen: set = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))
            raise DataError(f"{self.name}: image {dup!r} is listed more than once (each image "
                            "must appear once, with one label): remove the repeated rows (in a folder: "
                            "the links that lead to one file)")
        if not len(self.ids):
            raise DataError(f"{self.name}: no images found")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        d = {"name": self.name, "images": len(self), "classes": self.num_classes}
        if self.splits is not None:
            for s in sorted(set(self.splits)):
                d[f"{s}_images"] = sum(1 for x in self.splits if x == s)
        d.update(self.info)
        return d


# ---------------------------------------------------------------------- IDX (MNIST format)
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, checking its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes or ndim == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(
            f"{path}: header says {shape} ({int(np.prod(shape))} values) but the file holds "
            f"{arr.size}; the file is truncated or corrupt"
        )
    return arr.reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).exists():
            return data_dir / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}; install Debian's package "
        f"(`apt-get install dataset-fashion-mnist`), or {DATA_DIR_FIX} to the directory of the four "
        "IDX files"
    )


def fashion_mnist(data_dir: str | os.PathLike | None = None) -> Collection:
    """Fashion-MNIST (60k train + 10k test, 10 classes, 28x28 grayscale) from IDX files."""
    data_dir = Path(data_dir or FASHION_MNIST_DIR)
    if not data_dir.is_dir():
        raise DataError(
            f"Fashion-MNIST directory {shown(data_dir)} does not exist; install it with "
            f"`apt-get install dataset-fashion-mnist`, or {DATA_DIR_FIX}"
        )
    images, labels, splits = [], [], []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find_idx(data_dir, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find_idx(data_dir, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{data_dir}: {prefix} images {x.shape} and labels {y.shape} disagree")
        if y.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{data_dir}: label {int(y.max())} out of range 0..9")
        images.append(x)
        labels.append(y.astype(np.int64))
        splits += [split] * len(x)
    arr = np.concatenate(images)
    ids = [f"{s}/{i:05d}" for s, i in zip(splits, _running_index(splits))]
    from PIL import Image

    return Collection(
        "fashion-mnist", ids, np.concatenate(labels), list(FASHION_MNIST_CLASSES),
        read=lambda i: Image.fromarray(arr[i]), splits=splits,
        info={"source": str(data_dir)},
    )


def _running_index(splits: Sequence[str]) -> list[int]:
    counts: dict[str, int] = {}
    out = []
    for s in splits:
        out.append(counts.get(s, 0))
        counts[s] = out[-1] + 1
    return out


# ---------------------------------------------------------------------- Omniglot zips
def default_omniglot_dir() -> Path:
    """``../shared/data/omniglot`` beside the project (or ``$HWNAS_OMNIGLOT_DIR``)."""
    env = os.environ.get("HWNAS_OMNIGLOT_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"


def omniglot(
    data_dir: str | os.PathLike | None = None,
    train_zip: str = "images_background_small1.zip",
    test_zip: str = "images_background_small2.zip",
) -> Collection:
    """Omniglot from its zip files: ``train_zip``'s characters form the ``train`` split and
    ``test_zip``'s the ``test`` split (disjoint alphabets, so open-set by construction).

    A class is ``<zip stem>/<Alphabet>/<characterNN>``; images stay compressed in memory and
    are decoded on read."""
    data_dir = Path(data_dir) if data_dir else default_omniglot_dir()
    ids, labels, splits, class_names, blobs = [], [], [], [], []
    cls_index: dict[str, int] = {}
    for split, zname in (("train", train_zip), ("test", test_zip)):
        zpath = data_dir / zname
        if not zpath.exists():
            raise DataError(
                f"Omniglot zip {zpath} not found; {DATA_DIR_FIX} to the directory that "
                f"holds {train_zip} and {test_zip}"
            )
        for n, blob in zip(*_zip_images(zpath, {".png"})):
            parts = n.split("/")
            if len(parts) < 4:
                continue
            cls = f"{Path(zname).stem}/{parts[-3]}/{parts[-2]}"
            if cls not in cls_index:
                cls_index[cls] = len(class_names)
                class_names.append(cls)
            ids.append(f"{Path(zname).stem}/{'/'.join(parts[-3:])}")
            labels.append(cls_index[cls])
            splits.append(split)
            blobs.append(blob)
    if not ids:
        raise DataError(f"no PNG images found in the Omniglot zips under {data_dir}")

    def read(i: int):
        return open_image(io.BytesIO(blobs[i]), ids[i])

    return Collection("omniglot", ids, labels, class_names, read=read, splits=splits,
                      info={"source": str(data_dir)})


# ---------------------------------------------------------------------- user images
def open_image(src, name: str):
    """The image at ``src`` (a path or a file object), read whole; a DataError that names
    ``name`` and the fix where it cannot be read (deploy reads added images with it too)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(src)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(
            f"cannot read image {name}: {e}; fix or remove the file, or {SKIP_BAD_FIX}"
        ) from None


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


#: folders an archiver leaves beside the images, never classes (macOS's zip: resource forks)
NOT_CLASSES = frozenset({"__MACOSX"})


def _scan_class_dirs(root: Path, split: str | None, out: list) -> None:
    class_dirs = sorted(d for d in root.iterdir()
                        if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CLASSES)
    if not class_dirs:
        raise DataError(
            f"{root} has no class folders; expected {root}/<class>/<image> (e.g. "
            f"{root}/cat/001.jpg)"
        )
    for d in class_dirs:
        try:  # the class's name goes into the split's seed, the reports and the index's labels
            d.name.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(d.name)
            raise DataError(f"class folder {ascii(d.name)} in {root} has a name that is not UTF-8 "
                            f"(bytes {raw!r}), as folders unpacked from a zip made on Windows often do: "
                            "rename it (e.g. convmv -f latin1 -t utf8 -r --notest DIR, or mv by hand)") from None
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        if not files:
            raise DataError(
                f"class folder {d} has no images ({', '.join(sorted(IMAGE_EXTS))}); add "
                "images or remove the folder"
            )
        for p in files:
            out.append((p, d.name, split))


def shown(path: Path) -> str:
    """A path as a message names it: a relative one with the directory it is taken from (the
    working directory, not the config file's)."""
    return str(path) if path.is_absolute() else f"{path} (relative to the working directory {Path.cwd()})"


def image_folder(root: str | os.PathLike) -> Collection:
    """Class folders: ``root/<class>/<image>``. If ``root`` holds exactly ``train/`` and
    ``test/`` folders of class folders, those become the source splits."""
    root = Path(root)
    if root.is_file():
        zipped = " (a .zip of class folders: unzip it and pass the folder)" if root.suffix.lower() == ".zip" else ""
        raise DataError(f"image folder {shown(root)} is a file{zipped}; pass the directory that holds one "
                        "folder per class (or, for a CSV of paths and labels, data.dataset: manifest)")
    if not root.is_dir():
        raise DataError(f"image folder {shown(root)} does not exist; {DATA_DIR_FIX} to the directory "
                        "that holds one folder per class")
    entries: list = []
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")} - NOT_CLASSES
    # train/ and test/ (in any case: Train/ and Test/ are the same layout)
    split_dir = {n.lower(): n for n in subdirs}
    has_splits = len(subdirs) == len(SPLITS) and set(split_dir) == set(SPLITS)
    # split folders (train/, val/, ...) of class folders: reading them as classes would make
    # "train" and "val" the classes. A layout when split-named folders of folders are all
    # there is, or two of them hold folders of the same names (the classes); a class that is
    # merely called "train" (CIFAR-100 has one) sits beside other classes and shares no
    # subfolder names, so it stays a class.
    inner = {n: {d.name for d in (root / n).iterdir() if d.is_dir() and not d.name.startswith(".")}
             for n in subdirs if n.lower() in SPLIT_FOLDER_NAMES}
    split_like = sorted(n for n, sub in inner.items() if sub)
    shared = any(inner[a] & inner[b] for a in split_like for b in split_like if a < b)
    if split_like and not has_splits and (set(split_like) == subdirs or shared):
        others = sorted(subdirs - set(split_like))
        beside = f" beside {others}" if others else ""
        main = next((n for n in split_like if n.lower() in ("train", "training")), split_like[0])
        raise DataError(
            f"{root} holds split folders {split_like} of class folders{beside}; hwnas reads "
            "either one folder per class, or exactly train/ and test/ of class folders: rename "
            "the training and test folders train/ and test/, move validation images into train/ "
            f"(hwnas makes its own validation split), or pass {root / main} as the data folder")
    if len(subdirs) == 1 and not has_splits:  # (a zip of one folder, unpacked: ROOT/mydata/<class>/...)
        (only,) = subdirs
        if any(d.is_dir() and not d.name.startswith(".") for d in (root / only).iterdir()):
            raise DataError(f"{root} holds one folder, {only!r}, of folders: for its folders as the "
                            f"classes, pass {root / only} as the data folder")
    if has_splits:
        for s in SPLITS:
            _scan_class_dirs(root / split_dir[s], s, entries)
    else:
        _scan_class_dirs(root, None, entries)
    return _from_entries(f"folder:{root.name}", root, entries, has_splits)


def manifest(csv_path: str | os.PathLike) -> Collection:
    """A CSV manifest with header ``path,label[,split]``; relative paths are resolved
    against the CSV's directory; ``split`` is ``train`` or ``test``."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise DataError(f"manifest {csv_path} is a folder; give the CSV file's path (or, for a "
                        "folder of class folders, data.dataset: folder)")
    if not csv_path.is_file():
        raise DataError(f"manifest {shown(csv_path)} does not exist; "
                        f"{DATA_DIR_FIX.replace('DIR', 'FILE.csv')} to the CSV's path")
    if csv_path.suffix.lower() == ".zip":
        raise DataError(f"manifest {csv_path} is a .zip, not a CSV: for labelled images in a zip, unzip it "
                        "and pass the folder of class folders (data.dataset: folder)")
    cols, rows = _read_csv(csv_path, ("path", "label"), "manifest", "columns path,label[,split]", ("split",))
    if not rows:
        raise DataError(f"manifest {csv_path} lists no images")
    has_split = "split" in cols
    entries = []
    for row in rows:
        lineno = row[0]
        path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not path or not label:
            raise DataError(f"{csv_path}:{lineno}: empty path or label")
        split = (row.get("split") or "").strip() or None
        if has_split and split not in SPLITS:
            got = "is empty, not" if split is None else f"{split!r} is not"
            raise DataError(f"{csv_path}:{lineno}: split {got} one of {list(SPLITS)}; give every row "
                            "its split, or drop the split column (hwnas then splits the images itself)")
        p = Path(path)
        entries.append((p if p.is_absolute() else csv_path.parent / p, label, split))
    return _from_entries(f"manifest:{csv_path.stem}", csv_path.parent, entries, has_split,
                         where=f"a relative path in it is taken from the CSV's folder {csv_path.parent}, "
                               "not the working directory, with / between folders")


def _read_csv(path: Path, required: Sequence[str], what: str, want: str,
              optional: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
    """A CSV's (stripped) header and rows (:func:`hwnas_edge.sources.read_csv`, whose rules
    hwnas-edge add follows too); its errors are DataErrors here."""
    from hwnas_edge.bundle import BundleError
    from hwnas_edge.sources import read_csv

    try:
        return read_csv(path, required, what, want, optional)
    except BundleError as e:
        raise DataError(str(e)) from None


def _zip_images(zpath: Path, suffixes) -> tuple[list[str], list[bytes]]:
    """The sorted member names with one of ``suffixes`` in a zip, and their bytes."""
    try:
        with zipfile.ZipFile(zpath) as zf:
            names = zip_image_names(zf, suffixes)
            return names, [zf.read(n) for n in names]
    except zipfile.BadZipFile as e:
        raise DataError(f"{zpath} is not a valid zip file ({e})") from None


def _from_entries(name: str, root: Path, entries: list, has_splits: bool, follow_links: bool = True,
                  where: str | None = None) -> Collection:
    class_names = sorted({c for _, c, _ in entries})
    cls_index = {c: i for i, c in enumerate(class_names)}
    paths = [str(p) for p, _, _ in entries]
    from hwnas_edge.sources import item_id, legacy_item_id

    ids = [item_id(p, root, follow_links=follow_links) for p, _, _ in entries]
    legacy = {}
    if follow_links:  # (only an absolute id can differ: one inside root is relative either way)
        legacy = {i: old for i, old in ((i, legacy_item_id(entries[i][0], root)) for i, x in enumerate(ids)
                                        if os.path.isabs(x)) if old != ids[i]}

    def read(i: int):
        if not os.path.exists(paths[i]):
            raise DataError(f"image {paths[i]} does not exist (listed in {name}"
                            f"{'; ' + where if where else ''}); fix the path, or {SKIP_BAD_FIX}")
        return open_image(paths[i], paths[i])

    return Collection(
        name, ids, [cls_index[c] for _, c, _ in entries], class_names, read=read,
        splits=[s for _, _, s in entries] if has_splits else None, paths=paths,
        info={"source": str(root)}, legacy_ids=legacy,
    )


# ---------------------------------------------------------------------- unlabeled images
def same_file_specs(value) -> list[str] | None:
    """A source setting (one source, a list, or null) with every file or folder it names as
    its resolved path, however it was spelled (relative to here, absolute, ``~``); what is
    not on disk (``strokes:N``, ``split:gallery``, a path gone since) stays as written."""
    if value is None:
        return None
    specs = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    return [str(Path(s).expanduser().resolve()) if Path(s).expanduser().exists() else str(s) for s in specs]


def unlabeled_specs(value, setting: str = "data.unlabeled") -> list[str]:
    """``data.unlabeled`` (or ``setting``, e.g. adapt.images) as a list of sources (it may be
    one source, a list of them, or null)."""
    if value is None:
        return []
    specs = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not specs or not all(isinstance(s, (str, os.PathLike)) and str(s) for s in specs):
        raise DataError(f"{setting} {value!r} must be a source (a folder, a .zip, a CSV "
                        "manifest or strokes:N), a list of them, or null")
    return [str(s) for s in specs]


def unlabeled_images(path: str | os.PathLike, setting: str = "data.unlabeled", fix: str | None = None,
                     follow_links: bool = True) -> Collection:
    """Images without labels, for the loss parts that need none (regression to the gallery
    embedding, contrast, mix): a folder (every image under it, at any depth; folder names
    are ignored), a ``.zip`` of images, a CSV manifest with a ``path`` column (other
    columns ignored), or ``strokes:N[:SEED]``, N procedural pen-stroke images
    (:mod:`hwnas.data.synthetic`). One class, ``unlabeled``."""
    from hwnas.data.synthetic import is_synthetic, strokes_collection

    if is_synthetic(str(path)):
        return strokes_collection(str(path))
    path = Path(path).expanduser()
    fix = fix or (f"set {setting} to a folder of images, a .zip of images, a CSV manifest with "
                  "a path column or strokes:N (or a list of these), or to null")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_image(p))
        if not files:
            raise DataError(f"{setting} {path} holds no images ({', '.join(sorted(IMAGE_EXTS))}); {fix}")
        return _from_entries(f"unlabeled:{path.name}", path, [(f, "unlabeled", None) for f in files], False,
                             follow_links)
    if path.suffix.lower() == ".csv" and path.is_file():
        _, rows = _read_csv(path, ("path",), f"{setting} manifest", "a path column")
        rel = [(r.get("path") or "").strip() for r in rows]
        if not any(rel):
            raise DataError(f"{setting} manifest {path} lists no images; {fix}")
        entries = [(Path(r) if Path(r).is_absolute() else path.parent / r, "unlabeled", None) for r in rel if r]
        return _from_entries(f"unlabeled:{path.stem}", path.parent, entries, False, follow_links)
    if path.suffix.lower() == ".zip" and path.is_file():
        try:
            members = ZipArchive(path, IMAGE_EXTS)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path} is not a readable zip file ({e})") from None
        if not members.names:
            raise DataError(f"{setting} {path} holds no images; {fix}")
        ids = [zip_item_id(path, n) for n in members.names]

        def read(i: int):
            name = members.names[i]
            try:
                blob = members.read(name)
            except ZipChanged as e:  # (a whole-archive problem: not an image data.skip_bad_images could skip)
                raise HwnasError(f"{e}: run again once it stays put") from None
            except ZIP_MEMBER_ERRORS as e:
                raise DataError(f"{path}: cannot read {name} ({e}): the member is damaged or the zip changed "
                                f"while in use; repair or replace the zip, or {SKIP_BAD_FIX}") from None
            return open_image(io.BytesIO(blob), ids[i])

        return Collection(f"unlabeled:{path.stem}", ids, np.zeros(len(ids)), ["unlabeled"], read=read,
                          info={"source": str(path)})
    raise DataError(f"{setting} {shown(path)} does not exist or is not a folder, .zip or .csv; {fix}")


def catalog_images(path: str | os.PathLike, setting: str = "deploy.catalog") -> tuple[Collection, list | None]:
    """The images a deployed index is to hold (``hwnas deploy --catalog``): a folder (every
    image under it, at any depth), a ``.zip`` of images, or a CSV manifest with a ``path``
    column and, optionally, a ``label`` column. Returns the collection and, from a manifest's
    label column, each image's label (None for an empty cell), else None. An image's id is
    the one ``hwnas-edge add`` gives it (:func:`hwnas_edge.sources.item_id`)."""
    from hwnas_edge.sources import manifest_entries

    from hwnas.data.synthetic import is_synthetic

    if is_synthetic(str(path)):
        raise DataError(f"{setting} {path}: procedural strokes are not a catalog; give the folder, "
                        ".zip or CSV manifest of the images the index is to hold")
    from hwnas_edge.bundle import BundleError

    # the ids hwnas-edge add gives these files (symlinks not followed: a link in the catalog is
    # named where it sits)
    col = unlabeled_images(path, setting, f"set {setting} (--catalog) to a folder of images, a .zip of "
                           "images or a CSV manifest with a path column (and a label column, if you "
                           "like), or to null for the test split's gallery part", follow_links=False)
    p = Path(path).expanduser()
    if p.suffix.lower() != ".csv":
        return col, None
    try:
        labels = [lab for _, _, lab in manifest_entries(p, f"{setting} manifest")]
    except BundleError as e:
        raise DataError(str(e)) from None
    return col, labels if any(lab is not None for lab in labels) else None


# ---------------------------------------------------------------------- tiny (tests)
def digits() -> Collection:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes): tiny, for unit tests."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' data set needs scikit-learn: pip install 'hwnas[dev]'") from None
    from PIL import Image

    d = load_digits()
    arr = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return Collection("digits", [f"digits/{i:04d}" for i in range(len(arr))], d.target,
                      [str(i) for i in range(10)],
                      read=lambda i: Image.fromarray(arr[i]))


def load_source(kind: str, path: str | None = None) -> Collection:
    """Open a source by name: fashion-mnist, omniglot, folder, manifest, digits."""
    path = os.path.expanduser(path) if path else path  # ~ in a config or --set is the home folder
    if kind == "fashion-mnist":
        return fashion_mnist(path)
    if kind == "omniglot":
        return omniglot(path)
    if kind == "folder":
        if not path:
            raise DataError("dataset 'folder' needs its root folder (ROOT/<class>/<image>): "
                            + DATA_DIR_FIX.replace("DIR", "ROOT"))
        return image_folder(path)
    if kind == "manifest":
        if not path:
            raise DataError("dataset 'manifest' needs its CSV (path,label[,split]): "
                            + DATA_DIR_FIX.replace("DIR", "FILE.csv"))
        return manifest(path)
    if kind == "digits":
        return digits()
    raise DataError(
        f"unknown dataset {kind!r}; choose fashion-mnist, omniglot, folder, manifest or digits"
    )
