"""``hwnas run CONFIG``: the whole method, step by step, resumable.

profile -> train-gallery -> train-supernet -> search -> train-query -> adapt -> baselines
-> deploy -> report (adapt, the gallery adaptation, does work only where ``adapt.epochs`` >
0). Each step writes its results into the run directory and is recorded as done in
``steps.json``; a killed run continues with the first unfinished step (and inside a step,
training resumes from its last epoch and the search from its stored study).

Each finished step is recorded with a key: a hash of the config sections it reads and of
the keys of the steps it builds on (``STEP_INPUTS``). Edit the config and run again, and
exactly the steps whose inputs changed, and those downstream of them, are done again
(``hwnas run CONFIG --from STEP`` forces it); the others are kept.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable

from hwnas.config import Config
from hwnas.errors import HwnasError
from hwnas.rundir import RunDir
from hwnas.utils import content_hash, read_json, write_json

STEPS = ["data", "profile", "train-gallery", "train-supernet", "search", "train-query",
         "adapt", "baselines", "deploy", "report"]
# step -> (config sections it reads, steps it builds on)
STEP_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": (("seed", "data"), ()),
    "profile": (("space", "latency"), ()),
    "train-gallery": (("space", "gallery"), ("data",)),
    "train-supernet": (("space", "supernet", "unlabeled"), ("train-gallery",)),
    "search": (("search",), ("train-supernet", "profile")),
    "train-query": (("query", "finalists", "unlabeled"), ("search",)),
    "adapt": (("adapt", "unlabeled"), ("train-query",)),
    # with finalists on, the random feasible baseline avoids every finalist (report.py)
    "baselines": (("query", "finalists", "unlabeled"), ("search",)),
    "deploy": (("deploy",), ("train-query", "adapt")),
    "report": ((), ("train-query", "adapt", "baselines")),
}
ADAPTED = "searched-adapted"  # the searched query model after gallery adaptation


# what a step keeps when it finds it finished, so a step done again removes it first (the
# search: its default SQLite storage, whose trials scored the old supernet, and the resolved
# budget); train-query and baselines keep a model only if trained with the same settings,
# and report is rewritten. The bundle is not removed but replaced by the deploy done again
# (``BUNDLE_STALE``): it serves until the new one is complete, and the images hwnas-edge add
# put in it go into the new one
# the run's copy of the latency table it profiled (see keep_table)
RUN_TABLE = "latency_table.json"
# steps.json's mark of a bundle that the deploy step, done again, is to replace
BUNDLE_STALE = "bundle_stale"
REDO_OUTPUTS = {"data": ["splits.json", "cache", "decoded"], "profile": [RUN_TABLE],
                "train-gallery": ["gallery", "cache"], "train-supernet": ["supernet"],
                "search": ["search.db", "budget.json", "best_arch.json", "trials.csv"]}
# the steps that predict latencies on the table: the search's budget and choice, the random
# feasible baseline, the bundle's and the report's predicted times
TABLE_READERS = ("search", "baselines", "deploy", "report")


def _table_places(cfg: Config) -> tuple[Path, Path]:
    """The run's latency table in its shared place and the run's own copy of it."""
    from hwnas.search.runner import table_path

    return table_path(cfg, cfg.search_space()), RunDir(cfg).path / RUN_TABLE


def keep_table(cfg: Config, steps: "Steps", log: Callable = print) -> None:
    """After the profile step: the run keeps a copy of its latency table (``RUN_TABLE``).

    The table lies outside the run directory (``latency_tables/``, or ``latency.table``),
    where runs share it, ``hwnas profile`` may rebuild or recalibrate it and a clean-up may
    delete it; yet the search's budget and choice and the report's predictions are this
    table's. A table gone from its place is put back from the copy. One that predicts
    otherwise since is taken while nothing has predicted on the run's (the search not begun),
    and refused while a step that reads it remains, naming both ways on: one run's
    predictions all come from one table."""
    from hwnas.latency.table import LatencyTable
    from hwnas.utils import atomic_write_bytes

    shared, copy = _table_places(cfg)
    began = steps.done("search") or (copy.parent / "budget.json").exists()  # (a search killed midway too)
    if not copy.exists():
        if shared.exists():  # just profiled (or a run of an hwnas that kept no copy: the table it uses)
            _warn_if_budget_elsewhere(cfg, shared, log)
            atomic_write_bytes(copy, shared.read_bytes())
        return
    if not shared.exists():
        atomic_write_bytes(shared, copy.read_bytes())
        log(f"[run] {shared} is missing (deleted, or the run resumed from another working "
            f"directory): put back from the run's copy, {copy}")
        return
    now = LatencyTable.load(shared)
    if now.prediction_key() == LatencyTable.load(copy).prediction_key():
        return
    if not began:
        if not now.header.get("complete"):  # being timed again, or such a profile was killed
            raise HwnasError(
                f"{shared} is part-measured (hwnas profile is timing it, or was killed doing so); the "
                f"run kept its own table, {copy}. Let that profile finish (or finish it: hwnas profile "
                f"--config CONFIG --out {shared}), or go on with the run's table: cp {copy} {shared}")
        atomic_write_bytes(copy, shared.read_bytes())
        log(f"[run] {shared} predicts otherwise than when this run profiled; nothing has predicted "
            "on it yet, so the run takes the new one")
        return
    left = [n for n in TABLE_READERS if not steps.done(n)]
    if left:
        raise HwnasError(
            f"{shared} is not the latency table this run searched with: its timings or calibration "
            "changed since (hwnas profile --remeasure or --validate, or another run timed it again "
            f"after it was deleted), and {', '.join(left)} would predict on it; the run kept its "
            f"own, {copy}. To go on with the run's table: cp {copy} {shared}; to search again on "
            "the new one: hwnas run CONFIG --from profile")


def check_table_left(cfg: Config, steps: "Steps", redo: list[str]) -> None:
    """Before a run forgets anything: where the profile step is kept and a step that predicts
    on its table is to run, the table must be somewhere (its place, or the run's copy, from
    which :func:`keep_table` puts it back). Otherwise the error names the ways on, and the
    outputs ``--from``/a config change would remove (the search's study, its choice) stay."""
    if not steps.done("profile") or "profile" in redo:
        return
    if not any(n in redo or not steps.done(n) for n in TABLE_READERS):
        return
    shared, copy = _table_places(cfg)
    if shared.exists() or copy.exists():
        return
    raise HwnasError(f"the latency table this run profiled is gone: neither {shared} nor the run's copy "
                     f"({copy}; older hwnas versions kept none) exists, and the steps to do "
                     "predict on it. Profile again and search on the new table: hwnas run CONFIG --from "
                     "profile; or give the table the run used: --set latency.table=PATH. Nothing was removed")


def _warn_if_budget_elsewhere(cfg: Config, shared: Path, log: Callable) -> None:
    """A run of an hwnas that kept no copy adopts the present table: if the search's budget
    was resolved on a table of another range, say so (that table is gone)."""
    from hwnas.search.runner import predictor_for

    path = RunDir(cfg).path / "budget.json"
    if not path.exists():
        return
    was = read_json(path).get("key", {}).get("range_ms")
    try:
        now = _range_key(predictor_for(cfg, cfg.search_space())[0])
    except HwnasError:
        return  # (the step that reads it says what is wrong with it)
    if was is not None and was != now:
        log(f"[run] WARNING: {shared} is not the table this run's search used (its latency range "
            f"{was[0]:.4f}-{was[1]:.4f} ms, now {now[0]:.4f}-{now[1]:.4f}); that one is gone, so "
            "the run's predicted times now come from this one (hwnas run --from profile to search "
            "again on it)")


def lost_steps(cfg: Config, done: Callable[[str], bool]) -> list[str]:
    """The steps marked done whose products are gone (deleted, or moved away by hand): the
    record alone is not trusted, so they run again, with what builds on them, over what is
    still there (a deleted splits.json is split again the same way, a deleted best_arch.json
    rewritten from the stored study, a deleted model resumed from its checkpoint)."""
    root = RunDir(cfg).path
    products = {
        "data": ["splits.json"], "train-gallery": ["gallery/model.safetensors"],
        "train-supernet": ["supernet/model.safetensors"], "search": ["best_arch.json"],
        "train-query": ["query/searched/model.safetensors"],
        "adapt": [f"query/{ADAPTED}/model.safetensors"] if cfg.adapt.epochs else [],
        "deploy": ["bundle/manifest.json"], "report": ["report.json"],
    }
    # (not the profile's table: it lies outside the run directory, under the working
    # directory's latency_tables/, and a run started from elsewhere must not re-time the CPU;
    # keep_table puts it back from the run's copy)
    return [n for n in STEPS if done(n) and any(not (root / p).exists() for p in products.get(n, []))]


def redo_outputs(cfg: Config, names) -> list[Path]:
    """What steps done afresh lose first (a search study in a user's --storage is not ours)."""
    root = RunDir(cfg).path
    return [root / p for n in names for p in REDO_OUTPUTS.get(n, [])
            if not (n == "search" and p == "search.db" and cfg.search.storage)]


def forced_outputs(cfg: Config, names) -> list[Path]:
    """What ``--from`` loses besides :func:`redo_outputs`: the query models its steps train.
    On a config change these are kept where their own settings are unchanged (each model
    compares them), but ``--from`` asks for them anew."""
    from hwnas.report import BASELINES

    q = RunDir(cfg).path / "query"
    # (not the finalists' runs: deterministic, they would pick the same arch again; the chosen
    # one's training restarts from its finalist's checkpoint, as train-query --restart does)
    return [*([q / "searched"] if "train-query" in names else []),
            *([q / ADAPTED] if "adapt" in names else []),
            *([q / n for n in BASELINES] if "baselines" in names else [])]


def replaced_steps(cfg: Config, done: dict) -> dict[str, tuple[str, str]]:
    """Done steps whose model was replaced since they were recorded (``hwnas train-gallery
    --restart`` by hand, or a gallery copied in): ``{step: (recorded, present fingerprint)}``.
    What builds on it was made against the old model (the step keys see the config only)."""
    rec = done.get("train-gallery", {}).get("fingerprint")
    rd = RunDir(cfg)
    p = rd.path / "gallery" / "config.json"
    # (without the split, the data step makes it again first: train-gallery then compares the
    # gallery with the config itself, and the run compares its fingerprint once it has run)
    if rec and p.exists() and rd.splits_path.exists():
        present = read_json(p)
        now = present.get("fingerprint")
        if now and now != rec:
            from hwnas.compat.api import gallery_differs

            diff = gallery_differs(cfg, rd, present)
            if diff:  # before anything is deleted: the run would stop at train-gallery after it
                raise HwnasError(
                    f"{p.parent} holds another gallery model than the run recorded (fingerprint "
                    f"{rec} -> {now}), trained with other {', '.join(diff)} than this config asks: "
                    "put the run's gallery back; or, to use this one, give it a run directory of "
                    "its own (--run-dir) with a config of its settings (its config.json names them); "
                    "or --from train-gallery to train the config's gallery again")
            return {"train-gallery": (rec, now)}
    return {}


def legacy_step_keys(cfg: Config) -> list[dict[str, str]]:
    """The keys earlier hwnas versions recorded for this config: a run recorded with one of
    them is not redone for how it was keyed."""
    return [step_keys(cfg, with_runtime=True, as_written=True), step_keys(cfg, as_written=True)]


def step_keys(cfg: Config, with_runtime: bool = False, as_written: bool = False) -> dict[str, str]:
    """Each step's key: its config sections and the keys of the steps it builds on.
    ``with_runtime``: as hwnas up to stop 25 keyed them, ``*.train.device/threads`` included;
    ``as_written``: as hwnas up to stop 29 keyed them, ``data.unlabeled`` and ``adapt.images``
    as spelled and ``data.skip_bad_images`` in (:func:`legacy_step_keys`)."""
    from hwnas.data.sources import same_file_specs

    d, keys = cfg.to_dict(), {}
    named = cfg.adapt_images()
    if not d["adapt"].get("images") and d["adapt"].get("epochs") and named:
        d["adapt"]["images"] = named[1]  # (unset: the catalog it follows)
    if not as_written:
        # a file or folder is the same one however it is spelled (relative, absolute, ~)
        d["data"]["unlabeled"] = same_file_specs(d["data"].get("unlabeled"))
        d["adapt"]["images"] = same_file_specs(d["adapt"].get("images"))
        # skipping unreadable images changes nothing a finished step made: a run that found none
        # finished without it, and one that skipped some keeps what it trained without them
        d["data"]["skip_bad_images"] = False
    # uniform path sampling (SPOS's, the default): nothing in the supernet key (earlier runs keep theirs)
    if d["supernet"].get("path_sampling") == "uniform":
        d["supernet"].pop("path_sampling")
    # the catalog a bundle indexes: unset, nothing in the deploy key (earlier runs keep theirs)
    if d["deploy"].get("catalog") is None:
        d["deploy"].pop("catalog", None)
    elif not as_written:
        d["deploy"]["catalog"] = same_file_specs(d["deploy"]["catalog"])
    # how many subnets validate a table: written to its header, read by no later step
    d["latency"] = {k: v for k, v in d["latency"].items() if k != "validate"}
    # where and on how many threads a model trains is not what it learns: a run started on the
    # CPU goes on on a GPU without redoing its models (unset, nothing changes in a key)
    from hwnas.compat.train import what_trains

    for sec in ("gallery", "supernet", "query") if not with_runtime else ():
        if isinstance(d[sec].get("train"), dict):
            d[sec]["train"] = what_trains(d[sec]["train"])
    # data.unlabeled feeds the compatibility trainings only: a new one keeps the split and
    # the gallery (unset, it adds nothing to a key, so earlier runs keep theirs)
    d["unlabeled"] = d["data"].pop("unlabeled", None)
    # how the searched arch is picked concerns train-query alone (off: nothing in any key)
    fin = {k: d["query"].pop(k) for k in ("finalists", "finalist_epochs")}
    d["finalists"] = fin if fin["finalists"] > 1 else None
    d["query"].pop("jobs", None)  # how many train at once: not what they learn
    if d["search"].get("prefer_faster_within") == "se":
        # the default adds nothing to the search's key, so a run finished before the setting
        # existed keeps its search (its arch the best reward's); `--from search` chooses again
        del d["search"]["prefer_faster_within"]
    if d["search"].get("pick_in_band") == "fastest":  # (the default: earlier runs keep their search)
        del d["search"]["pick_in_band"]
    from hwnas.export.onnx import GRAPH_FORM

    for name in STEPS:
        sections, deps = STEP_INPUTS[name]
        if name == "adapt" and not cfg.adapt.epochs:
            # off: adds nothing to the keys of the steps after it (runs from before the step keep
            # theirs); recorded as "off", so turning it on later does it and what builds on it
            keys[name] = "off"
            continue
        inputs = {"config": {k: d[k] for k in sections if not (k in ("unlabeled", "finalists") and d[k] is None)},
                  "after": {x: keys[x] for x in deps if keys[x] != "off"}}
        if name == "profile":
            # what is timed is the exported graph: a new graph form (an hwnas upgrade) moves
            # every latency, so the table and all that builds on it are done again
            inputs["graph_form"] = GRAPH_FORM
            if not cfg.latency.table:
                # the default table is this CPU's (its model is in the name): on another CPU
                # the run times and searches for that one
                from hwnas.search.runner import table_path

                inputs["table"] = table_path(cfg, cfg.search_space()).name
        keys[name] = content_hash(inputs)
    return keys


def downstream(names) -> set[str]:
    """The steps given and every step that builds on them, directly or not."""
    out = set(names)
    for name in STEPS:  # STEPS is in dependency order
        if set(STEP_INPUTS[name][1]) & out:
            out.add(name)
    return out


class Steps:
    """``steps.json``: which steps are done, with their summaries and keys."""

    def __init__(self, path: Path):
        self.path = path
        self.state = read_json(path) if path.exists() else {"done": {}}

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def changed(self, keys: dict[str, str], legacy: list[dict[str, str]] = ()) -> list[str]:
        """Done steps recorded with other inputs than ``keys`` (a step recorded before keys
        existed counts as unchanged; so does one recorded with one of its ``legacy`` keys)."""
        return [n for n in STEPS if self.done(n)
                and self.state["done"][n].get("key", keys[n]) not in (keys[n], *(k[n] for k in legacy))]

    def forget(self, names, outputs=()) -> None:
        """Steps to do again: their records go first (persisted), then the outputs that a
        step would otherwise keep as finished. A kill from here on resumes the new work."""
        for n in names:
            self.state["done"].pop(n, None)
        if "deploy" in names and (self.path.parent / "bundle").exists():
            self.state[BUNDLE_STALE] = True  # replaced by the deploy done again, not removed
        write_json(self.path, self.state)
        for out in outputs:
            if out.is_dir():
                shutil.rmtree(out)
            elif out.exists():
                out.unlink()

    def mark(self, name: str, summary: dict, key: str | None = None) -> None:
        self.state["done"][name] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary,
                                    **({"key": key} if key else {})}
        write_json(self.path, self.state)


def resolve_budget(cfg: Config, predictor, paragon_ms: Callable[[], dict] | None = None,
                   warn: Callable = print) -> float:
    """``search.budget_ms``; else ``search.budget_speedup`` (the query must be that many times
    faster than the paragon, :func:`paragon_budget`; needs ``paragon_ms``); else
    ``search.budget_fraction`` of the way from the fastest to the slowest predicted subnet
    (portable across machines with different tables)."""
    if cfg.search.budget_ms is not None:
        return float(cfg.search.budget_ms)
    lo, hi = predictor.range()
    if cfg.search.budget_speedup is not None:
        sp = cfg.search.budget_speedup
        if not sp > 1:
            raise HwnasError(f"search.budget_speedup {sp} must be above 1 (the query model is "
                             "that many times faster than the gallery model)")
        if paragon_ms is None:
            raise HwnasError("search.budget_speedup needs the trained gallery model (hwnas run "
                             "measures it); or set search.budget_ms")
        b = round(paragon_ms()["budget_ms"], 4)
        if b < lo:  # a config meant for another machine: the fastest subnets, not an error
            floor = round(lo + 0.02 * (hi - lo), 4)
            warn(f"search.budget_speedup {sp}: {b:.4f} ms is below the fastest subnet here "
                 f"({lo:.4f} ms); searching the fastest subnets instead (budget {floor:.4f} ms). "
                 "Lower the speed-up or give search.budget_ms to silence this")
            return floor
        if b >= hi:  # every subnet is that much faster: the budget constrains nothing
            warn(f"search.budget_speedup {sp}: {b:.4f} ms is above the slowest subnet here ({hi:.4f} ms), "
                 f"so every subnet is {sp:g}x faster than the paragon and the budget constrains nothing; "
                 f"searching at {round(hi * 0.999, 4):.4f} ms. Raise the speed-up or give search.budget_ms")
        return min(b, round(hi * 0.999, 4))
    f = cfg.search.budget_fraction
    if not 0 < f < 1:
        raise HwnasError(f"search.budget_fraction {f} must be between 0 and 1 (or set budget_ms)")
    return round(lo + f * (hi - lo), 4)


def paragon_budget(cfg: Config, predictor, gallery_net, log: Callable = print, pools: int = 20) -> dict:
    """The latency budget at which a query model is ``search.budget_speedup`` times faster
    than the paragon (the gallery model on the query side), on the table's device.

    The paragon is timed interleaved with the fastest and the slowest subnet, and
    the target (paragon / speed-up, measured) is put on the predictor's scale through them:
    log-linear interpolation between the two (predicted vs measured), so the machine may run
    faster or slower now than when the table was calibrated, and that drift cancels. (One
    average scale over both did not: small networks are overhead-bound, and on a day when the
    fastest subnet ran 1.6x and the slowest 2.2x their predictions, the average put a target
    the fastest subnet met measured below the fastest prediction.)

    ``pools`` timing pools, medians kept, the two subnets in 5 sessions each (the quickstart's
    search step, which includes this, took 76 s on 2026-12-05). The budget decides the whole
    search, and on a shared VM small networks slow down by up to 1.5x for phases of seconds
    while the compute-bound paragon barely moves, so the ratio does not cancel within one
    phase: on the Omniglot run, five resolutions at 5 pools gave 0.066-0.106 ms, at 20 pools
    0.085-0.099 ms (one run's 5-pool budget, 0.059 ms, fell at the fastest subnet's latency)."""
    import math

    from hwnas.latency.backends import OrtCpuBackend, measure_beside_paragon
    from hwnas.nn.supernet import SubNet

    space, pre = cfg.search_space(), cfg.preprocess()
    shape = (1, pre.channels, pre.size, pre.size)
    backend = OrtCpuBackend(threads=cfg.latency.threads)
    refs = [predictor.extreme_arch(True), predictor.extreme_arch(False)]
    runners = [backend.prepare_sessions(SubNet(space, a).eval(), shape) for a in refs]
    # the paragon at its fastest thread count (as in the report)
    m, g_lat, g_best, g_by = measure_beside_paragon(runners, gallery_net, shape, backend.threads, pools=pools)
    p_ms = g_lat.latency_ms
    target = p_ms / cfg.search.budget_speedup
    (pf, ps), (mf, ms) = [predictor(a) for a in refs], [x.latency_ms for x in m[:2]]
    t = (math.log(target) - math.log(mf)) / (math.log(ms) - math.log(mf)) if ms > mf else 0.0
    b = math.exp(math.log(pf) + t * (math.log(ps) - math.log(pf)))
    log(f"[search] paragon measured {p_ms:.3f} ms ({g_best} threads); {cfg.search.budget_speedup:g}x faster is "
        f"{target:.4f} ms measured = {b:.4f} ms predicted (the fastest and slowest subnets, timed "
        f"beside it: {mf:.4f} and {ms:.4f} ms measured, {pf:.4f} and {ps:.4f} predicted)")
    return {"paragon_ms": p_ms, "paragon_threads": g_best, "paragon_ms_by_threads": g_by, "target_ms": target, "refs_measured_ms": [mf, ms],
            "refs_predicted_ms": [pf, ps], "budget_ms": b}


def _range_key(predictor) -> list[float]:
    """A table's predicted latency range as ``budget.json`` keys the budget on it."""
    return [round(x, 5) for x in predictor.range()]


def run_budget(cfg: Config, predictor, log: Callable = print) -> dict:
    """The run's latency budget (:func:`resolve_budget`), resolved once and kept in
    ``budget.json``: a measured budget (``budget_speedup``) would differ a little on every
    measurement, and a resumed search must continue the same study."""
    from hwnas.compat import api

    rd = RunDir(cfg)
    path = rd.path / "budget.json"
    key = {"budget_ms": cfg.search.budget_ms, "budget_speedup": cfg.search.budget_speedup,
           "budget_fraction": cfg.search.budget_fraction, "range_ms": _range_key(predictor)}
    if path.exists():
        old = read_json(path)
        if old.get("key") == key:
            return old["resolved"]
    measured: dict = {}

    def paragon_ms() -> dict:
        measured.update(paragon_budget(cfg, predictor, api.run_gallery(rd).net, log=log))
        return measured

    budget = resolve_budget(cfg, predictor, paragon_ms, warn=lambda m: log(f"[search] WARNING: {m}"))
    resolved = {**measured, "budget_ms": budget}  # the resolved (clamped) budget wins
    if measured and round(measured["budget_ms"], 4) != budget:  # clamped into the table's range:
        resolved["clamped_from_ms"] = measured["budget_ms"]  # not the paragon's latency / speed-up
    write_json(path, {"key": key, "resolved": resolved})
    return resolved


def adopt_study_budget(cfg: Config, budget_ms: float) -> None:
    """A worker that joined a study started by another records the study's budget as the run's
    (``budget.json``), in place of its own resolution, so that its run directory resumes that
    study and reports its budget; its own measurement is kept beside it."""
    from hwnas.search.runner import predictor_for

    path = RunDir(cfg).path / "budget.json"
    old = read_json(path) if path.exists() else None
    if old is None or old.get("key", {}).get("range_ms") != _range_key(predictor_for(cfg, cfg.search_space())[0]):
        return
    resolved = old["resolved"]
    if resolved.get("budget_ms") != budget_ms:
        resolved = {**resolved, "own_budget_ms": resolved.get("own_budget_ms", resolved.get("budget_ms")),
                    "budget_ms": budget_ms, "from_study": cfg.search.study_name or True}
        write_json(path, {**old, "resolved": resolved})


def set_search_budget(cfg: Config, log: Callable = print) -> dict:
    """The run's budget (:func:`run_budget`, on the config's latency table) set as
    ``cfg.search.budget_ms``, for hwnas run's search step and a bare hwnas search alike."""
    from hwnas.search.runner import predictor_for

    info = run_budget(cfg, predictor_for(cfg, cfg.search_space())[0], log=log)
    cfg.search.budget_ms = info["budget_ms"]
    return info


def redo_plan(cfg: Config, steps: "Steps", keys: dict[str, str],
              redo_from: str | None = None) -> tuple[list[str], list[str], str]:
    """The steps to do again, those of them whose outputs go first, and why (empty: none)."""
    changed = edited = steps.changed(keys, legacy_step_keys(cfg))
    forced = [redo_from] if redo_from is not None else []
    # a weights file replaced under the name the config gives: a changed input of the gallery's
    # training, as a changed setting is (its content is not in the step's key)
    refilled = None
    if steps.done("train-gallery") and "train-gallery" not in downstream(changed + forced):
        from hwnas.compat.api import checkpoint_replaced

        refilled = checkpoint_replaced(cfg)
        if refilled:
            changed = [*changed, "train-gallery"]
    lost = [n for n in lost_steps(cfg, steps.done) if n not in downstream(changed + forced)]
    # (a gallery done again anyway, for a config change or --from, is not checked)
    replaced = (replaced_steps(cfg, steps.state["done"])
                if "train-gallery" not in downstream(changed + forced) else {})
    redo = [n for n in STEPS if n in downstream(changed + forced + lost + list(replaced))]  # unfinished ones too
    # a lost product's step (and what builds on it) runs again over what is still there: its
    # checkpoints, study and caches resume it; only changed or forced steps lose their outputs,
    # and what was made against a replaced model (the model itself is kept, and recorded anew)
    fresh = [n for n in redo if n in downstream(changed + forced)
             or (n in downstream(replaced) and n not in replaced and not _made_for_present(cfg, n))]
    if not redo:
        return [], [], ""
    from hwnas.export.onnx import GRAPH_FORM

    was = steps.state["done"].get("profile", {}).get("graph_form", 1)
    why = "; ".join(w for w in (
        f"--from {redo_from}" if redo_from else "",
        f"the config changed for {', '.join(edited)}" if edited else "",
        refilled or "",
        f"the exported graph form changed ({was} -> {GRAPH_FORM}: this hwnas exports other graphs "
        "than the run's table timed)" if not redo_from and "profile" in changed and was != GRAPH_FORM else "",
        f"the outputs of {', '.join(lost)} are missing" if lost else "",
        *(f"the {n.split('-', 1)[1]} model was replaced since {n} recorded it (fingerprint "
          f"{old} -> {new}), so what was trained against the old one is done again"
          for n, (old, new) in replaced.items()))
        if w)
    return redo, fresh, why


def _made_for_present(cfg: Config, name: str) -> bool:
    """Whether a step's product was made against the present gallery already (a supernet
    retrained by hand, under torchrun say, after the gallery was replaced): kept, not redone."""
    if name != "train-supernet":
        return False
    root = RunDir(cfg).path
    sup, gal = root / "supernet" / "config.json", root / "gallery" / "config.json"
    return (sup.exists() and gal.exists()
            and read_json(sup).get("gallery_fingerprint") == read_json(gal).get("fingerprint"))


def gallery_settled(cfg: Config, steps: "Steps", gallery_fp: str | None, fresh: list[str],
                    log: Callable = print) -> None:
    """After train-gallery: if the gallery is another than the one the later steps were
    trained against (``gallery_fp``), they lose their outputs and are done again."""
    new_fp = steps.state["done"].get("train-gallery", {}).get("fingerprint")
    after = [n for n in STEPS if n in downstream(["train-gallery"]) and n != "train-gallery"
             and n not in fresh and not _made_for_present(cfg, n)]
    if gallery_fp and new_fp != gallery_fp and "train-gallery" not in fresh and after:
        log(f"[run] the gallery model is another than the one the run recorded (fingerprint "
            f"{gallery_fp} -> {new_fp}): doing again {', '.join(after)}")
        steps.forget(after, redo_outputs(cfg, after))
    steps.state.pop("against_gallery", None)  # the later steps are now trained against new_fp
    write_json(steps.path, steps.state)


def run_pipeline(cfg: Config, log: Callable = print, redo_from: str | None = None,
                 drop_additions: bool = False) -> int:
    """Run every step not yet done with this config (``redo_from``: that step and every
    step that builds on it again, whatever was recorded; ``drop_additions``: a deploy done
    again leaves out the images hwnas-edge add put in the bundle it replaces)."""
    from hwnas.compat import api

    if redo_from is not None and redo_from not in STEPS:
        raise HwnasError(f"--from {redo_from!r} is not a step; steps: {', '.join(STEPS)}")
    cfg.validate()  # every setting a step reads, checked before the first step starts
    # a wrong image source fails now, not after the gallery's training
    for setting, source in (("data.unlabeled", cfg.data.unlabeled),
                            ("adapt.images", cfg.adapt.images if cfg.adapt.epochs else None)):
        if source:
            from hwnas.data.sources import unlabeled_images, unlabeled_specs

            for spec in unlabeled_specs(source, setting):
                unlabeled_images(spec, setting)
    if cfg.deploy.catalog:  # the images the bundle's index is to hold
        from hwnas.data.sources import catalog_images

        catalog_images(cfg.deploy.catalog)
    from hwnas.nn.models import check_timm_name  # the gallery's backbone: now, not after profiling

    check_timm_name(cfg.gallery.backbone)
    gc = cfg.gallery
    if not Steps(RunDir(cfg).path / "steps.json").done("train-gallery"):  # (read by that step alone)
        from hwnas.compat.api import check_backbone_checkpoint

        check_backbone_checkpoint(gc)
    if cfg.deploy.index:  # a factory string FAISS cannot parse: now, not at the last step
        from hwnas.export.deploy import make_index

        make_index(cfg.search_space().embed_dim, cfg.deploy.index)
    rd = RunDir(cfg)
    # the data source opened before the run directory is written: a wrong path or an empty
    # folder leaves no run behind (the data step splits this collection)
    col = None if rd.splits_path.exists() else rd.collection()
    new_dir = not rd.path.exists()
    rd.path.mkdir(parents=True, exist_ok=True)
    if cfg.search.storage:  # a bad URL, a missing driver or a server down: now, not at the search
        from hwnas.search.runner import make_storage

        try:
            make_storage(cfg.search.storage, rd)
        except HwnasError:
            if new_dir and not any(rd.path.iterdir()):
                rd.path.rmdir()
            raise
    rd.save_config()
    steps = Steps(rd.path / "steps.json")
    t0 = time.time()
    space = cfg.search_space()
    keys = step_keys(cfg)
    # the gallery the run's later steps were trained against (a lost gallery trained again, or
    # a replacement killed before it finished, shows only once train-gallery has run); kept in
    # steps.json until then, as the step's own record goes when it is done again
    gallery_fp = (steps.state.get("against_gallery")
                  or steps.state["done"].get("train-gallery", {}).get("fingerprint"))
    steps.state["against_gallery"] = gallery_fp
    redo, fresh, why = redo_plan(cfg, steps, keys, redo_from)
    check_table_left(cfg, steps, redo)
    if redo:
        log(f"[run] {why}: doing again {', '.join(redo)}")
        outputs = redo_outputs(cfg, fresh) + (forced_outputs(cfg, downstream([redo_from])) if redo_from else [])
        # before those go: a step done afresh that cannot train (its device is not here, the
        # gallery's weights file or backbone is refused) must not cost the models it replaces
        from hwnas.compat.train import train_device

        for n, section in (("train-gallery", "gallery"), ("train-supernet", "supernet"),
                           ("train-query", "query"), ("adapt", "query"), ("baselines", "query")):
            if n in fresh:
                train_device(cfg.train_config(section))
        if "train-gallery" in fresh and (RunDir(cfg).path / "gallery").exists():  # (a model to lose;
            api.gallery_network(cfg)  # with none, the step's own build refuses it just the same)
        if "search" in fresh and cfg.search.storage:
            log(f"[run] WARNING: the search continues its study in {cfg.search.storage}; set "
                "search.study_name to a new name to search afresh")
        with contextlib.ExitStack() as held:  # a query model another process trains is not
            from hwnas.compat.train import training_lock  # deleted under it: refused, named

            for out in outputs:
                if out.parent.name == "query":
                    held.enter_context(training_lock(out / "checkpoint.safetensors", f"run --from {redo_from}", log))
            steps.forget(redo, outputs)

    def step(name: str, fn) -> None:
        if steps.done(name):
            log(f"== {name}: done earlier, kept")
            if name == "profile" and cfg.latency.validate:
                # latency.validate is read when the table is built: set later, it would change the
                # calibration the run has searched with, so it is not applied to a kept table
                from hwnas.latency.backends import OrtCpuBackend
                from hwnas.latency.table import LatencyTable
                from hwnas.search.runner import table_path

                tpath = table_path(cfg, space)
                h = LatencyTable.load(tpath).header if tpath.exists() else {"validation": None}
                if "validation" not in h and h.get("device_name") == \
                        OrtCpuBackend(threads=cfg.latency.threads).settings().get("device_name"):
                    log(f"[run] note: latency.validate is {cfg.latency.validate}, but this run's table was "
                        "kept without validation (it was built with latency.validate 0); to validate and "
                        f"calibrate it: hwnas profile --device cpu --config CONFIG --out {tpath} --validate "
                        f"{cfg.latency.validate}, then hwnas run CONFIG --from profile")
            return
        log(f"== {name}")
        t = time.time()
        summary = fn() or {}
        steps.mark(name, {**summary, "seconds": round(time.time() - t, 1)}, keys[name])

    def data():
        from hwnas.data.splits import no_validation_reason

        nonlocal col
        made = not rd.splits_path.exists()
        s = rd.splits(col, log=log, save=False)  # a new split is kept only once it passes the checks
        col = None
        why = no_validation_reason(s)
        if why:  # the search step needs them: fail now, not after the gallery's training
            raise HwnasError(why if made else f"{why} (then split again: --from data)")
        skipped = rd.check_images(s, log)  # every image read once here, not by the step that needs it
        if made:
            rd.save_splits(s, log)
        return {"fingerprint": s.fingerprint, "counts": s.counts(), "unreadable": len(skipped)}

    def profile():
        from hwnas.latency.backends import OrtCpuBackend
        from hwnas.latency.profile import profile_space, validate_table
        from hwnas.search.runner import table_path

        path = table_path(cfg, space)
        backend = OrtCpuBackend(threads=cfg.latency.threads)
        here = backend.settings().get("device_name")
        # a table of this machine timed on an older hwnas's graph form (why this step's key
        # moved) is timed again; another device's is refused by the check, with the fix
        table = profile_space(space, backend, path, retime_old_form=True, log=log)
        if "validation" not in table.header and cfg.latency.validate:
            if table.header.get("device_name") == here:
                validate_table(space, table, backend, cfg.latency.validate, path, seed=cfg.seed, log=log)
            else:  # another device's table (latency.table): its timings are not this machine's to fit
                log(f"[profile] {path} was measured on {table.header.get('device_name')!r}, not here "
                    f"({here!r}): not validated or calibrated here (latency.validate); validate it on "
                    "that device")
        return {"table": str(path), "validation": table.header.get("validation"),
                "graph_form": table.header.get("graph_form")}

    def search():
        from hwnas.search.runner import run_search

        rule = cfg.search.budget_ms is None and cfg.search.budget_speedup  # (measured: a worker joins the study's)
        info = set_search_budget(cfg, log)
        log(f"[search] budget {cfg.search.budget_ms} ms")
        r = run_search(cfg, log=log, adopt_budget=(lambda b: adopt_study_budget(cfg, b)) if rule else None)
        return {"arch": r["arch"], "reward": r["reward"], **info, "budget_ms": cfg.search.budget_ms}

    def train_query():
        q = api.train_searched(cfg, name="searched", resume=True, retrain_changed=True, log=log)
        return {"arch": q["arch"]} if cfg.query.finalists > 1 else {}

    def adapt():
        if not cfg.adapt.epochs:
            log("[adapt] off (adapt.epochs is 0)")
            return {"skipped": "adapt.epochs is 0"}
        m = api.adapt_query(cfg, name=ADAPTED, resume=True, retrain_changed=True, log=log)
        return {"model": ADAPTED, "images": m["adapted"]["images"], "source": m["adapted"]["source"]}

    def baselines():
        from hwnas.report import baseline_models

        api.train_many(cfg, [{"name": name, "resume": True, "retrain_changed": True, **kw}
                             for name, kw in baseline_models(cfg, space).items()], log=log)

    def deploy():
        from hwnas.export.deploy import deploy as do_deploy

        stale = bool(steps.state.get(BUNDLE_STALE))
        if (rd.path / "bundle" / "manifest.json").exists() and not stale:
            return {}  # (a deploy killed after its bundle was complete)
        # (with gallery adaptation on, deploy ships the adapted model)
        m = do_deploy(cfg, int8=cfg.deploy.int8, factory=cfg.deploy.index, overwrite=stale,
                      drop_additions=drop_additions, log=log)
        steps.state.pop(BUNDLE_STALE, None)  # (persisted by the step's mark)
        return {"artifacts": len(m["artifacts"])}

    def report():
        from hwnas.report import build_report

        r = build_report(cfg, log=log)
        return {"rows": len(r["rows"])}

    try:
        step("data", data)
    except BaseException:
        if new_dir:  # a run that stops at its data (unreadable images, no validation split) leaves
            # no run directory behind: it holds only what this call wrote (config.json, and a
            # study storage file the up-front check opened there)
            shutil.rmtree(rd.path, ignore_errors=True)
        raise
    step("profile", profile)
    keep_table(cfg, steps, log)
    if cfg.search.budget_ms is not None:  # a budget no subnet meets: said now, not after the trainings
        from hwnas.search.runner import check_budget, predictor_for

        check_budget(cfg.search.budget_ms, *predictor_for(cfg, space))
    step("train-gallery", lambda: {"fingerprint": api.train_gallery(cfg, resume=True, log=log)["fingerprint"]})
    gallery_settled(cfg, steps, gallery_fp, fresh, log)
    step("train-supernet", lambda: (api.train_supernet(cfg, resume=True, log=log), {})[1])
    step("search", search)
    step("train-query", train_query)
    step("adapt", adapt)
    step("baselines", baselines)
    step("deploy", deploy)
    step("report", report)
    from hwnas.report import headline_table

    log(headline_table(read_json(rd.path / "report.json")))
    log(f"done in {(time.time() - t0) / 60:.1f} min; report: {rd.path / 'report.md'}")
    return 0
