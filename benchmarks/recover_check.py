"""Check `paser.recover` on the real SmolLM2-135M: 50 %-sparse copy, LoRA on ~40 pool records.

    PASER_CACHE=/tmp/pcache python benchmarks/recover_check.py --n 40 --epochs 1 --batch-size 4

Prints s/step, tokens/s, the loss curve's first and last values, and sparsity before/after
the merge (which must be equal). The 50 % sparsity is plain per-matrix magnitude pruning done
inline here, so this check does not depend on paser.prune.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from paser.data import pool_path
from paser.io.models import load_model
from paser.io.records import load_records
from paser.recover import linear_sparsity, recover


def magnitude_prune_(model: torch.nn.Module, share: float) -> None:
    """Zero the smallest-|w| `share` of each decoder Linear weight, in place."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight
                k = int(w.numel() * share)
                thr = w.abs().flatten().float().kthvalue(k).values
                w[w.abs() <= thr] = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--work", default="/tmp/paser_recover_check")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    work = Path(a.work)
    sparse_dir = work / f"sparse{int(a.sparsity * 100)}"
    if not (sparse_dir / "config.json").exists():
        lm = load_model(a.model)
        magnitude_prune_(lm.model, a.sparsity)
        lm.model.save_pretrained(sparse_dir)
        lm.tokenizer.save_pretrained(sparse_dir)
    pool, _ = load_records(pool_path())
    recs = random.Random(a.seed).sample(pool, a.n)

    t0 = time.perf_counter()
    rep = recover(
        str(sparse_dir), recs, work / "out", epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, resume=False
    )
    wall = time.perf_counter() - t0
    log = json.loads((work / "out" / "training_log.json").read_text())
    losses = [e["loss"] for e in log["train"]]
    merged = load_model(str(work / "out" / "merged"))
    tr = rep["training"]
    summary = {
        "threads": torch.get_num_threads(),
        "records": rep["data"]["train_examples"],
        "steps": tr["steps"],
        "s_per_step": tr["seconds_per_step"],
        "tokens_per_s": tr["tokens_per_second"],
        "response_tokens_per_s": rep["data"]["response_tokens_per_epoch"] * tr["epochs"] / tr["seconds"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first3_mean": sum(losses[:3]) / len(losses[:3]),
        "loss_last3_mean": sum(losses[-3:]) / len(losses[-3:]),
        "sparsity_before": rep["sparsity"]["before"],
        "sparsity_after_merge": rep["sparsity"]["after_merge"],
        "sparsity_reloaded": linear_sparsity(merged.model)["sparsity"],
        "entries_reset_to_zero": rep["sparsity"]["entries_reset_to_zero"],
        "wall_s": wall,
    }
    print(json.dumps(summary, indent=1))
    print("losses:", [round(x, 3) for x in losses])


if __name__ == "__main__":
    main()
