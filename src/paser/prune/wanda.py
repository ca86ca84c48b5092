"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

Score of weight W_ij = |W_ij| * ||X_j||_2, where X_j is input feature j over all calibration
tokens; weights are compared only within their output row i. No weight update. Pure tensor
functions after vllm-project/llm-compressor's `wanda_sparsify.py`, which we follow but do not
depend on: llm-compressor 0.14 pins transformers <= 5.17 (we need 5.24) and weighs ~1.5 GB.
"""

from __future__ import annotations

import torch

from paser.prune.masks import mask_from_scores


def update_column_sq_norms(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add the squared L2 norm of every input feature of `x` [..., in] to `acc` [in] (float32).

    Summed, not averaged: the per-row ranking is invariant to a common scale, so the count of
    tokens does not matter.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()
    s = (x * x).sum(dim=0)
    return s if acc is None else acc + s


def wanda_scores(weight: torch.Tensor, col_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 for W [out, in] and the per-column squared norms [in]."""
    return weight.detach().float().abs() * col_sq_norms.float().sqrt().reshape(1, -1)


def wanda_mask(
    weight: torch.Tensor,
    col_sq_norms: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """True where Wanda zeroes W: the lowest scores of each output row (or of each N:M group)."""
    return mask_from_scores(wanda_scores(weight, col_sq_norms), sparsity, nm, per_row=True)
