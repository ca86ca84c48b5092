"""Sparsity patterns shared by every unstructured method: which weights a score says to drop.

A mask here is a bool tensor shaped like the weight, True where the weight is pruned (set to
zero), as in Wanda's and SparseGPT's reference code. Every function is pure: scores in, mask out.

N:M follows the literature's definition (Zhou et al. 2021; the Wanda and SparseGPT papers):
at most N of every M consecutive weights along the input dimension are non-zero, so "2:4"
zeroes exactly 2 of every 4 and has sparsity 1 - N/M. (For 2:4 and 4:8 this coincides with the
reference code's `prune_n:prune_m`, which counts zeros; for 1:4 the two readings differ.)
"""

from __future__ import annotations

import math
import re

import torch

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4) (N kept of every M); None or "" or "unstructured" -> None."""
    if pattern is None or pattern.strip().lower() in ("", "unstructured", "none"):
        return None
    m = _PATTERN.match(pattern)
    if not m:
        raise ValueError(f"pattern {pattern!r} is not of the form N:M (e.g. 2:4)")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, mm


def pattern_sparsity(nm: tuple[int, int]) -> float:
    """The fraction of zeros an N:M pattern implies."""
    return 1.0 - nm[0] / nm[1]


def n_to_prune(count: int, sparsity: float) -> int:
    """How many of `count` weights a sparsity asks to zero (nearest integer, never all)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(count - 1, int(math.floor(count * sparsity + 0.5))) if count else 0


def lowest_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Mask the lowest-scoring `sparsity` share of the weights.

    per_row=True compares weights only within each output row (Wanda's choice: every output
    neuron keeps the same number of inputs); per_row=False ranks the whole matrix against one
    threshold (the usual choice for magnitude pruning). Exactly round(sparsity * count) weights
    are masked per row or per matrix: ties are broken by position, not all-or-nothing.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:
        k = n_to_prune(scores.shape[-1], sparsity)
        if k:
            idx = torch.topk(scores, k, dim=-1, largest=False).indices
            mask.scatter_(-1, idx, True)
        return mask
    k = n_to_prune(scores.numel(), sparsity)
    if k:
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = True
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every group of M consecutive input weights of a row, mask the M-N lowest."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern needs the input size ({cols}) to be a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool
) -> torch.Tensor:
    """Unstructured (`sparsity`, per row or per matrix) or N:M (`nm` wins over `sparsity`)."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return lowest_mask(scores, sparsity, per_row)


def zero_fraction(weight: torch.Tensor) -> float:
    """The share of exactly-zero entries."""
    return float((weight == 0).sum()) / max(1, weight.numel())
