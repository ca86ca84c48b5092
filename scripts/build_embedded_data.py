"""Rebuild src/paser/data/ from ../shared/data (maintainers only; users get the built files).

Deterministic: a fixed seed picks the pool and the held-out records, so the embedded data is
reproducible byte for byte from the same sources.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
from pathlib import Path

# file, capability, records in the pool, records held out (never in the pool)
POOL_PLAN = [
    ("alpaca_cleaned_50921.jsonl.gz", "general", 3000, 150),
    ("dolly_subset_2000.json", "general", 500, 25),
    ("lima_train_1029.json", "general", 300, 0),
    ("gpteacher_roleplay_3146.json", "general", 500, 25),
    ("gsm8k_train_7473.jsonl", "math", 1200, 150),
    ("llm_adapters_math_data_3260.json", "math", 500, 50),
    ("code_alpaca_2k.json", "code", 700, 100),
    ("new_codealpaca_4535.json", "code", 700, 100),
]


def _read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _norm(row: dict) -> dict:
    instruction = row.get("instruction", row.get("question", ""))
    output = row.get("output", row.get("answer", ""))
    return {"instruction": instruction, "input": row.get("input", ""), "output": output}


def _write_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src" / "paser" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    rng = random.Random(args.seed)
    pool, heldout = [], []
    for name, capability, n_pool, n_held in POOL_PLAN:
        rows = [_norm(r) for r in _read(shared / "instruct" / name)]
        rows = [r for r in rows if r["instruction"].strip() and r["output"].strip()]
        idx = list(range(len(rows)))
        rng.shuffle(idx)
        source = name.split(".")[0]
        for j, i in enumerate(idx[: n_pool + n_held]):
            rec = dict(rows[i], source=source, capability=capability)
            (pool if j < n_pool else heldout).append(rec)
    rng.shuffle(pool)
    _write_gz(out / "pool.jsonl.gz", pool)
    _write_gz(out / "heldout.jsonl.gz", heldout)
    for f in sorted((shared / "eval" / "commonsense").glob("*.jsonl")):
        _write_gz(out / "commonsense" / (f.name + ".gz"), [json.loads(l) for l in f.read_text().splitlines() if l.strip()])
    ppl = out / "ppl"
    ppl.mkdir(parents=True, exist_ok=True)
    for f in ("wikitext2_raw_test_rows.jsonl", "ptb_test.txt"):
        (ppl / (f + ".gz")).write_bytes(gzip.compress((shared / "ppl" / f).read_bytes(), compresslevel=9, mtime=0))
    print(f"pool {len(pool)}, held-out {len(heldout)} -> {out}")


if __name__ == "__main__":
    main()
