"""lm-evaluation-harness task files for paser's embedded commonsense data, run offline.

The YAMLs beside this file are lm-eval 0.4 multiple-choice tasks that read our gzipped JSONL
(decompressed, and subset by the same seeded `--limit` as paser's own scorer) through
`dataset_path: json`. They rebuild lm-eval's default prompts from our fields with lm-eval's
own Jinja templating, independently of `paser.evaluate.zeroshot.format_item`; running both
on the same items checks prompts, tokenisation and metrics at once
(`lm_eval_crosscheck`). paser's default scorer is `zeroshot` (faster: shared contexts), so
lm-eval is only needed for this check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from paser.errors import PaserError

TASKS_DIR = Path(__file__).resolve().parent


def _write_subset(task: str, indices: list[int], out_dir: Path) -> Path:
    from paser.data import load_commonsense

    docs = load_commonsense(task)
    path = out_dir / f"{task}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in indices:
            f.write(json.dumps({**docs[i], "paser_index": i}, ensure_ascii=False) + "\n")
    return path


def _hellaswag_process_docs(dataset):
    """lm-eval's hellaswag process_docs on our fields: its `preprocess` of query and endings
    (ctx_b capitalised as `zeroshot._hellaswag_context` explains)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    from paser.evaluate.zeroshot import _hellaswag_context

    def _one(doc):
        return {"query": preprocess(_hellaswag_context(doc["query"])), "choices": [preprocess(e) for e in doc["endings"]]}

    return dataset.map(_one)


def task_config(task: str, data_file: str | os.PathLike) -> dict:
    """The lm-eval config dict for one task reading `data_file` (plain JSONL)."""
    path = TASKS_DIR / f"paser_{task}.yaml"
    if not path.exists():
        raise PaserError(f"no lm-eval task file for {task!r}")
    cfg = yaml.safe_load(path.read_text())
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    if task == "hellaswag":
        cfg["process_docs"] = _hellaswag_process_docs
    return cfg


def lm_eval_crosscheck(
    model, tokenizer, tasks: list[str], *, limit: int | None, seed: int, work_dir: str | os.PathLike, batch_size: int = 8
) -> dict[str, dict]:
    """Run lm-eval itself (offline, in-memory model) on the same seeded items paser scores.

    Returns per task: acc, acc_norm (lm-eval's aggregates), indices (file positions) and lls
    (per item, per choice), for comparison with `zeroshot.evaluate_task`.
    """
    from paser.extras import require
    from paser.offline import hub_offline

    require("lm_eval")
    from paser.data import load_commonsense
    from paser.evaluate.zeroshot import subset_indices

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    configs = []
    for t in tasks:
        idx = subset_indices(len(load_commonsense(t)), limit, seed)
        configs.append(task_config(t, _write_subset(t, idx, work)))
    # Offline for this call only (no process-wide environment change): lm-eval and datasets
    # read the switch when imported, so the imports happen inside the block too.
    with hub_offline():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = simple_evaluate(model=lm, tasks=configs, log_samples=True, bootstrap_iters=0)
    out = {}
    for t in tasks:
        name = f"paser_{t}"
        agg = res["results"][name]
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        out[t] = {
            "acc": agg["acc,none"],
            "acc_norm": agg["acc_norm,none"],
            "indices": [s["doc"]["paser_index"] for s in samples],
            "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        }
    return out


__all__ = ["TASKS_DIR", "task_config", "lm_eval_crosscheck"]
