"""One training loop for the gallery model, the supernet and query models.

* data lives in memory as a uint8 tensor (decoded once), shuffled per epoch from the seed;
* a progress bar shows loss, images/s and ETA; a line per epoch shows the loss parts;
* a checkpoint (one safetensors file: weights, optimizer state, epoch, history; written
  atomically) is saved after every epoch; ``resume=True`` continues from it, so a killed run
  loses at most the unfinished epoch;
* under ``torchrun`` (``WORLD_SIZE`` > 1) it runs DistributedDataParallel (gloo on CPU,
  nccl on GPU): each rank takes a shard of every epoch's permutation, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.utils import atomic_path, bars_off, content_hash, env_world_size, remove_left_temps

AUGMENTS = ("none", "crop", "crop-flip", "affine")

@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.3
    augment: str = "none"  # none | crop | crop-flip | affine
    grad_clip: float = 5.0  # 0: off
    threads: int = 0  # torch intra-op threads; 0: torch's default
    device: str = "auto"  # auto (a CUDA GPU when present, else the CPU) | cpu | cuda | cuda:N
    # exponential moving average of the weights (0: off): the model kept at the end is the
    # average, with decay min(ema, (1 + t) / (10 + t)) at step t; the training path is the same
    ema: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise HwnasError(f"train.epochs ({self.epochs}) must be at least 1 and train.batch_size "
                             f"({self.batch_size}) at least 2 (BatchNorm trains on a batch's statistics)")
        if self.optimizer not in ("sgd", "adamw"):
            raise HwnasError(f"train.optimizer {self.optimizer!r} must be 'sgd' or 'adamw'")
        if self.augment not in AUGMENTS:
            raise HwnasError(f"train.augment {self.augment!r} must be one of {', '.join(AUGMENTS)}")
        if self.lr <= 0:
            raise HwnasError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise HwnasError(f"train.momentum {self.momentum} must be in [0, 1) (e.g. 0.9)")
        if self.weight_decay < 0:
            raise HwnasError(f"train.weight_decay {self.weight_decay} must be >= 0 (e.g. 5e-5)")
        if self.grad_clip < 0:
            raise HwnasError(f"train.grad_clip {self.grad_clip} must be >= 0: the gradient norm's "
                             "ceiling (e.g. 5), 0 for none")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise HwnasError(f"train.warmup_epochs {self.warmup_epochs} must be from 0 to fewer than "
                             f"train.epochs ({self.epochs}): the learning rate's linear ramp, after "
                             "which it decays")
        if self.threads < 0:
            raise HwnasError(f"train.threads {self.threads} must be a thread count (1 or more), or 0 for PyTorch's default")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise HwnasError(f"train.device {self.device!r} must be auto, cpu, cuda or cuda:N")
        if not 0.0 <= self.ema < 1.0:
            raise HwnasError(f"train.ema {self.ema} must be in [0, 1): the weights' average decay "
                             "per step (e.g. 0.998), or 0 for none")


def train_device(cfg: TrainConfig) -> torch.device:
    """The device to train on. Under torchrun with CUDA, each process takes its LOCAL_RANK GPU."""
    want = cfg.device
    if want == "auto":
        want = "cuda" if gpu_per_process() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HwnasError(f"train.device is {cfg.device!r} but PyTorch sees no CUDA GPU here; "
                             "set train.device=cpu (or auto), or install a CUDA build of PyTorch")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not gpu_per_process():
            raise HwnasError(f"train.device is {cfg.device!r} but this node runs more processes than "
                             f"it has GPUs ({torch.cuda.device_count()}); start torchrun with "
                             "--nproc_per_node at most the GPU count, or set train.device=cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if want != "cuda" and local > 1:
            raise HwnasError(f"train.device is {cfg.device!r} under torchrun with {local} processes on "
                             "this node, which would put them all on that one GPU; set train.device=cuda "
                             "(or auto): each process then takes its own GPU (LOCAL_RANK)")
        if want == "cuda":
            want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        elif int(want.split(":")[1]) >= torch.cuda.device_count():
            raise HwnasError(f"train.device is {cfg.device!r} but PyTorch sees {torch.cuda.device_count()} "
                             f"GPU(s) here, cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of "
                             "them, or set train.device=cuda (or auto)")
    return torch.device(want)


# ---------------------------------------------------------------------- distributed
TORCHRUN_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")  # what env:// rendezvous needs


def dist_info() -> tuple[int, int]:
    """(rank, world size); initializes the process group under torchrun. A partial torchrun
    environment (WORLD_SIZE set by hand, say) is an error naming what is missing."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if not os.environ.get(k)]
        if missing:
            raise HwnasError(f"WORLD_SIZE is {world} but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: start several processes "
                             "with torchrun (e.g. torchrun --nproc_per_node 2 -m hwnas.cli ...), or unset "
                             "WORLD_SIZE to train in one")
        # nccl for CUDA tensors where each process has a GPU, gloo for CPU ones (a run with
        # train.device=cpu on a GPU node trains and all-reduces on the CPU)
        backend = "cpu:gloo,cuda:nccl" if gpu_per_process() else "gloo"
        # long: the other processes wait at a barrier while the first embeds the training
        # images for the cache (minutes for a large gallery at 224 px; NCCL's default is 10)
        from datetime import timedelta

        dist.init_process_group(backend, timeout=timedelta(hours=2))
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def gpu_per_process() -> bool:
    """Whether every process on this node can have a GPU of its own (nccl refuses two
    processes on one GPU); if not, distributed training runs on the CPUs over gloo."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.is_available() and torch.cuda.device_count() >= local


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return dist_info()[0] == 0


# ---------------------------------------------------------------------- augmentation
def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch, deterministically given ``gen``:
    ``crop``: random crop after reflect-padding by 1/8 of the size; ``crop-flip``: and a
    horizontal flip half the time (natural images); ``affine``: a random rotation (+-10
    degrees), scale (0.9-1.1) and shift (up to 1/8 of the size), edges extended
    (handwriting and other images that a flip would change the meaning of)."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    if mode == "affine":
        u = lambda *s: 2 * torch.rand(*s, generator=gen) - 1  # noqa: E731  uniform in [-1, 1]
        ang, scale, shift = u(n) * math.radians(10), 1 + 0.1 * u(n), 0.25 * u(n, 2)
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
    if mode == "crop-flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(3)
    return out


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, module: nn.Module, opt: torch.optim.Optimizer, meta: dict,
                    ema: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in (ema or {}).items()})
    sd = opt.state_dict()
    other: dict = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    meta = {**meta, "param_groups": sd["param_groups"], "opt_other": other}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"hwnas": json.dumps(meta)})


def _meta(f) -> dict:
    return json.loads((f.metadata() or {}).get("hwnas", "{}"))


def _read_checkpoint(path: Path, tensors: bool) -> tuple[dict, dict]:
    """A checkpoint's metadata, and its tensors if asked; a damaged file (a disk filled
    mid-write before writes were atomic, a copy cut short) is an error with the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return _meta(f), ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except (SafetensorError, OSError, ValueError) as e:
        raise HwnasError(f"checkpoint {path} is damaged ({e}); delete it to train from the "
                         "first epoch (or --restart)") from None


def checkpoint_meta(path: Path) -> dict:
    """A checkpoint's metadata (epoch, key, history, ...), without reading its tensors."""
    return _read_checkpoint(path, tensors=False)[0]


def load_checkpoint(path: Path, module: nn.Module, opt: torch.optim.Optimizer,
                    ema: "WeightAverage | None" = None) -> dict:
    meta, tensors = _read_checkpoint(path, tensors=True)
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["opt_other"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ---------------------------------------------------------------------- the loop
def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise HwnasError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, t)))


RUNTIME = ("device", "threads")  # where and on how many threads: not what is trained
# settings added after checkpoints were keyed: at these defaults they are left out of the
# key and of what a finished model is compared on, so a checkpoint or a model of an earlier
# hwnas (which trained the same) still resumes, or is kept
ADDED = {"ema": 0.0}


def what_trains(train: dict, runtime: tuple = RUNTIME) -> dict:
    """A ``train`` block as far as it decides what is learned: without the runtime settings
    and without settings added since at their defaults."""
    return {k: v for k, v in train.items() if k not in runtime and not (k in ADDED and v == ADDED[k])}


class WeightAverage:
    """An exponential moving average of a module's floating-point state (parameters and
    BatchNorm statistics), updated after each optimizer step; integer buffers (BatchNorm's
    step counts) are copied."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        live = module.state_dict()  # the module's own tensors (loading a state copies into them)
        self.state = {k: v.detach().clone() for k, v in live.items()}
        self._pairs = [(self.state[k], v.detach()) for k, v in live.items()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for avg, v in self._pairs:
            if avg.is_floating_point():
                avg.mul_(d).add_(v, alpha=1 - d)
            else:
                avg.copy_(v)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        # (a checkpoint of the same model with the same train.ema: its training key says so)
        for k, v in tensors.items():
            self.state[k].copy_(v)


def key_inputs(cfg: TrainConfig, settings: dict | None, world: int | None = None) -> dict:
    """What a checkpoint was trained with, as hashed into its key and kept beside it (to name
    what differs). Where it trains is not part of it: a CPU run may be resumed on a GPU, or
    at another thread count."""
    world = dist_info()[1] if world is None else world
    return json.loads(json.dumps({"train": what_trains(asdict(cfg)),
                                  "settings": settings or {}, "world": world}))


def training_key(cfg: TrainConfig, settings: dict | None, world: int | None = None) -> str:
    return content_hash(key_inputs(cfg, settings, world))


def _legacy_key(cfg: TrainConfig, settings: dict | None, world: int) -> str:
    """The key of checkpoints written before the key left out the thread count (hwnas up to
    stop 25), so a run killed under an older hwnas still resumes."""
    return content_hash({"train": what_trains(asdict(cfg), runtime=("device",)),
                         "settings": settings or {}, "world": world})


def _key_matches(key: str | None, cfg: TrainConfig, settings: dict | None,
                 legacy_settings: dict | None, world: int) -> bool:
    """A checkpoint's key is this training's, as keyed now or by an older hwnas."""
    return key in (training_key(cfg, settings, world), _legacy_key(cfg, legacy_settings or settings, world))


def _key_mismatch(path: Path, meta: dict, cfg: TrainConfig, settings: dict | None, world: int) -> str:
    """Why a checkpoint's key differs from the wanted one, naming the settings that differ."""
    old = meta.get("key_inputs")
    if old is None:  # written before checkpoints kept what they were keyed on
        return (f"{path} was made with other training settings; pass --restart to start over with "
                "the new settings (or restore the old config)")
    new = key_inputs(cfg, settings, world)
    if old["world"] != new["world"] and old["train"] == new["train"] and old["settings"] == new["settings"]:
        return (f"{path} was made by {old['world']} process(es), this run has {new['world']}: each "
                f"process trains its share of the images, so resume with torchrun --nproc_per_node "
                f"{old['world']} (or {'without torchrun' if old['world'] == 1 else 'as it ran'}), or "
                "--restart")
    diff = [f"train.{k}" for k in sorted(set(old["train"]) | set(new["train"]))
            if old["train"].get(k) != new["train"].get(k)]
    diff += [k for k in sorted(set(old["settings"]) | set(new["settings"]))
             if old["settings"].get(k) != new["settings"].get(k)]
    diff += ["world size"] if old["world"] != new["world"] else []
    return (f"{path} was made with other {', '.join(diff) or 'settings'} than this run's; pass "
            "--restart to start over with the new settings (or restore the old config)")


def drop_stale_checkpoint(ckpt_path: Path, cfg: TrainConfig, settings: dict | None, log=print,
                          legacy_settings: dict | None = None) -> None:
    """Remove an unfinished run's checkpoint made with other settings (``hwnas run`` after a
    config edit: the step is done again, and a kill's leftover must not block it)."""
    if not ckpt_path.exists():
        return
    if not _key_matches(checkpoint_meta(ckpt_path).get("key"), cfg, settings, legacy_settings, dist_info()[1]):
        log(f"[train] {ckpt_path} was made with other settings; starting over")
        ckpt_path.unlink()


_HELD: dict[str, int] = {}  # the lock files this process holds, by path, and how many times over


def training_lock(ckpt_path: Path, desc: str, log: Callable[[str], None] = print):
    """Hold ``ckpt_path``'s training for this process (a context manager): a second process
    that would train the same checkpoint (``hwnas train-query`` by hand beside ``hwnas run``,
    two runs on one run directory) is refused, naming the first, instead of both writing
    one checkpoint. An advisory lock (flock) that the system drops with its process, so a
    killed training leaves none behind (a finished one removes its file). The lock file lies
    beside the model's folder, not in it, so a --restart that empties the folder does not
    empty the lock. Where flock is missing (not POSIX) or the file system refuses it (NFS
    without lockd), no lock, said. Reentrant within a process (threads included: it keeps
    processes apart): a training function holds its folder's lock from its first look at the
    folder (hwnas.compat.api), and its training loop takes the same lock again."""
    import errno
    import socket

    try:
        import fcntl
    except ImportError:
        return contextlib.nullcontext()

    def unlocked(why: str) -> None:
        log(f"[{desc}] WARNING: no training lock ({why}); make sure no other process trains this model")

    def locked(path: Path):
        """The lock file, opened and locked by this process; None (said) where none can be taken."""
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "a+")
            except OSError as e:
                unlocked(f"{path}: {e.strerror or e}")
                return None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                who = f.read().strip() or "another process"
                f.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    unlocked(f"this file system takes none: {e.strerror or e}")
                    return None
                raise HwnasError(f"[{desc}] {who} is training {ckpt_path.parent} now: wait for it "
                                 "to finish (or stop it), then run this again (with --resume; "
                                 "hwnas run resumes by itself)") from None
            try:  # the file may have been released and removed between our open and our lock
                if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                    return f
            except FileNotFoundError:
                pass
            f.close()

    @contextlib.contextmanager
    def held():
        path = ckpt_path.parent.parent / f".{ckpt_path.parent.name}.{ckpt_path.name}.lock"
        key = str(path.resolve())
        if key in _HELD:  # this process holds it already
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        f = locked(path)
        _HELD[key] = 1  # (with no lock to take, too: the inner takes do not say so again)
        try:
            if f is not None:
                f.seek(0)
                f.truncate()
                f.write(f"process {os.getpid()} on {socket.gethostname()}")
                f.flush()
                # held: no one else writes the model's folder, so a temp file there is what a
                # write cut off by a kill left (a checkpoint's can be as large as the checkpoint)
                n, size = remove_left_temps(ckpt_path.parent)
                if n:
                    log(f"[{desc}] removed {n} temp file{'s' if n > 1 else ''} ({size / 1e6:.1f} MB) "
                        f"that {'writes' if n > 1 else 'a write'} cut off by a kill left in {ckpt_path.parent}")
            yield
        finally:  # removed while still held, so no one locks a file that is going away
            del _HELD[key]
            if f is not None:
                path.unlink(missing_ok=True)
                f.close()

    return held()


@contextlib.contextmanager
def checkpoint_lock(ckpt_path: Path, desc: str, log: Callable[[str], None] = print,
                    where_folder_may_be: bool = False):
    """:func:`training_lock`, taken by rank 0 alone, whose refusal (or failure) every rank
    raises under torchrun: the other ranks would otherwise wait at the next barrier for a
    rank that has left. ``where_folder_may_be``: only where the model folder's parent exists
    (none: no process trains there yet, and nothing is made for a mistyped run directory);
    rank 0 decides, so every rank takes part in the same collective."""
    rank, world = dist_info()
    with contextlib.ExitStack() as stack:
        failed = None
        if rank == 0 and (not where_folder_may_be or ckpt_path.parent.parent.is_dir()):
            try:
                stack.enter_context(training_lock(ckpt_path, desc, log))
            except Exception as e:  # (any: the other ranks must hear of it)
                failed = e
        if world > 1:
            import torch.distributed as dist

            said = [None if failed is None else str(failed)]
            dist.broadcast_object_list(said, src=0)
            if said[0] is not None and failed is None:
                raise HwnasError(said[0])
        if failed is not None:
            raise failed
        yield


def fit(module: nn.Module, images: torch.Tensor, labels: torch.Tensor,
        normalize: Callable[[torch.Tensor], torch.Tensor], cfg: TrainConfig, ckpt_path: Path,
        **kw) -> list[dict]:
    """:func:`_fit` (the loop; its keywords) under the checkpoint's :func:`training_lock`
    (rank 0: under torchrun every rank trains the one checkpoint that rank 0 writes)."""
    with checkpoint_lock(ckpt_path, kw.get("desc", "train"), kw.get("log", print)):
        return _fit(module, images, labels, normalize, cfg, ckpt_path, **kw)


def _fit(
    module: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    cfg: TrainConfig,
    ckpt_path: Path,
    *,
    seed: int = 0,
    resume: bool = False,
    desc: str = "train",
    settings: dict | None = None,
    find_unused: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    legacy_settings: dict | None = None,
) -> list[dict]:
    """Train ``module`` whose ``forward(x, y, idx)`` returns ``(loss, {part: value})``.

    ``module.before_step(epoch, step, progress)`` is called, if defined, before every step,
    ``progress`` being the fraction of training done (the supernet samples its path there,
    identically on every rank). ``settings`` are hashed into the checkpoint: resuming with
    other settings is refused, naming them (``legacy_settings``: what older hwnas versions
    keyed the same training on, where they keyed less). ``stop_after``: return after that many epochs of the
    schedule (the learning rate follows ``cfg.epochs`` all the same), leaving the checkpoint
    for a later call to resume: a short look at a model that may then be trained to the end
    exactly as if it had never stopped."""
    from tqdm import tqdm

    rank, world = dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = train_device(cfg)
    # (in PyTorch's default layout: channels_last trained 15-50% faster on this project's CPU
    # (torch 2.14), but its CPU BatchNorm sums batch statistics with ~100x float32's rounding,
    # and on near-constant channels the supernet's gradients came out up to 3% off float64
    # where the default layout's were 1e-5 off; six steps of a tiny supernet then parted by
    # 40% of how far they moved, against 1% for another thread count)
    _to_device(module, dev)  # before the optimizer, so it holds the moved parameters
    opt = make_optimizer(module.parameters(), cfg)
    ema = WeightAverage(module, cfg.ema) if cfg.ema else None
    key = training_key(cfg, settings, world)
    history: list[dict] = []
    start = 0
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    if ckpt_path.exists():
        if not resume:
            raise HwnasError(
                f"{ckpt_path} exists from an earlier run: pass --resume to continue it, or "
                "--restart to discard it and start over"
            )
        meta = checkpoint_meta(ckpt_path)
        if not _key_matches(meta["key"], cfg, settings, legacy_settings, world):
            raise HwnasError(_key_mismatch(ckpt_path, meta, cfg, settings, world))
        meta = load_checkpoint(ckpt_path, module, opt, ema)
        start, history = meta["epoch"] + 1, meta["history"]
        if start < end:
            log(f"[{desc}] resuming after epoch {start}/{cfg.epochs}")
    model = module
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(module, find_unused_parameters=find_unused,
                    device_ids=[dev.index] if dev.type == "cuda" else None)
    if rank == 0 and start < end:
        log(f"[{desc}] training on {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
            + (f", {world} processes" if world > 1 else ""))

    n = len(images)
    per_rank = n // world
    spe = max(1, per_rank // cfg.batch_size) if per_rank >= cfg.batch_size else 1
    total = spe * cfg.epochs
    t_run = time.time()
    for epoch in range(start, end):
        module.train()
        perm = np.random.default_rng([seed, epoch]).permutation(n)[rank::world][: spe * cfg.batch_size]
        gen = torch.Generator().manual_seed(seed * 100003 + epoch * 1009 + rank)
        # what draws from torch's global generator (the mix part's blend weights) draws per
        # epoch too, so a run resumed after a kill trains the very model an unbroken one would
        torch.manual_seed(int(np.random.default_rng([seed, epoch, rank, 1]).integers(2**62)))
        sums: dict[str, float] = {}
        t0 = time.time()
        bar = tqdm(total=len(perm), desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="img",
                   disable=bars_off(rank != 0), mininterval=2.0, leave=False, dynamic_ncols=True)
        for step in range(spe):
            idx = torch.from_numpy(perm[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            lr = lr_at(cfg, epoch * spe + step, total, spe)
            for g in opt.param_groups:
                g["lr"] = lr
            if hasattr(module, "before_step"):
                module.before_step(epoch, step, (epoch * spe + step) / total)
            x = augment_batch(normalize(images[idx]), cfg.augment, gen).to(dev, non_blocking=True)
            loss, parts = model(x, labels[idx].to(dev, non_blocking=True), idx)
            finite = here = bool(torch.isfinite(loss))
            if world > 1:  # every process stops together (one alone would leave the others
                # waiting in the gradients' all-reduce)
                bad = torch.tensor([0.0 if finite else 1.0], device=dev)
                dist.all_reduce(bad)
                finite = float(bad) == 0.0
            if not finite:
                raise HwnasError(f"[{desc}] loss became {float(loss.detach()) if not here else 'non-finite in another process'} "
                                 f"at epoch {epoch + 1} step {step}; lower train.lr (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(epoch * spe + step)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(len(idx))
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}", lr=f"{lr:.3g}")
        bar.close()
        if world > 1:  # the epoch's losses over every process's share, not the first's alone
            names = sorted(sums)
            t = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=dev)
            dist.all_reduce(t)
            sums = {k: float(v) / world for k, v in zip(names, t)}
        dt = time.time() - t0
        rec = {"epoch": epoch + 1, **{k: v / spe for k, v in sums.items()},
               "seconds": dt, "images_per_s": len(perm) * world / dt}
        history.append(rec)
        if rank == 0:
            save_checkpoint(ckpt_path, module, opt, {"epoch": epoch, "key": key, "history": history,
                                                     "key_inputs": key_inputs(cfg, settings, world)},
                            ema=ema.state if ema is not None else None)
            left = (end - epoch - 1) * dt
            parts_s = " ".join(f"{k} {v / spe:.3f}" for k, v in sums.items() if k != "loss")
            log(f"[{desc}] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} ({parts_s}) "
                f"{rec['images_per_s']:.0f} img/s, {dt:.0f} s, ETA {left / 60:.1f} min")
        barrier()
    if start < end and rank == 0:
        log(f"[{desc}] trained {end - start} epochs in {time.time() - t_run:.0f} s")
    if ema is not None and end == cfg.epochs:  # trained to the end: the average is the model
        module.load_state_dict(ema.state)
    _to_device(module, torch.device("cpu"))  # evaluation, export and saving run on the CPU
    return history


def _to_device(module: nn.Module, dev: torch.device) -> None:
    """Move a task, including the frozen parts it holds outside its registered submodules
    (``move_frozen(dev)``: the gallery network and classifier, cached embeddings)."""
    module.to(dev)
    if hasattr(module, "move_frozen"):
        module.move_frozen(dev)
