"""lm-evaluation-harness task files for paser's embedded commonsense data, run offline.

The YAMLs beside this file are lm-eval 0.4 multiple-choice tasks (`paser_boolq`, ...,
`paser_openbookqa`) that read paser's embedded data through `custom_dataset` (`utils.py`), so
they work with a plain `lm_eval --include_path <this directory>` and with
`paser evaluate --tasks lm_eval:paser_arc_easy`. They rebuild lm-eval's default prompts from
our fields with lm-eval's own Jinja templating, independently of
`paser.evaluate.zeroshot.format_item`; running both on the same items checks prompts,
tokenisation and metrics at once (`lm_eval_crosscheck`). paser's default scorer is `zeroshot`
(faster: shared contexts), so lm-eval is only needed for this check and for lm_eval: tasks.
"""

from __future__ import annotations

import os
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def lm_eval_crosscheck(
    model, tokenizer, tasks: list[str], *, limit: int | None, seed: int, work_dir: str | os.PathLike | None = None,
    batch_size: int = 8, softmax_dtype: str | None = "float64",
) -> dict[str, dict]:
    """Run lm-eval itself (offline, in-memory model) on the same seeded items paser scores.

    Returns per task: acc, acc_norm (lm-eval's aggregates), indices (file positions) and lls
    (per item, per choice), for comparison with `zeroshot.evaluate_task`. `work_dir` is unused
    (the YAMLs read the embedded data directly); kept for callers of the earlier signature.
    softmax_dtype: lm-eval's log-softmax dtype; float64 by default, because lm-eval's default
    (float32 over the whole vocabulary) is itself off by up to ~2e-4 nats per choice on a 49k
    vocabulary, more than paser's scorer (see `zeroshot`'s notes on agreement).
    """
    from paser.evaluate import lm_eval_tasks

    out = {}
    for t in tasks:
        # the subset is built by the task itself (metadata), so only those docs are prepared
        r = lm_eval_tasks.run(model, tokenizer, f"lm_eval:paser_{t}", limit=None, seed=seed, batch_size=batch_size,
                              softmax_dtype=softmax_dtype, metadata={"paser_limit": limit, "paser_seed": seed})
        m, items = r["metrics"][f"paser_{t}"], r["items"][f"paser_{t}"]
        out[t] = {"acc": m["acc,none"], "acc_norm": m["acc_norm,none"], "indices": items["indices"], "lls": items["lls"]}
    return out


__all__ = ["TASKS_DIR", "lm_eval_crosscheck"]
