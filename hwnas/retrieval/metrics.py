"""Asymmetric retrieval metrics, first class.

``evaluate(query_emb, query_labels, gallery_emb, gallery_labels)`` is the one function
behind the three accuracies of heterogeneous search: M(g,g) (gallery model on both sides,
the paragon), M(q,g) (query model against the gallery model's index) and M(q,q). The kNN is
FAISS (exact inner product on L2-normalized vectors, i.e. cosine similarity).

Definitions (queries whose class has no gallery item are left out and counted):

* recall@k: share of queries with at least one same-class item among the k nearest;
* mAP: mean over queries of average precision over the *whole* ranked gallery,
  AP = (1/R) * sum over the R positives of (positives so far / rank). A positive's rank
  counts the gallery items with a strictly higher score, so ties are broken in the
  query's favour.

Where the protocol shares images between query and gallery (leave-one-out), pass
``query_ids`` and ``gallery_ids``: a gallery item with the query's own id is excluded from
its ranking.

``fars`` adds verification at those false accept rates (face benchmarks such as IJB-C
report it): every query-gallery pair is a genuine pair (same class) or an impostor pair;
the threshold ``t`` is the highest score at which at most a FAR share of impostor pairs
score above it, and ``TAR@FAR=f`` is the share of genuine pairs scoring above ``t``. Pairs
of an image with itself are left out. Beyond ``max_impostors`` impostor pairs a seeded
random sample of them sets the threshold (``n_impostor_pairs`` says how many); a FAR below
1 / that count cannot be told and gives NaN.

``per_query=True`` adds ``hit@1``, one character per query ('1' right at rank 1, '0' wrong,
'-' left out), so two models scored on the same queries can be compared query by query
(``paired_test``): on one test split of a few thousand queries, a fraction of a point of
recall@1 is within sampling noise, and a paired test tells how far within.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from hwnas.errors import HwnasError


def _as_f32(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2:
        raise HwnasError(f"{name} must be a 2-D array (n, dim), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise HwnasError(f"{name} contains NaN or infinite values")
    return a


def l2_normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def knn(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with FAISS: (scores, indices), each (n_query, k)."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(query, k)


def _self_index(query_ids, gallery_ids, nq: int) -> np.ndarray:
    """For each query, the gallery row with the same id, or -1."""
    if query_ids is None or gallery_ids is None:
        return np.full(nq, -1, np.int64)
    if len(query_ids) != nq:
        raise HwnasError(f"query_ids has {len(query_ids)} entries for {nq} queries")
    pos = {gid: j for j, gid in enumerate(gallery_ids)}
    return np.array([pos.get(qid, -1) for qid in query_ids], np.int64)


def evaluate(
    query_emb,
    query_labels,
    gallery_emb,
    gallery_labels,
    ks: Sequence[int] = (1, 5, 10),
    query_ids: Sequence[str] | None = None,
    gallery_ids: Sequence[str] | None = None,
    normalize: bool = True,
    with_map: bool = True,
    chunk: int = 512,
    per_query: bool = False,
    fars: Sequence[float] = (),
    max_impostors: int = 20_000_000,
) -> dict:
    """Retrieval metrics of ``query_emb`` against ``gallery_emb`` (fractions in [0, 1])."""
    q = _as_f32(query_emb, "query embeddings")
    g = _as_f32(gallery_emb, "gallery embeddings")
    if q.shape[1] != g.shape[1]:
        raise HwnasError(
            f"query embeddings have dimension {q.shape[1]} but gallery embeddings have "
            f"{g.shape[1]}: the two models are not compatible (their embed_dim must match)"
        )
    ql = np.asarray(query_labels).reshape(-1)
    gl = np.asarray(gallery_labels).reshape(-1)
    if len(ql) != len(q) or len(gl) != len(g):
        raise HwnasError(
            f"labels do not match embeddings: {len(ql)} query labels for {len(q)} queries, "
            f"{len(gl)} gallery labels for {len(g)} gallery items"
        )
    if len(g) == 0 or len(q) == 0:
        raise HwnasError("evaluate needs at least one query and one gallery item")
    if normalize:
        q, g = l2_normalize(q), l2_normalize(g)
    self_ix = _self_index(query_ids, gallery_ids, len(q))

    # Queries with at least one positive (same label, not itself) in the gallery.
    classes, g_counts = np.unique(gl, return_counts=True)
    count_of = dict(zip(classes.tolist(), g_counts.tolist()))
    n_pos = np.array([count_of.get(c, 0) for c in ql.tolist()], np.int64)
    has_self = self_ix >= 0
    n_pos = n_pos - (has_self & (gl[np.maximum(self_ix, 0)] == ql)).astype(np.int64)
    valid = n_pos > 0

    ks = sorted({int(k) for k in ks})
    kmax = min(max(ks), len(g) - (1 if has_self.any() else 0))
    extra = 1 if has_self.any() else 0
    _, nn = knn(q, g, min(kmax + extra, len(g)))
    if extra:  # drop each query's own row, keep kmax
        keep = nn != self_ix[:, None]
        nn = np.stack([row[m][:kmax] for row, m in zip(nn, keep)]) if kmax > 0 else nn[:, :0]
    hits = gl[nn] == ql[:, None] if kmax > 0 else np.zeros((len(q), 0), bool)
    out: dict = {}
    nv = int(valid.sum())
    for k in ks:
        kk = min(k, kmax)
        r = hits[:, :kk].any(1)
        out[f"recall@{k}"] = float(r[valid].mean()) if nv else float("nan")
    if with_map:
        out["mAP"] = _mean_ap(q, g, ql, gl, self_ix, valid, chunk)
    if fars:
        out.update(_tar_at_far(q, g, ql, gl, self_ix, fars, chunk, max_impostors))
    out["n_queries"] = int(len(q))
    out["n_gallery"] = int(len(g))
    out["n_queries_without_positive"] = int((~valid).sum())
    if per_query:
        top1 = hits[:, 0] if kmax > 0 else np.zeros(len(q), bool)
        out["hit@1"] = "".join("-" if not v else ("1" if h else "0") for h, v in zip(top1.tolist(), valid.tolist()))
    return out


def paired_test(a_hits: str, b_hits: str) -> dict:
    """Two models' ``hit@1`` strings on the same queries compared query by query: how many
    queries only ``a`` gets right and how many only ``b`` does, and the exact two-sided
    McNemar p-value (the sign test on those discordant queries: how likely a split at least
    this uneven is if both models were equally accurate; floored at 1e-300, below which a
    float cannot tell). Queries left out of either are skipped."""
    import math

    if len(a_hits) != len(b_hits):
        raise HwnasError(f"paired test: the two models were scored on {len(a_hits)} and {len(b_hits)} "
                         "queries; compare evaluations of the same split (re-run hwnas evaluate)")
    pairs = [(x, y) for x, y in zip(a_hits, b_hits) if x != "-" and y != "-"]
    only_a = sum(x == "1" and y == "0" for x, y in pairs)
    only_b = sum(x == "0" and y == "1" for x, y in pairs)
    n = only_a + only_b
    # P(X <= min) under Binomial(n, 1/2), doubled; exact integers, one division at the end
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    p = min(1.0, max(2 * tail / 2 ** n, 1e-300)) if n else 1.0
    return {"queries": len(pairs), "only_a": only_a, "only_b": only_b, "p_value": p}


def _mean_ap(q, g, ql, gl, self_ix, valid, chunk) -> float:
    aps = []
    for s in range(0, len(q), chunk):
        e = min(s + chunk, len(q))
        sims = q[s:e] @ g.T  # (b, n_gallery)
        rows = np.arange(e - s)
        sx = self_ix[s:e]
        has = sx >= 0
        sims[rows[has], sx[has]] = -np.inf  # own image: ranked last, not relevant
        neg_sorted = np.sort(-sims, axis=1)  # ascending in -score = descending score
        for r in range(e - s):
            i = s + r
            if not valid[i]:
                continue
            pos = np.flatnonzero(gl == ql[i])
            if sx[r] >= 0:
                pos = pos[pos != sx[r]]
            ps = np.sort(-sims[r, pos])  # positives, best first (as -score, ascending)
            greater_all = np.searchsorted(neg_sorted[r], ps, side="left")
            greater_pos = np.searchsorted(ps, ps, side="left")
            # rank of k-th positive = negatives strictly above it + k
            k = np.arange(1, len(ps) + 1)
            rank = (greater_all - greater_pos) + k
            aps.append(float(np.mean(k / rank)))
    return float(np.mean(aps)) if aps else float("nan")


def far_key(far: float) -> str:
    return f"TAR@FAR={far:g}"


def impostor_pairs(query_labels, gallery_labels) -> int:
    """How many query-gallery pairs are of two classes (TAR@FAR's impostor pairs; a pair of
    an image with itself is of one class, so it is never among them)."""
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    same = sum(int(np.sum(gl == c)) * int(np.sum(ql == c)) for c in np.unique(ql))
    return len(ql) * len(gl) - same


def unresolvable_far(fars: Sequence[float], query_labels, gallery_labels,
                     max_impostors: int = 20_000_000) -> str | None:
    """Why the smallest of ``fars`` is one these labels' pairs cannot resolve (fewer impostor
    pairs than one at that rate: its threshold, and TAR, would be undefined), with the smallest
    FAR they resolve; None if every one is resolved."""
    if not len(fars):
        return None
    total = impostor_pairs(query_labels, gallery_labels)
    n, f = min(total, max_impostors), min(fars)
    if f * n >= 1:
        return None
    if not n:
        return f"FAR {f:g} needs pairs of images of two classes, and there are none"
    sampled = f" (of which {max_impostors:,} are sampled)" if total > max_impostors else ""
    return (f"FAR {f:g} needs at least {math.ceil(1 / f):,} other-class pairs to set its threshold, and "
            f"there are {total:,}{sampled}: the smallest FAR they resolve is "
            f"{10.0 ** math.ceil(math.log10(1 / n)):g}")


def _tar_at_far(q, g, ql, gl, self_ix, fars, chunk, max_impostors) -> dict:
    for f in fars:
        if not 0 < f < 1:
            raise HwnasError(f"FAR {f} must be between 0 and 1 (e.g. 1e-3)")
    keep = min(1.0, max_impostors / max(impostor_pairs(ql, gl), 1))
    rng = np.random.default_rng(0)
    genuine, impostor = [], []
    for s in range(0, len(q), chunk):
        e = min(s + chunk, len(q))
        sims = q[s:e] @ g.T
        same = ql[s:e, None] == gl[None, :]
        own = np.zeros_like(same)
        sx = self_ix[s:e]
        own[np.flatnonzero(sx >= 0), sx[sx >= 0]] = True
        genuine.append(sims[same & ~own])
        imp = sims[~same & ~own]
        impostor.append(imp if keep >= 1 else imp[rng.random(len(imp)) < keep])
    gen = np.concatenate(genuine) if genuine else np.zeros(0, np.float32)
    imp = -np.sort(-np.concatenate(impostor))  # descending
    out = {"n_genuine_pairs": int(len(gen)), "n_impostor_pairs": int(len(imp))}
    for f in fars:
        k = int(np.floor(f * len(imp)))  # impostors allowed above the threshold
        if k < 1 or not len(gen):
            out[far_key(f)] = float("nan")  # too few impostor pairs to tell this FAR
            continue
        t = imp[k]  # scores above t: at most k impostor pairs (ties at t are not accepted)
        out[far_key(f)] = float(np.mean(gen > t))
    return out
