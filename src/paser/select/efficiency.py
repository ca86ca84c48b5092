"""CDAIS scores: capability degradation per cluster and individual efficiency per sample.

* ``CDS_k`` = mean JSD over cluster k: how much the pruned model lost on that capability.
* ``IES_i = JSD_i / log(C_i)``, ``C_i = (|x_i| + |y_i|)^2`` (paper Eq. 7): the loss a sample
  reveals per unit of training cost, attention's cost growing with the square of the length.
  Both lengths are counted in tokens of the same tokenizer (the reference code added a token
  count to a character count, which makes the cost depend on the script and the tokenizer).
"""

from __future__ import annotations

import math

import numpy as np

from paser.select.registry import RANKINGS, register_rule

# log(C) must stay away from 0: C = 1 (a one-token sample) would divide by log 1 = 0, and a
# C just above 1 would blow the score of a near-empty sample up far above every real sample.
# With C >= e^2 the divisor is at least 2, so IES <= JSD / 2 <= ln 2 / 2. The floor only
# touches samples of at most 2 tokens in total ((2+0)^2 = 4 < e^2 ~ 7.39 < 9 = 3^2), which
# carry no training signal anyway, and it keeps IES monotone in JSD for everything else.
DEFAULT_MIN_COST = math.e**2


def individual_efficiency(
    jsd: np.ndarray,
    n_prompt_tokens: np.ndarray,
    n_response_tokens: np.ndarray,
    min_cost: float = DEFAULT_MIN_COST,
) -> np.ndarray:
    """``IES_i = JSD_i / log(max(C_i, min_cost))`` with ``C_i = (n_prompt_i + n_response_i)^2``.

    Token counts are those the scoring pass saw (prompt = template + instruction + input,
    response = output tokens), i.e. after the cutoff, so cost matches what training will pay.
    """
    jsd = np.asarray(jsd, dtype=np.float64)
    n_x = np.asarray(n_prompt_tokens, dtype=np.float64)
    n_y = np.asarray(n_response_tokens, dtype=np.float64)
    if not (jsd.shape == n_x.shape == n_y.shape):
        raise ValueError(f"jsd, prompt and response lengths must have the same shape: {jsd.shape}, {n_x.shape}, {n_y.shape}")
    if not np.all(np.isfinite(jsd)):
        raise ValueError("jsd contains NaN or infinite values")
    if np.any(n_x < 0) or np.any(n_y < 0):
        raise ValueError("token counts must be non-negative")
    if not min_cost > 1.0:
        raise ValueError(f"min_cost must be above 1 so that log(C) > 0, got {min_cost}")
    cost = (n_x + n_y) ** 2
    return jsd / np.log(np.maximum(cost, min_cost))


def cluster_degradation(jsd: np.ndarray, labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """``CDS_k`` = mean JSD of the samples in cluster k (0 for an empty cluster).

    An empty cluster has nothing to select, so 0 gives it no budget instead of a NaN that
    would poison the proportional allocation.
    """
    jsd = np.asarray(jsd, dtype=np.float64)
    labels = np.asarray(labels)
    if jsd.shape != labels.shape or jsd.ndim != 1:
        raise ValueError("jsd and labels must be 1-D arrays of the same length")
    if not np.all(np.isfinite(jsd)):
        raise ValueError("jsd contains NaN or infinite values")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError("labels must be non-negative integers")
    if k is None:
        k = int(labels.max()) + 1 if labels.size else 0
    if labels.size and labels.max() >= k:
        raise ValueError(f"label {int(labels.max())} is out of range for k={k}")
    sums = np.bincount(labels, weights=jsd, minlength=k)
    counts = np.bincount(labels, minlength=k)
    return np.divide(sums, counts, out=np.zeros(k, dtype=np.float64), where=counts > 0)


# ----------------------------------------------------------------------------- rankings
# The order in which a cluster's candidates are taken. Each takes (jsd, n_prompt, n_response)
# and returns a priority (higher first). Under a token budget the budget itself charges each
# record its response tokens, so the cost-aware choice there is `jsd` (degradation revealed
# per token charged); `ies` divides by a cost a second time.


@register_rule(RANKINGS, "ies", "the paper's Eq. 7, JSD_i / log((|x|+|y|)^2): prefers short records")
def rank_ies(jsd: np.ndarray, n_prompt: np.ndarray, n_response: np.ndarray) -> np.ndarray:
    return individual_efficiency(jsd, n_prompt, n_response)


@register_rule(RANKINGS, "jsd", "token-mean JSD, no cost term: length-neutral (under a token budget, the degradation per token the budget charges)")
def rank_jsd(jsd: np.ndarray, n_prompt: np.ndarray, n_response: np.ndarray) -> np.ndarray:
    return np.asarray(jsd, dtype=np.float64)


@register_rule(RANKINGS, "jsd-sum", "JSD summed over the response tokens, the reference code's direction: prefers long records")
def rank_jsd_sum(jsd: np.ndarray, n_prompt: np.ndarray, n_response: np.ndarray) -> np.ndarray:
    return np.asarray(jsd, dtype=np.float64) * np.asarray(n_response, dtype=np.float64)
