"""``hwnas profile``: build a latency table for a search space on a device, and validate the
predictor against end-to-end measurements of whole networks.

Every distinct op of the space (from ``resolve_ops`` over all layers and choices, plus stem
and head) is built alone, exported to ONNX at its real input shape and timed by the backend
in interleaved rounds, all ops of a chunk (512) in one pool so that slow drift of a shared
machine's speed hits every op alike. The table is saved after every chunk, so a killed
build resumes where it stopped (finished entries are kept).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import numpy as np

from hwnas.errors import HwnasError
from hwnas.latency.backends import LatencyBackend, measure
from hwnas.latency.table import LatencyPredictor, LatencyTable, make_header
from hwnas.space import OpSpec, SearchSpace, all_op_specs, arch_flops
from hwnas.utils import bars_off, save_figure, write_json


def op_module(space: SearchSpace, spec: OpSpec):
    """A standalone module for one op and the input shape it runs at (batch 1)."""
    from hwnas.nn.blocks import ChoiceBlock, EmbeddingHead, Stem

    shape = (1, spec.in_channels, spec.in_size, spec.in_size)
    if spec.kind == "stem":
        m = Stem(spec.in_channels, spec.out_channels)
    elif spec.kind == "head":
        m = EmbeddingHead(spec.in_channels, spec.mid_channels, spec.out_channels)
    elif spec.kind in ("shufflenet", "xception"):
        m = ChoiceBlock(spec.kind, spec.in_channels, spec.out_channels, spec.mid_channels,
                        spec.kernel, spec.stride)
    else:
        raise ValueError(f"op kind {spec.kind!r} has no module")
    return m.eval(), shape


def profile_space(space: SearchSpace, backend: LatencyBackend, out: Path, *,
                  remeasure: bool = False, rounds: int = 15, runs: int = 10, warmup: int = 10,
                  chunk: int = 512, seed: int = 0, retime_old_form: bool = False,
                  log: Callable = print) -> LatencyTable:
    """Measure every op of ``space`` missing from the table at ``out`` (all of them for a new
    table, or with ``remeasure``); an existing table must match the space and settings.
    ``retime_old_form``: a table this machine timed on an older hwnas's graph form
    (``GRAPH_FORM``) is timed afresh (``hwnas run``, whose profile step is redone for that),
    rather than refused with the fix."""
    from tqdm import tqdm

    from hwnas.export.onnx import GRAPH_FORM

    settings = backend.settings()
    specs = all_op_specs(space)
    table = None
    if out.exists() and not remeasure and retime_old_form:
        old = LatencyTable.load(out).header
        if old.get("graph_form", 1) != GRAPH_FORM and old.get("device_name") == settings.get("device_name"):
            log(f"[profile] {out} was timed on graph form {old.get('graph_form', 1)} of the exported "
                f"networks, and this hwnas exports form {GRAPH_FORM}: timing it again")
            remeasure = True
    if out.exists() and not remeasure:
        table = LatencyTable.load(out)
        table.check(space, settings)
        there, here = table.header.get("device_name"), settings.get("device_name")
        if there != here and not table.header.get("complete"):
            # finishing it here would mix two CPUs' timings in one table
            raise HwnasError(f"{out} is part-measured on {there!r}, and this machine is {here!r}: "
                             "finish it on that machine, or measure this one into another --out "
                             "(or --remeasure to start it afresh here)")
        if there != here:
            log(f"[profile] note: {out} was measured on {there!r}, not on this machine ({here!r}); "
                "kept as the table of that device (--remeasure to time this one instead)")
        if not table.header.get("complete"):
            log(f"[profile] resuming {out}: {len(table.entries)}/{len(specs)} ops measured")
    if table is None:
        table = LatencyTable(make_header(space, settings, rounds, runs, warmup))
    todo = [s for s in specs if s.key() not in table.entries]
    if not todo and table.header.get("complete"):
        log(f"[profile] {out} already covers all {len(specs)} ops of space {space.hash} "
            f"({settings['runtime']} {settings['runtime_version']}, threads {settings.get('threads')}); kept")
        return table
    log(f"[profile] {backend.name} ({settings['device_name']}, threads {settings.get('threads')}): "
        f"{len(todo)} of {len(specs)} ops to measure, {rounds} rounds x {runs} runs each")
    # the per-call overhead is timed in the first chunk's rounds, interleaved with the ops, so
    # that it sees the machine as they do (timed alone before them, a busy moment once put it
    # above every op's timing, and the table then predicted one latency for every arch)
    overhead = "call_overhead_ms" not in table.header
    bar = tqdm(total=len(todo) * (rounds + 1) + overhead * rounds, desc="profile", unit="step",
               mininterval=1.0, disable=bars_off())  # (off in a log: lines before and after)
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        runners = []
        for s in part:
            m, shape = op_module(space, s)
            runners.append(backend.prepare(m, shape))
            bar.update(1)
        if overhead:
            runners.append(backend.prepare(_trivial_module(), (1, 1, 4, 4)))
        res = measure(runners, rounds, runs, warmup, seed=seed + i, progress=bar.update)
        if overhead:
            table.header["call_overhead_ms"] = round(res.pop().latency_ms, 5)
            overhead = False
        for s, r in zip(part, res):
            table.entries[s.key()] = {**r.to_dict(), "flops": s.flops}
        for r in runners:
            r.close()
        table.save(out)  # atomic: a kill loses at most this chunk
    bar.close()
    if not table.header.get("complete"):  # a complete table's calibration read its overhead
        cap_call_overhead(table, log)
    table.header["complete"] = True
    table.header["spread"] = table.spread_summary()
    if table.header["spread"]["noisy"]:
        log(f"[profile] WARNING: the median spread across rounds is "
            f"{table.header['spread']['median_cv_pct']}% — this machine was busy or unsteady; "
            "predictions from this table are uncertain (rebuild on a quiet machine)")
    table.save(out)
    lo, hi = LatencyPredictor(space, table, calibrated=False).range()
    log(f"[profile] wrote {out}: {len(table.entries)} ops; additive range {lo:.3f}-{hi:.3f} ms")
    return table


def _trivial_module():
    """A graph that does next to nothing: its time is the fixed cost of one inference call,
    which every op's entry contains once and a whole network only once (the predictor counts
    it once)."""
    import torch

    class _Trivial(torch.nn.Module):
        def forward(self, x):
            return x * 1.0

    return _Trivial().eval()


def cap_call_overhead(table: LatencyTable, log: Callable = print) -> None:
    """Keep the per-call overhead at or below the cheapest op's timing: each op's timing holds
    one call, so a larger figure is timer noise, and would count the cheap ops as free."""
    key = table.header.get("statistic_key", "median_ms")
    ov = table.header.get("call_overhead_ms")
    low = min((e[key] for e in table.entries.values()), default=None)
    if ov is not None and low is not None and ov > low:
        log(f"[profile] note: one call measured {ov} ms, more than the cheapest op's {low} ms "
            f"(which holds one call): timer noise, so the overhead is kept at {low} ms")
        table.header["call_overhead_ms"] = low


# ---------------------------------------------------------------------- statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    # average ties
    for v in np.unique(x):
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a, b) -> float:
    """Kendall's tau-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    s = (da * db)[iu].sum()
    n1, n2 = (da[iu] != 0).sum(), (db[iu] != 0).sum()
    return float(s / math.sqrt(n1 * n2)) if n1 and n2 else float("nan")


def error_stats(pred, meas) -> dict:
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    rel = np.abs(pred - meas) / meas
    return {"n": int(len(meas)), "mape_pct": round(float(100 * rel.mean()), 2),
            "within_5pct": round(float(100 * (rel <= 0.05).mean()), 1),
            "within_10pct": round(float(100 * (rel <= 0.10).mean()), 1),
            "spearman": round(spearman(pred, meas), 4), "kendall": round(kendall(pred, meas), 4)}


# ---------------------------------------------------------------------- thread count
def compare_threads(space: SearchSpace, threads: list[int], n_random: int = 4, seed: int = 0,
                    rounds: int = 15, runs: int = 10, warmup: int = 10) -> dict:
    """Which intra-op thread count runs this space's subnets fastest on this CPU (ONNX
    Runtime, as deployed)? The smallest, the largest and ``n_random`` random subnets, each
    exported once and timed at every count in ``threads``, all in one interleaved pool (so the
    machine's drift hits every setting alike). The recommendation is the count with the lowest
    geometric-mean latency over the subnets. On 32 px inputs on 2 cores one thread won for
    every subnet (~1.6x); at 224 px two threads did."""
    from hwnas.export.onnx import export_onnx
    from hwnas.latency.backends import OrtCpuBackend
    from hwnas.nn.supernet import SubNet

    threads = sorted(set(threads))
    if not threads or threads[0] < 1:
        raise HwnasError(f"thread counts (--compare-threads) must be 1 or more, not {threads}")
    import torch

    rng = random.Random(seed)
    archs = [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(n_random)]
    shape = (1, space.in_channels, space.input_size, space.input_size)
    runners, keys = [], []
    for a in archs:
        torch.manual_seed(0)
        onnx_bytes = export_onnx(SubNet(space, a).eval(), shape, dynamic_batch=True)
        for t in threads:
            runners.append(OrtCpuBackend(threads=t).prepare_onnx(onnx_bytes, shape))
            keys.append((a.to_string(space), t))
    res = measure(runners, rounds, runs, warmup, seed=seed)
    per: dict[str, dict[str, float]] = {}
    for (a, t), m in zip(keys, res):
        per.setdefault(a, {})[str(t)] = round(m.latency_ms, 5)
    geo = {str(t): round(float(np.exp(np.mean([np.log(v[str(t)]) for v in per.values()]))), 5)
           for t in threads}
    best = min(geo, key=geo.get)
    return {"threads": threads, "archs": per, "geomean_ms": geo, "recommended": int(best),
            "fastest_count": {str(t): sum(min(v, key=v.get) == str(t) for v in per.values())
                              for t in threads},
            "input_size": space.input_size, "space_hash": space.hash}


# ---------------------------------------------------------------------- validation
def _wls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative error (rows weighted by 1/y): the targets are relative."""
    w = 1.0 / y
    return np.linalg.lstsq(X * w[:, None], y * w, rcond=None)[0]


#: (name, features beyond the additive sum, archs needed), from the safest to the richest
CALIBRATION_MODELS = (("offset", (), 1), ("linear", (), 5), ("linear+weights", ("b",), 8),
                      ("linear+weights+layers", ("b", "d"), 10))


def _fit_model(model: str, add: np.ndarray, mp: np.ndarray, meas: np.ndarray,
               layers: np.ndarray | None = None) -> dict | None:
    """{a, b, d, c} of one model, or None where it is not sane (a slope negative, a > 3)."""
    one = np.ones_like(add)
    if model == "offset":
        return {"a": 1.0, "b": 0.0, "d": 0.0, "c": float(np.median(meas - add))}
    names = ["a", *next(e for name, e, _ in CALIBRATION_MODELS if name == model)]
    cols = {"a": add, "b": mp, "d": layers}
    # slopes are costs, so none may be negative: a term whose fitted slope is negative is
    # held at 0 and the rest refitted (an active set; with 2-3 slopes it ends in a few
    # steps). a may end small: where whole networks are dominated by reading weights and
    # per-layer costs (32 px on a 2-core VM) the op timings' own share is small, and the
    # leave-one-out error decides between the models.
    free = list(names)
    while True:
        coef = _wls(np.stack([cols[k] for k in free] + [one], 1), meas)
        slopes = dict(zip(free, coef[:-1]))
        neg = [k for k in free if slopes[k] < 0]
        if not neg:
            break
        free.remove(min(neg, key=slopes.get))
        if not free:
            return None
    out = {"a": 0.0, "b": 0.0, "d": 0.0, **{k: float(v) for k, v in slopes.items()}, "c": float(coef[-1])}
    if out["a"] > 3.0:
        return None
    return out


def _calibration_fits(add: np.ndarray, mparams: np.ndarray, meas: np.ndarray,
                      layers: np.ndarray | None = None) -> dict:
    """{model: (coefficients on all points, leave-one-out relative error)} for every model
    that is sane on all points and in every leave-one-out fold and has enough archs (the
    layers model only with ``layers``)."""
    add, mparams, meas = (np.asarray(x, float) for x in (add, mparams, meas))
    layers = None if layers is None else np.asarray(layers, float)
    n, out = len(meas), {}
    for model, extra, need in CALIBRATION_MODELS:
        if n < need or (model != "offset" and np.ptp(add) == 0) or ("d" in extra and layers is None):
            continue
        full = _fit_model(model, add, mparams, meas, layers)
        errs = []
        for i in range(n):
            keep = np.arange(n) != i
            f = _fit_model(model, add[keep], mparams[keep], meas[keep],
                           None if layers is None else layers[keep])
            if f is None:
                break
            lay = 0.0 if layers is None else layers[i]
            errs.append(abs(f["a"] * add[i] + f["b"] * mparams[i] + f["d"] * lay + f["c"] - meas[i]) / meas[i])
        if full is not None and len(errs) == n:
            out[model] = (full, float(np.mean(errs)))
    return out


def fit_calibration(add: np.ndarray, mparams: np.ndarray, meas: np.ndarray,
                    layers: np.ndarray | None = None) -> dict:
    """measured ~ a * additive + b * weights (M params) + d * layers + c (see LatencyPredictor).

    Four models, from the safest to the richest: an offset (a=1: the median residual, which
    cannot go wrong with few or noisy points), a line in the additive sum, a line with the
    weights term, and one with a per-layer term too (``layers``: the arch's layers that
    are not skips). The one with the lowest leave-one-out relative error on the calibration
    archs wins, so a richer model is used only where it predicts archs it was not fitted on
    better."""
    fits = _calibration_fits(add, mparams, meas, layers)
    best = min(fits, key=lambda m: fits[m][1])
    return {**fits[best][0], "model": best,
            "loo_mape_pct": {k: round(100 * e, 2) for k, (_, e) in fits.items()}}


def measure_archs(space: SearchSpace, archs, backend: LatencyBackend, rounds: int, runs: int,
                  warmup: int, chunk: int = 512, seed: int = 0, desc: str = "end-to-end",
                  repeats: int = 1) -> list:
    """End-to-end latency of whole subnets, exported exactly as a deployed query model
    (dynamic batch axis, named input/output), timed at batch 1.

    All archs are timed in one interleaved pool (up to ``chunk``): on a shared VM the
    machine's speed drifts by up to 2x over tens of seconds, and archs measured in separate
    batches would carry that drift into the comparison. With ``repeats`` > 1 the pool is
    timed that many times over, each time in fresh sessions (a session's placement in memory
    moves a tiny network's time by a few percent: backends.MODEL_SESSIONS), and a list per
    repeat is returned: how well one measurement predicts the next is the floor under any
    predictor's error."""
    import torch
    from tqdm import tqdm

    from hwnas.nn.supernet import SubNet

    shape = (1, space.in_channels, space.input_size, space.input_size)
    out: list[list] = [[] for _ in range(repeats)]
    bar = tqdm(total=len(archs) * (repeats * rounds + 1), desc=desc, unit="step", mininterval=1.0,
               disable=bars_off())
    for i in range(0, len(archs), chunk):
        sessions = []  # [arch][repeat]
        for a in archs[i:i + chunk]:
            torch.manual_seed(0)
            net = SubNet(space, a).eval()
            sessions.append(backend.prepare_sessions(net, shape, n=repeats))
            bar.update(1)
        for r in range(repeats):
            out[r] += measure([x[r] for x in sessions], rounds, runs, warmup, seed=seed + i + 7919 * r,
                              progress=bar.update)
    bar.close()
    return out if repeats > 1 else out[0]


def validate_table(space: SearchSpace, table: LatencyTable, backend: LatencyBackend, n: int,
                   out: Path, calibrate: int = 40, seed: int = 0, rounds: int = 10, runs: int = 10,
                   warmup: int = 5, log: Callable = print) -> dict:
    """Fit the calibration (a, b, d, c; :func:`fit_calibration`) on ``calibrate`` archs
    (smallest and largest included), then measure ``n`` other random archs end to end and
    record how well the plain additive sum, each calibration model and FLOPs predict them.

    The pool is timed twice, the second time in fresh sessions: ``repeatability`` is how
    well the second measurement predicts the first — the noise floor of this machine (tables
    validated before 2026-12-05 timed the same sessions twice, a floor that left out a
    session's placement), under which no predictor can go. Writes
    the header's ``calibration`` and ``validation`` objects, a scatter plot and the per-arch
    figures (``.validation.json``) beside the table."""
    table.check(space, backend.settings())
    there, here = table.header.get("device_name"), backend.settings().get("device_name")
    if there is not None and there != here:  # this machine's timings would calibrate another device's ops
        raise HwnasError(f"{out} was measured on {there!r} and this machine is {here!r}: validate it "
                         "on that machine, or profile this one into another --out and validate that")
    rng = random.Random(seed)
    calib = [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(max(0, calibrate - 2))]
    valid = [space.sample(rng) for _ in range(n)]
    meas, meas2 = measure_archs(space, calib + valid, backend, rounds, runs, warmup, seed=seed, repeats=2)
    m = np.array([x.latency_ms for x in meas])
    m2 = np.array([x.latency_ms for x in meas2])
    plain = LatencyPredictor(space, table, calibrated=False)
    add = np.array([plain.additive(a) for a in calib + valid])
    mp = np.array([plain.mparams(a) for a in calib + valid])
    lay = np.array([plain.layers_run(a) for a in calib + valid], float)
    k = len(calib)
    cal = fit_calibration(add[:k], mp[:k], m[:k], lay[:k])
    table.header["calibration"] = {**cal, "n": k, "archs": [x.to_string(space) for x in calib]}

    def predict(f: dict) -> np.ndarray:
        return f["a"] * add + f["b"] * mp + f["d"] * lay + f["c"]

    pred = predict(cal)
    flops = np.array([arch_flops(space, x) for x in valid], float)
    mv = m[k:]
    models = {model: error_stats(predict(f)[k:], mv)
              for model, (f, _) in _calibration_fits(add[:k], mp[:k], m[:k], lay[:k]).items()}
    v = {**error_stats(pred[k:], mv), "model": cal["model"], "additive": error_stats(add[k:], mv),
         "models": models, "repeatability": error_stats(m2[k:], mv),
         "flops_spearman": round(spearman(flops, mv), 4),
         "measured_range_ms": [round(float(m.min()), 4), round(float(m.max()), 4)],
         "measured_range_ratio": round(float(m.max() / m.min()), 2),
         "median_cv_pct_end_to_end": round(float(np.median([x.cv_pct for x in meas])), 2),
         "seed": seed}
    table.header["validation"] = v
    table.save(out)
    write_json(out.with_suffix(".validation.json"), {
        "table": out.name, "space_hash": space.hash, "calibration_archs": k,
        "archs": [{"arch": x.to_string(space), "role": "calibration" if i < k else "validation",
                   "additive_ms": round(float(add[i]), 5), "mparams": round(float(mp[i]), 5),
                   "predicted_ms": round(float(pred[i]), 5), "measured_ms": round(float(m[i]), 5),
                   "measured_again_ms": round(float(m2[i]), 5), "mflops": round(arch_flops(space, x) / 1e6, 4)}
                  for i, x in enumerate(calib + valid)]})
    png = out.with_suffix(".validation.png")
    _scatter(add[k:], pred[k:], mv, v, png, table.header, again=m2[k:])
    r = v["repeatability"]
    log(f"[profile] validation on {n} archs: calibrated ({cal['model']}) MAPE {v['mape_pct']}%, within 10% "
        f"{v['within_10pct']}%, Spearman {v['spearman']}; additive MAPE {v['additive']['mape_pct']}%; "
        f"FLOPs Spearman {v['flops_spearman']}; noise floor (measured again vs measured): MAPE "
        f"{r['mape_pct']}%, within 10% {r['within_10pct']}%, Spearman {r['spearman']}; plot {png}")
    return v


def _scatter(add, pred, meas, v, path: Path, header: dict, again=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = min(meas.min(), add.min(), pred.min()) * 0.9, max(meas.max(), add.max(), pred.max()) * 1.1
    xs = np.linspace(lo, hi, 10)
    ax.plot(xs, xs, "k-", lw=1, label="y = x")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.9", label="±10%")
    ax.scatter(meas, add, s=12, c="0.5", label=f"additive sum (MAPE {v['additive']['mape_pct']}%)")
    if again is not None:
        ax.scatter(meas, again, s=10, c="tab:orange", marker="x",
                   label=f"measured again: noise floor (MAPE {v['repeatability']['mape_pct']}%)")
    ax.scatter(meas, pred, s=12, c="tab:blue", label=f"calibrated, {v.get('model', 'linear')} (MAPE {v['mape_pct']}%)")
    ax.set_xlabel("measured end-to-end latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{header.get('backend')} t{header.get('threads')} {header.get('input_size')}px: "
                 f"Spearman {v['spearman']}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def gallery_throughput(gallery_net, pre, backend: LatencyBackend, batches=(1, 32, 256),
                       rounds: int = 5, runs: int = 5) -> dict:
    """Images/s of the gallery model at several batch sizes (the indexing side)."""
    out = {}
    for b in batches:
        shape = (b, pre.channels, pre.size, pre.size)
        r = measure([backend.prepare(gallery_net, shape)], rounds, runs, warmup=3)[0]
        out[str(b)] = {"images_per_s": round(b / (r.latency_ms / 1000), 1),
                       "batch_ms": round(r.latency_ms, 3)}
    return out


def load_predictor(space: SearchSpace, table_path: Path, settings: dict | None = None,
                   given: bool = False) -> LatencyPredictor:
    t = LatencyTable.load(table_path, given=given)
    t.check(space, settings)
    if not t.header.get("complete"):
        raise HwnasError(f"{table_path} is incomplete (a profile was interrupted); finish it with "
                         f"`hwnas profile --device {t.header.get('device', 'cpu')} --config CONFIG "
                         f"--out {table_path}` on the machine it was measured on "
                         f"({t.header.get('device_name')!r})")
    return LatencyPredictor(space, t)
