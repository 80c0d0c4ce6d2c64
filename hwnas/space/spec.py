"""The query search space: one frozen, serializable spec with a content hash.

Everything that needs a channel width, a spatial size or a per-layer choice list reads it
from here (the supernet, the FLOPs and parameter counts, the latency profiler, the Optuna
sampler, the exporter). Nothing else re-derives widths.

The space is SPOS ShuffleNetV2 (Guo et al., ECCV 2020) with channel search:

* stem: 3x3 conv, stride 2, BN, ReLU;
* four stages of 4/4/8/4 choice layers; the first layer of a stage has stride 2;
* per layer an op from ``k3``/``k5``/``k7`` (ShuffleNetV2 unit with that depthwise
  kernel) or ``xc`` (Shuffle-Xception unit), plus ``skip`` on stride-1 layers;
* per non-skip layer a scale of the block's middle channels (SPOS channel search);
* head: 1x1 conv, BN, ReLU, global average pooling, linear embedding, L2 normalization.

FLOPs follow ``torch.utils.flop_counter``: 2 x multiply-accumulates of convolutions and
linear layers (BatchNorm, ReLU, pooling and the normalization are not counted).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from hwnas.errors import SpaceError
from hwnas.utils import content_hash

# v2: a skipped layer applies the units' channel shuffle instead of the identity, and a
# stride-2 unit's projection branch has a fixed 3x3 depthwise kernel (shared by the
# supernet's ops); v1 tables, supernets and query models do not describe v2 networks.
SPACE_FORMAT = "hwnas-space-v2"
PROJ_KERNEL = 3  # depthwise kernel of a stride-2 unit's projection branch, for every op

#: Ops that carry a block. ``skip`` (the channel shuffle alone, no weights) is allowed only
#: on stride-1 layers.
BLOCK_OPS = ("k3", "k5", "k7", "xc")
SKIP = "skip"
OP_KERNEL = {"k3": 3, "k5": 5, "k7": 7, "xc": 3}
OP_KIND = {"k3": "shufflenet", "k5": "shufflenet", "k7": "shufflenet", "xc": "xception"}

DEFAULT_SCALES = tuple(round(0.2 * i, 1) for i in range(1, 11))  # 0.2 .. 2.0


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (never below ``min_value``, never
    more than 10% below ``v``) — the MobileNet rule, so widths stay hardware friendly."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output size of a conv with 'same'-style padding ``kernel // 2``."""
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


@dataclass(frozen=True)
class LayerSpec:
    """One choice layer with everything resolved from the space (no arch needed)."""

    index: int
    stage: int
    stride: int
    in_channels: int
    out_channels: int
    in_size: int  # spatial (square) input size
    out_size: int
    choices: tuple[str, ...]  # ops allowed here (``skip`` only where stride == 1)

    @property
    def branch_in(self) -> int:
        """Channels entering the main branch (half on stride 1: the other half bypasses)."""
        return self.in_channels // 2 if self.stride == 1 else self.in_channels

    @property
    def branch_out(self) -> int:
        """Channels the main branch produces (the rest come from the bypass/proj branch)."""
        return self.out_channels - self.branch_in

    @property
    def base_mid(self) -> int:
        """Middle channels at scale 1.0 (SPOS: half the output width)."""
        return self.out_channels // 2


@dataclass(frozen=True)
class SearchSpace:
    """A frozen, hashable description of the query search space."""

    input_size: int = 32
    in_channels: int = 3
    stem_channels: int = 16
    stage_layers: tuple[int, ...] = (4, 4, 8, 4)
    stage_widths: tuple[int, ...] = (64, 160, 320, 640)
    width_mult: float = 1.0
    head_channels: int = 1024
    embed_dim: int = 128
    ops: tuple[str, ...] = BLOCK_OPS
    allow_skip: bool = True
    channel_scales: tuple[float, ...] = DEFAULT_SCALES
    channel_divisor: int = 8
    name: str = field(default="default", compare=False)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SpaceError(f"invalid search space: {msg}")

        # Normalize list-like fields (from YAML/JSON) to tuples so the spec stays hashable.
        for f in ("stage_layers", "stage_widths", "ops", "channel_scales"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(
            self, "channel_scales", tuple(float(s) for s in self.channel_scales)
        )
        # one number type, so that equal spaces hash alike (width_mult: 1 is 1.0)
        object.__setattr__(self, "width_mult", float(self.width_mult))
        if all(float(w) == int(w) for w in self.stage_widths):
            object.__setattr__(self, "stage_widths", tuple(int(w) for w in self.stage_widths))
        if self.input_size < 8:
            bad(f"input_size={self.input_size}; use at least 8 pixels")
        if self.in_channels not in (1, 3):
            bad(f"in_channels={self.in_channels}; use 1 (grayscale) or 3 (RGB)")
        if len(self.stage_layers) != len(self.stage_widths) or not self.stage_layers:
            bad(
                f"stage_layers {list(self.stage_layers)} and stage_widths "
                f"{list(self.stage_widths)} must be non-empty and of equal length"
            )
        if any(n < 1 for n in self.stage_layers):
            bad(f"every stage needs at least one layer, got {list(self.stage_layers)}")
        if self.channel_divisor < 2 or self.channel_divisor % 2:
            bad(f"channel_divisor={self.channel_divisor}; use an even number >= 2")
        unknown = [o for o in self.ops if o not in BLOCK_OPS]
        if unknown or not self.ops:
            bad(f"unknown ops {unknown}; choose from {list(BLOCK_OPS)} ('skip' is added "
                "by allow_skip)")
        if len(set(self.ops)) != len(self.ops):
            bad(f"duplicate ops in {list(self.ops)}")
        if not self.channel_scales or any(s <= 0 for s in self.channel_scales):
            bad(f"channel_scales must be positive, got {list(self.channel_scales)}")
        if sorted(set(self.channel_scales)) != list(self.channel_scales):
            bad(f"channel_scales must be strictly increasing, got {list(self.channel_scales)}")
        if self.embed_dim < 2 or self.head_channels < 2 or self.stem_channels < 2:
            bad("embed_dim, head_channels and stem_channels must be at least 2")
        widths = self.widths()
        prev = self.stem_channels
        for s, w in enumerate(widths):
            if w <= prev:
                bad(
                    f"stage {s} width {w} must exceed the previous width {prev} "
                    "(a stride-2 ShuffleNet unit concatenates its input); raise "
                    "stage_widths or width_mult, or lower stem_channels"
                )
            prev = w

    # ------------------------------------------------------------------ derived shape
    def widths(self) -> tuple[int, ...]:
        """Stage output widths after the width multiplier (the only place this is done)."""
        return tuple(
            make_divisible(w * self.width_mult, self.channel_divisor) for w in self.stage_widths
        )

    @property
    def num_layers(self) -> int:
        return sum(self.stage_layers)

    @property
    def stem_out_size(self) -> int:
        return conv_out(self.input_size, 3, 2)

    def layers(self) -> tuple[LayerSpec, ...]:
        out = []
        size = self.stem_out_size
        c_in = self.stem_channels
        idx = 0
        for s, (n, w) in enumerate(zip(self.stage_layers, self.widths())):
            for j in range(n):
                stride = 2 if j == 0 else 1
                o_size = conv_out(size, 3, stride)
                choices = self.ops + ((SKIP,) if (stride == 1 and self.allow_skip) else ())
                out.append(LayerSpec(idx, s, stride, c_in, w, size, o_size, choices))
                c_in, size = w, o_size
                idx += 1
        return tuple(out)

    @property
    def final_size(self) -> int:
        return self.layers()[-1].out_size

    def mid_channels(self, layer: LayerSpec, scale: float) -> int:
        """Middle channels of ``layer`` at channel ``scale``."""
        return make_divisible(layer.base_mid * scale, self.channel_divisor)

    def canonical(self, arch: "Arch") -> "Arch":
        """``arch`` with each layer's channel scale replaced by the smallest listed scale that
        gives the same middle channels. Where a layer's base width is small, rounding to the
        channel divisor maps several scales to one width (the quickstart's first stage: 10
        scales, 4 widths), so two arch strings can name one network; the canonical string
        is one per network, for telling archs apart (the search's repeats, the finalists,
        a baseline other than the searched arch)."""
        out = []
        for layer, smallest, (op, scale) in zip(self.layers(), self._smallest_scale_of_width(), arch.layers):
            if op != SKIP:
                scale = smallest.get(self.mid_channels(layer, scale), scale)
            out.append((op, scale))
        return Arch(tuple(out))

    def network(self, arch: str) -> "Arch":
        """The canonical arch of an arch string: equal for two strings exactly when they name
        one network (``canonical``)."""
        return self.canonical(self.parse(arch))

    @functools.lru_cache(maxsize=8)
    def _smallest_scale_of_width(self) -> tuple[dict[int, float], ...]:
        """Per layer, middle width -> the smallest listed scale giving it (the space is frozen,
        so this is worked out once, not per proposal of a search)."""
        out = []
        for layer in self.layers():
            m: dict[int, float] = {}
            for sc in sorted(self.channel_scales):
                m.setdefault(self.mid_channels(layer, sc), sc)
            out.append(m)
        return tuple(out)

    def max_mid_channels(self, layer: LayerSpec) -> int:
        return self.mid_channels(layer, max(self.channel_scales))

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_layers"] = list(self.stage_layers)
        d["stage_widths"] = list(self.stage_widths)
        d["ops"] = list(self.ops)
        d["channel_scales"] = list(self.channel_scales)
        d["format"] = SPACE_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        d = dict(d)
        fmt = d.pop("format", SPACE_FORMAT)
        if fmt != SPACE_FORMAT:
            raise SpaceError(
                f"search space format {fmt!r} is not {SPACE_FORMAT!r}: it was made by another "
                "hwnas version whose networks differ; rebuild it with this version (re-run "
                "`hwnas profile` for a latency table, the training commands for models)"
            )
        from hwnas.fields import checked_fields

        return cls(**checked_fields(cls, d, "space", SpaceError))

    @property
    def hash(self) -> str:
        """Content hash of everything that changes shapes (the name does not count)."""
        d = self.to_dict()
        d.pop("name")
        return content_hash(d)

    # ------------------------------------------------------------------ archs
    def parse(self, text: str) -> "Arch":
        return Arch.parse(text, self)

    def sample(self, rng: random.Random | int | None = None) -> "Arch":
        """A uniformly random arch: each layer's op uniform over its choices, then its
        channel scale uniform over the list (SPOS's uniform path sampling)."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        layers = []
        for layer in self.layers():
            op = rng.choice(layer.choices)
            layers.append((op, None if op == SKIP else rng.choice(self.channel_scales)))
        return Arch(tuple(layers))

    def sample_spread(self, rng: random.Random | int | None = None) -> "Arch":
        """A random arch whose depth varies from path to path: one skip probability u ~ U(0, 1)
        per arch; each layer that may skip does so with probability u, else takes a uniform
        non-skip op at a uniform channel scale. Uniform sampling (:meth:`sample`) skips a
        layer with the same small probability in every path, so nearly all its paths have
        FLOPs near the space's middle and the shallow, cheap paths a tight budget searches are
        almost never trained; these paths spread over the space's range."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        u = rng.random()
        layers = []
        for layer in self.layers():
            ops = [op for op in layer.choices if op != SKIP]
            if SKIP in layer.choices and (not ops or rng.random() < u):
                layers.append((SKIP, None))
            else:
                layers.append((rng.choice(ops), rng.choice(self.channel_scales)))
        return Arch(tuple(layers))

    def _extreme(self, pick) -> "Arch":
        from hwnas.space.ops import layer_op

        layers = []
        for layer in self.layers():
            cands = [
                (op, None if op == SKIP else s)
                for op in layer.choices
                for s in ((None,) if op == SKIP else self.channel_scales)
            ]
            layers.append(pick(cands, key=lambda c: layer_op(self, layer, *c).flops))
        return Arch(tuple(layers))

    def smallest(self) -> "Arch":
        """The arch with the fewest FLOPs (per-layer costs are independent, so per-layer min)."""
        return self._extreme(min)

    def largest(self) -> "Arch":
        return self._extreme(max)

    def anchor(self) -> "Arch":
        """The plain ShuffleNetV2 of the space: every layer its first op at the channel scale
        nearest 1.0 (the supernet's path warm-up starts from it)."""
        scale = min(self.channel_scales, key=lambda s: (abs(s - 1.0), s))
        return Arch(tuple((self.ops[0], scale) for _ in self.layers()))

    def validate(self, arch: "Arch") -> "Arch":
        layers = self.layers()
        if len(arch.layers) != len(layers):
            raise SpaceError(
                f"arch has {len(arch.layers)} layers but the space (hash {self.hash}) has "
                f"{len(layers)} ({'/'.join(map(str, self.stage_layers))} per stage)"
            )
        for layer, (op, scale) in zip(layers, arch.layers):
            if op not in layer.choices:
                why = " (skip needs a stride-1 layer)" if op == SKIP else ""
                raise SpaceError(
                    f"layer {layer.index} (stage {layer.stage}, stride {layer.stride}): op "
                    f"{op!r} is not one of {list(layer.choices)}{why}"
                )
            if op != SKIP and not any(math.isclose(scale, s) for s in self.channel_scales):
                raise SpaceError(
                    f"layer {layer.index}: channel scale {scale} is not one of "
                    f"{list(self.channel_scales)}"
                )
        return arch

    # ------------------------------------------------------------------ Optuna
    def suggest(self, trial) -> "Arch":
        """An arch from an Optuna trial, with stable parameter names: ``L07_op`` per layer,
        ``L07_scale`` (conditional: only when the op is not ``skip``)."""
        layers = []
        for layer in self.layers():
            op = trial.suggest_categorical(f"L{layer.index:02d}_op", list(layer.choices))
            scale = None
            if op != SKIP:
                scale = trial.suggest_categorical(f"L{layer.index:02d}_scale", list(self.channel_scales))
            layers.append((op, scale))
        return Arch(tuple(layers))

    def params_of(self, arch: "Arch") -> dict:
        """The Optuna parameters that ``suggest`` would produce for ``arch`` (for enqueueing)."""
        self.validate(arch)
        out: dict = {}
        for layer, (op, scale) in zip(self.layers(), arch.layers):
            out[f"L{layer.index:02d}_op"] = op
            if op != SKIP:
                out[f"L{layer.index:02d}_scale"] = scale
        return out

    def num_archs(self) -> int:
        """Distinct networks: per layer, each op at each width its scales give (two scales
        that round to one width are one network, ``canonical``), and skip once."""
        n = 1
        for layer, widths in zip(self.layers(), self._smallest_scale_of_width()):
            ops = [o for o in layer.choices if o != SKIP]
            n *= len(ops) * len(widths) + (1 if SKIP in layer.choices else 0)
        return n


def _scale_text(scale: float) -> str:
    """A channel scale as an arch string writes it: short (``0.5``, ``1``) where that reads
    back as the very number, else in full (1/3 as ``0.3333333333333333``), so that every
    string parses back to its arch."""
    short = f"{scale:g}"
    return short if float(short) == scale else repr(scale)


@dataclass(frozen=True)
class Arch:
    """One path through the space: per layer ``(op, channel_scale)`` (scale None for skip).

    String form: layers joined by ``,``, stages by ``/``, each layer ``op@scale`` or
    ``skip``, e.g. ``k3@1,k5@0.6,skip,xc@2/k7@0.4,...``. It round-trips exactly and needs no
    shell quoting.
    """

    layers: tuple[tuple[str, float | None], ...]

    def __post_init__(self) -> None:
        norm = []
        for op, scale in self.layers:
            norm.append((op, None if op == SKIP else float(scale)))
        object.__setattr__(self, "layers", tuple(norm))

    def to_string(self, space: SearchSpace | None = None) -> str:
        toks = [SKIP if op == SKIP else f"{op}@{_scale_text(scale)}" for op, scale in self.layers]
        if space is None:
            return ",".join(toks)
        out, i = [], 0
        for n in space.stage_layers:
            out.append(",".join(toks[i : i + n]))
            i += n
        return "/".join(out)

    def __str__(self) -> str:
        return self.to_string()

    @classmethod
    def parse(cls, text: str, space: SearchSpace | None = None) -> "Arch":
        text = text.strip()
        if not text:
            raise SpaceError("empty arch string; expected e.g. 'k3@1,k5@0.6,skip,...'")
        stages = text.split("/")
        layers = []
        for tok in ",".join(stages).split(","):
            tok = tok.strip()
            if tok == SKIP:
                layers.append((SKIP, None))
                continue
            op, sep, sc = tok.partition("@")
            if not sep or op not in BLOCK_OPS:
                raise SpaceError(
                    f"bad arch token {tok!r}: expected 'skip' or OP@SCALE with OP in "
                    f"{list(BLOCK_OPS)}, e.g. 'k5@0.6'"
                )
            try:
                scale = float(sc)
            except ValueError:
                raise SpaceError(f"bad channel scale in arch token {tok!r}") from None
            layers.append((op, scale))
        if space is not None:  # snap scales to the space's exact values
            layers = [(op, next((s for s in space.channel_scales if math.isclose(s, sc)), sc)
                       if sc is not None else None) for op, sc in layers]
        arch = cls(tuple(layers))
        if space is not None:
            if len(stages) > 1 and [len(s.split(",")) for s in stages] != list(space.stage_layers):
                raise SpaceError(
                    f"arch stages have {[len(s.split(',')) for s in stages]} layers but the "
                    f"space has {list(space.stage_layers)}"
                )
            space.validate(arch)
        return arch

    @property
    def depth(self) -> int:
        """Number of non-skip layers."""
        return sum(op != SKIP for op, _ in self.layers)


def enumerate_layer_choices(space: SearchSpace, layer: LayerSpec) -> Iterable[tuple[str, float | None]]:
    for op in layer.choices:
        if op == SKIP:
            yield (SKIP, None)
        else:
            for s in space.channel_scales:
                yield (op, s)


def archs_from_strings(space: SearchSpace, texts: Sequence[str]) -> list[Arch]:
    return [Arch.parse(t, space) for t in texts]
