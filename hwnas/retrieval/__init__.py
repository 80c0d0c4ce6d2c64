"""Retrieval: asymmetric metrics (FAISS kNN) and, later, index build/save/load."""

from hwnas.retrieval.metrics import evaluate, knn, l2_normalize, paired_test

__all__ = ["evaluate", "knn", "l2_normalize", "paired_test"]
