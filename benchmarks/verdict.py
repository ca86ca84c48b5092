"""The recovery verdict (issue 14): token-matched experiments that decide paser's defaults.

Every comparison is at the same training-token budget: a token budget counts the response
tokens recovery trains on (one pass; LoRA runs 2 epochs), so a method cannot win by picking
short records. The budget of experiment 1 is random-10 %'s: random's 200-record selections
of the earlier record-budget benchmark held 15,886 response tokens (mean of 3 seeds), so
16,000 tokens.

Experiments (`--experiment NAME`), in the order of value per CPU hour:
  tokens      Wanda 50 %, 16,000 tokens: paser as published (Eq. 6 + IES), paser with
              `mass` allocation, with `jsd` ranking, and both; random; uniform. 3 seeds.
  kd          distillation: `kd` and `sft+kd` against `sft`, for random and for `--best`
              (the best selection of `tokens`), 3 seeds.
  damage      structured 25 % (LLM-Pruner-style MLP channels): prune and score only, and
              report how uneven the damage is (CDS max/min, per-capability loss increase).
  structured  structured 25 %: `--best` against random and uniform, 3 seeds.
  sweep       5 % and 20 % token budgets (8,000 and 32,000 tokens), `--best` against random,
              2 seeds; full data once.
  steps       random 10 % trained for as many steps as full data (1,000).

`--split dev` evaluates an experiment's recovered models (the same stages, so nothing is
retrained) on the dev split instead, into its own archive (`<pruning>-dev`): that is where
`--best auto` chooses the selection the later experiments carry, never on the test set.
`--seeds` runs some of the seeds (for parallel processes on one GPU); the pool stays seed 0's.

Primary metrics, test set: held-out response loss and held-out JSD to the original model
(the 600 held-out records, per capability and all), WikiText-2 and PTB NLL (16K tokens).

Each experiment is a `paser pipeline` whose finished rows go to the results archive in this
repository (`benchmarks/results/verdict/<pruning>/`); commit it as rows land. A later run on
any machine takes the archived rows and continues. `--summary` prints the tables from the
archive without running anything.

    .venv/bin/python benchmarks/verdict.py --experiment tokens [--best LABEL] [--summary]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recovery import MAIN_COLUMNS, summarise_or_run  # noqa: E402  (the same tables as the first benchmark)

COLUMNS = [c for c in MAIN_COLUMNS if c != "Mean acc"] + [
    "held-out JSD code", "held-out JSD general", "held-out JSD math", "held-out JSD all"]

TOKENS_10 = "16000tok"  # random-10 %'s response tokens (15,886, mean of 3 seeds), rounded
WANDA = {"method": "wanda", "sparsity": 0.5, "n_calibration": 32}
STRUCTURED = {"method": "structured", "sparsity": 0.25, "n_calibration": 32}
EVALUATE = {"tasks": "wikitext2,ptb,heldout,heldout_jsd", "limit": None, "ppl_tokens": 16384, "ppl_window": 512}
# The dev split tunes: held-out loss and JSD only (perplexity corpora have no dev split here).
EVALUATE_DEV = {"tasks": "heldout,heldout_jsd", "heldout_split": "dev", "limit": None}
# `--best auto` chooses among these, on the dev split of `tokens`.
CANDIDATES = ("paser", "paser-mass", "paser-jsd", "paser-mass-jsd")

VARIANTS = {
    "paser": "paser",  # as published: Eq. 6 allocation, IES ranking
    "paser-mass": {"label": "paser-mass", "method": "paser", "allocation": "mass", "tau": 1.0},
    "paser-jsd": {"label": "paser-jsd", "method": "paser", "ranking": "jsd"},
    "paser-mass-jsd": {"label": "paser-mass-jsd", "method": "paser", "allocation": "mass", "tau": 1.0, "ranking": "jsd"},
    "random": "random",
    "uniform": "uniform",
}


def _entry(label: str, **recover) -> str | dict:
    base = VARIANTS.get(label, label)
    if not recover:
        return base
    e = dict(base) if isinstance(base, dict) else {"label": label, "method": label}
    e["label"] = f"{e['label']}+{recover['objective']}"
    e["recover"] = recover
    return e


def experiment(name: str, best: str) -> tuple[str, dict]:
    """(pruning scheme, the pipeline options of the experiment)."""
    if name == "tokens":
        return "wanda50", dict(prune=WANDA, budgets=[TOKENS_10], seeds=[0, 1, 2], methods=list(VARIANTS.values()))
    if name == "kd":
        methods = [_entry(m, **({"objective": o} if o != "sft" else {})) for m in ("random", best) for o in ("sft", "kd", "sft+kd")]
        return "wanda50", dict(prune=WANDA, budgets=[TOKENS_10], seeds=[0, 1, 2], methods=methods)
    if name == "damage":
        return "structured25", dict(prune=STRUCTURED, budgets=[TOKENS_10], seeds=[0], methods=[])
    if name == "structured":
        return "structured25", dict(prune=STRUCTURED, budgets=[TOKENS_10], seeds=[0, 1, 2], methods=[_entry(best), "random", "uniform"])
    if name == "sweep":
        return "wanda50", dict(prune=WANDA, budgets=["8000tok", "32000tok"], seeds=[0, 1], methods=[_entry(best), "random", "full"])
    if name == "steps":
        return "wanda50", dict(prune=WANDA, budgets=["0.1"], seeds=[0], methods=[{"label": "random-1000steps", "method": "random", "recover": {"max_steps": 1000}}])
    raise SystemExit(f"unknown experiment {name!r}")


def config(name: str, best: str, out: Path, archive: Path | None, quick: bool = False,
           split: str = "test", seeds: list[int] | None = None) -> dict:
    scheme, opts = experiment(name, best)
    if seeds is not None:  # a part of the seeds; the pool stays the first seed's, as in the whole run
        # Full data runs once, with the experiment's first seed: only the part that holds it runs it.
        methods = opts["methods"] if opts["seeds"][0] in seeds else [m for m in opts["methods"] if m != "full"]
        opts = {**opts, "seeds": seeds, "pool_seed": opts["seeds"][0], "methods": methods}
    if quick:  # a smoke run of the same code path on the real model: minutes, not hours
        methods = [m for m in opts["methods"] if m != "full"]
        methods = [{**m, "recover": {**m["recover"], "max_steps": 20}} if isinstance(m, dict) and "max_steps" in m.get("recover", {}) else m
                   for m in methods]
        opts = {**opts, "seeds": opts["seeds"][:1], "methods": methods[2:4] + methods[4:5] or methods[:2], "budgets": ["800tok"]}
        ev = {"tasks": "wikitext2,heldout,heldout_jsd", "limit": 4, "ppl_tokens": 1024, "ppl_window": 512}
        return {"out": str(out), "original": "smollm2-135m", "pool_limit": 80, "recover": {"epochs": 1, "batch_size": 4},
                "evaluate": {**EVALUATE_DEV, "limit": 4} if split == "dev" else ev,
                "cache_dir": str(out / "cache"), "archive": str(archive) if archive else None, "select": {"k_min": 3, "k_max": 6},
                **{k: v for k, v in opts.items() if k != "prune"},
                "prune": {**opts["prune"], "n_calibration": 4, "ppl_tokens": 0}}
    return {
        "out": str(out),
        "original": "smollm2-135m",
        "pool_limit": 2000,
        "recover": {"epochs": 2, "batch_size": 4},
        "evaluate": EVALUATE_DEV if split == "dev" else EVALUATE,
        "cache_dir": str(out.parent / "cache"),  # scores and evaluations shared by the experiments
        "archive": str(archive) if archive else None,
        **opts,
    }


def choose_best(dev_cfg_path: Path) -> tuple[str, list[str]]:
    """The candidate with the lowest paired difference against random in dev held-out loss
    (all capabilities; mean over the seeds that both have), and the lines that say why.
    The rule is fixed before any test number is read: held-out loss is what recovery trains
    for; JSD and the capabilities are reported beside it, not mixed into the choice."""
    from paser.pipeline import archived_results
    from paser.report.paired import paired_difference

    res = archived_results(dev_cfg_path)
    rows = [r for r in (res or {}).get("rows", []) if r.get("results") is not None]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r["results"]
    if "random" not in by:
        raise SystemExit(f"--best auto: no dev-split random rows in {dev_cfg_path}'s archive; run --split dev first")
    lines, scored = [], []
    for c in CANDIDATES:
        seeds = sorted(set(by.get(c, {})) & set(by["random"]))
        if not seeds:
            continue
        a, b = [by[c][s] for s in seeds], [by["random"][s] for s in seeds]
        d = paired_difference(a, b, "heldout", "all")
        j = paired_difference(a, b, "heldout_jsd", "all")
        if d is None:
            continue
        scored.append((d[0], c))
        lines.append(f"  {c}: dev held-out loss {d[0]:+.4f} ± {d[1]:.4f}, JSD "
                     + (f"{j[0]:+.5f} ± {j[1]:.5f}" if j else "n/a") + f" against random (seeds {seeds})")
    if not scored:
        raise SystemExit(f"--best auto: no candidate has dev-split rows in {dev_cfg_path}'s archive")
    best = min(scored)[1]
    return best, [f"--best auto: {best} (lowest dev held-out loss against random)"] + lines


def _resolve_best(best: str, args, archive_root: Path) -> str:
    if best != "auto":
        return best
    scheme, _ = experiment("tokens", "paser")
    out = args.out / scheme / ("tokens" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "choose-best-dev.yaml"
    cfg = config("tokens", "paser", out, archive_root / f"{scheme}-dev", args.quick, "dev")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    chosen, lines = choose_best(path)
    print("\n".join(lines), file=sys.stderr)
    return chosen


def damage_report(cfg_path: Path) -> str:
    """Prune, score the pool once, and say how uneven the damage is: CDS per S2RIC cluster
    (max/min) and the loss increase per capability of the unrecovered model."""
    from paser import api
    from paser.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(cfg_path)
    print(run_pipeline(cfg_path))  # the dense and unrecovered rows (and the pruned model)
    pruned = next(Path(cfg.out, "pruned").glob("*/config.json")).parent
    sel = Path(cfg.out) / "damage-select"
    api.select(original=cfg.original, pruned=str(pruned), budget=TOKENS_10, limit=cfg.pool_limit, out=str(sel), cache_dir=cfg.cache_dir)
    rep = json.loads((sel / "report.json").read_text())
    cds = rep["clusters"]["cds"]
    res = json.loads((Path(cfg.out) / "results.json").read_text())
    by = {r["method"]: r["results"] for r in res["rows"]}
    loss = {k: by["pruned, no recovery"]["summary"]["heldout_loss"][k] - by["dense (unpruned)"]["summary"]["heldout_loss"][k]
            for k in by["dense (unpruned)"]["summary"]["heldout_loss"]}
    return (f"CDS over {len(cds)} clusters: min {min(cds):.3f}, max {max(cds):.3f}, max/min {max(cds) / min(cds):.2f}\n"
            "held-out loss increase (pruned - dense), nats: " + ", ".join(f"{k} {v:+.3f}" for k, v in loss.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ.get("PASER_CACHE", Path.home() / ".cache" / "paser")) / "benchmarks" / "verdict"
    ap.add_argument("--experiment", required=True, choices=("tokens", "kd", "damage", "structured", "sweep", "steps"))
    ap.add_argument("--best", default="paser-mass-jsd", help="the selection the later experiments carry (the winner of `tokens`); "
                    "`auto`: the candidate that wins on the dev split (`--experiment tokens --split dev` first)")
    ap.add_argument("--out", type=Path, default=default_out, help=f"output and cache directory (default {default_out})")
    ap.add_argument("--archive", type=Path, default=None, help="results archive (default benchmarks/results/verdict/<pruning>)")
    ap.add_argument("--summary", action="store_true", help="print the tables from the archive; run nothing")
    ap.add_argument("--quick", action="store_true", help="a smoke run of the same code path (tiny pool and evaluation; "
                    "no archive unless --archive-root is given)")
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="dev: evaluate the experiment's recovered models on the dev split (archive <pruning>-dev)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma-separated seeds to run (default: the experiment's)")
    ap.add_argument("--archive-root", type=Path, default=None,
                    help="folder of the archives (default benchmarks/results/verdict); e.g. one per machine")
    args = ap.parse_args()
    root = args.archive_root or REPO / "benchmarks" / "results" / "verdict"
    use_archive = not args.quick or args.archive_root is not None
    best = _resolve_best(args.best, args, root) if use_archive else args.best.replace("auto", "paser")
    scheme, _ = experiment(args.experiment, best)
    out = args.out / scheme / (args.experiment + ("-quick" if args.quick else ""))
    archive = args.archive or root / (scheme + ("-dev" if args.split == "dev" else ""))
    out.mkdir(parents=True, exist_ok=True)
    # The dev run shares the test run's stages (same folder) but not its configuration file.
    cfg_path = out / ("experiment-dev.yaml" if args.split == "dev" else "experiment.yaml")
    cfg = config(args.experiment, best, out, archive if use_archive else None, args.quick, args.split, args.seeds)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if args.experiment == "damage" and not args.summary:
        print(damage_report(cfg_path))
        return 0
    return summarise_or_run(cfg_path, out, archive if use_archive else None, args.summary,
                            COLUMNS if args.split == "test" else [c for c in COLUMNS if "held-out" in c])

if __name__ == "__main__":
    sys.exit(main())
