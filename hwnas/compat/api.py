"""The compatibility commands as functions: train-gallery, train-supernet, train-query,
evaluate. The CLI and the pipeline call these; each reads and writes the run directory.

Run directory layout::

    gallery/   model.safetensors, config.json (fingerprint), checkpoint.safetensors
    supernet/  model.safetensors, config.json, checkpoint.safetensors
    query/<name>/  model.safetensors, config.json, checkpoint.safetensors, evaluation.json
    cache/     frozen gallery embeddings (keyed by gallery fingerprint and split)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hwnas.config import Config
from hwnas.errors import HwnasError
from hwnas.rundir import RunDir
from hwnas.utils import atomic_path, bars_off, read_json, write_json


# ---------------------------------------------------------------------- data
@dataclass
class PartImages:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64: rows of the classifier's class list (train) or raw labels
    raw_labels: np.ndarray
    ids: list[str]


def load_part(rd: RunDir, part: str, pre, class_names: list[str] | None = None, log=print) -> PartImages:
    """Decode one split part. With ``class_names``, labels become rows of that list (and a
    class missing from it is a clear error)."""
    from hwnas.data.images import materialize

    splits = rd.splits(log=log)
    col = splits.collection
    arr = materialize(col, splits.parts[part], pre, rd.cfg.data.skip_bad_images, desc=part,
                      cache_dir=rd.path / "decoded")  # (not cache/: a gallery trained again keeps it)
    if arr.skipped:
        log(f"[data] skipped {len(arr.skipped)} unreadable images in {part} (e.g. {arr.skipped[0]})")
    if len(arr.images) == 0:
        raise HwnasError(f"split part {part!r} is empty; check data.split settings")
    raw = arr.labels
    if class_names is None:
        labels = raw
    else:
        row = {c: i for i, c in enumerate(class_names)}
        names = [col.class_names[c] for c in raw]
        missing = sorted({n for n in names if n not in row})
        if missing:
            raise HwnasError(
                f"{len(missing)} training classes (e.g. {missing[0]!r}) are not among the "
                f"gallery classifier's {len(class_names)} classes, so the BCT loss cannot use "
                "them: retrain the gallery on this split (hwnas train-gallery --restart) or "
                "set supernet.loss.bct: 0"
            )
        labels = np.array([row[n] for n in names], np.int64)
    return PartImages(torch.from_numpy(arr.images), torch.from_numpy(labels), raw, arr.ids(col))


def train_class_names(rd: RunDir) -> list[str]:
    s = rd.splits()
    return sorted({s.collection.class_names[c] for c in s.labels("train")})


@torch.no_grad()
def embed(net, images: torch.Tensor, normalize, batch: int = 256, desc: str = "embed",
          arch=None) -> np.ndarray:
    from tqdm import tqdm

    net.eval()
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False, disable=bars_off(len(images) < 4096)):
        x = normalize(images[i:i + batch])
        out.append(net(x) if arch is None else net(x, arch))
    return torch.cat(out).numpy()


def _cached(path: Path, key: str, compute) -> np.ndarray:
    """An embedding array cached in a safetensors file, recomputed when ``key`` differs."""
    from safetensors.numpy import load_file, save_file

    if path.exists():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                if (f.metadata() or {}).get("key") == key:
                    return load_file(str(path))["emb"]
        except (SafetensorError, OSError):
            pass  # a damaged cache is a miss: recomputed and rewritten below
    emb = np.ascontiguousarray(compute(), dtype=np.float32)
    with atomic_path(path) as tmp:  # a unique temp name: workers may race here
        save_file({"emb": emb}, str(tmp), metadata={"key": key})
    return emb


def gallery_embeddings(rd: RunDir, gallery, part: str, images: PartImages | None = None,
                       log=print, all_ranks: bool = False) -> np.ndarray:
    """The frozen gallery model's embeddings of a split part, cached per fingerprint+split.
    ``all_ranks``: every torchrun process calls this at once (training): the first computes
    and writes the cache, the others wait for it and read it."""
    from hwnas.compat.train import barrier, dist_info

    rank, world = dist_info()
    if all_ranks and world > 1:
        first = rank == 0
        if not first:
            barrier()
        emb = gallery_embeddings(rd, gallery, part, images, log=log if first else (lambda *a, **k: None))
        if first:
            barrier()
        return emb
    from hwnas.data.images import Preprocess

    pre = Preprocess.from_dict(gallery.config["preprocess"])
    splits = rd.splits(log=log)
    key = f"{gallery.fingerprint}-{splits.fingerprint}-{part}"

    def compute():
        imgs = images if images is not None else load_part(rd, part, pre, log=log)
        return embed(gallery.net, imgs.images, pre.normalize, desc=f"gallery embeds {part}")

    return _cached(rd.path / "cache" / f"gallery-{part}.safetensors", key, compute)


def _same_training(recorded: dict | None, wanted: dict) -> bool:
    """A model's recorded training settings are the wanted ones: where and on how many
    threads it trained is not what it trained, nor a setting added since at its default."""
    from hwnas.compat.train import what_trains

    return what_trains(recorded or {}) == what_trains(json.loads(json.dumps(wanted)))


# how a difference is named to the user: what was retrained since, rather than a hash
_DIFF_NAMES = {"gallery_fingerprint": "gallery model (retrained since)",
               "supernet_fingerprint": "supernet (retrained since)", "splits_fingerprint": "split"}
# a recorded setting named as the config spells it (a difference the config can restore)
_SETTING_NAMES = {"unlabeled_source": "data.unlabeled",
                  "backbone_checkpoint_sha256": "the contents of gallery.backbone_checkpoint (the file changed since)"}


def _differs(old: dict, want: dict, always: tuple = (), sources: tuple = ("unlabeled_source",)) -> list[str]:
    """What a finished model's recorded ``old`` config has other than ``want``, named for the
    user (``train`` compared without its runtime settings; ``space`` by hash, its name aside;
    the keys in ``sources`` as the files they name, not as spellings of them). A key the model
    does not record (made by an older hwnas) is not compared, except those in ``always``."""
    from hwnas.space import SearchSpace

    want = json.loads(json.dumps(want))
    old = dict(old)
    for d in (old, want):
        if isinstance(d.get("space"), dict):
            d["space"] = SearchSpace.from_dict(d["space"]).hash

    def same(k, a, b):
        if k == "train":
            return _same_training(a, b)
        return _same_sources(a, b) if k in sources else a == b

    names = {**_DIFF_NAMES, **_SETTING_NAMES}
    return [names.get(k, k) for k, v in want.items()
            if (k in old or k in always) and not same(k, old.get(k), v)]


def _differs_error(out: Path, what: str, diff: list[str], step: str, old: dict | None = None,
                   want: dict | None = None, spell: dict | None = None) -> HwnasError:
    """A finished model is not what is asked: the error names the difference and the fixes;
    with the model's recorded ``old`` and the asked ``want``, the model's values of the plain
    settings that differ, each named as ``spell`` maps it to the config."""
    fixes = f"--restart to train it again (hwnas run: --from {step})"
    plain = (str, int, float, bool, type(None))
    shown = [f"{(spell or {}).get(k, k)}: {json.dumps(old[k])}" for k in diff if old is not None and want is not None
             and k in old and k in want and isinstance(old[k], plain) and isinstance(want[k], plain)]
    if shown and len(shown) == len(diff):
        fixes += f", or set the config to the model's ({', '.join(shown)}) to keep it"
    elif any(d not in _DIFF_NAMES.values() for d in diff):
        fixes += ", or restore the config" + (f" (the model's {', '.join(shown)})" if shown else "")
    return HwnasError(f"{out} holds {what} trained with other {', '.join(diff)} than this run asks: {fixes}")


def _gallery_fingerprint(rd: RunDir) -> str | None:
    """The run's trained gallery model's fingerprint, without loading its weights (None: none yet)."""
    p = rd.path / "gallery" / "config.json"
    return read_json(p)["fingerprint"] if p.exists() else None


def check_supernet_gallery(scfg: dict, gallery_fp: str | None, what: str) -> None:
    """Refuse a supernet trained against another gallery model than the run's (the gallery
    retrained since): its subnets learned another embedding space."""
    if gallery_fp is not None and scfg.get("gallery_fingerprint") not in (None, gallery_fp):
        raise HwnasError(f"the supernet was trained against gallery model {scfg['gallery_fingerprint']}, "
                         f"but this run's gallery is {gallery_fp} (retrained since): retrain the supernet "
                         f"(hwnas train-supernet --restart; hwnas run: --from train-supernet) before {what}")


def query_dir(rd: RunDir, name: str) -> Path:
    """``RUN_DIR/query/NAME``; a name that would leave that folder (``..``, ``a/b``) is an
    error, since --restart empties the folder it names."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise HwnasError(f"--name {name!r} must be a plain folder name (letters, digits, - _ @ ...; "
                         "no '/', no leading '.'): it names RUN_DIR/query/NAME")
    return rd.path / "query" / name


def _holds_folder(what: str, folder_of):
    """Decorator: the training function runs under its model folder's training lock
    (:func:`hwnas.compat.train.checkpoint_lock`) from its first look at the folder to its end,
    not from its training loop alone: before the loop, --restart empties the folder, a changed
    model is deleted and a stale checkpoint dropped, and none of that may touch a folder that
    another process is training in. ``folder_of(**arguments)``: the folder. Where the folder's
    parent does not exist yet no process trains there, and the loop takes the lock."""
    import functools
    import inspect

    def wrap(f):
        sig = inspect.signature(f)

        @functools.wraps(f)
        def run(*a, **kw):
            from hwnas.compat.train import checkpoint_lock

            args = sig.bind(*a, **kw)
            args.apply_defaults()
            out = folder_of(**args.arguments)
            with checkpoint_lock(out / "checkpoint.safetensors", f"{what} {out.name}", args.arguments["log"],
                                 where_folder_may_be=True):
                return f(*a, **kw)
        return run
    return wrap


def _prepare_out(out: Path, restart: bool, tc=None) -> bool:
    """True if a finished model is already there (and ``restart`` is off). Under torchrun the
    environment is checked before anything is deleted, and one process deletes; so is the
    training's device (``tc``): a --restart that cannot train must not cost the trained model."""
    from hwnas.compat.train import barrier, dist_info, train_device

    rank, _ = dist_info()
    if restart and out.exists() and tc is not None:
        train_device(tc)
    if restart and out.exists() and rank == 0:
        shutil.rmtree(out)
    barrier()
    return (out / "model.safetensors").exists() and (out / "config.json").exists()


def check_compatible(gallery_cfg: dict, embed_dim: int, pre) -> None:
    """Refuse a gallery/query pair that cannot be compatible, with the fix."""
    gp = gallery_cfg["preprocess"]
    if gallery_cfg["embed_dim"] != embed_dim:
        raise HwnasError(
            f"the gallery model embeds in {gallery_cfg['embed_dim']} dimensions but the query "
            f"model's embed_dim is {embed_dim}: set space.embed_dim: "
            f"{gallery_cfg['embed_dim']} (or retrain the gallery)"
        )
    if gp["channels"] != pre.channels:
        raise HwnasError(f"the gallery model takes {gp['channels']}-channel images but the query "
                         f"space takes {pre.channels}: set space.in_channels to match")
    if gp["size"] != pre.size:
        # the query learns the gallery's embeddings of the very images it sees: at another size
        # those targets are not what the gallery indexes with
        raise HwnasError(f"the gallery model takes {gp['size']} px images but the query space takes "
                         f"{pre.size} px: set space.input_size: {gp['size']}, or retrain the gallery at "
                         f"{pre.size} px (hwnas train-gallery --restart)")
    if [round(v, 6) for v in gp["mean"]] != [round(v, 6) for v in pre.mean] or \
            [round(v, 6) for v in gp["std"]] != [round(v, 6) for v in pre.std]:
        raise HwnasError(
            f"input normalization differs: gallery mean/std {gp['mean']}/{gp['std']}, query "
            f"{list(pre.mean)}/{list(pre.std)}; set data.mean and data.std to the gallery's"
        )


# ---------------------------------------------------------------------- gallery
def gallery_record(cfg: Config, rd: RunDir) -> dict:
    """What a gallery model records of its training: compared with a finished model, saved
    with a new one."""
    from hwnas.nn.heads import CosineClassifier

    gc, space = cfg.gallery, cfg.search_space()
    classes = train_class_names(rd)
    with torch.random.fork_rng(devices=[]):  # (its weights are not wanted: the training's
        head = CosineClassifier(space.embed_dim, len(classes), gc.scale, gc.margin, gc.classifier)  # draws stay)
    return {"backbone": gc.backbone, "embed_dim": space.embed_dim, "preprocess": cfg.preprocess().to_dict(),
            "classifier": {**head.config(), "classes": classes},
            "backbone_checkpoint": gc.backbone_checkpoint, "freeze_backbone": gc.freeze_backbone,
            # the weights it started from, by content: a file replaced under the same name is
            # another start (a gallery recorded before this is not held to it)
            "backbone_checkpoint_sha256": _file_sha256(gc.backbone_checkpoint),
            "train": cfg.train_config("gallery").__dict__, "splits_fingerprint": rd.splits().fingerprint,
            "seed": cfg.seed}


def gallery_differs(cfg: Config, rd: RunDir, recorded: dict, want: dict | None = None) -> list[str]:
    """What a gallery model (its ``config.json``, ``recorded``) was trained with other than the
    config asks, named for the user ([]: what the config asks). The backbone's weights file is
    its content: the same file moved or reached through a link is the same start."""
    want = want or gallery_record(cfg, rd)
    diff = _differs(recorded, want, sources=("unlabeled_source", "backbone_checkpoint"))
    sha = recorded.get("backbone_checkpoint_sha256")
    if sha is not None and sha == want["backbone_checkpoint_sha256"]:
        diff = [d for d in diff if d != "backbone_checkpoint"]
    elif "backbone_checkpoint" in diff or want["backbone_checkpoint_sha256"] is None:
        # (another file: its contents differ as a matter of course; the file gone since the
        # training: a finished model needs it no more, and a new training names it missing)
        diff = [d for d in diff if d != _SETTING_NAMES["backbone_checkpoint_sha256"]]
    return diff


def checkpoint_replaced(cfg: Config) -> str | None:
    """Why the run's trained gallery is not what ``gallery.backbone_checkpoint`` now holds (the
    file replaced under its name since the gallery was trained from it), or None."""
    p = RunDir(cfg).path / "gallery" / "config.json"
    if not cfg.gallery.backbone_checkpoint or not p.exists():
        return None
    g = read_json(p)
    old, now = g.get("backbone_checkpoint_sha256"), _file_sha256(cfg.gallery.backbone_checkpoint)
    if old is None or now is None or old == now or g.get("backbone_checkpoint") != cfg.gallery.backbone_checkpoint:
        return None  # (not recorded by an older hwnas; a missing file or another path: named elsewhere)
    return (f"gallery.backbone_checkpoint {cfg.gallery.backbone_checkpoint} holds other weights than the "
            f"gallery model was trained from (sha256 {old[:12]} -> {now[:12]})")


def _file_sha256(path: str | None) -> str | None:
    """A file's sha256 (None: no path, or no such file — the checks name that)."""
    from hwnas.nn.models import _weights_hash

    return _weights_hash(Path(path)) if path and Path(path).is_file() else None


def check_backbone_checkpoint(gc) -> None:
    """The gallery's given backbone weights: present where named, named where frozen."""
    if gc.freeze_backbone and not gc.backbone_checkpoint:
        raise HwnasError("gallery.freeze_backbone (--freeze-backbone) trains only the embedding head of "
                         "weights you give: set gallery.backbone_checkpoint (--backbone-checkpoint, your "
                         "timm weights), or drop freeze_backbone")
    if gc.backbone_checkpoint and not Path(gc.backbone_checkpoint).is_file():
        what = "is a folder" if Path(gc.backbone_checkpoint).is_dir() else "does not exist"
        raise HwnasError(f"gallery.backbone_checkpoint {gc.backbone_checkpoint} {what}; give "
                         "your timm weights' file (safetensors or a torch state dict)")


def gallery_network(cfg: Config):
    """The gallery's network as its training starts (seeded), with the user's backbone weights
    loaded: ``(net, what was loaded or None)``. Everything that can refuse the training before it
    starts is checked here — the weights file, a backbone that cannot take the run's images,
    weights of another backbone — so that a retraining that cannot run costs no trained model."""
    from hwnas.nn.models import EmbeddingNet, check_takes_input, load_backbone_checkpoint

    gc, space, pre = cfg.gallery, cfg.search_space(), cfg.preprocess()
    check_backbone_checkpoint(gc)
    torch.manual_seed(cfg.seed)
    net = EmbeddingNet(gc.backbone, space.embed_dim, pre.channels, bn=True)
    check_takes_input(net, gc.backbone, pre.channels, pre.size, "gallery.backbone")
    return net, (load_backbone_checkpoint(net, gc.backbone_checkpoint) if gc.backbone_checkpoint else None)


@_holds_folder("train-gallery", lambda cfg, **_: RunDir(cfg).path / "gallery")
def train_gallery(cfg: Config, resume: bool = False, restart: bool = False, log=print) -> dict:
    from hwnas.compat.tasks import GalleryTask
    from hwnas.compat.train import fit, is_main
    from hwnas.nn.heads import CosineClassifier
    from hwnas.nn.models import save_model

    rd = RunDir(cfg)
    out = rd.path / "gallery"
    from hwnas.nn.models import check_timm_name

    note = check_timm_name(cfg.gallery.backbone)  # a typo must not cost the trained model (--restart)
    if note:
        log(f"[train-gallery] NOTE: {note}")
    gc, space, pre = cfg.gallery, cfg.search_space(), cfg.preprocess()
    net = loaded = None
    if restart or not ((out / "model.safetensors").exists() and (out / "config.json").exists()):
        # (a finished model needs none of it) before --restart deletes the trained model, and
        # before the splits are written
        net, loaded = gallery_network(cfg)
    tc = cfg.train_config("gallery")
    record = gallery_record(cfg, rd)
    classes, split_fp = record["classifier"]["classes"], record["splits_fingerprint"]
    if _prepare_out(out, restart, tc):
        g = read_json(out / "config.json")
        diff = gallery_differs(cfg, rd, g, record)
        if diff:
            raise _differs_error(out, "a gallery model", diff, "train-gallery", g, record, {
                **{k: f"gallery.{k}" for k in ("backbone", "backbone_checkpoint", "freeze_backbone")},
                "embed_dim": "space.embed_dim"})
        log(f"[train-gallery] {out} is already trained (fingerprint {g['fingerprint']}); "
            "--restart to train again (hwnas run: --from train-gallery)")
        return g
    if net is None:  # (gone since the look above)
        net, loaded = gallery_network(cfg)
    data = load_part(rd, "train", pre, classes, log=log)  # (draws nothing from torch's generator)
    if loaded is not None:
        log(f"[train-gallery] backbone from {gc.backbone_checkpoint}: {loaded['loaded']} tensors loaded "
            f"(every weight of the backbone{'; ' + loaded['adapted'] if loaded['adapted'] else ''}), "
            f"{len(loaded['ignored'])} others in the file not used (its classifier)")
    head = CosineClassifier(space.embed_dim, len(classes), gc.scale, gc.margin, gc.classifier)
    task = GalleryTask(net, head, frozen_backbone=bool(loaded) and gc.freeze_backbone)
    legacy = {"backbone": gc.backbone, "classes": len(classes), "split": split_fp}
    # every model setting (a resume with another margin, embedding size or normalization
    # would train a model that is neither)
    settings = {**legacy, "gallery": {k: v for k, v in asdict(gc).items() if k != "train"},
                "embed_dim": space.embed_dim, "preprocess": pre.to_dict(), "seed": cfg.seed}
    log(f"[train-gallery] {gc.backbone} on {len(data.images)} images, {len(classes)} classes, "
        f"{tc.epochs} epochs")
    hist = fit(task, data.images, data.labels, pre.normalize, tc, out / "checkpoint.safetensors",
               seed=cfg.seed, resume=resume, desc="train-gallery", settings=settings, log=log,
               legacy_settings=legacy)
    if not is_main():
        return {}
    config = {"role": "gallery", **record, "history": hist,
              "train_seconds": sum(h["seconds"] for h in hist)}
    saved = save_model(out, {"net": net, "classifier": head}, config)
    log(f"[train-gallery] saved {out} (fingerprint {saved['fingerprint']})")
    return saved


def run_gallery(rd: RunDir):
    """The run directory's trained gallery model (frozen)."""
    from hwnas.nn.models import load_gallery

    return load_gallery(gallery_dir(rd))


def gallery_dir(rd: RunDir) -> Path:
    """The run directory's gallery model folder; an error naming the step where there is none."""
    path = rd.path / "gallery"
    if not (path / "config.json").exists():
        raise HwnasError(f"no gallery model in {path}: run `hwnas train-gallery` first")
    return path


# ---------------------------------------------------------------------- supernet / query
def _compat_setup(rd: RunDir, loss_cfg, log):
    """Gallery, training images (labels as gallery classifier rows), cached embeddings."""
    cfg = rd.cfg
    space, pre = cfg.search_space(), cfg.preprocess()
    gallery = run_gallery(rd) if loss_cfg.needs_gallery else None
    if gallery is not None:
        check_compatible(gallery.config, space.embed_dim, pre)
        classes = gallery.class_names
    else:
        classes = train_class_names(rd)
    data = load_part(rd, "train", pre, classes, log=log)
    unlabeled = None
    if cfg.data.unlabeled:
        data, unlabeled = _add_unlabeled(cfg, data, pre, loss_cfg, log)
    return space, pre, gallery, classes, data, unlabeled


def _unlabeled_source(cfg: Config) -> str | None:
    """``data.unlabeled`` as models record it: its sources, comma-separated (None: unset)."""
    from hwnas.data.sources import unlabeled_specs

    return ", ".join(unlabeled_specs(cfg.data.unlabeled)) or None


def _same_sources(a: str | None, b: str | None) -> bool:
    """Two recorded source lists (``data.unlabeled``, ``adapt.images``) name the same sources:
    a file or folder given by another path (relative here, or absolute) is the same one; what
    is not on disk (``strokes:N``, ``split:gallery``, a caller's label) is compared as written."""
    from hwnas.data.sources import same_file_specs

    def norm(source):
        return same_file_specs([s for s in (source or "").split(", ") if s])

    return norm(a) == norm(b)


def _seeded_rows(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` row indices drawn without replacement (seeded), in order."""
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _load_unlabeled(cfg: Config, source, pre, log, what: str = "data.unlabeled",
                    max_images: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode the images of an unlabeled source (a spec or a list of specs): (uint8 array, ids).
    ``max_images``: more than that many listed are sampled (seeded by ``cfg.seed``) down to it
    before any is decoded, so a catalog larger than the memory is never decoded whole."""
    from hwnas.data.images import materialize
    from hwnas.data.sources import unlabeled_images, unlabeled_specs

    cols = [(spec, unlabeled_images(spec, what)) for spec in unlabeled_specs(source, what)]
    ends = np.cumsum([len(c) for _, c in cols])
    keep = None
    if max_images is not None and ends[-1] > max_images:
        keep = _seeded_rows(int(ends[-1]), max_images, cfg.seed)
    images, ids = [], []
    for (spec, col), end in zip(cols, ends):
        start = end - len(col)
        rows = range(len(col)) if keep is None else keep[(keep >= start) & (keep < end)] - start
        if not len(rows):
            continue
        arr = materialize(col, rows, pre, cfg.data.skip_bad_images, desc="unlabeled")
        if arr.skipped:
            log(f"[data] skipped {len(arr.skipped)} unreadable images of {what} {spec} "
                f"(e.g. {arr.skipped[0]})")
        if not len(arr.images) and keep is None:
            raise HwnasError(f"{what} {spec}: no readable images")
        images.append(arr.images)
        ids += arr.ids(col)
    if not sum(map(len, images)):  # (sampled: none of the sample could be read)
        raise HwnasError(f"{what}: none of the {len(keep)} images sampled of {int(ends[-1])} is readable")
    return np.concatenate(images), ids


def _with_unlabeled(data: PartImages, images: np.ndarray, ids: list[str]) -> PartImages:
    """``data`` and ``images`` after it with label -1 (the classifier parts skip them)."""
    n = len(images)
    return PartImages(torch.cat([data.images, torch.as_tensor(images)]),
                      torch.cat([data.labels, torch.full((n,), -1, dtype=data.labels.dtype)]),
                      np.concatenate([data.raw_labels, np.full(n, -1, data.raw_labels.dtype)]),
                      data.ids + list(ids))


def _add_unlabeled(cfg: Config, data: PartImages, pre, loss_cfg, log) -> tuple[PartImages, dict]:
    """``data.unlabeled`` appended to the training images with label -1: the classifier parts
    skip them, the parts that compare with the gallery embedding use them."""
    import hashlib

    if not loss_cfg.uses_unlabeled:
        raise HwnasError("data.unlabeled is set but the loss has no part that can use images "
                         "without labels: set loss.regress, loss.contrast, loss.mix, loss.bank, loss.rank or "
                         "loss.feat > 0, or "
                         "data.unlabeled: null")
    arr_images, ids = _load_unlabeled(cfg, cfg.data.unlabeled, pre, log)
    source = _unlabeled_source(cfg)
    info = {"source": source, "images": len(arr_images),
            "fingerprint": hashlib.sha256(arr_images.tobytes()).hexdigest()[:16]}
    log(f"[data] + {len(arr_images)} unlabeled images from {source} (regression/contrast/mix/"
        f"bank/rank/feat only) beside {len(data.images)} labeled")
    return _with_unlabeled(data, arr_images, ids), info


@_holds_folder("train-supernet", lambda cfg, **_: RunDir(cfg).path / "supernet")
def train_supernet(cfg: Config, resume: bool = False, restart: bool = False, log=print) -> dict:
    from hwnas.compat.losses import CompatLoss
    from hwnas.compat.tasks import ArchSampler, CompatTask
    from hwnas.compat.train import fit, is_main
    from hwnas.nn.models import save_model
    from hwnas.nn.supernet import Supernet

    rd = RunDir(cfg)
    out = rd.path / "supernet"
    loss_cfg, tc = cfg.loss_config("supernet"), cfg.train_config("supernet")
    if loss_cfg.needs_gallery and (restart or not (out / "model.safetensors").exists()):
        gallery_dir(rd)  # (before the splits are written)
    # what the model records of its training: compared with a finished model, saved with a new one
    record = {"space": cfg.search_space().to_dict(), "preprocess": cfg.preprocess().to_dict(),
              "loss": loss_cfg.to_dict(), "flops_range": cfg.supernet.flops_range,
              "train": tc.__dict__, "path_warmup": cfg.supernet.path_warmup,
              "path_sampling": cfg.supernet.path_sampling, "seed": cfg.seed,
              "splits_fingerprint": rd.splits().fingerprint, "unlabeled_source": _unlabeled_source(cfg)}
    if _prepare_out(out, restart, tc):
        # (a supernet recorded before path_sampling existed sampled uniformly)
        old = {"path_sampling": "uniform", **read_json(out / "config.json")}
        gfp = _gallery_fingerprint(rd) if loss_cfg.needs_gallery else None
        want = {**record, **({"gallery_fingerprint": gfp} if gfp is not None else {})}
        diff = _differs(old, want, always=("space", "loss", "train", "flops_range", "path_sampling"))
        if diff:
            raise _differs_error(out, "a supernet", diff, "train-supernet")
        log(f"[train-supernet] {out} is already trained; --restart to train again (hwnas run: --from train-supernet)")
        return old
    space, pre, gallery, classes, data, unlabeled = _compat_setup(rd, loss_cfg, log)
    g_emb = None
    if gallery is not None and loss_cfg.needs_gallery_emb and cfg.supernet.cache_gallery_embeddings \
            and tc.augment == "none":
        g_emb = torch.from_numpy(gallery_embeddings(rd, gallery, _train_part(unlabeled), data, log=log,
                                                    all_ranks=True))
    torch.manual_seed(cfg.seed)
    net = Supernet(space)
    loss = CompatLoss(loss_cfg, space.embed_dim, len(classes),
                      gallery.classifier if gallery is not None else None)
    sampler = ArchSampler(space, cfg.seed, cfg.supernet.flops_range,
                          warmup=cfg.supernet.path_warmup, sampling=cfg.supernet.path_sampling)
    task = CompatTask(net, loss, gallery.net if gallery is not None else None, g_emb, sampler)
    gfp = gallery.fingerprint if gallery is not None else None
    settings = {"space": space.hash, "loss": loss_cfg.to_dict(), "gallery": gfp,
                "flops_range": cfg.supernet.flops_range, "path_warmup": cfg.supernet.path_warmup,
                "split": record["splits_fingerprint"], **_unlabeled_setting(unlabeled)}
    if cfg.supernet.path_sampling != "uniform":  # (uniform adds nothing: older checkpoints stay valid)
        settings["path_sampling"] = cfg.supernet.path_sampling
    legacy = dict(settings)
    if cfg.seed:  # (seed 0 adds nothing: checkpoints from before the seed was keyed stay valid)
        settings["seed"] = cfg.seed
    log(f"[train-supernet] space {space.hash} on {len(data.images)} images, loss "
        f"{_loss_str(loss_cfg)}, {tc.epochs} epochs")
    hist = fit(task, data.images, data.labels, pre.normalize, tc, out / "checkpoint.safetensors",
               seed=cfg.seed, resume=resume, desc="train-supernet", settings=settings,
               find_unused=True, log=log, legacy_settings=legacy)
    if not is_main():
        return {}
    config = {"role": "supernet", **record, "gallery_fingerprint": gfp, "classes": classes,
              "history": hist, "train_seconds": sum(h["seconds"] for h in hist)}
    modules = {"net": net}
    if loss.own is not None:
        modules["own"] = loss.own
    saved = save_model(out, modules, config)
    log(f"[train-supernet] saved {out}")
    return saved


def _check_feat(cfg: Config, rd: RunDir, query, loss_cfg) -> None:
    """loss.feat's feature maps exist in ``query`` (the network to train, untrained) and the
    run's gallery model (built untrained): one input through each."""
    from hwnas.compat.features import check_feature_maps
    from hwnas.nn.models import build_gallery

    space, pre = cfg.search_space(), cfg.preprocess()
    gallery, _ = build_gallery(read_json(gallery_dir(rd) / "config.json"))
    check_feature_maps(query, gallery, loss_cfg.feat_at, (1, pre.channels, space.input_size, space.input_size))


def _loss_str(c) -> str:
    from hwnas.compat.losses import PARTS

    parts = [f"{k} {getattr(c, k):g}" for k in PARTS if getattr(c, k) > 0]
    return " + ".join(parts) + (f" ({c.regress_kind})" if c.regress > 0 else "")


def load_supernet(rd: RunDir):
    from hwnas.nn.models import load_state
    from hwnas.nn.supernet import Supernet
    from hwnas.space import SearchSpace

    path = rd.path / "supernet"
    if not (path / "config.json").exists():
        raise HwnasError(f"no supernet in {path}: run `hwnas train-supernet` first")
    cfg, states = load_state(path)
    space = SearchSpace.from_dict(cfg["space"])
    net = Supernet(space)
    net.load_state_dict(states["net"])
    return net, cfg, states


def _query_name(cfg: Config, arch: str | None, timm_name: str | None, name: str | None) -> str:
    """The query model's name: ``name``, else one made from the arch or the timm name."""
    if (arch is None) == (timm_name is None):
        raise HwnasError("train-query needs exactly one of --arch ARCH or --timm NAME")
    return name or (f"timm-{timm_name}" if timm_name else f"arch-{_short(arch, cfg.search_space())}")


@_holds_folder("train-query", lambda cfg, arch, timm_name, name, **_: query_dir(
    RunDir(cfg), _query_name(cfg, arch, timm_name, name)))
def train_query(cfg: Config, arch: str | None = None, timm_name: str | None = None,
                name: str | None = None, resume: bool = False, restart: bool = False,
                inherit: bool | None = None, loss_override: dict | None = None,
                retrain_changed: bool = False, stop_after: int | None = None,
                start_from: Path | None = None, log=print) -> dict:
    """Train one fixed query model (an SPOS arch, or a timm baseline) with the
    compatibility loss, then evaluate it on the test split.

    A finished model already under the name is kept only if it is the same model (arch or
    timm name, loss, training settings, inheritance); otherwise it is an error naming the
    fix, or with ``retrain_changed`` (``hwnas run``, after a new search) trained again.

    ``stop_after`` (fewer than the schedule's epochs): train that many epochs of the full
    schedule and return ``{"name", "partial": True, "history", "flops"}`` without saving a
    model; the checkpoint stays, so a later call (``resume``) finishes the same training.
    ``start_from``: another run's checkpoint of the same model and settings (a finalist's) to
    go on from, where this name holds no checkpoint of its own."""
    from hwnas.compat.losses import PARTS, CompatLoss, LossConfig
    from hwnas.compat.tasks import CompatTask
    from hwnas.compat.train import drop_stale_checkpoint, fit, is_main, train_device
    from hwnas.nn.models import EmbeddingNet, check_takes_input, save_model
    from hwnas.nn.supernet import SubNet, calibration_batches, recalibrate_bn
    from hwnas.space import arch_flops

    name = _query_name(cfg, arch, timm_name, name)
    rd = RunDir(cfg)
    space = cfg.search_space()
    out = query_dir(rd, name)
    # an override is the whole loss: a part it does not name is off, not at its default weight
    loss_cfg = (LossConfig(**{**dict.fromkeys(PARTS, 0.0), **loss_override}) if loss_override is not None
                else cfg.loss_config("query"))
    tc = cfg.train_config("query")
    inherit = cfg.query.inherit if inherit is None else inherit
    # the arch or timm name is checked first: with --restart a typo must not cost the trained model
    parsed = space.parse(arch) if arch is not None else None
    to_train = restart or not (out / "model.safetensors").exists()  # (a finished model is not built)
    if parsed is None:
        from hwnas.nn.models import check_timm_name

        note = check_timm_name(timm_name)
        if note and to_train:
            log(f"[train-query] NOTE: {note}")
        if to_train:
            probe = EmbeddingNet(timm_name, space.embed_dim, cfg.preprocess().channels, bn=False)
            check_takes_input(probe, timm_name, cfg.preprocess().channels, space.input_size, "--timm")
    if loss_cfg.feat > 0 and to_train:  # (likewise)
        _check_feat(cfg, rd, SubNet(space, parsed) if parsed is not None else probe, loss_cfg)
    sp_cfg = rd.path / "supernet" / "config.json"
    sup = read_json(sp_cfg) if inherit and arch is not None and sp_cfg.exists() else None
    if sup is not None and loss_cfg.needs_gallery:
        # before --restart deletes anything: a supernet of another gallery cannot be inherited
        check_supernet_gallery(sup, _gallery_fingerprint(rd), "inheriting its weights (or use --no-inherit)")
    if _prepare_out(out, restart, tc):
        old = read_json(out / "config.json")
        want = {"arch": None if parsed is None else parsed.to_string(space), "timm": timm_name,
                "loss": loss_cfg.to_dict(), "train": tc.__dict__, "inherit": bool(inherit and arch)}
        # what it was trained against and on (compared where the model records it)
        also = {"embed_dim": space.embed_dim, "preprocess": cfg.preprocess().to_dict(),
                "splits_fingerprint": rd.splits().fingerprint}
        if arch is not None:
            also["space"] = space.to_dict()
        gfp = _gallery_fingerprint(rd) if loss_cfg.needs_gallery else None
        if gfp is not None:
            also["gallery_fingerprint"] = gfp
        if sup is not None:
            also["supernet_fingerprint"] = sup["fingerprint"]
        # (a query model records data.unlabeled inside "unlabeled", beside its image count)
        recorded = {**old, "unlabeled_source": (old.get("unlabeled") or {}).get("source")}
        diff = _differs(recorded, {**want, **also, "unlabeled_source": _unlabeled_source(cfg)},
                        always=(*want, "unlabeled_source"))
        if old.get("seed", 0) != cfg.seed:  # models from before the seed was recorded: seed 0
            diff.append("seed")
        if not diff:
            log(f"[train-query] {out} is already trained; --restart to train again (hwnas run: --from the step "
                "that trained it: train-query, adapt or baselines)")
            return old
        if not retrain_changed:
            raise HwnasError(f"{out} holds a query model trained with other {', '.join(diff)} "
                             f"than asked: train again with --restart, or give another --name")
        train_device(tc)  # (a training that cannot start here must not cost the model)
        log(f"[train-query] {out} was trained with other {', '.join(diff)}; training again")
        shutil.rmtree(out)
    space, pre, gallery, classes, data, unlabeled = _compat_setup(rd, loss_cfg, log)
    torch.manual_seed(cfg.seed)
    qcfg = {"role": "query", "embed_dim": space.embed_dim, "preprocess": pre.to_dict(),
            **_unlabeled_setting(unlabeled)}
    own_state = None
    if arch is not None:
        a = parsed
        qcfg.update(kind="subnet", space=space.to_dict(), arch=a.to_string(space),
                    flops=arch_flops(space, a))
        if inherit:
            supernet, scfg, sstates = load_supernet(rd)
            if supernet.space.hash != space.hash:
                raise HwnasError("the supernet was trained on another search space; retrain it "
                                 "(hwnas train-supernet --restart) or use --no-inherit")
            qcfg["supernet_fingerprint"] = scfg["fingerprint"]
            recalibrate_bn(supernet, calibration_batches(data.images, pre.normalize, cfg.seed), a)
            net = supernet.extract(a)
            if "own" in sstates and scfg["classes"] == classes:
                own_state = sstates["own"]
        else:
            net = SubNet(space, a)
    else:
        net = EmbeddingNet(timm_name, space.embed_dim, pre.channels, bn=False)
        qcfg.update(kind="timm", timm=timm_name, flops=model_flops(net, pre))
    loss = CompatLoss(loss_cfg, space.embed_dim, len(classes),
                      gallery.classifier if gallery is not None else None)
    if own_state is not None and loss.own is not None:
        loss.own.load_state_dict(own_state)
    g_emb = None
    if gallery is not None and loss_cfg.needs_gallery_emb and tc.augment == "none":
        g_emb = torch.from_numpy(gallery_embeddings(rd, gallery, _train_part(unlabeled), data, log=log,
                                                    all_ranks=True))
    task = CompatTask(net, loss, gallery.net if gallery is not None else None, g_emb)
    gfp = gallery.fingerprint if gallery is not None else None
    settings = {"query": {k: v for k, v in qcfg.items() if k not in ("flops", "supernet_fingerprint")},
                "loss": loss_cfg.to_dict(), "gallery": gfp, "inherit": bool(inherit and arch),
                "split": rd.splits().fingerprint}
    if cfg.supernet.path_sampling != "uniform":  # (uniform adds nothing: older checkpoints stay valid)
        settings["path_sampling"] = cfg.supernet.path_sampling
    legacy = dict(settings)
    if cfg.seed:  # (seed 0 adds nothing: checkpoints from before the seed was keyed stay valid)
        settings["seed"] = cfg.seed
    log(f"[train-query] {name}: {qcfg['flops'] / 1e6:.2f} MFLOPs, loss {_loss_str(loss_cfg)}, "
        f"{'inheriting supernet weights' if inherit and arch else 'from scratch'}, {tc.epochs} epochs")
    if retrain_changed:
        drop_stale_checkpoint(out / "checkpoint.safetensors", tc, settings, log=log, legacy_settings=legacy)
    if start_from is not None and not (out / "checkpoint.safetensors").exists():
        from hwnas.utils import atomic_write_bytes

        atomic_write_bytes(out / "checkpoint.safetensors", Path(start_from).read_bytes())
        resume = True  # (fit refuses a checkpoint made with other settings all the same)
    hist = fit(task, data.images, data.labels, pre.normalize, tc, out / "checkpoint.safetensors",
               seed=cfg.seed, resume=resume, desc=f"train-query {name}", settings=settings,
               stop_after=stop_after, log=log, legacy_settings=legacy)
    if not is_main():
        return {}
    if stop_after is not None and stop_after < tc.epochs:
        return {"name": name, "partial": True, "history": hist, "flops": qcfg["flops"]}
    qcfg.update(seed=cfg.seed, gallery_fingerprint=gfp, loss=loss_cfg.to_dict(),
                inherit=bool(inherit and arch), splits_fingerprint=rd.splits().fingerprint,
                train=tc.__dict__, history=hist, train_seconds=sum(h["seconds"] for h in hist), name=name)
    saved = save_model(out, {"net": net}, qcfg)
    log(f"[train-query] saved {out}")
    return saved


def train_many(cfg: Config, jobs: list[dict], log=print) -> list[dict]:
    """Train independent query models (each job: :func:`train_query`'s keyword arguments) and
    return their results in order: one after another, or with ``query.jobs`` N > 1, N at a
    time, each in its own process.

    The costliest job (by FLOPs) starts first, so the longest training is not left to run alone
    at the end. With ``query.train.threads`` unset, each training takes the physical cores / N
    threads (at least 1), and once no job is left to start, the cores a finished training freed
    go to those still running (from their next epoch). Each process trains what the job would
    train alone (checkpoints, models and keys are the same; another thread count only rounds
    sums apart). Every job runs to its end before the first failure is raised; a failed job keeps its checkpoint to resume. Ctrl-C (or a killed process) stops
    the others, each keeping its finished epochs. The processes print their lines to standard
    output (``log`` is the parent's alone), and each holds its own copy of the training
    images, so memory grows with N. POSIX (a parent's death is seen through ``getppid``)."""
    from hwnas.compat.train import dist_info

    n = min(cfg.query.jobs, len(jobs))
    if n > 1 and dist_info()[1] > 1:  # torchrun's processes already share the work of each training
        log(f"[jobs] under torchrun: one training at a time (query.jobs {cfg.query.jobs} left aside)")
        n = 1
    if n <= 1:
        return [train_query(cfg, log=log, **kw) for kw in jobs]
    import copy
    import multiprocessing as mp
    import os
    import sys
    from multiprocessing.connection import wait

    from hwnas.latency.backends import physical_cores

    job_cfg = copy.deepcopy(cfg)
    threads = job_threads(cfg, n)
    job_cfg.query.train = {**cfg.query.train, "threads": threads}
    cores = None if cfg.train_config("query").threads else physical_cores()  # None: the user's count, kept
    names = [kw.get("name") or kw.get("timm_name") or kw.get("arch") for kw in jobs]
    todo = sorted(range(len(jobs)), key=lambda i: -_job_flops(cfg, jobs[i]))  # costliest first
    log(f"[jobs] {len(jobs)} trainings, {n} at a time ({threads} thread(s) each): "
        + ", ".join(str(names[i]) for i in todo))
    sys.stdout.flush()  # what the parent said so far comes before what its trainings say
    ctx = mp.get_context("spawn")  # (not fork: torch's thread pools do not survive a fork)
    results: list = [None] * len(jobs)
    failed: list[str] = []
    running: dict = {}  # connection -> [job index, process, threads]
    try:
        while todo or running:
            while todo and len(running) < n:
                i = todo.pop(0)
                conn, child = ctx.Pipe()  # results up, thread counts down
                p = ctx.Process(target=_train_job, args=(job_cfg, jobs[i], child, os.getpid()), name=f"hwnas-{names[i]}")
                running[conn] = [i, p, threads]  # before it starts: an interrupt right then still stops it
                p.start()
                child.close()  # the child's end: the parent sees EOF when the child is gone
            for conn in wait(list(running)):
                i, p, _ = running.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):  # died without a word: killed, or out of memory (with a
                    # thread count of ours unread, the pipe reports a reset rather than EOF)
                    p.join()
                    status, value = "error", f"its process ended with exit code {p.exitcode} before finishing"
                conn.close()
                p.join()
                if status == "ok":
                    results[i] = value
                elif status == "interrupted":
                    raise KeyboardInterrupt
                else:
                    failed.append(f"{names[i]}: {value}")
                    log(f"[jobs] {names[i]} failed: {value}")
            if not todo and running and cores:  # the freed cores to the trainings left
                share = max(1, cores // len(running))
                for conn, job in running.items():
                    if share > job[2]:
                        try:
                            conn.send(share)  # read where the training next logs (each epoch)
                        except OSError:  # it is ending: its result (or EOF) comes next
                            continue
                        job[2] = share
                        log(f"[jobs] {names[job[0]]}: {share} threads from its next epoch (no training is left to start)")
    except BaseException:
        started = [(conn, job[1]) for conn, job in running.items() if job[1].pid is not None]
        for _, p in started:  # each keeps its checkpoint's finished epochs
            p.terminate()
        for conn, p in started:
            p.join()
            conn.close()
        raise
    if failed:
        raise HwnasError(f"{len(failed)} of {len(jobs)} trainings failed (the others finished and are kept; "
                         "run again to resume): " + "; ".join(failed))
    return results


def job_threads(cfg: Config, n: int) -> int:
    """The torch threads each of ``n`` side-by-side query trainings starts with:
    query.train.threads, or unset, the physical cores / n (at least 1; one training alone:
    torch's default)."""
    from hwnas.latency.backends import physical_cores

    return cfg.train_config("query").threads or (torch.get_num_threads() if n <= 1 else max(1, physical_cores() // n))


def _job_flops(cfg: Config, kw: dict) -> int:
    """A query training's cost, to order :func:`train_many`'s jobs: the model's FLOPs per image
    (0 where it cannot be built: the job then fails in its own process, with its own message)."""
    try:
        if kw.get("arch") is not None:
            from hwnas.space import arch_flops

            space = cfg.search_space()
            return arch_flops(space, space.parse(kw["arch"]))
        from hwnas.nn.models import EmbeddingNet

        return model_flops(EmbeddingNet(kw["timm_name"], cfg.search_space().embed_dim, cfg.preprocess().channels,
                                        bn=False), cfg.preprocess())
    except Exception:  # noqa: BLE001
        return 0


def _train_job(cfg: Config, kw: dict, conn, parent: int) -> None:
    """One of :func:`train_many`'s processes: train, then send ("ok", result) or why not. A
    thread count the parent sends is taken where the training next logs (once an epoch), in
    the training's own thread (OpenMP's thread count is the calling thread's)."""
    import os
    import signal
    import sys
    import threading
    import time
    import traceback

    def watch() -> None:  # a parent killed outright (SIGKILL, SIGTERM) takes its trainings along,
        while os.getppid() == parent:  # or they would train on, holding their models' locks
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # an exit, as below: temp and lock files go
        time.sleep(30.0)
        os._exit(1)  # (stuck: as a kill; the checkpoint keeps the finished epochs)

    given = [0]  # the last count sent (kept: fit sets the job's own count as it starts)

    def log(msg) -> None:
        try:
            while conn.poll():
                given[0] = int(conn.recv())
        except (EOFError, OSError):  # the parent is gone: the watchdog ends this process
            pass
        if given[0] and torch.get_num_threads() != given[0]:
            torch.set_num_threads(given[0])
        print(msg)

    threading.Thread(target=watch, daemon=True).start()
    # train_many stops its trainings with SIGTERM: end as an exit, so what a training holds is let go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["HWNAS_NO_BARS"] = "1"  # several bars on one terminal garble each other
    torch.set_num_threads(cfg.train_config("query").threads)  # from the start (BN recalibration too)
    sys.stdout.reconfigure(line_buffering=True)  # whole lines, not interleaved blocks
    try:
        result = ("ok", train_query(cfg, log=log, **kw))
    except HwnasError as e:
        result = ("error", str(e))
    except KeyboardInterrupt:
        result = ("interrupted", None)
    except Exception as e:  # noqa: BLE001 (sent to the parent, which names the job)
        traceback.print_exc()
        result = ("error", f"{type(e).__name__}: {e}")
    conn.send(result)
    conn.close()


def train_searched(cfg: Config, name: str = "searched", resume: bool = False, restart: bool = False,
                   retrain_changed: bool = False, search_dir: Path | None = None,
                   finalist_prefix: str = "finalist", log=print) -> dict:
    """Train the search's choice (``best_arch.json`` and ``trials.csv`` in ``search_dir``,
    default the run directory) as the query model ``name``.

    With ``query.finalists`` K > 1 the choice is made by training, not by the supernet alone:
    the search's choice and its next best distinct archs by reward, K in all, each train
    ``query.finalist_epochs`` epochs of the full schedule, and the one with the lowest
    training loss there goes on to the end of its schedule (its run resumed, not redone). A weight-sharing supernet ranks
    archs of one budget poorly where they differ little, while a model's own loss a sixth of
    the way into its training ranks them better (BENCHMARKS.md, "Search: omniglot", the
    selection table). The finalists' runs are kept under ``query/<finalist_prefix>-<hash of
    arch and supernet>`` (a killed selection resumes them; ``restart`` redoes the chosen
    model's training from its finalist's checkpoint, not the finalists, whose runs are
    deterministic) and the choice in the model's ``finalists.json``. Costs about
    (K - 1) * finalist_epochs / epochs more trainings."""
    from hwnas.search.runner import load_best, top_archs
    from hwnas.utils import content_hash

    rd = RunDir(cfg)
    search_dir = rd.path if search_dir is None else Path(search_dir)
    k, e = cfg.query.finalists, cfg.query.finalist_epochs
    tc = cfg.train_config("query")
    if k <= 1:
        return train_query(cfg, arch=load_best(search_dir)["arch"], name=name, resume=resume, restart=restart,
                           retrain_changed=retrain_changed, log=log)
    from hwnas.compat.train import dist_info

    if dist_info()[1] > 1:
        raise HwnasError("query.finalists compares its finalists in one process: run train-query "
                         "without torchrun, or set query.finalists: 0")
    if e >= tc.epochs:
        raise HwnasError(f"query.finalist_epochs ({e}) must be fewer than query.train.epochs "
                         f"({tc.epochs}): the finalists are compared part way through their training")
    out = query_dir(rd, name)
    if (not (restart or retrain_changed) and (out / "model.safetensors").exists()
            and not (out / "finalists.json").exists()):
        # (checked before the finalists train, not after: a model chosen without them is not
        # their choice, whatever they would pick)
        raise HwnasError(f"{out} holds a query model trained without query.finalists (the search's own "
                         "choice): train again with --restart to let the finalists choose, or give another --name")
    space = cfg.search_space()
    # a finalist's run is its arch's with this run's supernet (when inheriting): a retrained
    # supernet gives other finalists, not the old ones' checkpoints
    sfp = read_json(rd.path / "supernet" / "config.json")["fingerprint"] if cfg.query.inherit else None
    cands, jobs = top_archs(search_dir, k, space), []  # the search's best first, one per network
    if len(cands) < k:
        log(f"[finalists] the search evaluated {len(cands)} distinct archs within budget, fewer than "
            f"query.finalists ({k}): all {len(cands)} are finalists (more search.n_trials gives more)")
    for i, c in enumerate(cands):
        log(f"[finalists] {i + 1}/{len(cands)}: search reward {c['reward']:.4f}, {c['predicted_ms']:.4f} ms "
            f"predicted, {e} of {tc.epochs} epochs")
        fname = f"{finalist_prefix}-{content_hash({'arch': space.network(c['arch']).to_string(space), 'supernet': sfp}, 8)}"
        jobs.append({"arch": c["arch"], "name": fname, "resume": True, "retrain_changed": True, "stop_after": e})
    rows = [{**c, "name": r["name"], "train_loss": r["history"][e - 1]["loss"]}
            for c, r in zip(cands, train_many(cfg, jobs, log=log))]
    chosen = min(rows, key=lambda r: r["train_loss"])
    rank = rows.index(chosen) + 1
    log("[finalists] training loss after {} epochs: {}; chosen {} (search rank {})".format(
        e, ", ".join(f"{r['train_loss']:.4f}" for r in rows), chosen["name"], rank))
    # the chosen run goes on from its finalist's checkpoint, in the model's own directory
    q = train_query(cfg, arch=chosen["arch"], name=name, resume=resume, restart=restart,
                    retrain_changed=retrain_changed, log=log,
                    start_from=rd.path / "query" / chosen["name"] / "checkpoint.safetensors")
    write_json(out / "finalists.json", {"epochs": e, "of_epochs": tc.epochs, "chosen": chosen["arch"],
                                        "chosen_rank": rank,
                                        # (the search's choice: search.prefer_faster_within)
                                        "search_best": cands[0]["arch"], "finalists": rows})
    return q


def _adapt_source(rd: RunDir, query: str | None) -> Path:
    """The query model to adapt: ``query``, else the run's searched model."""
    return Path(query) if query else rd.path / "query" / "searched"


@_holds_folder("adapt", lambda cfg, query, name, **_: query_dir(
    RunDir(cfg), name or f"{_adapt_source(RunDir(cfg), query).name}-adapted"))
def adapt_query(cfg: Config, query: str | None = None, name: str | None = None,
                resume: bool = False, restart: bool = False, retrain_changed: bool = False,
                images: tuple[str, np.ndarray] | None = None, log=print) -> dict:
    """Gallery adaptation: fine-tune a trained query model on the images the gallery indexes,
    without their labels, then evaluate it on the test split.

    The index already holds the gallery model's embeddings of those images, so the query
    model can be taught, image by image, to land where the gallery model puts them (the
    query recipe's regression, contrastive and mix parts; BCT stays on the labeled training
    images beside them, which keep it from drifting off the training classes). Only the
    query model changes: the index and the gallery model stay as they are, and the
    architecture, so the edge latency, is the same. The query's own classifier is not part
    of a saved query model, so that part is off here.

    What it sees: the gallery's images, never the queries; on a benchmark whose gallery
    holds the test classes the result is transductive and is reported apart.

    ``images``: (a name for them, decoded uint8 images (N, C, H, W) at the query's input)
    instead of ``adapt.images`` — e.g. from a program, or none at all for a control that
    fine-tunes on the training images alone (benchmarks/bench_adapt.py)."""
    import dataclasses
    import hashlib

    from hwnas.compat.losses import PARTS, CompatLoss, LossConfig
    from hwnas.compat.tasks import CompatTask
    from hwnas.compat.train import drop_stale_checkpoint, fit, is_main, train_device
    from hwnas.data.sources import unlabeled_specs
    from hwnas.nn.models import load_query, save_model

    ac = cfg.adapt
    if ac.epochs < 1:
        raise HwnasError("adapt.epochs is 0, so adaptation is off: give a number of epochs above 0 "
                         "(hwnas adapt --epochs 15, or adapt.epochs in the config)")
    rd = RunDir(cfg)
    src = _adapt_source(rd, query)
    if not (src / "config.json").exists():
        raise HwnasError(f"no trained query model at {src}: train one first (hwnas train-query "
                         "--from-search) or pass --query DIR")
    net, qcfg = load_query(src)
    if qcfg.get("adapted"):
        raise HwnasError(f"{src} is already an adapted model; adapt the model it came from "
                         f"({qcfg['adapted']['from']})")
    gallery = run_gallery(rd)
    if qcfg.get("gallery_fingerprint") not in (None, gallery.fingerprint):
        raise HwnasError(f"{src} was trained against gallery {qcfg['gallery_fingerprint']}, not this "
                         f"run's {gallery.fingerprint}: retrain it (hwnas train-query --restart)")
    pre = cfg.preprocess()
    check_compatible(gallery.config, qcfg["embed_dim"], pre)
    # the recorded loss leaves out parts that were off: they stay off (not at their defaults)
    kept = {**dict.fromkeys(PARTS, 0.0), **(qcfg.get("loss") or cfg.loss_config("query").to_dict()),
            "own_cls": 0.0, "feat": 0.0}  # (feat: its 1x1 convolutions are not kept with the model)
    loss_cfg = LossConfig(**kept) if any(kept[k] > 0 for k in PARTS) else None
    if loss_cfg is None or not loss_cfg.uses_unlabeled:
        raise HwnasError(f"{src} was trained without a part that can learn from unlabeled images "
                         "(loss.regress, contrast, mix, bank or rank), so there is nothing to adapt with: "
                         "train it with one of them (e.g. query.loss.regress: 30)")
    name = name or f"{src.name}-adapted"
    out = query_dir(rd, name)
    if out.resolve() == src.resolve():
        raise HwnasError(f"--name {name} is the model being adapted ({src}); the adapted model needs "
                         "a directory of its own (default: NAME-adapted)")
    if (out / "config.json").exists() and not read_json(out / "config.json").get("adapted"):
        raise HwnasError(f"{out} holds a query model that is not an adapted one; adapting into it would "
                         "replace it: give another --name")
    from hwnas.data.images import Preprocess

    if qcfg.get("preprocess") and Preprocess.from_dict(qcfg["preprocess"]) != pre:
        raise HwnasError(f"{src} takes other input ({qcfg['preprocess']}) than this config's "
                         f"({pre.to_dict()}): adapt it with the config it was trained with")
    if images is not None:
        source, images = images
        if images.ndim != 4 or images.dtype != np.uint8 or tuple(images.shape[1:]) != (pre.channels, pre.size, pre.size):
            raise HwnasError(f"adapt images must be uint8 (N, {pre.channels}, {pre.size}, {pre.size}), "
                             f"got {images.dtype} {tuple(images.shape)}")
    elif named := cfg.adapt_images():
        setting, spec = named
        source = ", ".join(unlabeled_specs(spec, setting))
        images, _ = _load_unlabeled(cfg, spec, pre, log, what=setting, max_images=ac.max_images)
    else:
        source = "split:gallery"
        images = load_part(rd, "gallery", pre, log=log).images.numpy()
    if len(images) > ac.max_images:
        keep = _seeded_rows(len(images), ac.max_images, cfg.seed)
        images = images[keep]
    img_fp = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    # the fine-tune keeps its last weights, as measured (benchmarks/bench_adapt.py): the query
    # training's weight average (train.ema) is not carried over to it
    tc = dataclasses.replace(cfg.train_config("query"), epochs=ac.epochs, lr=ac.lr, warmup_epochs=0.0, ema=0.0)
    setting = {"from": qcfg["fingerprint"], "source": source, "images": len(images),
               "fingerprint": img_fp, "epochs": ac.epochs, "lr": ac.lr,
               "unlabeled": _unlabeled_source(cfg), "seed": cfg.seed}
    if _prepare_out(out, restart, tc):
        old = read_json(out / "config.json")
        if not _differs(old.get("adapted") or {}, setting, always=tuple(setting), sources=("source", "unlabeled")) \
                and _same_training(old.get("train"), tc.__dict__):
            log(f"[adapt] {out} is already adapted with these settings; --restart to do it again")
            return old
        if not retrain_changed:
            raise HwnasError(f"{out} holds a model adapted from another query model or with other "
                             "settings: do it again with --restart, or give another --name")
        train_device(tc)  # (a training that cannot start here must not cost the model)
        log(f"[adapt] {out} was adapted from another model or with other settings; adapting again")
        shutil.rmtree(out)
    # the query's training images (labeled: BCT) and its unlabeled ones, then the gallery's
    _, _, _, classes, data, unlabeled = _compat_setup(rd, loss_cfg, log)
    data = _with_unlabeled(data, images, [f"adapt:{i}" for i in range(len(images))])
    log(f"[adapt] {name}: {src.name} fine-tuned on {len(images)} gallery images ({source}, no labels) "
        f"beside {len(data.images) - len(images)} training images, {ac.epochs} epochs at lr {ac.lr}, "
        f"loss {_loss_str(loss_cfg)}")
    torch.manual_seed(cfg.seed)
    loss = CompatLoss(loss_cfg, qcfg["embed_dim"], len(classes),
                      gallery.classifier if loss_cfg.bct > 0 else None)
    task = CompatTask(net, loss, gallery.net, None)
    settings = {"adapt": setting, "loss": loss_cfg.to_dict(), "gallery": gallery.fingerprint,
                "split": rd.splits().fingerprint, **_unlabeled_setting(unlabeled)}
    if retrain_changed:
        drop_stale_checkpoint(out / "checkpoint.safetensors", tc, settings, log=log)
    hist = fit(task, data.images, data.labels, pre.normalize, tc, out / "checkpoint.safetensors",
               seed=cfg.seed + 7, resume=resume, desc=f"adapt {name}", settings=settings, log=log)
    if not is_main():
        return {}
    keep = {k: v for k, v in qcfg.items() if k not in ("fingerprint", "format", "history", "train_seconds")}
    saved = save_model(out, {"net": net}, {**keep, "name": name, "adapted": setting, "adapt_loss": loss_cfg.to_dict(),
                                          "train": tc.__dict__, "history": hist,
                                          "train_seconds": sum(h["seconds"] for h in hist)})
    log(f"[adapt] saved {out}")
    return saved


def _unlabeled_setting(unlabeled: dict | None) -> dict:
    """What a model records of ``data.unlabeled`` (nothing when unset, so models trained
    before the option keep their settings and fingerprints)."""
    return {"unlabeled": unlabeled} if unlabeled else {}


def _train_part(unlabeled: dict | None) -> str:
    """The name the training images' cached gallery embeddings go under."""
    return f"train+unlabeled-{unlabeled['fingerprint']}" if unlabeled else "train"


def _short(arch: str, space) -> str:
    from hwnas.utils import content_hash

    return content_hash(space.parse(arch).to_string(), 8)


def model_flops(net, pre) -> int:
    """FLOPs of one image (torch.utils.flop_counter convention: 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = net.training
    net.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, pre.channels, pre.size, pre.size))
    net.train(was)
    return int(fc.get_total_flops())


# ---------------------------------------------------------------------- evaluate
def evaluate_query(cfg: Config, query_dir: str | None = None, arch: str | None = None,
                   part: str = "test", log=print, fars=()) -> dict:
    """M(g,g), M(q,g), M(q,q) on the test split (``part='val'``: the validation split) for a
    trained query model (``query_dir``) or a supernet subnet after BN recalibration;
    ``fars``: TAR at those false accept rates too (``retrieval.evaluate``)."""
    from hwnas.data.images import Preprocess
    from hwnas.nn.models import load_query
    from hwnas.nn.supernet import calibration_batches, recalibrate_bn
    from hwnas.retrieval import evaluate

    rd = RunDir(cfg)
    gallery = run_gallery(rd)
    qpart, gpart = ("query", "gallery") if part == "test" else ("val_query", "val_gallery")
    gpre = Preprocess.from_dict(gallery.config["preprocess"])
    if (query_dir is None) == (arch is None):
        raise HwnasError("evaluate needs exactly one of --query DIR or --arch ARCH (a supernet subnet)")
    if query_dir is not None:
        net, qcfg = load_query(query_dir)
        foreign = qcfg.get("gallery_fingerprint") not in (None, gallery.fingerprint)
        if foreign:
            log(f"[evaluate] warning: {query_dir} was trained against gallery "
                f"{qcfg['gallery_fingerprint']}, not this run's {gallery.fingerprint}; its "
                f"evaluation-{part}.json (against its own gallery) is left as it is")
        qpre = Preprocess.from_dict(qcfg["preprocess"])
        label = qcfg.get("name", Path(query_dir).name)
        run_arch = None
    else:
        net, scfg, _ = load_supernet(rd)
        check_supernet_gallery(scfg, gallery.fingerprint, "evaluating its subnets")
        qpre = Preprocess.from_dict(scfg["preprocess"])
        run_arch = net.space.parse(arch)
        foreign = False
        train = load_part(rd, "train", qpre, log=log)
        recalibrate_bn(net, calibration_batches(train.images, qpre.normalize, cfg.seed), run_arch)
        qcfg = {"arch": run_arch.to_string(net.space)}
        label = "supernet subnet"
    check_compatible(gallery.config, net.space.embed_dim if query_dir is None else qcfg["embed_dim"], qpre)
    qi, gi = load_part(rd, qpart, qpre, log=log), load_part(rd, gpart, qpre, log=log)
    from hwnas.retrieval.metrics import unresolvable_far

    why = unresolvable_far(fars, qi.raw_labels, gi.raw_labels)
    if why:  # (its TAR would be undefined: NaN)
        raise HwnasError(f"--far on the {part} split's queries against its gallery: {why}; give a larger --far")
    splits = rd.splits(log=log)
    ids = (qi.ids, gi.ids) if splits.shared_eval else (None, None)
    gg_q = gallery_embeddings(rd, gallery, qpart, qi if gpre == qpre else None, log=log)
    gg_g = gallery_embeddings(rd, gallery, gpart, gi if gpre == qpre else None, log=log)
    qq = embed(net, qi.images, qpre.normalize, desc="query embeds", arch=run_arch)
    qg = embed(net, gi.images, qpre.normalize, desc="query embeds", arch=run_arch)

    def score(q_emb, g_emb):
        return evaluate(q_emb, qi.raw_labels, g_emb, gi.raw_labels, query_ids=ids[0], gallery_ids=ids[1],
                        per_query=True, fars=fars)

    res = {"M(g,g)": score(gg_q, gg_g), "M(q,g)": score(qq, gg_g), "M(q,q)": score(qq, qg)}
    # each query right or wrong at rank 1, kept apart from the metrics (the report's paired
    # tests between models read it; see retrieval.paired_test)
    hits = {k: m.pop("hit@1") for k, m in res.items()}
    out = {
        "query": label, "arch": qcfg.get("arch"), "timm": qcfg.get("timm"), "part": part,
        "gallery_fingerprint": gallery.fingerprint, "splits_fingerprint": splits.fingerprint,
        "query_flops": qcfg.get("flops"), "metrics": res,
        "bct_criterion_M(q,g)>M(q,q)": res["M(q,g)"]["recall@1"] > res["M(q,q)"]["recall@1"],
        "gap_to_paragon_points": 100 * (res["M(g,g)"]["recall@1"] - res["M(q,g)"]["recall@1"]),
        "hit@1": hits,
    }
    if query_dir is not None and not foreign:
        write_json(Path(query_dir) / f"evaluation-{part}.json", out)
    return out


def evaluation_table(res: dict) -> str:
    from hwnas.report import format_table

    rows = []
    tars = [k for k in next(iter(res["metrics"].values())) if k.startswith("TAR@FAR=")]
    for k, m in res["metrics"].items():
        rows.append([k, f"{100 * m['recall@1']:.2f}", f"{100 * m['recall@5']:.2f}",
                     f"{100 * m['mAP']:.2f}", *(f"{100 * m[t]:.2f}" for t in tars), m["n_queries"], m["n_gallery"]])
    t = format_table(["", "R@1 %", "R@5 %", "mAP %", *(f"{x} %" for x in tars), "queries", "gallery"], rows)
    crit = res["bct_criterion_M(q,g)>M(q,q)"]
    return (t + f"\nBCT criterion M(q,g) > M(q,q): {'holds' if crit else 'does not hold'}; "
            f"gap to the paragon: {res['gap_to_paragon_points']:.2f} points of R@1")
