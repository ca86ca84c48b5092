"""S2RIC step 2: manifold learning with a diffusion kernel, on a sparse kNN graph.

Diffusion maps (Coifman & Lafon, 2006) keep the pool's non-linear structure, which is why the
paper prefers them to PCA or t-SNE. The reference code built dense N x N distance, affinity and
inverse matrices (21 GB each at 52K samples); here everything is a k-nearest-neighbour graph,
so memory grows as O(N k) and millions of samples stay feasible:

    knn_graph      faiss kNN (exact inner product; IVF, and PCA first, for large N)
    diffusion_map  Gaussian kernel with local scaling -> alpha-normalisation -> eigenvectors
                   of the Markov operator via its symmetric conjugate (scipy eigsh)
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from paser.errors import PaserError

EXACT_MAX_N = 200_000  # above this, IVF: exact search is O(N^2 d) time
PCA_MIN_N = 500_000  # from here on, PCA to `pca_dim` before the IVF search (§3b: 1M -> 64 dims)


def _normalise_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(X / norms, dtype=np.float32)


def _drop_self(I: np.ndarray, D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row, drop the query itself (or, for duplicates, the last one)."""
    n = I.shape[0]
    is_self = I == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    # A row can hold itself only once, so exactly one entry per row is dropped.
    keep = ~is_self
    return I[keep].reshape(n, k), D[keep].reshape(n, k)


def _search_batched(index, X: np.ndarray, k: int, batch: int = 65536, desc: str = "kNN") -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    n = X.shape[0]
    I = np.empty((n, k), dtype=np.int64)
    S = np.empty((n, k), dtype=np.float32)
    for start in tqdm(range(0, n, batch), desc=desc, unit="batch", disable=n <= batch):
        s, i = index.search(X[start : start + batch], k)
        S[start : start + batch] = s
        I[start : start + batch] = i
    return I, S


def knn_graph(
    X: np.ndarray,
    k: int = 15,
    exact_max_n: int = EXACT_MAX_N,
    pca_min_n: int = PCA_MIN_N,
    pca_dim: int = 64,
    nprobe: int = 12,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row of X by cosine similarity, the row itself excluded.

    Returns (indices int64 N x k, distances float32 N x k), neighbours nearest first, with
    distance = Euclidean distance between the L2-normalised rows (= sqrt(2 - 2 cos)).

    Up to `exact_max_n` rows: faiss IndexFlatIP (exact; 50K rows in ~30 s on one thread).
    Beyond: IVF with nlist ~ 4 sqrt(N) and `nprobe` lists probed; from `pca_min_n` rows the
    vectors are first projected to `pca_dim` dimensions by PCA (trained on a sample), which
    §3b found keeps clusters while making 1M points tractable.
    """
    import faiss

    X = np.asarray(X)
    if X.ndim != 2:
        raise PaserError(f"knn_graph expects a 2-D array, got shape {X.shape}")
    n, d = X.shape
    if n < 2:
        raise PaserError(f"at least 2 points are needed for a neighbour graph, got {n}")
    if not np.all(np.isfinite(X)):
        raise PaserError("the embeddings contain NaN or infinite values")
    k = int(min(k, n - 1))
    Xn = _normalise_rows(X)
    rng = np.random.default_rng(seed)

    if n >= pca_min_n and d > pca_dim:
        n_train = min(n, max(50_000, 20 * pca_dim * 10))
        pca = faiss.PCAMatrix(d, pca_dim)
        pca.train(Xn[np.sort(rng.choice(n, n_train, replace=False))])
        Xn = _normalise_rows(pca.apply(Xn))
        d = pca_dim

    if n <= exact_max_n:
        index = faiss.IndexFlatIP(d)
        index.add(Xn)
        I, S = _search_batched(index, Xn, k + 1, batch=8192)
    else:
        nlist = int(round(4 * math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed) + 1234  # deterministic k-means of the coarse quantiser
        n_train = min(n, 64 * nlist)
        index.train(Xn[np.sort(rng.choice(n, n_train, replace=False))])
        index.add(Xn)
        index.nprobe = int(nprobe)
        I, S = _search_batched(index, Xn, k + 1)
        # A query whose probed lists hold fewer than k+1 points gets -1 slots: search those
        # few rows again over every list (exact for them) rather than keep holes.
        missing = np.flatnonzero((I < 0).any(axis=1))
        if missing.size:
            index.nprobe = nlist
            s, i = index.search(Xn[missing], k + 1)
            I[missing], S[missing] = i, s
    I, S = _drop_self(I, S, k)
    dist = np.sqrt(np.clip(2.0 - 2.0 * S, 0.0, None)).astype(np.float32)
    return I, dist


def diffusion_kernel(indices: np.ndarray, distances: np.ndarray, self_loops: bool = True) -> sp.csr_matrix:
    """Sparse symmetric kernel W_ij = exp(-d_ij^2 / (sigma_i sigma_j)) on the kNN graph.

    Local scaling (Zelnik-Manor & Perona): sigma_i = distance to the k-th neighbour, so dense
    and sparse regions of the pool get comparable bandwidths. Symmetrised by max (an edge
    exists if either end lists the other). The diagonal (distance 0, weight 1) is kept, as in
    the diffusion-maps kernel over all points: it also makes the walk lazy, which keeps the
    Markov operator's spectrum away from -1.
    """
    n, k = indices.shape
    sigma = distances[:, -1].astype(np.float64)
    pos = sigma[sigma > 0]
    # Exact duplicates can make sigma 0; floor it at a small share of the typical bandwidth.
    floor = 1e-3 * (float(np.median(pos)) if pos.size else 1.0)
    sigma = np.maximum(sigma, floor)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = indices.reshape(-1).astype(np.int64)
    d2 = distances.reshape(-1).astype(np.float64) ** 2
    w = np.exp(-d2 / (sigma[rows] * sigma[cols]))
    W = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    W.sum_duplicates()
    W = W.maximum(W.T).tocsr()
    if self_loops:
        W = (W + sp.identity(n, format="csr")).tocsr()
    return W


def diffusion_map(
    indices: np.ndarray,
    distances: np.ndarray,
    n_components: int = 32,
    t: float = 1,
    alpha: float = 1.0,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion coordinates from a kNN graph: (coords N x n_components, eigenvalues).

    `eigenvalues` holds all n_components + 1 leading eigenvalues of the Markov operator,
    the trivial 1 first (for eigengap criteria); coords[:, j] = psi_{j+1} * lambda_{j+1}^t
    for the non-trivial eigenvectors psi (normalised so that their weighted mean square is 1).

    alpha = 1 (Laplace-Beltrami normalisation) removes the effect of sampling density, so
    clusters follow the geometry rather than where the pool happens to be dense.
    The Markov matrix P = D^-1 W is not symmetric; its conjugate S = D^-1/2 W D^-1/2 is, with
    the same eigenvalues and eigenvectors v = D^1/2 psi, so sparse `eigsh` applies and only
    ~n_components + 1 vectors are ever held: memory O(N (k + n_components)).
    """
    n = indices.shape[0]
    m = int(n_components)
    if m < 1:
        raise PaserError("n_components must be at least 1")
    if n < m + 2:
        raise PaserError(f"{n} points are too few for {m} diffusion components (need at least {m + 2})")
    W = diffusion_kernel(indices, distances)
    if alpha:
        q = np.asarray(W.sum(axis=1)).ravel() ** -float(alpha)
        Dq = sp.diags(q)
        W = (Dq @ W @ Dq).tocsr()
    deg = np.asarray(W.sum(axis=1)).ravel()
    s = 1.0 / np.sqrt(deg)
    Ds = sp.diags(s)
    S = (Ds @ W @ Ds).tocsr()
    S = ((S + S.T) * 0.5).tocsr()  # exact symmetry for eigsh despite rounding

    v0 = np.random.default_rng(seed).random(n) + 0.5  # fixed start vector: reproducible
    n_eig = m + 1
    vals, vecs_nt = _leading_eigenpairs(S, W, deg, n_eig, tol, v0)
    vals_nt = vals[1:]
    psi = vecs_nt * s[:, None] * math.sqrt(float(deg.sum()))
    # Fix each eigenvector's sign (its largest-magnitude entry positive): reproducible maps.
    flip = np.sign(psi[np.argmax(np.abs(psi), axis=0), np.arange(psi.shape[1])])
    flip[flip == 0] = 1.0
    psi *= flip
    lam_t = np.sign(vals_nt) * np.abs(vals_nt) ** t
    coords = psi * lam_t[None, :]
    return coords.astype(np.float64), vals.astype(np.float64)


def _leading_eigenpairs(
    S: sp.csr_matrix, W: sp.csr_matrix, deg: np.ndarray, n_eig: int, tol: float, v0: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The n_eig largest eigenvalues of S (descending) and the n_eig - 1 non-trivial vectors.

    A graph with c connected components has eigenvalue 1 exactly c times. Single-vector
    Lanczos (ARPACK) sees one direction per distinct eigenvalue, so it misses such repeats;
    their eigenvectors are known in closed form, though (sqrt(deg) on each component). They
    are built directly, deflated from S, and eigsh finds the rest.
    """
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import LinearOperator

    n = S.shape[0]
    sq = np.sqrt(deg)
    u0 = sq / np.linalg.norm(sq)
    n_comp, comp = connected_components(W, directed=False)
    if n_comp > 1:
        # Largest components first (by degree mass); keep at most n_eig of them.
        mass = np.bincount(comp, weights=deg, minlength=n_comp)
        keep = np.argsort(-mass, kind="stable")[:n_eig]
        U = np.zeros((n, len(keep)))
        for j, c in enumerate(keep):
            on = comp == c
            U[on, j] = sq[on] / np.linalg.norm(sq[on])
        # Non-trivial eigenvalue-1 vectors: span(U) minus the constant direction u0.
        B = U - np.outer(u0, u0 @ U)
        Ub, sv, _ = np.linalg.svd(B, full_matrices=False)
        ones_nt = Ub[:, sv > 1e-8][:, : len(keep) - 1]
    else:
        U = u0[:, None]
        ones_nt = np.zeros((n, 0))
    n_rest = n_eig - 1 - ones_nt.shape[1]
    vals_rest = np.zeros(0)
    vecs_rest = np.zeros((n, 0))
    if n_rest > 0:
        if n_rest >= n - U.shape[1] - 1:
            # Toy sizes only (n <= n_eig + a few): dense is exact and cheap.
            D = S.toarray() - U @ U.T
            ev, V = np.linalg.eigh(D)
            order = np.argsort(-ev)[:n_rest]
            vals_rest, vecs_rest = ev[order], V[:, order]
        else:
            def matvec(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x).reshape(n, -1)
                return S @ x - U @ (U.T @ x)

            op = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
            start = v0 - U @ (U.T @ v0)
            ev, V = eigsh(op, k=n_rest, which="LA", tol=tol, v0=start, maxiter=max(1000, 200 * n_rest))
            order = np.argsort(-ev)
            vals_rest, vecs_rest = ev[order], V[:, order]
    n_ones = 1 + ones_nt.shape[1]
    vals = np.concatenate([np.ones(n_ones), vals_rest])
    return vals, np.concatenate([ones_nt, vecs_rest], axis=1)
