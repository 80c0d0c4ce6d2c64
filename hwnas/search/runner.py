"""``hwnas search``: the compatibility-aware, latency-constrained architecture search.

Each Optuna trial proposes an arch (``space.suggest``). Its latency is *predicted* from the
device's table first: an arch over budget is recorded as infeasible with
``Trial.set_constraint`` (a few storage writes: milliseconds; but to TPE and NSGA-II each is
history their next proposal reads, and a TPE study that drew thousands asked in tenths of a
second) and never evaluated. A feasible arch is
evaluated from the trained supernet: BatchNorm recalibration on training images, then
M(q,q) and M(q,g) on the validation split (never the test split), with the gallery side's
embeddings computed once per study. The reward is R1 = M(q,q), R2 = M(q,g) or
R3 = alpha * M(q,g) + (1 - alpha) * M(q,q).

Studies live in the run directory (SQLite) by default and resume after a kill; any Optuna
storage URL (PostgreSQL, a journal file) lets many workers search one study.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from hwnas.config import REWARDS, SAMPLERS, Config, metric_fars
from hwnas.errors import HwnasError
from hwnas.rundir import RunDir
from hwnas.space import Arch, arch_flops
from hwnas.utils import atomic_write_text, read_json, save_figure, write_json


def reward(m_qq: float, m_qg: float, kind: str = "r3", alpha: float = 0.5) -> float:
    if kind == "r1":
        return m_qq
    if kind == "r2":
        return m_qg
    if kind == "r3":
        return alpha * m_qg + (1 - alpha) * m_qq
    raise HwnasError(f"reward {kind!r} must be one of {REWARDS}")


# ---------------------------------------------------------------------- pieces
def table_path(cfg: Config, space) -> Path:
    if cfg.latency.table:
        return Path(cfg.latency.table)
    from hwnas.latency.backends import OrtCpuBackend
    from hwnas.latency.table import LatencyTable

    settings = OrtCpuBackend(threads=cfg.latency.threads).settings()
    return Path("latency_tables") / LatencyTable.default_name(settings, space)


def predictor_for(cfg: Config, space):
    from hwnas.latency.backends import OrtCpuBackend
    from hwnas.latency.profile import load_predictor

    path = table_path(cfg, space)
    if not path.exists():
        raise HwnasError(f"no latency table at {path}: build it with `hwnas profile --device cpu --config CONFIG"
                         + (f" --out {path}`" if cfg.latency.table else "` (the config this run uses)")
                         + ", or set latency.table to a table's path")
    # a table of the config's own device is checked against this machine's runtime; one given
    # by path (profiled on the edge device, say) only against the thread count asked for, which
    # deploy and the report time the query models at
    settings = (OrtCpuBackend(threads=cfg.latency.threads).settings() if not cfg.latency.table
                else {"threads": cfg.latency.threads} if cfg.latency.threads else None)
    return load_predictor(space, path, settings, given=bool(cfg.latency.table)), path


class SupernetEvaluator:
    """M(q,q) and M(q,g) of supernet subnets on the validation split."""

    def __init__(self, cfg: Config, log=print):
        import torch

        from hwnas.compat import api
        from hwnas.data.images import Preprocess
        from hwnas.data.splits import no_validation_reason
        from hwnas.nn.supernet import calibration_batches

        rd = RunDir(cfg)
        self.net, scfg, _ = api.load_supernet(rd)
        gallery = api.run_gallery(rd)
        api.check_supernet_gallery(scfg, gallery.fingerprint, "searching it")
        self.pre = Preprocess.from_dict(scfg["preprocess"])
        api.check_compatible(gallery.config, self.net.space.embed_dim, self.pre)
        splits = rd.splits(log=log)
        why = no_validation_reason(splits)
        if why:
            raise HwnasError(why)
        cfg.search.check()  # (val_queries among them: a caller may have set it since loading)
        same_pre = gallery.config["preprocess"] == self.pre.to_dict()
        self.vq = api.load_part(rd, "val_query", self.pre, log=log)
        self.vg = api.load_part(rd, "val_gallery", self.pre, log=log)
        self.g_emb = api.gallery_embeddings(rd, gallery, "val_gallery", self.vg if same_pre else None, log=log)
        # whether the validation parts share images: decided on the parts themselves, not on
        # data.split.query_mode (with "all" the test parts share theirs, but the validation
        # parts are still a query/gallery division of their images)
        shared = not set(self.vq.ids).isdisjoint(self.vg.ids)
        self.ids = (self.vq.ids, self.vg.ids) if shared else (None, None)
        if cfg.search.val_queries == "all" and not shared:
            # leave-one-out over the whole validation split: each image a query against all
            # the others (its own entry excluded by id)
            qg = api.gallery_embeddings(rd, gallery, "val_query", self.vq if same_pre else None, log=log)
            self.g_emb = np.concatenate([qg, self.g_emb])
            self.vq = self.vg = api.PartImages(
                torch.cat([self.vq.images, self.vg.images]), torch.cat([self.vq.labels, self.vg.labels]),
                np.concatenate([self.vq.raw_labels, self.vg.raw_labels]), [*self.vq.ids, *self.vg.ids])
            self.ids = (self.vq.ids, self.vq.ids)
        train = api.load_part(rd, "train", self.pre, log=log)
        self.calib = calibration_batches(train.images, self.pre.normalize, cfg.seed, 128 * cfg.search.bn_batches)
        self.torch = torch
        self.cache: dict[str, dict] = {}
        self.fars = metric_fars(cfg.search.metric)  # a TAR@FAR metric: verification as well
        # a FAR the validation pairs cannot resolve scores NaN: every trial would fail
        from hwnas.retrieval.metrics import unresolvable_far

        why = unresolvable_far(self.fars, self.vq.raw_labels, self.vg.raw_labels)
        if why:
            raise HwnasError(f"search.metric {cfg.search.metric} on the validation split: {why}; raise the "
                             "FAR, or the validation split (data.split.val_fraction)")

    @property
    def n_queries(self) -> int:
        """The validation queries each arch is scored on (a trial records those with a positive)."""
        return len(self.vq.images)

    def __call__(self, arch: Arch) -> dict:
        from hwnas.compat.api import embed
        from hwnas.nn.supernet import recalibrate_bn
        from hwnas.retrieval import evaluate

        key = arch.to_string()
        if key in self.cache:
            return self.cache[key]
        t = time.time()
        recalibrate_bn(self.net, self.calib, arch)
        q = embed(self.net, self.vq.images, self.pre.normalize, arch=arch)
        g = q if self.vg is self.vq else embed(self.net, self.vg.images, self.pre.normalize, arch=arch)
        res = {
            "M(q,q)": evaluate(q, self.vq.raw_labels, g, self.vg.raw_labels,
                               query_ids=self.ids[0], gallery_ids=self.ids[1], fars=self.fars),
            "M(q,g)": evaluate(q, self.vq.raw_labels, self.g_emb, self.vg.raw_labels,
                               query_ids=self.ids[0], gallery_ids=self.ids[1], fars=self.fars),
            "seconds": time.time() - t,
        }
        self.cache[key] = res
        return res


def search_reward(res: dict, s) -> float:
    """The study's reward of an evaluator result, by the search config's metric and reward."""
    return reward(res["M(q,q)"][s.metric], res["M(q,g)"][s.metric], s.reward, s.alpha)


def make_sampler(name: str, space, cfg: Config, seed: int | None, multi_objective: bool,
                 predictor=None, budget: float | None = None):
    """An Optuna sampler. With ``predictor`` and ``budget``, the random and evolution
    samplers draw only archs predicted within the budget (TPE and NSGA-II learn the
    constraint from the over-budget trials instead)."""
    import optuna

    fits = init = None
    if predictor is not None and budget is not None:
        fits = lambda a: predictor(a) <= budget  # noqa: E731
        init = lambda rng: predictor.sample_feasible(budget, rng)  # noqa: E731

    if name == "tpe":
        import warnings

        with warnings.catch_warnings():  # `group` is marked experimental; it is what
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # conditional
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True,
                                              group=True)  # params (skip -> no scale) need
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, cfg.search.population), seed=seed)
    if name == "random":
        from hwnas.search.evolution import RandomArchSampler

        return RandomArchSampler(space, init=init, seed=seed)
    if name == "evolution":
        from hwnas.search.evolution import RegularizedEvolutionSampler

        s = cfg.search
        return RegularizedEvolutionSampler(space, s.population, s.tournament, s.mutation_prob,
                                           s.crossover_prob, seed=seed, fits=fits, init=init)
    raise HwnasError(f"sampler {name!r} must be one of {SAMPLERS}")


def _sqlite_file(url: str) -> Path | None:
    """The database file a sqlite URL names, as SQLAlchemy reads it (percent-decoded); None
    for another scheme, an in-memory database, a ``file:`` URI name or a URL it cannot parse
    (the storage's own error says why)."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    try:
        db = make_url(url).database
    except Exception:
        return None
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _check_journal(path: Path, url: str, wait_s: float = 1.0) -> None:
    """A file given as a journal that is none (Optuna would append its records to it, then fail
    on its first line) is an error, before anything is written to it. So is a journal whose last
    record is cut off (its writer killed mid-line, or the file cut short): Optuna reads past
    it, but the next record would be appended onto it, breaking the journal in the middle. A
    record another worker is writing this instant ends within ``wait_s``; one that stays cut
    off is an error naming the repair."""
    if not path.is_file() or not path.stat().st_size:  # (a new journal)
        return
    with open(path, "rb") as f:
        first = f.readline()
    try:
        # (a first record cut off is still a journal's, by its start: Optuna writes op_code first)
        record = json.loads(first) if first.endswith(b"\n") else (
            {"op_code": 0} if first.startswith(b'{"op_code"') else None)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise HwnasError(f"--storage / search.storage {url!r}: {path} is not an Optuna journal (its first "
                         "line is no journal record); give another path (a new file is made there)")

    def tail() -> tuple[int, bytes]:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if not size:
                return 0, b"\n"
            f.seek(size - 1)
            return size, f.read(1)

    size, last = tail()
    if last == b"\n":
        return
    time.sleep(wait_s)
    size2, last = tail()
    if last == b"\n" or size2 != size:
        return
    raise HwnasError(f"the journal {path} ends in a cut-off record (a worker killed while writing it, or the "
                     f"file cut short); remove that partial last line (sed -i '$ d' {path}) and start the "
                     "search again: the trials of the records before it are kept")


def make_storage(url: str | None, rd: RunDir):
    """Optuna storage: default SQLite in the run directory; ``journal:PATH`` a journal file
    (works on a shared disk); anything else an RDB URL (sqlite:///..., postgresql://...)."""
    import optuna

    if url is None:
        rd.path.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(rd.path / 'search.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal:"):]
        if not path or Path(path).is_dir():
            raise HwnasError(f"--storage / search.storage {url!r} needs a journal file's path after 'journal:' "
                             "(e.g. journal:/shared/search.log), not a folder or nothing")
        _check_journal(Path(path), url)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(path)), url
        except OSError as e:
            raise HwnasError(f"cannot open the journal storage {path}: {e.strerror or e}; give a "
                             "path in a folder you can write") from None

    db = _sqlite_file(url)
    if db is not None:
        parent = db.parent
        if not parent.is_dir():
            rel = "" if db.is_absolute() else (
                f" (sqlite:///PATH is relative to the working directory {Path.cwd()}; an absolute path "
                f"takes four slashes: sqlite:////{str(db).lstrip('/')})")
            raise HwnasError(f"--storage / search.storage {url!r}: the folder {parent} does not exist{rel}; "
                             "create it, or give a database file in a folder that does")
    # PostgreSQL through psycopg 3 (the postgres extra), whichever driver SQLAlchemy's version
    # defaults to (2.0: psycopg2); a URL naming its driver (postgresql+psycopg2://) keeps it
    db_url = "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url
    try:
        import warnings

        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():  # heartbeats are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for attempt in range(5):
                try:
                    # A worker killed mid-trial stops its heartbeat; after the grace period its
                    # trial is failed and retried once, so a kill never leaves a trial RUNNING.
                    return optuna.storages.RDBStorage(
                        db_url, heartbeat_interval=30, grace_period=90,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1)), url
                except Exception as e:
                    # several workers starting on a new storage at once race to create its
                    # schema; the losers see a duplicate row or a locked file, and the schema
                    # is there when they try again
                    raced = type(e).__name__ in ("IntegrityError", "OperationalError") and (
                        "UNIQUE" in str(e) or "already exists" in str(e) or "locked" in str(e))
                    if not raced or attempt == 4:
                        raise
                    time.sleep(0.5 * (attempt + 1))
    except Exception as e:  # bad URL, missing driver, server down
        # a bare postgresql:// is taken through psycopg 3 (make_storage), whatever SQLAlchemy's default
        drivers = {"postgresql": "pip install 'psycopg[binary]'",
                   "mysql": "pip install pymysql (and use mysql+pymysql://)"}
        hint = next((v for k, v in drivers.items() if url.startswith(k)), None)
        if hint and "import" in str(e).lower():
            fix = f"; install the driver: {hint}"
        elif any(w in str(e) for w in ("Can't load plugin", "Could not parse", "Invalid SQLite URL")):
            fix = ("; give sqlite:///PATH, postgresql://USER@HOST/DB, mysql+pymysql://USER@HOST/DB "
                   "or journal:PATH")
        elif url.startswith("sqlite:"):
            fix = ("; if the file is damaged, move it away (its finished trials are lost) or "
                   "give another --storage / search.storage")
        else:
            fix = ""
        from hwnas_edge.bundle import first_line

        raise HwnasError(f"cannot open the Optuna storage {url!r}: {first_line(e)}{fix}") from None


# ---------------------------------------------------------------------- the search
def check_budget(budget: float, predictor, tpath: Path) -> None:
    """A latency budget some subnet meets and not every subnet does, on this table."""
    lo, hi = predictor.range()
    if budget < lo:
        raise HwnasError(f"latency budget {budget} ms (--budget-ms / search.budget_ms) is below the fastest "
                         f"subnet's predicted latency ({lo:.3f} ms on {tpath.name}); feasible budgets: "
                         f"{lo:.3f} to {hi:.3f} ms")
    if budget >= hi:
        raise HwnasError(f"latency budget {budget} ms (--budget-ms / search.budget_ms) is above the slowest "
                         f"subnet's predicted latency ({hi:.3f} ms): every arch fits, so the budget "
                         f"constrains nothing; feasible budgets: {lo:.3f} to {hi:.3f} ms")


class _QuietStop:
    """A logging filter for Optuna's trial log: its warning (with a traceback) of a trial that
    a KeyboardInterrupt or an HwnasError ended, and the line after it, are dropped; the error
    itself goes on up, and the CLI says it in one line (``interrupted``, or the error)."""

    def __init__(self) -> None:
        self.after = False

    def filter(self, record) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        if exc is not None and issubclass(exc, (KeyboardInterrupt, HwnasError)):
            self.after = True
            return False
        if self.after and "failed with value" in record.getMessage():
            self.after = False
            return False
        return True


def _table_key(path: Path) -> str | None:
    """What a latency table predicts (:meth:`LatencyTable.prediction_key`; None: not a table)."""
    from hwnas.latency.table import LatencyTable

    try:
        return LatencyTable.load(path).prediction_key()
    except (HwnasError, OSError, ValueError):
        return None


def _same_table(old: dict, meta: dict) -> bool:
    """A study's latency table and this worker's predict alike (workers on other machines, or
    in other directories, name one table by other paths; a header-only rewrite such as
    ``hwnas profile --gallery-throughput`` changes no prediction). A study from before the
    key was recorded compares its path, and the table there if it is at hand."""
    if old.get("table_key") is not None:
        return old["table_key"] == meta["table_key"]
    if old.get("table") == meta["table"]:
        return True
    p = Path(old.get("table") or "")
    return p.is_file() and _table_key(p) == meta["table_key"]


def _default_study_name(s, budget: float) -> str:
    """A study's name where ``--study-name`` gives none: its reward, sampler and budget."""
    return f"search-{s.reward}-{s.sampler}-{budget:g}ms{'-mo' if s.multi_objective else ''}"


def _run_identity(rd: RunDir) -> dict:
    """What a study's trials were scored with: the run's gallery, supernet and split (their
    recorded fingerprints; None where one is missing)."""
    from hwnas.utils import read_json

    def fp(path: Path):
        try:
            return read_json(path).get("fingerprint") if path.is_file() else None
        except (HwnasError, AttributeError):
            return None

    return {"gallery": fp(rd.path / "gallery" / "config.json"),
            "supernet": fp(rd.path / "supernet" / "config.json"), "splits": fp(rd.path / "splits.json")}


# a study's records of what its trials were scored with, compared only where it has them
# (studies began before they were recorded)
SCORED_WITH = ("run", "val_queries", "bn_batches")

# how far a study's budget may lie from a joining worker's own measurement of the same
# speed-up (two measurements of one paragon differ by a few percent, two paragons by more)
TWIN_BUDGET_TOL = 0.2


def _speedup_twin(storage, s, meta: dict) -> str | None:
    """The oldest study of ``storage`` under a default name that a worker of ``meta``'s
    settings, speed-up and run (the same gallery, supernet and split) started, at a budget
    within ``TWIN_BUDGET_TOL`` of this worker's; None if none. (Two workers that start at the
    same moment on a storage with no such study yet each start one: give --study-name.)"""
    for study in sorted(storage.get_all_studies()):  # (not the summaries: those read every trial)
        old = study.user_attrs.get("hwnas") or {}
        b = old.get("budget_ms")
        # (every setting the same, the speed-up and the run's fingerprints among them)
        if (_same_table(old, meta)
                and all(old.get(k) == v for k, v in meta.items() if k not in ("budget_ms", "table", "table_key"))
                and isinstance(b, (int, float)) and abs(b - meta["budget_ms"]) <= TWIN_BUDGET_TOL * meta["budget_ms"]
                and study.study_name == _default_study_name(s, b)):
            return study.study_name
    return None


# seconds a worker that finds a study it did not make waits for its maker to record the
# study's settings (done right after making it; a maker killed in between never does)
STAMP_WAIT_S = 10.0


def _open_study(name: str, storage, sampler, directions):
    """The study ``name`` and its recorded settings (None: this worker made it, or its maker
    never recorded them). Exactly one of the workers that start at one moment makes the
    study, and the others wait for what it records, so a study never takes the settings of
    two workers (under search.budget_speedup each worker measures its own budget)."""
    import optuna

    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                   directions=directions), None
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    end = time.monotonic() + STAMP_WAIT_S
    while (old := study.user_attrs.get("hwnas")) is None and time.monotonic() < end:
        time.sleep(0.2)
    return study, old


def run_search(cfg: Config, *, log: Callable = print, evaluator=None, seed: int | None = None,
               out: Path | None = None, enqueue: list[str] = (),
               adopt_budget: Callable[[float], None] | None = None) -> dict:
    """Search (or resume searching) the study of ``cfg.search``, the archs in ``enqueue`` (known
    ones, e.g. from a paper or an earlier search) evaluated first; write ``best_arch.json``,
    ``trials.csv`` and the plots into ``out`` (default: the run directory, where
    ``train-query --from-search`` and the report read them; a benchmark's side searches
    write elsewhere, so the run's own choice stays).

    ``adopt_budget``: the budget was resolved from ``search.budget_speedup`` (a measurement of
    the paragon, a little different on each worker), so a worker joining a study that another
    started at the same speed-up takes the study's budget (``cfg.search.budget_ms`` is set to
    it) and calls ``adopt_budget(budget_ms)`` to record it; otherwise another budget is an error."""
    import optuna

    s = cfg.search
    s.check()
    rd = RunDir(cfg)
    space = cfg.search_space()
    predictor, tpath = predictor_for(cfg, space)
    lo, hi = predictor.range()
    budget = s.budget_ms
    if budget is None:  # (the CLI resolves the config's budget rules before it calls this)
        raise HwnasError(f"give a latency budget: search.budget_ms (feasible range on this table: "
                         f"{lo:.3f} to {hi:.3f} ms), or resolve the config's with hwnas.pipeline.run_budget")
    check_budget(budget, predictor, tpath)
    # what the trials need (supernet, gallery, validation split, the archs to enqueue) is
    # checked before the study's storage is made, so a search that cannot run leaves no study
    user, user_ms = [], []
    for a in enqueue:
        try:
            arch = space.parse(a)
        except HwnasError as e:
            raise HwnasError(f"--enqueue {a!r}: {e}") from None
        user.append(space.params_of(arch))
        user_ms.append(predictor(arch))

    def check_enqueued(b: float, whose: str = "the") -> None:
        for a, ms in zip(enqueue, user_ms):
            if ms > b:  # (it would be recorded as over budget, never scored)
                raise HwnasError(f"--enqueue {a!r} is predicted at {ms:.4f} ms, over {whose} budget {b} ms: "
                                 "the search would never evaluate it; give an arch within budget")

    check_enqueued(budget)
    storage = None
    if s.storage is not None and evaluator is None and (rd.path / "supernet" / "config.json").is_file():
        # a storage of the user's (a server, a shared disk) is opened before the supernet, the
        # gallery and the validation images load, so a bad URL or a server down fails at once
        # (an empty database or journal may then stay if the search cannot run; no study does);
        # with no supernet, that error comes first and no storage is made
        storage, url = make_storage(s.storage, rd)
    evaluator = evaluator or SupernetEvaluator(cfg, log=log)
    if storage is None:
        storage, url = make_storage(s.storage, rd)
    meta = {"budget_ms": budget, "reward": s.reward, "alpha": s.alpha, "metric": s.metric,
            "space_hash": space.hash, "table": str(tpath), "table_key": _table_key(tpath),
            "multi_objective": s.multi_objective,
            # where the budget came from: a speed-up over the paragon, measured (else None)
            "budget_speedup": s.budget_speedup if adopt_budget is not None else None,
            # what the trials are scored with: the run's gallery, supernet and split (a worker
            # joins a study it does not name only if it is the same run's) and the scoring's
            # own settings; a study that predates one of these is not held to it
            "run": _run_identity(rd), "val_queries": s.val_queries, "bn_batches": s.bn_batches}
    name = s.study_name or _default_study_name(s, budget)
    if s.study_name is None and adopt_budget is not None:
        # the default name holds the budget, which each worker measures a little differently:
        # a worker joins the storage's study of the same settings and speed-up by its name
        twin = _speedup_twin(storage, s, meta)
        if twin is not None and twin != name:
            log(f"[search] joining study {twin!r}, started in this storage at the same settings and "
                f"{s.budget_speedup:g}x speed-up (--study-name NAME keeps a worker to a study of its own)")
            name = twin
    directions = ["maximize", "minimize"] if s.multi_objective else ["maximize"]
    seed = cfg.seed if seed is None and s.storage is None else seed
    sampler = make_sampler(s.sampler, space, cfg, seed, s.multi_objective, predictor, budget)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, old = _open_study(name, storage, sampler, directions)
    if old is not None and old != meta:
        changed = {k: (old.get(k), v) for k, v in meta.items()
                   if old.get(k) != v and k not in ("table", "table_key", "budget_speedup")
                   and (k in old or k not in SCORED_WITH)
                   and not (k == "alpha" and s.reward in ("r1", "r2"))}  # (alpha mixes r3 alone)
        if not _same_table(old, meta):  # (by what it predicts: the same path may hold another)
            changed["table"] = (f"{old.get('table')} (predictions {old.get('table_key') or 'unrecorded'})",
                                f"{tpath} (predictions {meta['table_key']})")
        if (list(changed) == ["budget_ms"] and adopt_budget is not None
                and old.get("budget_speedup") == meta["budget_speedup"] is not None):
            check_budget(old["budget_ms"], predictor, tpath)
            log(f"[search] study {name!r} searches at {old['budget_ms']} ms, {s.budget_speedup:g}x faster "
                f"than the paragon as the worker that started it measured it; this worker takes that "
                f"budget (its own measurement: {budget} ms)")
            check_enqueued(old["budget_ms"], f"study {name!r}'s")  # (before the run records it)
            budget = s.budget_ms = old["budget_ms"]
            study.sampler = make_sampler(s.sampler, space, cfg, seed, s.multi_objective, predictor, budget)
            adopt_budget(budget)
        elif changed:
            fix = (f"pass --budget-ms {old['budget_ms']} to join it, or use another --study-name"
                   if list(changed) == ["budget_ms"] else
                   "its trials were scored with another gallery, supernet or split (trained again since?): "
                   "use another --study-name, or delete the study to search afresh"
                   if "run" in changed else
                   "use another --study-name (or the original settings to resume it)")
            raise HwnasError(f"study {name!r} in {url} was started with other settings "
                             f"{ {k: {'study': a, 'here': b} for k, (a, b) in changed.items()} }; {fix}")
    if old is not None and user:  # resumed: an arch already in the study is not queued again
        # (evaluated, or queued and not yet run: a queued trial keeps its params as fixed_params;
        # a running or failed one may never finish, so its arch is queued again)
        have = _held_archs(study.get_trials(deepcopy=False), space)
        again = [p for p in user if space.canonical(_arch_of_params(space, p)) in have]
        if again:
            log(f"[search] {len(again)} of the --enqueue archs are in the study already: not queued again")
        user = [p for p in user if p not in again]
    for params in user:  # the caller's known archs first
        study.enqueue_trial(params, user_attrs={"baseline": "user"})
    worker = f"{socket.gethostname()}:{os.getpid()}"
    lost = 0
    if old is not None and _n_feasible(study, space) < s.n_trials:  # (a finished study is not reopened)
        lost = _requeue_lost(study, space, log, local=s.storage is None)
    # archs the caller queues, and those a killed worker left, are evaluated, in a study that
    # has its n_trials already too (with those queued before them: trials run in the order
    # queued, so a lost arch queued again behind the start-up archs runs after them)
    waiting = (len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
               if user or lost else 0)
    target = max(s.n_trials, _n_feasible(study, space) + waiting)
    if old is None:
        study.set_user_attr("hwnas", meta)
        _enqueue_baselines(study, space, predictor, budget, s.sampler, seed)
    done = _n_feasible(study, space)
    if done:
        log(f"[search] resuming study {name!r}: {done} evaluated trials already done")
    state = {"infeasible_run": 0, "repeat_run": 0}
    # each arch is evaluated once: a sampler that proposes it again (evolution did, for 3 to 7
    # of the 30 trials of each headline run's study) gets the first evaluation's result back
    # at no cost, and only distinct archs count towards n_trials. In a study that other
    # workers share, an arch this worker has not seen is looked up in the storage before it
    # is evaluated (optuna keeps finished trials in memory, so the look-up costs milliseconds);
    # two workers that start the same arch at the same moment still both evaluate it.
    known: dict = {}

    def learn(study) -> None:
        for t in _evaluated(study):
            known.setdefault(_network(space, t.user_attrs["arch"]), t)

    learn(study)
    # a sampler that proposes nothing new this many times running has converged (each repeat
    # costs a few storage writes, so this stays well below max_infeasible's thousands)
    max_repeats = max(100, 2 * s.n_trials)

    def objective(trial):
        trial.set_user_attr("worker_process", worker_record(trial.number))  # first: a resume tells
        trial.set_user_attr("worker", worker)  # a killed worker's trial by it
        # one string per network: a scale that rounds to another's width names the same one
        arch = space.canonical(space.suggest(trial))
        key = arch.to_string(space)
        lat = predictor(arch)
        trial.set_user_attr("arch", key)
        trial.set_user_attr("predicted_ms", lat)
        trial.set_user_attr("mflops", arch_flops(space, arch) / 1e6)
        trial.set_user_attr("sampler", s.sampler)
        trial.set_constraint("latency_ms", lat - budget)
        if lat > budget:
            trial.set_user_attr("feasible", False)
            state["infeasible_run"] += 1
            if state["infeasible_run"] >= s.max_infeasible:
                trial.study.stop()
            return (0.0, lat) if s.multi_objective else 0.0
        state["infeasible_run"] = 0
        if key not in known:  # another worker's evaluation of it since the last look
            learn(trial.study)
        first = known.get(key)
        if first is not None:
            for k in ("feasible", "M(q,q)", "M(q,g)", "n_val_queries", "reward"):
                trial.set_user_attr(k, first.user_attrs.get(k))
            trial.set_user_attr("repeat_of", first.number)
            state["repeat_run"] += 1
            if state["repeat_run"] >= max_repeats:
                trial.study.set_user_attr("converged", True)
                trial.study.stop()
            r = first.user_attrs["reward"]
            return (r, lat) if s.multi_objective else r
        state["repeat_run"] = 0
        res = evaluator(arch)
        qq, qg, r = res["M(q,q)"][s.metric], res["M(q,g)"][s.metric], search_reward(res, s)
        trial.set_user_attr("feasible", True)
        for k in ("M(q,q)", "M(q,g)"):
            trial.set_user_attr(k, {m: res[k][m] for m in dict.fromkeys(("recall@1", "recall@5", "mAP", s.metric))})
        trial.set_user_attr("eval_seconds", res["seconds"])
        # the queries the accuracies average over (those with a positive): the reward's precision
        n = res["M(q,g)"].get("n_queries")
        trial.set_user_attr("n_val_queries", None if n is None else n - res["M(q,g)"].get("n_queries_without_positive", 0))
        trial.set_user_attr("reward", r)
        log(f"[search] trial {trial.number}: {lat:.3f} ms, M(q,q) {qq:.4f}, M(q,g) {qg:.4f}, "
            f"reward {r:.4f} ({res['seconds']:.1f} s)")
        known[key] = trial
        return (r, lat) if s.multi_objective else r

    def stop_when_done(study, trial):
        # Counting needs every trial from the storage: do it only after an evaluated trial,
        # so that the cheap over-budget trials and repeats stay cheap as a study grows.
        if (trial.user_attrs.get("feasible") and "repeat_of" not in trial.user_attrs
                and _n_feasible(study, space) >= target):
            study.stop()

    if _n_feasible(study, space) < target:
        import logging

        quiet = _QuietStop()  # Ctrl-C or an hwnas error mid-trial: said once, by hwnas, not with
        trial_log = logging.getLogger("optuna.study._optimize")  # Optuna's traceback before it
        trial_log.addFilter(quiet)
        try:
            study.optimize(objective, callbacks=[stop_when_done], gc_after_trial=False)
        finally:
            trial_log.removeFilter(quiet)
    if state["infeasible_run"] >= s.max_infeasible:  # this run gave up
        if _n_feasible(study, space) == 0:
            raise HwnasError(f"the {s.sampler} sampler found no arch within {budget} ms in "
                             f"{s.max_infeasible} consecutive tries; raise the budget (range "
                             f"{lo:.3f} to {hi:.3f} ms) or try another sampler")
        log(f"[search] the {s.sampler} sampler proposed {s.max_infeasible} over-budget archs in a row "
            f"(search.max_infeasible): stopped at {_n_feasible(study, space)} distinct archs of "
            f"search.n_trials {s.n_trials}; a higher budget, another sampler (evolution stays "
            "within the budget), or run again to go on")
    if state["repeat_run"] >= max_repeats:
        log(f"[search] the {s.sampler} sampler proposed only archs it had evaluated in "
            f"{max_repeats} consecutive tries: stopped at {_n_feasible(study, space)} distinct archs "
            f"of search.n_trials {s.n_trials}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    return write_outputs(study, rd.path if out is None else out, space, budget, s, url, log=log,
                         n_val_queries=getattr(evaluator, "n_queries", None))


def _evaluated(study) -> list:
    """The study's trials that evaluated an arch within the budget, each arch's first (a
    repeat of an evaluated arch takes its result: ``repeat_of``)."""
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("feasible") and "repeat_of" not in t.user_attrs]


@functools.lru_cache(maxsize=4096)  # called for every evaluated trial after each one
def _network(space, arch: str) -> str:
    """The canonical string of ``arch`` (``SearchSpace.canonical``): one per network. The
    search records canonical strings, but a study begun before it did may spell one network
    under two channel scales that round to one width; keyed by this, the two are one."""
    return space.network(arch).to_string(space)


def _arch_of_params(space, params: dict) -> Arch | None:
    """The arch of a trial's Optuna parameters (``SearchSpace.suggest``'s names); None for a
    trial stopped before it had them all."""
    try:
        return Arch(tuple((params[f"L{layer.index:02d}_op"], params.get(f"L{layer.index:02d}_scale"))
                          for layer in space.layers()))
    except KeyError:
        return None


# A trial's worker records itself in the trial's first write; before it, the sampler may
# still be working (TPE's relative sampling, in a large study: well under a second). In the
# run directory's own study (no other machine's workers, one clock), a trial with no worker
# this long after its start is taken as one whose worker was killed.
UNCLAIMED_TRIAL_S = 10.0


@functools.lru_cache(maxsize=1)
def _boot_and_pid_namespace() -> str | None:
    try:
        return (Path("/proc/sys/kernel/random/boot_id").read_text().strip()
                + f"/{os.stat('/proc/self/ns/pid').st_ino}")
    except OSError:
        return None


def _process_identity(pid: int) -> str | None:
    """Process ``pid`` of this machine, told apart from a later process of the same pid, from
    another container's (same host name, its own pids) and from another boot's: the boot id,
    the pid namespace, the pid and the process's start time (Linux's /proc); None where
    these cannot be read (no such process, or no /proc)."""
    where = _boot_and_pid_namespace()
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22
    except (OSError, IndexError):
        return None
    return None if where is None else f"{where}/{pid}/{start}"


def worker_record(number: int) -> str:
    """What a trial records of the worker that runs it (``worker_process``): this machine,
    this process and the trial's number (a retry copies its original's attributes: the
    number tells the copy from the retry's own record)."""
    return f"{socket.gethostname()}|{os.getpid()}|{_process_identity(os.getpid()) or ''}#{number}"


def _worker_gone(t, local: bool) -> bool:
    """Whether the worker of RUNNING trial ``t`` is known to have ended: it ran on this
    machine (in this boot and pid namespace, where Linux tells them) and its process is gone.
    A worker elsewhere, or one that cannot be told, is not known to have ended. A trial that
    names no worker of its own (killed before its first write) counts as ended only in the
    run directory's own study (``local``) and once :data:`UNCLAIMED_TRIAL_S` old: a live worker
    of a shared storage, between its trial's start and its first write, must not be failed
    under it (its next write would raise), and other machines' clocks may differ."""
    rec = t.user_attrs.get("worker_process")
    if not isinstance(rec, str) or not rec.endswith(f"#{t.number}"):
        import datetime

        return (local and t.datetime_start is not None
                and (datetime.datetime.now() - t.datetime_start).total_seconds() > UNCLAIMED_TRIAL_S)
    host, pid, ident = (rec.rsplit("#", 1)[0].split("|") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if ident:  # the same boot and namespace, and that pid now no process or a later one
        here = _boot_and_pid_namespace()
        return here is not None and ident.rsplit("/", 2)[0] == here and _process_identity(int(pid)) != ident
    try:  # (no /proc: the pid alone)
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def _held_archs(trials, space) -> set:
    """The canonical archs that ``trials`` have evaluated or hold queued (a queued trial keeps
    its params as fixed_params until it runs)."""
    import optuna

    ts = optuna.trial.TrialState
    archs = (_arch_of_params(space, t.params or t.system_attrs.get("fixed_params", {}))
             for t in trials if t.state in (ts.COMPLETE, ts.WAITING))
    return {space.canonical(a) for a in archs if a is not None}


def _requeue_lost(study, space, log=print, local: bool = True) -> int:
    """Queue again the archs that a killed or interrupted worker was evaluating, so that a
    resumed search evaluates them as an uninterrupted one would have. Such a trial is FAIL
    (Ctrl-C, an error) or RUNNING with its worker gone (:func:`_worker_gone`; on an RDB
    storage, one whose worker cannot be told is failed and retried by the heartbeat after
    its grace period; on a journal, it stays RUNNING). The RUNNING ones are marked FAIL, so
    that no trial stays RUNNING for good. Each arch is queued again once: not if a trial has
    evaluated it, it waits in the queue, the lost trial was itself a retry or has had one (an
    arch that kills its worker every time would otherwise stop every resume), nor where the
    trial stopped before its sampler had proposed a whole arch (the sampler proposes anew).
    Returns how many were queued."""
    import optuna

    ts = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)  # (one read: the tells below change no other trial)
    lost = []
    for t in trials:
        if t.state == ts.RUNNING:
            if not _worker_gone(t, local):
                continue
            try:
                study.tell(t.number, state=ts.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # failed meanwhile (another resume, the heartbeat): failed either way
        elif t.state != ts.FAIL:
            continue
        lost.append(t)
    if not lost:
        return 0
    have = _held_archs(trials, space)
    retried = {n for t in trials for n in (t.user_attrs.get("retry_of"), t.system_attrs.get("failed_trial"))
               if isinstance(n, int)}
    queued, twice = [], {}  # (twice: by arch, its latest trial)
    for t in sorted(lost, key=lambda t: t.number):
        params = t.system_attrs.get("fixed_params") or t.params
        a = _arch_of_params(space, params)
        try:  # a whole arch: every layer's op, and its scale where it has one
            whole = a is not None and set(space.params_of(a)) <= set(params)
        except Exception:
            whole = False
        if not whole or space.canonical(a) in have:
            continue
        if t.number in retried or "retry_of" in t.user_attrs or "failed_trial" in t.system_attrs:
            twice[space.canonical(a)] = t.number
            continue
        have.add(space.canonical(a))
        attrs = {"retry_of": t.number}
        if "baseline" in t.user_attrs:
            attrs["baseline"] = t.user_attrs["baseline"]
        study.enqueue_trial(dict(params), user_attrs=attrs)  # (as first proposed: the same network)
        queued.append(t.number)
    if queued:
        log(f"[search] trial{'s' if len(queued) > 1 else ''} {', '.join(map(str, queued))} "
            f"stopped before {'their' if len(queued) > 1 else 'its'} arch was evaluated (a kill or "
            "Ctrl-C): queued again")
    if twice:
        nums = sorted(twice.values())
        log(f"[search] the arch{'s' if len(nums) > 1 else ''} of trial{'s' if len(nums) > 1 else ''} "
            f"{', '.join(map(str, nums))} stopped {'their' if len(nums) > 1 else 'its'} evaluation twice "
            "(queued again once already): left out")
    return len(queued)


def _distinct_archs(trials, space) -> int:
    """How many distinct networks ``trials`` evaluated (a repeat names its first's arch)."""
    return len({_network(space, t.user_attrs["arch"]) for t in trials})


def _n_feasible(study, space) -> int:
    """Distinct networks evaluated within the budget (what search.n_trials counts)."""
    return _distinct_archs(_evaluated(study), space)


def _enqueue_baselines(study, space, predictor, budget, sampler: str = "tpe", seed: int | None = None,
                       startup: int = 10) -> None:
    """Known archs go first: the fastest subnet, and the largest uniform arch within budget.
    For TPE and NSGA-II at a tight budget (under a fifth of uniform archs fit), also
    ``startup`` random feasible archs: their own start-up trials are uniform archs, nearly
    all over budget there, and a model fitted on over-budget trials alone keeps proposing
    them."""
    import random

    fastest = predictor.extreme_arch(True)
    # skip_if_exists: workers that start a new study together each queue these; the second
    # finds the first's (a narrow race remains, and a repeat then takes the first's result)
    study.enqueue_trial(space.params_of(fastest), user_attrs={"baseline": "fastest"}, skip_if_exists=True)
    best_uniform = None
    for op in space.ops:
        for sc in space.channel_scales:
            a = Arch(tuple((op, sc) for _ in space.layers()))
            lat = predictor(a)
            if lat <= budget and (best_uniform is None or lat > best_uniform[0]):
                best_uniform = (lat, a)
    if best_uniform is not None:
        study.enqueue_trial(space.params_of(best_uniform[1]), user_attrs={"baseline": "uniform"},
                            skip_if_exists=True)
    if sampler in ("tpe", "nsga2"):
        rng = random.Random(seed)
        if sum(predictor(space.sample(rng)) <= budget for _ in range(500)) < 100:
            for _ in range(startup):
                study.enqueue_trial(space.params_of(predictor.sample_feasible(budget, rng)),
                                    user_attrs={"baseline": "random-feasible start-up"})


# ---------------------------------------------------------------------- outputs
def choose(feas: list, s, n_val_queries: int | None = None) -> tuple:
    """(the chosen trial, the best reward's trial, the reward band) among evaluated trials:
    of those whose reward is within ``s.prefer_faster_within`` of the best, the fastest
    (predicted; ``s.pick_in_band`` "fastest") or the one with the most FLOPs ("most-flops") —
    "se": a conservative one-standard-error band, sqrt(r (1 - r) / n) for the best reward r
    on its n validation queries (binomial: exact for one recall@k; the r3 mix of two
    correlated accuracies, and mAP, vary less, and two archs scored on the same queries
    differ by less still); 0: the best itself. Ties go to the higher reward, then the
    earlier trial. ``n_val_queries``: the count where the best trial records none (a study
    from an older hwnas resumed by this one's evaluator); with neither, the best reward's arch."""
    best = max(feas, key=lambda t: (t.user_attrs["reward"], -t.number))
    r = best.user_attrs["reward"]
    band = s.prefer_faster_within
    if band == "se":
        n = best.user_attrs.get("n_val_queries") or n_val_queries
        band = math.sqrt(max(r * (1 - r), 0.0) / n) if n else 0.0
    near = [t for t in feas if t.user_attrs["reward"] >= r - band - 1e-12]
    if getattr(s, "pick_in_band", "fastest") == "most-flops":
        chosen = min(near, key=lambda t: (-t.user_attrs["mflops"], -t.user_attrs["reward"], t.number))
    else:
        chosen = min(near, key=lambda t: (t.user_attrs["predicted_ms"], -t.user_attrs["reward"], t.number))
    return chosen, best, band


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower latency and higher reward are better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def write_outputs(study, out: Path, space, budget: float, s, url: str, log=print,
                  n_val_queries: int | None = None) -> dict:
    import optuna

    trials = study.get_trials(deepcopy=False)
    rows = []
    for t in trials:
        ua = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name, "feasible": ua.get("feasible"),
            "arch": ua.get("arch"), "predicted_ms": ua.get("predicted_ms"), "mflops": ua.get("mflops"),
            "M(q,q)": (ua.get("M(q,q)") or {}).get(s.metric), "M(q,g)": (ua.get("M(q,g)") or {}).get(s.metric),
            "reward": ua.get("reward"), "repeat_of": ua.get("repeat_of", ""), "baseline": ua.get("baseline", ""),
            "sampler": ua.get("sampler"), "worker": ua.get("worker"), "eval_seconds": ua.get("eval_seconds"),
            "duration_s": t.duration.total_seconds() if t.duration else None,
        })
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["number"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())
    feas = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("feasible")]
    if not feas:
        raise HwnasError("the study has no evaluated arch within the budget yet")
    best, top, band = choose(feas, s, n_val_queries)
    pts = [(t.user_attrs["predicted_ms"], t.user_attrs["reward"]) for t in feas]
    front = [feas[i] for i in pareto_front(pts)]
    ua = best.user_attrs
    # the canonical strings: a study begun before the search recorded them may hold another
    # spelling of the network (``_network``)
    result = {
        "arch": _network(space, ua["arch"]), "predicted_ms": ua["predicted_ms"], "mflops": ua["mflops"],
        "M(q,q)": ua["M(q,q)"], "M(q,g)": ua["M(q,g)"], "reward": ua["reward"],
        "reward_kind": s.reward, "alpha": s.alpha, "metric": s.metric, "budget_ms": budget,
        "trial": best.number, "study": study.study_name, "storage": url, "sampler": s.sampler,
        "n_evaluated": _distinct_archs(feas, space), "n_trials": len(trials),
        # how it was chosen: the fastest (or the most FLOPs: search.pick_in_band) within `band`
        # of the best reward (search.prefer_faster_within)
        "chosen_within": {"setting": s.prefer_faster_within, "band": band, "pick": s.pick_in_band,
                          "n_val_queries": top.user_attrs.get("n_val_queries"),
                          "best_reward": top.user_attrs["reward"],
                          "best_reward_arch": _network(space, top.user_attrs["arch"]),
                          "best_reward_predicted_ms": top.user_attrs["predicted_ms"],
                          "best_reward_trial": top.number},
        "pareto_front": [{"arch": _network(space, t.user_attrs["arch"]), "predicted_ms": t.user_attrs["predicted_ms"],
                          "reward": t.user_attrs["reward"]} for t in front],
    }
    write_json(out / "best_arch.json", result)
    plot_search(feas, front, best, budget, out / "search_reward_vs_latency.png", s, top=top)
    # one line per sampler that proposed trials (workers of a shared study may run different ones);
    # a queued baseline counts with the sampler of the worker that ran it
    curves: dict[str, list] = {}
    for t in sorted(feas, key=lambda t: t.number):
        if "repeat_of" not in t.user_attrs:
            curves.setdefault(t.user_attrs.get("sampler") or s.sampler, []).append(t.user_attrs["reward"])
    plot_progress(curves, out / "search_best_so_far.png")
    why = ("" if top is best else
           f" — the {'fastest' if s.pick_in_band == 'fastest' else 'one with the most FLOPs'} within "
           f"{band:.4f} of the best reward ({top.user_attrs['reward']:.4f} at "
           f"{top.user_attrs['predicted_ms']:.3f} ms; search.prefer_faster_within, search.pick_in_band)")
    if s.prefer_faster_within == "se" and not (top.user_attrs.get("n_val_queries") or n_val_queries):
        log("[search] the best trial records no validation query count (a study from an older hwnas), "
            "so the choice is the best reward's arch; --prefer-faster-within DIFF sets a band")
    log(f"[search] chosen of {result['n_evaluated']} evaluated archs ({len(trials)} trials): reward "
        f"{ua['reward']:.4f} at {ua['predicted_ms']:.3f} ms predicted, {ua['mflops']:.2f} MFLOPs{why}\n"
        f"         {result['arch']}\n         outputs: {out}/best_arch.json, trials.csv, search_*.png")
    return result


def plot_search(feas, front, best, budget, path: Path, s, top=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    x = [t.user_attrs["predicted_ms"] for t in feas]
    y = [t.user_attrs["reward"] for t in feas]
    ax.scatter(x, y, s=14, c="tab:blue", alpha=0.6, label="evaluated archs")
    fx = [t.user_attrs["predicted_ms"] for t in front]
    fy = [t.user_attrs["reward"] for t in front]
    ax.step(fx, fy, where="post", c="tab:red", lw=1.5, label="Pareto front")
    for t in feas:
        if t.user_attrs.get("baseline"):
            ax.scatter([t.user_attrs["predicted_ms"]], [t.user_attrs["reward"]], marker="s", s=50,
                       facecolors="none", edgecolors="k")
            ax.annotate(t.user_attrs["baseline"], (t.user_attrs["predicted_ms"], t.user_attrs["reward"]),
                        fontsize=7, xytext=(4, -10), textcoords="offset points")
    if top is not None and top is not best:
        ax.scatter([top.user_attrs["predicted_ms"]], [top.user_attrs["reward"]], marker="*", s=120,
                   c="none", edgecolors="k", label="best reward", zorder=5)
    ax.scatter([best.user_attrs["predicted_ms"]], [best.user_attrs["reward"]], marker="*", s=160,
               c="gold", edgecolors="k", label="chosen" if top is not None and top is not best else "best",
               zorder=5)
    ax.axvline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g} ms")
    ax.set_xlabel("predicted edge latency (ms)")
    ax.set_ylabel(f"reward {s.reward.upper()} ({s.metric})")
    # below the axes: inside, it hid evaluated archs
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, frameon=False)
    save_figure(fig, path)


def plot_progress(curves: dict[str, list], path: Path, title: str = "") -> None:
    """Best-so-far reward against the number of evaluated trials, one line per sampler. A
    sampler's value is one run's rewards in order, or a list of runs (e.g. one per sampler
    seed): then the line is their mean best-so-far and a band their range, over the trial
    counts every run reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, vals in curves.items():
        runs = vals if vals and isinstance(vals[0], (list, tuple)) else [vals]
        n = min(len(r) for r in runs)
        if n == 0:
            continue
        best = np.array([np.maximum.accumulate(r[:n]) for r in runs])
        x = range(1, n + 1)
        (line,) = ax.plot(x, best.mean(0), label=name if len(runs) == 1 else f"{name} (mean of {len(runs)})")
        if len(runs) > 1:
            ax.fill_between(x, best.min(0), best.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("evaluated trials")
    ax.set_ylabel("best reward so far")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def top_archs(run_dir: Path, k: int, space=None) -> list[dict]:
    """The search's choice (``best_arch.json``), then its next best distinct feasible archs by
    reward, ``k`` in all (from
    ``trials.csv``): ``[{"arch", "reward", "predicted_ms", "mflops"}]``. With ``space``, two
    strings of one network (``SearchSpace.canonical``; a study from before the search wrote
    canonical strings can hold both) count as one arch, named by its canonical string."""
    best = load_best(run_dir)
    p = run_dir / "trials.csv"
    if not p.exists():
        raise HwnasError(f"{p} does not exist: run `hwnas search` again to write it")
    with open(p, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "COMPLETE" and r["feasible"] == "True" and r["reward"]]
    rows.sort(key=lambda r: -float(r["reward"]))
    out, seen = [], set()
    for r in [{"arch": best["arch"], "reward": best["reward"], "predicted_ms": best["predicted_ms"],
               "mflops": best["mflops"]}] + rows:
        key = r["arch"] if space is None else _network(space, r["arch"])
        if key not in seen and len(out) < k:
            seen.add(key)
            out.append({"arch": key, "reward": float(r["reward"]), "predicted_ms": float(r["predicted_ms"]),
                        "mflops": float(r["mflops"])})
    return out


def load_best(run_dir: Path) -> dict:
    p = run_dir / "best_arch.json"
    if not p.exists():
        raise HwnasError(f"{p} does not exist: run `hwnas search --budget-ms B` first")
    best = read_json(p, fix="run `hwnas search` again to write it (its study keeps the trials), or give "
                        "the arch with --arch")
    if not isinstance(best, dict) or not isinstance(best.get("arch"), str):
        raise HwnasError(f"{p} names no arch (an \"arch\" string); run `hwnas search` again to "
                         "write it, or give the arch with --arch")
    return best
