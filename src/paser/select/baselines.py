"""The baselines PASER is compared with, all at the same budget B (docs/METHOD.md §4).

Pure functions over arrays the driver has already computed (clusters, losses, embeddings),
so each baseline costs only what it needs: random and full need nothing, uniform needs the
S2RIC clusters, IFD and instruction mining the pruned model's losses, nuggets one-shot losses.
"""

from __future__ import annotations

import numpy as np

from paser.select.budget import allocate_budget, fill_in_order, select_with_budget


def random_selection(n: int, budget: int, seed: int, cost: np.ndarray | None = None) -> np.ndarray:
    """B indices drawn uniformly without replacement (seeded); with ``cost`` (a token budget),
    records in a seeded random order until the budget is full."""
    rng = np.random.default_rng(seed)
    if cost is None:
        return np.sort(rng.choice(n, size=min(budget, n), replace=False))
    return fill_in_order(rng.permutation(n), cost, budget)


def uniform_selection(labels: np.ndarray, budget: int, seed: int, cost: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same clusters as PASER, an equal share each (capped, the rest passed on), random within.

    This is PASER without capability-degradation awareness: it isolates what CDAIS adds.
    ``cost``: per-record cost of a token budget (shares are then tokens). Returns (selected
    indices, n_k in the budget's unit).
    """
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, weights=cost, minlength=k).astype(np.int64) if cost is not None else np.bincount(labels, minlength=k)
    n_k = allocate_budget(np.ones(k), sizes, budget)
    priority = np.random.default_rng(seed).random(len(labels))
    out = select_with_budget(labels, priority, n_k, None, cds=np.ones(k), cost=cost)
    return np.array(sorted(out.selected), dtype=np.int64), n_k


def ifd_scores(loss_conditioned: np.ndarray, loss_unconditioned: np.ndarray) -> np.ndarray:
    """Cherry LLM's Instruction-Following Difficulty: loss(y|x) / loss(y)."""
    return loss_conditioned / np.maximum(loss_unconditioned, 1e-8)


def ifd_selection(ifd: np.ndarray, budget: int, cost: np.ndarray | None = None) -> np.ndarray:
    """Highest IFD first, among samples with IFD < 1.

    IFD ≥ 1 means the instruction does not help the model predict the response at all; the
    Cherry LLM authors (and Superfiltering after them) drop those as misaligned pairs. They
    are used only if the budget cannot be met otherwise.
    """
    n = len(ifd)
    valid = ifd < 1.0
    # sort key: valid first, then IFD descending, then index (deterministic)
    order = np.lexsort((np.arange(n), -ifd, ~valid))
    if cost is not None:
        return fill_in_order(order, cost, budget)
    return np.sort(order[: min(budget, n)])


# Instruction Mining (Cao et al., 2023) fits a linear rule from quality indicators to the loss
# of the model fine-tuned on the data; lower predicted loss = better data. Its published rule
# uses a reward-model score, the response length and the distance to the 6th nearest neighbour
# (kNN-6) in embedding space, with a large negative weight on kNN-6 (diverse data helps). We
# have no reward model offline, so the pruned model's response perplexity stands in for the
# "naturalness" the reward captured, and lexical diversity is added. The indicators are
# standardised (z-scores) so that the weights compare; the weights below keep the paper's signs
# and its ranking of importance (kNN-6 first), and are documented here because they are ours.
INSTRUCTION_MINING_WEIGHTS = {
    "knn6_distance": -0.935,  # farther from its neighbours -> lower predicted loss
    "log_perplexity": 0.15,  # text the model finds unnatural -> higher predicted loss
    "lexical_diversity": -0.10,  # richer vocabulary -> lower predicted loss
    "response_length": 0.05,  # the paper's length weight is small and positive
}


def lexical_diversity(text: str) -> float:
    """Type-token ratio over the first 200 words (bounded so long answers are not penalised)."""
    words = text.lower().split()[:200]
    return len(set(words)) / len(words) if words else 0.0


def knn_distance(embeddings: np.ndarray, k: int = 6) -> np.ndarray:
    """Cosine distance of each (L2-normalised) embedding to its k-th nearest other point."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    kk = min(k + 1, len(x))
    sims, _ = index.search(x, kk)
    return 1.0 - sims[:, kk - 1]


def _z(v: np.ndarray) -> np.ndarray:
    s = v.std()
    return (v - v.mean()) / s if s > 0 else np.zeros_like(v)


def instruction_mining_scores(indicators: dict[str, np.ndarray]) -> np.ndarray:
    """Quality = −(predicted loss) under the linear rule above."""
    pred = sum(w * _z(np.asarray(indicators[name], dtype=np.float64)) for name, w in INSTRUCTION_MINING_WEIGHTS.items())
    return -pred


def top_b(scores: np.ndarray, budget: int, cost: np.ndarray | None = None) -> np.ndarray:
    """Indices of the B highest scores (ties to the smaller index), sorted; with ``cost``, the
    highest scores that fit a token budget of B."""
    n = len(scores)
    order = np.lexsort((np.arange(n), -np.asarray(scores, dtype=np.float64)))
    if cost is not None:
        return fill_in_order(order, cost, budget)
    return np.sort(order[: min(budget, n)])


def nuggets_anchor_indices(embeddings: np.ndarray, n_anchors: int, seed: int) -> np.ndarray:
    """Nuggets' anchor set: the samples nearest to k-means centroids (diverse, representative)."""
    from sklearn.cluster import KMeans

    n_anchors = min(n_anchors, len(embeddings))
    km = KMeans(n_clusters=n_anchors, n_init=3, random_state=seed).fit(embeddings)
    d = ((embeddings[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1) if len(embeddings) * n_anchors < 5e7 else None
    if d is None:  # pragma: no cover - very large pools
        return np.unique(km.predict(embeddings))
    anchors = []
    for c in range(n_anchors):
        for i in np.argsort(d[:, c]):
            if i not in anchors:
                anchors.append(int(i))
                break
    return np.array(anchors, dtype=np.int64)


def golden_scores(zero_shot: np.ndarray, one_shot: np.ndarray) -> np.ndarray:
    """Nuggets' golden score: the share of anchors whose loss drops when the candidate is the
    one-shot demonstration. zero_shot: [A]; one_shot: [N, A]."""
    return (one_shot < zero_shot[None, :]).mean(axis=1)
