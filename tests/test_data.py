import gzip
import json
import struct

import numpy as np
import pytest

from conftest import make_png_folder
from hwnas.data import (
    Preprocess, SplitConfig, Splits, fashion_mnist, image_folder, make_splits, manifest,
    materialize, omniglot,
)
from hwnas.data.sources import read_idx
from hwnas.errors import DataError


# ---------------------------------------------------------------- IDX
def _write_idx(path, arr, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:  # closed: a gzip trailer is written on close
        f.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x.idx.gz" if gz else "x.idx")
    _write_idx(p, arr, gz)
    np.testing.assert_array_equal(read_idx(p), arr)


def test_idx_truncated_and_bad_magic(tmp_path):
    arr = np.zeros((4, 5, 5), np.uint8)
    p = tmp_path / "t.idx"
    _write_idx(p, arr)
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    (tmp_path / "m.idx").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "m.idx")


def test_fashion_mnist_custom_dir_and_missing(tmp_path):
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), 7, np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 3)
    col = fashion_mnist(tmp_path)
    assert len(col) == 10 and col.splits.count("test") == 4
    assert np.asarray(col.read(0)).shape == (28, 28)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path / "nowhere")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        fashion_mnist(tmp_path)


def test_fashion_mnist_real(fmnist_dir):
    col = fashion_mnist(fmnist_dir)
    assert len(col) == 70000 and col.num_classes == 10
    s = make_splits(col, SplitConfig(protocol="closed"))
    assert len(s.parts["query"]) + len(s.parts["gallery"]) == 10000
    assert s.classes("query") == list(range(10))
    # val comes from the training side and never overlaps the final test images
    train_side = set(s.parts["train"]) | set(s.parts["val_query"]) | set(s.parts["val_gallery"])
    assert not train_side & (set(s.parts["query"]) | set(s.parts["gallery"]))
    a = materialize(col, s.parts["query"][:16], Preprocess(32, 1))
    assert a.images.shape == (16, 1, 32, 32) and a.images.dtype == np.uint8


# ---------------------------------------------------------------- Omniglot
def test_omniglot_open_set(omniglot_dir, tmp_path):
    col = omniglot(omniglot_dir)
    assert len(col) == 5840 and col.num_classes == 292
    s = make_splits(col, SplitConfig(protocol="open", query_fraction=0.25, val_fraction=0.15))
    assert len(s.classes("query")) == 156  # small2's characters, unseen in training
    assert not set(s.classes("train")) & set(s.classes("query"))
    assert not set(s.classes("val_query")) & set(s.classes("train"))
    assert set(s.parts["query"]).isdisjoint(s.parts["gallery"])
    assert len(s.parts["query"]) == 156 * 5  # 25% of 20 drawings per character
    s.save(tmp_path / "splits.json")
    s2 = Splits.load(tmp_path / "splits.json", col)
    for p in s.parts:
        np.testing.assert_array_equal(s.parts[p], s2.parts[p])
    rule = json.loads((tmp_path / "splits.json").read_text())["rule"]
    assert "crc32" in rule


def test_splits_deterministic_and_seeded(omniglot_dir):
    col = omniglot(omniglot_dir)
    a = make_splits(col, SplitConfig(protocol="open", seed=3))
    b = make_splits(col, SplitConfig(protocol="open", seed=3))
    c = make_splits(col, SplitConfig(protocol="open", seed=4))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_leave_one_out_mode(omniglot_dir):
    col = omniglot(omniglot_dir)
    s = make_splits(col, SplitConfig(protocol="open", query_mode="all"))
    np.testing.assert_array_equal(s.parts["query"], s.parts["gallery"])
    assert s.shared_eval


# ---------------------------------------------------------------- user images
def test_class_folders_and_both_protocols(tmp_path):
    root = make_png_folder(tmp_path / "imgs", {f"c{i}": 6 for i in range(10)})
    col = image_folder(root)
    assert len(col) == 60 and col.class_names[0] == "c0"
    closed = make_splits(col, SplitConfig(protocol="closed", test_fraction=0.5))
    assert closed.classes("query") == closed.classes("train")
    opened = make_splits(col, SplitConfig(protocol="open", test_fraction=0.3, val_fraction=0.0))
    assert len(opened.classes("query")) == 3
    assert not set(opened.classes("train")) & set(opened.classes("gallery"))
    a = materialize(col, np.arange(4), Preprocess(16, 3))
    assert a.images.shape == (4, 3, 16, 16)  # non-square 20x24 -> resize + center crop


def test_class_folders_with_train_test(tmp_path):
    make_png_folder(tmp_path / "ds" / "train", {"a": 4, "b": 4})
    make_png_folder(tmp_path / "ds" / "test", {"a": 3, "b": 3})
    col = image_folder(tmp_path / "ds")
    assert sorted(set(col.splits)) == ["test", "train"]
    s = make_splits(col, SplitConfig(protocol="closed", val_fraction=0.0))
    assert len(s.parts["train"]) == 8 and len(s.parts["query"]) + len(s.parts["gallery"]) == 6


def test_open_set_scores_among_two_classes_at_least(tmp_path):
    """Recall@1 among one class is 1 for any model: a search on one validation class, or a
    test split of one class, would compare nothing."""
    col = image_folder(make_png_folder(tmp_path / "imgs", {f"c{i}": 4 for i in range(10)}))
    s = make_splits(col, SplitConfig(protocol="open", val_fraction=0.15))  # 0.15 x 8 rounds to 1
    assert len(s.classes("val_query")) == 2 and len(s.classes("query")) == 2
    assert len(s.classes("train")) == 6
    small = image_folder(make_png_folder(tmp_path / "two", {"a": 4, "b": 4}))
    with pytest.raises(DataError, match="2 classes are too few for an open-set split"):
        make_splits(small, SplitConfig(protocol="open"))
    three = image_folder(make_png_folder(tmp_path / "three", {"a": 4, "b": 4, "c": 4}))
    with pytest.raises(DataError, match="1 training class is too few for val_fraction"):
        make_splits(three, SplitConfig(protocol="open", val_fraction=0.6))
    # a train/ + test/ layout: a test/ of one class, and classes in both (a folder's own advice)
    make_png_folder(tmp_path / "ds" / "train", {"a": 4, "b": 4})
    make_png_folder(tmp_path / "ds" / "test", {"c": 4})
    with pytest.raises(DataError, match="test queries come from 1 class"):
        make_splits(image_folder(tmp_path / "ds"), SplitConfig(protocol="open", val_fraction=0))
    make_png_folder(tmp_path / "ds2" / "train", {"a": 4, "b": 4})
    make_png_folder(tmp_path / "ds2" / "test", {"a": 3, "b": 3})
    with pytest.raises(DataError, match="class folders in one folder, without train/ and test/"):
        make_splits(image_folder(tmp_path / "ds2"), SplitConfig(protocol="open", val_fraction=0))
    with pytest.raises(DataError, match=r"must have 1 value \(one per input channel; space.in_channels is 1\)"):
        Preprocess(32, 1, mean=(0.5, 0.5, 0.5))


def test_manifest(tmp_path):
    make_png_folder(tmp_path / "imgs", {"x": 3, "y": 3})
    rows = ["path,label,split"]
    for c in "xy":
        for i in range(3):
            rows.append(f"imgs/{c}/img{i:03d}.png,{c},{'train' if i == 0 else 'test'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    col = manifest(tmp_path / "m.csv")
    assert len(col) == 6 and col.splits.count("train") == 2
    assert np.asarray(col.read(0)).shape == (24, 20, 3)
    (tmp_path / "caps.csv").write_text((tmp_path / "m.csv").read_text().replace("path,label,split", "Path, LABEL,Split"))
    assert manifest(tmp_path / "caps.csv").splits == col.splits  # a spreadsheet's capitalised header
    # a column of the exact name wins: "Label" beside "label" stays an extra column
    (tmp_path / "both.csv").write_text((tmp_path / "m.csv").read_text().replace("path,label,split", "path,label,split,Label")
                                       .replace(",train\n", ",train,zz\n").replace(",test\n", ",test,zz\n"))
    assert manifest(tmp_path / "both.csv").class_names == col.class_names
    (tmp_path / "bad.csv").write_text("file,cls\na.png,x\n")
    with pytest.raises(DataError, match="path,label"):
        manifest(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("path,label,split\nimgs/x/img000.png,x,valid\n")
    with pytest.raises(DataError, match="bad2.csv:2: split 'valid' is not one of"):
        manifest(tmp_path / "bad2.csv")
    (tmp_path / "bad2.csv").write_text("path,label,split\nimgs/x/img000.png,x,train\nimgs/y/img000.png,y,\n")
    with pytest.raises(DataError, match="bad2.csv:3: split is empty.*drop the split column"):
        manifest(tmp_path / "bad2.csv")
    # a column named twice: DictReader would keep the last one's values without a word
    (tmp_path / "twice.csv").write_text("path,label,label\nimgs/x/img000.png,x,y\n")
    with pytest.raises(DataError, match="names label more than once"):
        manifest(tmp_path / "twice.csv")
    # a field the header does not name (an unquoted comma in a path) was dropped silently
    (tmp_path / "bad3.csv").write_text("path,label\nimgs/x/img000.png,x\n\nimgs/x/a,b.png,x\n")
    with pytest.raises(DataError, match=r"line 4 has more fields than the header \(path, label\); quote"):
        manifest(tmp_path / "bad3.csv")  # (line 4 of the file: the blank line counts)
    # a spreadsheet's empty trailing fields are nothing
    (tmp_path / "ok.csv").write_text("path,label\nimgs/x/img000.png,x,,\nimgs/y/img000.png,y,\n")
    assert len(manifest(tmp_path / "ok.csv")) == 2


# ---------------------------------------------------------------- bad input
def test_corrupt_image_named_or_skipped(tmp_path):
    root = make_png_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    (root / "a" / "img001.png").write_bytes(b"not a png at all")
    col = image_folder(root)
    with pytest.raises(DataError, match=r"img001\.png.*--skip-bad-images"):
        materialize(col, np.arange(len(col)), Preprocess(16, 3))
    a = materialize(col, np.arange(len(col)), Preprocess(16, 3), skip_bad=True)
    assert len(a.images) == 7 and a.skipped == ["a/img001.png"]
    assert len(a.labels) == 7 and len(a.indices) == 7
    # the split's check: all of them named at once, or skipped; a part skipping would empty fails
    from hwnas.data.splits import check_split_images

    s = make_splits(col, SplitConfig(protocol="closed", val_fraction=0.0, test_fraction=0.5))
    for i in s.ids("query"):
        (root / i).write_bytes(b"broken")
    bad = sorted({*s.ids("query"), "a/img001.png"})
    with pytest.raises(DataError, match=f"{len(bad)} of 8 images of the split cannot be read"):
        check_split_images(s)
    with pytest.raises(DataError, match="every image of split part 'query'"):
        check_split_images(s, skip_bad=True, log=lambda *_: None)


def test_missing_file_in_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nnope.png,a\n")
    col = manifest(tmp_path / "m.csv")
    with pytest.raises(DataError, match="nope.png.*does not exist"):
        materialize(col, [0], Preprocess(16, 3))


def test_empty_class_single_image_missing_dir(tmp_path):
    root = make_png_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*has no images"):
        image_folder(root)
    (root / "empty").rmdir()
    make_png_folder(root, {"solo": 1})
    col = image_folder(root)
    with pytest.raises(DataError, match="'solo' has 1 image"):
        make_splits(col, SplitConfig(protocol="closed"))
    for seed in range(4):  # open-set: whichever side the seed draws it to
        with pytest.raises(DataError, match="'solo' has 1 image; the open-set protocol needs at least 2"):
            make_splits(col, SplitConfig(protocol="open", seed=seed))
    # open-set: a one-image class among the evaluation classes cannot give query + gallery
    make_png_folder(root, {"solo": 1, "c": 2, "d": 2})
    (root / "a").rename(tmp_path / "a_out")
    col = image_folder(root)
    with pytest.raises(DataError, match="'solo' has 1 image"):
        make_splits(col, SplitConfig(protocol="open", test_fraction=0.75, val_fraction=0))
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing")


def test_split_layouts_hidden_folders_and_one_class(tmp_path):
    """A train/test layout beside a hidden folder still reads as train/test; split folders
    beside others (val/, or train/ alone) are an error that names the fix, while a class
    that happens to be called "train" (CIFAR-100 has one: images, not folders) is a class."""
    make_png_folder(tmp_path / "ds" / "train", {"a": 4, "b": 4})
    make_png_folder(tmp_path / "ds" / "test", {"a": 3, "b": 3})
    (tmp_path / "ds" / ".ipynb_checkpoints").mkdir()
    col = image_folder(tmp_path / "ds")
    assert col.class_names == ["a", "b"] and sorted(set(col.splits)) == ["test", "train"]
    make_png_folder(tmp_path / "ds" / "val", {"a": 2, "b": 2})
    with pytest.raises(DataError, match=r"split folders \['test', 'train', 'val'\].*ds/train as the data folder"):
        image_folder(tmp_path / "ds")
    # other spellings of split folders (fruits-360 has Training/ and Test/) are no classes either
    make_png_folder(tmp_path / "fruits" / "Training", {"apple": 2, "kiwi": 2})
    make_png_folder(tmp_path / "fruits" / "Test", {"apple": 2, "kiwi": 2})
    with pytest.raises(DataError, match=r"split folders \['Test', 'Training'\].*rename.*fruits/Training as the"):
        image_folder(tmp_path / "fruits")
    (tmp_path / "fruits" / "Training").rename(tmp_path / "fruits" / "Train")
    col = image_folder(tmp_path / "fruits")  # Train/ and Test/: the train/test layout
    assert col.class_names == ["apple", "kiwi"] and sorted(set(col.splits)) == ["test", "train"]
    make_png_folder(tmp_path / "vehicles", {"train": 3, "bus": 3, "test/tube": 2})
    assert image_folder(tmp_path / "vehicles").class_names == ["bus", "test", "train"]
    make_png_folder(tmp_path / "one", {"a": 10})
    with pytest.raises(DataError, match="1 class.*at least 2 classes"):
        make_splits(image_folder(tmp_path / "one"), SplitConfig())


def test_small_classes_name_the_setting_that_fixes_them(tmp_path):
    """Seven images a class leave one test image at test_fraction 0.2: the error gives the
    test_fraction that works, and that value does work; too few training images for a
    validation split is reported with the val_fraction that gives one."""
    from hwnas.data.splits import no_validation_reason

    col = image_folder(make_png_folder(tmp_path / "imgs", {"a": 7, "b": 9}))
    with pytest.raises(DataError, match="'a' has 7 images.*test_fraction to at least 0.22") as e:
        make_splits(col, SplitConfig())
    assert "eval_per_class" not in str(e.value)
    s = make_splits(col, SplitConfig(test_fraction=0.22))
    assert len(s.parts["query"]) and len(s.parts["gallery"])
    why = no_validation_reason(s)
    assert why and "val_fraction to at least" in why
    need = float(why.split("at least ")[1].split(",")[0])
    assert no_validation_reason(make_splits(col, SplitConfig(test_fraction=0.22, val_fraction=need))) is None
    assert "val_fraction is 0" in no_validation_reason(make_splits(col, SplitConfig(test_fraction=0.22, val_fraction=0)))


def test_manifest_encodings(tmp_path):
    """A spreadsheet's "CSV UTF-8" (with a byte-order mark) reads; Latin-1 text and a folder
    given as the manifest are clear errors."""
    make_png_folder(tmp_path / "imgs", {"x": 3, "y": 3})
    rows = "path,label\n" + "".join(f"imgs/{c}/img{i:03d}.png,{c}\n" for c in "xy" for i in range(3))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    assert len(manifest(tmp_path / "bom.csv")) == 6
    (tmp_path / "latin1.csv").write_bytes((rows + "imgs/x/img000.png,caf\xe9\n").encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*CSV UTF-8"):
        manifest(tmp_path / "latin1.csv")
    with pytest.raises(DataError, match="is a folder"):
        manifest(tmp_path / "imgs")
    (tmp_path / "dup.csv").write_text(rows + "imgs/y/img001.png,x\n")
    with pytest.raises(DataError, match="img001.png' is listed more than once"):
        manifest(tmp_path / "dup.csv")


def test_16bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    """A 16-bit PNG and a float image in [0, 1] decode to the same 8-bit picture as their
    8-bit original, not to white (clipped) or black (truncated)."""
    from PIL import Image

    from hwnas_edge.preprocess import image_to_array

    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    ref = image_to_array(Image.fromarray(np.rint(ramp * 255).astype(np.uint8)), 32, 1).astype(int)
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(tmp_path / "a16.png")
    with Image.open(tmp_path / "a16.png") as im16:
        for img in (im16, Image.fromarray(ramp.astype(np.float32))):
            got = image_to_array(img, 32, 1).astype(int)
            assert np.abs(got - ref).max() <= 1, img.mode
            assert image_to_array(img, 16, 3).shape == (3, 16, 16)


def test_splits_from_other_data_refused(tmp_path, omniglot_dir):
    root = make_png_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    s = make_splits(image_folder(root), SplitConfig(protocol="closed", test_fraction=0.5))
    s.save(tmp_path / "splits.json")
    with pytest.raises(DataError, match="not in data set"):
        Splits.load(tmp_path / "splits.json", omniglot(omniglot_dir))


def test_atomic_writes_leave_no_temp_and_usual_mode(tmp_path):
    import os

    from hwnas.utils import write_json

    p = write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)  # not mkstemp's 0600
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_unlabeled_images_from_folder_zip_and_manifest(tmp_path):
    """data.unlabeled: every image under a folder (any depth, folder names ignored), in a
    zip, or listed in a CSV's path column; one class; bad paths are clear errors."""
    import zipfile

    from hwnas.data.sources import unlabeled_images

    root = make_png_folder(tmp_path / "u", {"a": 3, "b/deeper": 2})
    (root / "notes.txt").write_text("not an image")
    col = unlabeled_images(root)
    assert len(col) == 5 and col.class_names == ["unlabeled"] and set(col.labels) == {0}
    assert col.read(0).size == (20, 24)
    with zipfile.ZipFile(tmp_path / "u.zip", "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, p.relative_to(root))
        zf.writestr("readme.txt", "x")
    z = unlabeled_images(tmp_path / "u.zip")
    assert len(z) == 5 and np.array_equal(np.asarray(z.read(4)), np.asarray(col.read(4)))
    # members are read when asked (a large zip is never held whole): a damaged one, stored
    # (a CRC error) or deflated (a broken stream), is an error naming it, which
    # data.skip_bad_images skips like any unreadable image
    from hwnas.data.images import Preprocess, materialize
    from hwnas.errors import HwnasError

    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        with zipfile.ZipFile(tmp_path / "d.zip", "w", method) as zf:
            for p in sorted(root.rglob("*.png"))[:3]:
                zf.writestr(p.name, p.read_bytes() + bytes(200))  # padding: a deflate stream to break
        raw = bytearray((tmp_path / "d.zip").read_bytes())
        at = raw.find(b"img001.png") + len("img001.png")  # the second member's data follows its name
        raw[at + 4:at + 40] = bytes(x ^ 0xFF for x in raw[at + 4:at + 40])
        (tmp_path / "d.zip").write_bytes(bytes(raw))
        d = unlabeled_images(tmp_path / "d.zip")
        assert d.read(0).size == (20, 24)
        with pytest.raises(DataError, match="img001.png.*damaged.*skip_bad_images"):
            d.read(1)
        arr = materialize(d, np.arange(3), Preprocess(size=8, channels=1), skip_bad=True, progress=False)
        assert arr.skipped == ["d/img001.png"] and list(arr.indices) == [0, 2]
    # a zip rewritten since it was listed stops the read, rather than giving other images
    # under the listed names (a whole-archive error: not skipped image by image)
    (tmp_path / "u.zip").write_bytes((tmp_path / "d.zip").read_bytes())
    with pytest.raises(HwnasError, match="replaced or changed since") as e:
        z.read(0)
    assert not isinstance(e.value, DataError)
    (tmp_path / "m.csv").write_text("path,comment\nu/a/img000.png,x\nu/b/deeper/img001.png,\n")
    assert len(unlabeled_images(tmp_path / "m.csv")) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("file\nu/a/img000.png\n")
    for bad, msg in [("missing", "does not exist"), ("empty", "holds no images"), ("bad.csv", "path column")]:
        with pytest.raises(DataError, match=msg):
            unlabeled_images(tmp_path / bad)


def test_unlabeled_sources_are_sampled_before_decoding(tmp_path):
    """More images than max_images (hwnas adapt) over several sources: a seeded sample across
    all of them, drawn before any image is decoded, so an unreadable image outside it is never
    read; inside it, data.skip_bad_images leaves it out, and a sample none of which is readable
    is an error that says so."""
    from hwnas.compat.api import _load_unlabeled
    from hwnas.config import Config
    from hwnas.errors import HwnasError

    make_png_folder(tmp_path / "a", {"x": 5})
    make_png_folder(tmp_path / "b", {"y": 7}, seed=1)
    srcs = [str(tmp_path / "a"), str(tmp_path / "b")]
    names = [f"x/img{i:03d}.png" for i in range(5)] + [f"y/img{i:03d}.png" for i in range(7)]
    files = [tmp_path / ("a" if i < 5 else "b") / n for i, n in enumerate(names)]
    cfg, pre, quiet = Config(), Preprocess(8, 3), lambda *_: None
    keep = np.sort(np.random.default_rng(cfg.seed).choice(12, 6, replace=False))
    assert keep.min() < 5 <= keep.max()  # (the sample spans both sources)
    whole, _ = _load_unlabeled(cfg, srcs, pre, quiet, "adapt.images")
    files[next(i for i in range(12) if i not in keep)].write_bytes(b"not a png")  # never read
    images, ids = _load_unlabeled(cfg, srcs, pre, quiet, "adapt.images", max_images=6)
    assert ids == [names[i] for i in keep] and np.array_equal(images, whole[keep])
    files[keep[0]].write_bytes(b"not a png")
    with pytest.raises(DataError, match=names[keep[0]].split("/")[1]):
        _load_unlabeled(cfg, srcs, pre, quiet, "adapt.images", max_images=6)
    cfg.data.skip_bad_images = True
    images, ids = _load_unlabeled(cfg, srcs, pre, quiet, "adapt.images", max_images=6)
    assert ids == [names[i] for i in keep[1:]] and len(images) == 5
    for i in keep:
        files[i].write_bytes(b"not a png")
    with pytest.raises(HwnasError, match="none of the 6 images sampled of 12 is readable"):
        _load_unlabeled(cfg, srcs, pre, quiet, "adapt.images", max_images=6)


def test_strokes_are_reproducible_handwriting_like_images():
    """strokes:N[:SEED]: image i depends only on (SEED, i) — reproducible, a larger N extends
    a smaller one, another seed draws others; black pen on white at about Omniglot's ink
    fraction (7.5%); a malformed spec and a list with a bad entry are clear errors."""
    from hwnas.data.sources import unlabeled_images, unlabeled_specs

    small, big, other = (unlabeled_images(s) for s in ("strokes:4", "strokes:20", "strokes:4:1"))
    assert len(small) == 4 and len(big) == 20 and small.class_names == ["unlabeled"]
    px = [np.asarray(big.read(i).convert("L")) for i in range(20)]
    for i in range(4):
        assert np.array_equal(np.asarray(small.read(i).convert("L")), px[i])
        assert not np.array_equal(np.asarray(other.read(i).convert("L")), px[i])
    assert px[0].shape == (105, 105) and set(np.unique(np.stack(px))) == {0, 255}
    ink = np.mean([(a == 0).mean() for a in px])
    assert 0.02 < ink < 0.15 and all((a == 0).any() for a in px)
    assert len({a.tobytes() for a in px}) == 20
    assert unlabeled_specs(None) == [] and unlabeled_specs(["a.zip", "strokes:3"]) == ["a.zip", "strokes:3"]
    for bad in ("strokes:", "strokes:x", "strokes:0", "strokes:5:-1", "strokes:1:2:3"):
        with pytest.raises(DataError, match="strokes:N"):
            unlabeled_images(bad)
    with pytest.raises(DataError, match="a list of them"):
        unlabeled_specs(["a.zip", 3])


def test_a_data_path_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """`--set data.data_dir=~/photos` reaches hwnas unexpanded (the shell expands ~ only at
    the start of a word): the loaders expand it, and a step key sees the same folder."""
    from hwnas.data.sources import load_source, same_file_specs

    make_png_folder(tmp_path / "photos", {"a": 2, "b": 2})
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_source("folder", "~/photos")) == 4
    assert same_file_specs("~/photos") == same_file_specs([str(tmp_path / "photos")]) == [str((tmp_path / "photos").resolve())]


def test_large_parts_decode_once_into_a_memory_mapped_cache(tmp_path, monkeypatch):
    """A part of image files at least HWNAS_IMAGE_CACHE_MB large is decoded once into the
    run's cache and memory-mapped: the same images (unreadable ones left out) as decoding in
    memory, no image read again on the next load, a file edited since decoded afresh."""
    from PIL import Image

    from hwnas.data.images import Preprocess, materialize

    root = make_png_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    (root / "b" / "img004.png").write_bytes(b"broken")
    col = image_folder(root)
    pre, cache = Preprocess(size=16, channels=3), tmp_path / "cache"
    reads = []
    read = col.read
    col.read = lambda i: (reads.append(i), read(i))[1]
    idx = np.arange(len(col))
    plain = materialize(col, idx, pre, skip_bad=True, cache_dir=cache)  # under the 1 GB default
    assert not isinstance(plain.images, np.memmap) and not cache.exists()
    monkeypatch.setenv("HWNAS_IMAGE_CACHE_MB", "0")
    first = materialize(col, idx, pre, skip_bad=True, cache_dir=cache)
    assert isinstance(first.images, np.memmap) and np.array_equal(first.images, plain.images)
    assert np.array_equal(first.labels, plain.labels) and np.array_equal(first.indices, plain.indices)
    assert first.skipped == plain.skipped == ["b/img004.png"]
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".u8"]  # no temp file left
    reads.clear()
    again = materialize(col, idx, pre, skip_bad=True, cache_dir=cache)
    assert not reads and np.array_equal(again.images, plain.images) and again.skipped == plain.skipped
    again.images[0] = 0  # copy-on-write: the cache is not changed through a model's batch
    assert np.array_equal(materialize(col, idx, pre, skip_bad=True, cache_dir=cache).images, plain.images)
    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(root / "a" / "img000.png")  # edited since
    fresh = materialize(col, idx, pre, skip_bad=True, cache_dir=cache)
    assert reads and fresh.images[0].max() == 0 and np.array_equal(fresh.images[1:], plain.images[1:])
    assert len(list(cache.iterdir())) == 2  # the part's earlier cache is gone
    meta = next(cache.glob("*.json"))
    meta.write_text('{"rows": 9}')  # damaged (a key missing): decoded again, not a KeyError
    reads.clear()
    assert np.array_equal(materialize(col, idx, pre, skip_bad=True, cache_dir=cache).images, fresh.images)
    assert reads
    monkeypatch.setenv("HWNAS_IMAGE_CACHE_MB", "lots")
    with pytest.raises(DataError, match="HWNAS_IMAGE_CACHE_MB='lots' must be a number"):
        materialize(col, idx, pre, skip_bad=True, cache_dir=cache)


def test_source_splits_checked_for_their_protocol_and_a_relabelled_set_is_refused(tmp_path):
    """A manifest's split column under closed-set must train on every test class; under
    open-set with validation every training class needs 2 images (whatever the seed draws);
    and a split loaded after the labels were edited is refused, not used with new labels."""
    make_png_folder(tmp_path / "imgs", {"x": 4, "y": 4, "z": 4})

    def write(rows):
        (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(f"imgs/{r}\n" for r in rows))
        return manifest(tmp_path / "m.csv")

    rows = [f"{c}/img{i:03d}.png,{c},{'train' if i < 2 else 'test'}" for c in "xy" for i in range(4)]
    col = write(rows + [f"z/img{i:03d}.png,z,test" for i in range(4)])
    with pytest.raises(DataError, match=r"closed-set needs every test class.*\(e.g. 'z'\) have no training image"):
        make_splits(col, SplitConfig(protocol="closed", val_fraction=0))
    col = write([f"{c}/img{i:03d}.png,{c},train" for c in "xy" for i in range(4)]
                + ["z/img000.png,z,train"] + [f"z/img{i:03d}.png,w,test" for i in (1, 2, 3)])
    with pytest.raises(DataError, match="training class 'z' has 1 image.*val_fraction: 0"):
        make_splits(col, SplitConfig(protocol="open", val_fraction=0.5))
    # a split made, then the manifest relabelled (same paths)
    col = write(rows + [f"z/img{i:03d}.png,z,{'train' if i < 2 else 'test'}" for i in range(4)])
    s = make_splits(col, SplitConfig(protocol="closed", val_fraction=0))
    s.save(tmp_path / "splits.json")
    assert Splits.load(tmp_path / "splits.json", col).fingerprint == s.fingerprint
    relabelled = write([r.replace(",y,", ",x,") for r in rows]
                       + [f"z/img{i:03d}.png,z,{'train' if i < 2 else 'test'}" for i in range(4)])
    with pytest.raises(DataError, match="class labels of the split's images differ"):
        Splits.load(tmp_path / "splits.json", relabelled)


def test_skipping_unreadable_images_never_leaves_retrieval_among_one_class(tmp_path):
    # open-set, 2 test classes: skipping every image of one of them would leave the test's
    # retrieval among one class, where any model scores recall@1 = 1
    from hwnas.data.splits import check_split_images

    root = make_png_folder(tmp_path / "imgs", {f"c{i}": 4 for i in range(6)})
    s = make_splits(image_folder(root), SplitConfig(protocol="open", test_fraction=0.3, val_fraction=0.0))
    names = s.collection.class_names
    test_classes = sorted({names[c] for c in s.labels("query")})
    assert len(test_classes) == 2
    for f in (root / test_classes[0]).iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"split part 'query' come from 1 class \('c\d'\).*among 2 classes"):
        check_split_images(s, skip_bad=True, log=lambda *_: None)
    # with that class repaired and one gallery image of the other broken, retrieval still spans both
    for i, f in enumerate(sorted((root / test_classes[0]).iterdir())):
        make_png_folder(tmp_path / "fresh", {"x": 4})
        f.write_bytes((tmp_path / "fresh" / "x" / f"img{i:03d}.png").read_bytes())
    # a gallery image of the other (its query stays)
    gone = next(i for i in s.ids("gallery") if i.startswith(test_classes[1] + "/"))
    (root / gone).write_bytes(b"broken")
    assert check_split_images(s, skip_bad=True, log=lambda *_: None) == [gone]


def _manifest_outside_its_folder(tmp_path) -> list[str]:
    """tmp/lists/m.csv listing images in tmp/images by ../ paths; its rows."""
    make_png_folder(tmp_path / "images", {"x": 3, "y": 3})
    (tmp_path / "lists").mkdir()
    rows = [f"../images/{c}/img{i:03d}.png,{c}" for c in "xy" for i in range(3)]
    (tmp_path / "lists" / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return rows


def test_manifest_ids_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    # images outside the CSV's folder (../images/x.png) are named by their absolute path, so a
    # run directory's split holds wherever the command runs, and one file given twice is refused
    rows = _manifest_outside_its_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    here = manifest("lists/m.csv")
    monkeypatch.chdir(tmp_path / "images")
    there = manifest(tmp_path / "lists" / "m.csv")
    assert here.ids == there.ids == [str((tmp_path / "images" / r.split(",")[0][len("../images/"):]).resolve())
                                     for r in rows]
    s = make_splits(here, SplitConfig(protocol="closed", test_fraction=0.5))
    s.save(tmp_path / "splits.json")
    assert Splits.load(tmp_path / "splits.json", there).ids("query") == s.ids("query")
    # the same file under two spellings (relative with a detour, and absolute)
    twice = rows + [f"{tmp_path}/images/x/img000.png,y", "../images/y/../x/img001.png,y"]
    (tmp_path / "lists" / "twice.csv").write_text("path,label\n" + "\n".join(twice) + "\n")
    with pytest.raises(DataError, match="is listed more than once"):
        manifest(tmp_path / "lists" / "twice.csv")
    # a split whose images were deleted since says so, and how to go on
    (tmp_path / "images" / "x" / "img000.png").unlink()
    (tmp_path / "lists" / "m.csv").write_text("path,label\n" + "\n".join(rows[1:]) + "\n")
    with pytest.raises(DataError, match="moved, renamed or deleted since.*--from data"):
        Splits.load(tmp_path / "splits.json", manifest(tmp_path / "lists" / "m.csv"))
    # a missing image names the folder a relative path is taken from
    (tmp_path / "lists" / "rel.csv").write_text("path,label\nimages/x/img001.png,x\n")
    with pytest.raises(DataError, match=r"does not exist \(listed in manifest:rel; a relative path in it is "
                                        r"taken from the CSV's folder .*lists"):
        materialize(manifest(tmp_path / "lists" / "rel.csv"), [0], Preprocess(16, 3))


def test_class_folder_names_that_are_not_utf8_and_archiver_folders(tmp_path):
    import os

    root = make_png_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "__MACOSX").mkdir()  # a Mac zip's resource forks: not a class, not an empty class
    (root / "__MACOSX" / "._img000.png").write_bytes(b"\x00\x05\x16\x07")
    assert image_folder(root).class_names == ["a", "b"]
    try:
        os.mkdir(os.path.join(os.fsencode(root), b"cl\xe9"))  # latin-1 "clé", as a Windows zip unpacks
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    make_png_folder(tmp_path / "src", {"c": 2})
    for f in (tmp_path / "src" / "c").iterdir():
        os.rename(os.fsencode(f), os.path.join(os.fsencode(root), b"cl\xe9", os.fsencode(f.name)))
    with pytest.raises(DataError, match=r"class folder 'cl\\udce9'.*not UTF-8 .*b'cl\\xe9'.*rename it"):
        image_folder(root)


def test_images_with_a_camera_orientation_are_pointed_out(tmp_path):
    from PIL import Image

    from hwnas.data.splits import check_split_images

    root = make_png_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    img = Image.new("RGB", (24, 16), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    img.save(root / "a" / "photo.jpg", exif=exif.tobytes())
    s = make_splits(image_folder(root), SplitConfig(protocol="closed", test_fraction=0.5))
    said = []
    check_split_images(s, log=said.append)
    assert len(said) == 1 and "1 image carries a camera orientation tag (EXIF; e.g. a/photo.jpg)" in said[0]
    (root / "a" / "photo.jpg").unlink()
    said.clear()
    check_split_images(make_splits(image_folder(root), SplitConfig(protocol="closed", test_fraction=0.5)),
                       log=said.append)
    assert said == []


def test_skipping_checks_only_parts_it_takes_below_two_classes(tmp_path):
    # closed-set: only classes large enough give validation images, so val_query may hold one
    # class as made; an unreadable training image elsewhere must not refuse that split
    from hwnas.data.splits import check_split_images

    root = make_png_folder(tmp_path / "imgs", {"A": 30, "B": 10, "C": 10})
    s = make_splits(image_folder(root), SplitConfig(protocol="closed"))
    assert len(set(s.labels("val_query").tolist())) == 1
    bad = next(i for i in s.ids("train") if i.startswith("C/"))
    (root / bad).write_bytes(b"broken")
    assert check_split_images(s, skip_bad=True, log=lambda *_: None) == [bad]


def test_ids_of_linked_folders_and_of_a_split_recorded_by_an_older_hwnas(tmp_path, monkeypatch):
    import os

    from hwnas_edge.sources import legacy_item_id

    # a class folder linked in from elsewhere keeps the id it always had (its path as given)
    make_png_folder(tmp_path / "pool", {"cat": 3, "dog": 3})
    (tmp_path / "data").mkdir()
    for c in ("cat", "dog"):
        os.symlink(tmp_path / "pool" / c, tmp_path / "data" / c)
    col = image_folder(tmp_path / "data")
    assert col.ids[0] == f"{tmp_path}/data/cat/img000.png" and not col.legacy_ids
    # two links in a folder to one file outside are two images, as before
    os.symlink(tmp_path / "pool" / "cat" / "img000.png", tmp_path / "data" / "dog" / "again.png")
    assert len(image_folder(tmp_path / "data")) == 7
    # a split recorded when a manifest's ../ rows were named by the path as typed still loads,
    # with the same ids and fingerprint
    _manifest_outside_its_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    col = manifest("lists/m.csv")
    old_ids = [legacy_item_id(p, tmp_path / "lists") for p in col.paths]
    assert old_ids[0] == "lists/../images/x/img000.png" and old_ids != col.ids
    s = make_splits(col, SplitConfig(protocol="closed", test_fraction=0.5))
    made = s.to_dict()
    made["parts"] = {p: [old_ids[col.ids.index(i)] for i in ids] for p, ids in made["parts"].items()}
    (tmp_path / "splits.json").write_text(json.dumps(made))
    back = Splits.load(tmp_path / "splits.json", manifest("lists/m.csv"))
    assert back.ids("query") == made["parts"]["query"]
    assert back.fingerprint == Splits.load(tmp_path / "splits.json", manifest("lists/m.csv")).fingerprint


def test_a_damaged_exif_block_is_no_orientation_and_no_traceback(tmp_path):
    from PIL import Image

    from hwnas.data.splits import check_split_images

    root = make_png_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    Image.new("RGB", (20, 24), (9, 9, 9)).save(root / "a" / "odd.png", exif=b"Exif\x00\x00notatiff")
    with pytest.raises(SyntaxError):  # (what Pillow makes of it)
        Image.open(root / "a" / "odd.png").getexif()
    said = []
    s = make_splits(image_folder(root), SplitConfig(protocol="closed", test_fraction=0.5))
    assert check_split_images(s, log=said.append) == [] and said == []


def test_a_mac_zip_of_one_folder_points_at_that_folder(tmp_path):
    root = tmp_path / "unzipped"
    make_png_folder(root / "mydata", {"a": 3, "b": 3})
    (root / "__MACOSX" / "mydata").mkdir(parents=True)
    with pytest.raises(DataError, match=r"one folder, 'mydata', of folders.*pass .*unzipped/mydata as the data"):
        image_folder(root)
    assert image_folder(root / "mydata").class_names == ["a", "b"]
