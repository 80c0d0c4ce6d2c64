"""Tables for the terminal and Markdown, and the headline report of ``hwnas run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hwnas.errors import HwnasError
from hwnas.utils import read_json, save_figure


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------- the headline report
# the baselines' model names (RUN_DIR/query/NAME), in the report's order
BASELINES = ("timm-mobilenetv3_small_050", "smallest", "largest", "random-feasible")


def baseline_models(cfg, space) -> dict:
    """The baselines every run is compared with, all trained with the same compatibility
    loss: timm MobileNetV3-small, the smallest and largest subnet, a random feasible subnet
    (other than the searched one where another fits)."""
    import random

    from hwnas.rundir import RunDir
    from hwnas.search.runner import load_best, predictor_for, top_archs

    run_dir = RunDir(cfg).path
    best = load_best(run_dir)
    pred, _ = predictor_for(cfg, space)
    rng = random.Random(cfg.seed + 1)
    # another arch than the searched one where the budget leaves any (at a budget this tight
    # that only a few archs fit, the first draw can be the searched arch itself); with
    # query.finalists, another than each finalist, since training picks any of them
    k = cfg.query.finalists
    searched = {space.network(a["arch"]) for a in (top_archs(run_dir, k, space) if k > 1 else [best])}
    for _ in range(100):
        feasible = pred.sample_feasible(best["budget_ms"], rng)
        if space.canonical(feasible) not in searched:  # (another network, not only another string)
            break
    return dict(zip(BASELINES, ({"timm_name": "mobilenetv3_small_050"},
                                {"arch": space.smallest().to_string(space)},
                                {"arch": space.largest().to_string(space)},
                                {"arch": feasible.to_string(space)})))


def build_report(cfg, log=print) -> dict:
    """Evaluate the searched query model, the baselines and the paragon on the test split,
    measure every model's edge latency (ONNX Runtime CPU, batch 1, interleaved), and write
    report.json, report.md and report_accuracy_vs_latency.png."""
    import math
    import statistics

    from hwnas.compat import api
    from hwnas.latency.backends import OrtCpuBackend, measure_beside_paragon, thread_options
    from hwnas.nn.models import load_query
    from hwnas.rundir import RunDir
    from hwnas.search.runner import load_best, predictor_for
    from hwnas.space import SearchSpace
    from hwnas.utils import atomic_write_text, write_json

    rd = RunDir(cfg)
    space = cfg.search_space()
    pre = cfg.preprocess()
    gallery = api.run_gallery(rd)
    best = load_best(rd.path)
    pred, tpath = predictor_for(cfg, space)
    from hwnas.pipeline import ADAPTED

    base_names = list(baseline_models(cfg, space))
    names = ["searched"] + ([ADAPTED] if cfg.adapt.epochs else []) + base_names
    backend = OrtCpuBackend(threads=cfg.latency.threads)
    shape = (1, pre.channels, pre.size, pre.size)
    rows, runners, hits = [], [], {}
    splits_fp = read_json(rd.splits_path).get("fingerprint")
    from hwnas.config import metric_fars
    from hwnas.retrieval import far_key

    fars = metric_fars(cfg.search.metric)
    tars = [far_key(f) for f in fars]
    for name in names:
        qdir = rd.path / "query" / name
        if not (qdir / "config.json").exists():
            log(f"[report] {name}: not trained, left out")
            continue
        ev_path = qdir / "evaluation-test.json"
        ev = read_json(ev_path) if ev_path.exists() else None
        if (ev is None or ev.get("gallery_fingerprint") != gallery.fingerprint
                or ev.get("splits_fingerprint") != splits_fp or "hit@1" not in ev
                or any(far_key(f) not in ev["metrics"]["M(q,g)"] for f in fars)):
            # (an evaluation against another gallery model or on other splits, one from before
            # per-query results were kept, one without the search's TAR@FAR, or none yet:
            # evaluated here; the paired tests below need every model's queries in one order)
            ev = api.evaluate_query(cfg, query_dir=str(qdir), log=log, fars=fars)
        hits[name] = ev["hit@1"]
        net, qcfg = load_query(qdir)
        if qcfg.get("adapted") and name != ADAPTED:
            raise HwnasError(f"{qdir} holds an adapted model (it has seen the gallery's images), so it "
                             f"cannot stand as the {name!r} model: retrain it (hwnas run --from train-query)")
        p_ms = None
        if qcfg["kind"] == "subnet" and SearchSpace.from_dict(qcfg["space"]).hash == space.hash:
            p_ms = pred(space.parse(qcfg["arch"]))
        rows.append({"model": name, "kind": qcfg["kind"], "arch": qcfg.get("arch") or qcfg.get("timm"),
                     "mflops": qcfg["flops"] / 1e6, "predicted_ms": p_ms, "metrics": ev["metrics"],
                     # adapted on the gallery's images: transductive where they hold the test classes
                     "adapted": qcfg.get("adapted")})
        runners.append(backend.prepare_sessions(net, shape))
    if not rows:
        raise HwnasError("no trained query models to report on")
    g_mflops = api.model_flops(gallery.net, pre) / 1e6
    # The query models run at the table's thread count (as deployed); the paragon at its
    # fastest, so no query model gains from a thread count that would handicap the paragon.
    log(f"[report] measuring {len(rows)} query models end to end on ONNX Runtime CPU "
        f"({backend.threads} threads, batch 1) and the paragon at {thread_options(backend.threads)} threads")
    lat, g_lat, g_best_threads, g_by_threads = measure_beside_paragon(runners, gallery.net, shape, backend.threads)
    lat = lat + [g_lat]
    g_ms = g_lat.latency_ms
    paragon = rows[0]["metrics"]["M(g,g)"]
    for r, m in zip(rows, lat):
        mq = r["metrics"]
        r.update({
            "measured_ms": m.latency_ms, "measured_cv_pct": m.cv_pct, "measured_pools_ms": m.pools_ms,
            "measured_sessions_ms": m.sessions_ms,
            # paragon / model in each timing pool (the figure above is from the medians)
            "latency_reduction_pools": [round(g / x, 3) for g, x in zip(lat[-1].pools_ms, m.pools_ms)],
            "M(q,g)_recall@1": mq["M(q,g)"]["recall@1"], "M(q,q)_recall@1": mq["M(q,q)"]["recall@1"],
            "M(q,g)_mAP": mq["M(q,g)"]["mAP"], "M(q,q)_mAP": mq["M(q,q)"]["mAP"],
            "flops_reduction": g_mflops / r["mflops"], "latency_reduction": g_ms / m.latency_ms,
            "gap_points": 100 * (paragon["recall@1"] - mq["M(q,g)"]["recall@1"]),
            # search.metric TAR@FAR=f: verification too (the verdicts stay on recall@1)
            **{f"{side}_{k}": mq[side][k] for k in tars for side in ("M(q,g)", "M(q,q)")},
        })
        del r["metrics"]
        # the gap to the paragon, query by query: this model's M(q,g) against M(g,g) on the same queries
        r["vs_paragon_paired"] = _paired(hits[r["model"]]["M(q,g)"], hits[r["model"]]["M(g,g)"], "query", "paragon")
    s = rows[0] if rows[0]["model"] == "searched" else None
    a = next((r for r in rows if r["model"] == ADAPTED), None)
    base = [r for r in rows if r["model"] in base_names]
    pareto, dominated_by = pareto_against(s, base) if s is not None else ({}, [])
    # the accuracy side of each comparison, query by query: a fraction of a point of recall@1
    # on one test split can be sampling noise, and the paired test says how likely
    paired = {b["model"]: _paired(hits["searched"]["M(q,g)"], hits[b["model"]]["M(q,g)"], "searched", "baseline")
              for b in (base if s is not None else [])}
    report = {
        "dataset": cfg.data.dataset, "protocol": cfg.split_config().protocol, "space_hash": space.hash,
        "budget_ms": best["budget_ms"],
        # the budget was set as the paragon's measured latency over this (search.budget_speedup)
        "budget_speedup": _budget_speedup(rd.path, best["budget_ms"]),
        "pareto_latency_tol": PARETO_LATENCY_TOL, "latency_table": str(tpath), "threads": backend.threads,
        "paragon": {"model": gallery.config["backbone"], "fingerprint": gallery.fingerprint,
                    "mflops": g_mflops, "measured_ms": g_ms, "measured_pools_ms": lat[-1].pools_ms,
                    "threads": g_best_threads, "measured_ms_by_threads": g_by_threads,
                    "M(g,g)_recall@1": paragon["recall@1"],
                    "M(g,g)_mAP": paragon["mAP"], **{f"M(g,g)_{k}": paragon[k] for k in tars}},
        "verification": tars[0] if tars else None,
        "rows": rows,
        # how the searched arch was picked among the search's best (query.finalists > 1)
        "finalists": _finalists(rd.path, s) if cfg.query.finalists > 1 else None,
        "searched_pareto_better_than": pareto,
        "searched_dominated_by": dominated_by,
        "searched_vs_baselines_paired": paired,
        "targets": None if s is None else {
            "flops_reduction>=20": s["flops_reduction"] >= 20,
            "latency_reduction>=10": s["latency_reduction"] >= 10,
            "gap_points<=1": s["gap_points"] <= 1,
            "pareto_better_than_every_baseline": all(pareto.values()) if pareto else None,
            "not_dominated_by_any_baseline": not dominated_by,
        },
        # the same targets for the adapted model, apart: it saw the gallery's images (not their
        # labels) and the baselines were not adapted, so only its cost and gap are set beside them
        "targets_adapted": None if a is None else {
            "flops_reduction>=20": a["flops_reduction"] >= 20,
            "latency_reduction>=10": a["latency_reduction"] >= 10,
            "gap_points<=1": a["gap_points"] <= 1,
        },
    }
    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float) and math.isfinite(v):
                r[k] = round(v, 6)
    write_json(rd.path / "report.json", report)
    png = rd.path / "report_accuracy_vs_latency.png"
    _plot_report(report, png)
    md = ["# hwnas report", "", f"Data: {report['dataset']} ({report['protocol']}-set), test split. "
          f"Edge latency: ONNX Runtime CPU, batch 1, 10th percentile of interleaved round medians, the "
          f"median of {len(lat[-1].pools_ms)} timing pools on this machine; each query model in "
          f"{len(lat[0].sessions_ms or [0])} fresh sessions, its median session's figure; query models at "
          f"{backend.threads} intra-op thread(s) (the latency table's), the paragon at its fastest of "
          f"{', '.join(f'{t}: {v:.3f} ms' for t, v in g_by_threads.items())} (threads: ms). "
          f"Budget {report['budget_ms']} ms (predicted"
          + (f"; the paragon's latency / {report['budget_speedup']:g}, measured when the search ran"
             if report["budget_speedup"] else "") + "). A model is Pareto-better than another when it "
          f"is no slower (latencies within {100 * PARETO_LATENCY_TOL:g}% count as equal), no less "
          "accurate on M(q,g) recall@1, and better in one of the two.", "",
          headline_table(report, markdown=True), ""]
    if s is not None:
        pools = s["latency_reduction_pools"]
        md += [f"The paragon measured {min(lat[-1].pools_ms):.3f}-{max(lat[-1].pools_ms):.3f} ms "
               f"across the pools, the searched model {min(lat[0].pools_ms):.3f}-"
               f"{max(lat[0].pools_ms):.3f} ms; its latency x per pool: {min(pools):.1f}-{max(pools):.1f} "
               f"(median {statistics.median(pools):.1f})."
               + (f" Its sessions measured {min(s['measured_sessions_ms']):.3f}-"
                  f"{max(s['measured_sessions_ms']):.3f} ms." if s.get("measured_sessions_ms") else ""), ""]
    fin = report["finalists"]
    if fin:
        md += [f"The searched arch is the one of {len(fin['finalists'])} finalists (the search's choice, then "
               f"its best by reward) with the lowest training loss after {fin['epochs']} of {fin['of_epochs']} "
               f"epochs: finalist {fin['chosen_rank']} (losses: "
               + ", ".join(f"{f['train_loss']:.4f}" for f in fin["finalists"]) + ").", ""]
    md += [f"![accuracy vs latency]({png.name})", ""]
    atomic_write_text(rd.path / "report.md", "\n".join(md))
    return report


def _paired(a_hits: str, b_hits: str, a: str, b: str) -> dict:
    """``retrieval.paired_test`` with its two sides named for report.json (``only_<a>``, ``only_<b>``)."""
    from hwnas.retrieval import paired_test

    t = paired_test(a_hits, b_hits)
    return {"queries": t["queries"], f"only_{a}": t["only_a"], f"only_{b}": t["only_b"], "p_value": t["p_value"]}


def _budget_speedup(run_dir: Path, budget_ms: float) -> float | None:
    """The speed-up over the paragon the search's budget was resolved from (``hwnas run``'s
    ``budget.json``, ``search.budget_speedup``), if the search ran at that budget; else None
    (a budget given in ms, or a search run by hand at another)."""
    p = run_dir / "budget.json"
    if not p.exists():
        return None
    b = read_json(p)
    key, resolved = b.get("key") or {}, b.get("resolved") or {}
    if resolved.get("clamped_from_ms") is not None:  # moved into the table's range: not that speed-up
        return None
    if key.get("budget_ms") is None and key.get("budget_speedup") and resolved.get("budget_ms") == budget_ms:
        return key["budget_speedup"]
    return None


def _finalists(run_dir: Path, searched: dict | None) -> dict | None:
    """``query/searched/finalists.json`` where the searched model is the finalists' choice, else None."""
    p = run_dir / "query" / "searched" / "finalists.json"
    if searched is None or not p.exists():
        return None
    fin = read_json(p)
    return fin if fin["chosen"] == searched["arch"] else None


# measured latencies this close count as equal in the Pareto comparison: the timing pools of
# one report spread by more than this on a shared VM (README, report.json)
PARETO_LATENCY_TOL = 0.02


def dominates(a: dict, b: dict, tol: float = PARETO_LATENCY_TOL) -> bool:
    """``a`` is Pareto-better than ``b``: no slower (latencies within ``tol`` count as equal),
    no less accurate on M(q,g) recall@1, and strictly better in one of the two."""
    la, lb = a["measured_ms"], b["measured_ms"]
    ra, rb = a["M(q,g)_recall@1"], b["M(q,g)_recall@1"]
    return la <= lb * (1 + tol) and ra >= rb and (la < lb * (1 - tol) or ra > rb)


def pareto_against(s: dict, baselines: list[dict]) -> tuple[dict[str, bool], list[str]]:
    """The searched model ``s`` against each baseline row: {model: s is Pareto-better than it},
    and the baselines Pareto-better than ``s`` (``dominates``, both ways)."""
    return ({b["model"]: dominates(s, b) for b in baselines},
            [b["model"] for b in baselines if dominates(b, s)])


def headline_table(report: dict, markdown: bool = False) -> str:
    p = report["paragon"]
    v = report.get("verification")  # search.metric TAR@FAR=f: its M(q,g) beside recall@1
    headers = ["model", "MFLOPs", "pred ms", "meas ms", "FLOPs x", "latency x", "M(q,g) R@1",
               "M(q,q) R@1", "gap pts", *([f"M(q,g) {v}"] if v else [])]
    rows = [[f"paragon {p['model']} (M(g,g))", f"{p['mflops']:.1f}", "-", f"{p['measured_ms']:.3f}",
             "1", "1", f"{100 * p['M(g,g)_recall@1']:.2f}", "-", "0",
             *([f"{100 * p[f'M(g,g)_{v}']:.2f}"] if v else [])]]
    for r in report["rows"]:
        rows.append([r["model"], f"{r['mflops']:.2f}",
                     f"{r['predicted_ms']:.3f}" if r["predicted_ms"] is not None else "-",
                     f"{r['measured_ms']:.3f}", f"{r['flops_reduction']:.1f}",
                     f"{r['latency_reduction']:.1f}", f"{100 * r['M(q,g)_recall@1']:.2f}",
                     f"{100 * r['M(q,q)_recall@1']:.2f}", f"{r['gap_points']:.2f}",
                     *([f"{100 * r[f'M(q,g)_{v}']:.2f}"] if v else [])])
    t = markdown_table(headers, rows) if markdown else format_table(headers, rows)
    tg = report.get("targets")
    if tg:
        t += "\n\ntargets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in tg.items())
    s = next((r for r in report["rows"] if r["model"] == "searched"), None)
    pt = report.get("searched_vs_baselines_paired") or {}
    g = (s or {}).get("vs_paragon_paired")
    if g:  # (absent from reports written before the paired tests)
        rows_by = {r["model"]: r for r in report["rows"]}
        vs = [("the paragon's M(g,g)", -s["gap_points"], g["only_query"], g["only_paragon"], g["p_value"])]
        vs += [(k, 100 * (s["M(q,g)_recall@1"] - rows_by[k]["M(q,g)_recall@1"]), v["only_searched"],
                v["only_baseline"], v["p_value"]) for k, v in pt.items()]
        t += (f"\n\nsearched M(q,g) R@1 against each, query by query over the {g['queries']} test queries "
              "(points ahead; queries right only for searched / only for the other; exact McNemar p): "
              + "; ".join(f"{k} {d:+.2f} ({a} / {b}, p = {p:.2g})" for k, d, a, b, p in vs))
    ta = report.get("targets_adapted")
    if ta:
        row = next(r for r in report["rows"] if r.get("adapted"))
        ad = row["adapted"]
        t += (f"\n\n{row['model']}: the searched model after gallery adaptation (hwnas adapt: {ad['epochs']} epochs on "
              f"{ad['images']} images of {ad['source']}, without their labels). It has seen the "
              "gallery's images, so where they hold the test classes its accuracy is transductive; "
              "the baselines were not adapted. Its targets: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ta.items()))
    return t


def _plot_report(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from hwnas.utils import place_labels

    fig, ax = plt.subplots(figsize=(6.5, 5))
    p = report["paragon"]
    g_acc = 100 * p["M(g,g)_recall@1"]
    ax.axhline(g_acc, color="k", ls="--", lw=1, label="paragon M(g,g)")
    ax.scatter([p["measured_ms"]], [g_acc], marker="D", c="k")
    pts, names = [(p["measured_ms"], g_acc)], [f"paragon ({p['model']})"]
    for r in report["rows"]:
        c = "tab:red" if r["model"] == "searched" else "tab:orange" if r.get("adapted") else "tab:blue"
        ax.scatter([r["measured_ms"]], [100 * r["M(q,g)_recall@1"]], c=c,
                   s=30 if c == "tab:blue" else 80, zorder=3)
        pts.append((r["measured_ms"], 100 * r["M(q,g)_recall@1"]))
        names.append(r["model"])
    sp = report.get("budget_speedup")
    if sp:
        # the budget came from a measured speed-up: on this axis of measured latency it is
        # the paragon's time (as measured here) over the speed-up
        ax.axvline(p["measured_ms"] / sp, color="0.5", ls=":", lw=1,
                   label=f"paragon / {sp:g} = {p['measured_ms'] / sp:.3f} ms (the speed-up asked for)")
    else:
        ax.axvline(report["budget_ms"], color="0.5", ls=":", lw=1,
                   label=f"budget {report['budget_ms']} ms (predicted; measured times may differ)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ys = [y for _, y in pts]
    ax.set_ylim(min(ys) - 3, max(ys) + 2)
    ax.set_xlabel("measured edge latency, ONNX Runtime CPU batch 1 (ms, log)")
    ax.set_ylabel("M(q,g) recall@1 (%)")
    # below the axes: inside, it hid models wherever they clustered
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    place_labels(ax, pts, names)
    save_figure(fig, path)
