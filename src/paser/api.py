"""The Python API: prune(), select(), recover(), evaluate(), estimate(), pipeline().

Each takes the command's argument dataclass (see paser.config) or keyword arguments, so
`paser.api.select(pruned="out/wanda", budget="100")` does what `paser select --pruned ...` does.
`data` may also be records in memory: a list of dicts (any schema a file may have) or of
`paser.io.records.Record`s, or a `datasets.Dataset`. They are written once into the output
directory (`OUT/input.jsonl`) and read from there, so that caches, run keys and resume treat
them exactly like a file. The stages themselves run in paser.stages (which the pipeline calls too).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from paser import stages
from paser.config import EvaluateArgs, PruneArgs, RecoverArgs, SelectArgs
from paser.errors import PaserError
from paser.io.models import LoadedModel, fingerprint_model
from paser.io.records import Record, selected_row, write_jsonl
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


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _in_memory(data: Any) -> bool:
    """Records rather than file paths: a datasets.Dataset, or a list of dicts or Records."""
    if data is None or _is_path(data):
        return False
    return not (isinstance(data, (list, tuple)) and all(_is_path(d) for d in data))


def _data_as_file(kwargs: dict, args: Any, command: str, listed: bool = False) -> dict:
    """kwargs with in-memory `data` written to OUT/input.jsonl (before the argument dataclass
    checks `data`, which is a path there); the records are read back from it like any file."""
    data = kwargs.get("data")
    if not _in_memory(data):
        return kwargs
    out = kwargs.get("out") or getattr(args, "out", "")
    if not out:
        raise PaserError(f"{command} needs --out DIR")
    rows = []
    for i, r in enumerate(data):
        if isinstance(r, Record):
            rows.append(selected_row(r))  # the record as its user gave it: read back to the same record
        elif isinstance(r, dict):
            rows.append(r)
        else:
            raise PaserError(f"{command}: data item {i} is a {type(r).__name__}; give dicts, Records, a datasets.Dataset or a file path")
    path = Path(out) / "input.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return {**kwargs, "data": [str(path)] if listed else str(path)}


def prune(args: PruneArgs | None = None, **kwargs) -> PruneResult:
    """Prune a model and write a from_pretrained directory with pruning_report.json."""
    a = _coerce_args(PruneArgs, args, kwargs)
    _need(a.out, "--out DIR", "prune")
    return stages.prune(a)


def select(args: SelectArgs | None = None, **kwargs) -> SelectionResult:
    """Score and select recovery data; writes selected.jsonl, scores.parquet, report.json, plots."""
    kwargs = _data_as_file(kwargs, args, "select", listed=True)
    a = _coerce_args(SelectArgs, args, kwargs)
    _need(a.out, "--out DIR", "select")
    return stages.select(a)


def estimate(args: SelectArgs | None = None, **kwargs) -> Estimate:
    """Predict tokens, forward passes, time and peak memory of `select` before running it."""
    return estimate_selection(_coerce_args(SelectArgs, args, kwargs))


def recover(args: RecoverArgs | None = None, **kwargs) -> RecoveryResult:
    """LoRA recovery on selected records; writes adapter/, merged/ and logs."""
    a = _coerce_args(RecoverArgs, args, _data_as_file(kwargs, args, "recover"))
    _need(a.model, "--model PRUNED", "recover")
    _need(a.data, "--data FILE", "recover")
    _need(a.out, "--out DIR", "recover")
    return stages.recover(a)


def evaluate(args: EvaluateArgs | None = None, *, tokenizer: Any = None, **kwargs) -> EvaluationResult:
    """Perplexity and zero-shot accuracy; writes a results JSON with provenance.

    `model` may also be a model in memory: a `paser.io.models.LoadedModel`, or a transformers
    causal LM with its `tokenizer=` (fingerprinted from its weights, so cached task results are
    reused only for the same weights)."""
    loaded = None
    model = kwargs.get("model")
    if model is not None and not _is_path(model):
        loaded = _loaded(model, tokenizer)
        kwargs = {**kwargs, "model": loaded.name}
    a = _coerce_args(EvaluateArgs, args, kwargs)
    _need(a.model, "--model", "evaluate")
    return stages.evaluate(a, loaded)


def _loaded(model: Any, tokenizer: Any) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise PaserError(f"evaluate: model must be a path, an embedded name, a LoadedModel or a torch module, got a {type(model).__name__}")
    if tokenizer is None:
        raise PaserError("evaluate: a model in memory needs its tokenizer= as well")
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return LoadedModel(model, tokenizer, "", fingerprint_model(model), f"{name} (in memory)")


def pipeline(config: str, out: str | None = None) -> str:
    """Prune, select, recover, evaluate and report, from one YAML file (see paser.pipeline)."""
    return run_pipeline(config, out=out)
