"""The Python API: prune(), select(), recover(), evaluate(), estimate(), pipeline().

Each takes the command's argument dataclass (see paser.config) or keyword arguments, so
`paser.api.select(pruned="out/wanda", budget="100")` does what `paser select --pruned ...` does.
The stages themselves run in paser.stages (which the pipeline calls too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from paser import stages
from paser.config import EvaluateArgs, PruneArgs, RecoverArgs, SelectArgs
from paser.errors import PaserError
from paser.pipeline import run_pipeline
from paser.results import EvaluationResult, PruneResult, RecoveryResult
from paser.select.estimate import Estimate, estimate_selection
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
    return stages.prune(a)


def select(args: SelectArgs | None = None, **kwargs) -> SelectionResult:
    """Score and select recovery data; writes selected.jsonl, scores.parquet, report.json, plots."""
    a = _coerce_args(SelectArgs, args, kwargs)
    _need(a.out, "--out DIR", "select")
    return stages.select(a)


def estimate(args: SelectArgs | None = None, **kwargs) -> Estimate:
    """Predict tokens, forward passes, time and peak memory of `select` before running it."""
    return estimate_selection(_coerce_args(SelectArgs, args, kwargs))


def recover(args: RecoverArgs | None = None, **kwargs) -> RecoveryResult:
    """LoRA recovery on selected records; writes adapter/, merged/ and logs."""
    a = _coerce_args(RecoverArgs, args, kwargs)
    _need(a.model, "--model PRUNED", "recover")
    _need(a.data, "--data FILE", "recover")
    _need(a.out, "--out DIR", "recover")
    return stages.recover(a)


def evaluate(args: EvaluateArgs | None = None, **kwargs) -> EvaluationResult:
    """Perplexity and zero-shot accuracy; writes a results JSON with provenance."""
    a = _coerce_args(EvaluateArgs, args, kwargs)
    _need(a.model, "--model", "evaluate")
    return stages.evaluate(a)


def pipeline(config: str, out: str | None = None) -> str:
    """Prune, select, recover, evaluate and report, from one YAML file (see paser.pipeline)."""
    return run_pipeline(config, out=out)
