"""Retrieval: asymmetric metrics (FAISS kNN) and, later, index build/save/load."""

from hwnas.retrieval.metrics import evaluate, far_key, knn, l2_normalize, paired_test

__all__ = ["evaluate", "far_key", "knn", "l2_normalize", "paired_test"]
