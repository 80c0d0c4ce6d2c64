"""Shape resolution: ``resolve_ops(space, arch) -> list[OpSpec]``.

This is the one function that turns an arch into concrete ops with shapes. ``OpSpec.key()``
is the canonical latency-table key; ``OpSpec.flops`` / ``.params`` are the analytic counts,
so the FLOPs of an arch is simply the sum over its ops.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwnas.space.spec import OP_KERNEL, OP_KIND, PROJ_KERNEL, SKIP, Arch, LayerSpec, SearchSpace


def _conv_flops(c_in: int, c_out: int, k: int, out_hw: int, groups: int = 1) -> int:
    return 2 * out_hw * out_hw * c_out * (c_in // groups) * k * k


def _conv_params(c_in: int, c_out: int, k: int, groups: int = 1, bn: bool = True) -> int:
    return c_out * (c_in // groups) * k * k + (2 * c_out if bn else 0)


@dataclass(frozen=True)
class OpSpec:
    """A concrete op: what runs, at which shapes. Hashable; ``key()`` names it in tables."""

    kind: str  # stem | shufflenet | xception | skip | head
    kernel: int
    stride: int
    in_size: int
    in_channels: int
    out_size: int
    out_channels: int
    mid_channels: int = 0  # shufflenet/xception middle channels; head: head conv channels
    layer: int = -1  # layer index, -1 for stem/head

    def key(self) -> str:
        base = (
            f"{self.kind}-k{self.kernel}-s{self.stride}-in{self.in_size}x{self.in_size}x"
            f"{self.in_channels}-out{self.out_size}x{self.out_size}x{self.out_channels}"
        )
        return base + (f"-mid{self.mid_channels}" if self.mid_channels else "")

    # ------------------------------------------------------------------ analytic costs
    @property
    def _branch(self) -> tuple[int, int]:
        bi = self.in_channels // 2 if self.stride == 1 else self.in_channels
        return bi, self.out_channels - bi

    @property
    def flops(self) -> int:
        o, m = self.out_size, self.mid_channels
        if self.kind == SKIP:
            return 0
        if self.kind == "stem":
            return _conv_flops(self.in_channels, self.out_channels, 3, o)
        if self.kind == "head":
            return (
                _conv_flops(self.in_channels, m, 1, self.in_size)
                + 2 * m * self.out_channels
            )
        bi, bo = self._branch
        k = self.kernel
        proj = 0
        if self.stride == 2:  # proj branch: dw PROJ_KERNEL + pw on the full input
            proj = _conv_flops(bi, bi, PROJ_KERNEL, o, groups=bi) + _conv_flops(bi, bi, 1, o)
        if self.kind == "shufflenet":
            main = (
                _conv_flops(bi, m, 1, self.in_size)
                + _conv_flops(m, m, k, o, groups=m)
                + _conv_flops(m, bo, 1, o)
            )
        else:  # xception: dw3(s) pw dw3 pw dw3 pw
            main = (
                _conv_flops(bi, bi, 3, o, groups=bi)
                + _conv_flops(bi, m, 1, o)
                + _conv_flops(m, m, 3, o, groups=m)
                + _conv_flops(m, m, 1, o)
                + _conv_flops(m, m, 3, o, groups=m)
                + _conv_flops(m, bo, 1, o)
            )
        return main + proj

    @property
    def params(self) -> int:
        m = self.mid_channels
        if self.kind == SKIP:
            return 0
        if self.kind == "stem":
            return _conv_params(self.in_channels, self.out_channels, 3)
        if self.kind == "head":
            return _conv_params(self.in_channels, m, 1) + m * self.out_channels + self.out_channels
        bi, bo = self._branch
        k = self.kernel
        proj = 0
        if self.stride == 2:
            proj = _conv_params(bi, bi, PROJ_KERNEL, groups=bi) + _conv_params(bi, bi, 1)
        if self.kind == "shufflenet":
            main = (
                _conv_params(bi, m, 1) + _conv_params(m, m, k, groups=m) + _conv_params(m, bo, 1)
            )
        else:
            main = (
                _conv_params(bi, bi, 3, groups=bi)
                + _conv_params(bi, m, 1)
                + _conv_params(m, m, 3, groups=m)
                + _conv_params(m, m, 1)
                + _conv_params(m, m, 3, groups=m)
                + _conv_params(m, bo, 1)
            )
        return main + proj


def stem_op(space: SearchSpace) -> OpSpec:
    return OpSpec(
        "stem", 3, 2, space.input_size, space.in_channels, space.stem_out_size,
        space.stem_channels,
    )


def head_op(space: SearchSpace) -> OpSpec:
    last = space.layers()[-1]
    # out_size 1: global pooling; out_channels: the embedding dimension.
    return OpSpec("head", 1, 1, last.out_size, last.out_channels, 1, space.embed_dim,
                  mid_channels=space.head_channels)


def layer_op(space: SearchSpace, layer: LayerSpec, op: str, scale: float | None) -> OpSpec:
    if op == SKIP:
        return OpSpec(SKIP, 0, 1, layer.in_size, layer.in_channels, layer.out_size,
                      layer.out_channels, 0, layer.index)
    return OpSpec(
        OP_KIND[op], OP_KERNEL[op], layer.stride, layer.in_size, layer.in_channels,
        layer.out_size, layer.out_channels,
        space.mid_channels(layer, scale), layer.index,
    )


def resolve_ops(space: SearchSpace, arch: Arch) -> list[OpSpec]:
    """Stem, one OpSpec per layer (``skip`` included, with zero FLOPs), head."""
    space.validate(arch)
    ops = [stem_op(space)]
    for layer, (op, scale) in zip(space.layers(), arch.layers):
        ops.append(layer_op(space, layer, op, scale))
    ops.append(head_op(space))
    return ops


def arch_flops(space: SearchSpace, arch: Arch) -> int:
    return sum(o.flops for o in resolve_ops(space, arch))


def arch_params(space: SearchSpace, arch: Arch) -> int:
    return sum(o.params for o in resolve_ops(space, arch))


def all_op_specs(space: SearchSpace) -> list[OpSpec]:
    """Every distinct op of the space (what a latency table must cover), skips excluded:
    a deployed subnet folds a skipped layer's channel shuffle into the next unit."""
    from hwnas.space.spec import enumerate_layer_choices

    seen: dict[str, OpSpec] = {}
    for spec in [stem_op(space), head_op(space)]:
        seen.setdefault(spec.key(), spec)
    for layer in space.layers():
        for op, scale in enumerate_layer_choices(space, layer):
            if op == SKIP:
                continue
            spec = layer_op(space, layer, op, scale)
            seen.setdefault(spec.key(), spec)
    return list(seen.values())
