"""Typed configuration: one YAML (or JSON) file with sections, overridden by CLI flags.

Sections: ``run_dir``, ``seed``, ``data`` (source, split protocol, preprocess, unlabeled
images), ``space`` (the query search space), ``gallery``, ``supernet``, ``query``,
``latency``, ``search``, ``deploy`` and ``adapt``. Unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hwnas.errors import HwnasError
from hwnas.fields import checked_fields


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | omniglot | folder | manifest | digits
    data_dir: str | None = None  # None: the dataset's default location
    skip_bad_images: bool = False
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    split: dict = field(default_factory=dict)  # SplitConfig fields
    # images without labels (a folder, a .zip, a CSV manifest with a path column, or
    # strokes:N — N procedural pen-stroke images; or a list of these) added to the supernet's
    # and query models' training for the parts that need no labels (regress, contrast, mix, bank, rank, feat):
    # e.g. more in-domain images than you can label. Never the test images.
    unlabeled: str | list | None = None


def checkpoint_path(value: str | None, setting: str = "gallery.backbone_checkpoint") -> str | None:
    """A weights file's path as given (``~`` is the home folder); an empty one (an unset shell
    variable) is an error rather than a silent start from random weights."""
    if value is None:
        return None
    if not str(value).strip():
        raise HwnasError(f"{setting} is empty; give your weights file's path, or leave it out (null) "
                         "to start the backbone from random weights")
    import os

    return os.path.expanduser(str(value))


@dataclass
class GalleryConfig:
    backbone: str = "resnet50"  # any timm model name (no pretrained download)
    classifier: str = "cosface"  # cosface | arcface
    scale: float = 30.0
    margin: float = 0.2
    backbone_checkpoint: str | None = None  # your own timm weights (safetensors or torch file)
    freeze_backbone: bool = False  # with a checkpoint: train only the embedding head
    train: dict = field(default_factory=dict)  # TrainConfig fields

    def __post_init__(self) -> None:
        if isinstance(self.backbone_checkpoint, str) or self.backbone_checkpoint is None:
            self.backbone_checkpoint = checkpoint_path(self.backbone_checkpoint)
        if self.classifier not in CLASSIFIERS:
            raise HwnasError(f"gallery.classifier {self.classifier!r} must be one of {', '.join(CLASSIFIERS)}")
        if not self.scale > 0 or self.margin < 0:
            raise HwnasError(f"gallery.scale ({self.scale}) must be > 0 and gallery.margin "
                             f"({self.margin}) >= 0 (e.g. 30 and 0.2)")


PICKS_IN_BAND = ("fastest", "most-flops")  # search.pick_in_band (hwnas.search.runner.choose)
PATH_SAMPLING = ("uniform", "spread")  # supernet.path_sampling (hwnas.compat.tasks.ArchSampler)


@dataclass
class SupernetConfig:
    train: dict = field(default_factory=dict)  # TrainConfig fields
    loss: dict = field(default_factory=dict)  # LossConfig fields
    flops_range: list | None = None  # [lo, hi] MFLOPs: sample only paths in this range
    # fraction of training over which paths open up, from one anchor path (every layer k3 at
    # scale 1.0) to uniform SPOS sampling; 0: uniform from the first step (see ArchSampler)
    path_warmup: float = 0.4
    # uniform: SPOS's path sampling (nearly every path near the space's middle in FLOPs);
    # spread: each path's depth drawn first, so cheap shallow paths train too (ArchSampler),
    # and a flops_range at the space's cheap end finds paths (uniform's rarely fall there)
    path_sampling: str = "uniform"
    cache_gallery_embeddings: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.path_warmup <= 1:
            raise HwnasError(f"supernet.path_warmup {self.path_warmup} must be in [0, 1] (a fraction "
                             "of training; 0: uniform path sampling from the first step)")
        if self.path_sampling not in PATH_SAMPLING:
            raise HwnasError(f"supernet.path_sampling {self.path_sampling!r} must be uniform (SPOS's) or "
                             "spread (each path's depth drawn first)")
        r = self.flops_range
        if r is not None and len(r) == 0:  # [] : no range, as null
            self.flops_range = r = None
        if r is not None:
            try:  # YAML leaves 5e-1 as text; a number is meant
                r = [float(v) if isinstance(v, str) else v for v in r]
            except ValueError:
                pass
            if not (len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(float(v)) and v >= 0 for v in r) and r[0] < r[1]):
                raise HwnasError(f"supernet.flops_range {self.flops_range!r} must be two MFLOPs figures "
                                 "[low, high] with 0 <= low < high (e.g. [1, 5]), or null for the whole space")
            self.flops_range = list(r)


@dataclass
class QueryConfig:
    train: dict = field(default_factory=dict)  # TrainConfig fields
    loss: dict | None = None  # LossConfig fields; None: the supernet's loss
    inherit: bool = True  # start SPOS subnets from the supernet's weights
    # > 1: the search's choice and its next best archs by reward, `finalists` in all, each train
    # `finalist_epochs` epochs of the full schedule; the lowest training loss there finishes
    # (hwnas train-query --from-search, run)
    finalists: int = 0
    finalist_epochs: int = 10
    # how many of the independent query trainings (the finalists, the baselines) train at
    # once, each in its own process (hwnas run --jobs); where models train, not what they learn
    # (another thread count only rounds apart)
    jobs: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise HwnasError(f"query.jobs must be a whole number >= 1 (1: one training at a time), "
                             f"got {self.jobs!r}")
        if not isinstance(self.finalists, int) or self.finalists < 0:
            raise HwnasError(f"query.finalists must be a whole number >= 0 (0 or 1: the search's choice "
                             f"alone), got {self.finalists!r}")
        if not isinstance(self.finalist_epochs, int) or self.finalist_epochs < 1:
            raise HwnasError(f"query.finalist_epochs must be a whole number >= 1, got {self.finalist_epochs!r}")


@dataclass
class AdaptConfig:
    """Gallery adaptation (``hwnas adapt``): the trained query model fine-tuned on the images
    the gallery indexes, without their labels, toward the gallery model's embeddings of them
    (which the index holds anyway). The query model then fits the domain it is searched in;
    its architecture, and so its edge latency, stay the same. It sees the gallery's images,
    so on a benchmark it is transductive: report it apart from the inductive protocol."""
    epochs: int = 0  # 0: off (hwnas run skips the step)
    lr: float = 0.01  # a fine-tune from the trained weights: below query.train.lr, no warm-up
    # what to adapt to: an unlabeled source (a folder, a .zip, a CSV manifest, or a list) —
    # the images your index holds; null: deploy.catalog where the config names one, else the
    # split's gallery part (what hwnas deploy indexes then)
    images: str | list | None = None
    max_images: int = 20000  # a larger gallery is sampled (seeded) down to this many

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise HwnasError(f"adapt.epochs must be a whole number >= 0 (0: off), got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise HwnasError(f"adapt.lr must be positive, got {self.lr!r}")
        if not isinstance(self.max_images, int) or self.max_images < 1:
            raise HwnasError(f"adapt.max_images must be a whole number >= 1, got {self.max_images!r}")


@dataclass
class LatencyConfig:
    # default: latency_tables/<machine>-<cpu model>-<cores>c-ort<ver>-fp32-t<threads>-r<size>-s<hash>.json
    table: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads (default: physical cores)
    validate: int = 0  # hwnas run: end-to-end validation archs when it builds a table

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 0:
            raise HwnasError(f"latency.threads {self.threads} must be a thread count (1 or more), or 0 or "
                             "null for the physical core count")
        if self.validate < 0 or 0 < self.validate < 3:
            raise HwnasError(f"latency.validate {self.validate} must be 0 (no end-to-end check) or at "
                             "least 3 subnets (rank correlations need 3; e.g. 30)")


SAMPLERS = ("tpe", "nsga2", "random", "evolution")
REWARDS = ("r1", "r2", "r3")
METRICS = ("recall@1", "recall@5", "recall@10", "mAP")  # and TAR@FAR=f (verification; 0 < f < 1)


def parse_far(text: str) -> float | None:
    """A false accept rate written as ``text``: a number 0 < f < 1, else None."""
    try:
        f = float(text)
    except ValueError:
        return None
    return f if 0 < f < 1 else None


def metric_fars(metric) -> tuple[float, ...]:
    """``(f,)`` for a ``TAR@FAR=f`` metric with 0 < f < 1, else ``()``."""
    if not str(metric).startswith("TAR@FAR="):
        return ()
    f = parse_far(metric.split("=", 1)[1])
    return () if f is None else (f,)


VAL_QUERIES = ("all", "split")
CLASSIFIERS = ("cosface", "arcface")


@dataclass
class SearchConfig:
    budget_ms: float | None = None
    budget_fraction: float = 0.3  # hwnas run without budget_ms: lo + f * (hi - lo) of the table
    budget_speedup: float | None = None  # hwnas run: budget = the paragon's latency / this (measured)
    reward: str = "r3"  # r1: M(q,q) | r2: M(q,g) | r3: alpha*M(q,g) + (1-alpha)*M(q,q)
    alpha: float = 0.5
    metric: str = "recall@1"  # or recall@5, recall@10, mAP, TAR@FAR=f (e.g. TAR@FAR=1e-3)
    sampler: str = "tpe"  # tpe | nsga2 | random | evolution
    n_trials: int = 100  # evaluated (feasible) trials, distinct archs (a repeat is not evaluated again)
    multi_objective: bool = False
    bn_batches: int = 4  # BN recalibration batches (of 128 training images) per trial
    # all: every validation image is a query against all the others (leave-one-out; about
    # 5x the queries of the split, so a tighter estimate at the same embedding cost);
    # split: the split's val_query part against its val_gallery part
    val_queries: str = "all"
    max_infeasible: int = 2000  # consecutive over-budget samples before giving up
    # the arch chosen: the fastest (predicted) of those whose reward is within this much of the
    # best reward; "se": a conservative one-standard-error band of the best reward r on its n
    # validation queries, sqrt(r(1-r)/n) (binomial; the r3 mix of two correlated accuracies,
    # and mAP, vary less); 0: the best reward's arch
    prefer_faster_within: float | str = "se"
    # which arch of that band: the fastest (predicted), or the one with the most FLOPs — within
    # a budget, trained accuracy follows capacity more closely than the supernet's score does
    # (known-limits.md); either stays within the budget
    pick_in_band: str = "fastest"
    population: int = 20  # evolution
    tournament: int = 5
    mutation_prob: float = 0.1
    crossover_prob: float = 0.5
    storage: str | None = None  # default: sqlite in the run directory
    study_name: str | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The settings' own checks; ``hwnas search`` runs them again after its flags."""
        if metric_fars(self.metric):  # one spelling of the metric: the key evaluate() writes
            self.metric = f"TAR@FAR={metric_fars(self.metric)[0]:g}"
        elif str(self.metric).startswith("TAR@FAR="):
            raise HwnasError(f"search.metric (--metric) {self.metric!r}: the FAR must be a number between "
                             "0 and 1, e.g. TAR@FAR=1e-3")
        elif self.metric not in METRICS:
            raise HwnasError(f"search.metric (--metric) {self.metric!r} must be one of {', '.join(METRICS)}, "
                             "or TAR@FAR=f (verification at false accept rate f, e.g. TAR@FAR=1e-3)")
        for name, allowed in (("reward", REWARDS), ("sampler", SAMPLERS), ("val_queries", VAL_QUERIES)):
            if getattr(self, name) not in allowed:
                raise HwnasError(f"search.{name} (--{name.replace('_', '-')}) {getattr(self, name)!r} "
                                 f"must be one of {', '.join(allowed)}")
        if not 0 <= self.alpha <= 1:
            raise HwnasError(f"search.alpha (--alpha) {self.alpha} must be between 0 and 1 "
                             "(the weight of M(q,g) in the r3 reward)")
        if self.sampler == "evolution" and self.multi_objective:
            raise HwnasError("the evolution sampler is single-objective; use nsga2 or tpe with "
                             "--multi-objective")
        for name in ("n_trials", "bn_batches", "max_infeasible", "population", "tournament"):
            if getattr(self, name) < 1:
                raise HwnasError(f"search.{name} must be at least 1, got {getattr(self, name)}")
        b = self.prefer_faster_within
        if b != "se" and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)
                          or not 0 <= b < 1):
            raise HwnasError(f"search.prefer_faster_within (--prefer-faster-within) {b!r} must be \"se\" "
                             "(one standard error of the best reward) or a reward difference from 0 (the "
                             "best reward's arch) to below 1, e.g. 0.01 for one point of recall@1")
        if self.pick_in_band not in PICKS_IN_BAND:
            raise HwnasError(f"search.pick_in_band (--pick-in-band) {self.pick_in_band!r} must be one of "
                             f"{', '.join(PICKS_IN_BAND)} (which arch of the band near the best reward)")
        for name in ("mutation_prob", "crossover_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise HwnasError(f"search.{name} {getattr(self, name)} must be between 0 and 1")
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise HwnasError(f"search.budget_ms (--budget-ms) {self.budget_ms} must be a positive number "
                             "of milliseconds")
        # (each is read only where the ones before it are unset, and checked only there)
        if self.budget_ms is None and self.budget_speedup is not None and not (
                math.isfinite(self.budget_speedup) and self.budget_speedup > 1):
            raise HwnasError(f"search.budget_speedup {self.budget_speedup} must be above 1 (e.g. 10: "
                             "the query model ten times faster than the paragon), or set budget_ms")
        if self.budget_ms is None and self.budget_speedup is None and not 0 < self.budget_fraction < 1:
            raise HwnasError(f"search.budget_fraction {self.budget_fraction} must be between 0 and 1, "
                             "both left out (the fraction of the way from the fastest subnet's latency "
                             "to the slowest's; e.g. 0.3), or set budget_ms or budget_speedup")
        if self.sampler == "evolution" and self.tournament > self.population:
            raise HwnasError(f"search.tournament ({self.tournament}) must be at most search.population "
                             f"({self.population}): the evolution sampler draws its tournament from the "
                             "population")


@dataclass
class DeployConfig:
    int8: bool = False
    index: str | None = None  # FAISS factory string; default by gallery size
    # the images the index holds: a folder, a .zip, or a CSV manifest (path and optional label
    # columns) of your catalog, embedded by the gallery model in batches; null: the test
    # split's gallery part (what the accuracy figures are measured on either way)
    catalog: str | None = None

    def __post_init__(self) -> None:
        if self.catalog is not None and not self.catalog.strip():
            raise HwnasError("deploy.catalog is empty: give the folder, .zip or CSV manifest of the "
                             "images the index is to hold, or null for the test split's gallery part")


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    space: dict = field(default_factory=dict)  # SearchSpace fields
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    seed: int = 0

    # ---------------------------------------------------------------- builders
    def search_space(self):
        from hwnas.space import SearchSpace

        return SearchSpace.from_dict(self.space) if self.space else SearchSpace()

    def split_config(self):
        from hwnas.data.splits import SplitConfig

        return _build(SplitConfig, self.data.split, "data.split")

    def preprocess(self):
        from hwnas.data.images import Preprocess

        sp = self.search_space()
        return Preprocess(sp.input_size, sp.in_channels, self.data.mean, self.data.std)

    def adapt_images(self) -> tuple[str, str | list] | None:
        """What ``hwnas adapt`` adapts to: (the setting that names it, the source) —
        ``adapt.images``, else ``deploy.catalog`` (the images the deployed index is to hold),
        else None (the split's gallery part, what ``hwnas deploy`` indexes without a catalog)."""
        if self.adapt.images:
            return "adapt.images", self.adapt.images
        if self.deploy.catalog:
            return "deploy.catalog", self.deploy.catalog
        return None

    def train_config(self, section: str):
        from hwnas.compat.train import TrainConfig

        d = getattr(self, section).train
        return _build(TrainConfig, d, f"{section}.train")

    def loss_config(self, section: str = "supernet"):
        from hwnas.compat.losses import LossConfig

        d = self.query.loss if (section == "query" and self.query.loss is not None) else self.supernet.loss
        return _build(LossConfig, d, f"{section}.loss")

    def validate(self) -> "Config":
        """Build every part that is otherwise built only when its step starts (the split, the
        space, the preprocessing, the training and loss settings), so a mistake in any of
        them fails at once, not after earlier steps have trained for hours."""
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise HwnasError(f"config run_dir must be a folder path, got {self.run_dir!r}")
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise HwnasError(f"run_dir {self.run_dir} is a file, not a folder: give a folder's path "
                             "(--run-dir or run_dir in the config)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 32:
            raise HwnasError(f"config seed must be a whole number from 0 to 2**32 - 1, got {self.seed!r}")
        for section in (self.data, self.gallery, self.supernet, self.query, self.latency,
                        self.search, self.deploy, self.adapt):
            # re-check the sections: a --set, a flag or code may have changed a value since loading
            name = _SECTION_NAMES[type(section)]
            for k, v in checked_fields(type(section), dataclasses.asdict(section), name).items():
                setattr(section, k, v)
            if hasattr(section, "__post_init__"):
                section.__post_init__()
        self.split_config()
        self.preprocess()
        for section in ("gallery", "supernet", "query"):
            self.train_config(section)
        if self.query.finalists > 1 and self.query.finalist_epochs >= self.train_config("query").epochs:
            raise HwnasError(f"query.finalist_epochs ({self.query.finalist_epochs}) must be fewer than "
                             f"query.train.epochs ({self.train_config('query').epochs}): the finalists are "
                             "compared part way through their training (or set query.finalists: 0)")
        from hwnas.data.sources import unlabeled_specs

        unlabeled_specs(self.data.unlabeled)
        unlabeled_specs(self.adapt.images, "adapt.images")
        if self.loss_config("supernet").feat:
            from hwnas.compat.losses import FEAT_NOT_SUPERNET

            raise HwnasError(f"supernet.{FEAT_NOT_SUPERNET}")
        self.loss_config("query")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, d: dict | None, where: str):
    if d is None:  # a section whose keys are all commented out: its defaults
        d = {}
    kw = checked_fields(cls, d, where)
    for f in dataclasses.fields(cls):  # a mapping whose keys are all commented out: empty
        if f.default_factory is dict and f.name in kw and kw[f.name] is None:
            kw[f.name] = {}
    for k, v in kw.items():
        if k in SECTIONS:
            kw[k] = _build(SECTIONS[k], v, k)
    try:
        return cls(**kw)
    except HwnasError as e:  # a check of the settings' own class: say which section they are
        if str(e).startswith(where):
            raise
        raise type(e)(f"{where}: {e}") from None


SECTIONS = {"data": DataConfig, "gallery": GalleryConfig, "supernet": SupernetConfig,
            "query": QueryConfig, "latency": LatencyConfig, "search": SearchConfig,
            "deploy": DeployConfig, "adapt": AdaptConfig}
_SECTION_NAMES = {cls: name for name, cls in SECTIONS.items()}


def load_config(path: str | Path | None) -> Config:
    """Load a YAML/JSON config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    if path.is_dir():
        raise HwnasError(f"config {path} is a folder; give the YAML or JSON config file (see configs/ "
                         "for examples; a run directory keeps its settings in config.json files, not one config)")
    if not path.is_file():
        raise HwnasError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        with path.open(encoding="utf-8") as f:  # (a stream: YAML's messages name the file)
            if path.suffix == ".json":
                d = json.load(f)
            else:
                import yaml

                d = yaml.safe_load(f)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError / UnicodeDecodeError
        raise HwnasError(f"config file {path} is not valid YAML/JSON: {e}") from None
    if d is None:  # (an empty file, or comments alone: most likely the wrong file)
        raise HwnasError(f"config file {path} holds no settings (it is empty or all comments); give "
                         "your config (see configs/), or, for the defaults on purpose, a file holding {}")
    try:
        return _build(Config, d, "")
    except HwnasError as e:
        raise HwnasError(f"{path}: {e}") from None
