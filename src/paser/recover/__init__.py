"""Recovery of a pruned model: LoRA fine-tuning on the selected records, then a merge that
keeps the pruned model's zeros. `recover()` is the stage; the rest are its parts."""

from paser.recover.data import RecoveryDataset, ResponseCollator, encode_records, pad_batch, split_validation
from paser.recover.lora import RecoverOptions, lora_target_modules, recover
from paser.recover.merge import (
    apply_zero_mask,
    apply_zero_masks,
    linear_sparsity,
    merge_keep_sparsity,
    sparsity_masks,
    zero_fraction,
)

__all__ = [
    "recover",
    "RecoverOptions",
    "lora_target_modules",
    "encode_records",
    "split_validation",
    "pad_batch",
    "ResponseCollator",
    "RecoveryDataset",
    "sparsity_masks",
    "apply_zero_mask",
    "apply_zero_masks",
    "linear_sparsity",
    "merge_keep_sparsity",
    "zero_fraction",
]
