"""ShuffleNetV2 / Shuffle-Xception units whose middle channels can be sliced.

One block class serves both the supernet (built at the largest middle width, run at any
smaller one by slicing the leading channels of its weights) and the standalone subnet
(built at exactly the chosen width, where no slicing happens and ONNX export sees plain
Conv/BatchNormalization nodes). Because every sliced dimension is a *leading* channel
dimension, extracting a subnet is a generic leading-slice copy of each tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.space.spec import PROJ_KERNEL


class SlimConv2d(nn.Conv2d):
    """A bias-free conv that can run on the first ``in`` input / ``out`` output channels.

    Depthwise convs (``groups == in_channels``) slice both together."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, depthwise: bool = False):
        super().__init__(c_in, c_out, k, stride, k // 2, groups=c_in if depthwise else 1, bias=False)
        self.depthwise = depthwise

    def forward(self, x: torch.Tensor, c_out: int | None = None) -> torch.Tensor:  # type: ignore[override]
        if torch.onnx.is_in_onnx_export():  # exported modules are standalone: full widths
            return super().forward(x)
        c_in = x.shape[1]
        if self.depthwise:
            if c_in == self.in_channels:
                return super().forward(x)
            return F.conv2d(x, self.weight[:c_in], None, self.stride, self.padding, 1, c_in)
        c_out = self.out_channels if c_out is None else c_out
        if c_in == self.in_channels and c_out == self.out_channels:
            return super().forward(x)
        return F.conv2d(x, self.weight[:c_out, :c_in], None, self.stride, self.padding)


class SlimBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``x.shape[1]`` channels; running stats update in place on
    the slice, so per-subnet recalibration works in the supernet too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.onnx.is_in_onnx_export():
            return super().forward(x)
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        else:
            factor = 0.0
        use_batch_stats = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            self.running_mean[:c] if self.running_mean is not None else None,
            self.running_var[:c] if self.running_var is not None else None,
            self.weight[:c],
            self.bias[:c],
            use_batch_stats,
            factor,
            self.eps,
        )


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=1)``, written so that ONNX export gives three nodes (ReduceL2,
    Clip, Div) instead of five (F.normalize adds Shape and Expand): on a 32 px query model
    that runs in 70 us on one CPU thread, the two nodes cost about 1.5 us."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def _permute_depthwise_(conv: nn.Conv2d, bn: nn.BatchNorm2d, inv: torch.Tensor) -> None:
    """A depthwise conv and its BatchNorm computing on ``x`` what they computed on
    ``x[:, perm]`` (``inv = argsort(perm)``); their output comes out in ``x``'s order."""
    conv.weight.copy_(conv.weight[inv].clone())
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[inv].clone())


def permute_inputs_(conv: nn.Conv2d, inv: torch.Tensor) -> None:
    """A 1x1 conv computing on ``x`` what it computed on ``x[:, perm]``."""
    conv.weight.copy_(conv.weight[:, inv].clone())


def split_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPOS channel shuffle + split: even channels bypass, odd channels enter the branch."""
    return x[:, 0::2], x[:, 1::2]


def make_proj(c: int) -> nn.Sequential:
    """The projection branch of a stride-2 unit: depthwise 3x3 stride 2, BN, 1x1, BN, ReLU.

    One per stride-2 *layer* in the supernet, shared by every op of that layer: with a
    projection per op, switching the op replaced half of all channels with the output of a
    differently initialized branch, and random-path training collapsed (see Supernet)."""
    return nn.Sequential(
        nn.Conv2d(c, c, PROJ_KERNEL, 2, PROJ_KERNEL // 2, groups=c, bias=False),
        nn.BatchNorm2d(c),
        nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
    )


def shuffle_index(c: int) -> torch.Tensor:
    """``cat(x[:, 0::2], x[:, 1::2]) == x[:, shuffle_index(C)]``."""
    return torch.cat([torch.arange(0, c, 2), torch.arange(1, c, 2)])


class ChannelShuffle(nn.Module):
    """What a skipped (stride-1) layer does: the unit's channel shuffle with the branch
    replaced by the identity, ``cat(x[:, 0::2], x[:, 1::2])``.

    A unit outputs ``cat(bypass = x[:, 0::2], branch(x[:, 1::2]))``. A plain identity for
    ``skip`` would hand the next layer its channels in another order than any op does, so
    every weight downstream would see scrambled inputs whenever the path skips a layer; with
    the shuffle, channel ``c`` means the same thing whichever choice the layer takes.

    Standalone subnets (what is exported) do not run it: ``SubNet`` folds the shuffles of
    skipped layers into the channel selection of the next unit, so a skip costs nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(split_channels(x), 1)


class ChoiceBlock(nn.Module):
    """A ShuffleNetV2 unit (``shufflenet``, depthwise kernel ``k``) or a Shuffle-Xception
    unit (``xception``), with stride 1 (half the channels bypass) or 2 (a projection branch
    downsamples the full input).

    ``forward(x, mid)`` runs with ``mid`` middle channels (default: all it was built with).
    The stride-2 projection branch is the same for every op (depthwise ``PROJ_KERNEL``).
    """

    def __init__(self, kind: str, c_in: int, c_out: int, mid: int, k: int, stride: int,
                 own_proj: bool = True):
        super().__init__()
        if kind not in ("shufflenet", "xception"):
            raise ValueError(f"unknown block kind {kind!r}")
        self.kind, self.stride, self.mid = kind, stride, mid
        bi = c_in // 2 if stride == 1 else c_in
        bo = c_out - bi
        self.branch_out = bo
        relu = nn.ReLU(inplace=True)
        self.relu = relu
        if kind == "shufflenet":
            self.convs = nn.ModuleList([
                SlimConv2d(bi, mid, 1),
                SlimConv2d(mid, mid, k, stride, depthwise=True),
                SlimConv2d(mid, bo, 1),
            ])
            # (output channels: None = mid, or the branch output) and whether ReLU follows
            self._plan = [(None, True), (None, False), (bo, True)]
        else:
            self.convs = nn.ModuleList([
                SlimConv2d(bi, bi, 3, stride, depthwise=True),
                SlimConv2d(bi, mid, 1),
                SlimConv2d(mid, mid, 3, depthwise=True),
                SlimConv2d(mid, mid, 1),
                SlimConv2d(mid, mid, 3, depthwise=True),
                SlimConv2d(mid, bo, 1),
            ])
            self._plan = [(None, False), (None, True), (None, False), (None, True),
                          (None, False), (bo, True)]
        self.bns = nn.ModuleList([SlimBatchNorm2d(c.out_channels) for c in self.convs])
        # the supernet passes its layer's shared projection to forward() instead
        self.proj = make_proj(bi) if stride == 2 and own_proj else None
        self.register_buffer("in_perm", None, persistent=False)

    def set_input_perm(self, perm: torch.Tensor | None) -> None:
        """Run as if the input were ``x[:, perm]`` (the channel shuffles of skipped layers
        before this unit, folded): a stride-1 unit selects its two halves with ``perm`` (two
        Gathers in place of two Slices, no extra op); a stride-2 unit gathers its input once.
        Derived from the arch alone, so not saved with the weights."""
        self.in_perm = None if perm is None else perm.clone()

    @torch.no_grad()
    def fold_input_perm_(self) -> None:
        """Fold a stride-2 unit's input permutation into its weights, in place: both of its
        branches start with a conv over every input channel (a depthwise conv, whose
        channels and BatchNorm are permuted along with the input columns of the 1x1 conv
        after it, or a 1x1 conv, whose input columns are permuted), so the unit computes
        the same function on the unpermuted input and the Gather leaves the graph. A
        stride-1 unit keeps its two Gathers: half its channels bypass every weight."""
        if self.stride != 2 or self.in_perm is None or self.proj is None:
            return
        inv = torch.argsort(self.in_perm)
        _permute_depthwise_(self.proj[0], self.proj[1], inv)
        permute_inputs_(self.proj[2], inv)
        if self.kind == "shufflenet":
            permute_inputs_(self.convs[0], inv)
        else:
            _permute_depthwise_(self.convs[0], self.bns[0], inv)
            permute_inputs_(self.convs[1], inv)
        self.in_perm = None

    def forward(self, x: torch.Tensor, mid: int | None = None,
                proj: nn.Module | None = None) -> torch.Tensor:
        mid = self.mid if mid is None else mid
        if self.stride == 1:
            p = self.in_perm
            x_proj, h = split_channels(x) if p is None else (x[:, p[0::2]], x[:, p[1::2]])
        else:
            if self.in_perm is not None:
                x = x[:, self.in_perm]
            proj = self.proj if proj is None else proj
            if proj is None:
                raise ValueError("a stride-2 ChoiceBlock built with own_proj=False needs proj=")
            x_proj, h = proj(x), x
        for conv, bn, (c_out, act) in zip(self.convs, self.bns, self._plan):
            h = bn(conv(h, mid if c_out is None else c_out))
            if act:
                h = self.relu(h)
        return torch.cat([x_proj, h], 1)


class Stem(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        )


class EmbeddingHead(nn.Module):
    """1x1 conv + BN + ReLU, global average pooling, linear embedding, L2 normalization."""

    def __init__(self, c_in: int, head_channels: int, embed_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, head_channels, 1, bias=False),
            nn.BatchNorm2d(head_channels),
            nn.ReLU(inplace=True),
        )
        self.embed = nn.Linear(head_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return l2_normalize(self.embed(x))
