"""The four stages run from their argument dataclasses: the one place where a command's options
become the stage function's parameters.

The Python API (`paser.api`, which also accepts keyword arguments and checks the options a
command needs) and the pipeline both call these, so neither imports the other to run a stage.
Nothing is printed here: each returns its typed result (`paser.results`).
"""

from __future__ import annotations

from pathlib import Path

from paser.config import EvaluateArgs, PruneArgs, RecoverArgs, SelectArgs
from paser.evaluate.runner import evaluate_model
from paser.io.models import LoadedModel
from paser.io.records import load_records
from paser.prune import run_prune
from paser.recover.lora import RecoverOptions
from paser.recover.lora import recover as run_recover
from paser.results import EvaluationResult, PruneResult, RecoveryResult
from paser.select.run import SelectionResult, run_selection


def prune(a: PruneArgs) -> PruneResult:
    """Prune `a.model` into `a.out` (a from_pretrained directory with pruning_report.json)."""
    report = run_prune(
        a.model,
        method=a.method,
        sparsity=a.sparsity,
        pattern=a.pattern,
        out_dir=a.out,
        calibration=a.calibration,
        n_calibration=a.n_calibration,
        importance=a.importance,
        prune_heads=a.prune_heads,
        reconstruct=a.reconstruct,
        ppl_tokens=a.ppl_tokens,
        seed=a.seed,
        allow_pickle=a.allow_pickle,
    )
    return PruneResult(Path(a.out), report)


def select(a: SelectArgs) -> SelectionResult:
    """Score and select recovery data into `a.out`."""
    return run_selection(a)


def recover(a: RecoverArgs) -> RecoveryResult:
    """LoRA recovery of `a.model` on the records of `a.data`, into `a.out`."""
    records, _ = load_records(a.data, skip_invalid=a.skip_invalid)  # bad data fails before any model loads
    # every RecoverArgs field that is a recover() setting, by name (model, data, out are not)
    report = run_recover(a.model, records, a.out, RecoverOptions.from_args(a))
    return RecoveryResult(Path(a.out), report)


def evaluate(a: EvaluateArgs, model: LoadedModel | None = None) -> EvaluationResult:
    """Evaluate `a.model` (or the model in memory `model`) on `a.tasks`; the results JSON goes to `a.out`."""
    results = evaluate_model(
        a.model if model is None else model,
        tasks=[t.strip() for t in a.tasks.split(",") if t.strip()],
        limit=a.limit,
        seed=a.seed,
        out_path=a.out,
        ppl_window=a.ppl_window,
        ppl_max_tokens=a.ppl_tokens,
        batch_size=a.batch_size,
        allow_pickle=a.allow_pickle,
        reference=a.reference,
        heldout_split=a.heldout_split,
        include_path=a.include_path,
    )
    return EvaluationResult(results, Path(a.out))
