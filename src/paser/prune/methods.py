"""The pruning methods, one entry each: what calibration statistic a method needs and the pure
function that turns a weight (and that statistic) into its pruned weight.

The driver (`paser.prune.driver`) owns the hooks that collect the statistics and walks the
layers; adding an unstructured method is one `register_pruning` call here. Structured pruning
changes the model's shapes, so it has its own path in the driver and an entry without a
weight function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from paser.prune.magnitude import magnitude_mask
from paser.prune.sparsegpt import sparsegpt_prune
from paser.prune.wanda import wanda_mask


@dataclass(frozen=True)
class PruningMethod:
    """``stats``: the per-input statistic the driver collects from calibration activations
    (None: no calibration; "sq_norms": ‖X_j‖² per input column; "hessian": XᵀX).
    ``prune(w, stat, sparsity, nm, opts) -> new weight`` (None for structured)."""

    name: str
    help: str
    stats: str | None
    prune: Callable | None


PRUNING_METHODS: dict[str, PruningMethod] = {}


def register_pruning(name: str, help: str, stats: str | None, prune: Callable | None) -> None:
    if name in PRUNING_METHODS:
        raise ValueError(f"pruning method {name!r} is registered twice")
    PRUNING_METHODS[name] = PruningMethod(name, help, stats, prune)


def _magnitude(w: torch.Tensor, stat, sparsity: float, nm, opts: dict) -> torch.Tensor:
    return w.masked_fill(magnitude_mask(w, sparsity, nm), 0)


def _wanda(w: torch.Tensor, stat, sparsity: float, nm, opts: dict) -> torch.Tensor:
    return w.masked_fill(wanda_mask(w, stat, sparsity, nm), 0)


def _sparsegpt(w: torch.Tensor, stat, sparsity: float, nm, opts: dict) -> torch.Tensor:
    new_w, _ = sparsegpt_prune(w, stat, sparsity, nm, blocksize=opts["blocksize"], percdamp=opts["percdamp"])
    return new_w.to(w.dtype)


register_pruning("magnitude", "|W| per layer (no calibration)", None, _magnitude)
register_pruning("wanda", "Wanda: |W|·‖X‖₂ per output row", "sq_norms", _wanda)
register_pruning("sparsegpt", "SparseGPT: OBS-style reconstruction from XᵀX", "hessian", _sparsegpt)
register_pruning("structured", "LLM-Pruner-style removal of MLP channels (and KV groups with --prune-heads)", None, None)
