"""Gallery and query models, and how they are saved and loaded.

A saved model is a directory with ``model.safetensors`` (weights; never pickle) and
``config.json`` (everything needed to rebuild it, the preprocessing it expects, and a
fingerprint: a hash of the config and the weights). A query model's config names the
fingerprint of the gallery model it was trained to be compatible with.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from hwnas.errors import HwnasError
from hwnas.nn.blocks import l2_normalize
from hwnas.nn.heads import CosineClassifier
from hwnas.utils import atomic_path, content_hash, read_json, stable_json, write_json

MODEL_FORMAT = "hwnas-model-v1"


def check_timm_name(name: str) -> str | None:
    """An unknown timm model name is an error naming similar ones; so is a pretrained tag
    (``resnet50.a1_in1k``) timm does not know for that architecture (timm's own error came
    only at the build, a traceback). A tag timm knows names weights hwnas never downloads:
    returned is a note saying so, which the commands a user names the model in print (a model
    saved under such a name still builds: its architecture is the name's)."""
    import timm

    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if tag and timm.is_model(arch):
        known = [k.split(".", 1)[1] for k in timm.list_pretrained(f"{arch}.*")]
        if tag not in known:
            raise HwnasError(f"timm model {name!r}: {arch!r} has no pretrained tag {tag!r} (timm's: "
                             f"{known[:8] or 'none'}); give the architecture alone, {arch!r}")
        return (f"the tag {tag!r} of {name!r} names pretrained weights, which hwnas does not download: "
                f"the model starts from random weights, as {arch!r} would (for those weights, save them to "
                "a file and give it as gallery.backbone_checkpoint / --backbone-checkpoint)")
    if not timm.is_model(name):
        import difflib

        close = (difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
                 or timm.list_models(f"*{name.split('_')[0]}*")[:8])
        raise HwnasError(f"unknown timm model {name!r}; "
                         + (f"similar names: {close}" if close else "no similar name")
                         + " (see timm.list_models())")
    return None


def _timm_create(name: str, in_chans: int, **kw) -> nn.Module:
    import timm

    check_timm_name(name)
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kw)


class EmbeddingNet(nn.Module):
    """A timm backbone (no classifier) + linear embedding (+ BatchNorm) + L2 normalization.

    Gallery models use the BatchNorm (as in face/fashion retrieval heads); timm query
    baselines use the same class without it."""

    def __init__(self, backbone: str, embed_dim: int, in_chans: int, bn: bool = True):
        super().__init__()
        self.backbone = _timm_create(backbone, in_chans)
        # Models with a pre-logits head (MobileNetV3: conv_head) output head_hidden_size.
        feat = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.embed = nn.Linear(feat, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.bn(self.embed(self.backbone(x))))


def check_takes_input(net: EmbeddingNet, name: str, channels: int, size: int, setting: str) -> None:
    """A timm backbone that cannot embed the run's images (a ViT built for 224 px, say) is an
    error before any training, naming the model, the image size and the fix."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, channels, size, size))
    except Exception as e:  # (timm's own assertion, or a shape error deep in the network)
        from hwnas_edge.bundle import first_line

        raise HwnasError(f"{setting} {name!r} cannot embed this run's {channels}-channel {size} px images "
                         f"({first_line(e)}); pick a backbone that takes any input size (a CNN such "
                         f"as resnet18), or set space.input_size to the size the model expects") from None
    finally:
        net.train(was)


def load_backbone_checkpoint(net: EmbeddingNet, path: str | Path) -> dict:
    """Initialize ``net.backbone`` from a user's timm checkpoint (safetensors, or a torch
    file read with ``weights_only=True``). Classifier weights in the file are ignored."""
    path = Path(path)
    if not path.is_file():
        raise HwnasError(f"backbone checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    # the format by content, whatever the file's name: safetensors opens with its header's
    # length (8 bytes, little-endian) and the header's "{"; a torch file is a zip or a pickle
    safetensors = len(head) == 9 and head[8:9] == b"{"
    if len(head) < 2 or not (safetensors or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise HwnasError(f"{path} is neither a safetensors file nor a torch checkpoint "
                         f"({'empty' if not head else 'it starts with ' + repr(head[:8])}); give your "
                         "timm backbone's weights, saved with safetensors.torch.save_file(model.state_dict(), "
                         "path) or torch.save(model.state_dict(), path)")
    if safetensors:
        from hwnas_edge.bundle import first_line
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # SafetensorError: a truncated or foreign file
            raise HwnasError(f"cannot read {path} as safetensors ({first_line(e)}); "
                             "save it with safetensors.torch.save_file(model.state_dict(), path)") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            # (not PyTorch's note: it offers ways to unpickle the file, which hwnas never does;
            # its "Unsupported global" line says what the file holds besides weights)
            lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
            why = next((ln.split("error:", 1)[-1].split(". ")[0].strip() for ln in lines
                        if "Unsupported global" in ln),
                       "not a plain weights file" if isinstance(e, pickle.UnpicklingError)
                       else (lines[0] if lines else type(e).__name__))
            raise HwnasError(f"cannot read {path} as a weights-only torch checkpoint ({why}); "
                             "save it with torch.save(model.state_dict()) or as safetensors "
                             "(hwnas does not unpickle files)") from None
        for key in ("state_dict", "model"):  # timm's train.py / many repos' {"model": ...}
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise HwnasError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors; save "
                         "the backbone with torch.save(model.state_dict(), path) or as safetensors")
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise HwnasError(f"{path} holds entries that are not tensors ({', '.join(map(repr, other[:3]))}); "
                         "if the weights sit under one of them, save that state dict alone: "
                         "torch.save(model.state_dict(), path)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.backbone.state_dict()
    # the backbone's keys may sit under a prefix: "backbone." or "net.backbone." (an hwnas
    # gallery model's own file), "model.", "encoder." ...: the prefix that names the most
    prefixes = {""} | {k[:i + 1] for k in state for i, c in enumerate(k) if c == "." and k[:i].count(".") < 2}
    prefix = max(sorted(prefixes), key=lambda p: sum(k.removeprefix(p) in own for k in state if k.startswith(p)))
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise HwnasError(f"{path} holds no weights of this backbone (its keys look like "
                         f"{list(state)[:3]}); is it the same timm architecture?")
    # the stem of a model of another channel count (RGB weights for grayscale images): adapted
    # as timm adapts pretrained weights (summed over RGB for 1 channel, repeated and scaled else)
    first = next((k for k, v in own.items() if v.ndim == 4), None)
    adapted = None
    if first in state and first not in usable:
        a, b = state[first].shape, own[first].shape
        if len(a) == 4 and a[0] == b[0] and a[2:] == b[2:] and a[1] != b[1]:
            from timm.models import adapt_input_conv

            try:
                w = (state[first].repeat(1, b[1], 1, 1) / b[1] if a[1] == 1  # (a grey stem: each
                     else adapt_input_conv(b[1], state[first]))  # channel a third of the grey's)
            except (AssertionError, NotImplementedError, ValueError):  # (a stem timm cannot adapt:
                w = None  # named below as a weight of another shape)
            if w is not None and w.shape == b:  # (timm's returns an RGBA stem as it is for RGB)
                usable[first] = w.to(own[first].dtype)
                adapted = f"{first}: {a[1]} -> {b[1]} input channels"
    # the file must be this backbone, whole: a partial load would train (or, frozen, keep)
    # randomly initialized layers beside the user's, and a bigger model of the same family
    # holds all of a smaller one's names (BatchNorm's step counters, which nothing reads,
    # and the classifier, which hwnas replaces, aside)
    counters = {k for k in own if k.endswith("num_batches_tracked")}
    cls = (getattr(net.backbone, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    heads = tuple(f"{c}." for c in ([cls] if isinstance(cls, str) else cls)) + ("fc.", "head.", "classifier.")
    shaped = [k for k in own if k in state and k not in usable and k not in counters]
    absent = [k for k in own if k not in state and k not in counters]
    extra = [k for k in state if k not in own and not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    if shaped or absent or extra:
        k = shaped[0] if shaped else None
        why = "; ".join(filter(None, (
            f"{len(shaped)} of its {len(own) - len(counters)} weights differ in shape (e.g. {k}: "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here)" if shaped else "",
            f"{len(absent)} of its weights are not in the file (e.g. {', '.join(absent[:3])})" if absent else "",
            f"the file holds {len(extra)} weights it does not have (e.g. {', '.join(extra[:3])}: a bigger "
            "model of the family?)" if extra else "")))
        raise HwnasError(f"{path} is not the {type(net.backbone).__name__} backbone of gallery.backbone "
                         f"(--backbone): {why}. Give the weights of that timm architecture, e.g. saved "
                         "from timm.create_model(name).state_dict()")
    broken = [k for k, v in usable.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # (training from it fails at its first step, blamed on the learning rate)
        raise HwnasError(f"{path}: {len(broken)} weights hold NaN or infinite values (e.g. {broken[0]}); "
                         "give a checkpoint saved before the training it comes from diverged")
    net.backbone.load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "missing": sorted(counters - set(usable)),
            "ignored": sorted(set(state) - set(usable)), "adapted": adapted}


# ---------------------------------------------------------------------- save / load
def _weights_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(out_dir: str | Path, modules: dict[str, nn.Module], config: dict) -> dict:
    """Write ``model.safetensors`` and ``config.json`` (with ``fingerprint``) atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    cfg = {k: v for k, v in config.items() if k not in ("fingerprint", "metrics")}
    cfg["format"] = MODEL_FORMAT
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
        fp = hashlib.sha256((stable_json(cfg) + _weights_hash(tmp)).encode()).hexdigest()[:16]
    full = {**config, **cfg, "fingerprint": fp}
    write_json(out_dir / "config.json", full)
    return full


def load_state(model_dir: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module name: state dict}) of a saved model; checks the fingerprint."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / "config.json", model_dir / "model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        weights = model_dir.is_file() and model_dir.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin")
        ours = weights and (model_dir.parent / "config.json").exists()
        raise HwnasError(f"{model_dir} is not a saved hwnas model (a folder with config.json and "
                         "model.safetensors); " + (
                             f"give its folder, {model_dir.parent}" if ours else "train one first" + (
                                 ": a weights file of your own backbone is hwnas train-gallery "
                                 "--backbone-checkpoint's (gallery.backbone_checkpoint)" if weights else "")))
    # (deleted, it is not written anew: the folder is then no model)
    cfg = read_json(cfg_path, fix="restore it, or train that model again (the training command with --restart)")
    if cfg.get("format") != MODEL_FORMAT:
        raise HwnasError(f"{cfg_path} has format {cfg.get('format')!r}, expected {MODEL_FORMAT!r}")
    core = {k: v for k, v in cfg.items() if k not in ("fingerprint", "metrics")}
    fp = hashlib.sha256((stable_json(core) + _weights_hash(w_path)).encode()).hexdigest()[:16]
    if fp != cfg.get("fingerprint"):
        raise HwnasError(f"{model_dir}: the weights or config do not match the recorded "
                         f"fingerprint ({cfg.get('fingerprint')} vs {fp}); the files were changed "
                         "or mixed up — retrain or restore them")
    flat = load_file(str(w_path))
    states: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        name, _, rest = k.partition(".")
        states.setdefault(name, {})[rest] = v
    return cfg, states


class GalleryBundle:
    """A frozen gallery model: embedding net + cosine classifier + its config."""

    def __init__(self, net: EmbeddingNet, classifier: CosineClassifier, config: dict):
        self.net, self.classifier, self.config = net, classifier, config
        for p in list(net.parameters()) + list(classifier.parameters()):
            p.requires_grad_(False)
        net.eval()

    @property
    def fingerprint(self) -> str:
        return self.config["fingerprint"]

    @property
    def class_names(self) -> list[str]:
        return self.config["classifier"]["classes"]


def build_gallery(cfg: dict) -> tuple[EmbeddingNet, CosineClassifier]:
    net = EmbeddingNet(cfg["backbone"], cfg["embed_dim"], cfg["preprocess"]["channels"], bn=True)
    c = cfg["classifier"]
    head = CosineClassifier(cfg["embed_dim"], len(c["classes"]), c["scale"], c["margin"], c["kind"])
    return net, head


def load_gallery(model_dir: str | Path) -> GalleryBundle:
    cfg, states = load_state(model_dir)
    if cfg.get("role") != "gallery":
        raise HwnasError(f"{model_dir} holds a {cfg.get('role')} model, not a gallery model")
    net, head = build_gallery(cfg)
    net.load_state_dict(states["net"])
    head.load_state_dict(states["classifier"])
    return GalleryBundle(net, head, cfg)


def build_query(cfg: dict) -> nn.Module:
    """The query network of a query config: an SPOS subnet or a timm baseline."""
    if cfg["kind"] == "subnet":
        from hwnas.nn.supernet import SubNet
        from hwnas.space import Arch, SearchSpace

        space = SearchSpace.from_dict(cfg["space"])
        return SubNet(space, Arch.parse(cfg["arch"], space))
    if cfg["kind"] == "timm":
        return EmbeddingNet(cfg["timm"], cfg["embed_dim"], cfg["preprocess"]["channels"], bn=False)
    raise HwnasError(f"unknown query model kind {cfg['kind']!r}")


def load_query(model_dir: str | Path) -> tuple[nn.Module, dict]:
    cfg, states = load_state(model_dir)
    if cfg.get("role") != "query":
        raise HwnasError(f"{model_dir} holds a {cfg.get('role')} model, not a query model")
    net = build_query(cfg)
    net.load_state_dict(states["net"])
    return net.eval(), cfg


def config_hash(d: dict) -> str:
    return content_hash(d)
