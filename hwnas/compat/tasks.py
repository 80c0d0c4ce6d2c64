"""What one training step computes, for each thing we train. Each task is an ``nn.Module``
whose ``forward(x, y, idx)`` returns ``(loss, parts)`` so DistributedDataParallel can wrap
it whole (the backbone and any trainable head are synchronized together)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.compat.losses import FEAT_NOT_SUPERNET, CompatLoss
from hwnas.config import PATH_SAMPLING
from hwnas.errors import HwnasError
from hwnas.nn.heads import CosineClassifier
from hwnas.space import Arch, SearchSpace, arch_flops


class GalleryTask(nn.Module):
    """The gallery model's training: its embeddings through the cosine classifier.
    ``frozen_backbone``: the backbone's weights stay as loaded (gallery.freeze_backbone), and
    so do its BatchNorm statistics: it runs in eval mode while the head trains."""

    def __init__(self, net: nn.Module, classifier: CosineClassifier, frozen_backbone: bool = False):
        super().__init__()
        self.net, self.classifier, self.frozen_backbone = net, classifier, frozen_backbone
        if frozen_backbone:
            for p in net.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone:  # (train mode would update its BN running statistics)
            self.net.backbone.eval()
        return self

    def forward(self, x, y, idx):
        loss = nn.functional.cross_entropy(self.classifier(self.net(x), y), y)
        return loss, {"cls": float(loss.detach())}


class ArchSampler:
    """SPOS path sampling, optionally restricted to a FLOPs range (rejection sampling),
    with a path warm-up. The same seed gives the same sequence on every rank.

    Warm-up: for the first ``warmup`` fraction of training each layer takes a uniformly
    random choice with probability ``progress / warmup`` and otherwise the anchor path's
    (``space.anchor()``); afterwards sampling is uniform. Uniform sampling from the first
    step left the quickstart supernet at a constant embedding: at initialization paths that
    differ in many layers compute unrelated functions and no shared signal gets through.
    Opening paths up gradually trains a shared representation first."""

    def __init__(self, space: SearchSpace, seed: int, flops_range=None, max_tries: int = 10000,
                 warmup: float = 0.0, sampling: str = "uniform"):
        self.space, self.seed, self.max_tries = space, seed, max_tries
        if sampling not in PATH_SAMPLING:
            raise HwnasError(f"supernet.path_sampling {sampling!r} must be one of {', '.join(PATH_SAMPLING)}")
        # uniform: SPOS's; spread: each path's depth drawn first (SearchSpace.sample_spread)
        self.sampling = sampling
        self.draw = self.space.sample if sampling == "uniform" else self.space.sample_spread
        if not 0.0 <= warmup <= 1.0:
            raise HwnasError(f"supernet.path_warmup {warmup} must be in [0, 1] (a fraction of "
                             "training)")
        self.warmup = warmup
        self.anchor = space.anchor()
        self.range = None
        if flops_range:
            lo, hi = (float(v) * 1e6 for v in flops_range)
            fmin, fmax = arch_flops(space, space.smallest()), arch_flops(space, space.largest())
            if lo > hi or hi < fmin or lo > fmax:
                raise HwnasError(
                    f"supernet.flops_range {list(flops_range)} MFLOPs misses the space's range "
                    f"[{fmin / 1e6:.2f}, {fmax / 1e6:.2f}] MFLOPs"
                )
            self.range = (lo, hi)

    def __call__(self, epoch: int, step: int, progress: float = 1.0) -> Arch:
        rng = random.Random(f"{self.seed}-{epoch}-{step}")
        p_random = 1.0 if self.warmup <= 0 else min(1.0, progress / self.warmup)
        for _ in range(self.max_tries):
            a = self.draw(rng)
            if p_random < 1.0:
                a = Arch(tuple(mine if rng.random() < p_random else anchor
                               for mine, anchor in zip(a.layers, self.anchor.layers)))
            if self.range is None or self.range[0] <= arch_flops(self.space, a) <= self.range[1]:
                return a
        raise HwnasError(f"no arch in supernet.flops_range after {self.max_tries} samples; widen it"
                         + ("" if self.sampling != "uniform" else ", or set supernet.path_sampling: spread "
                            "(uniform paths almost never fall at the space's cheap end)"))


def mix_images(a: torch.Tensor, b: torch.Tensor, kind: str = "blend") -> torch.Tensor:
    """Per image, l ~ U(0, 1): ``blend`` l*a + (1-l)*b; ``cutmix`` a with a box of b pasted
    in (side sqrt(1-l) of the image's, centre uniform, clipped at the border)."""
    n, _, h, w = a.shape
    lam = torch.rand(n, device=a.device, dtype=a.dtype)
    if kind == "blend":
        lam = lam.view(n, 1, 1, 1)
        return lam * a + (1 - lam) * b
    side = (1 - lam).sqrt()
    cy, cx = torch.rand(n, device=a.device) * h, torch.rand(n, device=a.device) * w
    ys = torch.arange(h, device=a.device).view(1, h, 1)
    xs = torch.arange(w, device=a.device).view(1, 1, w)
    half_h, half_w = (side * h / 2).view(n, 1, 1), (side * w / 2).view(n, 1, 1)
    box = ((ys - cy.view(n, 1, 1)).abs() < half_h) & ((xs - cx.view(n, 1, 1)).abs() < half_w)
    return torch.where(box.unsqueeze(1), b, a)


class CompatTask(nn.Module):
    """A query network (the supernet, or one fixed network) trained with the compatibility
    loss against a frozen gallery model.

    ``gallery_emb``: the frozen gallery embeddings of the training images (indexed by
    ``idx``); when None (e.g. with augmentation) they are computed from the batch.
    The gallery network is not registered as a submodule: it is never trained, saved with
    the query, or touched by DDP."""

    def __init__(self, net: nn.Module, loss: CompatLoss, gallery_net: nn.Module | None = None,
                 gallery_emb: torch.Tensor | None = None, sampler: ArchSampler | None = None):
        super().__init__()
        self.net, self.loss = net, loss
        object.__setattr__(self, "_gallery", gallery_net)
        self.gallery_emb = gallery_emb
        self.sampler = sampler
        self.arch: Arch | None = None
        self._taps = None
        if loss.cfg.feat > 0:  # the feature maps the loss's feat part compares, and its adapters
            if sampler is not None:
                raise HwnasError(FEAT_NOT_SUPERNET)
            if gallery_net is None:
                raise HwnasError("loss.feat > 0 needs the gallery model")
            from hwnas.compat.features import matched_points

            qm, gm, channels = matched_points(net, gallery_net, loss.cfg.feat_at)
            object.__setattr__(self, "_taps", (qm, gm))  # (not submodules: net and gallery hold them)
            loss.add_feature_adapters(channels)

    def move_frozen(self, dev: torch.device) -> None:
        """Move what ``.to()`` does not reach: the unregistered frozen gallery network and
        classifier, and the cached gallery embeddings."""
        if self._gallery is not None:
            self._gallery.to(dev)
        if self.loss._gallery_cls is not None:
            self.loss._gallery_cls.to(dev)
        if self.gallery_emb is not None:
            self.gallery_emb = self.gallery_emb.to(dev)

    def before_step(self, epoch: int, step: int, progress: float = 1.0) -> None:
        if self.sampler is not None:
            self.arch = self.sampler(epoch, step, progress)

    def _query(self, x):
        return self.net(x, self.arch) if self.sampler is not None else self.net(x)

    def forward(self, x, y, idx):
        from hwnas.compat.features import tapped

        feat = self._taps is not None and self.training
        with tapped(self._taps[0] if feat else {}) as qf:
            q = self._query(x)
        g = gf = None
        if feat or (self.loss.cfg.needs_gallery_emb and self.gallery_emb is None):
            with torch.no_grad(), tapped(self._taps[1] if feat else {}) as gf:
                g = self._gallery(x)
        if self.loss.cfg.needs_gallery_emb and self.gallery_emb is not None:
            g = self.gallery_emb[idx.to(self.gallery_emb.device)]
        total, parts = self.loss(q, y, g, idx)
        if feat:
            f = self.loss.feature_loss(qf, gf)
            total = total + self.loss.cfg.feat * f
            parts = {**parts, "feat": float(f.detach())}
        w = self.loss.cfg.mix
        if w > 0 and self.training:
            # the loss's "mix" part: both models on mixes of two images of the batch
            xm = mix_images(x, x.roll(1, 0), self.loss.cfg.mix_kind)
            with torch.no_grad():
                gm = self._gallery(xm)
            mix = (1 - F.cosine_similarity(self._query(xm), gm, dim=1)).mean()
            total = total + w * mix
            parts = {**parts, "mix": float(mix.detach())}
        return total, parts
