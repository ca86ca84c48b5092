"""S2RIC step 3: NMF-based spectral clustering of the diffusion map, and the choice of K.

The paper factorises a non-negative similarity of the embedded points and labels each point
by its largest factor. A prototype (docs/METHOD.md §3b) found NMF of sparse kNN similarity graphs
unstable, and NMF of the diffusion affinity reliable. That affinity has an exact low-rank form

    M = A A^T,   A = [sqrt(c) 1, Y]   (Y = diffusion coordinates, N x d),

so M (N x N) is never formed: every product HALS needs is taken through A, in O(N (d + K))
memory. With c = 1 (the trivial eigenfunction), M is the diffusion affinity p_2t(x, y)/pi(y),
non-negative up to truncation (see `affinity_factor`).
The factorisation starts from SPA anchors (successive projection: the pool's "purest" points),
so it is deterministic and needs no random restarts.

K: raw NMF error only falls as K grows, so it cannot pick K. The default criterion is the
diffusion operator's eigengap (K = position of the largest gap between consecutive
eigenvalues), with a floor k_min because on a homogeneous pool it picks 2-3. The gaps, and
the NMF relative error for each K in range (when cheap), are reported; the user may fix K.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from paser.errors import PaserError

K_MIN_DEFAULT = 8
K_MAX_DEFAULT = 24


@dataclass
class ClusterResult:
    """The S2RIC clustering of a pool.

    labels: int64[N], clusters numbered 0..k-1 by decreasing size, none empty.
    criterion: how k was chosen ("eigengap" or "fixed"); criterion_values: eigengap per K.
    nmf_errors: NMF relative error ||M - WH||_F / ||M||_F per K tried (empty if skipped).
    eigenvalues: leading eigenvalues of the diffusion operator (the trivial 1 first).
    coords: diffusion coordinates N x d (the first two make a 2-D map of the pool).
    n_reassigned: points moved to fill a factor that won no point (usually 0).
    """

    labels: np.ndarray
    k: int
    criterion: str
    criterion_values: dict[int, float]
    eigenvalues: np.ndarray
    coords: np.ndarray
    nmf_errors: dict[int, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    n_reassigned: int = 0

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


# ----------------------------------------------------------------------------- choosing K


def eigengaps(eigenvalues: np.ndarray, k_max: int | None = None) -> dict[int, float]:
    """{K: lambda_{K-1} - lambda_K} for K = 2.. (eigenvalues sorted descending, trivial 1 first).

    A large gap after the K-th eigenvalue means K nearly-invariant groups under diffusion
    (K well-separated clusters give K eigenvalues near 1, then a drop).
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    top = len(lam) - 1 if k_max is None else min(int(k_max), len(lam) - 1)
    return {K: float(lam[K - 1] - lam[K]) for K in range(2, top + 1)}


def choose_k_eigengap(eigenvalues: np.ndarray, k_min: int, k_max: int) -> tuple[int, dict[int, float]]:
    """The K in [k_min, k_max] with the largest eigengap, and all gaps for K = 2..k_max."""
    gaps = eigengaps(eigenvalues, k_max)
    cand = {K: g for K, g in gaps.items() if K >= k_min}
    if not cand:
        raise PaserError(f"no K in [{k_min}, {k_max}] can be judged from {len(eigenvalues)} eigenvalues")
    best = max(cand, key=lambda K: (cand[K], -K))  # ties: the smaller K
    return best, gaps


# ----------------------------------------------------------------------------- low-rank NMF


def affinity_factor(coords: np.ndarray, c: float = 1.0) -> np.ndarray:
    """A = [sqrt(c) 1, Y]: M = A A^T is the diffusion affinity.

    With psi normalised so that sum_i pi_i psi_j(i)^2 = 1 (as `diffusion_map` does) and the
    trivial eigenfunction psi_0 = 1, the spectral expansion gives
        1 + Y_x . Y_y = sum_j lambda_j^{2t} psi_j(x) psi_j(y) = p_{2t}(x, y) / pi(y) >= 0,
    the transition density of a 2t-step walk: non-negative, block-diagonal for separated
    clusters. Truncating to d components leaves small negative entries, which the non-negative
    factors simply cannot fit. c = 1 is that expansion; a larger c (e.g. max_i |Y_i|^2, which
    guarantees M >= 0) adds a constant that every factor must share, blurring the clusters.
    """
    Y = np.asarray(coords, dtype=np.float64)
    return np.concatenate([np.full((Y.shape[0], 1), np.sqrt(float(c))), Y], axis=1)


def spa_anchors(A: np.ndarray, K: int) -> np.ndarray:
    """Successive projection algorithm on the columns of M = A A^T, through A only.

    SPA picks, K times, the column of largest norm and projects the others off it (Gillis &
    Vavasis 2014): under separability these are the extreme points. Column inner products of
    M are M^T M = A G A^T with G = A^T A, i.e. those of the rows of B = A G^{1/2} (N x r),
    so SPA runs on B in O(N r K).
    """
    G = A.T @ A
    ev, V = np.linalg.eigh(G)
    B = A @ (V * np.sqrt(np.clip(ev, 0, None))) @ V.T
    R = B.copy()
    norms = np.einsum("ij,ij->i", R, R)
    anchors: list[int] = []
    for _ in range(K):
        j = int(np.argmax(norms))
        if norms[j] <= 1e-12 * max(1.0, float(norms.max(initial=0.0))) and anchors:
            # Rank exhausted: take the next point farthest (in B) from the chosen anchors.
            dmin = np.full(B.shape[0], np.inf)
            for a in anchors:
                dmin = np.minimum(dmin, ((B - B[a]) ** 2).sum(axis=1))
            j = int(np.argmax(dmin))
        anchors.append(j)
        u = R[j] / max(np.linalg.norm(R[j]), 1e-300)
        R -= np.outer(R @ u, u)
        norms = np.einsum("ij,ij->i", R, R)
        norms[anchors] = -1.0
    return np.asarray(anchors, dtype=np.int64)


def nmf_relative_error(A: np.ndarray, W: np.ndarray, H: np.ndarray) -> float:
    """||A A^T - W H||_F / ||A A^T||_F, exactly, in O(N r K) time and no N x N matrix."""
    G = A.T @ A
    m2 = float(np.sum(G * G))
    cross = float(np.trace((H @ A) @ (A.T @ W)))
    wh2 = float(np.sum((W.T @ W) * (H @ H.T)))
    return float(np.sqrt(max(m2 - 2.0 * cross + wh2, 0.0) / m2)) if m2 > 0 else 0.0


def nmf_lowrank(
    A: np.ndarray,
    K: int,
    max_iter: int = 300,
    tol: float = 1e-5,
    check_every: int = 10,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """NMF  A A^T ~ W H  (W: N x K, H: K x N, both >= 0) by HALS from an SPA start.

    HALS (Cichocki & Phan 2009) updates one factor column/row at a time in closed form. All
    it needs from M is M H^T = A (A^T H^T) and W^T M = (W^T A) A^T: O(N r K) per sweep.
    Written by hand because sklearn's NMF needs M itself (N x N).
    Returns (W with unit-norm columns, H, relative error, iterations run).
    """
    n = A.shape[0]
    if not 1 <= K <= n:
        raise PaserError(f"cannot make {K} clusters of {n} points")
    eps = 1e-12
    anchors = spa_anchors(A, K)
    # W is kept transposed (Wt: K x N), so that every HALS update touches contiguous rows.
    Wt = np.clip(A[anchors] @ A.T, 0.0, None)  # the anchors' columns of M
    Wt /= np.maximum(np.linalg.norm(Wt, axis=1, keepdims=True), eps)
    WtW = Wt @ Wt.T
    WtM = (Wt @ A) @ A.T
    H = np.clip(np.linalg.lstsq(WtW + eps * np.eye(K), WtM, rcond=None)[0], 0.0, None)
    del WtM

    err_prev = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        # H rows, given W.
        WtW = Wt @ Wt.T
        WtM = (Wt @ A) @ A.T
        for k in range(K):
            H[k] += (WtM[k] - WtW[k] @ H) / max(WtW[k, k], eps)
            np.maximum(H[k], 0.0, out=H[k])
        # W columns (rows of Wt), given H: M H^T = A (A^T H^T) by symmetry of M.
        HHt = H @ H.T
        HMt = (H @ A) @ A.T  # = (M H^T)^T
        for k in range(K):
            Wt[k] += (HMt[k] - HHt[k] @ Wt) / max(HHt[k, k], eps)
            np.maximum(Wt[k], 0.0, out=Wt[k])
        # Keep the scale in H (W unit columns): no drift, and H comparable across factors.
        nw = np.maximum(np.linalg.norm(Wt, axis=1), eps)
        Wt /= nw[:, None]
        H *= nw[:, None]
        if it % check_every == 0:
            err = nmf_relative_error(A, Wt.T, H)
            if np.isfinite(err_prev) and err_prev - err <= tol * err_prev:
                break
            err_prev = err
    W = Wt.T
    err = nmf_relative_error(A, W, H)
    return W, H, err, it


def labels_from_factors(H: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
    """Label = argmax factor; a factor that wins no point takes its strongest point.

    Returns (labels relabelled 0..K-1 by decreasing size, points reassigned).
    """
    K, n = H.shape
    labels = np.argmax(H, axis=0).astype(np.int64)
    moved = 0
    counts = np.bincount(labels, minlength=K)
    share = H / np.maximum(H.sum(axis=0, keepdims=True), 1e-300)
    for k in np.flatnonzero(counts == 0):
        # The point this factor explains best, taken from a cluster that can spare it.
        for j in np.argsort(-share[k], kind="stable"):
            if counts[labels[j]] > 1:
                counts[labels[j]] -= 1
                labels[j] = k
                counts[k] = 1
                moved += 1
                break
    return relabel_by_size(labels), moved


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..K-1 by decreasing size (ties: the lower old label first)."""
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.lexsort((uniq, -counts))
    new = np.empty(len(uniq), dtype=np.int64)
    new[order] = np.arange(len(uniq))
    return new[inv.ravel()]


# ----------------------------------------------------------------------------- entry point


def semantic_clusters(
    embeddings: np.ndarray,
    k: int | None = None,
    k_min: int = K_MIN_DEFAULT,
    k_max: int = K_MAX_DEFAULT,
    n_neighbors: int = 15,
    n_components: int = 32,
    t: float = 1,
    alpha: float = 1.0,
    seed: int = 0,
    nmf_errors: bool | None = None,
    max_iter: int = 300,
) -> ClusterResult:
    """S2RIC: kNN graph -> diffusion map -> NMF of the diffusion affinity -> labels.

    k: fix the number of clusters; None picks it by the eigengap within [k_min, k_max].
    nmf_errors: also factorise for every K in [k_min, k_max] and report the relative errors
    (None: only when N <= 20,000, where it costs seconds).
    Deterministic for a fixed seed. Memory O(N (n_neighbors + n_components + K)).
    """
    from paser.select.manifold import diffusion_map, knn_graph

    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise PaserError(f"embeddings must be a 2-D array (N x dim), got shape {X.shape}")
    n = X.shape[0]
    if k is not None:
        k = int(k)
        if not 1 <= k <= n:
            raise PaserError(f"k = {k} clusters is impossible for {n} samples")
    if k_min < 2 or k_max < k_min:
        raise PaserError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    # Fewer points than the spectrum needs: shrink the ranges rather than fail on small pools.
    n_components = max(1, min(n_components, n - 3))
    k_max_eff = min(k_max, n - 3)
    k_min_eff = min(k_min, max(2, k_max_eff))
    if n < 6:
        raise PaserError(f"at least 6 samples are needed to cluster, got {n}")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    indices, distances = knn_graph(X, k=n_neighbors, seed=seed)
    timings["knn_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    n_eig = max(n_components, k_max_eff)
    coords_all, eigenvalues = diffusion_map(indices, distances, n_components=n_eig, t=t, alpha=alpha, seed=seed)
    coords = coords_all[:, :n_components]
    del indices, distances, coords_all
    timings["diffusion_s"] = time.perf_counter() - t1

    gaps = eigengaps(eigenvalues, k_max_eff)
    if k is None:
        K, _ = choose_k_eigengap(eigenvalues, k_min_eff, k_max_eff)
        criterion = "eigengap"
    else:
        K, criterion = k, "fixed"

    t2 = time.perf_counter()
    A = affinity_factor(coords)
    errors: dict[int, float] = {}
    if nmf_errors is None:
        nmf_errors = n <= 20_000
    if nmf_errors:
        for kk in range(k_min_eff, k_max_eff + 1):
            if kk != K:
                errors[kk] = nmf_lowrank(A, kk, max_iter=max_iter)[2]
    if K == 1:
        labels, moved, errors[1] = np.zeros(n, dtype=np.int64), 0, float("nan")
    else:
        _, H, errors[K], _ = nmf_lowrank(A, K, max_iter=max_iter)
        labels, moved = labels_from_factors(H)
    timings["nmf_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    return ClusterResult(
        labels=labels,
        k=int(labels.max()) + 1,
        criterion=criterion,
        criterion_values=gaps,
        eigenvalues=eigenvalues,
        coords=coords,
        nmf_errors=dict(sorted(errors.items())),
        timings=timings,
        n_reassigned=moved,
    )


def cluster_purity(labels: np.ndarray, sources) -> float:
    """Share of samples whose source is the majority source of their cluster (1 = pure)."""
    labels = np.asarray(labels)
    src = np.asarray(sources)
    if labels.shape[0] != src.shape[0]:
        raise PaserError(f"{labels.shape[0]} labels but {src.shape[0]} sources")
    if labels.size == 0:
        return float("nan")
    _, s = np.unique(src, return_inverse=True)
    _, lab = np.unique(labels, return_inverse=True)
    table = np.zeros((lab.max() + 1, s.max() + 1), dtype=np.int64)
    np.add.at(table, (lab.ravel(), s.ravel()), 1)
    return float(table.max(axis=1).sum() / labels.size)
