import numpy as np
import pytest

from hwnas.errors import HwnasError
from hwnas.retrieval import evaluate, paired_test


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


def test_per_query_hits_agree_with_recall_at_1():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(150, 8)).astype(np.float32)
    y = rng.integers(0, 4, 150)
    ids = [f"img{i}" for i in range(150)]
    m = evaluate(x, y, x, y, query_ids=ids, gallery_ids=ids, per_query=True)
    hits = m["hit@1"]
    assert len(hits) == 150 and set(hits) <= {"0", "1"}
    assert hits.count("1") / 150 == pytest.approx(m["recall@1"])
    # a query whose class has no gallery item is marked left out, not wrong
    m = evaluate(np.eye(3, dtype=np.float32), [0, 1, 9], np.eye(3, dtype=np.float32), [0, 1, 2], ks=(1,),
                 per_query=True)
    assert m["hit@1"] == "11-"
    assert "hit@1" not in evaluate(x, y, x, y)


def test_paired_test_counts_discordant_queries_and_gives_the_exact_sign_test():
    t = paired_test("1100110", "1010100")  # a only: queries 1, 5; b only: 2
    assert (t["queries"], t["only_a"], t["only_b"]) == (7, 2, 1)
    assert t["p_value"] == pytest.approx(1.0)  # 2 * P(X <= 1 | n=3) = 2 * 4/8, capped at 1
    t = paired_test("1" * 10, "0" * 10)
    assert t["p_value"] == pytest.approx(2 / 2 ** 10)  # all 10 discordant one way
    assert paired_test("0" * 10, "1" * 10)["p_value"] == t["p_value"]  # symmetric
    assert paired_test("101", "101") == {"queries": 3, "only_a": 0, "only_b": 0, "p_value": 1.0}
    # queries left out of either model are skipped
    assert paired_test("1-1", "0-0")["queries"] == 2
    # large splits: the exact tail stays a probability (no float overflow at thousands of queries)
    t = paired_test("1" * 1200 + "0" * 800, "1" * 1000 + "0" * 1000)
    assert t["only_a"] == 200 and t["only_b"] == 0 and 0 < t["p_value"] < 1e-50
    assert paired_test("1" * 1100 + "0" * 100, "0" * 1200)["p_value"] == 1e-300  # floored, never 0
    with pytest.raises(HwnasError, match="same split"):
        paired_test("11", "111")


def _brute_tar(s, same, far):
    """TAR at the lowest threshold whose impostor pairs above it are at most ``far`` of them."""
    imp, gen = s[~same], s[same]
    t = min(x for x in np.unique(imp) if np.mean(imp > x) <= far)
    return float(np.mean(gen > t))


def test_tar_at_far_matches_brute_force_and_leaves_self_pairs_out():
    """Verification over all query-gallery pairs (faces report TAR@FAR): equal to a brute
    force over the pair scores; an image paired with itself is neither genuine nor impostor;
    a FAR the impostor pairs cannot resolve is NaN, and above max_impostors a sample sets
    the threshold."""
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(60, 8)), rng.normal(size=(90, 8))
    ql, gl = rng.integers(0, 6, 60), rng.integers(0, 6, 90)
    r = evaluate(q, ql, g, gl, fars=(0.1, 0.01, 1e-5))
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    s, same = qn @ gn.T, ql[:, None] == gl[None, :]
    for f in (0.1, 0.01):
        assert r[f"TAR@FAR={f:g}"] == pytest.approx(_brute_tar(s, same, f))
    assert np.isnan(r["TAR@FAR=1e-05"])  # 4,5xx impostor pairs cannot tell 1 in 100,000
    from hwnas.retrieval.metrics import unresolvable_far  # (what the commands refuse up front)

    assert unresolvable_far((0.1, 1e-5), ql, gl) == (
        f"FAR 1e-05 needs at least 100,000 other-class pairs to set its threshold, and there are "
        f"{int((~same).sum()):,}: the smallest FAR they resolve is 0.001")
    assert "(of which 1,000 are sampled)" in unresolvable_far((1e-5,), ql, gl, max_impostors=1000)
    assert unresolvable_far((0.1,), ql[:3] * 0, gl[:3] * 0) == "FAR 0.1 needs pairs of images of two classes, and there are none"
    assert unresolvable_far((0.1, 0.01), ql, gl) is None and unresolvable_far((), ql, gl) is None
    assert r["n_genuine_pairs"] == same.sum() and r["n_impostor_pairs"] == (~same).sum()
    # leave-one-out: the gallery is the queries; a pair of an image with itself is left out
    ids = [f"i{k}" for k in range(60)]
    loo = evaluate(q, ql, q, ql, query_ids=ids, gallery_ids=ids, fars=(0.05,))
    s2, same2 = qn @ qn.T, ql[:, None] == ql[None, :]
    off = ~np.eye(60, dtype=bool)
    imp, gen = s2[~same2 & off], s2[same2 & off]
    t = min(x for x in np.unique(imp) if np.mean(imp > x) <= 0.05)
    assert loo["TAR@FAR=0.05"] == pytest.approx(float(np.mean(gen > t)))
    assert loo["n_genuine_pairs"] == int((same2 & off).sum())
    sampled = evaluate(q, ql, g, gl, fars=(0.1,), max_impostors=1000)
    assert 800 < sampled["n_impostor_pairs"] < 1200 and abs(sampled["TAR@FAR=0.1"] - r["TAR@FAR=0.1"]) < 0.1
    with pytest.raises(HwnasError, match="FAR 1.5 must be between 0 and 1"):
        evaluate(q, ql, g, gl, fars=(1.5,))
