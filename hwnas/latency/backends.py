"""Latency backends: small strategies behind one contract.

A backend turns a module and an input shape into a *runner* (``prepare``) that can time
``n`` runs (``run_timed``). Measurement itself is shared (:func:`measure`): every runner is
warmed up, then timed in interleaved rounds (all runners once per round, in a shuffled
order), so slow drift and bursts of load from other processes hit every op alike; each
round contributes its median, rounds whose median is an outlier (above Q3 + 1.5 IQR of the
rounds) are dropped, and the reported latency is the median of the kept round medians with
its spread (coefficient of variation across rounds); the latency figure used downstream is
the 10th percentile of the kept round medians (``LATENCY_STAT``), the median is kept too.

Backends: ``onnxruntime-cpu`` (always here), ``torch-cuda`` (PyTorch with a CUDA GPU),
``tensorrt`` (TensorRT and a CUDA GPU).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from hwnas.errors import HwnasError


#: The latency figure used everywhere (tables, predictor, validation, deploy, report): the
#: 10th percentile of the round medians. On a shared 2-core machine the low percentile of
#: interleaved rounds is far steadier than the mean or the median (the median is kept too).
LATENCY_STAT = "p10_ms"


#: How many sessions of one network measure_models times (prepare_sessions). Measured on the
#: 2-core Intel VM, 1 thread, 32 px (2026-12-05, three runs' trained query models;
#: benchmarks/bench_sessions.py): fresh ONNX Runtime sessions of one model under 0.1 ms ran
#: 1.7-5.6% apart (SD over 8 sessions, each pool's common drift removed; range up to 17%),
#: of one of 0.5 ms or more 0.3-0.6%, while one session moved 0.5-0.9% from pool to pool.
#: A figure from one session carries its placement in memory, which no number of pools
#: averages out: a report put the quickstart's searched model 7% behind a random subnet (one
#: session each); timed again in fresh sessions, it was 2-6% ahead (3 sessions each), then
#: 3.5% behind (8 each). The median of 5 sessions narrows that spread about 1.8x.
MODEL_SESSIONS = 5


@dataclass
class Measurement:
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    cv_pct: float
    n: int
    rounds: int
    rounds_dropped: int
    pools_ms: list | None = None  # measure_models: the figure of each pool (this is the median)
    sessions_ms: list | None = None  # measure_models: the figure of each session of the network

    @property
    def latency_ms(self) -> float:
        return getattr(self, LATENCY_STAT)

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()
                if v is not None}


class Runner(ABC):
    @abstractmethod
    def run_timed(self, n: int) -> list[float]:
        """Run ``n`` times; the latency of each run in milliseconds."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


class LatencyBackend(ABC):
    name: str = ""
    device: str = ""  # cpu | gpu

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None if usable here, else one line saying what is missing and how to install it."""

    @abstractmethod
    def settings(self) -> dict:
        """What a table built with this backend depends on (runtime, version, threads...)."""

    @abstractmethod
    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Runner: ...

    def prepare_deployed(self, module: nn.Module, input_shape: Sequence[int]) -> Runner:
        """A whole network as it is deployed on this backend (eager backends run the module
        itself; ONNX backends the exported query model). End-to-end validation uses this."""
        return self.prepare(module, input_shape)

    def prepare_onnx(self, onnx_bytes: bytes, input_shape: Sequence[int]) -> Runner:
        raise HwnasError(f"backend {self.name} does not run ONNX models directly")

    def prepare_sessions(self, module: nn.Module, input_shape: Sequence[int],
                         n: int = MODEL_SESSIONS) -> list[Runner]:
        """``n`` runners of one deployed network, each its own session (timed together by
        :func:`measure_models`, whose figure for them is their median: see MODEL_SESSIONS)."""
        return [self.prepare_deployed(module, input_shape) for _ in range(n)]


class OnnxBackend(LatencyBackend):
    """A backend that times the exported ONNX graph, exactly as it is deployed."""

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Runner:
        from hwnas.export.onnx import export_onnx

        return self.prepare_onnx(export_onnx(module, input_shape), input_shape)

    def prepare_deployed(self, module: nn.Module, input_shape: Sequence[int]) -> Runner:
        from hwnas.export.onnx import export_onnx

        # the very graph `hwnas deploy` writes: dynamic batch axis, named input/output
        return self.prepare_onnx(export_onnx(module, input_shape, dynamic_batch=True), input_shape)

    def prepare_sessions(self, module: nn.Module, input_shape: Sequence[int],
                         n: int = MODEL_SESSIONS) -> list[Runner]:
        from hwnas.export.onnx import export_onnx

        # exported once
        return self.prepare_onnx_sessions(export_onnx(module, input_shape, dynamic_batch=True), input_shape, n)

    def prepare_onnx_sessions(self, onnx_bytes: bytes, input_shape: Sequence[int],
                              n: int = MODEL_SESSIONS) -> list[Runner]:
        """``n`` sessions of one ONNX graph (see :meth:`LatencyBackend.prepare_sessions`)."""
        return [self.prepare_onnx(onnx_bytes, input_shape) for _ in range(n)]

    @abstractmethod
    def prepare_onnx(self, onnx_bytes: bytes, input_shape: Sequence[int]) -> Runner: ...


# ---------------------------------------------------------------------- measurement
def _summarize(round_medians: list[float], n: int) -> Measurement:
    a = np.asarray(round_medians)
    q1, q3 = np.percentile(a, [25, 75])
    kept = a[a <= q3 + 1.5 * (q3 - q1)] if len(a) >= 4 else a
    mean = float(kept.mean())
    return Measurement(
        median_ms=float(np.median(kept)),
        p10_ms=float(np.percentile(kept, 10)),
        p90_ms=float(np.percentile(kept, 90)),
        min_ms=float(kept.min()),
        cv_pct=float(100 * kept.std() / mean) if mean > 0 else 0.0,
        n=n, rounds=len(a), rounds_dropped=int(len(a) - len(kept)),
    )


@contextmanager
def torch_threads_parked():
    """PyTorch's intra-op thread pool held at one thread while something else is timed.

    In a process that has just trained with PyTorch (``hwnas run``: the report and deploy
    steps come after the training steps) its pool threads compete with ONNX Runtime's for
    the cores: on the 2-core VM the quickstart's report measured the searched query model
    at 0.120 ms in the pipeline's process and 0.052 ms re-run on its own, and a
    40-second training loop before timing moved a query model 0.049 -> 0.060 ms, back to
    0.050 with the pool at one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def measure(runners: Sequence[Runner], rounds: int = 15, runs: int = 10, warmup: int = 10,
            seed: int = 0, progress=None) -> list[Measurement]:
    """Interleaved timing of several runners (see the module docstring)."""
    with torch_threads_parked():
        for r in runners:
            r.run_timed(warmup)
        rng = np.random.default_rng(seed)
        per: list[list[float]] = [[] for _ in runners]
        for _ in range(rounds):
            for i in rng.permutation(len(runners)):
                per[i].append(statistics.median(runners[i].run_timed(runs)))
                if progress is not None:
                    progress(1)
    return [_summarize(p, rounds * runs) for p in per]


def measure_models(models: Sequence[Runner | Sequence[Runner]], pools: int = 5) -> list[Measurement]:
    """Whole networks timed against one another (the report's table, deploy's figures, the
    paragon behind a ``budget_speedup``): ``pools`` pools, one after another, of 40
    interleaved rounds each. A network is one runner, or a list of its sessions
    (:meth:`LatencyBackend.prepare_sessions`), all timed in the same interleaved rounds.
    Each session's figure is its median pool's; a network's is its median session's (with
    that session's ``pools_ms``, of which the figure is the median) and ``sessions_ms``.

    Pools: on this shared VM a large network's latency drifts with the machine's state over
    seconds while a tiny one's barely moves: ResNet-18 at 32 px measured 0.81 and 0.90 ms in
    two pools seconds apart and 0.90-1.21 ms across reports, the searched query model
    0.098-0.100 ms throughout, so one pool's paragon / query ratio ranged 9.0x to 12.3x.
    Ratios from medians over pools are steadier, and ``pools_ms`` shows the spread. Sessions:
    see MODEL_SESSIONS."""
    groups = [list(m) if isinstance(m, (list, tuple)) else [m] for m in models]
    flat = [r for g in groups for r in g]
    per = [measure(flat, rounds=40, runs=10, warmup=10 if i == 0 else 2, seed=i)
           for i in range(pools)]
    out, j = [], 0
    for g in groups:
        sess = []
        for k in range(j, j + len(g)):
            ms = sorted((p[k] for p in per), key=lambda m: m.latency_ms)
            sess.append(replace(ms[len(ms) // 2], pools_ms=[p[k].latency_ms for p in per]))
        j += len(g)
        mid = sorted(sess, key=lambda m: m.latency_ms)[len(sess) // 2]
        out.append(mid if len(sess) == 1 else replace(mid, sessions_ms=[x.latency_ms for x in sess]))
    return out


def thread_options(threads: int) -> list[int]:
    """The intra-op thread counts a model is tried at when it is timed at its fastest: 1, the
    powers of two below the physical cores, the physical cores, and ``threads``."""
    cores = physical_cores()
    return sorted({1, threads, cores} | {2 ** i for i in range(1, 8) if 2 ** i < cores})


def runners_at_thread_options(module: nn.Module, input_shape: Sequence[int], threads: int) -> tuple[list[int], list[Runner]]:
    """A reference model (the paragon) deployed on ONNX Runtime CPU at each of
    :func:`thread_options`, to be timed beside the query models; :func:`fastest_threads`
    then picks its fastest."""
    opts = thread_options(threads)
    return opts, [OrtCpuBackend(threads=t).prepare_deployed(module, input_shape) for t in opts]


def fastest_threads(ms: Sequence[Measurement], threads: Sequence[int]) -> tuple[Measurement, int, dict]:
    """The fastest of one model's measurements at several thread counts (from one
    ``measure_models`` call): (its measurement, its thread count, {"threads": ms}; string keys,
    as JSON keeps them)."""
    i = min(range(len(ms)), key=lambda j: ms[j].latency_ms)
    return ms[i], threads[i], {str(t): round(m.latency_ms, 5) for t, m in zip(threads, ms)}


def measure_beside_paragon(runners: Sequence[Runner | Sequence[Runner]], paragon: nn.Module, input_shape: Sequence[int],
                           threads: int, pools: int = 5) -> tuple[list[Measurement], Measurement, int, dict]:
    """``runners`` and a reference model (the paragon, at each of :func:`thread_options`) timed
    interleaved with :func:`measure_models`: (the runners' measurements, the paragon's fastest,
    its thread count, {"threads": ms}), so that no model gains from a thread count that would
    handicap the paragon."""
    p_threads, p_runners = runners_at_thread_options(paragon, input_shape, threads)
    m = measure_models(list(runners) + p_runners, pools=pools)
    return (m[:len(runners)], *fastest_threads(m[len(runners):], p_threads))


# ---------------------------------------------------------------------- machine facts
def physical_cores() -> int:
    """Physical cores (hyper-threads not counted), from /proc/cpuinfo where available."""
    try:
        cores, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        n = len(cores)
        if n:
            return min(n, len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        pass
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------- ONNX Runtime CPU
class _OrtRunner(Runner):
    def __init__(self, sess, input_shape):
        self.sess = sess
        self.name = sess.get_inputs()[0].name
        self.x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)

    def run_timed(self, n: int) -> list[float]:
        out, run, feed = [], self.sess.run, {self.name: self.x}
        for _ in range(n):
            t = time.perf_counter_ns()
            run(None, feed)
            out.append((time.perf_counter_ns() - t) / 1e6)
        return out


class OrtCpuBackend(OnnxBackend):
    """ONNX Runtime's CPU execution provider, as deployed: all graph optimizations (Conv+BN
    fusion etc.), batch 1, a fixed number of intra-op threads, sequential execution, and
    thread spinning off (spinning inflated whole-network times by ~40% against the block
    sum on 2 cores)."""

    name, device = "onnxruntime-cpu", "cpu"

    def __init__(self, threads: int | None = None, spinning: bool = False):
        self.threads = threads or physical_cores()
        self.spinning = spinning

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed: pip install onnxruntime"
        return None

    def settings(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "device": "cpu", "device_name": cpu_model(),
                "runtime": "onnxruntime", "runtime_version": ort.__version__,
                "threads": self.threads, "spinning": self.spinning, "precision": "fp32",
                "graph_optimization": "all", "machine": platform.machine()}

    def session(self, onnx_bytes: bytes):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        so.log_severity_level = 3
        return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])

    def prepare_onnx(self, onnx_bytes: bytes, input_shape) -> Runner:
        return _OrtRunner(self.session(onnx_bytes), input_shape)


# ---------------------------------------------------------------------- PyTorch CUDA
def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False): run on "
                "a machine with an NVIDIA GPU and a CUDA build of torch")
    return None


class _CudaEventRunner(Runner):
    """Times ``fn()`` with CUDA events on ``stream`` (the one ``fn`` enqueues on; default the
    current stream)."""

    def __init__(self, fn, stream=None):
        import torch

        self.fn, self.torch, self.stream = fn, torch, stream

    def run_timed(self, n: int) -> list[float]:
        torch = self.torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            s.record(self.stream)
            self.fn()
            e.record(self.stream)
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


class TorchCudaBackend(LatencyBackend):
    """PyTorch eager on a CUDA GPU (fp32, or fp16 with ``half=True``), CUDA-event timing."""

    name, device = "torch-cuda", "gpu"

    def __init__(self, half: bool = False):
        self.half = half

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _cuda_reason()

    def settings(self) -> dict:
        import torch

        return {"backend": self.name, "device": "gpu", "device_name": torch.cuda.get_device_name(),
                "runtime": "torch", "runtime_version": torch.__version__,
                "cuda": torch.version.cuda, "threads": 0,
                "precision": "fp16" if self.half else "fp32"}

    def prepare(self, module: nn.Module, input_shape) -> Runner:
        import torch

        dtype = torch.float16 if self.half else torch.float32
        m = module.eval().to("cuda", dtype)
        x = torch.randn(*input_shape, device="cuda", dtype=dtype)

        def fn():
            with torch.no_grad():
                m(x)

        return _CudaEventRunner(fn)


# ---------------------------------------------------------------------- TensorRT
class TensorRTBackend(OnnxBackend):
    """A TensorRT engine per module, built from its ONNX export, timed with CUDA events
    around ``execute_async_v3`` (TensorRT 10/11 API)."""

    name, device = "tensorrt", "gpu"

    def __init__(self, fp16: bool = True):
        self.fp16 = fp16

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "TensorRT is not installed: pip install 'hwnas[gpu]' (tensorrt>=10)"
        return _cuda_reason()

    def settings(self) -> dict:
        import tensorrt as trt
        import torch

        from hwnas.export.tensorrt import fp16_supported

        return {"backend": self.name, "device": "gpu", "device_name": torch.cuda.get_device_name(),
                "runtime": "tensorrt", "runtime_version": trt.__version__, "threads": 0,
                "precision": "fp16" if (self.fp16 and fp16_supported()) else "fp32"}

    def prepare_onnx(self, onnx_bytes: bytes, input_shape) -> Runner:
        from hwnas.export.tensorrt import TrtEngine, build_engine

        engine = TrtEngine(build_engine(onnx_bytes, fp16=self.fp16, input_shape=input_shape))
        engine.bind(input_shape)
        return _CudaEventRunner(engine.execute, engine.stream)


BACKENDS: dict[str, type[LatencyBackend]] = {
    b.name: b for b in (OrtCpuBackend, TorchCudaBackend, TensorRTBackend)
}


def get_backend(device: str, backend: str | None = None, threads: int | None = None) -> LatencyBackend:
    """The backend for ``--device cpu|gpu`` (``backend`` picks one by name)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise HwnasError(f"unknown latency backend {backend!r}; choose from {sorted(BACKENDS)}")
        cls = BACKENDS[backend]
        reason = cls.unavailable_reason()
        if reason:
            raise HwnasError(f"backend {backend}: {reason}")
        return cls(threads=threads) if cls is OrtCpuBackend else cls()
    if device == "cpu":
        return OrtCpuBackend(threads=threads)
    if device == "gpu":
        trt_reason = TensorRTBackend.unavailable_reason()
        if trt_reason is None:
            return TensorRTBackend()
        cuda_reason = TorchCudaBackend.unavailable_reason()
        if cuda_reason is None:
            return TorchCudaBackend()
        raise HwnasError(f"--device gpu: {cuda_reason}; for TensorRT timings also "
                         "pip install 'hwnas[gpu]'")
    raise HwnasError(f"--device {device!r} must be cpu or gpu")
