"""The weight-sharing SPOS supernet and the standalone subnets extracted from it."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from hwnas.nn.blocks import (ChannelShuffle, ChoiceBlock, EmbeddingHead, Stem, make_proj, permute_inputs_,
                              shuffle_index)
from hwnas.space.ops import layer_op
from hwnas.space.spec import BLOCK_OPS, OP_KERNEL, OP_KIND, SKIP, Arch, SearchSpace


class Supernet(nn.Module):
    """Every op of every layer at its largest middle width; ``forward(x, arch)`` runs one
    path (the chosen op per layer at the chosen channel scale).

    Two choices keep every path's channels meaning the same thing, without which
    random-path training collapsed to a constant embedding (a trained path's loss rose
    4-7x when one layer was skipped or one stride-2 op swapped): a skipped layer applies the
    units' channel shuffle (``ChannelShuffle``), and each stride-2 layer has one projection
    branch (``projs``) shared by its ops."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.stem = Stem(space.in_channels, space.stem_channels)
        self.layers = nn.ModuleList()
        self.projs = nn.ModuleDict()
        self.shuffle = ChannelShuffle()
        for layer in space.layers():
            mid = space.max_mid_channels(layer)
            self.layers.append(nn.ModuleDict({
                op: ChoiceBlock(OP_KIND[op], layer.in_channels, layer.out_channels, mid,
                                OP_KERNEL[op], layer.stride, own_proj=False)
                for op in layer.choices if op != SKIP
            }))
            if layer.stride == 2:
                self.projs[str(layer.index)] = make_proj(layer.in_channels)
        last = space.layers()[-1]
        self.head = EmbeddingHead(last.out_channels, space.head_channels, space.embed_dim)

    def mids(self, arch: Arch) -> list[int | None]:
        return [
            None if op == SKIP else layer_op(self.space, layer, op, scale).mid_channels
            for layer, (op, scale) in zip(self.space.layers(), arch.layers)
        ]

    def proj(self, i: int) -> nn.Module | None:
        """Layer ``i``'s shared projection branch (stride-2 layers), else None."""
        return self.projs[str(i)] if str(i) in self.projs else None

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        x = self.stem(x)
        for i, (blocks, (op, _), mid) in enumerate(zip(self.layers, arch.layers, self.mids(arch))):
            x = self.shuffle(x) if op == SKIP else blocks[op](x, mid, self.proj(i))
        return self.head(x)

    def path_modules(self, arch: Arch) -> Iterable[nn.Module]:
        """The modules one path uses (for per-path gradient checks and BN handling)."""
        yield self.stem
        for i, (blocks, (op, _)) in enumerate(zip(self.layers, arch.layers)):
            if op != SKIP:
                yield blocks[op]
            if self.proj(i) is not None:
                yield self.proj(i)
        yield self.head

    @torch.no_grad()
    def extract(self, arch: Arch) -> "SubNet":
        """A standalone ``SubNet`` holding only the chosen ops, with inherited weights and
        BatchNorm statistics (recalibrate first for meaningful statistics)."""
        self.space.validate(arch)
        sub = SubNet(self.space, arch)
        sub.stem.load_state_dict(self.stem.state_dict())
        sub.head.load_state_dict(self.head.state_dict())
        for i, (sub_block, blocks, (op, _)) in enumerate(zip(sub.layers, self.layers, arch.layers)):
            if op != SKIP:
                copy_leading_slices(blocks[op], sub_block, skip_prefix="proj.")
                if sub_block.proj is not None:
                    sub_block.proj.load_state_dict(self.proj(i).state_dict())
        sub.train(self.training)
        return sub


class SubNet(nn.Module):
    """One architecture as a plain network: ``forward(x)`` -> L2-normalized embeddings.

    It computes exactly what the supernet's path computes, but a skipped layer is an
    ``nn.Identity``: the channel shuffles of skipped layers are folded into the channel
    selection of the next unit (``ChoiceBlock.set_input_perm``) or a gather before the
    head, so skips cost an edge device nothing."""

    def __init__(self, space: SearchSpace, arch: Arch):
        super().__init__()
        space.validate(arch)
        self.space, self.arch = space, arch
        self.stem = Stem(space.in_channels, space.stem_channels)
        self.layers = nn.ModuleList()
        perm = None  # pending shuffles: the logical tensor is x[:, perm]
        for layer, (op, scale) in zip(space.layers(), arch.layers):
            if op == SKIP:
                self.layers.append(nn.Identity())
                s = shuffle_index(layer.in_channels)
                perm = s if perm is None else perm[s]
            else:
                mid = layer_op(space, layer, op, scale).mid_channels
                block = ChoiceBlock(OP_KIND[op], layer.in_channels, layer.out_channels, mid,
                                    OP_KERNEL[op], layer.stride)
                block.set_input_perm(perm)
                perm = None
                self.layers.append(block)
        self.register_buffer("head_perm", perm, persistent=False)
        last = space.layers()[-1]
        self.head = EmbeddingHead(last.out_channels, space.head_channels, space.embed_dim)

    @torch.no_grad()
    def deploy_form(self) -> "SubNet":
        """A copy computing the same function with the channel permutations that skips left
        before stride-2 units and before the head folded into those units' and the head's
        weights (``ChoiceBlock.fold_input_perm_``), so the exported graph has no Gather
        there (on this project's reference CPU, 5-11% faster for the 32 px query models near
        the search's budget). What ``export_onnx`` exports, so what is timed and deployed."""
        import copy

        net = copy.deepcopy(self)
        for block in net.layers:
            if isinstance(block, ChoiceBlock):
                block.fold_input_perm_()
        if net.head_perm is not None:
            permute_inputs_(net.head.conv[0], torch.argsort(net.head_perm))
            net.head_perm = None
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        if self.head_perm is not None:
            x = x[:, self.head_perm]
        return self.head(x)


def copy_leading_slices(src: nn.Module, dst: nn.Module, skip_prefix: str | None = None) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst`` by taking the leading slice
    of each dimension (``dst`` is the same module built narrower); names starting with
    ``skip_prefix`` are left to the caller."""
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    for name, t in dst_state.items():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        s = src_state[name]
        if s.dim() != t.dim():
            raise ValueError(f"cannot slice {name}: {tuple(s.shape)} -> {tuple(t.shape)}")
        t.copy_(s[tuple(slice(0, n) for n in t.shape)] if t.dim() else s)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    arch: Arch | None = None,
) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the exact mean
    over ``batches`` (momentum None) for the path ``arch`` (supernet) or the model itself.

    Leaves the model in eval mode; returns the number of images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for x in batches:
            if arch is None:
                model(x)
            else:
                model(x, arch)
            n += x.shape[0]
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    if n == 0:
        raise ValueError("recalibrate_bn needs at least one batch")
    return n


def calibration_batches(images: torch.Tensor, normalize, seed: int, n: int = 1024,
                        batch: int = 128) -> list[torch.Tensor]:
    """The batches ``recalibrate_bn`` estimates statistics on: ``n`` of ``images`` drawn at
    random with ``seed`` (never the first ``n``: class folders and most manifests list their
    images class by class, and a few classes' statistics are not the data's)."""
    import numpy as np

    sel = np.random.default_rng(seed).permutation(len(images))[:n]
    return [normalize(images[sel[i:i + batch]]) for i in range(0, len(sel), batch)]


__all__ = ["BLOCK_OPS", "SubNet", "Supernet", "calibration_batches", "copy_leading_slices",
           "recalibrate_bn"]
