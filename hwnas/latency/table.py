"""Latency tables (data, not code) and the predictor that reads them.

A table is JSON: a header (device, CPU/GPU model, runtime and version, threads, batch,
input size, warm-up/rounds/runs, space hash, date, calibration, validation) and, per op key
of :func:`hwnas.space.resolve_ops`, the median latency, its spread and the run count.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from hwnas.errors import HwnasError
from hwnas.export.onnx import GRAPH_FORM
from hwnas.latency.backends import LATENCY_STAT
from hwnas.space import SKIP, Arch, SearchSpace
from hwnas.space.ops import head_op, layer_op, stem_op
from hwnas.space.spec import enumerate_layer_choices
from hwnas.utils import read_json, write_json

TABLE_FORMAT = "hwnas-latency-v1"
SPREAD_WARN_PCT = 15.0  # median per-op CV above this: the table says it is noisy


def cpu_slug(name: str) -> str:
    """A short file-name tag of a CPU model: 'Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz'
    -> 'intelxeonplatinum8375c', 'AMD EPYC' -> 'amdepyc' ('cpu' when unknown)."""
    s = re.sub(r"\((r|tm)\)|@.*$|\b(cpu|processor)\b", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "", s)[:24] or "cpu"


class LatencyTable:
    def __init__(self, header: dict, entries: dict[str, dict] | None = None):
        self.header = header
        self.entries = entries or {}

    # ---------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | Path, given: bool = False) -> "LatencyTable":
        """``given``: the user named this file (--table, latency.table): a file that is not a
        table is the wrong path, not a damaged table of hwnas's own to write anew."""
        path = Path(path)
        if not path.exists():
            raise HwnasError(f"latency table {path} does not exist; build it with "
                             "`hwnas profile --device cpu` (or pass --table)")
        what = f"a {TABLE_FORMAT} latency table, the .json file `hwnas profile` writes"
        d = read_json(path, given_as=what if given else None)
        if not isinstance(d, dict) or not isinstance(d.get("header"), dict) or d["header"].get("format") != TABLE_FORMAT:
            raise HwnasError(f"{path} is not {what}")
        if not isinstance(d.get("entries"), dict):  # the header alone: cut short or hand-made
            raise HwnasError(f"{path} has a {TABLE_FORMAT} header but no entries; build it again with "
                             f"`hwnas profile --device {d['header'].get('device', 'cpu')} --out {path}`")
        t = cls(d["header"], d["entries"])
        t.path = path
        return t

    def save(self, path: str | Path) -> Path:
        self.path = Path(path)
        return write_json(path, {"header": self.header, "entries": dict(sorted(self.entries.items()))})

    def prediction_key(self) -> str:
        """A hash of what predictions read (the ops' timings, the per-call overhead, the
        calibration, which statistic): equal for two tables that predict alike, whatever else
        their headers hold (e.g. ``hwnas profile --gallery-throughput``'s figures)."""
        from hwnas.utils import content_hash

        h = self.header
        return content_hash({"entries": self.entries, **{k: h.get(k) for k in (
            "call_overhead_ms", "calibration", "statistic_key")}})

    @staticmethod
    def default_name(settings: dict, space: SearchSpace) -> str:
        ver = ".".join(str(settings["runtime_version"]).split("+")[0].split(".")[:2])
        short = {"onnxruntime": "ort", "tensorrt": "trt", "torch": "torch"}[settings["runtime"]]
        if settings["device"] == "cpu":
            from hwnas.latency.backends import physical_cores

            # the CPU model is in the name: a table built on one CPU does not describe another
            # (the quickstart's table from an AMD EPYC VM predicted an Intel Xeon VM's query
            # model at 0.081 ms; it ran in 0.200), so another CPU finds no table and builds its own
            dev = f"{settings.get('machine', 'cpu')}-{cpu_slug(settings.get('device_name', ''))}-{physical_cores()}c"
        else:
            dev = "gpu-" + re.sub(r"[^a-z0-9]+", "", settings["device_name"].lower())[:16]
        th = f"-t{settings['threads']}" if settings.get("threads") else ""
        return (f"{dev}-{short}{ver}-{settings['precision']}{th}-r{space.input_size}"
                f"-s{space.hash[:8]}.json")

    # ---------------------------------------------------------------- checks
    def check(self, space: SearchSpace, settings: dict | None = None) -> None:
        """Refuse a table made for another space, runtime version or thread count."""
        h = self.header
        where = getattr(self, "path", "the latency table")
        # (for the config's own space: without --config, profile builds the default space's table)
        # (and over this file, --remeasure: profile checks a table it finds before adding to it)
        elsewhere = bool(settings) and h.get("device_name") not in (None, settings.get("device_name"))
        fix = (f"rebuild it for your config: hwnas profile --device {h.get('device', 'cpu')} --config CONFIG"
               + (f" --threads {settings['threads']}" if settings and settings.get("threads") else "")
               # another device's table is not re-timed over: that would replace its timings
               + ((f" --out ANOTHER.json (it was measured on {h.get('device_name')!r}, this machine is "
                   f"{settings.get('device_name')!r}; re-time it on that device)") if elsewhere
                  else f" --out {where} --remeasure" if hasattr(self, "path") else ""))
        if h.get("graph_form", 1) != GRAPH_FORM:
            raise HwnasError(
                f"{where} was measured on graph form {h.get('graph_form', 1)} of the exported "
                f"networks, and this hwnas exports form {GRAPH_FORM} (hwnas/export/onnx.py, "
                "GRAPH_FORM), so its entries and calibration no longer describe what is deployed; "
                f"{fix}" + ("" if hasattr(self, "path") or elsewhere else " --remeasure"))  # (with a path, fix has it)
        if h.get("space_hash") != space.hash:
            raise HwnasError(f"{where} was built for search space {h.get('space_hash')}, not "
                             f"{space.hash} (the config's space changed); {fix}")
        if settings:
            for k in ("backend", "runtime_version", "threads", "precision"):
                if k == "threads" and h.get("device", "cpu") != "cpu":
                    continue  # (a GPU table's thread count is not a CPU runtime's)
                if k in settings and h.get(k) != settings[k]:
                    raise HwnasError(f"{where} was measured with {k}={h.get(k)!r} but this run uses "
                                     f"{settings[k]!r}; {fix}"
                                     + (f" (or set latency.threads: {h.get(k)})" if k == "threads" else ""))

    def ms(self, key: str, stat: str | None = None) -> float:
        stat = stat or self.header.get("statistic_key", "median_ms")
        e = self.entries.get(key)
        if e is None:
            where = getattr(self, "path", "TABLE.json")
            raise HwnasError(f"latency table {where} has no entry for op {key}; fill it with `hwnas "
                             f"profile --device {self.header.get('device', 'cpu')} --config CONFIG "
                             f"--out {where} --only-missing`")
        return float(e[stat])

    def spread_summary(self) -> dict:
        import numpy as np

        cvs = [e["cv_pct"] for e in self.entries.values() if "cv_pct" in e]
        med = float(np.median(cvs)) if cvs else 0.0
        return {"median_cv_pct": round(med, 2),
                "p90_cv_pct": round(float(np.percentile(cvs, 90)), 2) if cvs else 0.0,
                "noisy": med > SPREAD_WARN_PCT}


def make_header(space: SearchSpace, settings: dict, rounds: int, runs: int, warmup: int) -> dict:
    return {"format": TABLE_FORMAT, **settings, "graph_form": GRAPH_FORM, "batch": 1, "input_size": space.input_size,
            "in_channels": space.in_channels, "space_hash": space.hash, "space": space.to_dict(),
            "warmup": warmup, "rounds": rounds, "runs_per_round": runs,
            "statistic": "10th percentile of round medians (rounds above Q3+1.5*IQR dropped)",
            "statistic_key": LATENCY_STAT,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False}


class LatencyPredictor:
    """latency(arch) = a * (sum of the arch's table entries) + b * (its weights, M params)
    + d * (its layers that are not skips) + c.

    Each entry is counted without the backend's per-call overhead (measured once per table
    on a trivial graph), which is added back once: a network is one call, not one per op.

    The weights term is what an op timed alone does not see: run again and again, its
    weights stay in cache; in a whole network the other ops' weights evict them, so every
    op pays for reading its weights from memory (measured on the 2-core VM, 32 px: the
    largest subnets ran 2x their table sum, and a fit with the weights term halved the
    error of a*sum+c).

    The layers term is a fixed cost per executed layer that the op timings miss (in a whole
    graph each ShuffleNet unit also splits, concatenates and hands over its activations; at
    32 px, where an op runs in microseconds, that is a large share: measured on the 2-core
    Intel VM, 1 thread, the fit with it put 100 of 100 validation archs within 10%, against
    79 for the offset alone).

    ``a``, ``b``, ``d`` and ``c`` come from the table's calibration (end-to-end measurements of a
    few archs; a=1, b=0, c=0 without one). Per-layer costs are precomputed, so a prediction
    is a few dictionary reads (hundreds of thousands per second)."""

    def __init__(self, space: SearchSpace, table: LatencyTable, stat: str | None = None,
                 calibrated: bool = True):
        table.check(space)
        self.space = space
        ov = float(table.header.get("call_overhead_ms", 0.0))

        def net(key: str) -> float:  # an op's own cost, without the per-call overhead
            return max(0.0, table.ms(key, stat) - ov)

        stem, head = stem_op(space), head_op(space)
        self.base = ov + net(stem.key()) + net(head.key())
        self.base_mparams = (stem.params + head.params) / 1e6
        self.layers, self.layer_mparams = [], []
        for layer in space.layers():
            d, w = {}, {}
            for op, scale in enumerate_layer_choices(space, layer):
                # a skip is folded away in deployed subnets (SubNet): it costs nothing
                spec = None if op == SKIP else layer_op(space, layer, op, scale)
                d[(op, scale)] = 0.0 if spec is None else net(spec.key())
                w[(op, scale)] = 0.0 if spec is None else spec.params / 1e6
            self.layers.append(d)
            self.layer_mparams.append(w)
        cal = table.header.get("calibration") if calibrated else None
        # tables calibrated before a term existed have no coefficient for it: 0
        self.a, self.b, self.d, self.c = ((cal["a"], cal.get("b", 0.0), cal.get("d", 0.0), cal["c"])
                                          if cal else (1.0, 0.0, 0.0, 0.0))
        # one combined cost per layer choice: a prediction is c + const + a sum of lookups
        self._const = self.a * self.base + self.b * self.base_mparams + self.c
        self._cost = [{lc: self.a * d[lc] + self.b * w[lc] + self.d * (lc[0] != SKIP) for lc in d}
                      for d, w in zip(self.layers, self.layer_mparams)]

    def additive(self, arch: Arch) -> float:
        """The plain sum of the arch's table entries (plus one call overhead)."""
        return self.base + sum(d[lc] for d, lc in zip(self.layers, arch.layers))

    def mparams(self, arch: Arch) -> float:
        """The arch's weights, millions of parameters (analytic, as in the table's ops)."""
        return self.base_mparams + sum(w[lc] for w, lc in zip(self.layer_mparams, arch.layers))

    def layers_run(self, arch: Arch) -> int:
        """How many of the arch's layers are not skips (a skip is folded away)."""
        return sum(lc[0] != SKIP for lc in arch.layers)

    def __call__(self, arch: Arch) -> float:
        return self._const + sum(d[lc] for d, lc in zip(self._cost, arch.layers))

    def range(self) -> tuple[float, float]:
        """Predicted latency of the fastest and slowest archs (per-layer min/max)."""
        return (self._const + sum(min(d.values()) for d in self._cost),
                self._const + sum(max(d.values()) for d in self._cost))

    def sample_feasible(self, budget_ms: float, rng, tries: int = 2000) -> Arch:
        """A random arch predicted within ``budget_ms``: a uniform sample of the space when
        one of ``tries`` fits; else (tight budgets, where few uniform archs fit) a uniform
        sample whose layers, picked at random, are swapped for random cheaper choices of
        that layer until it fits."""
        lo = self.range()[0]
        if lo > budget_ms:
            raise HwnasError(f"no arch fits {budget_ms} ms: the fastest is predicted at {lo:.4f} ms")
        for _ in range(tries):
            a = self.space.sample(rng)
            if self(a) <= budget_ms:
                return a
        layers = list(self.space.sample(rng).layers)
        while self(Arch(tuple(layers))) > budget_ms:
            i = rng.randrange(len(layers))
            d = self._cost[i]
            cheaper = [c for c in d if d[c] < d[layers[i]]]
            if cheaper:
                layers[i] = rng.choice(cheaper)
        return Arch(tuple(layers))

    def extreme_arch(self, fastest: bool = True) -> Arch:
        pick = min if fastest else max
        return Arch(tuple(pick(d, key=d.get) for d in self._cost))
