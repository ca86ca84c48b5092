"""The one right-padded collation: token sequences of different lengths into one [B, L] batch.

Scoring, held-out loss, zero-shot scoring, the cost estimate and recovery training all batch
right-padded sequences (L = the longest in the batch). With right padding and causal
attention no real position attends to a pad, so the scorers need no mask; the mask is
returned for callers that pass one (training, lm-eval-style zero-shot scoring).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] filled with `pad_id` after each sequence, attention mask [B, L] of 1/0).

    `pad_to_multiple_of` (e.g. 8 on a GPU) rounds L up for tensor-core friendly shapes."""
    longest = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask
