"""Merge a LoRA adapter into a pruned model without undoing the pruning.

A LoRA update B·A is dense: peft's `merge_and_unload()` adds it to every weight, and a 50 %
sparse model comes out 0 % sparse (measured), which throws away the point of pruning. So the
zero pattern of every pruned weight is recorded before training and re-applied after merging.
Structurally pruned models (smaller matrices, no zeros) have no masks and merge plainly.
"""

from __future__ import annotations

import torch
from torch import nn

# A weight counts as pruned when at least this share of its entries are exactly zero. Dense
# float weights (even dequantised GGUF ones) have almost none, while pruning leaves 20-50 %.
MIN_SPARSITY = 0.01


def zero_fraction(weight: torch.Tensor) -> float:
    """Share of entries that are exactly zero."""
    return float((weight == 0).sum().item()) / max(1, weight.numel())


def apply_zero_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`weight` with the entries where `mask` is True set to zero (a new tensor; same dtype)."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    return weight.masked_fill(mask.to(device=weight.device, dtype=torch.bool), 0)


def _prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear except the output embedding (pruning never touches the LM head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not out_emb}


@torch.no_grad()
def sparsity_masks(model: nn.Module, min_sparsity: float = MIN_SPARSITY) -> dict[str, torch.Tensor]:
    """{module name: bool mask, True where the weight is zero} for each pruned Linear.

    Masks live on the CPU as bool (1 byte per weight), keyed by the module names of the plain
    (un-wrapped) model, which are also the names after `merge_and_unload()`.
    """
    masks = {}
    for name, lin in _prunable_linears(model).items():
        zero = lin.weight == 0
        if zero.float().mean().item() >= min_sparsity:
            masks[name] = zero.cpu()
    return masks


@torch.no_grad()
def linear_sparsity(model: nn.Module) -> dict[str, float | int]:
    """Zero share over all prunable Linear weights (the number a pruning method reports)."""
    zeros = total = 0
    for lin in _prunable_linears(model).values():
        zeros += int((lin.weight == 0).sum().item())
        total += lin.weight.numel()
    return {"sparsity": zeros / max(1, total), "zeros": zeros, "weights": total}


@torch.no_grad()
def apply_zero_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Re-zero every masked weight of `model` in place; returns how many entries changed."""
    modules = dict(model.named_modules())
    changed = 0
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"masked module {name!r} not found in the merged model")
        w = modules[name].weight
        m = mask.to(w.device)
        changed += int((w[m] != 0).sum().item())
        w.copy_(apply_zero_mask(w, m))
    return changed


def merge_keep_sparsity(peft_model, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """Merge the adapter into the base weights, then re-apply the recorded zero masks.

    Returns (plain model, number of merged entries that were pushed back to zero).
    """
    merged = peft_model.merge_and_unload()
    restored = apply_zero_masks(merged, masks) if masks else 0
    return merged, restored
