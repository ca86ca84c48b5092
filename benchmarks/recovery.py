"""The honest experiment: does PASER recover a pruned SmolLM2 better than the alternatives?

Configuration (issue 6; sized for a 2-core CPU, see the README for what it measured):
- model: SmolLM2-135M-Instruct pruned by Wanda to 50 % (`--structured` adds LLM-Pruner-style 25 %);
- pool: 2,000 records of the embedded pool (general, math, code), seeded;
- budget: 10 % (200 records);
- methods: paser, random, uniform, ifd with 3 seeds each; full data with 1 seed; plus the
  unrecovered and the dense model;
- metrics: WikiText-2 and PTB perplexity on the first 16,384 tokens (windows of 512), held-out
  response loss per capability on the 600 embedded records that are not in the pool (primary);
  the 7 commonsense tasks with 500 items for ARC-e, HellaSwag and PIQA and 200 for the others,
  with acc, acc_norm, mean gold-choice log-probability and standard errors (secondary).

Every stage is cached (see `paser pipeline`), so run it in the background and re-run the same
command after an interruption: it continues where it stopped. Each finished row also goes to
the results archive in the repository (`benchmarks/results/recovery/<config>/`, a few hundred
kB a row: evaluation results with their per-item arrays, selection and recovery summaries, the
per-sample scores). On this CPU the run takes longer than one working session and a new machine
starts with an empty cache: committing the archive is what lets the next machine continue
instead of starting again.

    .venv/bin/python benchmarks/recovery.py [--out DIR] [--archive DIR] [--quick] [--structured] [--summary]

`--summary` runs nothing: it prints the README's two tables (the main numbers and the paired
differences) from the rows the archive holds, on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml


REPO = Path(__file__).resolve().parent.parent


def config(out: Path, quick: bool, structured: bool, archive: Path | None = None) -> dict:
    cfg = {
        "out": str(out),
        "original": "smollm2-135m",
        "prune": {"method": "structured", "sparsity": 0.25} if structured else {"method": "wanda", "sparsity": 0.5, "n_calibration": 32},
        "pool_limit": 2000,
        "budgets": ["0.1"],
        "methods": ["paser", "random", "uniform", "ifd", "full"],
        "seeds": [0, 1, 2],
        "recover": {"epochs": 2, "batch_size": 4},
        "evaluate": {
            "tasks": "wikitext2,ptb,heldout,commonsense",
            "limit": 200,
            "limits": {"arc_easy": 500, "hellaswag": 500, "piqa": 500, "heldout": None},
            "ppl_tokens": 16384,
            "ppl_window": 512,
        },
        "cache_dir": str(out / "cache"),
        "archive": str(archive) if archive else None,
    }
    if quick:  # a smoke run of the same code path, minutes instead of hours
        cfg.update(pool_limit=200, seeds=[0], methods=["paser", "random"])
        cfg["recover"] = {"epochs": 1, "batch_size": 4}
        cfg["evaluate"] = {"tasks": "wikitext2,heldout,arc_easy", "limit": 20, "ppl_tokens": 2048, "ppl_window": 512}
    return cfg


MAIN_COLUMNS = ["WikiText-2 PPL", "PTB PPL", "held-out loss code", "held-out loss general", "held-out loss math", "held-out loss all", "Mean acc"]


def summary_tables(results: dict, keep: list[str] = MAIN_COLUMNS) -> str:
    """The README's condensed tables: primary metrics and mean accuracy per method (with the
    response tokens each method's recovery trained on), then paired differences against the
    unrecovered model and against random. Everything comes from paser's report functions."""
    import numpy as np

    from paser.report.experiment import build_table, markdown_table
    from paser.report.paired import paired_table

    rows = results["rows"]
    header, body = build_table(rows)
    idx = [header.index(k) for k in keep if k in header]
    tokens: dict[str, list] = {}
    for r in rows:
        if (r.get("recovery") or {}).get("tokens_trained") is not None:
            tokens.setdefault(r["method"], []).append(r["recovery"]["tokens_trained"])
    main_h = ["Method", "Seeds", *(header[i].replace("held-out loss", "held-out") for i in idx), "LoRA tokens"]
    main_b = [
        [row[0] if row[1] == "-" else "full data" if row[0] == "full" else f"{row[0]}, budget {row[1]}", row[2], *(row[i] for i in idx),
         f"{np.mean(tokens[row[0]]):,.0f}" if row[0] in tokens else "-"]
        for row in body
    ]
    pair_b, pair_h = [], None
    for ref, short in (("pruned, no recovery", "unrecovered"), ("random", "random")):
        pt = paired_table(rows, ref)
        if pt:
            h, b = pt
            pair_h = ["Comparison", *h[3:]]
            pair_b += [[f"{'dense' if r[0].startswith('dense') else r[0]} − {short}", *r[3:]] for r in b]
    out = markdown_table(main_h, main_b)
    if pair_h:
        out += "\n\n" + markdown_table(pair_h, pair_b)
    # Rows archived on different machines may come from pruned models whose masks differ
    # slightly (each machine re-runs the pruning with the kernels its CPU selects; see
    # prune_kernels.py): say which rows, so that a reader can weigh the mix (the README gives
    # the measured size of the difference).
    by_fp: dict[str, list[str]] = {}
    for label, fp in ((results.get("archive") or {}).get("pruned_fingerprints") or {}).items():
        by_fp.setdefault(fp or "unknown", []).append(label)
    if len(by_fp) > 1:
        out += "\n\nPruned models: " + "; ".join(f"fingerprint {fp}: {', '.join(labels)}" for fp, labels in by_fp.items()) + "."
    prog = results.get("progress") or {}
    if prog and not prog.get("complete", True):
        out += f"\n\nIncomplete: {prog['units_done']} of {prog['units_total']} units done."
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ.get("PASER_CACHE", Path.home() / ".cache" / "paser")) / "benchmarks" / "recovery"
    ap.add_argument("--out", type=Path, default=default_out, help=f"output and cache directory (default {default_out})")
    ap.add_argument("--quick", action="store_true", help="a small smoke configuration")
    ap.add_argument("--structured", action="store_true", help="LLM-Pruner-style structured 25 %% instead of Wanda 50 %%")
    ap.add_argument("--archive", type=Path, default=None,
                    help="results archive (default benchmarks/results/recovery/<config> in the repository; none for --quick)")
    ap.add_argument("--summary", action="store_true", help="print the README tables from the results so far; run nothing")
    args = ap.parse_args()
    name = "structured25" if args.structured else "wanda50"
    out = args.out / name / ("quick" if args.quick else "full")
    archive = args.archive or (None if args.quick else REPO / "benchmarks" / "results" / "recovery" / name)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "experiment.yaml"
    cfg_path.write_text(yaml.safe_dump(config(out, args.quick, args.structured, archive), sort_keys=False))
    return summarise_or_run(cfg_path, out, archive, args.summary)


def summarise_or_run(cfg_path: Path, out: Path, archive: Path | None, summary: bool, keep: list[str] = MAIN_COLUMNS) -> int:
    """`--summary`: the tables from the archive (or this machine's results.json); else run the
    pipeline of `cfg_path` (resuming whatever the caches and the archive hold)."""
    from paser.pipeline import archived_results, run_pipeline

    if summary:
        res = archived_results(cfg_path) if archive else None
        if res is None and (out / "results.json").exists():
            res = json.loads((out / "results.json").read_text())
        if not res or not res["rows"]:
            print(f"no results yet (archive {archive}, run {out}); run without --summary first", file=sys.stderr)
            return 2
        print(summary_tables(res, keep))
        return 0
    print(run_pipeline(cfg_path))
    res = json.loads((out / "results.json").read_text())
    print(f"\nconfiguration: {cfg_path}\nresults: {out / 'results.json'}; failures: {len(res['failures'])}")
    return 1 if res["failures"] else 0

if __name__ == "__main__":
    sys.exit(main())
