"""The compatibility loss, built from weighted parts (a weight of 0 turns a part off):

* ``own_cls``: classification through the query's own cosine classifier;
* ``bct``: BCT influence loss (Shen et al., CVPR 2020) — the query embedding classified by
  the gallery model's *frozen* classifier, so it must land where the gallery puts its class;
* ``regress``: regression of the query embedding onto the frozen gallery embedding of the
  same image (``cosine``: 1 - cos; ``l2``: squared distance of the normalized vectors);
* ``contrast``: contrastive alignment (InfoNCE over the batch): each query embedding must
  pick the gallery embedding of its own image out of the batch's gallery embeddings, at
  temperature ``contrast_temp``. Regression matches each point alone; this also asks the
  query to keep the gallery's neighbourhoods (who is closer to whom), which is what
  retrieval among classes never seen in training depends on (relational distillation, as
  in CompRess / SEED for small retrieval students).
* ``mix``: regression (1 - cos) of the query embedding onto the frozen gallery embedding of
  *mixed* images — two training images blended, x = l*a + (1-l)*b, l ~ U(0, 1), both
  models seeing the same blend ("function matching", Beyer et al., CVPR 2022: a student
  matches its teacher best on inputs off the training images). It asks the query to follow
  the gallery model between and beyond the training images, which open-set retrieval
  needs. Costs one more query and gallery forward pass per step (CompatTask computes it).
  ``mix_kind: cutmix`` pastes a random box of the other image instead of blending (the box
  covers 1 - l of the image): for line drawings, pieces of two glyphs rather than two faint
  glyphs on top of each other.
* ``bank``: relational distillation against a queue of the gallery model's embeddings of
  earlier batches (the ``bank_size`` most recent; CompRess, Abbasi Koohpayegani et al.,
  NeurIPS 2020, in its one-queue form): the query embedding's similarity distribution over
  the queue (softmax at ``bank_temp``) must match the gallery embedding's over the same
  queue, by KL divergence. ``contrast`` sees 63 other images of the batch and a one-hot
  target; this sees thousands, with the gallery's own soft ranking of them as the target —
  the neighbourhoods an unseen class's retrieval depends on. As the gallery model is frozen,
  the queued embeddings never go stale. The queue is a buffer of the loss, so it is saved in
  the training checkpoint and a resumed run continues with it; the current batch joins the
  queue after its step. The queue records each row's image, and an image's own earlier
  entries (another epoch's view of it, once the queue holds more than an epoch) are left out
  of its neighbours: at this temperature they would take nearly all the weight.
* ``rank``: the gallery's neighbour *order*, over the same queue (``bank_size``). For each
  image, its ``rank_k`` nearest queued gallery embeddings by the gallery embedding's cosine;
  over every pair (a, b) of them, the query's similarity difference s_q(a) - s_q(b) must
  equal the gallery's s_g(a) - s_g(b). The error counts relative to the gallery's difference
  (|d_q - d_g| / (0.1 + |d_g|)), so a pair the gallery barely tells apart weighs as much as
  one far apart, and five times more where the query orders the pair the other way. Pairwise
  rank-order distillation, as D3still (Xie et al., CVPR 2024) for small retrieval students:
  the KL of ``bank`` spends its weight on the few neighbours its temperature leaves mass on;
  recall@1 depends on which neighbour comes first, which is what this part scores.
* ``feat``: feature-map distillation (FitNets, Romero et al., ICLR 2015): at each reduction
  of ``feat_at`` (input size / map size; 8 and 16 by default: the middle stages), the query's
  feature map, through a 1x1 convolution to the gallery's channels, must point where the
  frozen gallery model's map of the same image points (1 - cos at each position, maps of
  unequal size average-pooled to the smaller). The parts above align only the embedding;
  this asks the query to compute the gallery's intermediate features on the way, which may
  carry over to unseen classes better. The 1x1 convolutions are trained with the query and
  kept in its training checkpoint, not in the model (``hwnas.compat.features``). For a
  query model alone: the supernet's paths share their layers, so ``supernet.loss`` refuses it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.nn.heads import CosineClassifier


#: the weighted parts, in the order they are printed (CompatLoss computes all but mix and
#: feat, which CompatTask adds: they need forward passes of the models)
PARTS = ("own_cls", "bct", "regress", "contrast", "mix", "bank", "rank", "feat")
#: why supernet.loss refuses the feat part
FEAT_NOT_SUPERNET = ("loss.feat trains one fixed query network, not the supernet (its paths share layers): "
                     "set supernet.loss.feat: 0 and give it in query.loss")
#: the rank part: a pair ordered the other way by the query weighs this many times more,
#: and a difference counts relative to the gallery's plus this
RANK_FLIP_WEIGHT, RANK_EPS = 5.0, 0.1


@dataclass
class LossConfig:
    own_cls: float = 1.0
    bct: float = 1.0
    # 30, not 1: the cosine regression lies in [0, 2] and at weight 1 it is dwarfed by the two
    # scale-30 cross-entropy terms. benchmarks/bench_recipe.py (Fashion-MNIST, smallest
    # subnet, 15 epochs): M(q,g) recall@1 78.1 at weight 10, 79.2 at 30, 78.6 at 100.
    regress: float = 30.0
    regress_kind: str = "cosine"  # cosine | l2
    # on by default at 5: bench_compat's tables (largest, smallest and MobileNetV3-small, mean
    # M(q,g) recall@1) put BCT + regression 30 + contrast 5 first of the four mixes on both
    # data sets — Fashion-MNIST 76.6 vs 74.1 without it, Omniglot open-set 48.9 vs 46.2
    contrast: float = 5.0
    contrast_temp: float = 0.1
    mix: float = 0.0
    mix_kind: str = "blend"  # blend | cutmix
    bank: float = 0.0
    bank_size: int = 4096
    bank_temp: float = 0.04
    rank: float = 0.0
    rank_k: int = 10
    feat: float = 0.0
    feat_at: tuple[int, ...] = (8, 16)
    scale: float = 30.0  # own classifier
    margin: float = 0.2

    def __post_init__(self) -> None:
        if self.regress_kind not in ("cosine", "l2"):
            raise HwnasError(f"loss.regress_kind {self.regress_kind!r} must be 'cosine' or 'l2'")
        weights = [getattr(self, k) for k in PARTS]
        if min(weights) < 0:
            raise HwnasError("loss weights must be >= 0")
        if sum(weights) <= 0:
            raise HwnasError(f"all loss weights are 0: set at least one of {', '.join(PARTS)}")
        if not self.contrast_temp > 0:
            raise HwnasError(f"loss.contrast_temp {self.contrast_temp} must be > 0 (e.g. 0.1)")
        if self.mix_kind not in ("blend", "cutmix"):
            raise HwnasError(f"loss.mix_kind {self.mix_kind!r} must be 'blend' or 'cutmix'")
        if not self.bank_temp > 0:
            raise HwnasError(f"loss.bank_temp {self.bank_temp} must be > 0 (e.g. 0.04)")
        if not self.scale > 0 or self.margin < 0:
            raise HwnasError(f"loss.scale ({self.scale}) must be > 0 and loss.margin ({self.margin}) "
                             ">= 0: the own classifier's logit scale and margin (e.g. 30 and 0.2)")
        if int(self.bank_size) != self.bank_size or self.bank_size < 1:
            raise HwnasError(f"loss.bank_size {self.bank_size} must be a whole number >= 1 "
                             "(e.g. 4096: the gallery embeddings of that many earlier images)")
        self.bank_size = int(self.bank_size)
        if self.rank and (int(self.rank_k) != self.rank_k or not 2 <= self.rank_k <= self.bank_size):
            raise HwnasError(f"loss.rank_k {self.rank_k} must be a whole number from 2 to loss.bank_size "
                             f"({self.bank_size}): how many queued neighbours the rank part orders (e.g. 10)")
        if self.rank:
            self.rank_k = int(self.rank_k)
        at = tuple(self.feat_at)
        if self.feat and (not at or len(set(at)) != len(at)
                          or any(int(r) != r or r < 1 or int(r) & (int(r) - 1) for r in at)):
            raise HwnasError(f"loss.feat_at {list(at)} must list distinct reductions (input size / feature "
                             "map size), each a power of 2 (e.g. [8, 16])")
        self.feat_at = tuple(sorted(int(r) for r in at))  # (the same loss in any order)

    @property
    def needs_gallery(self) -> bool:
        return self.bct > 0 or self.needs_gallery_emb or self.mix > 0 or self.feat > 0

    @property
    def needs_gallery_emb(self) -> bool:
        """The gallery model's embeddings of the training images are needed."""
        return self.regress > 0 or self.contrast > 0 or self.uses_queue

    @property
    def uses_queue(self) -> bool:
        """A part compares with the queue of earlier gallery embeddings (bank or rank)."""
        return self.bank > 0 or self.rank > 0

    @property
    def uses_unlabeled(self) -> bool:
        """A part learns from images without labels (regress, contrast, mix, bank, rank or feat)."""
        return self.needs_gallery_emb or self.mix > 0 or self.feat > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.contrast:  # off: left out, so models trained before it keep their keys
            del d["contrast"], d["contrast_temp"]
        if not self.mix:
            del d["mix"], d["mix_kind"]
        elif self.mix_kind == "blend":  # the default: left out, so models trained before keep their keys
            del d["mix_kind"]
        if not self.bank:
            del d["bank"], d["bank_temp"]
        if not self.rank:
            del d["rank"], d["rank_k"]
        if not self.uses_queue:
            del d["bank_size"]
        if not self.feat:
            del d["feat"], d["feat_at"]
        else:
            d["feat_at"] = list(self.feat_at)
        return d


class CompatLoss(nn.Module):
    """Weighted sum of the parts. The gallery classifier is held frozen and unregistered,
    so it is neither trained, checkpointed with the query, nor synchronized by DDP."""

    def __init__(self, cfg: LossConfig, embed_dim: int, num_classes: int,
                 gallery_classifier: CosineClassifier | None = None):
        super().__init__()
        self.cfg = cfg
        self.own = (CosineClassifier(embed_dim, num_classes, cfg.scale, cfg.margin)
                    if cfg.own_cls > 0 else None)
        if cfg.bct > 0 and gallery_classifier is None:
            raise HwnasError("loss.bct > 0 needs the gallery model's classifier")
        object.__setattr__(self, "_gallery_cls", gallery_classifier)
        if cfg.uses_queue:  # registered only when used, so checkpoints without it still load
            self.register_buffer("bank", torch.zeros(cfg.bank_size, embed_dim))
            self.register_buffer("bank_fill", torch.zeros((), dtype=torch.long))  # rows in use
            self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))  # next row
            # each row's image (its index in the training set; -1: none recorded)
            self.register_buffer("bank_idx", torch.full((cfg.bank_size,), -1, dtype=torch.long))

    def add_feature_adapters(self, channels: dict[int, tuple[int, int]]) -> None:
        """The ``feat`` part's 1x1 convolutions, query channels -> gallery channels at each
        reduction (``{r: (query, gallery)}``); made before the optimizer and the checkpoint see
        the loss's parameters."""
        self.adapters = nn.ModuleDict({str(r): nn.Conv2d(qc, gc, 1, bias=False)
                                       for r, (qc, gc) in channels.items()})

    def feature_loss(self, qf: dict[int, torch.Tensor], gf: dict[int, torch.Tensor]) -> torch.Tensor:
        """The ``feat`` part: mean over reductions of 1 - cos(adapter(query map), gallery map)
        at each position."""
        from hwnas.compat.features import check_map

        out = []
        for r, conv in self.adapters.items():
            check_map(qf.get(int(r)), conv.in_channels, int(r), "query")
            check_map(gf.get(int(r)), conv.out_channels, int(r), "gallery model")
            a, g = conv(qf[int(r)]), gf[int(r)].detach()
            if a.shape[-2:] != g.shape[-2:]:
                size = (min(a.shape[-2], g.shape[-2]), min(a.shape[-1], g.shape[-1]))
                a, g = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(g, size)
            out.append((1 - F.cosine_similarity(a, g.to(a.dtype), dim=1)).mean())
        return torch.stack(out).mean()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a training checkpoint from before rows recorded their image: none recorded
        if self.cfg.uses_queue and prefix + "bank" in state_dict and prefix + "bank_idx" not in state_dict:
            state_dict[prefix + "bank_idx"] = torch.full_like(self.bank_idx, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _enqueue(self, g: torch.Tensor, idx: torch.Tensor | None) -> None:
        k = self.bank.shape[0]
        g = g[-k:]
        rows = (self.bank_ptr + torch.arange(len(g), device=g.device)) % k
        self.bank[rows] = g.to(self.bank.dtype)
        self.bank_idx[rows] = (idx[-k:].to(self.bank_idx) if idx is not None
                               else torch.full_like(rows, -1))
        self.bank_ptr.copy_((self.bank_ptr + len(g)) % k)
        self.bank_fill.copy_((self.bank_fill + len(g)).clamp(max=k))

    def _queue(self, q: torch.Tensor, idx: torch.Tensor | None):
        """The queued gallery embeddings and a (batch, queue) mask of each image's own
        entries (None without ``idx``), or None until the queue holds a batch's worth (or
        is full, a queue shorter than a batch)."""
        n = int(self.bank_fill)
        if n < min(len(q), self.bank.shape[0]):
            return None
        # a copy: the queue is updated in place after this step's forward, before backward
        keys = self.bank[:n].clone()
        own = None if idx is None else idx.to(self.bank_idx)[:, None] == self.bank_idx[None, :n]
        return keys, own

    def _bank_kl(self, q: torch.Tensor, g: torch.Tensor, queue) -> torch.Tensor:
        """KL(gallery's || query's similarity distribution over the queue, the image's own
        entries left out), batch mean; 0 (still reaching ``q``, as DDP needs) while there is
        no queue."""
        if queue is None:
            return (q * 0).sum()
        keys, own = queue
        t = self.cfg.bank_temp
        lt, ls = g.float() @ keys.T / t, F.normalize(q.float(), dim=1) @ keys.T / t
        if own is not None:  # weight exp(-1e4) = 0 on both sides: they drop out of the sum
            lt, ls = lt.masked_fill(own, -1e4), ls.masked_fill(own, -1e4)
        log_pt, log_ps = F.log_softmax(lt, dim=1), F.log_softmax(ls, dim=1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()

    def _rank_order(self, q: torch.Tensor, g: torch.Tensor, queue) -> torch.Tensor:
        """Pairwise order of each image's ``rank_k`` nearest queued gallery embeddings (by the
        gallery's cosine; its own entries left out): relative error of the query's similarity
        differences against the gallery's, pairs the query orders the other way weighted
        ``RANK_FLIP_WEIGHT``; mean over the batch's pairs. 0 (still reaching ``q``) while
        there is no queue, or no pair."""
        if queue is None:
            return (q * 0).sum()
        keys, own = queue
        k = min(self.cfg.rank_k, len(keys))
        sims = g.float() @ keys.T
        if own is not None:  # below any cosine: last in the order, and no pair counts them
            sims = sims.masked_fill(own, -2.0)
        s_g, nbr = sims.topk(k, dim=1)  # (B, k), descending: the gallery's order
        s_q = torch.einsum("bd,bkd->bk", F.normalize(q.float(), dim=1), keys[nbr])
        a, b = torch.triu_indices(k, k, offset=1, device=q.device)  # pairs a before b
        ok = (s_g[:, b] > -1.5).float()  # (b comes after a: where b is a neighbour, so is a)
        d_g = (s_g[:, a] - s_g[:, b]) * ok  # >= 0
        d_q = s_q[:, a] - s_q[:, b]
        w = torch.where(d_q < 0, RANK_FLIP_WEIGHT, 1.0) * ok
        return (w * (d_q - d_g).abs() / (RANK_EPS + d_g)).sum() / ok.sum().clamp(min=1)

    def forward(self, q: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None = None,
                idx: torch.Tensor | None = None):
        """``idx``: each image's index in the training set, so that the queue parts leave an
        image's own earlier entries out of its neighbours."""
        parts: dict[str, torch.Tensor] = {}
        c = self.cfg
        # label -1: an unlabeled image (data.unlabeled), left out of the two classifier parts
        # by a mask rather than by indexing (no host sync per step; a batch with no labeled
        # image gives a zero that still reaches the classifier, as DDP needs)
        lab = (y >= 0).to(q.dtype)
        yc = y.clamp(min=0)

        def labeled_ce(logits):
            return (F.cross_entropy(logits, yc, reduction="none") * lab).sum() / lab.sum().clamp(min=1)

        if c.own_cls > 0:
            parts["own_cls"] = labeled_ce(self.own(q, yc))
        if c.bct > 0:
            parts["bct"] = labeled_ce(self._gallery_cls(q, yc))
        if c.needs_gallery_emb and g is None:
            raise HwnasError("loss.regress, loss.contrast, loss.bank or loss.rank > 0 needs the gallery embeddings")
        if c.regress > 0:
            if c.regress_kind == "cosine":
                parts["regress"] = (1 - F.cosine_similarity(q, g, dim=1)).mean()
            else:
                parts["regress"] = (F.normalize(q, dim=1) - g).pow(2).sum(1).mean()
        if c.contrast > 0:
            logits = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T / c.contrast_temp
            parts["contrast"] = F.cross_entropy(logits, torch.arange(len(q), device=q.device))
        if c.uses_queue:
            gn = F.normalize(g.detach(), dim=1)
            queue = self._queue(q, idx)
            if c.bank > 0:
                parts["bank"] = self._bank_kl(q, gn, queue)
            if c.rank > 0:
                parts["rank"] = self._rank_order(q, gn, queue)
            if self.training:
                self._enqueue(gn, idx)
        total = sum(getattr(c, k) * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}
