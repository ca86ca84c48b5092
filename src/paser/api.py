"""The Python API: prune(), select(), recover(), evaluate(), estimate(), pipeline().

Each takes the command's argument dataclass (see paser.config) or keyword arguments, so
`paser.api.select(pruned="out/wanda", budget="100")` does what `paser select --pruned ...` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paser.config import EvaluateArgs, PruneArgs, RecoverArgs, SelectArgs
from paser.errors import PaserError
from paser.results import EvaluationResult, PruneResult, RecoveryResult

if TYPE_CHECKING:  # pragma: no cover
    from paser.select.estimate import Estimate
    from paser.select.run import SelectionResult


def _coerce_args(cls: type, args: Any, kwargs: dict) -> Any:
    if args is None:
        return cls(**kwargs)
    if kwargs:
        return dataclasses.replace(args, **kwargs)
    return args


def _need(value: Any, flag: str, command: str) -> None:
    if value in (None, "", []):
        raise PaserError(f"{command} needs {flag}")


def prune(args: PruneArgs | None = None, **kwargs) -> PruneResult:
    """Prune a model and write a from_pretrained directory with pruning_report.json."""
    a = _coerce_args(PruneArgs, args, kwargs)
    _need(a.out, "--out DIR", "prune")
    from paser.prune import run_prune

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


def select(args: SelectArgs | None = None, **kwargs) -> "SelectionResult":
    """Score and select recovery data; writes selected.jsonl, scores.parquet, report.json, plots."""
    a = _coerce_args(SelectArgs, args, kwargs)
    _need(a.out, "--out DIR", "select")
    from paser.select.run import run_selection

    return run_selection(a)


def estimate(args: SelectArgs | None = None, **kwargs) -> "Estimate":
    """Predict tokens, forward passes, time and peak memory of `select` before running it."""
    a = _coerce_args(SelectArgs, args, kwargs)
    from paser.select.estimate import estimate_selection

    return estimate_selection(a)


def recover(args: RecoverArgs | None = None, **kwargs) -> RecoveryResult:
    """LoRA recovery on selected records; writes adapter/, merged/ and logs."""
    a = _coerce_args(RecoverArgs, args, kwargs)
    _need(a.model, "--model PRUNED", "recover")
    _need(a.data, "--data FILE", "recover")
    _need(a.out, "--out DIR", "recover")
    from paser.io.records import load_records

    records, _ = load_records(a.data, skip_invalid=a.skip_invalid)  # bad data fails before any model loads
    from paser.recover.lora import RecoverOptions
    from paser.recover.lora import recover as run_recover

    # every RecoverArgs field that is a recover() setting, by name (model, data, out are not)
    report = run_recover(a.model, records, a.out, RecoverOptions.from_args(a))
    return RecoveryResult(Path(a.out), report)


def evaluate(args: EvaluateArgs | None = None, **kwargs) -> EvaluationResult:
    """Perplexity and zero-shot accuracy; writes a results JSON with provenance."""
    a = _coerce_args(EvaluateArgs, args, kwargs)
    _need(a.model, "--model", "evaluate")
    from paser.evaluate.runner import evaluate_model

    results = evaluate_model(
        a.model,
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


def pipeline(config: str, out: str | None = None) -> str:
    from paser.pipeline import run_pipeline

    return run_pipeline(config, out=out)
