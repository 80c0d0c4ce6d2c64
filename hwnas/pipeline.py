"""``hwnas run CONFIG``: the whole method, step by step, resumable.

profile -> train-gallery -> train-supernet -> search -> train-query -> baselines -> deploy
-> report. Each step writes its results into the run directory and is recorded as done in
``steps.json``; a killed run continues with the first unfinished step (and inside a step,
training resumes from its last epoch and the search from its stored study).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from hwnas.config import Config
from hwnas.errors import HwnasError
from hwnas.rundir import RunDir
from hwnas.utils import read_json, write_json

STEPS = ["data", "profile", "train-gallery", "train-supernet", "search", "train-query",
         "baselines", "deploy", "report"]


class Steps:
    """``steps.json``: which steps are done, with their summaries."""

    def __init__(self, path: Path):
        self.path = path
        self.state = read_json(path) if path.exists() else {"done": {}}

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def mark(self, name: str, summary: dict) -> None:
        self.state["done"][name] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}
        write_json(self.path, self.state)


def resolve_budget(cfg: Config, predictor) -> float:
    """``search.budget_ms``, or ``search.budget_fraction`` of the way from the fastest to the
    slowest predicted subnet (portable across machines with different tables)."""
    if cfg.search.budget_ms is not None:
        return float(cfg.search.budget_ms)
    lo, hi = predictor.range()
    f = cfg.search.budget_fraction
    if not 0 < f < 1:
        raise HwnasError(f"search.budget_fraction {f} must be between 0 and 1 (or set budget_ms)")
    return round(lo + f * (hi - lo), 4)


def run_pipeline(cfg: Config, log: Callable = print) -> int:
    from hwnas.compat import api

    rd = RunDir(cfg)
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.save_config()
    steps = Steps(rd.path / "steps.json")
    t0 = time.time()
    space = cfg.search_space()

    def step(name: str, fn) -> None:
        if steps.done(name):
            log(f"== {name}: done earlier, kept")
            return
        log(f"== {name}")
        t = time.time()
        summary = fn() or {}
        steps.mark(name, {**summary, "seconds": round(time.time() - t, 1)})

    def data():
        s = rd.splits(log=log)
        return {"fingerprint": s.fingerprint, "counts": s.counts()}

    def profile():
        from hwnas.latency.backends import OrtCpuBackend
        from hwnas.latency.profile import profile_space, validate_table
        from hwnas.search.runner import table_path

        path = table_path(cfg, space)
        backend = OrtCpuBackend(threads=cfg.latency.threads)
        table = profile_space(space, backend, path, log=log)
        if "validation" not in table.header and cfg.latency.validate:
            validate_table(space, table, backend, cfg.latency.validate, path, seed=cfg.seed, log=log)
        return {"table": str(path), "validation": table.header.get("validation")}

    def search():
        from hwnas.search.runner import predictor_for, run_search

        pred, _ = predictor_for(cfg, space)
        cfg.search.budget_ms = resolve_budget(cfg, pred)
        log(f"[search] budget {cfg.search.budget_ms} ms")
        r = run_search(cfg, log=log)
        return {"arch": r["arch"], "budget_ms": cfg.search.budget_ms, "reward": r["reward"]}

    def train_query():
        from hwnas.search.runner import load_best

        best = load_best(rd.path)
        api.train_query(cfg, arch=best["arch"], name="searched", resume=True, retrain_changed=True, log=log)

    def baselines():
        from hwnas.report import baseline_models

        for name, kw in baseline_models(cfg, space).items():
            api.train_query(cfg, name=name, resume=True, retrain_changed=True, log=log, **kw)

    def deploy():
        from hwnas.export.deploy import deploy as do_deploy

        if (rd.path / "bundle" / "manifest.json").exists():
            return {}
        m = do_deploy(cfg, int8=cfg.deploy.int8, factory=cfg.deploy.index, log=log)
        return {"artifacts": len(m["artifacts"])}

    def report():
        from hwnas.report import build_report

        r = build_report(cfg, log=log)
        return {"rows": len(r["rows"])}

    step("data", data)
    step("profile", profile)
    step("train-gallery", lambda: {"fingerprint": api.train_gallery(cfg, resume=True, log=log)["fingerprint"]})
    step("train-supernet", lambda: (api.train_supernet(cfg, resume=True, log=log), {})[1])
    step("search", search)
    step("train-query", train_query)
    step("baselines", baselines)
    step("deploy", deploy)
    step("report", report)
    from hwnas.report import headline_table

    log(headline_table(read_json(rd.path / "report.json")))
    log(f"done in {(time.time() - t0) / 60:.1f} min; report: {rd.path / 'report.md'}")
    return 0
