"""Adaptive degradation scoring: PASER's selection without scoring the whole pool.

Exhaustive CDAIS scores every sample (METHOD.md §2), but it only ever uses two things:
each cluster's mean JSD (CDS_k, to set the quota n_k) and each cluster's top n_k samples
by the ranking in force (IES, or plain JSD). Both can be had from a fraction of the scores:

1. **CDS from a stratified sample.** Each cluster is sampled without replacement, in a
   fixed seeded order, until the t-interval of its mean (with the finite-population
   correction) has a half-width of at most ``cds_rel_error`` × the estimate, at the stated
   confidence. Two stages (Stein's rule): a pilot of ``pilot`` samples estimates the spread,
   then ``m = m0 / (1 + (m0 - 1)/N_k)``, ``m0 = (t·s / (ε·mean))²`` more are drawn, the
   classical sample size for a relative-precision mean under simple random sampling
   (Cochran, *Sampling Techniques*, §4.4). Why relative precision: n_k is proportional to
   CDS_k, so an ε error on CDS_k moves n_k by at most about ε·n_k.
2. **Top-n_k search.** A cheap predictor of JSD (the mean JSD of the k nearest scored
   samples in the embedding space, log lengths and, optionally, text statistics, combined
   by least squares) orders the unscored samples; they are scored in batches, most
   promising first, and a cluster stops when the expected number of its unscored samples
   that would beat the current n_k-th pick is at most ``(1 - confidence) · n_k`` (i.e. the
   expected recall of its true top n_k is at least ``confidence``; the current pick can only
   rise, so this bounds the misses from above). The probability that one unscored sample
   beats the pick comes from the predictor's leave-one-out residuals on the stratified
   sample, a simple random sample of each cluster and so exchangeable with the unscored
   (split-conformal calibration), scaled by response length (shorter means are noisier).
   JSD <= ln 2 gives a hard bound on top: a sample whose ranking cannot reach the pick even
   at ln 2 is never scored.

   Chosen by measurement (benchmarks/adaptive_sim.py, archived Wanda-50 % scores of the
   2,000-record pool): length-scaled residuals and text statistics each lowered the tokens
   scored at equal overlap (at confidence 0.9: 74 % -> 62 % -> 51 % of the tokens, overlap
   0.96 / 0.95 / 0.94 with exhaustive); kNN over the whole pool instead of the cluster did not. Screening on a truncated response
   was ruled out by arithmetic: prompts are 48 % of that pool's tokens (71 of 148 per
   sample) and a screen must run both models over the whole prompt, so screening alone
   would cost more than half of exhaustive scoring.
3. **The limit.** ``confidence >= 1`` scores the whole pool in one call, so the result is
   exhaustive scoring, bit for bit (the engine plans its batches from the list it is given).

Everything is deterministic for a seed: the sample orders come from the seed, ties are
broken by index, and the rounds depend only on scores already returned. The caller's
``score_fn`` is a closure over the scoring engine, so caching (a re-run rescoring nothing),
resume (a killed run re-asks for the same lists) and sharding come from the engine.

Decision (documented, not in the paper): CDS and n_k are fixed after stage 1. Re-estimating
them from the search's scores would need a model-assisted estimator (the search scores are
chosen for being high, hence biased) and a search that chases a moving target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

LN2 = math.log(2.0)  # the largest value a JSD in nats can take
PILOT = 16  # stage 1's pilot per cluster (adaptive_degradation's default; plan_adaptive's too)
CDS_REL_ERROR = 0.1  # the CDS intervals' half-width, relative to the estimate

ScoreFn = Callable[[np.ndarray], np.ndarray]
RankFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- ranking rules


def jsd_rank(jsd: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rank by JSD itself (the ranking of methods without a cost term)."""
    return np.asarray(jsd, dtype=np.float64)


def ies_rank(n_prompt: np.ndarray, n_response: np.ndarray) -> RankFn:
    """The IES ranking (paper Eq. 7) as ``rank_fn(jsd, idx)``, via the same function exhaustive uses."""
    from paser.select.efficiency import individual_efficiency

    n_x = np.asarray(n_prompt)
    n_y = np.asarray(n_response)

    def rank(jsd: np.ndarray, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return individual_efficiency(np.asarray(jsd, dtype=np.float64), n_x[idx], n_y[idx])

    return rank


# ----------------------------------------------------------------------------- stage 1: CDS


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t critical value; +inf at confidence 1."""
    from scipy.stats import t

    if confidence >= 1.0:
        return math.inf
    return float(t.ppf(0.5 + confidence / 2.0, max(int(dof), 1)))


def mean_interval(values: np.ndarray, population: int, confidence: float) -> tuple[float, float]:
    """Mean of a simple random sample (without replacement) and its CI half-width.

    t-interval with the finite-population correction sqrt(1 - m/N): a cluster sampled
    whole has half-width 0 (its mean is known), however small it is.
    """
    v = np.asarray(values, dtype=np.float64)
    m = v.size
    if m == 0:
        return math.nan, math.inf
    mean = float(v.mean())
    if m >= population:
        return mean, 0.0
    if m == 1:
        return mean, math.inf
    fpc = math.sqrt(max(0.0, 1.0 - m / population))
    return mean, t_quantile(confidence, m - 1) * float(v.std(ddof=1)) / math.sqrt(m) * fpc


def required_sample_size(std: float, mean: float, population: int, rel_error: float, confidence: float, dof: int) -> int:
    """Samples for a CI half-width of ``rel_error · mean`` (Cochran's rule with the fpc).

    ``m0 = (t · std / (rel_error · mean))²`` for sampling with replacement; without
    replacement from ``population`` items, ``m = m0 / (1 + (m0 - 1) / N)``. Whole population
    at confidence 1, or when the mean is 0 (no relative precision is reachable).
    """
    if population <= 0:
        return 0
    tq = t_quantile(confidence, dof)
    if not math.isfinite(tq) or mean <= 0:
        return population
    if std <= 0:
        return min(population, 2)
    m0 = (tq * std / (rel_error * mean)) ** 2
    m = m0 / (1.0 + (m0 - 1.0) / population)
    return int(min(population, max(2, math.ceil(m))))


def sample_orders(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Per cluster, its members in a seeded random order: the first m are its size-m sample.

    Nested samples: a larger m extends a smaller one, so a top-up never discards a score.
    One generator per cluster (seed, cluster) keeps a cluster's order independent of the others.
    """
    out = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([int(seed), c])
        out.append(members[rng.permutation(members.size)])
    return out


# ----------------------------------------------------------------------------- stage 2: predictor


def knn_merge(
    best_sim: np.ndarray, best_idx: np.ndarray, new_sim: np.ndarray, new_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Keep each row's k most similar neighbours among the old ones and a new batch.

    best_*: (n, k) current neighbours (sim -inf, idx -1 where empty); new_sim: (n, b)
    similarities to the batch's items new_idx ((b,), or (n, b) per row). Ties go to the smaller index, so the
    table does not depend on the order batches arrived in. Incremental, so the search pays
    O(N_k · scored_k · d) in all, not per round.
    """
    k = best_sim.shape[1]
    sim = np.concatenate([best_sim, new_sim], axis=1)
    idx = np.concatenate([best_idx, np.broadcast_to(new_idx, new_sim.shape)], axis=1).astype(np.int64)
    idx = np.where(np.isneginf(sim), -1, idx)  # a masked pair (oneself) is no neighbour, even in an empty slot
    # Sort by (-sim, idx): empty slots (idx -1) have sim -inf and so sort last anyway.
    order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -sim), axis=1)[:, :k]
    return np.take_along_axis(sim, order, axis=1), np.take_along_axis(idx, order, axis=1)


def chunk_topk(sim: np.ndarray, cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest similarities in a block whose columns ``cols`` ascend, ties to
    the smaller index: exactly the entries ``knn_merge`` would keep from it, found in O(b)
    per row (np.partition) instead of a sort, so merging a wide block stays cheap."""
    b = sim.shape[1]
    if b <= k:
        return sim, np.broadcast_to(cols, sim.shape)
    t = np.partition(sim, b - k, axis=1)[:, b - k : b - k + 1]  # the k-th largest per row
    gt = sim > t
    eq = sim == t
    room = k - gt.sum(axis=1, keepdims=True)  # ties to keep: the first ones, i.e. the smaller indices
    keep = gt | (eq & (np.cumsum(eq, axis=1) <= room))
    rows, pos = np.nonzero(keep)  # row-major: exactly k per row, in column order
    pos = pos.reshape(sim.shape[0], k)
    return np.take_along_axis(sim, pos, axis=1), cols[pos]


def knn_mean(best_idx: np.ndarray, jsd: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Mean JSD over each row's neighbours; ``fallback`` (per row) where a row has none."""
    valid = best_idx >= 0
    vals = np.where(valid, jsd[np.maximum(best_idx, 0)], 0.0)
    cnt = valid.sum(axis=1)
    return np.divide(vals.sum(axis=1), cnt, out=np.asarray(fallback, dtype=np.float64).copy(), where=cnt > 0)


def predictor_features(
    knn: np.ndarray, n_prompt: np.ndarray | None, n_response: np.ndarray | None, extra: np.ndarray | None = None
) -> np.ndarray:
    """[kNN mean, log(1+|y|), log(1+|x|), extra..., 1]: on the benchmark pool JSD correlates
    with both lengths (Spearman +0.13 and -0.28); ``extra`` are any other per-sample columns."""
    cols = [np.asarray(knn, dtype=np.float64)]
    if extra is not None:
        cols.extend(np.asarray(extra, dtype=np.float64).reshape(len(cols[0]), -1).T)
    if n_response is not None:
        cols.append(np.log1p(np.asarray(n_response, dtype=np.float64)))
    if n_prompt is not None:
        cols.append(np.log1p(np.asarray(n_prompt, dtype=np.float64)))
    cols.append(np.ones_like(cols[0]))
    return np.column_stack(cols)


def fit_linear(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (numpy's lstsq: a handful of features, no library needed)."""
    return np.linalg.lstsq(X, y, rcond=None)[0]


def jsd_thresholds(rank_fn: RankFn, idx: np.ndarray, tau: float, iters: int = 50) -> np.ndarray:
    """Per sample, the smallest JSD whose rank beats ``tau`` (+inf if not even ln 2 does).

    Bisection on [0, ln 2]: rank_fn is only required to be non-decreasing in JSD, so IES,
    plain JSD or any other per-sample monotone rule works, with no inverse to write.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if not math.isfinite(tau):  # no pick yet: anything beats it
        return np.full(idx.size, -math.inf)
    lo = np.zeros(idx.size)
    hi = np.full(idx.size, LN2)
    out = np.full(idx.size, math.inf)
    reach = rank_fn(hi, idx) > tau
    if not reach.any():
        return out
    at0 = rank_fn(lo, idx) > tau
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = rank_fn(mid, idx) > tau
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid)
    out[reach] = hi[reach]
    out[at0] = -math.inf
    return out


def residual_scale(residuals: np.ndarray, n_response: np.ndarray | None, at: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample residual scale σ from the response length: (σ at the residuals, σ at ``at``).

    A mean over fewer response tokens is noisier: on the benchmark pool the residual SD falls
    from 0.06 (under 30 tokens) to 0.03 (over 100). Fit log|e| = a + b·log(1+|y|) (least
    squares); without lengths, σ = 1. Only the shape matters: residuals are standardised by
    σ and their empirical distribution is used as is.
    """
    e = np.asarray(residuals, dtype=np.float64)
    if n_response is None or at is None or e.size < 3:
        return np.ones(e.size), np.ones(0 if at is None else len(at))
    Z = np.column_stack([np.ones(e.size), np.log1p(np.asarray(n_response, dtype=np.float64))])
    floor = 1e-6 + 1e-3 * float(np.abs(e).mean())
    coef = fit_linear(Z, np.log(np.abs(e) + floor))
    Za = np.column_stack([np.ones(len(at)), np.log1p(np.asarray(at, dtype=np.float64))])
    return np.exp(Z @ coef), np.exp(Za @ coef)


def exceed_probability(
    pred: np.ndarray, threshold: np.ndarray, residuals_sorted: np.ndarray, scale: np.ndarray | float = 1.0
) -> np.ndarray:
    """P(pred + scale·z > threshold), z from the sorted standardised residuals (empirical)."""
    r = np.asarray(residuals_sorted, dtype=np.float64)
    if r.size == 0:
        return np.where(np.isposinf(threshold), 0.0, 1.0)
    gap = (np.asarray(threshold, dtype=np.float64) - np.asarray(pred, dtype=np.float64)) / scale
    with np.errstate(invalid="ignore"):
        n_above = r.size - np.searchsorted(r, gap, side="right")
    p = n_above / r.size
    p = np.where(np.isposinf(threshold), 0.0, p)
    return np.where(np.isneginf(threshold), 1.0, p)


def top_value(values: np.ndarray, idx: np.ndarray, m: int) -> float:
    """The m-th largest value (ties to the smaller index, as select_with_budget takes them); -inf if fewer."""
    if m <= 0:
        return math.inf
    if values.size < m:
        return -math.inf
    order = np.lexsort((idx, -values))
    return float(values[order[m - 1]])


def top_value_cost(values: np.ndarray, idx: np.ndarray, costs: np.ndarray, quota: int) -> tuple[float, int]:
    """Under a cost (token) quota: the value of the record at which the ranked prefix's cost
    first reaches ``quota``, and the prefix's length (ties to the smaller index).

    select_with_budget fills a cost quota first fit in rank order, so every record ranked
    above this one is taken, and an unscored record ranked above it would enter the prefix
    and change the selection; records below it can only fill the gap the prefix leaves (less
    than this record's cost). Adding records only raises this value. (inf, 0) for a zero
    quota; (-inf, len) when the records' costs do not reach it.
    """
    if quota <= 0:
        return math.inf, 0
    order = np.lexsort((idx, -values))
    reach = np.flatnonzero(np.cumsum(np.asarray(costs, dtype=np.int64)[order]) >= quota)
    if reach.size == 0:
        return -math.inf, int(values.size)
    return float(values[order[reach[0]]]), int(reach[0]) + 1


# ----------------------------------------------------------------------------- cost before scoring

# The search's share of the unsampled records, measured by benchmarks/adaptive_sim.py on the
# archived Wanda-50 % scores of the 2,000-record pool (IES ranking, kNN + lengths + text
# statistics, NTM on, quotas estimated; benchmarks/results/adaptive_sim, means of 3 seeds): at
# confidence 0.5 / 0.8 / 0.9 / 0.95 / 0.99 and a 10 % budget it scored 30 / 44 / 53 / 64 / 78 %
# of the records outside the CDS sample, and at 0.8 and 0.9 the share grew about as the
# square root of the budget fraction (5 %, 10 %, 20 %). Least squares over those 9 points:
# share = (SEARCH_A + SEARCH_B · ln(1 / (1 - confidence))) · sqrt(b), within 0.045 of each.
# One model, one pool: an expectation, not a bound.
SEARCH_A, SEARCH_B = 0.73, 0.39
# JSD's coefficient of variation on that pool (sd / mean over 2,000 records), the prior for
# the CDS sample sizes where the estimate has too few scored records of its own.
DEFAULT_JSD_CV = 0.28


@dataclass
class AdaptivePlan:
    """What adaptive scoring will score, predicted before anything is scored.

    Stage 1 (the CDS sample) is planned exactly as ``adaptive_degradation`` plans it: the
    pilot, then Cochran's rule with the finite-population correction, from a coefficient of
    variation of JSD (``cv``; the run uses each cluster's pilot, the plan one value for all),
    over K clusters of equal size (the real clusters are not known before embedding).
    Stage 2 (the search) stops when the data says so: ``expected_*`` uses the share measured
    on the benchmark pool (SEARCH_A, SEARCH_B), and the upper bound is the whole pool (a
    predictor that ranks no better than chance searches every record; the ln 2 bound that
    skips some depends on the scores).
    """

    pool_size: int
    k: int
    confidence: float
    budget_fraction: float
    cv: float
    sample_records: int
    expected_records: int
    upper_bound_records: int

    @property
    def expected_fraction(self) -> float:
        return self.expected_records / self.pool_size if self.pool_size else 0.0

    @property
    def sample_fraction(self) -> float:
        return self.sample_records / self.pool_size if self.pool_size else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "expected_fraction": self.expected_fraction, "sample_fraction": self.sample_fraction,
                "upper_bound_fraction": 1.0 if self.pool_size else 0.0}


def search_share(confidence: float, budget_fraction: float) -> float:
    """Expected share of the records outside the CDS sample that the search scores (see SEARCH_A)."""
    if confidence >= 1.0:
        return 1.0
    b = min(max(float(budget_fraction), 0.0), 1.0)
    return float(min(1.0, (SEARCH_A + SEARCH_B * math.log(1.0 / (1.0 - confidence))) * math.sqrt(b)))


def plan_adaptive(pool_size: int, k: int, budget_fraction: float, confidence: float = 0.9, cds_rel_error: float = CDS_REL_ERROR,
                  pilot: int = PILOT, cv: float = DEFAULT_JSD_CV) -> AdaptivePlan:
    """The expected and the largest number of records ``adaptive_degradation`` scores (see AdaptivePlan)."""
    n, k = int(pool_size), max(1, int(k))
    if confidence >= 1.0:
        return AdaptivePlan(n, k, float(confidence), float(budget_fraction), float(cv), n, n, n)
    sizes = [n // k + (1 if c < n % k else 0) for c in range(k)]
    sample = 0
    for size in sizes:
        m = min(size, pilot)
        sample += max(m, required_sample_size(float(cv), 1.0, size, cds_rel_error, confidence, m - 1)) if size else 0
    expected = sample + int(round(search_share(confidence, budget_fraction) * (n - sample)))
    return AdaptivePlan(n, k, float(confidence), float(budget_fraction), float(cv), sample, min(n, expected), n)


# ----------------------------------------------------------------------------- result


@dataclass
class AdaptiveResult:
    """What adaptive scoring found. Per-sample arrays have the pool's length; per-cluster, K.

    jsd: the scores, NaN where unscored. scored: the mask. sampled: the stratified sample.
    cds, cds_half_width: CDS_k from the sample and its CI half-width at ``confidence``
    (0 where the whole cluster was sampled). n_k: the quotas n_k_fn gave. depth: how many
    of each cluster's best the search certified (n_k + extra, capped by the cluster size).
    expected_misses: at the stop, the expected number of unscored samples that beat the
    depth-th pick (the stopping statistic). rank_correlation: Spearman of the predictor's
    leave-one-out predictions against the true JSD on the stratified sample (held back in
    the sense that each prediction never saw its own score).
    """

    jsd: np.ndarray
    scored: np.ndarray
    sampled: np.ndarray
    cluster_sizes: np.ndarray
    sample_sizes: np.ndarray
    cds: np.ndarray
    cds_half_width: np.ndarray
    n_k: np.ndarray
    depth: np.ndarray
    expected_misses: np.ndarray
    confidence: float
    cds_rel_error: float
    rank_correlation: float
    rounds: int
    tokens_scored: int | None = None
    tokens_total: int | None = None
    settings: dict = field(default_factory=dict)
    unit_sizes: np.ndarray | None = None  # cluster sizes in the budget's unit (tokens under a cost); None: records
    predicted: np.ndarray | None = None  # the predictor's last JSD predictions (None when it never ran)

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def priority(self, rank_fn: RankFn) -> np.ndarray:
        """The ranking in force on scored samples, -inf on the rest (select_with_budget's order)."""
        idx = np.flatnonzero(self.scored)
        out = np.full(self.jsd.size, -math.inf)
        out[idx] = rank_fn(self.jsd[idx], idx)
        return out

    def selection_priority(self, rank_fn: RankFn) -> np.ndarray:
        """The order selection walks: scored samples by the ranking in force, then the
        unscored ones below all of them, by the ranking of their predicted JSD (ties to the
        smaller index). Equal to ``priority`` when everything is scored. Selection reaches
        an unscored sample only where the certified depth runs out, e.g. the gap a token
        quota leaves after its certified prefix (first fit): there the predictor's best
        guess beats the index order."""
        out = self.priority(rank_fn)
        un = np.flatnonzero(~self.scored)
        if un.size == 0 or self.predicted is None or not np.isfinite(out).any():
            return out
        guess = rank_fn(np.clip(np.nan_to_num(self.predicted[un]), 0.0, LN2), un)
        lo = float(out[np.isfinite(out)].min())
        out[un] = lo - 1.0 - (float(guess.max()) - guess)  # order kept, every one below every scored sample
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary for report.json (per-cluster lists; per-sample scores go in the
        table). Strict JSON: a value that is not finite (no correlation yet, an interval from
        one sample) is null."""
        n = int(self.jsd.size)

        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        d = {
            "scoring": "adaptive",
            "confidence": self.confidence,
            "cds_rel_error": self.cds_rel_error,
            "samples_scored": self.n_scored,
            "fraction_scored": self.n_scored / n if n else 0.0,
            "rank_correlation": num(self.rank_correlation),
            "rounds": self.rounds,
            "clusters": {
                "sizes": self.cluster_sizes.tolist(),
                "sample_sizes": self.sample_sizes.tolist(),
                "cds": self.cds.tolist(),
                "cds_ci": [[num(c - h), num(c + h)] for c, h in zip(self.cds, self.cds_half_width)],
                "n_k": self.n_k.tolist(),
                "certified_depth": self.depth.tolist(),
                "scored": np.bincount(self.settings["labels_for_report"][self.scored], minlength=len(self.cds)).tolist()
                if "labels_for_report" in self.settings
                else None,
                "expected_misses": [float(x) for x in self.expected_misses],
            },
            "settings": {k: v for k, v in self.settings.items() if k != "labels_for_report"},
        }
        if self.tokens_scored is not None:
            d["tokens_scored"] = int(self.tokens_scored)
            d["tokens_total"] = int(self.tokens_total)
            d["fraction_tokens_scored"] = self.tokens_scored / self.tokens_total if self.tokens_total else 0.0
        return d


# ----------------------------------------------------------------------------- driver


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b)[0])


def adaptive_degradation(
    score_fn: ScoreFn,
    labels: np.ndarray,
    n_k_fn: Callable[[np.ndarray], np.ndarray],
    features: np.ndarray,
    *,
    rank_fn: RankFn = jsd_rank,
    n_prompt: np.ndarray | None = None,
    n_response: np.ndarray | None = None,
    confidence: float = 0.9,
    cds_rel_error: float = CDS_REL_ERROR,
    seed: int = 0,
    pilot: int = PILOT,
    n_neighbors: int = 10,
    batch_fraction: float = 0.5,
    min_batch: int = 4,
    extra: int | np.ndarray = 0,
    extra_features: np.ndarray | None = None,
    heteroscedastic: bool = True,
    neighbours: str = "cluster",
    cost: np.ndarray | None = None,
) -> AdaptiveResult:
    """Score just enough of the pool to give PASER's CDS, n_k and per-cluster top n_k.

    score_fn(indices) -> JSD of those pool indices (a closure over the scoring engine; it
    is called with ascending index arrays, never twice with the same index). labels: cluster
    of each sample, 0..K-1. n_k_fn(cds) -> quotas (the allocation in force, e.g.
    ``lambda c: allocate_budget(c, sizes, budget)``). features: (N, d) L2-normalised
    embeddings (the S2RIC ones). rank_fn(jsd, idx): the within-cluster ranking, non-decreasing
    in JSD (``ies_rank(n_prompt, n_response)`` for PASER, ``jsd_rank`` for plain JSD).
    n_prompt, n_response: token counts of every sample (cheap: tokenising only), used as
    predictor features and to count the tokens scored. confidence: of the CDS intervals and
    of the stopping rule (expected recall of each cluster's true top ``depth``); 1 scores
    everything, in one call. extra: certify this many more than n_k per cluster (NTM
    rejections consume candidates beyond n_k; see ``depth_shortfall``). extra_features:
    (N, f) more cheap per-sample predictor columns. heteroscedastic: scale the residuals by
    the response length (see ``residual_scale``). neighbours: "cluster" (the k nearest scored
    samples within the sample's cluster) or "global" (anywhere in the pool). On the benchmark
    pool global ranked a little better from a random 20 % (within-cluster Spearman 0.29
    against 0.25) but scored the same share end to end (41 % against 43 % of the tokens at
    confidence 0.8, 52 % against 51 % at 0.9), and it costs about K times more (50K synthetic
    pool, K = 16: 92 s against 6 s), so the default is within the cluster.
    cost: each sample's cost of a token budget (response tokens, as select_with_budget takes
    it); then n_k and ``extra`` are in tokens, and each cluster certifies the prefix of its
    ranking whose cost reaches n_k + extra (``top_value_cost``), the records first-fit
    filling takes whatever else happens; the stopping rule counts that prefix's records.
    """
    if neighbours not in ("global", "cluster"):
        raise ValueError(f"neighbours must be 'global' or 'cluster', got {neighbours!r}")
    labels = np.asarray(labels)
    n = labels.size
    if labels.ndim != 1 or (n and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError("labels must be a 1-D integer array")
    if n and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    X = np.asarray(features, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"features must be (N, d) with N = {n}, got {X.shape}")
    if not 0.0 < confidence <= 1.0:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    if not cds_rel_error > 0:
        raise ValueError("cds_rel_error must be positive")
    k = int(labels.max()) + 1 if n else 0
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    costs = None
    if cost is not None:
        costs = np.asarray(cost, dtype=np.int64)
        if costs.shape != (n,) or (n and costs.min() < 1):
            raise ValueError(f"cost must hold one positive integer per sample ({n})")
    unit_sizes = sizes if costs is None else np.bincount(labels, weights=costs, minlength=k).astype(np.int64)
    lengths = None
    if n_prompt is not None and n_response is not None:
        lengths = np.asarray(n_prompt, dtype=np.int64) + np.asarray(n_response, dtype=np.int64)

    jsd = np.full(n, math.nan)
    scored = np.zeros(n, dtype=bool)
    rounds = 0

    def score(idx: np.ndarray) -> np.ndarray:
        nonlocal rounds
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        idx = idx[~scored[idx]]
        if idx.size:
            vals = np.asarray(score_fn(idx), dtype=np.float64)
            if vals.shape != idx.shape or not np.all(np.isfinite(vals)):
                raise ValueError("score_fn must return one finite JSD per index")
            jsd[idx] = vals
            scored[idx] = True
            rounds += 1
        return idx

    settings = dict(seed=seed, pilot=pilot, n_neighbors=n_neighbors, batch_fraction=batch_fraction, min_batch=min_batch,
                    heteroscedastic=heteroscedastic, neighbours=neighbours, extra_features=0 if extra_features is None else int(np.asarray(extra_features).reshape(n, -1).shape[1]),
                    budget_unit="records" if costs is None else "tokens", labels_for_report=labels)
    orders = sample_orders(labels, k, seed)

    # --- stage 1: the stratified sample and CDS ------------------------------------------
    if confidence >= 1.0:
        score(np.arange(n))  # the limit: exhaustive, in one call so the engine batches as exhaustive does
        m_k = sizes.copy()
    else:
        m_k = np.minimum(sizes, pilot)
        score(np.concatenate([orders[c][: m_k[c]] for c in range(k)]) if k else np.zeros(0, np.int64))
        need = m_k.copy()
        for c in range(k):
            v = jsd[orders[c][: m_k[c]]]
            need[c] = max(m_k[c], required_sample_size(float(v.std(ddof=1)) if v.size > 1 else 0.0, float(v.mean()) if v.size else 0.0,
                                                         int(sizes[c]), cds_rel_error, confidence, int(m_k[c]) - 1))
        if (need > m_k).any():
            score(np.concatenate([orders[c][m_k[c]: need[c]] for c in range(k)]))
        m_k = need
    sampled = np.zeros(n, dtype=bool)
    for c in range(k):
        sampled[orders[c][: m_k[c]]] = True
    from paser.select.efficiency import cluster_degradation

    s_idx = np.flatnonzero(sampled)  # ascending: the full-sample case sums exactly as exhaustive does
    cds = cluster_degradation(jsd[s_idx], labels[s_idx], k)
    half = np.array([mean_interval(jsd[orders[c][: m_k[c]]], int(sizes[c]), confidence)[1] for c in range(k)])
    n_k = np.asarray(n_k_fn(cds), dtype=np.int64)
    if n_k.shape != (k,):
        raise ValueError(f"n_k_fn must return one quota per cluster ({k})")
    depth = np.minimum(unit_sizes, n_k + np.asarray(extra, dtype=np.int64))

    def pick(c: int, sc: np.ndarray) -> tuple[float, int]:
        """(the value an unscored sample must beat, the certified records) of cluster c."""
        vals = rank_fn(jsd[sc], sc)
        if costs is None:
            return top_value(vals, sc, int(depth[c])), int(depth[c])
        return top_value_cost(vals, sc, costs[sc], int(depth[c]))

    # --- stage 2: the search ---------------------------------------------------------------
    members = [np.flatnonzero(labels == c) for c in range(k)]
    best_sim = np.full((n, n_neighbors), -np.inf, dtype=np.float32)
    best_idx = np.full((n, n_neighbors), -1, dtype=np.int64)

    everyone = np.arange(n)

    def add_neighbours(new: np.ndarray) -> None:
        if neighbours == "cluster":
            groups = [(members[c], new[labels[new] == c]) for c in np.unique(labels[new])]
        else:
            groups = [(everyone, new)]
        for rows, cols in groups:
            # In blocks, so memory stays O(block²) whatever the pool and the batch.
            for r0 in range(0, rows.size, 8192):
                r = rows[r0 : r0 + 8192]
                for c0 in range(0, cols.size, 1024):
                    nc = cols[c0 : c0 + 1024]
                    sim = X[r] @ X[nc].T
                    sim[r[:, None] == nc[None, :]] = -np.inf  # never one's own neighbour: predictions stay leave-one-out
                    top_sim, top_idx = chunk_topk(sim, nc, n_neighbors)
                    best_sim[r], best_idx[r] = knn_merge(best_sim[r], best_idx[r], top_sim, top_idx)

    if not scored.all():  # nothing to search when everything is scored (confidence 1)
        add_neighbours(np.flatnonzero(scored))
    cluster_mean = cds  # fallback prediction where a sample has no scored neighbour
    expected = np.zeros(k)
    done = np.array([scored[members[c]].all() or depth[c] == 0 for c in range(k)], dtype=bool)
    rho = math.nan
    pred = None
    while not done.all():
        fb = cluster_mean[labels]
        feats = predictor_features(knn_mean(best_idx, np.nan_to_num(jsd), fb), n_prompt, n_response, extra_features)
        coef = fit_linear(feats[s_idx], jsd[s_idx])
        pred = feats @ coef
        # Residuals on the points the coefficients were fitted to are too small by about
        # sqrt((m - p) / m) (p coefficients); undo that so the bound is not optimistic.
        e = (jsd[s_idx] - pred[s_idx]) * math.sqrt(s_idx.size / max(s_idx.size - feats.shape[1], 1))
        if heteroscedastic and n_response is not None:
            s_scale, scale = residual_scale(e, np.asarray(n_response)[s_idx], np.asarray(n_response))
        else:
            s_scale, scale = np.ones(e.size), np.ones(n)
        resid = np.sort(e / s_scale)
        rho = _spearman(pred[s_idx], jsd[s_idx])
        batch = []
        for c in range(k):
            if done[c]:
                continue
            mem = members[c]
            sc, un = mem[scored[mem]], mem[~scored[mem]]
            tau, d_c = pick(c, sc)
            if costs is not None and not math.isfinite(tau):  # prefix not reached yet: its records, estimated
                d_c = int(math.ceil(depth[c] / max(float(costs[mem].mean()), 1.0)))
            thr = jsd_thresholds(rank_fn, un, tau)
            p = exceed_probability(pred[un], thr, resid, scale[un])
            expected[c] = float(p.sum())
            if expected[c] <= (1.0 - confidence) * d_c or un.size == 0:
                done[c] = True
                continue
            b = max(min_batch, int(math.ceil(batch_fraction * d_c)))
            # Most likely to beat the pick first; then the higher predicted rank; then the index.
            order = np.lexsort((un, -rank_fn(np.clip(pred[un], 0.0, LN2), un), -p))
            batch.append(un[order[: min(b, int((p > 0).sum()))]])
        if not batch:
            break
        new = score(np.concatenate(batch))
        add_neighbours(new)

    tokens = None if lengths is None else int(lengths[scored].sum())
    return AdaptiveResult(
        jsd=jsd,
        scored=scored,
        sampled=sampled,
        cluster_sizes=sizes,
        sample_sizes=m_k.astype(np.int64),
        cds=cds,
        cds_half_width=half,
        n_k=n_k,
        depth=depth.astype(np.int64),
        expected_misses=expected,
        confidence=float(confidence),
        cds_rel_error=float(cds_rel_error),
        rank_correlation=rho,
        rounds=rounds,
        tokens_scored=tokens,
        tokens_total=None if lengths is None else int(lengths.sum()),
        settings=settings,
        unit_sizes=unit_sizes,
        predicted=pred,
    )


def depth_shortfall(consumed: np.ndarray, result: AdaptiveResult) -> np.ndarray:
    """Per cluster, how much selection consumed beyond the certified depth, in the budget's unit.

    consumed: what select_with_budget went through per cluster, gate-rejected included:
    ``n_selected + n_rejected`` of its outcome for a record budget, those records' tokens
    for a token budget (``consumed_units``). All zero: the selection equals the exhaustive
    one at the stated confidence. Otherwise re-run with ``extra`` raised by this (scores are cached).
    """
    sizes = result.unit_sizes if result.unit_sizes is not None else result.cluster_sizes
    room = sizes - result.depth
    return np.minimum(np.maximum(np.asarray(consumed, dtype=np.int64) - result.depth, 0), room)


def consumed_units(outcome, labels: np.ndarray, k: int, cost: np.ndarray | None = None) -> np.ndarray:
    """Per cluster, the candidates selection took or the gate rejected, in the budget's unit
    (records, or their cost): what a cluster's certified depth had to cover."""
    if cost is None:
        return np.asarray(outcome.n_selected + outcome.n_rejected, dtype=np.int64)
    from paser.select.budget import NTM_CONFLICT, NTM_OVERRIDE, SELECTED

    d = np.asarray(outcome.decisions)
    went = (d == SELECTED) | (d == NTM_CONFLICT) | (d == NTM_OVERRIDE)
    return np.bincount(np.asarray(labels)[went], weights=np.asarray(cost, dtype=np.int64)[went], minlength=k).astype(np.int64)


def text_statistics(instructions: Sequence[str], outputs: Sequence[str]) -> np.ndarray:
    """Cheap per-sample predictor columns from the text alone (no model): for the response,
    then the instruction, the shares of digits, of punctuation, of newlines and of capitals,
    and the mean word length. On the benchmark pool they lift the within-cluster rank
    correlation of the predictor from 0.28 to 0.39 (benchmarks/adaptive_sim.py)."""

    def stats(s: str) -> list[float]:
        n = max(len(s), 1)
        return [
            sum(ch.isdigit() for ch in s) / n,
            sum(not ch.isalnum() and not ch.isspace() for ch in s) / n,
            s.count("\n") / n,
            sum(ch.isupper() for ch in s) / n,
            len(s) / max(len(s.split()), 1),
        ]

    if len(instructions) != len(outputs):
        raise ValueError("instructions and outputs must have the same length")
    rows = [stats(o) + stats(i) for i, o in zip(instructions, outputs)]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 10)


def adaptive_select(
    score_fn: ScoreFn,
    labels: np.ndarray,
    n_k_fn: Callable[[np.ndarray], np.ndarray],
    features: np.ndarray,
    *,
    rank_fn: RankFn = jsd_rank,
    make_gate: Callable[[], Callable[[int], bool]] | None = None,
    max_passes: int = 8,
    fill_weights: Callable[[np.ndarray], np.ndarray] | None = None,
    cost: np.ndarray | None = None,
    **kw,
):
    """Adaptive scoring plus ``select_with_budget``, with the NTM gate in the loop.

    The gate rejects candidates, so a cluster may need more than its n_k best: each pass
    certifies ``n_k + extra`` per cluster, selects, and if selection went past the certified
    depth anywhere (``depth_shortfall``), raises ``extra`` there and runs again. Scores are
    memoised across passes, so a pass only scores what is new; every pass is deterministic,
    so a resumed run asks the engine for the same lists. make_gate() must return a fresh
    gate (NTMGate is stateful). fill_weights(cds) -> the weights select_with_budget fills
    clusters and passes shortfalls on by: the allocation rule's weights, as exhaustive
    scoring passes them (default: CDS itself, the `cds` rule). cost: each sample's cost of a
    token budget (then n_k_fn's quotas are tokens), as select_with_budget takes it. Returns
    (AdaptiveResult, SelectionOutcome); the result's settings say how many passes ran and
    whether the last one was certified.
    """
    from paser.select.budget import select_with_budget

    labels = np.asarray(labels)
    memo: dict[int, float] = {}

    def memo_fn(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        new = np.array([i for i in idx.tolist() if i not in memo], dtype=np.int64)
        if new.size:
            memo.update(zip(new.tolist(), np.asarray(score_fn(new), dtype=np.float64).tolist()))
        return np.array([memo[i] for i in idx.tolist()], dtype=np.float64)

    k = int(labels.max()) + 1 if labels.size else 0
    extra = np.asarray(kw.pop("extra", 0), dtype=np.int64) + np.zeros(k, dtype=np.int64)
    for p in range(1, max_passes + 1):
        res = adaptive_degradation(memo_fn, labels, n_k_fn, features, rank_fn=rank_fn, extra=extra, cost=cost, **kw)
        prio = res.selection_priority(rank_fn)
        weights = res.cds if fill_weights is None else np.asarray(fill_weights(res.cds), dtype=np.float64)
        out = select_with_budget(labels, prio, res.n_k, make_gate() if make_gate else None, cds=weights, priority=prio, cost=cost)
        short = depth_shortfall(consumed_units(out, labels, k, cost), res)
        if not short.any():
            break
        extra = extra + short
    res.settings.update(passes=p, certified=not short.any(), extra=extra.tolist())
    return res, out
