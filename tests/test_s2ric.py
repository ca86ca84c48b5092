"""S2RIC: kNN graph, diffusion map, low-rank NMF clustering, and the sentence encoder."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from paser.errors import PaserError
from paser.select.cluster import (
    affinity_factor,
    choose_k_eigengap,
    cluster_purity,
    eigengaps,
    nmf_lowrank,
    nmf_relative_error,
    relabel_by_size,
    semantic_clusters,
    spa_anchors,
)
from paser.select.manifold import diffusion_kernel, diffusion_map, knn_graph


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    # The machine is shared: oversubscribed BLAS threads slow small products by 10x or more.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def sphere_blobs(n: int, k: int, dim: int = 64, spread: float = 1.0, seed: int = 0):
    """Unit vectors around k random centres, unequal cluster sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = np.linspace(1.0, 2.0, k)
    y = rng.choice(k, size=n, p=w / w.sum())
    X = centres[y] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


# ----------------------------------------------------------------------------- manifold


def test_knn_graph_matches_brute_force():
    X, _ = sphere_blobs(400, 4, dim=16, spread=2.0)
    I, D = knn_graph(X, k=7)
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    ref = np.argsort(-S, axis=1)[:, :7]
    assert I.shape == (400, 7) and D.shape == (400, 7)
    assert not (I == np.arange(400)[:, None]).any()  # self excluded
    assert (np.sort(I, axis=1) == np.sort(ref, axis=1)).mean() > 0.99
    exp = np.sqrt(np.clip(2 - 2 * np.take_along_axis(S, ref, axis=1), 0, None))
    np.testing.assert_allclose(D, exp, atol=1e-3)
    assert np.all(np.diff(D, axis=1) >= -1e-6)  # nearest first


def test_knn_graph_ivf_and_pca_path_finds_most_neighbours():
    X, y = sphere_blobs(3000, 5, dim=48, spread=1.5)
    I_exact, _ = knn_graph(X, k=10)
    I_ivf, D_ivf = knn_graph(X, k=10, exact_max_n=100, nprobe=16)
    assert I_ivf.min() >= 0 and np.isfinite(D_ivf).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I_exact, I_ivf)])
    assert recall > 0.7
    # PCA drops the (isotropic) noise that ranks neighbours inside a blob, not the blobs.
    I_pca, _ = knn_graph(X, k=10, exact_max_n=100, pca_min_n=100, pca_dim=24, nprobe=16)
    assert (y[I_pca] == y[:, None]).mean() > 0.98


def test_knn_graph_rejects_bad_input():
    with pytest.raises(PaserError):
        knn_graph(np.array([[np.nan, 1.0], [0.0, 1.0], [1.0, 0.0]]), k=1)
    with pytest.raises(PaserError):
        knn_graph(np.ones(5), k=1)


def test_diffusion_kernel_is_symmetric_sparse_and_local():
    X, _ = sphere_blobs(300, 3, dim=16)
    I, D = knn_graph(X, k=10)
    W = diffusion_kernel(I, D)
    assert (abs(W - W.T)).max() < 1e-12
    assert W.nnz <= 300 * (2 * 10 + 1)
    assert np.allclose(W.diagonal(), 1.0)
    # Edge (i, j): exp(-d^2 / (sigma_i sigma_j)), sigma = distance to the 10th neighbour.
    i, j = 5, I[5, 0]
    sig = D[:, -1]
    assert W[i, j] == pytest.approx(max(np.exp(-D[5, 0] ** 2 / (sig[i] * sig[j])), W[j, i]), rel=1e-6)


def test_diffusion_map_matches_dense_eigendecomposition():
    X, _ = sphere_blobs(250, 3, dim=16, spread=1.5)
    I, D = knn_graph(X, k=10)
    coords, vals = diffusion_map(I, D, n_components=4, alpha=1.0, tol=1e-10)
    # Dense reference, fine at 250 points: P = D^-1 K^(alpha), K^(alpha) = Q^-1 W Q^-1.
    W = diffusion_kernel(I, D).toarray()
    q = W.sum(1)
    Ka = W / np.outer(q, q)
    P = Ka / Ka.sum(1, keepdims=True)
    ev = np.sort(np.linalg.eigvals(P).real)[::-1]
    np.testing.assert_allclose(vals, ev[:5], atol=1e-6)
    assert vals[0] == pytest.approx(1.0, abs=1e-8)
    # Each coordinate is an eigenvector of P scaled by its eigenvalue.
    for j in range(4):
        psi = coords[:, j] / vals[j + 1]
        np.testing.assert_allclose(P @ psi, vals[j + 1] * psi, atol=1e-6 * np.abs(psi).max())
    # pi-orthonormal: sum_i pi_i psi_i^2 = 1, and orthogonal to the constant.
    pi = Ka.sum(1) / Ka.sum()
    psi0 = coords[:, 0] / vals[1]
    assert np.sum(pi * psi0**2) == pytest.approx(1.0, rel=1e-6)
    assert abs(np.sum(pi * psi0)) < 1e-6


def test_diffusion_map_disconnected_graph_drops_only_the_constant():
    # Three far-apart groups: three eigenvalues 1; coordinates separate the groups exactly.
    X, y = sphere_blobs(300, 3, dim=32, spread=0.3)
    I, D = knn_graph(X, k=8)
    coords, vals = diffusion_map(I, D, n_components=4)
    assert np.sum(vals > 1 - 1e-6) == 3
    means = np.stack([coords[y == c, :2].mean(0) for c in range(3)])
    spread = max(coords[y == c, :2].std(0).max() for c in range(3))
    gaps = [np.linalg.norm(means[a] - means[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 10 * spread


# ----------------------------------------------------------------------------- NMF and K


def test_lowrank_nmf_error_is_exact_and_no_worse_than_start():
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((200, 6)) * 0.3
    A = affinity_factor(Y)
    M = A @ A.T
    W, H, err, _ = nmf_lowrank(A, 4)
    assert (W >= 0).all() and (H >= 0).all()
    assert err == pytest.approx(np.linalg.norm(M - W @ H) / np.linalg.norm(M), rel=1e-8)
    assert nmf_relative_error(A, W, H) == pytest.approx(err)
    W1, H1, err1, _ = nmf_lowrank(A, 4, max_iter=1)
    assert err <= err1 + 1e-12


def test_spa_recovers_separable_anchors():
    # M = A A^T whose columns are mixtures of 3 pure columns: SPA must find the pure ones.
    rng = np.random.default_rng(2)
    V = np.abs(rng.standard_normal((3, 5))) + np.eye(3, 5) * 3
    mix = rng.dirichlet(np.ones(3) * 0.5, size=97)
    A = np.vstack([V, mix @ V])
    anchors = spa_anchors(A, 3)
    assert sorted(anchors.tolist()) == [0, 1, 2]


def test_eigengap_choice_and_floor():
    vals = np.array([1.0, 0.99, 0.98, 0.5, 0.45, 0.3, 0.29, 0.28, 0.27, 0.26])
    gaps = eigengaps(vals)
    assert gaps[3] == pytest.approx(0.48)
    assert choose_k_eigengap(vals, 2, 8)[0] == 3
    assert choose_k_eigengap(vals, 4, 8)[0] == 5  # the floor excludes 3
    with pytest.raises(PaserError):
        choose_k_eigengap(vals, 12, 14)


def test_relabel_by_size_and_purity():
    lab = relabel_by_size(np.array([5, 5, 2, 9, 9, 9]))
    assert lab.tolist() == [1, 1, 2, 0, 0, 0]
    assert cluster_purity(np.array([0, 0, 1, 1]), np.array(["a", "b", "c", "c"])) == pytest.approx(0.75)
    assert cluster_purity(np.array([0, 1]), ["a", "b"]) == 1.0


# ----------------------------------------------------------------------------- end to end


def test_recovers_blobs_with_auto_k():
    X, y = sphere_blobs(1500, 6, dim=64, spread=1.0)
    res = semantic_clusters(X, k_min=2, k_max=12, n_components=16, seed=0)
    assert res.criterion == "eigengap"
    assert res.k == 6
    assert adjusted_rand_score(y, res.labels) > 0.95
    assert set(res.criterion_values) == set(range(2, 13))
    assert res.nmf_errors and all(0 <= e <= 1 for e in res.nmf_errors.values())
    assert res.coords.shape == (1500, 16) and res.eigenvalues[0] == pytest.approx(1.0)


def test_fixed_k_honoured_nonempty_sorted_and_deterministic():
    X, _ = sphere_blobs(1500, 4, dim=32, spread=2.5, seed=3)
    for K in (2, 5, 9):
        res = semantic_clusters(X, k=K, nmf_errors=False)
        sizes = res.sizes()
        assert res.k == K and res.criterion == "fixed"
        assert res.labels.dtype == np.int64 and set(np.unique(res.labels)) == set(range(K))
        assert (sizes > 0).all() and (np.diff(sizes) <= 0).all()
    a = semantic_clusters(X, seed=7, k_max=12, nmf_errors=False)
    b = semantic_clusters(X, seed=7, k_max=12, nmf_errors=False)
    assert np.array_equal(a.labels, b.labels) and a.k == b.k
    np.testing.assert_allclose(a.coords, b.coords)


def test_no_dense_n_by_n_allocation():
    n = 20_000
    X, y = sphere_blobs(n, 8, dim=24, spread=1.0, seed=4)
    tracemalloc.start()
    try:
        res = semantic_clusters(X, k=8, n_components=10, nmf_errors=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A dense float64 N x N would be 3.2 GB; even one float32 N x N row block of N/10 is 160 MB.
    assert peak < 0.03 * n * n * 8, f"peak {peak / 2**20:.0f} MiB"
    assert adjusted_rand_score(y, res.labels) > 0.9


def test_user_errors():
    X, _ = sphere_blobs(50, 2, dim=8)
    with pytest.raises(PaserError):
        semantic_clusters(X, k=0)
    with pytest.raises(PaserError):
        semantic_clusters(X, k_min=5, k_max=3)
    with pytest.raises(PaserError):
        semantic_clusters(X[:4])


# ----------------------------------------------------------------------------- the encoder


# Slow only because importing sentence-transformers takes ~1 min on a loaded 2-core machine.
@pytest.mark.slow
def test_embedder_separates_topics_and_caches(tmp_path):
    from paser.io.records import Record
    from paser.select.embed import embed_records, embed_texts, record_text

    texts = {
        "math": ["Solve the equation 2x + 3 = 11.", "Solve the equation 5x - 7 = 18 for x.", "Find x if 4x + 1 = 9."],
        "code": ["Write a Python function to sort a list.", "Write a Python function that reverses a string.",
                 "Write a Python program that counts the words in a file."],
        "cooking": ["Give me a recipe for chocolate cake.", "How do I bake a chocolate cake?",
                    "What ingredients do I need for a cake recipe?"],
    }
    flat = [s for v in texts.values() for s in v]
    E = embed_texts(flat, show_progress=False)
    assert E.shape == (9, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    topic = np.repeat(np.arange(3), 3)
    S = (E @ E.T).astype(np.float64)
    np.fill_diagonal(S, np.nan)
    # Each sentence is nearest to, and on average closest to, its own topic.
    assert (topic[np.nanargmax(S, axis=1)] == topic).all()
    mean_sim = np.stack([np.nanmean(S[:, topic == c], axis=1) for c in range(3)], axis=1)
    assert (mean_sim.argmax(axis=1) == topic).all()

    recs = [Record(instruction=s, input="ctx" if i == 0 else "", output="o") for i, s in enumerate(flat)]
    assert record_text(recs[0]) == flat[0] + "\nctx" and record_text(recs[1]) == flat[1]
    first = embed_records(recs[:5], cache_dir=tmp_path, show_progress=False)
    allv = embed_records(recs, cache_dir=tmp_path, show_progress=False, chunk_size=2)
    np.testing.assert_allclose(allv[:5], first, atol=1e-6)
    np.testing.assert_allclose(allv[1:], E[1:], atol=1e-5)
    shards = sorted(p for p in tmp_path.rglob("shard-*.parquet"))
    assert len(shards) == 1 + 2  # 5 first, then the 4 missing in chunks of 2
    # Order follows the request, and a cached-only call embeds nothing new.
    again = embed_records(recs[::-1], cache_dir=tmp_path, show_progress=False)
    np.testing.assert_allclose(again, allv[::-1])
    assert len(sorted(tmp_path.rglob("shard-*.parquet"))) == 3
