"""Retrieval: asymmetric metrics (FAISS kNN) and, later, index build/save/load."""

from hwnas.retrieval.metrics import evaluate, knn, l2_normalize

__all__ = ["evaluate", "knn", "l2_normalize"]
