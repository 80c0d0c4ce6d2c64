import numpy as np
import pytest

from hwnas.errors import HwnasError
from hwnas.retrieval import evaluate


def brute(q, ql, g, gl, ks, qids=None, gids=None):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    rec = {k: [] for k in ks}
    aps = []
    for i in range(len(q)):
        idx = np.arange(len(g))
        if qids is not None:
            idx = idx[np.array([gid != qids[i] for gid in gids])]
        s = g[idx] @ q[i]
        order = np.argsort(-s, kind="stable")
        rel = gl[idx[order]] == ql[i]
        if not rel.any():
            continue
        for k in ks:
            rec[k].append(rel[:k].any())
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append(prec[rel].mean())
    return {**{f"recall@{k}": np.mean(v) for k, v in rec.items()}, "mAP": np.mean(aps)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_random(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(120, 8)).astype(np.float32)
    g = rng.normal(size=(200, 8)).astype(np.float32)
    ql, gl = rng.integers(0, 6, 120), rng.integers(0, 6, 200)
    got, want = evaluate(q, ql, g, gl), brute(q, ql, g, gl, (1, 5, 10))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_matches_brute_force_leave_one_out():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(150, 8)).astype(np.float32)
    y = rng.integers(0, 4, 150)
    ids = [f"img{i}" for i in range(150)]
    got = evaluate(x, y, x, y, query_ids=ids, gallery_ids=ids)
    want = brute(x, y, x, y, (1, 5, 10), ids, ids)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    # Without exclusion every query finds itself first: recall@1 would be 1.
    assert evaluate(x, y, x, y)["recall@1"] == 1.0
    assert got["recall@1"] < 1.0


def test_hand_made_known_answers():
    # 1-D directions on a circle: angle decides the ranking.
    ang = lambda a: [np.cos(a), np.sin(a)]  # noqa: E731
    q = np.array([ang(0.0)], np.float32)
    g = np.array([ang(0.1), ang(0.2), ang(0.3), ang(0.4)], np.float32)
    gl = np.array([0, 1, 0, 1])  # ranking: pos, neg, pos, neg
    m = evaluate(q, [0], g, gl, ks=(1, 2))
    assert m["recall@1"] == 1.0
    # AP = (1/1 + 2/3) / 2
    assert m["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    m = evaluate(q, [1], g, gl, ks=(1, 2))  # positives at ranks 2 and 4
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_queries_without_positive_are_counted_not_scored():
    q = np.eye(3, dtype=np.float32)
    g = np.eye(3, dtype=np.float32)
    m = evaluate(q, [0, 1, 9], g, [0, 1, 2], ks=(1,))
    assert m["n_queries_without_positive"] == 1
    assert m["recall@1"] == 1.0 and m["mAP"] == 1.0


def test_incompatible_dims_is_a_clear_error():
    with pytest.raises(HwnasError, match="not compatible"):
        evaluate(np.ones((2, 4)), [0, 1], np.ones((2, 8)), [0, 1])
    with pytest.raises(HwnasError, match="labels do not match"):
        evaluate(np.ones((2, 4)), [0], np.ones((2, 4)), [0, 1])
