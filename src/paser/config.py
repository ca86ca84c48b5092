"""Argument dataclasses with help text; a YAML file plus command-line overrides fill them.

Each command's options live in one dataclass, so the CLI, the YAML file and the Python API
accept the same names. `field(metadata={"help": ...})` is the single source of help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paser.errors import InputError


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneArgs:
    model: str = _f("smollm2-135m", "model to prune: embedded name, local HF directory, or hub id")
    method: str = _f("wanda", "magnitude | wanda | sparsegpt | structured", choices=("magnitude", "wanda", "sparsegpt", "structured"))
    sparsity: float = _f(0.5, "fraction of prunable weights (or of heads/channels for structured) to remove")
    pattern: str | None = _f(None, "N:M semi-structured pattern, e.g. 2:4 (magnitude, wanda, sparsegpt)")
    out: str = _f("", "output directory (loadable with from_pretrained)")
    calibration: str | None = _f(None, "calibration text: a .txt file or a record file; default: the embedded pool")
    n_calibration: int = _f(32, "number of calibration samples")
    importance: str = _f("auto", "structured importance: auto | activation | taylor | magnitude (auto = activation, measured best)", choices=("auto", "activation", "taylor", "magnitude"))
    prune_heads: bool = _f(False, "structured: also remove whole KV-head groups (measured: costs more than MLP channels on SmolLM2)")
    reconstruct: bool = _f(False, "structured: least-squares refit of o_proj/down_proj on the kept channels")
    ppl_tokens: int = _f(4096, "WikiText-2 tokens for the before/after perplexity in the report (0 = skip)")
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (runs code from the file: trusted files only)")
    seed: int = _f(0, "random seed")


@dataclass
class SelectArgs:
    original: str = _f("smollm2-135m", "the original (unpruned) model M_o")
    pruned: str = _f("", "the pruned model M_p (same tokenizer as the original)")
    data: list[str] = _f([], "instruction pool file(s): Alpaca JSON/JSONL(.gz), ShareGPT, parquet, saved HF dataset; default: the embedded pool")
    budget: str = _f("0.1", "how many records to select: a fraction of the pool (0.1) or a count (5000)")
    out: str = _f("", "output directory")
    method: str = _f(
        "paser",
        "paser | random | uniform | ifd | instruction_mining | nuggets | full",
        choices=("paser", "random", "uniform", "ifd", "instruction_mining", "nuggets", "full"),
    )
    seed: int = _f(0, "random seed")
    limit: int | None = _f(None, "use only the first N records of the pool after a seeded shuffle (quick runs)")
    limit_seed: int | None = _f(None, "seed of the --limit shuffle (default: --seed); fix it to compare seeds on one pool")
    k: int | None = _f(None, "number of semantic clusters (default: chosen by the eigengap criterion)")
    k_min: int = _f(8, "smallest K the automatic criterion may choose")
    k_max: int = _f(24, "largest K the automatic criterion may choose")
    ntm_threshold: float | None = _f(None, "NTM strictness: share of a candidate's known concept pairs allowed to be non-adjacent (0 = the reference rule; default 0.75, chosen by benchmarks/ntm_threshold.py)")
    ntm_max_phrases: int = _f(5, "NTM: key phrases per sample (measured: more phrases make the rule reject ordinary diverse samples)")
    ntm_multiword_only: bool = _f(True, "NTM: keep only multi-word key phrases as concepts")
    ntm: bool = _f(True, "negative-transfer mitigation (--no-ntm turns it off)")
    template: str = _f("alpaca", "prompt template shared by scoring and recovery: alpaca | chat | plain")
    cutoff: int = _f(256, "maximum tokens per sample (prompt + response)")
    max_batch_tokens: int = _f(4096, "token budget of one scoring batch")
    skip_invalid: bool = _f(False, "skip malformed records (reported with counts) instead of stopping")
    cache_dir: str | None = _f(None, "cache directory (default: $PASER_CACHE or ~/.cache/paser)")
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (trusted files only)")
    plots: bool = _f(True, "write PNG plots of the clusters and budgets")
    estimate: bool = _f(True, "print a cost estimate (tokens, time, memory) before scoring")


@dataclass
class RecoverArgs:
    model: str = _f("", "the pruned model to recover")
    data: str = _f("", "selected records (selected.jsonl from `paser select`, or any record file)")
    out: str = _f("", "output directory: adapter/, merged/, logs")
    template: str = _f("alpaca", "prompt template (must match the one used for selection)")
    cutoff: int = _f(256, "maximum tokens per sample")
    r: int = _f(8, "LoRA rank")
    alpha: int = _f(16, "LoRA alpha")
    dropout: float = _f(0.05, "LoRA dropout")
    lr: float = _f(1e-4, "learning rate")
    epochs: float = _f(2, "training epochs")
    batch_size: int = _f(4, "per-device batch size")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    val_fraction: float = _f(0.0, "share of the data held out for a validation loss curve")
    save_steps: int = _f(100, "save a checkpoint every N optimizer steps (a killed run resumes from the last one)")
    save_minutes: float = _f(10.0, "also save a checkpoint when this many minutes have passed since the last one (0: off)")
    resume: bool = _f(True, "resume from the last checkpoint of the same run (--no-resume starts over)")
    seed: int = _f(0, "random seed")
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (trusted files only)")
    skip_invalid: bool = _f(False, "skip malformed records instead of stopping")
    objective: str = _f("sft", "training objective: sft (cross-entropy on the responses) | kd (T^2 * KL(teacher || student) on the same response tokens) | sft+kd ((1 - kd_weight) * CE + kd_weight * T^2 * KL)", choices=("sft", "kd", "sft+kd"))
    kd_weight: float = _f(0.5, "sft+kd: weight w of the distillation term, loss = (1 - w) * CE + w * T^2 * KL (0 = sft, 1 = kd)")
    kd_temperature: float = _f(1.0, "kd: temperature T of both softmaxes; the KL term is scaled by T^2")
    kd_topk: int = _f(64, "kd: teacher tokens kept per position; the rest is one tail bucket, so the KL is exact over k + 1 buckets (64 chosen by benchmarks/kd_topk.py)")
    teacher: str = _f("smollm2-135m", "kd: the original, unpruned model whose next-token distribution is distilled (embedded name or directory)")
    save_dtype: str = _f("auto", "dtype of merged/: auto (the model's own, from its config.json) | float32 | bfloat16 | float16", choices=("auto", "float32", "bfloat16", "float16"))
    cache_dir: str | None = _f(None, "kd: where the teacher's top-k cache lives, under teacher/ (default: $PASER_CACHE or ~/.cache/paser)")
    report_to: str = _f("none", "experiment logging of the Trainer: none | tensorboard (logs in OUT/tensorboard) | wandb (offline unless WANDB_MODE is set)", choices=("none", "tensorboard", "wandb"))


@dataclass
class EvaluateArgs:
    model: str = _f("", "model directory, embedded name, or LoRA adapter directory")
    tasks: str = _f("wikitext2,ptb,commonsense", "comma-separated: wikitext2, ptb, heldout, boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; or all / commonsense")
    limit: int | None = _f(None, "items per task: a fixed, seeded subset so that runs compare")
    seed: int = _f(0, "seed of the --limit subset")
    out: str = _f("results.json", "results file")
    ppl_window: int = _f(512, "perplexity window (tokens)")
    ppl_tokens: int = _f(16384, "perplexity tokens (a fixed slice from the start of the corpus)")
    batch_size: int = _f(8, "batch size")
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (trusted files only)")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    if _is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One --option per field. Defaults are left to the dataclass (SUPPRESS), so a YAML value
    is only overridden by options the user actually typed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = f"{help_} (default: {default})" if default not in ("", [], None) else help_
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS, metavar="VALUE", help=shown + " (repeatable)")
        else:
            kw: dict[str, Any] = {}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            parser.add_argument(flag, dest=f.name, type=tp, default=argparse.SUPPRESS, help=shown, **kw)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "no such configuration file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(str(p), f"invalid YAML: {getattr(e, 'problem', e)}", line=(mark.line + 1) if mark else None) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(str(p), "expected a mapping of option: value at the top level")
    return data


def _yaml_key_line(path: str | Path | None, key: str) -> int | None:
    if not path:
        return None
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith(f"{key}:"):
            return i
    return None


def build_args(cls: type, values: dict, source: str | Path | None = None) -> Any:
    """Make a `cls` from a dict (YAML or CLI), checking names and types with clear errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, val in values.items():
        k = key.replace("-", "_")
        if k not in names:
            raise InputError(str(source or "arguments"), f"unknown option; known: {', '.join(sorted(names))}", line=_yaml_key_line(source, key), field=key)
        kwargs[k] = _coerce(val, hints[k], source, key)
    return cls(**kwargs)


def _coerce(val: Any, tp: Any, source: Any, key: str) -> Any:
    if val is None:
        if _is_optional(tp):
            return None
        raise InputError(str(source or "arguments"), "a value is required", line=_yaml_key_line(source, key), field=key)
    base = _base_type(tp)
    try:
        if typing.get_origin(base) is list:
            return [str(v) for v in (val if isinstance(val, list) else [val])]
        if base is bool:
            if isinstance(val, bool):
                return val
            raise ValueError
        if base is str:
            return str(val)
        return base(val)
    except (TypeError, ValueError):
        raise InputError(
            str(source or "arguments"), f"expected {getattr(base, '__name__', base)}, got {val!r}", line=_yaml_key_line(source, key), field=key
        ) from None
