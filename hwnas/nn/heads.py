"""Classifier heads on L2-normalized embeddings (CosFace / ArcFace margins)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Logits ``scale * (cos(theta_y) - margin)`` (CosFace) or ``scale * cos(theta_y + margin)``
    (ArcFace) for the true class when ``labels`` are given, ``scale * cos`` otherwise."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0,
                 margin: float = 0.2, kind: str = "cosface"):
        super().__init__()
        if kind not in ("cosface", "arcface"):
            raise ValueError(f"classifier kind {kind!r} must be 'cosface' or 'arcface'")
        self.kind, self.scale, self.margin = kind, float(scale), float(margin)
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))
        if labels is None or self.margin == 0:
            return self.scale * cos
        onehot = F.one_hot(labels, self.num_classes).to(cos.dtype)
        if self.kind == "cosface":
            return self.scale * (cos - self.margin * onehot)
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = torch.cos(torch.clamp(theta + self.margin, max=math.pi))
        return self.scale * (cos + onehot * (target - cos))

    def config(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "margin": self.margin,
                "num_classes": self.num_classes}
