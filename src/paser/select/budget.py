"""CDAIS budget: how many samples each capability cluster gets, and the selection loop.

Paper Eq. 6 spends the budget B in proportion to each cluster's capability degradation
score, ``n_k = B * CDS_k / sum_j CDS_j`` (proportional, not a softmax). The paper leaves
three things open that decide whether exactly B samples come out, and the reference code
got all three wrong (``int()`` truncation, no caps, no redistribution):

* rounding: we use the largest-remainder method, so ``sum n_k == B`` exactly;
* caps: a cluster never gets more than it holds; what it cannot take is passed on to the
  clusters that still have room, again in proportion to CDS ("water filling");
* rejections: when the NTM gate rejects so many candidates of a cluster that it cannot fill
  its quota, the shortfall is passed on the same way (:func:`select_with_budget`).

Everything here is pure numpy and deterministic: ties are broken by larger CDS, then by
smaller cluster index (or smaller sample index).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from paser.errors import PaserError
from paser.select.registry import ALLOCATION_RULES, register_rule

# Per-sample decision codes written by select_with_budget.
SELECTED = "selected"
OVER_BUDGET = "over_budget"
NTM_CONFLICT = "ntm_conflict"
NTM_OVERRIDE = "ntm_override"  # selected although NTM rejected it: B could not be reached otherwise
DECISIONS = (SELECTED, OVER_BUDGET, NTM_CONFLICT, NTM_OVERRIDE)


class BudgetError(PaserError, ValueError):
    """A budget the user gave cannot be used (wrong type, zero, negative, 1.5, ...)."""


# ----------------------------------------------------------------------------- budget


RECORDS = "records"
TOKENS = "tokens"
_TOKEN_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*tok(?:en)?s?\s*$")


@dataclass(frozen=True)
class Budget:
    """What a user's budget argument means: ``amount`` of ``unit`` (records or tokens).

    A token budget counts the response tokens recovery trains on in one pass over the data
    (the tokens that carry loss: same template, cutoff and response mask as ``paser recover``).
    Users pay for training tokens; a record budget rewards whoever picks short records.
    """

    unit: str
    raw: str

    @property
    def is_tokens(self) -> bool:
        return self.unit == TOKENS


def parse_budget(budget: float | int | str) -> Budget:
    """Classify a budget argument; token budgets are "32000tok", "32k tokens", "1.5Mtok".

    Record budgets are validated by :func:`resolve_budget`; token budgets here (a whole
    number of tokens, at least one).
    """
    if isinstance(budget, str):
        m = _TOKEN_BUDGET.match(budget.replace("_", "").replace(",", ""))
        if m is not None:
            value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
            if value < 1 or not float(value).is_integer():
                raise BudgetError(f"a token budget must be a whole number of tokens >= 1, got {budget!r}")
            return Budget(TOKENS, budget)
        if "tok" in budget.lower():
            raise BudgetError(f"budget {budget!r}: write a token budget as a whole number followed by 'tok', e.g. 32000tok or 32ktok")
    return Budget(RECORDS, str(budget))


def token_budget_amount(budget: str) -> int:
    """The number of tokens of a token budget string (see :func:`parse_budget`)."""
    m = _TOKEN_BUDGET.match(str(budget).replace("_", "").replace(",", ""))
    if m is None:
        raise BudgetError(f"{budget!r} is not a token budget (e.g. 32000tok)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()])


def resolve_budget(budget: float | int | str, pool_size: int, pool_tokens: int | None = None) -> int:
    """B in the budget's unit: records for a record budget, tokens for a token budget.

    A token budget ("32000tok") resolves to ``min(tokens, pool_tokens)`` (or the tokens
    themselves when ``pool_tokens`` is not known, e.g. to validate a configuration).
    For record budgets:

    The number of samples B to select from a pool of ``pool_size``.

    ``budget`` is a fraction of the pool in (0, 1] (``0.1``, ``"0.1"``, ``"10%"``) or a count
    (``5000``, ``"5000"``, ``5000.0``). An int is always a count, so ``1`` means one sample
    and ``1.0`` the whole pool. A fraction is rounded to the nearest count, at least 1 for a
    non-empty pool. Returns ``min(count, pool_size)``.
    """
    if isinstance(pool_size, bool) or not isinstance(pool_size, (int, np.integer)) or pool_size < 0:
        raise BudgetError(f"pool size must be a non-negative integer, got {pool_size!r}")
    pool_size = int(pool_size)
    if parse_budget(budget).is_tokens:
        tokens = token_budget_amount(budget)
        return tokens if pool_tokens is None else min(tokens, int(pool_tokens))
    raw = budget
    if isinstance(budget, bool) or budget is None:
        raise BudgetError(f"budget must be a fraction in (0, 1] or a positive count, got {raw!r}")
    if isinstance(budget, str):
        s = budget.strip().replace("_", "")
        try:
            if s.endswith("%"):
                value: float | int = float(s[:-1]) / 100.0
                if not 0.0 < value <= 1.0:
                    raise BudgetError(f"budget percentage must be in (0%, 100%], got {raw!r}")
            elif s.lstrip("+-").isdigit():
                value = int(s)
            else:
                value = float(s)
        except ValueError:
            raise BudgetError(f"budget {raw!r} is neither a fraction in (0, 1] nor a count") from None
    elif isinstance(budget, (int, np.integer)):
        value = int(budget)
    elif isinstance(budget, (float, np.floating)):
        value = float(budget)
    else:
        raise BudgetError(f"budget must be a number or a string, got {type(budget).__name__}")

    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"budget must be positive, got {raw!r}")
        if value <= 1.0:
            count = int(math.floor(value * pool_size + 0.5))
            if pool_size > 0:
                count = max(count, 1)
            return min(count, pool_size)
        if not value.is_integer():
            raise BudgetError(
                f"budget {raw!r} is above 1 but not a whole number: give a fraction in (0, 1] or a count"
            )
        value = int(value)
    if value <= 0:
        raise BudgetError(f"budget must be positive, got {raw!r}")
    return min(value, pool_size)


def _largest_remainder(quotas: np.ndarray, total: int, tiebreak: np.ndarray) -> np.ndarray:
    """Integer parts of ``quotas`` (which sum to ``total``) plus one for the largest remainders.

    Ties between equal remainders go to the larger ``tiebreak`` value, then the smaller index.
    Remainders are rounded to 9 decimals first so that float noise (3.3333 vs 3.33329999)
    cannot decide a tie.
    """
    base = np.floor(quotas + 1e-9).astype(np.int64)
    left = int(total - base.sum())
    if left <= 0:
        return base
    rem = np.round(quotas - base, 9)
    idx = np.arange(len(quotas))
    # lexsort: last key is primary.
    order = np.lexsort((idx, -tiebreak, -rem))
    base[order[:left]] += 1
    return base


def allocate_budget(cds: np.ndarray, sizes: np.ndarray, budget: int) -> np.ndarray:
    """Samples per cluster, ``n_k``: paper Eq. 6 with exact rounding and caps.

    ``n_k`` is proportional to ``cds[k]`` (rounded by largest remainder, so ``sum n_k ==
    min(budget, sum sizes)`` exactly) and never above ``sizes[k]``. A cluster whose share
    exceeds its size is capped, and the excess is spread over the clusters that still have
    room, again in proportion to CDS, until nothing is left over. If every cluster with room
    has CDS 0 (e.g. a pruned model identical to the original), the rest is spread in
    proportion to the room left, i.e. to cluster size. If the budget covers the pool, every
    cluster gets its size.
    """
    cds = np.asarray(cds, dtype=np.float64)
    sizes_arr = np.asarray(sizes)
    if cds.ndim != 1 or sizes_arr.shape != cds.shape:
        raise ValueError(f"cds and sizes must be 1-D and of the same length, got {cds.shape} and {sizes_arr.shape}")
    if not np.all(np.isfinite(cds)) or np.any(cds < 0):
        raise ValueError("cluster degradation scores must be finite and non-negative")
    if sizes_arr.size and (np.any(sizes_arr < 0) or not np.all(np.equal(np.mod(sizes_arr, 1), 0))):
        raise ValueError("cluster sizes must be non-negative integers")
    sizes_i = sizes_arr.astype(np.int64)
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    total = int(sizes_i.sum())
    remaining = min(int(budget), total)
    if remaining == total:
        return sizes_i.copy()

    alloc = np.zeros_like(sizes_i)
    while remaining > 0:
        room = sizes_i - alloc
        active = room > 0
        weights = np.where(active, cds, 0.0)
        if weights.sum() <= 0:
            # Nothing with room has lost anything: fall back to the room itself (cluster size).
            weights = room.astype(np.float64)
        share = remaining * weights / weights.sum()
        capped = active & (share >= room)
        if capped.any():
            # These clusters are filled to the brim; the rest is re-divided among the others.
            remaining -= int(room[capped].sum())
            alloc[capped] = sizes_i[capped]
            continue
        # No cap binds: share < room everywhere, so rounding up by one stays within room.
        alloc += _largest_remainder(share, remaining, cds)
        remaining = 0
    return alloc


# ----------------------------------------------------------------------------- allocation rules
# Each rule turns per-cluster degradation (CDS_k) and size (|C_k|, in the budget's unit:
# records, or response tokens under a token budget) into the weights that `allocate_budget`
# shares the budget by. One entry per rule; `--allocation` lists them.


@register_rule(ALLOCATION_RULES, "cds", "the paper's Eq. 6, n_k ∝ CDS_k: every cluster about the same share when damage is even, whatever its size")
def cds_weights(cds: np.ndarray, sizes: np.ndarray, tau: float = 1.0) -> np.ndarray:
    return np.asarray(cds, dtype=np.float64)


@register_rule(ALLOCATION_RULES, "mass", "n_k ∝ |C_k|·CDS_k^τ: a cluster's share grows with its size (τ = 0: stratified by size; τ = 1: its total degradation)")
def mass_weights(cds: np.ndarray, sizes: np.ndarray, tau: float = 1.0) -> np.ndarray:
    # Eq. 6 gives a 535-record math cluster group the same share as a 60-record one when their
    # CDS are close (the benchmark's 16 clusters had CDS 0.15-0.25), so large capabilities
    # were starved; weighting by size keeps random's coverage and tilts it by degradation.
    if tau < 0:
        raise BudgetError(f"tau must be >= 0, got {tau}")
    return np.asarray(sizes, dtype=np.float64) * np.power(np.asarray(cds, dtype=np.float64), tau)


@register_rule(ALLOCATION_RULES, "equal", "the same share for every cluster (the uniform baseline's rule; a control)")
def equal_weights(cds: np.ndarray, sizes: np.ndarray, tau: float = 1.0) -> np.ndarray:
    return np.ones(len(np.asarray(cds)), dtype=np.float64)


# ----------------------------------------------------------------------------- selection


@dataclass
class SelectionOutcome:
    """What :func:`select_with_budget` did.

    ``selected``: sample indices in the order they were taken (NTM overrides last).
    ``decisions``: one code per sample (see ``DECISIONS``): "selected", "ntm_conflict"
    (rejected by the gate and not needed), "ntm_override" (rejected by the gate but taken to
    reach B), "over_budget" (never reached: its cluster's quota was filled first).
    Per-cluster arrays (length K): ``quota_initial`` (the n_k given), ``quota_final`` (samples
    taken from the cluster in the end, after shortfalls moved, overrides included),
    ``n_selected`` (gate-accepted), ``n_rejected`` (gate rejections, overrides included),
    ``n_override``. ``cluster_order``: the order clusters were filled in.
    """

    selected: list[int]
    decisions: np.ndarray
    quota_initial: np.ndarray
    quota_final: np.ndarray
    n_selected: np.ndarray
    n_rejected: np.ndarray
    n_override: np.ndarray
    cluster_order: list[int] = field(default_factory=list)

    @property
    def n_ntm_override(self) -> int:
        return int(self.n_override.sum())

    def counts(self) -> dict[str, int]:
        """How many samples got each decision."""
        return {d: int(np.sum(self.decisions == d)) for d in DECISIONS}


def _candidate_lists(
    labels: np.ndarray, order: Mapping[int, Sequence[int]] | np.ndarray, k: int
) -> list[list[int]]:
    """Per-cluster candidate indices, best first."""
    n = len(labels)
    if isinstance(order, Mapping):
        lists = [list(map(int, order.get(c, ()))) for c in range(k)]
        for c, lst in enumerate(lists):
            for i in lst:
                if not 0 <= i < n or labels[i] != c:
                    raise ValueError(f"sample {i} is listed under cluster {c} but is not in it")
        return lists
    prio = np.asarray(order, dtype=np.float64)
    if prio.shape != (n,):
        raise ValueError(f"priority must have one value per sample ({n}), got shape {prio.shape}")
    if np.any(np.isnan(prio)):
        raise ValueError("priority contains NaN")
    # Decreasing priority; equal priority -> smaller index first (lexsort is stable on keys).
    ranked = np.lexsort((np.arange(n), -prio))
    lists = [[] for _ in range(k)]
    for i in ranked:
        lists[int(labels[i])].append(int(i))
    return lists


def select_with_budget(
    labels: np.ndarray,
    order: Mapping[int, Sequence[int]] | np.ndarray,
    n_k: np.ndarray,
    accept: Callable[[int], bool] | None = None,
    *,
    cds: np.ndarray | None = None,
    cluster_order: Sequence[int] | None = None,
    priority: np.ndarray | None = None,
    cost: np.ndarray | None = None,
) -> SelectionOutcome:
    """Fill every cluster's quota with its best candidates that the gate accepts.

    labels: cluster of each sample (ints in [0, K)). order: either a priority per sample
    (higher first, e.g. IES; ties to the smaller index) or a dict cluster -> indices, best
    first. n_k: the quota per cluster (from :func:`allocate_budget`), in the budget's unit.
    accept(i) is called exactly once per candidate considered, in order; True takes the
    sample, so a stateful gate (NTM) should record an accepted sample when it returns True.
    cds: weights to pass shortfalls on (default: n_k). cluster_order: the order clusters are
    filled in (default: decreasing CDS, ties to the smaller index). cost: what each sample
    costs of the budget (default 1 each: a record budget; response tokens for a token budget).

    The rule: clusters are filled in order; within a cluster, candidates are taken best first
    until its quota is accepted; a rejected candidate does not count. A cluster that runs out
    of candidates passes its shortfall on: the shortfall is re-allocated (same proportional
    rule, capped by remaining candidates) among the clusters that still have candidates, and
    filling continues. So exactly ``min(sum n_k, N)`` samples come out for a record budget.

    With costs (a token budget) a candidate that does not fit its cluster's remaining quota
    is passed over (first fit in rank order), and once every cluster is done what is left of
    the whole budget is filled with the passed-over candidates, best first, that still fit.
    So the selection never exceeds ``sum n_k`` and falls short of it only by less than the
    cost of any candidate left out (none of them fits).

    Decision (documented, not in the paper): if the gate rejects so many that the budget still
    cannot be reached when every candidate has been tried, the rest is filled with the
    rejected samples of highest ``priority`` (default: the order they were rejected in),
    marked "ntm_override". We chose this over returning fewer than B because the budget is a
    promise the user planned training around, and the NTM rule is a heuristic (§3): its
    rejections are not known bad data. The override count is reported so a user can see it.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1 or (n and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError("labels must be a 1-D integer array")
    quota = np.asarray(n_k, dtype=np.int64).copy()
    k = len(quota)
    if np.any(quota < 0):
        raise ValueError("quotas must be non-negative")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}) to match the {k} quotas")
    weights = np.asarray(cds if cds is not None else quota, dtype=np.float64)
    if weights.shape != (k,):
        raise ValueError(f"cds must have one value per cluster ({k})")
    costs = np.ones(n, dtype=np.int64) if cost is None else np.asarray(cost, dtype=np.int64)
    if costs.shape != (n,) or (n and costs.min() < 1):
        raise ValueError(f"cost must hold one positive integer per sample ({n})")
    if cluster_order is None:
        cluster_order = [int(c) for c in np.lexsort((np.arange(k), -weights))]
    else:
        cluster_order = [int(c) for c in cluster_order]
        if sorted(cluster_order) != list(range(k)):
            raise ValueError("cluster_order must be a permutation of the cluster indices")

    cands = _candidate_lists(labels, order, k)
    target = min(int(quota.sum()), int(costs.sum()))
    quota_initial = quota.copy()
    ptr = np.zeros(k, dtype=np.int64)
    used = np.zeros(k, dtype=np.int64)  # budget spent per cluster (= samples taken, for unit costs)
    n_acc = np.zeros(k, dtype=np.int64)
    n_rej = np.zeros(k, dtype=np.int64)
    lengths = np.array([len(c) for c in cands], dtype=np.int64)
    # suffix sums of candidate costs: what each cluster could still spend from its pointer on
    left_cost = [np.concatenate([np.cumsum(costs[np.asarray(c, dtype=np.int64)][::-1])[::-1], [0]]) if c else np.zeros(1, np.int64)
                 for c in cands]
    decisions = np.full(n, OVER_BUDGET, dtype=object)
    selected: list[int] = []
    rejected: list[int] = []
    passed_over: list[int] = []  # did not fit its cluster's remaining quota (cost budgets only)

    def consider(i: int, c: int) -> None:
        if accept is None or accept(i):
            decisions[i] = SELECTED
            selected.append(i)
            n_acc[c] += 1
            used[c] += costs[i]
        else:
            decisions[i] = NTM_CONFLICT
            rejected.append(i)
            n_rej[c] += 1

    while True:
        for c in cluster_order:
            lst = cands[c]
            while used[c] < quota[c] and ptr[c] < lengths[c]:
                i = lst[ptr[c]]
                ptr[c] += 1
                if costs[i] > quota[c] - used[c]:
                    passed_over.append(i)
                    continue
                consider(i, c)
        shortfall = int((quota - used).sum())
        has_more = ptr < lengths
        if shortfall <= 0 or not has_more.any():
            break
        # Clusters that ran dry keep what they got; the others share the shortfall.
        quota = np.where(has_more, quota, used)
        could_spend = np.array([left_cost[c][ptr[c]] for c in range(k)], dtype=np.int64)
        room = np.where(has_more, could_spend - (quota - used), 0)
        extra = allocate_budget(np.where(has_more, weights, 0.0), np.maximum(room, 0), shortfall)
        if extra.sum() == 0:
            break
        quota = quota + extra

    spent = int(used.sum())
    if passed_over and spent < target:
        # What the clusters left of a cost budget: the passed-over candidates that still fit.
        if priority is not None or not isinstance(order, Mapping):
            pr = np.asarray(priority if priority is not None else order, dtype=np.float64)
            po = np.asarray(passed_over)
            passed_over = po[np.lexsort((po, -pr[po]))].tolist()
        for i in passed_over:
            if spent >= target:
                break
            if decisions[i] == OVER_BUDGET and costs[i] <= target - spent:
                consider(int(i), int(labels[i]))
                spent = int(used.sum())

    n_over = np.zeros(k, dtype=np.int64)
    if spent < target and rejected:
        if priority is not None:
            pr = np.asarray(priority, dtype=np.float64)
            rej = np.asarray(rejected)
            pick = rej[np.lexsort((rej, -pr[rej]))]
        else:
            pick = np.asarray(rejected)
        for i in pick:
            i = int(i)
            if spent >= target:
                break
            if costs[i] > target - spent:
                continue
            decisions[i] = NTM_OVERRIDE
            selected.append(i)
            n_over[labels[i]] += 1
            spent += int(costs[i])

    final = np.bincount(labels[np.asarray(selected, dtype=np.int64)], minlength=k) if selected else np.zeros(k, np.int64)
    return SelectionOutcome(
        selected=selected,
        decisions=decisions,
        quota_initial=quota_initial,
        quota_final=final.astype(np.int64),
        n_selected=n_acc,
        n_rejected=n_rej,
        n_override=n_over,
        cluster_order=list(cluster_order),
    )


def fill_in_order(order: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """First fit: walk ``order`` and take every sample whose cost still fits ``budget``.

    The selection of a cost budget for methods that rank the whole pool (random draws a
    permutation; IFD and the quality rules rank by score): never over the budget, and short
    of it by less than the cost of any sample left out. Returns the taken indices, sorted.
    """
    costs = np.asarray(cost, dtype=np.int64)
    left = int(budget)
    taken = []
    for i in np.asarray(order, dtype=np.int64):
        if left <= 0:
            break
        if costs[i] <= left:
            taken.append(int(i))
            left -= int(costs[i])
    return np.sort(np.array(taken, dtype=np.int64))
