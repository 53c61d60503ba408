"""Post-processing of global vectors: whitening (learned, saved, round trip), DBA, αQE, k-reciprocal
re-ranking, each against a plain numpy twin of its formula."""

import json
import zipfile

import numpy as np
import pytest

from d2r.globaldesc.postprocess import Whitening, alpha_qe, dba, k_reciprocal, l2_normalize

RNG = np.random.default_rng(3)


def unit(n, d, rng=RNG):
    return l2_normalize(rng.normal(size=(n, d)).astype(np.float32))


@pytest.mark.parametrize("n, d", [(200, 16), (12, 40)])  # covariance path (D <= N) and SVD path (D > N)
def test_pca_whitening_whitens_the_training_set(n, d):
    x = unit(n, d) * RNG.uniform(0.5, 3, size=d).astype(np.float32)
    w = Whitening("pca_whiten").fit(x, metadata={"trained_on": "random"})
    k = min(d, n - 1)
    assert w.components_.shape == (k, d)
    raw = (x - w.mean_) @ w.components_.T * w.scale_  # before the final L2
    cov = raw.T.astype(np.float64) @ raw / n
    np.testing.assert_allclose(cov, np.eye(k), atol=2e-3)
    np.testing.assert_allclose(w.components_ @ w.components_.T, np.eye(k), atol=1e-4)
    out = w.transform(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_pca_without_whitening_preserves_inner_products_of_centred_vectors():
    x = unit(100, 8)
    w = Whitening("pca").fit(x)
    y = w.transform(x)
    xc = l2_normalize(x - x.mean(axis=0))
    np.testing.assert_allclose(y @ y.T, xc @ xc.T, atol=1e-4)  # a full-rank rotation of the centred rows


def test_svd_mode_does_not_centre():
    x = unit(50, 6) + 2.0
    w = Whitening("svd", dim=3).fit(x)
    assert not w.mean_.any()
    proj = x @ w.components_.T
    np.testing.assert_allclose(w.scale_, 1.0 / (proj.std(axis=0) + 1e-6), rtol=1e-4)


def test_whitening_save_load_round_trip(tmp_path):
    x = unit(60, 10)
    w = Whitening("pca_whiten", dim=5).fit(x, metadata={"trained_on": "db", "backbone": "mobilenet_v2"})
    path = w.save(tmp_path / "w.npz")
    w2 = Whitening.load(path)
    assert (w2.mode, w2.dim, w2.fingerprint) == ("pca_whiten", 5, w.fingerprint)
    assert w2.metadata["trained_on"] == "db" and w2.metadata["num_train"] == 60
    q = unit(7, 10)
    np.testing.assert_array_equal(w2.transform(q), w.transform(q))
    assert w.transform(q[0]).shape == (5,)
    assert Whitening("pca_whiten", dim=5).fit(x).fingerprint == w.fingerprint  # deterministic


def test_whitening_bad_files_give_one_line_errors(tmp_path):
    w = Whitening().fit(unit(30, 4))
    path = w.save(tmp_path / "w.npz")
    with zipfile.ZipFile(path) as z:
        arrays = {n: z.read(n) for n in z.namelist()}
    header = json.loads(np.load(path)["metadata"].item())
    header["fingerprint"] = "0" * 16
    bad = tmp_path / "tampered.npz"
    np.savez(bad, mean=w.mean_, components=w.components_, scale=w.scale_ * 2,
             metadata=np.array(json.dumps(header)))
    with pytest.raises(ValueError, match="does not match the stored fingerprint"):
        Whitening.load(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(arrays["mean.npy"][:40])
    with pytest.raises(ValueError) as exc:
        Whitening.load(junk)
    assert str(junk) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        Whitening.load(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="exceeds"):
        Whitening(dim=50).fit(unit(10, 4))
    with pytest.raises(ValueError, match="D=4"):
        w.transform(unit(2, 5))


def test_dba_matches_loop_twin():
    x = unit(30, 5)
    for k, alpha in ((3, 0.0), (5, 3.0)):
        got = dba(x, k, alpha)
        sims = x @ x.T
        for i in range(30):
            order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:k]
            acc = x[i].astype(np.float64).copy()
            for j in order:
                acc += (1.0 if alpha == 0 else max(sims[i, j], 0) ** alpha) * x[j]
            np.testing.assert_allclose(got[i], acc / np.linalg.norm(acc), atol=1e-5)
    np.testing.assert_allclose(dba(x, 0), x, atol=1e-6)


def test_alpha_qe_matches_formula():
    x = unit(40, 6)
    q = unit(3, 6)
    s = q @ x.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :4]
    sc = np.take_along_axis(s, ids, 1)
    got = alpha_qe(q, x, ids, sc, k=4, alpha=3.0)
    for i in range(3):
        acc = q[i] + sum(max(sc[i, j], 0) ** 3 * x[ids[i, j]] for j in range(4))
        np.testing.assert_allclose(got[i], acc / np.linalg.norm(acc), atol=1e-5)
    padded = np.concatenate([ids[:, :2], -np.ones((3, 2), np.int64)], axis=1)
    got = alpha_qe(q, x, padded, sc, k=4, alpha=0.0)
    for i in range(3):
        acc = q[i] + x[ids[i, 0]] + x[ids[i, 1]]
        np.testing.assert_allclose(got[i], acc / np.linalg.norm(acc), atol=1e-5)


def k_reciprocal_twin(q, g, k1, k2, lam):
    """Zhong et al. 2017, step by step with Python sets and loops."""
    allv = np.concatenate([q, g]).astype(np.float64)
    n, nq = allv.shape[0], q.shape[0]
    d = np.array([[float(((allv[i] - allv[j]) ** 2).sum()) for j in range(n)] for i in range(n)])
    d = d / d.max(axis=1, keepdims=True)
    rank = [sorted(range(n), key=lambda j, i=i: (d[i, j], j)) for i in range(n)]

    def recip(i, k):
        return {j for j in rank[i][:k + 1] if i in rank[j][:k + 1]}

    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        exp = set(r)
        for c in r:
            rc = recip(c, int(round(k1 / 2)))
            if len(rc & r) > 2 / 3 * len(rc):
                exp |= rc
        wts = {j: np.exp(-d[i, j]) for j in exp}
        tot = sum(wts.values())
        for j, wt in wts.items():
            v[i, j] = wt / tot
    v = np.array([np.mean([v[j] for j in rank[i][:k2]], axis=0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(nq, n):
            jac = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
            out[i, j - nq] = lam * d[i, j] + (1 - lam) * jac
    return out


def test_k_reciprocal_matches_step_by_step_twin():
    rng = np.random.default_rng(11)
    centres = unit(4, 8, rng)
    g = l2_normalize(np.repeat(centres, 6, axis=0) + 0.3 * rng.normal(size=(24, 8)))
    q = l2_normalize(centres[:2] + 0.3 * rng.normal(size=(2, 8)))
    got = k_reciprocal(q, g, k1=5, k2=3, lam=0.3)
    np.testing.assert_allclose(got, k_reciprocal_twin(q, g, 5, 3, 0.3), atol=1e-5)
    assert got.shape == (2, 24)
    # the query's own group ranks first after re-ranking
    assert set(np.argsort(got[0])[:6] // 6) == {0}
