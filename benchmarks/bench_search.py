"""Search benchmark (issue 5), on a finished quickstart run (trained gallery and supernet):

* samplers: TPE vs NSGA-II vs regularized evolution vs random at equal numbers of evaluated
  trials (best reward reached after 25/50/100/...), one study each, same budget and reward;
* rewards: R1 vs R2 vs R3 — the best arch of each search is trained (train-query, same
  recipe) and evaluated on the test split;
* budgets: at three budgets across the table's range, the searched model vs the median of
  K random feasible archs trained the same way, and vs MobileNetV3-small at the best (on
  M(q,g)) of the widths timm registers whose measured latency is within the budget (each
  width trained with the same loss, at ``--baseline-seeds`` seeds);
* cost: seconds per evaluated trial.

    python benchmarks/bench_search.py --config configs/quickstart.yaml --parts samplers rewards budgets cost

Training many query models is the slow part; on a GPU machine ``--jobs 8 --cpu-jobs 4``
trains them in parallel processes (8 on the GPU, 4 on spare CPU cores; 64 Fashion-MNIST
models in 8.5 min on an H100 with 16 cores) and ``--measure-later`` leaves their edge
latency to a later ``--parts measure`` on the target CPU (the latency of an architecture does not depend on
its weights, so it is measured from the architecture rebuilt there).

The budgets part runs for hours on 2 cores. A killed run resumes from its run directory, and
``--finished-only`` reports what it has finished so far. The results file also keeps every
finished model (reported or not, each written into it the moment it finishes) with a digest of
the gallery and supernet weights, splits and query recipe it was made against. A run directory
made again to the same digest (the pipeline is seeded) therefore takes those models from the
results file instead of training them again.
``--adopt-unstamped`` extends that to rows written before the digest was recorded: they are
taken only where this supernet gives every arch they scored the same search score.
"""

from __future__ import annotations

import argparse
import copy
import random
import shlex
import statistics
import sys
from pathlib import Path

from _common import ROOT, machine, machine_line, save_results, se_points, update_benchmarks_md
from tqdm import tqdm


_WORKER_DEVICE = None  # set per worker process by _init_worker


def _init_worker(counter, gpu_jobs: int, cpu_jobs: int) -> None:
    """Worker i < gpu_jobs trains on the GPU (one thread: it mostly launches kernels); the
    others on the CPU, sharing the cores the GPU workers leave — small models leave a GPU's
    time-slicing, not its arithmetic, as the limit, so idle CPU cores add throughput. On a
    CPU-only machine (``--jobs 0 --cpu-jobs 2`` on 2 cores) each worker gets one thread:
    these small models gain less from a second intra-op thread than from a second model."""
    global _WORKER_DEVICE
    import torch

    from hwnas.latency.backends import physical_cores

    with counter.get_lock():
        i = counter.value
        counter.value += 1
    _WORKER_DEVICE = "auto" if i < gpu_jobs else "cpu"
    torch.set_num_threads(1 if i < gpu_jobs else max(1, (physical_cores() - gpu_jobs) // max(1, cpu_jobs)))


def _train_eval(base, run_dir, name, kw):
    """Train one query model (train-query, the run's recipe) and evaluate it on the test split."""
    import copy

    from hwnas.compat import api
    from hwnas.utils import read_json

    cfg = copy.deepcopy(base)
    kw = dict(kw)
    cfg.seed = kw.pop("seed", cfg.seed)  # a training seed other than the run's (batches, augmentation)
    if _WORKER_DEVICE is not None:
        cfg.query.train = {**cfg.query.train, "device": _WORKER_DEVICE}
    quiet = lambda *_: None  # noqa: E731
    if "finalists_from" in kw:  # the search's choice by query.finalists (its best K, part-trained)
        cfg.query.finalists = kw["finalists"]
        # each budget's finalists in their own directories: two budgets training in parallel
        # may share an arch
        q = api.train_searched(cfg, name=name, resume=True, retrain_changed=True, search_dir=Path(kw["finalists_from"]),
                               finalist_prefix=f"{name}-finalist", log=quiet)
    else:
        q = api.train_query(cfg, name=name, resume=True, log=quiet, **kw)
    qdir = Path(run_dir) / "query" / q["name"]
    ev = api.evaluate_query(cfg, query_dir=str(qdir), log=quiet)["metrics"]
    # a finalists' choice with what it chose from, as the report and a later run keep it
    chose = read_json(qdir / "finalists.json") if "finalists_from" in kw else {}
    return {"name": name, "kind": "timm" if "timm_name" in kw else "subnet",
            "mflops": q["flops"] / 1e6, "M(q,g)": ev["M(q,g)"]["recall@1"],
            "test_queries": ev["M(q,g)"]["n_queries"],
            "M(q,q)": ev["M(q,q)"]["recall@1"], "arch": q.get("arch") or q.get("timm"),
            "train_seconds": q.get("train_seconds"), "device": _WORKER_DEVICE or "auto", "seed": cfg.seed,
            "train_loss_by_epoch": [h["loss"] for h in q.get("history", [])], **chose}


def selection_fidelity(budget_rows, epochs: int, k: int, draws: int = 4000) -> list[dict]:
    """Per budget, how well two cheap signals rank its trained subnets (searched + random)
    by test M(q,g): the search's score (the supernet subnet's validation reward) and a
    model's own training loss after ``epochs`` epochs of its schedule (what
    ``query.finalists`` compares). Kendall tau of each (the loss negated: lower is better),
    and, over ``draws`` seeded draws of ``k`` of those archs, how often the one each signal
    picks reaches the budget's median test M(q,g) and M(q,q), and its mean M(q,g) over the
    draw's average."""
    from scipy.stats import kendalltau

    out = []
    for r in budget_rows:
        subs = [x for x in (r["searched"], *r["random"]) if len(x.get("train_loss_by_epoch", [])) >= epochs]
        if len(subs) < max(k, 3) or any("proxy_all" not in x for x in subs):
            continue
        qg = [x["M(q,g)"] for x in subs]
        med_qg, med_qq = statistics.median(qg), statistics.median(x["M(q,q)"] for x in subs)
        row = {"budget_ms": r["budget_ms"], "n": len(subs), "epochs": epochs, "k": k}
        signals = {"search_score": lambda x: x["proxy_all"], "train_loss": lambda x: -x["train_loss_by_epoch"][epochs - 1]}
        rng = random.Random(0)
        picks = [rng.sample(range(len(subs)), k) for _ in range(draws)]
        for name, f in signals.items():
            row[f"kendall_{name}"] = float(kendalltau([f(x) for x in subs], qg)[0])
            chosen = [(max(d, key=lambda i: f(subs[i])), d) for d in picks]
            row[f"p_median_qg_{name}"] = sum(subs[c]["M(q,g)"] >= med_qg for c, _ in chosen) / draws
            row[f"p_median_both_{name}"] = sum(subs[c]["M(q,g)"] >= med_qg and subs[c]["M(q,q)"] >= med_qq
                                               for c, _ in chosen) / draws
            row[f"gain_qg_{name}"] = statistics.mean(subs[c]["M(q,g)"] - statistics.mean(qg[i] for i in d)
                                                     for c, d in chosen)
        out.append(row)
    return out


def seed_mean(first: dict, seeds: list) -> dict:
    """One arch's M(q,g) and M(q,q) averaged over its trainings (``first``, then ``seeds``),
    at ``first``'s measured latency (the arch's: training does not change it), as
    ``_shortfalls`` takes a model."""
    runs = [first, *seeds]
    return {"M(q,g)": statistics.mean(x["M(q,g)"] for x in runs), "M(q,q)": statistics.mean(x["M(q,q)"] for x in runs),
            "measured_ms": first.get("measured_ms"), "n": len(runs)}


def noise_components(row) -> dict | None:
    """How much of a budget's random archs' M(q,g) spread is architecture and how much is
    training noise: the pooled variance of one arch's M(q,g) over its training seeds (every
    arch of the budget trained at more than one: the searched, the best reward's, the
    finalists' choice), and the random archs' variance less that one: a method-of-moments
    estimate of the spread architecture adds (0 where training noise accounts for all of it).
    None where no arch has two trainings."""
    groups = [[row["searched"], *row.get("searched_seeds", [])]]
    if row.get("best_reward"):
        groups.append([row["best_reward"], *row["best_reward"].get("seeds", [])])
    f = row.get("finalists") or {}
    if f.get("seeds") and f.get("own_seeds"):  # not the seeds it borrows from the searched arch
        groups.append([f, *f["seeds"]])
    groups = [[x["M(q,g)"] for x in g] for g in groups if len(g) > 1]
    df = sum(len(g) - 1 for g in groups)
    if not df or len(row["random"]) < 3:
        return None
    within = sum((len(g) - 1) * statistics.variance(g) for g in groups) / df
    rand = statistics.variance(x["M(q,g)"] for x in row["random"])
    return {"within_sd": within ** 0.5, "within_df": df, "random_sd": rand ** 0.5,
            "arch_sd": max(0.0, rand - within) ** 0.5}


def finalists_seed_source(space, frac, fin_arch: str, candidates, trained) -> str | None:
    """Where the finalists' choice at budget ``frac`` takes its other training seeds from: the
    first of ``candidates`` ((kind, arch): "searched", the best reward's arch; "chosen", the
    search's choice) trained at this budget (``bench-budget-<frac>-<kind>`` in ``trained``: no
    "chosen" is trained where the choice is the best reward's arch) that is the same network
    (compared canonically: two spellings of one network are one arch); None where none is,
    and the finalists' choice trains seeds of its own."""
    net = space.network(fin_arch)
    for kind, a in candidates:
        if f"bench-budget-{frac}-{kind}" in trained and space.network(a) == net:
            return kind
    return None


def weights_digest(base, run_dir) -> str:
    """What every model of the budgets part depends on besides its own arch and seed: the
    gallery's and the supernet's weight files (sha256: the gallery it aligns to, the supernet
    it starts from), the splits and the query recipe. Rows of an earlier results file carry
    over to a run only where this is the same (``carry_rows``)."""
    from hwnas.nn.models import _weights_hash
    from hwnas.utils import content_hash, read_json

    run_dir = Path(run_dir)
    files = [_weights_hash(run_dir / part / "model.safetensors") for part in ("gallery", "supernet")]
    from hwnas.compat.api import _unlabeled_source

    # the recipe as train-query resolves and compares it (not where or how fast it trains)
    train = {k: v for k, v in base.train_config("query").__dict__.items() if k not in ("device", "threads")}
    recipe = {"train": train, "loss": base.loss_config("query").to_dict(), "inherit": base.query.inherit,
              "finalist_epochs": base.query.finalist_epochs, "unlabeled": _unlabeled_source(base),
              "preprocess": base.preprocess().to_dict(), "space": base.search_space().hash}
    splits = read_json(run_dir / "splits.json").get("fingerprint")
    return content_hash({"weights": files, "splits": splits, "recipe": recipe}, 16)


def result_rows(budget_rows, unreported=(), in_progress=()) -> dict[str, dict]:
    """Every trained model's row of a results file's budgets (and its ``unreported`` ones: the
    models of budgets not yet reported), by model name (the rows as ``_train_eval`` made them;
    a finalists' row keeps what its finalists.json added). ``in_progress``: rows a run kept
    as they finished (``keep_in_progress``), newer than a reported row of the same name (the
    caller passes only those made against its own weights)."""
    out: dict[str, dict] = {x["name"]: x for x in unreported}
    derived = ("seeds", "own_seeds", "band", "fits_budget")  # recomputed from the other rows each time
    for r in budget_rows:
        for x in (r["searched"], *r.get("searched_seeds", []), *r["random"]):
            out[x["name"]] = x
        for x in (*[r.get(k) for k in ("best_reward", "finalists")], r["mobilenetv3"], *r.get("mobilenetv3_widths", [])):
            if x:
                out[x["name"]] = {kk: v for kk, v in x.items() if kk not in derived}
                for y in x.get("seeds", []):
                    out[y["name"]] = y
    out.update({x["name"]: x for x in in_progress})
    return {n: {k: v for k, v in x.items() if not k.startswith("measured")} for n, x in out.items()}


def keep_in_progress(path: Path, row: dict) -> None:
    """Add one finished model of the budgets part (stamped with its ``weights_digest``) to the
    results file's ``budgets_in_progress`` the moment it finishes, replacing an earlier row of
    that name, and change nothing else in the file (written atomically). A run stopped, or a
    machine lost, before the run writes its results then loses no finished model: the next
    run carries these rows (``result_rows``), and its own final write folds them into the
    reported or unreported rows."""
    from hwnas.utils import read_json, write_json

    res = read_json(path) if path.exists() else {}
    rows = [x for x in res.get("budgets_in_progress", []) if x["name"] != row["name"]]
    res["budgets_in_progress"] = sorted([*rows, row], key=lambda x: x["name"])
    write_json(path, res)


def carry_rows(prev: dict[str, dict], jobs, digest: str, same, unstamped_ok: bool = False) -> dict[str, dict]:
    """Of ``jobs`` ([(name, kwargs)]), those an earlier results file holds a finished row of
    (``prev``, from ``result_rows``), made against the same weights and recipe (its
    ``weights_digest`` is ``digest``) and of the same model (``same(row, kwargs)``, e.g. ``same_model``):
    {name: row}. So a benchmark spanning days survives the loss of its run directory: the
    models it had finished and reported are not trained again. Rows without a digest (files
    from before it was recorded) carry only with ``unstamped_ok``, which the caller grants
    after checking that the search scores them as before."""
    out = {}
    for name, kw in jobs:
        row = prev.get(name)
        if row is None:
            continue
        stamped = row.get("weights_digest") == digest
        if not (stamped or (unstamped_ok and "weights_digest" not in row)) or not same(row, kw):
            continue
        # a row adopted on its scores says so for good (its stamp is this run's from now on)
        out[name] = {**row, "weights_digest": digest, **({} if stamped else {"adopted_by": "search scores"})}
    return out


def same_model(row, kw, space, seed: int, epochs: int, finalist_epochs: int, fin_search: dict) -> bool:
    """Whether a results row is the model a budgets job (``kw``: train-query's arguments) would
    train: the same arch (compared canonically) or timm model, the same training seed and
    schedule; for the finalists' choice, one made from the same search's choice with the
    same number of finalist epochs. A row of another search space is not."""
    from hwnas.errors import SpaceError

    if row.get("seed") != kw.get("seed", seed) or len(row.get("train_loss_by_epoch", [])) != epochs:
        return False
    if "timm_name" in kw:
        return row.get("kind") == "timm" and row["arch"] == kw["timm_name"]
    try:
        if "finalists_from" in kw:  # (fewer finalists than asked where the search found fewer archs)
            return (row.get("search_best") is not None and row.get("epochs") == finalist_epochs
                    and 1 <= len(row.get("finalists", [])) <= kw["finalists"]
                    and space.network(row["search_best"]) == space.network(fin_search[kw["finalists_from"]]))
        return row.get("kind") == "subnet" and space.network(row["arch"]) == space.network(kw["arch"])
    except SpaceError:
        return False


def unstamped_scores_agree(prev: dict[str, dict], scores: dict, min_rows: int = 10) -> tuple[bool, str]:
    """Whether the rows without a digest were made against this run's supernet: every one
    that recorded the search's score of its arch (``proxy_all``, ``proxy_split``) gets the
    same score from this supernet, to 1e-9, and at least ``min_rows`` did. A supernet trained
    again to other weights moves some of those scores by a query or more; (True/False, why)."""
    rows = [x for x in prev.values() if "weights_digest" not in x and "proxy_all" in x and x["arch"] in scores]
    if len(rows) < min_rows:
        return False, f"only {len(rows)} unstamped rows recorded a search score (need {min_rows})"
    off = [x["name"] for x in rows for proto in ("all", "split")
           if abs(scores[x["arch"]][proto] - x[f"proxy_{proto}"]) > 1e-9]
    if off:
        return False, f"{len(off)} of {2 * len(rows)} scores differ (e.g. {off[0]})"
    return True, f"all {2 * len(rows)} scores of {len(rows)} archs agree"


MBV3_WIDTHS = ("mobilenetv3_small_050", "mobilenetv3_small_075", "mobilenetv3_small_100")
"""The fixed baseline's widths: every width timm registers for MobileNetV3-small."""


def width_of(timm_name: str) -> str:
    """``mobilenetv3_small_075`` -> ``0.75``."""
    return str(int(timm_name.rsplit("_", 1)[1]) / 100)


def fit_baseline(row) -> None:
    """Issue 5's fixed baseline at one budget: of the MobileNetV3-small widths whose measured
    latency is at or under the budget (``row["mobilenetv3_fit"]``, names), the best on mean
    M(q,g) (a wider width is not always the stronger: on Fashion-MNIST 1.0 trails 0.75),
    into ``row["mobilenetv3"]``: the rival ``_shortfalls`` holds a model against. Where no
    width fits, the narrowest with ``fits_budget`` False: shown for reference, not a rival.
    A results file from before the widths (its ``mobilenetv3`` row alone) is fitted the
    same way, with that one width."""
    widths = row.get("mobilenetv3_widths") or [row["mobilenetv3"]]
    if not all("measured_ms" in w for w in widths):  # (--measure-later: not timed yet)
        return
    fit = [w for w in widths if w["measured_ms"] <= row["budget_ms"]]
    best = max(fit, key=lambda w: (seed_mean(w, w.get("seeds", []))["M(q,g)"], w["mflops"])) if fit else \
        min(widths, key=lambda w: w["mflops"])
    row["mobilenetv3"] = {**best, "fits_budget": bool(fit)}
    row["mobilenetv3_fit"] = [w["name"] for w in fit]


def _best_reward(found: dict) -> tuple[str, float]:
    """The best reward's arch of a search result and its predicted ms (the search's choice
    where it records no other, as before the choice rule)."""
    w = found.get("chosen_within", {})
    return w.get("best_reward_arch", found["arch"]), w.get("best_reward_predicted_ms", found["predicted_ms"])


def _beaten(model, row) -> str:
    """How many of a budget's random archs ``model`` reaches (>=, ties included) on M(q,g) and on M(q,q)."""
    n = len(row["random"])
    return " / ".join(f"{sum(model[k] >= x[k] for x in row['random'])}/{n}" for k in ("M(q,g)", "M(q,q)"))


def _shortfalls(model, row) -> list[str]:
    """Where ``model`` misses issue 5's target within its budget (empty: it meets it). Measured
    latencies within the headline's tolerance count as equal there too (PARETO_LATENCY_TOL:
    one report's timing pools spread by more on this shared VM)."""
    from hwnas.report import PARETO_LATENCY_TOL

    slower = model["measured_ms"] / row["random_median_measured_ms"] - 1
    out = [w for w, bad in (
        ("M(q,g) below the random median", model["M(q,g)"] < row["random_median_M(q,g)"]),
        ("M(q,q) below the random median", model["M(q,q)"] < row["random_median_M(q,q)"]),
        (f"slower than the random median ({100 * slower:.1f}%)", slower > PARETO_LATENCY_TOL)) if bad]
    mb = row["mobilenetv3"]
    if mb.get("fits_budget") is False:  # no width within the budget: no rival there
        return out
    m = seed_mean(mb, mb.get("seeds", []))  # (its mean where it trained at several seeds)
    slower_mb = model["measured_ms"] / mb["measured_ms"] - 1 if "measured_ms" in mb else None
    who = f"MobileNetV3-small-{width_of(mb['arch'])}"
    return out + [w for w, bad in (
        (f"M(q,g) below {who}", model["M(q,g)"] < m["M(q,g)"]),
        (f"M(q,q) below {who}", model["M(q,q)"] < m["M(q,q)"]),
        (f"slower than {who} ({100 * (slower_mb or 0):.1f}%)",
         slower_mb is not None and slower_mb > PARETO_LATENCY_TOL)) if bad]


def _target(model, row) -> str:
    """Issue 5's verdict on ``model`` at a budget, as the tables print it."""
    short = _shortfalls(model, row)
    if short:
        return "; ".join(short)
    return "searched >= both" if row["mobilenetv3"].get("fits_budget") is not False else \
        "searched >= the random median (no MobileNetV3-small width within budget)"


def _baseline_cell(m) -> str:
    """A budget's MobileNetV3-small (``fit_baseline``) in its table: width, M(q,g) / M(q,q)
    (the mean over its seeds where it has several) / measured ms."""
    mean = seed_mean(m, m.get("seeds", []))
    figs = (f"{100 * mean['M(q,g)']:.2f} / {100 * mean['M(q,q)']:.2f}" + (f" (mean of {mean['n']})" if mean["n"] > 1 else "")
            + f" / {m['measured_ms']:.3f}")
    if m.get("fits_budget") is False:
        return f"none fits (narrowest, {width_of(m['arch'])}: {figs})"
    return f"{width_of(m['arch'])}: {figs}"


def _baselines_md(rows) -> list[str]:
    """The MobileNetV3-small widths trained with the same loss, and which budgets each fits."""
    widths = rows[0].get("mobilenetv3_widths")
    if not widths:  # a results file from before the widths: width 0.5 alone
        return ["", "MobileNetV3-small at width 0.5 (this run trained no other width); where its measured "
                "latency is above a budget it is shown for reference, not as a feasible rival."]
    md = ["", "The fixed baseline: MobileNetV3-small (timm) at each width timm registers, trained with the same "
          "compatibility loss and recipe. At each budget the rival is the best, on mean M(q,g), of the widths whose "
          "measured latency is at or under the budget (not always the widest); where none is, the narrowest is "
          "shown for reference, and the target has no baseline to meet there. The "
          "budget is on the latency table's predicted scale and the widths are admitted on measured latency, "
          "as the target reads; the budget's own archs measure some percent off their prediction (the tables' "
          "pred. / meas. columns).", "",
          "| width | MFLOPs | M(q,g) by seed | M(q,g) mean | M(q,q) mean | meas. ms | within budget at (ms) "
          "| the rival at (ms) |", "|---|---|---|---|---|---|---|---|"]
    for w in widths:
        mean = seed_mean(w, w.get("seeds", []))
        within = [str(r["budget_ms"]) for r in rows if w["name"] in r.get("mobilenetv3_fit", [])]
        at = [str(r["budget_ms"]) for r in rows if r["mobilenetv3"]["name"] == w["name"]
              and r["mobilenetv3"].get("fits_budget")]
        md.append(f"| {width_of(w['arch'])} | {w['mflops']:.2f} | "
                  + " / ".join(f"{100 * y['M(q,g)']:.2f}" for y in [w, *w.get("seeds", [])])
                  + f" | {100 * mean['M(q,g)']:.2f} | {100 * mean['M(q,q)']:.2f} | {w['measured_ms']:.3f} | "
                  f"{', '.join(within) or '-'} | {', '.join(at) or '-'} |")
    missing = sorted({width_of(w) for r in rows for w in r.get("mobilenetv3_not_trained", [])})
    if missing:  # (--finished-only part way)
        md += ["", (f"Width {missing[0]} is" if len(missing) == 1 else f"Widths {', '.join(missing)} are")
               + " not trained yet: a budget one would fit is judged without it for now."]
    return md


def plot_budgets(rows, path) -> None:
    """M(q,g) vs measured latency per budget: every random arch, the searched one, MobileNetV3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for c, r in zip(colors, rows):
        ax.scatter([x["measured_ms"] for x in r["random"]], [100 * x["M(q,g)"] for x in r["random"]],
                   s=14, alpha=0.5, color=c, label=f"random feasible, budget {r['budget_ms']} ms (predicted)")
        ax.scatter([r["searched"]["measured_ms"]], [100 * r["searched"]["M(q,g)"]], marker="*", s=160,
                   color=c, edgecolor="k", label=f"searched, budget {r['budget_ms']} ms (predicted)")
        ax.axvline(r["budget_ms"], color=c, ls=":", lw=1)  # the budget, on the predictor's scale
        f = r.get("finalists")
        if f and "measured_ms" in f:
            ax.scatter([f["measured_ms"]], [100 * f["M(q,g)"]], marker="D", s=70, color=c, edgecolor="k",
                       label=f"searched + finalists, budget {r['budget_ms']} ms")
    for m, shade in zip(rows[0].get("mobilenetv3_widths") or [rows[0]["mobilenetv3"]], ("0.6", "0.3", "0.0")):
        mean = seed_mean(m, m.get("seeds", []))
        ax.scatter([m["measured_ms"]], [100 * mean["M(q,g)"]], marker="s", color=shade, edgecolor="k",
                   label=f"MobileNetV3-small-{width_of(m['arch'])}" + (f" (mean of {mean['n']} seeds)" if mean["n"] > 1 else ""))
    ax.set_xlabel("measured edge latency, ms (ONNX Runtime CPU, batch 1)")
    ax.set_ylabel("M(q,g) recall@1, %  (test split)")
    # beside the axes, not over them: a legend inside hid the markers in its corner
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from hwnas.utils import save_figure

    save_figure(fig, path)
    plt.close(fig)


def write_markdown(res: dict, name: str, tag: str, query_epochs: int) -> None:
    """The BENCHMARKS.md section (and the budgets plot) from a results file: run at the end
    of every benchmark, and alone with ``--render-only``."""
    lo, hi = res["range_ms"]
    res = copy.deepcopy(res)
    for r in res.get("budgets", []):  # (a file written before the fit is judged by it too)
        fit_baseline(r)

    def measured(part: str) -> str:
        m = res.get("part_measured", {}).get(part)
        same_table = m and [round(v, 4) for v in m["table_range_ms"]] == [round(lo, 4), round(hi, 4)]
        if not m:
            return ""
        note = f" {m['note']}" if m.get("note") else ""  # (--note: a sentence)
        if m["date"] == res["machine"]["date"] and m["cpu"] == res["machine"]["cpu"] and same_table:
            return note
        return (f" Measured {m['date']} on {m['cpu']}"
                + ("." if same_table else f", against a table of range {m['table_range_ms'][0]:.3f}-"
                   f"{m['table_range_ms'][1]:.3f} ms (an earlier search space or table).") + note)

    def retimed(part: str) -> str:  # (--parts measure: its models timed again later, elsewhere or quieter)
        lat = (res.get("part_measured", {}).get(part) or {}).get("latency")
        return (f" Latencies measured again {lat['date']} on {lat['cpu']}: `{lat['command']}`."
                + (f" {lat['note']}" if lat.get("note") else "")) if lat else ""

    runs = ", ".join(f"{p}: `{d}`, search.val_queries {res['part_val_queries'][p]}"
                     for p, d in sorted(res["part_run_dirs"].items()))
    cmds = res.get("part_commands", {})
    md = [f"## Search (issue 5){'' if tag == 'quickstart' else ': ' + tag}", "",
          f"Machine: {machine_line(res['machine'])}. Script: "
          f"`{res.get('script', 'benchmarks/bench_search.py')}` "
          f"({runs}); each part names its latency budget (table range {lo:.3f}-{hi:.3f} ms)."]
    if cmds:  # (results written before part_commands existed name the --set list alone)
        md[-1] += " Each part's last command: " + "; ".join(f"{p}: `{c}`" for p, c in sorted(cmds.items())) + "."
    if "samplers" in res:
        marks = sorted({int(n) for r in res["samplers"] for n in r["best_at"]})
        rw, mt = res.get("search_reward", "r3").upper(), res.get("search_metric", "recall@1")
        at = f" (budget {res['samplers_budget_ms']} ms)" if "samplers_budget_ms" in res else ""
        md += ["", f"Best {rw} reward (validation {mt}) after N evaluated trials{at}.{measured('samplers')}", "",
               "| sampler | " + " | ".join(f"N={n}" for n in marks)
               + " | s / trial | over-budget samples | s / study |",
               "|---|" + "---|" * len(marks) + "---|---|---|"]

        def cell(r, n):  # mean over the sampler's seeds (range), or one study's value
            get = lambda d: d.get(n, d.get(str(n)))  # noqa: E731 (JSON keys are strings)
            v, rng = get(r["best_at"]), get(r.get("best_at_range", {}))
            if v is None:
                return "-"
            return f"{v:.4f}" + (f" ({rng[0]:.4f}-{rng[1]:.4f})" if rng and r.get("seeds", 1) > 1 else "")

        for r in res["samplers"]:
            md.append(f"| {r['sampler']} | " + " | ".join(cell(r, n) for n in marks)
                      + f" | {r['sec_per_trial']:.2f} | {r['infeasible']:.0f} | "
                      + (f"{r['study_seconds']:.0f}" if "study_seconds" in r else "-") + " |")
        seeds = {r.get("seeds", 1) for r in res["samplers"]}
        if seeds != {1}:
            md += ["", f"Each sampler searched {'/'.join(map(str, sorted(seeds)))} studies, one per sampler "
                   "seed: a cell is the mean of their best rewards after N trials (their range); over-budget "
                   "samples are per study (mean). At one seed TPE and NSGA-II start from the same enqueued archs "
                   "(the fastest subnet, the largest uniform one within budget and, at a tight budget, 10 "
                   "random feasible ones), and evolution and random from the same initial feasible draws, "
                   "so within each pair the first columns coincide and measure no sampler."]
            nv = max((r.get("val_queries") or 0) for r in res["samplers"])
            if nv:  # one standard error of a recall near the best rewards, on that many queries
                p = max(max(r["best_at"].values()) for r in res["samplers"])
                md[-1] += (f" The rewards are recall@1 on {nv:,} validation queries, whose one standard "
                           f"error near {p:.2f} is {se_points(p, nv):.1f} points: "
                           "differences between samplers smaller than that are the evaluation's noise "
                           "as much as the samplers'.")
        if any("study_seconds" in r for r in res["samplers"]):
            md += ["", "s / trial: one evaluated trial's evaluation (median). s / study: the study's "
                   "trials' own seconds (asking the sampler, the predictor, storage writes and the "
                   "evaluations; not pauses between runs, nor a trial a killed run left), mean over its "
                   "studies; it and the over-budget samples count to each study's last counted trial "
                   "(all of a study that stopped short). A sampler that proposes over-budget archs "
                   "pays for them there: each is a trial the sampler's next proposal reads."]
        md += ["", f"![samplers](benchmarks/results/{name}_samplers.png)"]
    if "rewards" in res:
        seeded = any(r.get("seeds") for r in res["rewards"])
        at = f" at {res['rewards_budget_ms']} ms" if "rewards_budget_ms" in res else ""
        md += ["", f"Reward ablation ({'the choice' if 'rewards_sampler' in res else 'best arch'} of a "
               f"50-trial {res.get('rewards_sampler', 'TPE')} search{at}, "
               "then train-query, test split"
               + (", each arch trained at the budgets' training seeds: mean, then each seed" if seeded else "")
               + f").{measured('rewards')}", "",
               "| reward | MFLOPs | predicted ms | M(q,g) R@1 | M(q,q) R@1 |", "|---|---|---|---|---|"]

        def by_seed(r, m):
            v = [r[m]] + [x[m] for x in r.get("seeds", [])]
            return f"{100 * statistics.mean(v):.2f}" + (
                f" ({' / '.join(f'{100 * x:.2f}' for x in v)})" if len(v) > 1 else "")

        for r in res["rewards"]:
            md.append(f"| {r['reward'].upper()} | {r['mflops']:.2f} | {r['predicted_ms']:.3f} | "
                      f"{by_seed(r, 'M(q,g)')} | {by_seed(r, 'M(q,q)')} |")
        same = {}
        for r in res["rewards"]:
            same.setdefault(r.get("canonical"), []).append(r["reward"].upper())
        same = [v for k, v in same.items() if k and len(v) > 1]
        if same:
            md += ["", "; ".join(" and ".join(v) for v in same) + " chose one network: their rows differ "
                   "by training noise alone."]
    if "budgets" in res and all("random_median_measured_ms" in r for r in res["budgets"]):
        ks = {len(r["random"]) for r in res["budgets"]}
        k = f"{ks.pop()}" if len(ks) == 1 else "the"
        nq = res["budgets"][0]["searched"].get("test_queries", 2000)
        p = res["budgets"][0]["searched"]["M(q,g)"]
        se = se_points(p, nq)
        where = res.get("budgets_trained_on")
        md += ["", f"Searched vs the median of {k} random feasible archs (same training"
               + (f"; models trained on {machine_line(where)}, latency measured on the machine above"
                  if where and where.get("gpu") else "") + "):", "",
               f"Budgets are fractions {res.get('budget_fracs', [0.15, 0.3, 0.6])} of the range of the table that run searched "
               f"with ({res.get('budgets_table_range_ms', [lo, hi])[0]:.3f}-"
               f"{res.get('budgets_table_range_ms', [lo, hi])[1]:.3f} ms predicted); the test split has "
               f"{nq:,} queries (one standard error of recall@1 is about {se:.1f} points).{retimed('budgets')}", ""]
        if res.get("budgets_finished_only"):
            def progress(r):
                seeds = f", searched arch's seeds {1 + len(r.get('searched_seeds', []))}/{r['seeds_planned']}" \
                    if r.get("seeds_planned") else ""
                return f"{r['budget_ms']} ms: random archs {len(r['random'])}/{r.get('random_planned')}{seeds}"

            md += ["Still in progress: the models finished so far (`--finished-only`), by budget: "
                   + "; ".join([progress(r) for r in res["budgets"]]
                               + [f"{r['budget_ms']} ms: not reported ({r['why']})"
                                  for r in res.get("budgets_not_reported", [])]) + ".", ""]
        carried = res.get("budgets_carried", {})
        if carried.get("models"):
            n, adopted = len(carried["models"]), len(carried.get("adopted", []))
            why = (carried.get("unstamped") or {}).get("why")
            md += [f"{n} of these models were not trained in this run directory but taken from the results "
                   "file an earlier one wrote, made against the same gallery and supernet weights, splits and "
                   "query recipe (digest " + carried["weights_digest"] + ")"
                   + (f"; {adopted} of them predate the digest and were taken because this run's supernet gives "
                      "the archs they recorded the same search scores" + (f" ({why})" if why else "")
                      if adopted else "") + ". Their latency is measured again with the others.", ""]
        md += [
               "| budget ms (pred.) | searched M(q,g) | searched M(q,q) | searched meas. ms | random median M(q,g) "
               "| random median M(q,q) | random median meas. ms | random M(q,g) SD (range) "
               "| random archs reached (>=) on M(q,g) / M(q,q) | MobileNetV3-small within budget: width, "
               "M(q,g) / M(q,q) / meas. ms |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["budgets"]:
            s, m = r["searched"], r["mobilenetv3"]
            qg = [x["M(q,g)"] for x in r["random"]]
            md.append(f"| {r['budget_ms']} | {100 * s['M(q,g)']:.2f} | {100 * s['M(q,q)']:.2f} | "
                      f"{s['measured_ms']:.3f} | {100 * r['random_median_M(q,g)']:.2f} | "
                      f"{100 * r['random_median_M(q,q)']:.2f} | {r['random_median_measured_ms']:.3f} | "
                      f"{100 * statistics.stdev(qg):.2f} ({100 * min(qg):.2f}-{100 * max(qg):.2f}) | "
                      f"{_beaten(s, r)} | {_baseline_cell(m)} |")
        verdict = []
        for r in res["budgets"]:
            verdict.append(f"{r['budget_ms']} ms: " + _target(r["searched"], r))
        if not any(noise_components(r) for r in res["budgets"]):  # else the noise table below says more
            md += ["", "Where the random archs' SD is near the test split's standard error, architecture barely "
                   "moves M(q,g) within that budget and no search can beat the median by more than noise."]
        from hwnas.report import PARETO_LATENCY_TOL

        md += ["", "Target (searched >= the random median and >= MobileNetV3-small at equal or lower measured "
               f"latency; measured latencies within {100 * PARETO_LATENCY_TOL:g}% count as equal, as in the "
               "headline's Pareto comparison): " + " · ".join(verdict) + "."]
        seeded = [r for r in res["budgets"] if r.get("searched_seeds")]
        if seeded:
            n = 1 + len(seeded[0]["searched_seeds"])
            md += ["", f"The searched arch trained at {n} training seeds (the run's seed {seeded[0]['searched'].get('seed', 0)} "
                   "first; the seed sets batch order and augmentation, the weights start from the supernet's): "
                   "one training is one draw of training noise, so the target is judged on the seeds' mean, and "
                   "the seeds' spread against the random archs' tells how much of the latter is training noise "
                   "rather than architecture. The latency is the arch's, measured above.", "",
                   "| budget ms (pred.) | M(q,g) by seed | mean | SD | M(q,q) by seed | mean | random median "
                   "M(q,g) / M(q,q) | random M(q,g) SD | target on the mean |", "|---|---|---|---|---|---|---|---|---|"]
            for r in seeded:
                runs_ = [r["searched"], *r["searched_seeds"]]
                qg, qq = [x["M(q,g)"] for x in runs_], [x["M(q,q)"] for x in runs_]
                mean = seed_mean(r["searched"], r["searched_seeds"])
                md.append(f"| {r['budget_ms']} | {' / '.join(f'{100 * v:.2f}' for v in qg)} | {100 * mean['M(q,g)']:.2f} | "
                          f"{100 * statistics.stdev(qg):.2f} | {' / '.join(f'{100 * v:.2f}' for v in qq)} | "
                          f"{100 * mean['M(q,q)']:.2f} | {100 * r['random_median_M(q,g)']:.2f} / "
                          f"{100 * r['random_median_M(q,q)']:.2f} | "
                          f"{100 * statistics.stdev(x['M(q,g)'] for x in r['random']):.2f} | "
                          f"{_target(mean, r)} |")
        comps = [(r, noise_components(r)) for r in res["budgets"]]
        comps = [(r, c) for r, c in comps if c]
        if comps:
            md += ["", "Training noise against architecture, per budget: the M(q,g) SD of one arch trained at "
                   "several seeds (pooled over the budget's archs trained more than once — the search's and "
                   "the finalists' picks, taken to be as noisy as any arch; df: degrees of freedom), the "
                   "random archs' SD, and what the latter adds beyond training noise (the square root of the "
                   "variances' difference, 0 where it is negative):", "",
                   "| budget ms (pred.) | one arch's SD over seeds (df) | random archs' SD | architecture's own SD "
                   "(estimate) |", "|---|---|---|---|"]
            for r, c in comps:
                md.append(f"| {r['budget_ms']} | {100 * c['within_sd']:.2f} ({c['within_df']}) | "
                          f"{100 * c['random_sd']:.2f} | {100 * c['arch_sd']:.2f} |")
            flat = [str(r["budget_ms"]) for r, c in comps if c["arch_sd"] < c["within_sd"]]
            dfs_lo, dfs_hi = min(c["within_df"] for _, c in comps), max(c["within_df"] for _, c in comps)
            dfs = str(dfs_lo) if dfs_lo == dfs_hi else f"{dfs_lo}-{dfs_hi}"
            if flat:
                md += ["", f"At {', '.join(flat)} ms architecture adds less spread than one arch's "
                       "training noise: there the budget's archs are near equals on M(q,g) at this training "
                       "length, and which of them lands above the median is mostly the draw of training. "
                       f"Estimates from {dfs} degrees of freedom and {min(len(r['random']) for r, _ in comps)} "
                       f"random archs are rough: an SD from {dfs_lo} df is uncertain by about "
                       f"{100 / (2 * dfs_lo) ** 0.5:.0f}% (1 / sqrt(2 df))."]
        ruled = [r for r in res["budgets"] if "measured_ms" in r.get("best_reward", {})]
        if ruled or any("searched_seeds" in r for r in res["budgets"]):
            same = [str(r["budget_ms"]) for r in res["budgets"] if "best_reward" not in r]
            md += ["", "The search's choice (`search.prefer_faster_within: se`, the default: the fastest arch whose "
                   "reward is within one standard error of the best reward on the validation queries) against the "
                   "best reward's arch, each the mean over its training seeds"
                   + (f"; at {', '.join(same)} ms they are the same arch" if same else "") + ":"]
            if ruled:
                md += ["", "| budget ms (pred.) | band (reward) | chosen: pred. / meas. ms | chosen M(q,g) / M(q,q) "
                       "| best reward's: pred. / meas. ms | best reward's M(q,g) / M(q,q) | best reward's target on the mean |",
                       "|---|---|---|---|---|---|---|"]
                for r in ruled:
                    c, b = r["searched"], r["best_reward"]
                    cm, bm = seed_mean(c, r.get("searched_seeds", [])), seed_mean(b, b.get("seeds", []))
                    md.append(f"| {r['budget_ms']} | {b['band']:.4f} | {c['predicted_ms']:.4f} / {c['measured_ms']:.3f} | "
                              f"{100 * cm['M(q,g)']:.2f} / {100 * cm['M(q,q)']:.2f} | "
                              f"{b['predicted_ms']:.4f} / {b['measured_ms']:.3f} | "
                              f"{100 * bm['M(q,g)']:.2f} / {100 * bm['M(q,q)']:.2f} | "
                              f"{_target(bm, r)} |")
        fins = [r for r in res["budgets"] if "measured_ms" in r.get("finalists", {})]
        if fins:
            f0 = fins[0]["finalists"]
            k0 = len(f0["finalists"])
            fseeded = any(r["finalists"].get("seeds") for r in fins)
            md += ["", f"The search's choice made by training (`query.finalists: {k0}`: its {k0} best archs "
                   f"by score each train {f0['epochs']} of {f0['of_epochs']} epochs, the lowest training loss "
                   "finishes), against the same random archs"
                   + (": its own training, then the mean over the training seeds (its own, or where the "
                      "choice is the searched or the best reward's arch, that arch's other seeds), on which "
                      "the target is judged" if fseeded else "")
                   + ":", "",
                   "| budget ms (pred.) | chosen: search rank | M(q,g) | M(q,q) | "
                   + ("M(q,g) / M(q,q), mean of seeds (trainings) | " if fseeded else "")
                   + "meas. ms | random archs reached (>=) on M(q,g) / M(q,q)"
                   + (" (own training)" if fseeded else "") + " | target |",
                   "|---|---|---|---|---|---|---|" + ("---|" if fseeded else "")]
            for r in fins:
                f = r["finalists"]
                mean = seed_mean(f, f.get("seeds", []))
                same = " (the searched arch)" if f["chosen"] == r["searched"]["arch"] else ""
                md.append(f"| {r['budget_ms']} | {f['chosen_rank']}{same} | {100 * f['M(q,g)']:.2f} | {100 * f['M(q,q)']:.2f} | "
                          + (f"{100 * mean['M(q,g)']:.2f} / {100 * mean['M(q,q)']:.2f} ({mean['n']}) | " if fseeded else "")
                          + f"{f['measured_ms']:.3f} | {_beaten(f, r)} | "
                          f"{_target(mean, r)} |")
            itself = [r for r in fins if r["finalists"]["chosen"] == r["searched"]["arch"]]
            apart = [str(r["budget_ms"]) for r in itself
                     if any(r["finalists"][k] != r["searched"][k] for k in ("M(q,g)", "M(q,q)"))]
            if itself:
                md += ["", "Where the choice is the searched arch itself, its own training is that arch's again "
                       "from the same seed" + (f"; at {', '.join(apart)} ms the two trainings diverged, so "
                                               "there the rows differ by a draw of training noise" if apart else
                                               ": the same figures") + "."]
        picked = [(r, p, x) for r in res["budgets"] for p, x in r.get("picks", {}).items() if "measured_ms" in x]
        if picked:
            md += ["", "Other rules' picks from the same search's band (`--also-pick`; `search.pick_in_band`: "
                   "most-flops takes the arch of the band with the most FLOPs instead of the fastest), "
                   "each trained at the same seeds and judged on their mean against the same random archs:", "",
                   "| budget ms (pred.) | pick | MFLOPs (random median) | pred. / meas. ms | M(q,g) by seed | "
                   "mean | M(q,q) mean | random median M(q,g) / M(q,q) | target on the mean |",
                   "|---|---|---|---|---|---|---|---|---|"]
            for r, p, x in picked:
                m = seed_mean(x, x.get("seeds", []))
                same = f" (the {x['same_as']} arch)" if x.get("same_as") else ""
                rmf = statistics.median(y["mflops"] for y in r["random"])
                md.append(f"| {r['budget_ms']} | {p}{same} | {x['mflops']:.2f} ({rmf:.2f}) | "
                          f"{x['predicted_ms']:.4f} / {x['measured_ms']:.3f} | "
                          + " / ".join(f"{100 * y['M(q,g)']:.2f}" for y in [x, *x.get("seeds", [])])
                          + f" | {100 * m['M(q,g)']:.2f} | {100 * m['M(q,q)']:.2f} | "
                          f"{100 * r['random_median_M(q,g)']:.2f} / {100 * r['random_median_M(q,q)']:.2f} | "
                          f"{_target(m, r)} |")
        md += _baselines_md(res["budgets"])
        md += ["", f"![budgets](benchmarks/results/{name}_budgets.png)"]
        plot_budgets(res["budgets"], ROOT / "benchmarks" / "results" / f"{name}_budgets.png")
        pf = res.get("proxy_fidelity")
        if pf:
            md += ["", f"How well the search's score ranks the {pf['n']} trained subnets above (the supernet "
                   "subnet's R3 reward on the validation split vs the trained model on the test split):", "",
                   "| validation protocol | validation queries | Kendall tau vs test M(q,g) | Spearman vs test "
                   "M(q,g) | Kendall tau vs test R3 | Spearman vs test R3 |", "|---|---|---|---|---|---|"]
            for proto, what in (("all", "leave-one-out over the split (default)"),
                                ("split", "the split's query part vs its gallery part")):
                f = pf[proto]
                md.append(f"| {what} | {f['n_val_queries']} | {f['kendall_M(q,g)']:.3f} | "
                          f"{f['spearman_M(q,g)']:.3f} | {f['kendall_r3']:.3f} | {f['spearman_r3']:.3f} |")
    sf = res.get("selection_fidelity")
    if sf:
        e, k = sf[0]["epochs"], sf[0]["k"]
        md += ["", f"Picking among archs of one budget without training them to the end: the search's score vs "
               f"a model's own training loss after {e} of its {query_epochs} epochs "
               f"(`query.finalists` compares the latter). Kendall tau against test M(q,g) (loss negated), "
               f"and over 4,000 seeded draws of {k} of the budget's trained subnets, how often the one each "
               f"signal picks reaches the median test M(q,g) of those subnets (the searched and the random "
               f"ones; M(q,q) too), and its mean M(q,g) "
               f"gain over the draw's average:", "",
               "| budget ms (pred.) | subnets | tau: search score | tau: training loss | search score picks >= median "
               "M(q,g) (both) | training loss picks >= median M(q,g) (both) | mean gain, points: score / loss |",
               "|---|---|---|---|---|---|---|"]
        for r in sf:
            md.append(f"| {r['budget_ms']} | {r['n']} | {r['kendall_search_score']:.2f} | {r['kendall_train_loss']:.2f} | "
                      f"{100 * r['p_median_qg_search_score']:.0f}% ({100 * r['p_median_both_search_score']:.0f}%) | "
                      f"{100 * r['p_median_qg_train_loss']:.0f}% ({100 * r['p_median_both_train_loss']:.0f}%) | "
                      f"{100 * r['gain_qg_search_score']:+.2f} / {100 * r['gain_qg_train_loss']:+.2f} |")
    if "cost" in res:
        md += ["", "Cost of one evaluated trial (BN recalibration + embedding + both accuracies) by "
               f"validation-set size (median of 5 random archs).{measured('cost')}", "",
               "| validation set | queries | gallery | s / trial |", "|---|---|---|---|"]
        for r in res["cost"]:
            md.append(f"| {r['kind']} | {r['val_queries']} | {r['val_gallery']} | {r['sec_per_trial']:.2f} |")
    update_benchmarks_md(name.replace("_", "-"), "\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "quickstart"))
    ap.add_argument("--parts", nargs="+", default=["samplers", "rewards", "budgets", "cost"])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--random-archs", type=int, default=20)
    ap.add_argument("--samplers-budget-frac", type=float, default=None,
                    help="samplers part: budget as a fraction of the table's range (default: the config's)")
    ap.add_argument("--jobs", type=int, default=1, help="train-query processes in parallel")
    ap.add_argument("--cpu-jobs", type=int, default=0,
                    help="extra train-query processes on the CPU beside --jobs GPU ones (GPU machines)")
    ap.add_argument("--measure-later", action="store_true",
                    help="budgets: skip the latency measurement (run --parts measure on the target)")
    ap.add_argument("--finished-only", action="store_true",
                    help="budgets: train nothing; measure and report the models a stopped run has "
                         "finished (each budget with its searched model and the random archs done so "
                         "far, shown as done/planned), so a run spanning days has figures on the way")
    ap.add_argument("--finalists", type=int, default=5,
                    help="budgets: also train each budget's choice by query.finalists=K (0: not)")
    ap.add_argument("--searched-seeds", type=int, default=3,
                    help="train each budget's searched arch at this many training seeds (the run's and "
                         "the next ones): the target is judged on their mean, and their spread shows how "
                         "much of the random archs' spread is training noise")
    ap.add_argument("--baseline-seeds", type=int, default=1,
                    help="budgets: train each MobileNetV3-small width at this many training seeds "
                         "(its mean is the rival the target is judged against)")
    ap.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "evolution", "random"])
    ap.add_argument("--sampler-seeds", type=int, default=3,
                    help="samplers part: studies per sampler, each with its own sampler seed (the "
                         "table gives their mean and range)")
    ap.add_argument("--budget-fracs", nargs="+", type=float, default=[0.15, 0.3, 0.6],
                    help="budgets as fractions of the table's latency range")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, as `hwnas --set`; e.g. latency.table=PATH keeps a "
                         "benchmark resumed on another CPU on the table (so the budgets and random "
                         "archs) it started with")
    ap.add_argument("--also-pick", nargs="*", default=[], choices=["most-flops"],
                    help="budgets: also train, at --searched-seeds seeds, the arch each of these "
                         "search.pick_in_band rules takes from the same search's band (no new search)")
    ap.add_argument("--adopt-unstamped", action="store_true",
                    help="budgets: also carry over the results file's models that predate its "
                         "weights digest, where this run's supernet gives every arch they recorded "
                         "the same search score (a run directory trained again to the same weights)")
    ap.add_argument("--note", help="a sentence on how this run's parts were measured (e.g. beside "
                    "another job), shown with each of them in BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the BENCHMARKS.md section (and the budgets plot) from the results "
                         "file, running nothing")
    args = ap.parse_args()
    for flag in ("sampler_seeds", "searched_seeds", "baseline_seeds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be 1 or more")

    from hwnas.cli import apply_sets
    from hwnas.config import load_config
    from hwnas.pipeline import run_budget
    from hwnas.search.runner import _evaluated, plot_progress, predictor_for, run_search

    base = load_config(args.config)
    base.run_dir = args.run_dir
    apply_sets(base, args.set)
    tag = Path(args.config).stem  # results per config: search.json (quickstart), search_omniglot.json
    name = "search" if tag == "quickstart" else f"search_{tag}"
    if args.render_only:
        import json

        write_markdown(json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text()),
                       name, tag, base.train_config("query").epochs)
        return
    space = base.search_space()
    pred, _ = predictor_for(base, space)
    lo, hi = pred.range()
    budget = run_budget(base, pred)["budget_ms"]
    res: dict = {"machine": machine(), "run_dir": args.run_dir, "budget_ms": budget, "range_ms": [lo, hi]}
    out = ROOT / "benchmarks" / "results"
    quiet = lambda *_: None  # noqa: E731

    def search(seed=None, **kw):
        cfg = copy.deepcopy(base)
        for k, v in kw.items():
            setattr(cfg.search, k, v)
        cfg.search.storage = f"sqlite:///{Path(args.run_dir).resolve() / 'bench_search.db'}"
        # its outputs beside its study, not over the run's own search (best_arch.json, which
        # train-query --from-search and the report read)
        return cfg, run_search(cfg, log=quiet, seed=seed, out=Path(args.run_dir) / "bench_search" / kw["study_name"])

    def band_pick(found, pick):
        """The arch search.pick_in_band ``pick`` takes from a finished search's band (its study
        as it stands: the same trials, another rule)."""
        import optuna

        from hwnas.search.runner import choose

        st = optuna.load_study(study_name=found["study"], storage=found["storage"])
        s = copy.deepcopy(base.search)
        s.pick_in_band = pick
        return choose(_evaluated(st), s, found["chosen_within"].get("n_val_queries"))[0].user_attrs["arch"]

    if "samplers" in args.parts:
        import optuna

        curves, rows = {}, []
        sb = budget if args.samplers_budget_frac is None else round(lo + args.samplers_budget_frac * (hi - lo), 4)
        res["samplers_budget_ms"] = sb
        for sampler in args.samplers:
            runs, secs, over, spent = [], [], [], []
            for k in range(args.sampler_seeds):  # one study per sampler seed: a sampler's luck is not its merit
                cfg, r = search(budget_ms=sb, sampler=sampler, n_trials=args.trials, seed=k,
                                study_name=f"bench-sampler-{sampler}-{sb:g}ms-seed{k}")
                st = optuna.load_study(study_name=r["study"], storage=cfg.search.storage)
                # each distinct arch once (a repeat of an evaluated arch takes its result, free),
                # finished trials only, the first --trials (a study kept from a longer run has more)
                feas = sorted(_evaluated(st), key=lambda t: t.number)[:args.trials]
                runs.append([t.user_attrs["reward"] for t in feas])
                secs += [t.user_attrs["eval_seconds"] for t in feas]
                # to the last counted trial where the study reached --trials (one kept from a
                # longer run has more); all of it where it stopped short (gave up, or converged)
                upto = st.trials if len(feas) < args.trials else [t for t in st.trials if t.number <= feas[-1].number]
                over.append(sum(1 for t in upto if t.user_attrs.get("feasible") is False))
                # each finished trial's own time (asking the sampler, the predictor, the
                # evaluation), not the pauses between runs of a resumed study: a trial a killed
                # run left is failed when the next run starts, so its span is the pause
                spent.append(sum((t.datetime_complete - t.datetime_start).total_seconds() for t in upto
                                 if t.state == optuna.trial.TrialState.COMPLETE))
                nval = next((t.user_attrs.get("n_val_queries") for t in feas if t.user_attrs.get("n_val_queries")), None)
            curves[sampler] = runs
            n_all = min(len(v) for v in runs)  # the trial counts every seed reached
            marks = sorted({n for n in (10, 25, 50, 100, 200) if n <= n_all} | {n_all})
            best = {n: [max(v[:n]) for v in runs] for n in marks}
            rows.append({"sampler": sampler, "seeds": len(runs), "val_queries": nval,
                         "best_at": {n: statistics.mean(b) for n, b in best.items()},
                         "best_at_range": {n: [min(b), max(b)] for n, b in best.items()},
                         "sec_per_trial": statistics.median(secs),
                         "infeasible": statistics.mean(over), "study_seconds": statistics.mean(spent)})
            print(rows[-1], flush=True)
        plot_progress(curves, out / f"{name}_samplers.png", title=f"budget {sb} ms, R3, recall@1")
        res["samplers"] = rows

    pool: list = []  # the worker pool, made on first use and kept: trainings overlap the searches
    running: list = []  # the trainings handed to it (futures)

    def start_training(jobs, on_done=None):
        """Start train-query of [(name, kwargs)]; returns a function that waits for them and
        returns {name: row}, calling ``on_done(name, row)`` as each finishes. With
        --jobs/--cpu-jobs they train in worker processes while this process goes on
        (searching, scoring)."""
        workers = args.jobs + args.cpu_jobs
        on_done = on_done or (lambda n, r: None)
        if workers <= 1:
            def one(n, kw):
                r = _train_eval(base, args.run_dir, n, kw)
                on_done(n, r)
                return r
            return lambda: {n: one(n, kw) for n, kw in tqdm(jobs, desc="train-query")}
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if not pool:
            ctx = mp.get_context("spawn")
            init = (_init_worker, (ctx.Value("i", 0), args.jobs, args.cpu_jobs)) if args.cpu_jobs else (None, ())
            pool.append(ProcessPoolExecutor(workers, mp_context=ctx, initializer=init[0], initargs=init[1]))
        futs = {pool[0].submit(_train_eval, base, args.run_dir, n, kw): n for n, kw in jobs}
        running.extend(futs)

        def wait():
            done = {}
            for f in tqdm(as_completed(futs), total=len(futs), desc="train-query", unit="model"):
                done[futs[f]] = f.result()
                on_done(futs[f], done[futs[f]])
            return done
        return wait

    def train_many(jobs):
        done = start_training(jobs)()
        return [done[n] for n, _ in jobs]

    def seed_jobs(name, kw, n=None):
        """``name`` at the run's training seed, then at the ``n`` (default --searched-seeds) - 1
        next ones (``<name>-seed<k>``): one training is one draw of training noise."""
        n = args.searched_seeds if n is None else n
        return [(name, kw)] + [(f"{name}-seed{k}", {**kw, "seed": base.seed + k}) for k in range(1, n)]

    def proxy_scores(archs):
        """The search's score of each arch (its supernet subnet's R3 reward on the validation
        split) under each validation protocol: {arch: {"all": r, "split": r}}.
        Scores are kept in the run dir per supernet fingerprint and reward, so a resumed
        benchmark does not spend minutes scoring the same archs again."""
        import json

        from hwnas.config import VAL_QUERIES
        from hwnas.search.runner import SupernetEvaluator, search_reward
        from hwnas.utils import atomic_write_text, read_json

        fp = read_json(Path(args.run_dir) / "supernet" / "config.json")["fingerprint"]
        key = f"{fp}:{base.search.metric}:{base.search.reward}:{base.search.alpha}"
        cache_path = Path(args.run_dir) / "bench_proxy_scores.json"
        cache = read_json(cache_path) if cache_path.exists() else {}
        kept = cache.get(key, {})
        out = {a: {} for a in archs}
        import torch

        threads = torch.get_num_threads()
        if args.cpu_jobs and any(not f.done() for f in running):
            # trainings run on the CPU meanwhile, the cores shared out among them: more
            # intra-op threads here oversubscribe the cores, and OpenMP's barrier waits turn
            # each preempted thread into a stall (beside a 2-thread scorer an Omniglot
            # training ran at 10 images/s instead of ~450)
            torch.set_num_threads(1)
        try:
            for proto in VAL_QUERIES:
                cfg = copy.deepcopy(base)
                cfg.search.val_queries = proto
                ev = None
                for a in tqdm(archs, desc=f"proxy ({proto})"):
                    if proto not in kept.get(a, {}):
                        ev = ev or SupernetEvaluator(cfg, log=quiet)
                        kept.setdefault(a, {})[proto] = search_reward(ev(space.parse(a)), cfg.search)
                        kept[f"n_val_queries_{proto}"] = len(ev.vq.images)
                        atomic_write_text(cache_path, json.dumps({**cache, key: kept}))
                    out[a][proto] = kept[a][proto]
                out[f"n_val_queries_{proto}"] = kept[f"n_val_queries_{proto}"]
        finally:
            torch.set_num_threads(threads)
        return out

    def proxy_fidelity(rows, scores):
        """How well the search's score ranks the archs as trained: Kendall tau and Spearman
        against their test M(q,g) and R3, over all trained subnets."""
        from scipy.stats import kendalltau, spearmanr

        from hwnas.config import VAL_QUERIES
        from hwnas.search.runner import reward

        subnets = [r for r in rows if r["kind"] == "subnet"]
        out = {"n": len(subnets)}
        test_qg = [r["M(q,g)"] for r in subnets]
        test_r3 = [reward(r["M(q,q)"], r["M(q,g)"], base.search.reward, base.search.alpha) for r in subnets]
        for proto in VAL_QUERIES:
            proxy = [scores[r["arch"]][proto] for r in subnets]
            for r, p in zip(subnets, proxy):
                r[f"proxy_{proto}"] = p
            out[proto] = {"kendall_M(q,g)": float(kendalltau(proxy, test_qg)[0]),
                          "spearman_M(q,g)": float(spearmanr(proxy, test_qg)[0]),
                          "kendall_r3": float(kendalltau(proxy, test_r3)[0]), "spearman_r3": float(spearmanr(proxy, test_r3)[0]),
                          "n_val_queries": scores[f"n_val_queries_{proto}"]}
            print(proto, out[proto], flush=True)
        return out

    def measure_budgets(budget_rows):
        """End-to-end edge latency of every model of every budget (ORT CPU, batch 1), all in
        one interleaved measurement (``measure_models``: the median of 5 pools and of 5
        sessions per model), so that the machine's drift over minutes cannot rank one budget's
        models against another's; each model rebuilt from its architecture (weights do not
        change what a runtime computes)."""
        from hwnas.latency.backends import OrtCpuBackend, measure_models
        from hwnas.nn.models import build_query

        widths = budget_rows[0].get("mobilenetv3_widths") or [budget_rows[0]["mobilenetv3"]]
        rows = widths + [x for r in budget_rows for x in (
            r["searched"], *r["random"], *([r["finalists"]] if "finalists" in r else []),
            *([r["best_reward"]] if "best_reward" in r else []), *r.get("picks", {}).values())]
        pre = base.preprocess()
        shape = (1, pre.channels, pre.size, pre.size)
        backend = OrtCpuBackend(threads=base.latency.threads)
        runners = [backend.prepare_sessions(build_query(
            {"kind": r.get("kind", "subnet"), "space": space.to_dict(), "arch": r["arch"], "timm": r["arch"],
             "embed_dim": space.embed_dim, "preprocess": pre.to_dict()}).eval(), shape)
            for r in tqdm(rows, desc="export")]
        for r, m in zip(rows, measure_models(runners)):
            r["measured_ms"], r["measured_pools_ms"] = m.latency_ms, m.pools_ms
        timed = {w["name"]: {k: w[k] for k in ("measured_ms", "measured_pools_ms")} for w in widths}
        for r in budget_rows:  # each budget's copies of the widths, then its rival among them
            for w in r.get("mobilenetv3_widths") or [r["mobilenetv3"]]:
                w.update(timed[w["name"]])
            fit_baseline(r)
            summarize_budget(r)

    def summarize_budget(row):
        rand = row["random"]
        row["random_median_M(q,g)"] = statistics.median(x["M(q,g)"] for x in rand)
        row["random_median_M(q,q)"] = statistics.median(x["M(q,q)"] for x in rand)
        if all("measured_ms" in x for x in [row["searched"], *rand]):
            row["random_median_measured_ms"] = statistics.median(x["measured_ms"] for x in rand)

    if "rewards" in args.parts:
        found = {}
        for reward in ("r1", "r2", "r3"):
            _, found[reward] = search(budget_ms=budget, reward=reward, n_trials=50, seed=base.seed,
                                      study_name=f"bench-reward-{reward}")
        # each reward's arch at the budgets' training seeds
        jobs = {rw: seed_jobs(f"bench-reward-{rw}", {"arch": r["arch"]}) for rw, r in found.items()}
        flat = [j for js in jobs.values() for j in js]
        done = dict(zip([n for n, _ in flat], train_many(flat)))
        rows = []
        res["rewards_sampler"], res["rewards_budget_ms"] = base.search.sampler, budget
        for reward, r in found.items():
            row, seeds = done[jobs[reward][0][0]], [done[n] for n, _ in jobs[reward][1:]]
            row.update(reward=reward, predicted_ms=r["predicted_ms"], search_reward=r["reward"],
                       canonical=space.network(r["arch"]).to_string(space))
            if seeds:
                row["seeds"] = [{k: x[k] for k in ("M(q,g)", "M(q,q)", "seed")} for x in seeds]
            rows.append(row)
            print(row, flush=True)
        res["rewards"] = rows

    if "budgets" in args.parts:
        # the searches first (a minute each), then every model trains budget by budget — the
        # searched arch and the finalists' choice, then its random ones — so that a run stopped
        # part way (it resumes: finished models are kept) has whole budgets done; the search's
        # scores of every arch are computed while they train
        plan = []
        for frac in args.budget_fracs:
            b = round(lo + frac * (hi - lo), 4)
            rng = random.Random(100 + int(frac * 100))
            plan.append((frac, b, [pred.sample_feasible(b, rng).to_string(space) for _ in range(args.random_archs)]))
        found = {frac: search(budget_ms=b, n_trials=50, seed=base.seed, study_name=f"bench-budget-{frac}")[1]
                 for frac, b, _ in plan}
        picks = {frac: {p: band_pick(found[frac], p) for p in args.also_pick} for frac, _, _ in plan}

        def pick_source(frac, arch, trained):
            """The kind trained (or planned) at ``frac`` that is ``arch``'s network (None: train it)."""
            return finalists_seed_source(space, frac, arch, (("searched", _best_reward(found[frac])[0]),
                                                             ("chosen", found[frac]["arch"])), trained)

        jobs = [j for w in MBV3_WIDTHS for j in seed_jobs(f"bench-{w}", {"timm_name": w}, args.baseline_seeds)]
        for frac, _, rand in plan:
            # the best reward's arch, and the search's choice (search.prefer_faster_within) where
            # that is another: each at --searched-seeds training seeds
            best = _best_reward(found[frac])[0]
            for kind, a in (("searched", best), ("chosen", found[frac]["arch"])):
                if kind == "chosen" and space.network(a) == space.network(best):
                    continue
                jobs += seed_jobs(f"bench-budget-{frac}-{kind}", {"arch": a})
            if args.finalists > 1:  # the pipeline's choice, next to the search's best
                jobs.append((f"bench-budget-{frac}-finalists", {"finalists": args.finalists, "finalists_from": str(
                    Path(args.run_dir) / "bench_search" / f"bench-budget-{frac}")}))
            for pick, a in picks[frac].items():  # another rule's arch of the same band, unless one above
                if pick_source(frac, a, {n for n, _ in jobs}) is None:
                    jobs += seed_jobs(f"bench-budget-{frac}-pick-{pick}", {"arch": a})
            jobs += [(f"bench-budget-{frac}-random{i}", {"arch": a}) for i, a in enumerate(rand)]
        from hwnas.compat.api import _prepare_out
        from hwnas.errors import SpaceError

        def in_run_dir(name):
            return bool(_prepare_out(Path(args.run_dir) / "query" / name, restart=False))

        def evaluate_finished(jobs):
            """--finished-only: of ``jobs``, the models a stopped run finished, evaluated here in turn."""
            jobs = [j for j in jobs if in_run_dir(j[0])]
            return {n: _train_eval(base, args.run_dir, n, kw) for n, kw in tqdm(jobs, desc="evaluate finished")}

        # models an earlier results file reported, made against the same weights and recipe,
        # are taken from it where this run directory lacks them (one lost with its machine)
        import json

        prev_path = ROOT / "benchmarks" / "results" / f"{name}.json"
        old_res = json.loads(prev_path.read_text()) if prev_path.exists() else {}
        digest = weights_digest(base, args.run_dir)
        prev = result_rows(old_res.get("budgets", []), old_res.get("budgets_unreported_models", []),
                           [x for x in old_res.get("budgets_in_progress", []) if x.get("weights_digest") == digest])

        def keep(n, r):
            """Each model into the results file as it finishes (see keep_in_progress)."""
            keep_in_progress(prev_path, {**r, "weights_digest": digest})
        fin_search = {str(Path(args.run_dir) / "bench_search" / f"bench-budget-{frac}"): found[frac]["arch"]
                      for frac, _, _ in plan}

        def same(row, kw):
            return same_model(row, kw, space, base.seed, base.train_config("query").epochs,
                              base.query.finalist_epochs, fin_search)

        unstamped = None
        if args.adopt_unstamped and any("weights_digest" not in x for x in prev.values()):
            # the scores prove the weights; the recipe's settings given on the command line
            # must be those the old file was made with (the config file's are the run's)
            old_sets = old_res.get("script", "").split(" --set ")[1:]
            old_sets = [x.removesuffix(" --finished-only") for x in old_sets]
            if sorted(old_sets) != sorted(args.set):
                ok, why = False, f"its --set options {old_sets} are not this run's {args.set}"
            else:
                archs = set()
                for x in prev.values():
                    try:
                        if "proxy_all" in x:
                            space.parse(x["arch"])  # (an arch of another space is not scored)
                            archs.add(x["arch"])
                    except SpaceError:
                        pass
                ok, why = unstamped_scores_agree(prev, proxy_scores(sorted(archs)))
            unstamped = {"adopted": ok, "why": why}
            print(f"--adopt-unstamped: {'adopted' if ok else 'refused'}: {why}", flush=True)
        carried = {n: r for n, r in carry_rows(prev, jobs, digest, same, bool(unstamped and unstamped["adopted"])).items()
                   if not in_run_dir(n)}
        if carried:
            print(f"{len(carried)} models carried from {prev_path.name} (same weights and recipe)", flush=True)
        jobs = [j for j in jobs if j[0] not in carried]

        not_reported = []  # (--finished-only: the budgets not far enough on to report, and why)
        if args.finished_only:
            trained = {**carried, **evaluate_finished(jobs)}
            if not any(f"bench-{w}" in trained for w in MBV3_WIDTHS):
                raise SystemExit("--finished-only: no MobileNetV3-small width is trained yet; run without it first")
            not_reported = [{"budget_ms": b, "budget_frac": frac, "why": "its searched model is not trained yet"}
                            for frac, b, _ in plan if f"bench-budget-{frac}-searched" not in trained]
            plan = [p for p in plan if f"bench-budget-{p[0]}-searched" in trained]
            wait = lambda: trained
        else:
            waiting = start_training(jobs, keep)
            wait = lambda: {**carried, **waiting()}  # noqa: E731
        scores = proxy_scores(sorted({a for _, _, rand in plan for a in rand} | {found[p[0]]["arch"] for p in plan}))
        trained = wait()
        # the finalists' choice at the other training seeds too, judged on its mean as the
        # searched arch is: where it is the searched (or chosen) arch, it borrows that arch's seeds
        fin_seed_jobs = {}
        for frac, _, _ in plan:
            fin = trained.get(f"bench-budget-{frac}-finalists")
            if fin is None:
                continue
            kind = finalists_seed_source(space, frac, fin["arch"], (("searched", _best_reward(found[frac])[0]),
                                                                    ("chosen", found[frac]["arch"])), trained)
            fin_seed_jobs[frac] = kind or seed_jobs(f"bench-budget-{frac}-finalists", {"arch": fin["arch"]})[1:]
        extra = [j for js in fin_seed_jobs.values() if isinstance(js, list) for j in js]
        more = {n: r for n, r in carry_rows(prev, extra, digest, same, bool(unstamped and unstamped["adopted"])).items()
                if not in_run_dir(n)}
        carried.update(more)
        extra = [j for j in extra if j[0] not in more]
        trained.update(more)
        if extra:
            trained.update(evaluate_finished(extra) if args.finished_only else start_training(extra, keep)())
        for r in trained.values():  # what they were made against, so a later run can carry them
            r.setdefault("weights_digest", digest)
        # the baseline's widths trained so far (--finished-only: some may not be yet), each
        # with its other seeds; every budget gets its own copies, timed and fitted to it later
        mbv3 = [{**trained[f"bench-{w}"], "seeds": [trained[n] for n, _ in seed_jobs(f"bench-{w}", {}, args.baseline_seeds)[1:]
                                                    if n in trained]}
                for w in MBV3_WIDTHS if f"bench-{w}" in trained]
        missing = [w for w in MBV3_WIDTHS if f"bench-{w}" not in trained]
        rows = []
        for frac, b, rand in plan:
            def seeds_of(kind):
                return [trained[n] for n in (f"bench-budget-{frac}-{kind}-seed{k}" for k in range(1, args.searched_seeds))
                        if n in trained]

            s = trained[f"bench-budget-{frac}-searched"]
            s["predicted_ms"] = _best_reward(found[frac])[1]
            best_reward = None
            other = space.network(found[frac]["arch"]) != space.network(_best_reward(found[frac])[0])
            if other and f"bench-budget-{frac}-chosen" not in trained:  # (--finished-only)
                print(f"budget {frac}: the search's choice is not trained yet; not reported yet", flush=True)
                not_reported.append({"budget_ms": b, "budget_frac": frac,
                                     "why": "the search's choice is not trained yet"})
                continue
            if other:  # the choice is another arch than the best reward's
                best_reward = {**s, "seeds": seeds_of("searched"), "band": found[frac]["chosen_within"]["band"]}
                s = trained[f"bench-budget-{frac}-chosen"]
                s["predicted_ms"] = found[frac]["predicted_ms"]
                seeds = seeds_of("chosen")
            else:
                seeds = seeds_of("searched")
            done = [trained[n] for n in (f"bench-budget-{frac}-random{i}" for i in range(len(rand))) if n in trained]
            if len(done) < 2:
                print(f"budget {frac}: {len(done)} random archs finished; not reported yet", flush=True)
                not_reported.append({"budget_ms": b, "budget_frac": frac,
                                     "why": f"{len(done)} of {len(rand)} random archs trained"})
                continue
            widths = [dict(w) for w in mbv3]
            row = {"budget_ms": b, "budget_frac": frac, "searched": s, "mobilenetv3": widths[0],
                   "mobilenetv3_widths": widths,
                   **({"mobilenetv3_not_trained": missing} if missing else {}),
                   "random_planned": len(rand), "random": done, "seeds_planned": args.searched_seeds}
            if seeds:  # the same arch at other training seeds
                row["searched_seeds"] = seeds
            if best_reward is not None:
                row["best_reward"] = best_reward
            for pick, a in picks[frac].items():
                src = pick_source(frac, a, trained)
                first = trained.get(f"bench-budget-{frac}-{src or 'pick-' + pick}")
                if first is None:  # (--finished-only: not trained yet)
                    continue
                row.setdefault("picks", {})[pick] = {
                    **first, "same_as": src, "seeds": seeds_of(src or f"pick-{pick}"),
                    "predicted_ms": pred(space.parse(a))}
            fin = trained.get(f"bench-budget-{frac}-finalists")
            if fin is not None:
                row["finalists"] = dict(fin)
                js = fin_seed_jobs.get(frac, [])
                fs = seeds_of(js) if isinstance(js, str) else [trained[n] for n, _ in js if n in trained]
                if fs:  # own_seeds: trained as the finalists' (else another kind's, borrowed)
                    row["finalists"].update(seeds=fs, own_seeds=not isinstance(js, str))
            summarize_budget(row)
            rows.append(row)
            print(b, s, row["random_median_M(q,g)"], flush=True)
        if not rows:
            raise SystemExit("no budget has its searched model and 2 random archs trained yet: "
                             "run without --finished-only first")
        if not args.measure_later:
            measure_budgets(rows)
        res["budgets"] = rows
        res["budgets_not_reported"] = not_reported
        res["proxy_fidelity"] = proxy_fidelity([x for r in rows for x in (r["searched"], *r["random"])], scores)
        res["selection_fidelity"] = selection_fidelity(rows, base.query.finalist_epochs, max(args.finalists, 2))
        res["budgets_trained_on"] = machine()
        res["budgets_table_range_ms"] = [lo, hi]
        res["budget_fracs"] = [r["budget_frac"] for r in rows]
        res["budgets_finished_only"] = args.finished_only  # True: a run still in progress
        reported = {x["name"] for x in result_rows(rows).values()}
        # the finished models of budgets not reported yet (and those of the old file made
        # against the same weights that this run had no job for), kept for a later run to carry
        kept = {**{n: r for n, r in prev.items() if r.get("weights_digest") == digest}, **trained}
        res["budgets_unreported_models"] = [r for n, r in sorted(kept.items()) if n not in reported]
        res["budgets_carried"] = {"models": sorted(n for n in carried if n in reported), "weights_digest": digest,
                                  "adopted": sorted(n for n, r in carried.items() if n in reported and r.get("adopted_by")),
                                  **({"unstamped": unstamped} if unstamped else {})}

    if "measure" in args.parts:  # the latency of --measure-later results, on this machine
        import json

        old = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
        measure_budgets(old["budgets"])
        res["budgets"] = old["budgets"]
        res["budgets_trained_on"] = old.get("budgets_trained_on")
        # the budgets and feasibility were decided with the table of the run that trained them
        res["budgets_table_range_ms"] = old.get("budgets_table_range_ms", old.get("range_ms"))

    if "cost" in args.parts:
        # seconds per evaluated trial vs the size of the validation set: the test split's
        # images stand in for larger validation sets (timing only; no accuracy is reported)
        import time as _time

        import numpy as np

        from hwnas.compat.api import PartImages, RunDir, gallery_embeddings, load_part, run_gallery
        from hwnas.search.runner import SupernetEvaluator

        ev = SupernetEvaluator(base, log=quiet)
        rd = RunDir(base)
        qi, gi = load_part(rd, "query", ev.pre, log=quiet), load_part(rd, "gallery", ev.pre, log=quiet)
        g_all = gallery_embeddings(rd, run_gallery(rd), "gallery", gi, log=quiet)
        rng = random.Random(7)
        archs = [space.sample(rng) for _ in range(5)]
        rows = [{"val_queries": len(ev.vq.images), "val_gallery": len(ev.vg.images), "kind": "validation split",
                 "sec_per_trial": statistics.median(ev(a)["seconds"] for a in archs)}]
        ev.ids = (None, None)
        for ng in (1000, 2000, 4000, 8000):
            nq = ng // 4
            sq, sg = np.arange(min(nq, len(qi.images))), np.arange(min(ng, len(gi.images)))
            ev.vq = PartImages(qi.images[sq], qi.labels[sq], qi.raw_labels[sq], [])
            ev.vg = PartImages(gi.images[sg], gi.labels[sg], gi.raw_labels[sg], [])
            ev.g_emb, ev.cache = g_all[sg], {}
            t = _time.time()
            secs = [ev(a)["seconds"] for a in archs]
            rows.append({"val_queries": len(sq), "val_gallery": len(sg), "kind": "test images as validation",
                         "sec_per_trial": statistics.median(secs), "wall_s": _time.time() - t})
            print(rows[-1], flush=True)
        res["cost"] = rows

    for ex in pool:
        ex.shutdown()
    prev = ROOT / "benchmarks" / "results" / f"{name}.json"
    if prev.exists():  # parts run separately accumulate (a part run again replaces its figures)
        import json

        old = json.loads(prev.read_text())
        res = {**old, **res, "part_run_dirs": {**old.get("part_run_dirs", {})}}
        if "budgets" in args.parts:  # its rows kept as they finished are in the budgets' rows now
            res.pop("budgets_in_progress", None)
    done = [p for p in ("samplers", "rewards", "budgets", "cost") if p in args.parts]  # measure
    # keeps the run dir of the budgets it timed (they were trained elsewhere)
    rel = Path(args.run_dir).resolve()  # shown relative to the project where it lies in it
    rel = str(rel.relative_to(ROOT)) if rel.is_relative_to(ROOT) else args.run_dir
    res.setdefault("part_run_dirs", {}).update({p: rel for p in done})
    # how the search scored archs in each part (parts measured before search.val_queries
    # existed used the split's query/gallery division)
    res["part_val_queries"] = {**{p: "split" for p in res["part_run_dirs"]}, **res.get("part_val_queries", {}),
                               **{p: base.search.val_queries for p in done}}
    # when, where and against which table each part was measured: parts run at other stops
    # keep theirs, and the markdown says so beside them
    res["part_measured"] = {**res.get("part_measured", {}), **{
        p: {"date": res["machine"]["date"], "cpu": res["machine"]["cpu"], "table_range_ms": [lo, hi],
            **({"note": args.note} if args.note else {})}
        for p in done}}
    if "measure" in args.parts and "budgets" in res.get("part_measured", {}):  # the budgets' models re-timed
        res["part_measured"]["budgets"]["latency"] = {
            "date": res["machine"]["date"], "cpu": res["machine"]["cpu"],
            "command": shlex.join(["benchmarks/bench_search.py", *sys.argv[1:]]),
            **({"note": args.note} if args.note else {})}
    if "samplers" in done:  # what the samplers' studies rewarded
        res["search_reward"], res["search_metric"] = base.search.reward, base.search.metric
    # each part's whole command line, flags beyond --set included (--searched-seeds,
    # --baseline-seeds, --also-pick, --budget-fracs, ...); "script" keeps the --set list
    # alone, which --adopt-unstamped compares
    res["part_commands"] = {**res.get("part_commands", {}),
                            **{p: shlex.join(["benchmarks/bench_search.py", *sys.argv[1:]]) for p in done}}
    res["script"] = (f"benchmarks/bench_search.py --config configs/{tag}.yaml"
                     + "".join(" --set " + x for x in args.set)
                     + (" --finished-only" if args.finished_only else ""))
    save_results(name, res)
    write_markdown(res, name, tag, base.train_config("query").epochs)


if __name__ == "__main__":
    main()
