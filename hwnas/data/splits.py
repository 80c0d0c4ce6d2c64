"""Evaluation protocols and deterministic, recorded splits.

Parts of every split:

* ``train``: images the gallery model, the supernet and query models train on;
* ``val_query`` / ``val_gallery``: validation retrieval (the search's reward), drawn from
  the training side, never from the final test images;
* ``query`` / ``gallery``: the final test retrieval.

Protocols:

* ``closed``: train and test share the classes; query and gallery come from the test
  split (the source's own train/test split where it has one, otherwise ``test_fraction``
  of each class's images);
* ``open``: evaluation classes are disjoint from training classes (the source's split
  where it has one, e.g. Omniglot small1 vs small2, otherwise ``test_fraction`` of the
  classes); evaluation classes are split into query and gallery images.

The rule is seeded per class (the class name and the seed seed the generator), so a split
does not depend on class order; the rule and the ids of every part are written to
``splits.json`` in the run directory, and ``load`` re-reads exactly that split.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hwnas.data.sources import Collection
from hwnas.errors import DataError
from hwnas.utils import content_hash, read_json, write_json

PARTS = ("train", "val_query", "val_gallery", "query", "gallery")
SPLITS_FORMAT = "hwnas-splits-v1"


@dataclass
class SplitConfig:
    protocol: str = "closed"  # closed | open
    seed: int = 0
    query_fraction: float = 0.2  # share of each eval class's images used as queries
    query_mode: str = "split"  # split: queries and gallery disjoint | all: leave-one-out
    val_fraction: float = 0.1  # closed: share of train images per class; open: of train classes (2 where it rounds to 1)
    test_fraction: float = 0.2  # only where the source has no split (closed: images, open: classes, 2 at least)
    train_per_class: int | None = None  # seeded subsample (quick configs)
    eval_per_class: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in ("closed", "open"):
            raise DataError(f"protocol {self.protocol!r} must be 'closed' or 'open'")
        if self.query_mode not in ("split", "all"):
            raise DataError(f"query_mode {self.query_mode!r} must be 'split' or 'all'")
        for name in ("query_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise DataError(f"{name}={v} must be between 0 and 1 (exclusive)")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DataError(f"seed={self.seed!r} must be a whole number >= 0")
        for name in ("train_per_class", "eval_per_class"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise DataError(f"{name}={v} must be at least 2 (or unset)")


@dataclass
class Splits:
    config: SplitConfig
    parts: dict[str, np.ndarray]  # indices into the collection
    collection: Collection = field(repr=False)

    @property
    def shared_eval(self) -> bool:
        """True when query and gallery share images (leave-one-out): exclude self-matches."""
        return self.config.query_mode == "all"

    def ids(self, part: str) -> list[str]:
        return [self.collection.ids[i] for i in self.parts[part]]

    def labels(self, part: str) -> np.ndarray:
        return self.collection.labels[self.parts[part]]

    def classes(self, part: str) -> list[int]:
        return sorted(set(self.labels(part).tolist()))

    def counts(self) -> dict:
        return {p: {"images": int(len(ix)), "classes": len(self.classes(p))}
                for p, ix in self.parts.items()}

    @property
    def fingerprint(self) -> str:
        return content_hash({p: self.ids(p) for p in PARTS})

    @property
    def labels_fingerprint(self) -> str:
        """The class of every image of every part: a data set relabelled since the split was
        made (a manifest's label column edited, say) is told apart from the split's own."""
        names = self.collection.class_names
        return content_hash({p: [names[c] for c in self.labels(p).tolist()] for p in PARTS})

    def to_dict(self) -> dict:
        return {
            "format": SPLITS_FORMAT,
            "source": self.collection.describe(),
            "config": asdict(self.config),
            "rule": RULE,
            "fingerprint": self.fingerprint,
            "labels_fingerprint": self.labels_fingerprint,
            "counts": self.counts(),
            "parts": {p: self.ids(p) for p in PARTS},
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, collection: Collection) -> "Splits":
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path} does not exist; run `hwnas data` first to write the splits")
        d = read_json(path)
        if d.get("format") != SPLITS_FORMAT:
            raise DataError(f"{path} is not a {SPLITS_FORMAT} file")
        index = {id_: i for i, id_ in enumerate(collection.ids)}
        # a split recorded when files outside a manifest's folder were named by their path as
        # typed: those images take their old ids here, so the split, its fingerprint and what
        # was trained on it stay as they were
        old = {o: i for i, o in collection.legacy_ids.items() if o not in index}
        for x in [x for p in PARTS for x in d["parts"][p] if x not in index and x in old]:
            del index[collection.ids[old[x]]]
            collection.ids[old[x]], index[x] = x, old[x]
        parts = {}
        for p in PARTS:
            missing = [x for x in d["parts"][p] if x not in index]
            if missing:
                raise DataError(
                    f"{path}: {len(missing)} image ids of part {p!r} (e.g. {missing[0]!r}) are "
                    f"not in data set {collection.name}: the images were moved, renamed or "
                    "deleted since the split was made (say, unreadable files removed), or it "
                    "was made from other data. Put them back, or use the data settings it was "
                    "made with (data.dataset, data.data_dir); else split again in a new run "
                    "directory, or here with hwnas run CONFIG --from data (which trains "
                    "everything built on the old split again)"
                )
            parts[p] = np.array([index[x] for x in d["parts"][p]], dtype=np.int64)
        out = cls(SplitConfig(**d["config"]), parts, collection)
        # (splits written before the labels were recorded are taken as they are)
        if d.get("labels_fingerprint") not in (None, out.labels_fingerprint):
            raise DataError(
                f"{path}: the class labels of the split's images differ from when it was made (the "
                f"data set was relabelled, e.g. a manifest's label column edited), so the models and "
                "caches of this run were made with other labels: use a new run directory, or split "
                "again here (hwnas run CONFIG --from data)")
        return out


RULE = (
    "per class (classes taken in name order), the class's image indices are sorted by id and "
    "permuted by numpy.random.default_rng([seed, crc32(class name), salt]); the first "
    "max(1, round(fraction * n)) of them go to the first part (test / val / query), the rest "
    "(at least 1) to the second; open-set class splits permute the sorted class names with "
    "default_rng([seed, salt]) and take max(2, round(test_fraction * classes)) test classes and "
    "round(val_fraction * training classes) validation classes, 2 where that rounds to 1. "
    "Salts: 1 test, 2 val, 3 query, 4 subsample."
)


def _rng(seed: int, salt: int, name: str | None = None) -> np.random.Generator:
    key = [seed, salt] if name is None else [seed, zlib.crc32(name.encode()), salt]
    return np.random.default_rng(key)


def _split_idx(idx: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = idx[rng.permutation(len(idx))]
    k = min(max(1, int(round(frac * len(idx)))), len(idx) - 1)
    return np.sort(perm[:k]), np.sort(perm[k:])


def _by_class(col: Collection, idx: np.ndarray) -> dict[int, np.ndarray]:
    out: dict[int, list] = {}
    order = sorted(idx.tolist(), key=lambda i: col.ids[i])
    for i in order:
        out.setdefault(int(col.labels[i]), []).append(i)
    return {c: np.array(v, dtype=np.int64) for c, v in sorted(out.items(), key=lambda kv: col.class_names[kv[0]])}


def _subsample(col: Collection, idx: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return idx
    keep = []
    for c, ix in _by_class(col, idx).items():
        keep.append(ix if len(ix) <= per_class else
                    np.sort(ix[_rng(seed, 4, col.class_names[c]).permutation(len(ix))[:per_class]]))
    return np.sort(np.concatenate(keep)) if keep else idx[:0]


def _query_gallery(col: Collection, idx: np.ndarray, cfg: SplitConfig, what: str, fix: str = ""):
    """Split eval images into (query, gallery): seeded per class, or leave-one-out."""
    q, g = [], []
    for c, ix in _by_class(col, idx).items():
        if len(ix) < 2:
            raise DataError(
                f"class {col.class_names[c]!r} has {len(ix)} image in the {what} images; "
                "retrieval needs at least 2 per class (one query, one gallery item): add "
                f"images or drop the class{fix}"
            )
        if cfg.query_mode == "all":
            q.append(ix)
            g.append(ix)
        else:
            a, b = _split_idx(ix, cfg.query_fraction, _rng(cfg.seed, 3, col.class_names[c]))
            q.append(a)
            g.append(b)
    cat = lambda xs: np.sort(np.concatenate(xs)) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(q), cat(g)


def no_validation_reason(splits: "Splits") -> str | None:
    """Why the split has no validation images (which the search needs), and the fix; None
    when it has them."""
    if len(splits.parts["val_query"]) and len(splits.parts["val_gallery"]):
        return None
    cfg = splits.config
    if cfg.val_fraction == 0:
        return ("the split has no validation images (data.split.val_fraction is 0); the search "
                "needs them: set val_fraction > 0 in a new run directory")
    if cfg.protocol == "closed":
        per = np.bincount(splits.labels("train"))
        most = int(per.max()) if len(per) else 0
        if most < 3:
            return (f"the split has no validation images: the largest class has {most} training "
                    "image(s), and a class needs at least 3 to spare 2 for validation; add images")
        need = 1.5 / most + 0.005
        return (f"the split has no validation images: with val_fraction {cfg.val_fraction}, a class "
                f"gives validation images only when val_fraction x its training images rounds to 2 "
                f"or more, and the largest class has {most} training images; set "
                f"data.split.val_fraction to at least {need:.2f}, or add images")
    return (f"the split has no validation images: val_fraction {cfg.val_fraction} of the "
            f"{len(splits.classes('train'))} training classes rounds to none; raise "
            "data.split.val_fraction or add classes")


def make_splits(col: Collection, cfg: SplitConfig | None = None) -> Splits:
    cfg = cfg or SplitConfig()
    if col.num_classes < 2:
        raise DataError(f"{col.name}: {col.num_classes} class ({', '.join(col.class_names) or 'none'}); "
                        "retrieval needs at least 2 classes: give one folder (or label) per class")
    all_idx = np.arange(len(col), dtype=np.int64)
    fix = f", or raise data.split.eval_per_class (now {cfg.eval_per_class})" if cfg.eval_per_class else ""
    if col.splits is not None and set(col.splits) != {"train", "test"}:
        raise DataError(
            f"{col.name}: the source split has only {sorted(set(col.splits))}; it needs both "
            "'train' and 'test' images (or no split column, to split here)"
        )
    src = np.array(col.splits) if col.splits is not None else None

    if cfg.protocol == "closed":
        if src is not None:
            train, test = all_idx[src == "train"], all_idx[src == "test"]
            unseen = sorted(set(col.labels[test].tolist()) - set(col.labels[train].tolist()))
            if unseen:  # closed-set means the test classes were trained on
                raise DataError(
                    f"{col.name}: closed-set needs every test class among the training classes, but "
                    f"{len(unseen)} test classes (e.g. {col.class_names[unseen[0]]!r}) have no training "
                    "image in the source split; set data.split.protocol: open (hwnas data: --protocol "
                    "open), or give those classes training images")
        else:
            tr, te = [], []
            by_class = _by_class(col, all_idx)
            c, ix = min(by_class.items(), key=lambda kv: len(kv[1]))  # the smallest class
            if len(ix) < 3:
                raise DataError(
                    f"class {col.class_names[c]!r} has {len(ix)} image(s); the closed-set "
                    "protocol needs at least 3 per class (train, query, gallery): add images to it, drop "
                    "the class, or set data.split.protocol: open (classes held out whole)"
                )
            if min(max(1, int(round(cfg.test_fraction * len(ix)))), len(ix) - 1) < 2:
                raise DataError(
                    f"class {col.class_names[c]!r} has {len(ix)} images: test_fraction "
                    f"{cfg.test_fraction} of them is 1 test image, and retrieval needs at "
                    "least 2 (one query, one gallery item); set data.split.test_fraction to "
                    f"at least {min(0.67, 1.5 / len(ix) + 0.005):.2f}, or add images"
                )
            for c, ix in by_class.items():
                a, b = _split_idx(ix, cfg.test_fraction, _rng(cfg.seed, 1, col.class_names[c]))
                te.append(a)
                tr.append(b)
            train, test = np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))
        train = _subsample(col, train, cfg.train_per_class, cfg.seed)
        test = _subsample(col, test, cfg.eval_per_class, cfg.seed)
        val_q, val_g, keep = [], [], []
        for c, ix in _by_class(col, train).items():
            n_val = int(round(cfg.val_fraction * len(ix)))
            if n_val >= 2 and len(ix) - n_val >= 1:
                perm = ix[_rng(cfg.seed, 2, col.class_names[c]).permutation(len(ix))]
                v, rest = perm[:n_val], perm[n_val:]
                a, b = _split_idx(np.sort(v), cfg.query_fraction, _rng(cfg.seed, 3, col.class_names[c]))
                val_q.append(a)
                val_g.append(b)
                keep.append(rest)
            else:
                keep.append(ix)
        train = np.sort(np.concatenate(keep))
        vq = np.sort(np.concatenate(val_q)) if val_q else np.zeros(0, np.int64)
        vg = np.sort(np.concatenate(val_g)) if val_g else np.zeros(0, np.int64)
        q, g = _query_gallery(col, test, cfg, "test", fix)
    else:  # open set
        if src is not None:
            tr_cls = set(col.labels[src == "train"].tolist())
            te_cls = set(col.labels[src == "test"].tolist())
            # any training class may be drawn as a validation class (a query and a gallery
            # image each): checked for all, so the split does not pass or fail by seed
            small = [c for c in sorted(tr_cls) if np.sum(col.labels[src == "train"] == c) < 2]
            if small and cfg.val_fraction > 0:
                raise DataError(
                    f"training class {col.class_names[small[0]]!r} has 1 image; with data.split."
                    f"val_fraction {cfg.val_fraction} any training class may be drawn for validation, "
                    "which needs 2 (one query, one gallery item): add images, drop the class, or set "
                    "data.split.val_fraction: 0")
            overlap = tr_cls & te_cls
            if overlap:
                raise DataError(
                    f"{col.name}: open-set needs train and test classes disjoint, but "
                    f"{len(overlap)} classes (e.g. {col.class_names[min(overlap)]!r}) appear in "
                    "both source splits; set data.split.protocol: closed (hwnas data: --protocol closed) or "
                    + ("put the class folders in one folder, without train/ and test/, so the test classes "
                       "are drawn from them" if col.name.startswith("folder:") else "drop the split column")
                )
        else:
            # any class may be drawn for the test (or validation) classes, which need a query and
            # a gallery image each: checked for all, so the split does not pass or fail by seed
            c, ix = min(_by_class(col, all_idx).items(), key=lambda kv: len(kv[1]))
            if len(ix) < 2:
                raise DataError(
                    f"class {col.class_names[c]!r} has {len(ix)} image; the open-set protocol needs at "
                    "least 2 per class (any class may be drawn as a test class: one query, one gallery "
                    "item): add images or drop the class")
            names = sorted(range(col.num_classes), key=lambda c: col.class_names[c])
            perm = [names[i] for i in _rng(cfg.seed, 1).permutation(len(names))]
            # at least 2 test classes: recall@1 among one class is 1 whatever the model
            k = max(2, int(round(cfg.test_fraction * len(names))))
            if len(names) - k < 1:
                raise DataError(f"{col.name}: {len(names)} classes are too few for an open-set split, which "
                                "needs 2 test classes (recall among one class is always 1) and a training "
                                "class: add classes, or set data.split.protocol: closed")
            te_cls, tr_cls = set(perm[:k]), set(perm[k:])
        train = all_idx[np.isin(col.labels, sorted(tr_cls))]
        test = all_idx[np.isin(col.labels, sorted(te_cls))]
        train = _subsample(col, train, cfg.train_per_class, cfg.seed)
        test = _subsample(col, test, cfg.eval_per_class, cfg.seed)
        tr_sorted = sorted(tr_cls, key=lambda c: col.class_names[c])
        n_val = int(round(cfg.val_fraction * len(tr_sorted)))
        if n_val == 1:  # one validation class scores every arch 1: the search would compare nothing
            n_val = 2
        if n_val and len(tr_sorted) - n_val < 1:
            raise DataError(f"{col.name}: {len(tr_sorted)} training class{'es are' if len(tr_sorted) != 1 else ' is'} too few for "
                            f"val_fraction={cfg.val_fraction}: validation takes at least 2 classes (recall "
                            "among one is always 1) and training keeps one; add classes, set "
                            "data.split.val_fraction: 0 (no search), or data.split.protocol: closed")
        val_cls = [tr_sorted[i] for i in _rng(cfg.seed, 2).permutation(len(tr_sorted))[:n_val]]
        is_val = np.isin(col.labels[train], val_cls)
        val, train = train[is_val], train[~is_val]
        if len(val):
            vq, vg = _query_gallery(col, val, SplitConfig(**{**asdict(cfg), "query_mode": "split"}), "validation")
        else:
            vq = vg = np.zeros(0, np.int64)
        q, g = _query_gallery(col, test, cfg, "test", fix)
    if not len(train):
        raise DataError(f"{col.name}: no training images left after splitting")
    n_test = len(np.unique(col.labels[q]))
    if n_test < 2:  # e.g. a source's test/ folder of one class
        raise DataError(f"{col.name}: the test queries come from {n_test} class{'es' if n_test != 1 else ''}; retrieval is scored "
                        "among 2 classes at least (recall among one class is always 1): add test classes")
    return Splits(cfg, {"train": train, "val_query": vq, "val_gallery": vg, "query": q, "gallery": g}, col)


def check_split_images(splits: Splits, skip_bad: bool = False, log=print) -> list[str]:
    """Read every image of the split's parts once (:func:`hwnas.data.images.check_readable`):
    a DataError naming the unreadable ones, or with ``skip_bad`` their ids (logged)."""
    from hwnas.data.images import check_readable

    skipped = check_readable(splits.collection, np.concatenate([splits.parts[p] for p in PARTS]), skip_bad,
                             log=log)
    if skipped:
        gone = set(skipped)
        for p in PARTS:  # a part the skipping empties fails now, not at the step that reads it
            ids = splits.ids(p)
            if ids and all(i in gone for i in ids):
                raise DataError(f"every image of split part {p!r} ({len(ids)}) is unreadable, so "
                                "skipping them leaves it empty: fix or replace those files")
        names = splits.collection.class_names
        for p in ("query", "gallery", "val_query", "val_gallery"):
            # retrieval among one class scores every model 1: a part of 2 classes or more that
            # the skipping leaves with fewer (the split's own checks are on the split as made)
            before = {names[int(c)] for c in splits.labels(p)}
            left = sorted({names[int(c)] for i, c in zip(splits.ids(p), splits.labels(p)) if i not in gone})
            if len(before) >= 2 > len(left):
                raise DataError(f"the readable images of split part {p!r} come from {len(left)} class"
                                f"{'' if len(left) == 1 else 'es'} ({', '.join(map(repr, left)) or 'none'}): "
                                "retrieval is scored among 2 classes at least (among one, recall is always "
                                "1), and skipping the unreadable ones leaves too few; fix or replace those "
                                "files, or add classes")
        n = len(skipped)
        log(f"[data] {n} unreadable image{'s are' if n > 1 else ' is'} left out by each command that "
            f"reads the split with data.skip_bad_images on (hwnas run passes it on to its steps; "
            f"a step run by hand needs it in the config or --set data.skip_bad_images=true); the "
            f"split's counts include {'them' if n > 1 else 'it'}, e.g. {skipped[0]}")
    return skipped
