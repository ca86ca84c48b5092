"""Embedded default data: a mixed instruction pool, held-out records, the 7 commonsense sets,
WikiText-2 and PTB test. All compressed; see PROVENANCE.md beside this file for sources and licences.

A user's fresh machine has nothing else, so every default of paser points here.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from paser.io.records import load_records

DATA_DIR = Path(__file__).resolve().parent

COMMONSENSE_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_COMMONSENSE_FILES = {
    "boolq": "boolq.jsonl.gz",
    "piqa": "piqa.jsonl.gz",
    "hellaswag": "hellaswag_val_full.jsonl.gz",
    "winogrande": "winogrande.jsonl.gz",
    "arc_easy": "arc_easy_test.jsonl.gz",
    "arc_challenge": "arc_challenge_test.jsonl.gz",
    "openbookqa": "openbook_qa.jsonl.gz",
}
PPL_CORPORA = ("wikitext2", "ptb")


def pool_path() -> Path:
    """The embedded instruction pool (7,400 records: general, math, code; field 'capability')."""
    return DATA_DIR / "pool.jsonl.gz"


def pool_subset_indices(n: int, limit: int | None, seed: int):
    """The positions `--limit N` keeps of an n-record pool (seeded, in file order): the one rule
    `paser select` uses, and the one the dev split below avoids."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# The seeded pools that paser's own experiments select from (benchmarks/recovery.py: 2,000
# records, seed 0; configs/demo.yaml: 160, seed 0). The dev split takes none of their records.
BENCHMARK_POOLS = ((2000, 0), (160, 0))
DEV_PER_CAPABILITY = 100
DEV_SEED = 20261203


def dev_records():
    """The dev split: held-out-style records for tuning options (tau, k, mix weights, lr).

    Drawn (seeded, DEV_PER_CAPABILITY per capability) from the embedded pool's records that
    are in none of BENCHMARK_POOLS; the 600 held-out records are never in the pool at all. So
    tuning on these touches neither the training pools of the benchmarks nor the test set.
    """
    pool = load_records(str(pool_path()))[0]
    used: set[int] = set()
    for limit, seed in BENCHMARK_POOLS:
        used.update(int(i) for i in pool_subset_indices(len(pool), limit, seed))
    free = [r for i, r in enumerate(pool) if i not in used]
    by_cap: dict[str, list] = {}
    for r in free:
        by_cap.setdefault(str(r.extra.get("capability") or "general"), []).append(r)
    rng = np.random.default_rng(DEV_SEED)
    out = []
    for cap in sorted(by_cap):
        rs = by_cap[cap]
        keep = np.sort(rng.choice(len(rs), size=min(DEV_PER_CAPABILITY, len(rs)), replace=False))
        out += [rs[i] for i in keep]
    return out


def heldout_path() -> Path:
    """600 records from the same sources that are never in the pool: held-out response loss."""
    return DATA_DIR / "heldout.jsonl.gz"


def commonsense_path(task: str) -> Path:
    if task not in _COMMONSENSE_FILES:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(COMMONSENSE_TASKS)}")
    return DATA_DIR / "commonsense" / _COMMONSENSE_FILES[task]


def load_commonsense(task: str) -> list[dict]:
    with gzip.open(commonsense_path(task), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=4)
def ppl_text(corpus: str) -> str:
    """The test text of a perplexity corpus, joined the way LLM-Pruner and PASER do.

    WikiText-2: the Hugging Face test rows joined with "\\n\\n" (`"\\n\\n".join(test["text"])`).
    PTB: the sentences joined with " " (LLM-Pruner's `" ".join(test["sentence"])`).
    """
    if corpus == "wikitext2":
        with gzip.open(DATA_DIR / "ppl" / "wikitext2_raw_test_rows.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line)["text"] for line in f]
        return "\n\n".join(rows)
    if corpus == "ptb":
        with gzip.open(DATA_DIR / "ppl" / "ptb_test.txt.gz", "rt", encoding="utf-8") as f:
            return " ".join(line.strip() for line in f if line.strip())
    raise KeyError(f"unknown perplexity corpus {corpus!r}; known: {', '.join(PPL_CORPORA)}")
