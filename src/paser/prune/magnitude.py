"""Magnitude pruning: drop the weights of smallest |w| (the baseline that Wanda and SparseGPT beat).

It needs no calibration data. The threshold is per layer (one threshold over the whole weight
matrix), the standard magnitude baseline; the Wanda paper shows that per-output-row comparison
helps Wanda's score but per-layer is the usual setting for plain magnitude. Pass per_row=True to
compare within rows instead.
"""

from __future__ import annotations

import torch

from paser.prune.masks import mask_from_scores


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32."""
    return weight.detach().float().abs()


def magnitude_mask(
    weight: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """True where magnitude pruning zeroes W [out, in]; N:M groups run along the input dimension."""
    return mask_from_scores(magnitude_scores(weight), sparsity, nm, per_row=per_row)
