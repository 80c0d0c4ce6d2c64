"""Deploy a tiny run; the torch-free edge runtime and the gallery search service."""

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, write_cfg
from hwnas.compat import api
from hwnas.config import load_config
from hwnas.errors import HwnasError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, fmnist_dir):
    from hwnas.export.deploy import deploy

    root = tmp_path_factory.mktemp("deploy")
    d = tiny_config(root / "run",
                    data={"dataset": "fashion-mnist", "mean": [0.286], "std": [0.353],
                          "split": {"protocol": "closed", "train_per_class": 100,
                                    "eval_per_class": 30, "val_fraction": 0.0}},
                    gallery={"backbone": "resnet10t", "train": {"epochs": 2, "batch_size": 64}},
                    query={"train": {"epochs": 2, "batch_size": 64}})
    cfg = load_config(write_cfg(root / "c.json", d))
    quiet = lambda *_: None  # noqa: E731
    api.train_gallery(cfg, log=quiet)
    arch = cfg.search_space().sample(0).to_string()
    api.train_query(cfg, arch=arch, name="searched", inherit=False, log=quiet)
    m = deploy(cfg, int8=True, log=quiet)
    return root, cfg, m


def test_manifest_records_everything(bundle):
    root, cfg, m = bundle
    b = root / "run" / "bundle"
    from hwnas_edge.bundle import sha256_file

    assert set(m["artifacts"]) == {"query.onnx", "query.int8.onnx", "gallery.onnx", "gallery.index",
                                   "gallery_items.json", "parity_probe.npz"}
    for name, a in m["artifacts"].items():
        assert sha256_file(b / name) == a["sha256"]
    assert m["parity"]["query"]["min_cosine"] >= 0.9999
    assert m["index"]["factory"] == "Flat" and m["gallery"]["n_items"] == 240
    assert m["gallery"]["tensorrt"]["built"] is False and "TensorRT" in m["gallery"]["tensorrt"]["skipped"]
    assert {"M(g,g)", "M(q,g)", "M(q,q)"} == set(m["accuracy"]["metrics"])
    assert m["latency"]["measured_onnxruntime_cpu"]["latency_ms"] > 0
    i8 = m["int8"]
    assert i8["faster"] == (i8["latency_ms"] < m["latency"]["measured_onnxruntime_cpu"]["latency_ms"] * 0.97)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(b / "query.onnx")).metadata_props}
    assert meta["gallery_fingerprint"] == m["gallery"]["fingerprint"]
    assert json.loads(meta["mean"]) == [0.286] and meta["input_size"] == "32"
    model = onnx.load(str(b / "query.onnx"))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].name == "image" and model.graph.output[0].name == "embedding"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_verify_and_tamper(bundle, tmp_path):
    root, _, _ = bundle
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "verify", str(root / "run" / "bundle")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hashes"] == "ok"
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(root / "run" / "bundle", copy)
    items = json.loads((copy / "gallery_items.json").read_text())
    items[0]["label"] = "tampered"
    (copy / "gallery_items.json").write_text(json.dumps(items))
    r = subprocess.run([sys.executable, "-m", "hwnas.cli", "verify", str(copy)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "gallery_items.json has changed" in r.stderr


def test_a_hand_edited_or_thinned_manifest_is_refused(bundle, tmp_path):
    """A manifest's normalisation edited (wrong neighbours, no error, before), an entry taken
    out of its list (the file then checked by nothing), fields of the wrong type (tracebacks
    before), a damaged parity probe or items list re-signed: each a BundleError naming it."""
    import hashlib
    import shutil

    from hwnas_edge.bundle import Bundle, BundleError, verify

    root, _, _ = bundle
    src = root / "run" / "bundle"

    def edited(name, change, file=None):
        d = tmp_path / name
        shutil.copytree(src, d)
        m = json.loads((d / "manifest.json").read_text())
        if file is not None:  # damage a file and sign it, as a careful tamperer would
            change(d / file)
            m["artifacts"][file]["sha256"] = hashlib.sha256((d / file).read_bytes()).hexdigest()
        else:
            change(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    d = edited("mean", lambda m: m["preprocess"].update(mean=[0.9]))
    with pytest.raises(BundleError, match=r"query.onnx records mean \[0.286\] but the manifest says \[0.9\]"):
        Bundle(d).session()
    d = edited("unlisted", lambda m: m["artifacts"].pop("gallery_items.json"))
    with pytest.raises(BundleError, match="gallery_items.json is not listed in the manifest"):
        verify(d)
    d = edited("slipped", lambda m: m["artifacts"].pop("gallery.onnx"))
    with pytest.raises(BundleError, match="gallery.onnx lies in the bundle but is not listed"):
        Bundle(d)
    for name, change, said in (
            ("dim", lambda m: m.update(embed_dim="128x"), "embed_dim is '128x'"),
            ("sha", lambda m: m["artifacts"]["query.onnx"].pop("sha256"), r"artifacts\['query.onnx'\] has no sha256"),
            ("list", lambda m: m.update(artifacts=list(m["artifacts"])), "artifacts is a list"),
            ("threads", lambda m: m["latency"]["measured_onnxruntime_cpu"].update(threads="2"), "threads is '2'"),
            ("channels", lambda m: m["preprocess"].update(mean=[0.1, 0.2, 0.3]), r"preprocess.mean is \[0.1, 0.2, 0.3\], not one number or 1"),
            ("huge", lambda m: m["preprocess"].update(std=[10 ** 400]), r"preprocess.std is \[1000")):
        with pytest.raises(BundleError, match=said):
            Bundle(edited(name, change))
    d = edited("probe", lambda f: f.write_bytes(f.read_bytes()[:1000]), "parity_probe.npz")
    with pytest.raises(BundleError, match="cannot read .*parity_probe.npz"):
        verify(d)

    def int_labels(f):
        items = json.loads(f.read_text())
        items[3]["label"] = 7
        f.write_text(json.dumps(items))

    d = edited("items", int_labels, "gallery_items.json")
    with pytest.raises(BundleError, match="row 3 is .* not an item with a string id and a label"):
        verify(d)
    verify(src)  # (the original is untouched)
    # one mean and std for every channel, as a 3-channel config with the default (0.5,) writes
    from hwnas_edge.bundle import _manifest_problem

    m = json.loads((src / "manifest.json").read_text())
    m["preprocess"].update(channels=3, mean=[0.5], std=[0.5])
    assert _manifest_problem(m) is None
    m["preprocess"].update(mean=[0.5, 0.5])
    assert "preprocess.mean is [0.5, 0.5], not one number or 3" in _manifest_problem(m)


def test_add_refuses_a_file_name_that_is_not_utf8(tmp_path):
    """Such a name was added, then made the service answer 500 for any search that found it."""
    import os

    from hwnas_edge.bundle import BundleError
    from hwnas_edge.sources import image_sources

    folder = tmp_path / "new"
    folder.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(folder / "fine.png")
    Image.new("L", (8, 8)).save(folder / os.fsdecode(b"bad\xffname.png"))
    with pytest.raises(BundleError, match=r"file name .*bad\\udcffname.png' is not UTF-8.*convmv"):
        image_sources([folder])
    with pytest.raises(BundleError, match=r"label name '\\udcff' is not UTF-8"):
        image_sources([folder / "fine.png"], label=os.fsdecode(b"\xff"))


def test_add_says_why_an_image_cannot_be_read(bundle, tmp_path):
    import shutil

    from hwnas_edge.add import add_images
    from hwnas_edge.bundle import BundleError

    root, _, _ = bundle
    b = tmp_path / "b"
    shutil.copytree(root / "run" / "bundle", b)
    (tmp_path / "new.csv").write_text("path,label\ngone.png,x\n")
    with pytest.raises(BundleError, match=r"cannot read image .*gone.png \(.*No such file or directory"):
        add_images(b, [tmp_path / "new.csv"], log=lambda *_: None)


def test_a_long_thin_image_is_preprocessed_in_bounded_memory(monkeypatch):
    """A 2 KB PNG of 1 x 1,000,000 pixels was resized whole to 32 x 32,000,000 (2.3 GB) before
    its centre was cropped; past a size only the crop's part is resized, within one level of
    the whole resize, and images under it keep the exact pixels."""
    from PIL import Image

    import hwnas_edge.preprocess as pre

    r = subprocess.run([sys.executable, "-c", """
import re
from PIL import Image
from hwnas_edge.preprocess import image_to_array
a = image_to_array(Image.new('L', (1, 1000000), 128), 32, 1)
assert a.shape == (1, 32, 32) and (a == 128).all()
# this process's peak (ru_maxrss would count the parent's, from before the exec)
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "deploy")})
    assert r.returncode == 0 and int(r.stdout) < 500_000, (r.stdout, r.stderr)  # KB: under 500 MB
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 300), dtype=np.uint8), "L")
    whole = pre.image_to_array(img, 28, 1)
    monkeypatch.setattr(pre, "_WHOLE_RESIZE_MAX_PIXELS", 100)
    part = pre.image_to_array(img, 28, 1)
    assert part.shape == whole.shape and np.abs(part.astype(int) - whole).max() <= 1


def test_failed_deploy_leaves_nothing(bundle, tmp_path):
    from hwnas.export.deploy import deploy

    _, cfg, _ = bundle
    out = tmp_path / "bad_bundle"
    with pytest.raises(HwnasError, match="FAISS cannot build index"):
        deploy(cfg, out=out, factory="NoSuchIndex", log=lambda *_: None)
    assert not out.exists()
    assert not any(p.name.startswith(".bad_bundle") for p in tmp_path.iterdir())
    with pytest.raises(HwnasError, match="--overwrite"):
        deploy(cfg, log=lambda *_: None)  # the existing bundle is never silently replaced


def test_a_faiss_error_says_faiss_words_not_its_source_location():
    from hwnas.export.deploy import make_index

    with pytest.raises(HwnasError) as e:
        make_index(128, "PQ7")  # 128 is no multiple of 7: FAISS's own check refuses it
    assert "subquantizers" in str(e.value)
    assert ".cpp" not in str(e.value) and "Error in" not in str(e.value)


def test_parity_refuses_a_non_finite_export():
    """An export with a NaN output fails the parity check (the minimum of cosines with a NaN
    is NaN, which no '<' comparison catches)."""
    from hwnas.export.deploy import PARITY_MIN_COSINE, _check_parity, _parity

    ref = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    _check_parity("query.onnx", _parity(ref, ref.copy()), PARITY_MIN_COSINE, "images")
    got = ref.copy()
    got[1, 3] = np.nan
    with pytest.raises(HwnasError, match="query.onnx differs from PyTorch: min cosine nan"):
        _check_parity("query.onnx", _parity(ref, got), PARITY_MIN_COSINE, "images")


def test_overwrite_replaces_only_a_bundle(bundle, tmp_path):
    """--overwrite replaces a bundle or an empty folder; a folder that holds anything else (a
    run directory named by mistake) is refused before anything is built, and left as it was."""
    from hwnas.export.deploy import _check_replaceable, deploy

    root, cfg, _ = bundle
    quiet = lambda *_: None  # noqa: E731
    _check_replaceable(root / "run" / "bundle")  # a bundle: replaceable
    (tmp_path / "empty").mkdir()
    _check_replaceable(tmp_path / "empty")
    for out, why in ((root / "run", "not an hwnas bundle"), (root / "run" / "gallery", "not an hwnas bundle"),
                     (root / "c.json", "is a file")):
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_bytes()
        for overwrite in (True, False):  # (without it too: not told to pass it, then refused)
            with pytest.raises(HwnasError, match=why):
                deploy(cfg, out=out, overwrite=overwrite, log=quiet)
        assert before == (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_bytes())
        assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_a_new_deploy_keeps_the_images_edge_add_put_in_the_bundle(bundle, tmp_path):
    """deploy --overwrite over a bundle that hwnas-edge add grew: the added images go into the
    new index, embedded again by the gallery model it ships (each finds itself), with their ids
    and labels; one whose file is gone is an error naming the choices, before anything is built
    (--skip-bad-images leaves it out, --drop-additions all of them). (hwnas run's deploy done
    again takes the same path: test_cli's end-to-end run redeploys over its bundle.)"""
    import shutil

    from hwnas_edge.add import add_images
    from hwnas_edge.bundle import Bundle, verify

    from hwnas.cli import main
    from hwnas.export.deploy import deploy

    root, cfg, m0 = bundle
    quiet = lambda *_: None  # noqa: E731
    b = tmp_path / "b"
    shutil.copytree(root / "run" / "bundle", b)
    (tmp_path / "new").mkdir()
    paths = _test_images(cfg, tmp_path / "new", n=3)
    add_images(b, [tmp_path / "new"], label="shelf", log=quiet)
    n0 = m0["gallery"]["n_items"]
    added = Bundle(b).items[n0:]
    assert len(added) == 3
    said = []
    m = deploy(cfg, out=b, overwrite=True, log=said.append)
    assert m["gallery"]["n_items"] == n0 + 3 and m["additions"][0]["added"] == 3
    assert any("3 images hwnas-edge add put in" in x for x in said), said
    nb = Bundle(b)
    assert [(it["id"], it["label"], it["path"]) for it in nb.items[n0:]] == [
        (it["id"], it["label"], it["path"]) for it in added]
    assert [it["row"] for it in nb.items] == list(range(n0 + 3))
    verify(b)
    hits = nb.search(_gallery_embed(b, nb, paths), 1)
    assert [h[0]["id"] for h in hits] == [it["id"] for it in added]
    # deployed again: they are carried again (the manifest's record says how many), and so are
    # those added to a carried bundle after it
    (tmp_path / "more").mkdir()
    more = _test_images(cfg, tmp_path / "more", n=5)[4:]
    add_images(b, more, log=quiet)
    assert deploy(cfg, out=b, overwrite=True, log=quiet)["gallery"]["n_items"] == n0 + 4
    assert [it["id"] for it in Bundle(b).items[n0:]] == [it["id"] for it in added] + ["q4.png"]
    # an empty folder is replaced; a swap stopped half-way (the bundle moved to .NAME.old) is
    # named, not deployed over without the old bundle's additions
    (tmp_path / "empty").mkdir()
    assert deploy(cfg, out=tmp_path / "empty", overwrite=True, log=quiet)["gallery"]["n_items"] == n0
    (tmp_path / "empty").rename(tmp_path / ".empty.old")
    with pytest.raises(HwnasError, match=r"\.empty\.old holds a bundle.*move .* back"):
        deploy(cfg, out=tmp_path / "empty", log=quiet)
    # a file gone: refused, with the bundle as it was; then the two ways past it
    paths[0].unlink()
    before = (b / "manifest.json").read_bytes()
    with pytest.raises(HwnasError, match=r"1 cannot be read again .*--skip-bad-images.*--drop-additions"):
        deploy(cfg, out=b, overwrite=True, log=quiet)
    assert (b / "manifest.json").read_bytes() == before
    cfg.data.skip_bad_images = True
    try:
        assert deploy(cfg, out=b, overwrite=True, log=quiet)["gallery"]["n_items"] == n0 + 3
    finally:
        cfg.data.skip_bad_images = False
    assert main(["deploy", "--config", str(root / "c.json"), "--out", str(b), "--overwrite",
                 "--drop-additions"]) == 0
    m = json.loads((b / "manifest.json").read_text())
    assert m["gallery"]["n_items"] == n0 and "additions" not in m


def _gallery_embed(b, nb, paths):
    """The bundle's gallery.onnx embeddings of image files (unit length)."""
    import onnxruntime as ort

    from hwnas_edge.preprocess import normalize

    s = ort.InferenceSession(str(b / "gallery.onnx"), providers=["CPUExecutionProvider"])
    x = normalize(nb.load_images(paths), nb.pre["mean"], nb.pre["std"])
    e = s.run(None, {s.get_inputs()[0].name: x})[0]
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_a_catalog_is_indexed_in_place_of_the_test_gallery(bundle, tmp_path):
    """deploy --catalog: the index holds the gallery model's embeddings of the catalog's images
    (decoded a chunk at a time), the items its ids, a manifest's labels and absolute paths; the
    accuracy figures stay the test split's. A missing catalog stops before anything is built."""
    import faiss
    from PIL import Image

    from hwnas.data.images import Preprocess
    from hwnas.export.deploy import deploy
    from hwnas_edge.bundle import Bundle

    root, cfg, m0 = bundle
    quiet = lambda *_: None  # noqa: E731
    s = api.RunDir(cfg).splits(log=quiet)
    cat = tmp_path / "catalog"
    rows = ["path,label"]
    for j, i in enumerate(s.parts["train"][:7]):  # images the test split's gallery does not hold
        (cat / f"shelf{j % 2}").mkdir(parents=True, exist_ok=True)
        s.collection.read(int(i)).save(cat / f"shelf{j % 2}" / f"item{j}.png")
        rows.append(f"shelf{j % 2}/item{j}.png,{s.collection.class_names[int(s.collection.labels[i])]}")
    (cat / "catalog.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(HwnasError, match="does not exist"):
        deploy(cfg, out=tmp_path / "none", catalog=str(tmp_path / "nowhere"), log=quiet)
    assert not (tmp_path / "none").exists() and not (tmp_path / ".none.staging").exists()

    from hwnas.cli import main

    # the README's deploy --catalog ... --out ..., in this process
    assert main(["deploy", "--config", str(root / "c.json"), "--catalog", str(cat / "catalog.csv"),
                 "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["gallery"]["n_items"] == 7 and m["index"]["source"]["catalog"] == str(cat / "catalog.csv")
    assert m["accuracy"] == m0["accuracy"]  # the test split's, not the catalog's
    items = json.loads((tmp_path / "b" / "gallery_items.json").read_text())
    assert [it["id"] for it in items] == [r.split(",")[0] for r in rows[1:]]
    assert [it["label"] for it in items] == [r.split(",")[1] for r in rows[1:]]
    assert all(Path(it["path"]).is_absolute() and Path(it["path"]).is_file() for it in items)
    # the index's vectors are the gallery model's embeddings of those images, row by row:
    # each one's own gallery embedding finds it first, at cosine 1
    import onnxruntime as ort

    pre = Preprocess.from_dict(m["preprocess"])
    x = pre.normalize(np.stack([pre.image_to_array(Image.open(cat / it["id"])) for it in items]))
    gs = ort.InferenceSession(str(tmp_path / "b" / "gallery.onnx"), providers=["CPUExecutionProvider"])
    ge = gs.run(None, {gs.get_inputs()[0].name: x})[0]
    ge /= np.linalg.norm(ge, axis=1, keepdims=True)
    scores, found = faiss.read_index(str(tmp_path / "b" / "gallery.index")).search(ge, 1)
    assert found[:, 0].tolist() == list(range(7)) and np.allclose(scores[:, 0], 1, atol=1e-4)
    assert Bundle(tmp_path / "b").search(ge[:1], 2)[0][0]["id"] == items[0]["id"]
    # decoded and embedded a chunk at a time: chunks of 3 give the same rows as one of 256
    from hwnas.data.sources import catalog_images
    from hwnas.export.deploy import _embed_catalog

    col, labeled = catalog_images(cat / "catalog.csv")
    fn = lambda b: gs.run(None, {gs.get_inputs()[0].name: b})[0]  # noqa: E731
    e3, it3, _ = _embed_catalog(col, labeled, pre, fn, False, quiet, chunk=3)
    assert it3 == items and np.allclose(e3, ge, atol=1e-5)
    (cat / "twice.csv").write_text("path,label,label\nshelf0/item0.png,a,b\n")
    with pytest.raises(HwnasError, match="names label more than once"):
        deploy(cfg, out=tmp_path / "t", catalog=str(cat / "twice.csv"), log=quiet)
    # a folder: every image at any depth, ids relative to it, no labels
    m = deploy(cfg, out=tmp_path / "f", catalog=str(cat), log=quiet)
    items = json.loads((tmp_path / "f" / "gallery_items.json").read_text())
    assert m["gallery"]["n_items"] == 7 and {it["label"] for it in items} == {None}
    assert sorted(it["id"] for it in items) == sorted(r.split(",")[0] for r in rows[1:])
    # an unreadable catalog image stops deploy, with no bundle; --skip-bad-images leaves it out
    # (every unreadable one named at once, however far apart, not the first alone)
    (cat / "shelf1" / "broken.png").write_bytes(b"\x89PNG not really")
    (cat / "zz-empty.png").write_bytes(b"")
    col, _ = catalog_images(cat)
    with pytest.raises(HwnasError, match=r"2 of 9 images of the catalog cannot be read "
                                         r"\(shelf1/broken.png, zz-empty.png\).*skip-bad-images"):
        _embed_catalog(col, None, pre, fn, False, quiet, chunk=3)
    (cat / "zz-empty.png").unlink()
    args = ["deploy", "--config", str(root / "c.json"), "--catalog", str(cat), "--out", str(tmp_path / "s")]
    assert main(args) == 2 and not (tmp_path / "s").exists()
    assert main([*args, "--skip-bad-images"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["gallery"]["n_items"] == 7 and m["index"]["source"]["skipped"] == ["shelf1/broken.png"]
    # the README's deploy --int8 --overwrite: that bundle replaced by one of the test split's
    # gallery, with the int8 query model beside the fp32 one
    assert main(["deploy", "--config", str(root / "c.json"), "--int8", "--overwrite", "--out", str(tmp_path / "f")]) == 0
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert m["gallery"]["n_items"] == m0["gallery"]["n_items"] and "query.int8.onnx" in m["artifacts"]


def _test_images(cfg, tmp_path, n=4):
    """A few test-split query images as PNG files (what an edge device would get)."""

    rd = api.RunDir(cfg)
    s = rd.splits(log=lambda *_: None)
    paths = []
    for j, i in enumerate(s.parts["query"][:n]):
        p = tmp_path / f"q{j}.png"
        s.collection.read(int(i)).save(p)
        paths.append(p)
    return paths


def _torch_topk(cfg, bundle_dir, paths, k):
    """The PyTorch pipeline: query model + FAISS over the gallery model's embeddings."""
    import faiss
    import torch
    from PIL import Image

    from hwnas.data.images import Preprocess
    from hwnas.nn.models import load_gallery, load_query

    rd = api.RunDir(cfg)
    qnet, qcfg = load_query(rd.path / "query" / "searched")
    g = load_gallery(rd.path / "gallery")
    pre = Preprocess.from_dict(qcfg["preprocess"])
    gi = api.load_part(rd, "gallery", pre, log=lambda *_: None)
    with torch.no_grad():
        ge = g.net(pre.normalize(gi.images)).numpy()
        x = np.stack([pre.image_to_array(Image.open(p)) for p in paths])
        qe = qnet(pre.normalize(torch.from_numpy(x))).numpy()
    index = faiss.IndexFlatIP(ge.shape[1])
    index.add(np.ascontiguousarray(ge / np.linalg.norm(ge, axis=1, keepdims=True)))
    _, rows = index.search(np.ascontiguousarray(qe / np.linalg.norm(qe, axis=1, keepdims=True)), k)
    return [[gi.ids[r] for r in row] for row in rows]


def _no_torch_env(tmp_path):
    """PYTHONPATH with only the deploy package and a blocker that makes torch/timm unimportable."""
    block = tmp_path / "blocker"
    for mod in ("torch", "timm", "torchvision"):
        (block / mod).mkdir(parents=True, exist_ok=True)
        (block / mod / "__init__.py").write_text(
            f"raise ImportError('{mod} is not available on this edge device')\n")
    return {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT / 'deploy'}"}


def test_edge_runtime_without_torch_matches_pytorch(bundle, tmp_path, monkeypatch, capsys):
    root, cfg, _ = bundle
    paths = _test_images(cfg, tmp_path)
    env = _no_torch_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0  # torch really cannot be imported there
    cmd = [sys.executable, "-c",
           "import sys; from hwnas_edge.cli import main; "
           "r = main(sys.argv[1:]); assert 'torch' not in sys.modules; sys.exit(r)",
           "query", str(root / "run" / "bundle"), *map(str, paths), "--top-k", "5", "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    edge = [[h["id"] for h in res["top"]] for res in json.loads(r.stdout)["results"]]
    assert edge == _torch_topk(cfg, root / "run" / "bundle", paths, 5)
    # a folder: every image under it, in sorted order (q0..q3.png here), with the same hits
    r = subprocess.run(cmd[:5] + [str(tmp_path), "--top-k", "5", "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert [x["image"] for x in res] == list(map(str, paths))
    assert [[h["id"] for h in x["top"]] for x in res] == edge
    (tmp_path / "empty").mkdir()
    r = subprocess.run(cmd[:5] + [str(tmp_path / "empty")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "holds no image file" in r.stderr
    # decoded a batch at a time: batches of 3 (4 images: 3 + 1) give the same hits
    from hwnas_edge import cli as edge_cli

    monkeypatch.setattr(edge_cli, "QUERY_BATCH", 3)
    assert edge_cli.main(["query", str(root / "run" / "bundle"), str(tmp_path), "--top-k", "5", "--json"]) == 0
    assert [[h["id"] for h in x["top"]] for x in json.loads(capsys.readouterr().out)["results"]] == edge


def test_edge_add_grows_the_index_without_torch(bundle, tmp_path, monkeypatch):
    """hwnas-edge add (no torch): new images embedded by gallery.onnx join the index and its
    items, the bundle still verifies, and each one's own gallery embedding finds its row at
    cosine 1. Repeated ids and unreadable images are refused with the bundle left as it was;
    --skip-bad-images leaves them out."""
    import shutil

    import faiss
    import onnxruntime as ort

    from hwnas_edge.bundle import Bundle, verify

    root, cfg, _ = bundle
    b = tmp_path / "bundle"
    shutil.copytree(root / "run" / "bundle", b)
    n0 = Bundle(b).index.ntotal
    s = api.RunDir(cfg).splits(log=lambda *_: None)
    new = tmp_path / "new"
    (new / "deep").mkdir(parents=True)
    for j, i in enumerate(s.parts["train"][:3]):
        s.collection.read(int(i)).save(new / ("deep" if j else "") / f"n{j}.png")
    (tmp_path / "other").mkdir()
    shutil.copy(new / "n0.png", tmp_path / "other" / "n0.png")
    (tmp_path / "more.csv").write_text("path,label\nother/n0.png,Sneaker\n")
    env = _no_torch_env(tmp_path)
    edge = [sys.executable, "-c", "import sys; from hwnas_edge.cli import main; "
            "r = main(sys.argv[1:]); assert 'torch' not in sys.modules; sys.exit(r)"]
    proc, url = _start_service(b, tmp_path)  # a service running on the bundle while it grows
    try:
        r = subprocess.run([*edge, "add", str(b), str(new), str(tmp_path / "more.csv"), "--label", "new"],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with urllib.request.urlopen(url + "/health", timeout=10) as h:  # it serves the grown index
            assert json.loads(h.read())["index_size"] == n0 + 4
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    items = json.loads((b / "gallery_items.json").read_text())
    assert len(items) == n0 + 4 and [it["row"] for it in items] == list(range(n0 + 4))
    # ids as hwnas deploy --catalog gives them: the path under the folder or the manifest's folder
    assert [(it["id"], it["label"]) for it in items[n0:]] == [
        ("deep/n1.png", "new"), ("deep/n2.png", "new"), ("n0.png", "new"), ("other/n0.png", "Sneaker")]
    assert verify(b)["hashes"] == "ok" and Bundle(b).manifest["gallery"]["n_items"] == n0 + 4
    # the README's hwnas-edge verify and query --threads on the grown bundle, without torch
    r = subprocess.run([*edge, "verify", str(b)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["hashes"] == "ok", r.stderr
    r = subprocess.run([*edge, "query", str(b), str(new / "deep" / "n1.png"), "--threads", "2", "--json"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    top = json.loads(r.stdout)["results"][0]["top"]
    assert top and [h["score"] for h in top] == sorted((h["score"] for h in top), reverse=True)
    assert Bundle(b).manifest["additions"][-1]["added"] == 4
    m = Bundle(b)
    gs = ort.InferenceSession(str(b / "gallery.onnx"), providers=["CPUExecutionProvider"])
    x = m.load_images([new / "deep" / "n1.png", new / "deep" / "n2.png"])
    from hwnas_edge.preprocess import normalize

    ge = gs.run(None, {gs.get_inputs()[0].name: normalize(x, m.pre["mean"], m.pre["std"])})[0]
    ge /= np.linalg.norm(ge, axis=1, keepdims=True)
    scores, rows = faiss.read_index(str(b / "gallery.index")).search(ge, 1)
    assert [items[r]["id"] for r in rows[:, 0]] == ["deep/n1.png", "deep/n2.png"]
    assert np.allclose(scores[:, 0], 1, atol=1e-4)
    # refused, and nothing changes: ids already there; an unreadable image
    before = {f.name: f.read_bytes() for f in b.iterdir()}
    (tmp_path / "twin").mkdir()  # a file named as one in new/deep: one id from two folders
    shutil.copy(new / "n0.png", tmp_path / "twin" / "n1.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    for args, word in ((["add", str(b), str(new)], "pass --skip-existing"),
                       (["add", str(b), str(tmp_path / "bad")], "pass --skip-bad-images"),
                       (["add", str(b), str(new / "deep"), str(tmp_path / "twin")], "given twice")):
        r = subprocess.run([*edge, *args], env=env, capture_output=True, text=True)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert {f.name: f.read_bytes() for f in b.iterdir()} == before
    (tmp_path / "bad" / "fine.png").write_bytes((new / "n0.png").read_bytes())
    from hwnas_edge.add import add_images

    res = add_images(b, [tmp_path / "bad"], skip_bad=True, log=lambda *_: None)
    assert res["added"] == 1 and res["skipped_files"] == [str(tmp_path / "bad" / "broken.png")]
    assert Bundle(b).index.ntotal == n0 + 5
    # the folder again, one photo more: only the new one, through a symlink to the bundle
    s.collection.read(int(s.parts["train"][3])).save(new / "n3.png")
    (tmp_path / "current").symlink_to(b)
    res = add_images(tmp_path / "current", [new], skip_existing=True, log=lambda *_: None)
    assert (res["added"], res["existing"]) == (1, 3) and (tmp_path / "current").is_symlink()
    assert verify(tmp_path / "current")["hashes"] == "ok" and Bundle(b).index.ntotal == n0 + 6
    assert not any(p.name.startswith(".bundle.") and p.is_dir() for p in tmp_path.iterdir())
    # an image is known by its file too: the same files from another folder level are there
    # already; another file under an indexed id is a clash; a second writer waits its turn
    from hwnas_edge.bundle import BundleError, bundle_lock

    with pytest.raises(BundleError, match="2 of the 2 images are already in the index"):
        add_images(b, [new / "deep"], log=lambda *_: None)
    (tmp_path / "clash").mkdir()
    s.collection.read(int(s.parts["train"][4])).save(tmp_path / "clash" / "n0.png")
    with pytest.raises(BundleError, match="already name other images in the index \\(e.g. n0.png: "):
        add_images(b, [tmp_path / "clash"], skip_existing=True, log=lambda *_: None)
    with bundle_lock(tmp_path / "current"):  # the lock of the bundle a symlink names
        with pytest.raises(BundleError, match="is locked by another hwnas-edge add or hwnas deploy"):
            add_images(b, [tmp_path / "clash" / "n0.png"], log=lambda *_: None)
    (tmp_path / "new" / "alias.png").symlink_to(new / "n3.png")  # one file under two names
    with pytest.raises(BundleError, match="given twice under two names"):
        add_images(b, [new / "alias.png", new / "n3.png"], log=lambda *_: None)
    (tmp_path / "new" / "alias.png").unlink()
    # the catalog moved (another machine, another mount): its recorded files are gone, its ids
    # are the same, so they are repeats, and only a new photo goes in
    shutil.move(new, tmp_path / "moved")
    s.collection.read(int(s.parts["train"][5])).save(tmp_path / "moved" / "n5.png")
    res = add_images(b, [tmp_path / "moved"], skip_existing=True, log=lambda *_: None)
    assert (res["added"], res["existing"]) == (1, 4)
    assert Bundle(b).index.ntotal == n0 + 7
    # a .zip of new photos (members read one at a time): ids as deploy --catalog gives them,
    # no file recorded, known by id when given again; a damaged member is skipped by name
    import zipfile

    with zipfile.ZipFile(tmp_path / "photos.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for j in (6, 7):
            s.collection.read(int(s.parts["train"][j])).save(tmp_path / f"z{j}.png")
            zf.write(tmp_path / f"z{j}.png", f"shop/z{j}.png")
        zf.writestr("shop/broken.png", b"not a png")
    res = add_images(b, [tmp_path / "photos.zip"], skip_bad=True, log=lambda *_: None)
    assert res["added"] == 2 and res["skipped_files"] == [f"{tmp_path / 'photos.zip'}:shop/broken.png"]
    items = json.loads((b / "gallery_items.json").read_text())
    assert [(it["id"], it["path"]) for it in items[-2:]] == [("photos/shop/z6.png", None), ("photos/shop/z7.png", None)]
    ge = gs.run(None, {gs.get_inputs()[0].name: normalize(m.load_images([tmp_path / "z7.png"]), m.pre["mean"], m.pre["std"])})[0]
    _, rows = faiss.read_index(str(b / "gallery.index")).search(ge / np.linalg.norm(ge, axis=1, keepdims=True), 1)
    assert items[int(rows[0, 0])]["id"] == "photos/shop/z7.png"
    with pytest.raises(BundleError, match="2 of the 3 images are already in the index"):
        add_images(b, [tmp_path / "photos.zip"], log=lambda *_: None)
    # a zip rewritten after it was listed stops the addition whole (not skipped image by image
    # as unreadable, even with skip_bad), and nothing is added
    import hwnas_edge.add

    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.write(tmp_path / "z6.png", "z8.png")
    listed = hwnas_edge.add.image_sources

    def listed_then_rewritten(*a, **k):
        out = listed(*a, **k)
        with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:  # (in place, the same inode:
            zf.write(tmp_path / "z7.png", "z8.png")  # a second member makes the size differ)
            zf.write(tmp_path / "z6.png", "z9.png")
        return out

    monkeypatch.setattr(hwnas_edge.add, "image_sources", listed_then_rewritten)
    with pytest.raises(BundleError, match="more.zip was replaced or changed since.*nothing was added"):
        add_images(b, [tmp_path / "more.zip"], skip_bad=True, log=lambda *_: None)
    assert verify(b)["hashes"] == "ok" and Bundle(b).index.ntotal == n0 + 9


def test_the_readmes_python_example_runs_without_torch(bundle, tmp_path):
    """The README's hwnas_edge example, on this bundle and a test image, without torch: it
    prints the bundle's own top 5 for the image."""
    import re

    from hwnas_edge.bundle import Bundle

    root, cfg, _ = bundle
    code = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                if "from hwnas_edge.bundle import Bundle" in b)
    img = _test_images(cfg, tmp_path, n=1)[0]
    code = code.replace("runs/quickstart/bundle", str(root / "run" / "bundle")).replace("photo.png", str(img))
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys; assert 'torch' not in sys.modules"],
                       env=_no_torch_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b = Bundle(root / "run" / "bundle")
    want = [h["id"] for h in b.search(b.embed(b.load_images([img])), 5)[0]]
    assert [line.split()[1] for line in r.stdout.splitlines()] == want


def test_deploy_catalog_and_edge_add_name_a_file_alike(tmp_path, monkeypatch):
    """The same catalog, given relative, absolute or through a symlinked folder, as a folder or
    as a manifest with a row outside its folder: hwnas deploy --catalog and hwnas-edge add
    give every file the same id (their repeat check depends on it)."""
    from hwnas.data.sources import catalog_images
    from hwnas_edge.sources import image_sources

    (tmp_path / "cat" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    for f in ("cat/a.png", "cat/sub/b.png", "other/o.png"):
        (tmp_path / f).write_bytes(b"\x89PNG")  # listed, not decoded
    (tmp_path / "cat" / "m.csv").write_text("path,label\na.png,x\n./sub/b.png,\n../other/o.png,y\n")
    (tmp_path / "link").symlink_to(tmp_path / "cat")
    monkeypatch.chdir(tmp_path)
    want = {"cat": ["a.png", "sub/b.png"], "m.csv": ["a.png", "sub/b.png", "../other/o.png"]}
    for spelled in ("cat", str(tmp_path / "cat"), "link", "./cat/../cat"):
        for src, ids in ((spelled, want["cat"]), (f"{spelled}/m.csv", want["m.csv"])):
            col, labels = catalog_images(src)
            assert col.ids == ids == [i for _, i, _ in image_sources([src])], src
    assert catalog_images("cat/m.csv")[1] == ["x", None, "y"]
    import zipfile

    with zipfile.ZipFile("cat.zip", "w") as zf:  # a zip: its stem, then the member's path
        for f in ("a.png", "sub/b.png", "sub/.hidden.png", "notes.txt"):
            zf.writestr(f, b"\x89PNG")
    assert catalog_images("cat.zip")[0].ids == ["cat/a.png", "cat/sub/b.png"] == [
        i for _, i, _ in image_sources(["cat.zip"])]


def test_a_failed_swap_puts_the_old_bundle_back(tmp_path, monkeypatch):
    """replace_dir: if the new folder cannot take the old one's place, the old one goes back;
    a bundle found only as .NAME.old (a kill between the renames) is named by Bundle()."""
    from hwnas_edge.bundle import Bundle, BundleError, replace_dir

    out, staging = tmp_path / "bundle", tmp_path / ".bundle.staging"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    staging.mkdir()
    real = Path.rename

    def rename(self, target):
        if self == staging:
            raise OSError("no space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        replace_dir(staging, out)
    assert (out / "manifest.json").read_text() == "old" and not (tmp_path / ".bundle.old").exists()
    monkeypatch.undo()
    out.rename(tmp_path / ".bundle.old")
    with pytest.raises(BundleError, match="stopped half-way; move .*\\.bundle\\.old back"):
        Bundle(out)


def test_edge_session_runs_at_the_deployed_thread_count(bundle):
    from hwnas_edge.bundle import Bundle, BundleError

    root, cfg, m = bundle
    b = Bundle(root / "run" / "bundle")
    deployed = m["latency"]["measured_onnxruntime_cpu"]["threads"]
    assert b.query_threads == deployed >= 1
    assert b.session().get_session_options().intra_op_num_threads == deployed
    other = b.session(threads=deployed + 1)  # an override, not cached as the default session
    assert other.get_session_options().intra_op_num_threads == deployed + 1
    assert b.session().get_session_options().intra_op_num_threads == deployed
    with pytest.raises(BundleError, match="threads"):
        b.session(threads=0)


def test_damaged_bundles_are_clear_errors(bundle, tmp_path):
    """A bundle whose manifest is cut off or lacks a key, whose query.onnx is not ONNX or
    from another deployment, or whose index is cut off, is a BundleError naming the file and
    the fix (deploy again), never a decoder traceback; the edge CLI checks its own flags."""
    import shutil

    from hwnas_edge.bundle import Bundle, BundleError, verify

    root, _, m = bundle

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(root / "run" / "bundle", d)
        edit(d)
        return d

    # the path of one of its files, or of nothing, says which
    with pytest.raises(BundleError, match="is a file of a bundle; give the bundle's folder"):
        Bundle(root / "run" / "bundle" / "manifest.json")
    with pytest.raises(BundleError, match="no manifest.json: it does not exist"):
        Bundle(tmp_path / "nowhere")
    from hwnas_edge.sources import image_sources

    with pytest.raises(BundleError, match="nowhere.png does not exist; give an image file"):
        image_sources([tmp_path / "nowhere.png"], None)
    cut = damaged("cut", lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:200]))
    with pytest.raises(BundleError, match="manifest.*deploy the bundle again"):
        Bundle(cut)

    def drop_preprocess(d):
        mf = json.loads((d / "manifest.json").read_text())
        del mf["preprocess"]["size"]
        (d / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="lacks preprocess.size"):
        Bundle(damaged("nokey", drop_preprocess))

    def other_fingerprint(d):
        mf = json.loads((d / "manifest.json").read_text())
        mf["query"]["fingerprint"] = "0123456789abcdef"
        (d / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="query_fingerprint .* manifest says 0123456789abcdef"):
        Bundle(damaged("otherfp", other_fingerprint)).session()
    notonnx = damaged("notonnx", lambda d: (d / "query.onnx").write_bytes(b"not a model"))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load .*query.onnx"):
        Bundle(notonnx, check_hashes=False).session()
    short = damaged("short", lambda d: (d / "gallery.index").write_bytes((d / "gallery.index").read_bytes()[:100]))
    with pytest.raises(BundleError, match="FAISS cannot read"):
        Bundle(short, check_hashes=False).index
    with pytest.raises(BundleError, match="gallery.index has changed"):
        verify(short)
    env = _no_torch_env(tmp_path)
    b = str(root / "run" / "bundle")
    img = str(_test_images(bundle[1], tmp_path, 1)[0])
    # a PNG whose header claims 20000 x 20000 pixels (PIL's decompression-bomb guard)
    bomb = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    # a "service" that takes the connection and closes it without an answer
    drop = socket.socket()
    drop.bind(("127.0.0.1", 0))
    drop.listen()

    def hang_up():
        for _ in range(2):
            try:
                c, _ = drop.accept()
            except OSError:
                return
            c.recv(65536)
            c.close()
    threading.Thread(target=hang_up, daemon=True).start()
    dropped = f"http://127.0.0.1:{drop.getsockname()[1]}"
    for images, args, word in [
            ([img], ["--top-k", "0"], "--top-k: must be a whole number of 1 or more"),
            ([img], ["--server", "notaurl"], "must be an http:// or https:// URL"),
            ([img], ["--server", "http://h:abc"], "is not a valid URL"),
            ([img], ["--server", dropped], "broke off the exchange"),
            ([str(bomb)], [], "cannot read image")]:
        r = subprocess.run([sys.executable, "-m", "hwnas_edge.cli", "query", b, *images, *args],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, r.stderr
    drop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start_service(bundle_dir, tmp_path, *args):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "hwnas_edge.cli", "serve", str(bundle_dir),
                          "--port", str(port), *args], env=_no_torch_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60  # (it loads ONNX Runtime and the index: seconds on a busy machine)
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return p, url
        except OSError:
            time.sleep(0.1)
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail("service did not start: " + p.stderr.read())


@pytest.fixture
def service(bundle, tmp_path):
    root, _, m = bundle
    p, url = _start_service(root / "run" / "bundle", tmp_path, "--max-batch", "4")
    yield url, m
    p.terminate()
    p.wait(timeout=10)


def test_service_answers_and_refuses(service, bundle, tmp_path):
    url, m = service
    dim = m["embed_dim"]
    fp = m["query"]["fingerprint"]
    v = np.random.default_rng(0).normal(size=(2, dim)).tolist()
    status, body = _post(url + "/search", json.dumps({"embeddings": v, "fingerprint": fp, "top_k": 3}).encode())
    assert status == 200 and len(body["results"]) == 2 and len(body["results"][0]) == 3
    cases = [
        ({"embeddings": v, "fingerprint": "0123456789abcdef"}, 409, "not compatible"),
        ({"embeddings": [[0.1] * (dim + 1)], "fingerprint": fp}, 422, str(dim)),
        ({"embeddings": [[0.1] * dim] * 5, "fingerprint": fp}, 413, "batch limit"),
        ({"embeddings": v, "fingerprint": fp, "top_k": 0}, 400, "top_k"),
        ({"embeddings": [["x"] * dim], "fingerprint": fp}, 422, "numbers"),
        ({"embeddings": [["0.5"] * dim], "fingerprint": fp}, 422, "only numbers"),
        ({"embeddings": [[[1]] * dim], "fingerprint": fp}, 422, "only numbers"),
        ({"embeddings": v}, 400, "fingerprint"),
        ({"embeddings": [[10 ** 400] + [0.1] * (dim - 1)], "fingerprint": fp}, 422, "finite"),
    ]
    for body_, code, word in cases:
        status, resp = _post(url + "/search", json.dumps(body_).encode())
        assert status == code and word in resp["error"], (body_, status, resp)
    status, resp = _post(url + "/search", b"{not json")
    assert status == 400 and "JSON" in resp["error"]
    # a chunked body names no length: it is read up to the limit (8 MB), not whole
    import http.client

    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(12):  # 12 MB, in 1 MB chunks
            conn.send(b"100000\r\n" + b" " * 0x100000 + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # (the service answered and closed)
        pass
    r = conn.getresponse()
    assert r.status == 413 and b"exceeds the limit" in r.read()
    conn.close()
    with urllib.request.urlopen(url + "/health", timeout=5) as r:  # still alive
        h = json.loads(r.read())
    assert h["status"] == "ok" and h["index_size"] == m["gallery"]["n_items"]
    # the edge runtime searching through the service gives what the local index gives
    root, cfg, _ = bundle
    paths = _test_images(cfg, tmp_path, 2)
    env = _no_torch_env(tmp_path)
    args = ["query", str(root / "run" / "bundle"), *map(str, paths), "--top-k", "3", "--json"]
    local = subprocess.run([sys.executable, "-m", "hwnas_edge.cli", *args], env=env,
                           capture_output=True, text=True)
    remote = subprocess.run([sys.executable, "-m", "hwnas_edge.cli", *args, "--server", url],
                            env=env, capture_output=True, text=True)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    ids = lambda out: [[h["id"] for h in r["top"]] for r in json.loads(out)["results"]]  # noqa: E731
    assert ids(local.stdout) == ids(remote.stdout)
    # a device that only embeds carries the manifest and the query models, not the gallery's files
    import shutil

    device = tmp_path / "device"
    device.mkdir()
    for name in ("manifest.json", "query.onnx"):  # (the int8 model only where --int8 is used)
        shutil.copy(root / "run" / "bundle" / name, device / name)
    thin = subprocess.run([sys.executable, "-m", "hwnas_edge.cli", "query", str(device), *args[2:], "--server", url],
                          env=env, capture_output=True, text=True)
    assert thin.returncode == 0 and ids(thin.stdout) == ids(local.stdout), thin.stderr
    thin8 = subprocess.run([sys.executable, "-m", "hwnas_edge.cli", "query", str(device), *args[2:], "--server", url,
                            "--int8"], env=env, capture_output=True, text=True)
    assert thin8.returncode == 2 and "query.int8.onnx is missing" in thin8.stderr, thin8.stderr
    # more images than the service's --max-batch (4): sent in parts, the same answers as locally
    (tmp_path / "six").mkdir()
    six = [str(q) for q in _test_images(cfg, tmp_path / "six", 6)]
    local6, remote6 = (subprocess.run([sys.executable, "-m", "hwnas_edge.cli", "query", str(root / "run" / "bundle"),
                                       *six, "--top-k", "3", "--json", *extra], env=env, capture_output=True, text=True)
                       for extra in ([], ["--server", url]))
    assert remote6.returncode == 0 and ids(remote6.stdout) == ids(local6.stdout), remote6.stderr
    # the endpoint's URL given for the service's: the 404 says to give the base URL
    from hwnas_edge.bundle import BundleError
    from hwnas_edge.cli import _remote_search

    with pytest.raises(BundleError, match=r"\(404\).*takes the service's base URL .*e.g. " + re.escape(url)):
        _remote_search(url.rstrip("/") + "/search", np.ones((1, 4), np.float32), "x", 1)


def test_index_search_params_travel_with_the_file(tmp_path):
    import faiss

    from hwnas.export.deploy import build_index, default_factory

    assert default_factory(1000) == "Flat" and default_factory(1_000_000).startswith("IVF4000")
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    for factory, key in (("IVF32,Flat", "nprobe"), ("HNSW16", "efSearch")):
        index, info = build_index(x, factory)
        assert key in info["search_params"]
        faiss.write_index(index, str(tmp_path / "i"))
        r = faiss.read_index(str(tmp_path / "i"))
        got = faiss.try_extract_index_ivf(r).nprobe if key == "nprobe" else r.hnsw.efSearch
        assert got == info["search_params"][key]
    with pytest.raises(HwnasError, match="needs training data"):
        build_index(x[:10], "IVF32,Flat")


def test_an_index_too_large_for_the_gallery_names_one_that_fits():
    from hwnas.export.deploy import build_index

    emb = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    with pytest.raises(HwnasError, match=r"at least 100000 items.*has 500.*IVF12,Flat"):
        build_index(emb, "IVF100000,Flat", use_gpu=False)
    index, _ = build_index(emb, "IVF12,Flat", use_gpu=False)  # the suggestion builds
    assert index.ntotal == 500


@pytest.mark.parametrize("args", [["--port", "-1"], ["--port", "99999"], ["--port", "http"],
                                  ["--max-batch", "0"]])
def test_edge_serve_refuses_a_bad_port_or_batch_at_parse(args, capsys):
    """hwnas-edge serve --port -1 was an OverflowError traceback from the socket layer."""
    from hwnas_edge.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "bundle", *args])
    assert e.value.code == 2 and f"argument {args[0]}" in capsys.readouterr().err


def test_edge_serve_on_an_address_in_use_says_so_before_serving(bundle, capsys):
    """A port another process listens on, or a host of no interface here, is one line naming
    the fix, before "serving ..." is said (uvicorn said "serving", then its own error)."""
    import socket

    from hwnas_edge.cli import main as edge_main

    root, _, _ = bundle
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        port = held.getsockname()[1]
        assert edge_main(["serve", str(root / "run" / "bundle"), "--port", str(port)]) == 2
        out = capsys.readouterr()
        assert f"cannot listen on 127.0.0.1:{port}" in out.err and "give another --port" in out.err
        assert "serving" not in out.out
    finally:
        held.close()
    assert edge_main(["serve", str(root / "run" / "bundle"), "--host", "192.0.2.1", "--port", str(port)]) == 2
    assert "give an address of this machine with --host" in capsys.readouterr().err
