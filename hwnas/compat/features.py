"""Where a network's intermediate feature maps can be read, for the loss's ``feat`` part
(feature-map distillation from the frozen gallery model, FitNets-style: Romero et al., ICLR
2015). A point is named by its *reduction* (input size / map size): 4, 8, 16, 32. A search
space's subnet has one at the end of each stage (its stem halves the input, each stage
halves it again); a timm backbone lists its own (``feature_info``: ResNet's layer1-4,
MobileNetV3's blocks). The gallery's map at a reduction is what the query's map at the same
reduction is trained to predict, through a 1x1 convolution that exists only in training."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from hwnas.errors import HwnasError


def feature_points(net: nn.Module) -> dict[int, tuple[int, nn.Module]]:
    """``{reduction: (channels, module)}``: the modules whose outputs are ``net``'s feature
    maps at each reduction (the last such module where several share one)."""
    from hwnas.nn.models import EmbeddingNet
    from hwnas.nn.supernet import SubNet

    if isinstance(net, SubNet):
        points, r = {}, 2  # (the stem: stride 2)
        layers = net.space.layers()
        for i, layer in enumerate(layers):
            r *= layer.stride
            if i + 1 == len(layers) or layers[i + 1].stage != layer.stage:
                points[r] = (layer.out_channels, net.layers[i])
        return points
    if isinstance(net, EmbeddingNet):
        info = getattr(net.backbone, "feature_info", None)
        if not isinstance(info, list) or not info:
            raise HwnasError(f"the timm backbone {type(net.backbone).__name__} lists no feature maps "
                             "(feature_info), so loss.feat cannot read them: set query.loss.feat: 0")
        return {int(d["reduction"]): (int(d["num_chs"]), net.backbone.get_submodule(d["module"]))
                for d in info}
    raise HwnasError(f"loss.feat reads the feature maps of a search-space subnet or a timm backbone, "
                     f"not of a {type(net).__name__}: set query.loss.feat: 0")


def matched_points(query: nn.Module, gallery: nn.Module, at: tuple[int, ...]):
    """``({r: query module}, {r: gallery module}, {r: (query channels, gallery channels)})``
    for each reduction of ``at``; an error naming the reductions both have where one lacks it."""
    qp, gp = feature_points(query), feature_points(gallery)
    missing = [r for r in at if r not in qp or r not in gp]
    if missing:
        both = sorted(set(qp) & set(gp))
        raise HwnasError(f"loss.feat_at {list(at)}: no feature map at reduction {missing} in both the query "
                         f"(it has {sorted(qp)}) and the gallery model (it has {sorted(gp)}); "
                         f"give reductions of {both}")
    return ({r: qp[r][1] for r in at}, {r: gp[r][1] for r in at},
            {r: (qp[r][0], gp[r][0]) for r in at})


def check_feature_maps(query: nn.Module, gallery: nn.Module, at: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """Before a training: both networks have a feature map at each reduction of ``at``, laid
    out (batch, channels, height, width) as their feature_info says (a ViT's token blocks or a
    channels-last backbone are not), for one input of ``shape``."""
    qm, gm, channels = matched_points(query, gallery, at)
    was = query.training, gallery.training
    query.eval(), gallery.eval()
    try:
        with torch.no_grad(), tapped(qm) as qf, tapped(gm) as gf:
            x = torch.zeros(shape)
            query(x), gallery(x)
    finally:
        query.train(was[0]), gallery.train(was[1])
    for r, (qc, gc) in channels.items():
        check_map(qf.get(r), qc, r, "query")
        check_map(gf.get(r), gc, r, "gallery model")


def check_map(t, channels: int, r: int, which: str) -> None:
    if not (isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[1] == channels):
        got = "nothing" if not isinstance(t, torch.Tensor) else f"shape {tuple(t.shape)}"
        raise HwnasError(f"loss.feat: the {which}'s feature map at reduction {r} should be (batch, {channels}, "
                         f"height, width), got {got}: loss.feat needs convolutional networks whose maps "
                         "are laid out so (not a ViT's tokens or a channels-last backbone); set query.loss.feat: 0")


@contextmanager
def tapped(modules: dict[int, nn.Module]):
    """Within the block, ``{reduction: the output of that module's latest call}``. The hooks
    are removed on leaving it, so a trained network carries none into export."""
    out: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, r=r: out.__setitem__(r, o))
               for r, m in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
