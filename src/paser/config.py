"""Argument dataclasses with help text; a YAML file plus command-line overrides fill them.

Each command's options live in one dataclass, so the CLI, the YAML file and the Python API
accept the same names. `field(metadata={"help": ...})` is the single source of help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from paser.errors import InputError, OptionError, PaserError
from paser.io.templates import TEMPLATES
from paser.recover.objectives import option_help, recovery_objectives
from paser.select.registry import allocation_rules, choices_help, rankings, selection_methods


# ----------------------------------------------------------------------------- declared rules
#
# Every option declares its rules once, in its field: `_f(default, help, min=..., max=...,
# gt=..., lt=..., choices=..., check=...)`. `check_field` enforces them (and the declared
# type) for every way an option arrives: a YAML file and the command line (`build_args`,
# which can name the file and line) and the Python API (each dataclass's __post_init__). A
# field added later with `_f(..., min=1)` is checked without further code.


def _f(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    choices: tuple | Callable[[], Any] | None = None,
    check: Callable[[Any], None] | None = None,
    **kw,
) -> Any:
    """A dataclass field with help text and its rules: min/max (inclusive), gt/lt (exclusive),
    choices (allowed values, or a callable returning them), check (a callable that raises
    ValueError with the reason)."""
    rules = {k: v for k, v in (("min", min), ("max", max), ("gt", gt), ("lt", lt), ("choices", choices), ("check", check)) if v is not None}
    meta = {"help": help, **kw, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _check_budget(value: str) -> None:
    # The budget's own parser, on a pool too large to cap it: the same rule `select` applies
    # later (and the token form the budget module may accept), checked before any work.
    from paser.select.budget import resolve_budget

    try:
        resolve_budget(value, 10**9)
    except (ValueError, PaserError) as e:
        raise ValueError(str(e)) from None


def _check_tasks(value: str) -> None:
    from paser.evaluate.runner import resolve_tasks

    try:
        resolve_tasks([t.strip() for t in str(value).split(",") if t.strip()])
    except PaserError as e:
        raise ValueError(str(e)) from None


def _check_pattern(value: str) -> None:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"expected N:M with 0 < N < M (e.g. 2:4), got {value!r}")


class _Validated:
    """Checks every field against its declared type and rules when the dataclass is made, so
    the Python API gets the same refusals as the command line."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, check_field(f, hints[f.name], value))
            except ValueError as e:
                raise OptionError(f.name, str(e)) from None
        for name, message in self._together():
            raise OptionError(name, message)

    def _together(self) -> list[tuple[str, str]]:
        """Rules across fields: (option, reason) for each one broken."""
        return []


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_field(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """`value` converted to the field's type and checked against its rules; ValueError (with
    the reason and the allowed values) otherwise."""
    value = _coerce_type(value, hint)
    if value is None:
        return None
    m = f.metadata
    choices = field_choices(f)
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for v in items:
            if v not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))} (got {_fmt(v)})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi, gt, lt = m.get("min"), m.get("max"), m.get("gt"), m.get("lt")
        bad = (lo is not None and value < lo) or (hi is not None and value > hi) or (gt is not None and value <= gt) or (lt is not None and value >= lt)
        if bad:
            raise ValueError(f"must be {_range_text(lo, hi, gt, lt)} (got {value})")
    if m.get("check") is not None:
        m["check"](value)
    return value


def field_choices(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values; `choices` may be a callable, asked each time, so that an entry
    registered after import (a registry's) is a valid choice too."""
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else c


def select_methods() -> tuple:
    """The selection method names `--method` accepts (the pipeline's `methods` too)."""
    return field_choices(next(f for f in dataclasses.fields(SelectArgs) if f.name == "method")) or ()


def _range_text(lo, hi, gt, lt) -> str:
    low = f">= {lo}" if lo is not None else (f"> {gt}" if gt is not None else "")
    high = f"<= {hi}" if hi is not None else (f"< {lt}" if lt is not None else "")
    return " and ".join(p for p in (low, high) if p)


def _coerce_type(val: Any, tp: Any) -> Any:
    """The value as the declared type, refusing lossy conversions: a bool is not a number
    (YAML reads yes/no/on/off as booleans), 20.7 is not an integer, text is not a list item
    of a dict. Types other than bool/int/float/str/list[str] pass through unchecked."""
    if val is None:
        if _is_optional(tp):
            return None
        raise ValueError("a value is required")
    base = _base_type(tp)
    if base is bool:
        if isinstance(val, bool):
            return val
        raise ValueError(f"expected true or false, got {_fmt(val)}")
    if base is int:
        if isinstance(val, bool):
            raise ValueError(f"expected an integer, got {val} (YAML reads yes/no/on/off as true/false)")
        if isinstance(val, (int, np.integer)):
            return int(val)
        if isinstance(val, (float, np.floating)) and math.isfinite(val) and float(val).is_integer():
            return int(val)
        if isinstance(val, str) and re.fullmatch(r"\s*[+-]?\d+\s*", val):
            return int(val)
        raise ValueError(f"expected an integer, got {_fmt(val)} (not rounded)" if isinstance(val, float) else f"expected an integer, got {_fmt(val)}")
    if base is float:
        if isinstance(val, bool):
            raise ValueError(f"expected a number, got {val} (YAML reads yes/no/on/off as true/false)")
        num: float | None = None
        if isinstance(val, (int, float, np.integer, np.floating)):
            num = float(val)
        elif isinstance(val, str):
            try:
                num = float(val)
            except ValueError:
                num = None
        if num is None:
            raise ValueError(f"expected a number, got {_fmt(val)}")
        if not math.isfinite(num):
            raise ValueError(f"must be a finite number (got {val})")
        return num
    if base is str:
        return _as_text(val)
    if typing.get_origin(base) is list:
        items = val if isinstance(val, (list, tuple)) else [val]
        return [_as_text(v) for v in items]
    return val


def _as_text(val: Any) -> str:
    if isinstance(val, str):
        return val
    if isinstance(val, os.PathLike):
        return os.fspath(val)
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return str(val)  # YAML reads `budget: 0.1` as a number; the option is text
    raise ValueError(f"expected text, got {_fmt(val)}")


def _pruning_methods() -> tuple[str, ...]:
    from paser.prune.methods import PRUNING_METHODS

    return tuple(PRUNING_METHODS)


def _pruning_help() -> str:
    from paser.prune.methods import PRUNING_METHODS

    return "; ".join(f"{m.name}: {m.help}" for m in PRUNING_METHODS.values())


@dataclass
class PruneArgs(_Validated):
    model: str = _f("smollm2-135m", "model to prune: embedded name, local HF directory, or hub id")
    method: str = _f("wanda", "pruning method: " + _pruning_help(), choices=_pruning_methods)
    sparsity: float = _f(0.5, "fraction of prunable weights (or of heads/channels for structured) to remove", min=0.0, lt=1.0)
    pattern: str | None = _f(None, "N:M semi-structured pattern, e.g. 2:4 (magnitude, wanda, sparsegpt)", check=_check_pattern)
    out: str = _f("", "output directory (loadable with from_pretrained)")
    calibration: str | None = _f(None, "calibration text: a .txt file or a record file; default: the embedded pool")
    n_calibration: int = _f(32, "number of calibration samples", min=1)
    importance: str = _f("auto", "structured importance: auto | activation | taylor | magnitude (auto = activation, measured best)", choices=("auto", "activation", "taylor", "magnitude"))
    prune_heads: bool = _f(False, "structured: also remove whole KV-head groups (measured: costs more than MLP channels on SmolLM2)")
    reconstruct: bool = _f(False, "structured: least-squares refit of o_proj/down_proj on the kept channels")
    ppl_tokens: int = _f(4096, "WikiText-2 tokens for the before/after perplexity in the report (0 = skip)", min=0)
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (runs code from the file: trusted files only)")
    seed: int = _f(0, "random seed", min=0)


@dataclass
class SelectArgs(_Validated):
    original: str = _f("smollm2-135m", "the original (unpruned) model M_o")
    pruned: str = _f("", "the pruned model M_p (same tokenizer as the original)")
    data: list[str] = _f([], "instruction pool file(s): Alpaca JSON/JSONL(.gz), ShareGPT, parquet, saved HF dataset; default: the embedded pool")
    budget: str = _f("0.1", "how much to select: a fraction of the pool's records (0.1), a record count (5000), or training tokens (32000tok: response tokens of one pass, as `paser recover` trains them)", check=_check_budget)
    out: str = _f("", "output directory")
    method: str = _f("paser", "selection method: " + choices_help(selection_methods()), choices=lambda: tuple(selection_methods()))
    allocation: str = _f("cds", "PASER's budget per cluster: " + choices_help(allocation_rules()), choices=lambda: tuple(allocation_rules()))
    tau: float = _f(1.0, "exponent of CDS in the `mass` allocation rule (0: stratified by cluster size)", min=0.0)
    ranking: str = _f("ies", "PASER's order within a cluster: " + choices_help(rankings()), choices=lambda: tuple(rankings()))
    scoring: str = _f("exhaustive", "PASER's degradation scoring: exhaustive (every record) or adaptive (a stratified sample per cluster, then a kNN-guided search for each cluster's top n_k; record or token budgets, any --allocation)", choices=("exhaustive", "adaptive"))
    confidence: float = _f(0.9, "adaptive scoring: confidence of the CDS intervals and of the stopping rule (expected recall of each cluster's top n_k; 1 scores everything)", gt=0.0, max=1.0)
    seed: int = _f(0, "random seed", min=0)
    limit: int | None = _f(None, "use only the first N records of the pool after a seeded shuffle (quick runs)", min=1)
    limit_seed: int | None = _f(None, "seed of the --limit shuffle (default: --seed); fix it to compare seeds on one pool", min=0)
    k: int | None = _f(None, "number of semantic clusters (default: chosen by the eigengap criterion)", min=1)
    k_min: int = _f(8, "smallest K the automatic criterion may choose", min=1)
    k_max: int = _f(24, "largest K the automatic criterion may choose", min=1)
    ntm_threshold: float | None = _f(None, "NTM strictness: share of a candidate's known concept pairs allowed to be non-adjacent (0 = the reference rule; default 0.75, chosen by benchmarks/ntm_threshold.py)", min=0.0, max=1.0)
    ntm_max_phrases: int = _f(5, "NTM: key phrases per sample (measured: more phrases make the rule reject ordinary diverse samples)", min=1)
    ntm_multiword_only: bool = _f(True, "NTM: keep only multi-word key phrases as concepts")
    ntm: bool = _f(True, "negative-transfer mitigation (--no-ntm turns it off)")
    template: str = _f("alpaca", "prompt template shared by scoring and recovery: " + " | ".join(TEMPLATES), choices=TEMPLATES)
    # 2 = one prompt token + one response token, the least encode_example can cut a pair to.
    cutoff: int = _f(256, "maximum tokens per sample (prompt + response)", min=2)
    max_batch_tokens: int = _f(4096, "token budget of one scoring batch", min=1)
    skip_invalid: bool = _f(False, "skip malformed records (reported with counts) instead of stopping")
    cache_dir: str | None = _f(None, "cache directory (default: $PASER_CACHE or ~/.cache/paser)")
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (trusted files only)")
    plots: bool = _f(True, "write PNG plots of the clusters and budgets")
    estimate: bool = _f(True, "print a cost estimate (tokens, time, memory) before scoring")
    encoder: str = _f("all-MiniLM-L6-v2", "sentence encoder for the S2RIC clusters: a local sentence-transformers folder, or all-MiniLM-L6-v2 (embedded)")
    selected_format: str = _f(
        "records",
        "how selected.jsonl is written: records (each record as it came in: the same fields, ids, messages; "
        "`paser recover` reads it back), prompt-completion or messages (TRL SFTTrainer's formats)",
        choices=("records", "prompt-completion", "messages"),
    )

    def _together(self) -> list[tuple[str, str]]:
        if self.k_min > self.k_max:
            return [("k_min", f"must be <= --k-max ({self.k_min} > {self.k_max})")]
        return []


@dataclass
class RecoverArgs(_Validated):
    model: str = _f("", "the pruned model to recover")
    data: str = _f("", "selected records (selected.jsonl from `paser select`, or any record file)")
    out: str = _f("", "output directory: adapter/, merged/, logs")
    template: str = _f("alpaca", "prompt template (must match the one used for selection): " + " | ".join(TEMPLATES), choices=TEMPLATES)
    cutoff: int = _f(256, "maximum tokens per sample", min=2)
    r: int = _f(8, "LoRA rank", min=1)
    alpha: int = _f(16, "LoRA alpha", min=1)
    dropout: float = _f(0.05, "LoRA dropout", min=0.0, lt=1.0)
    lr: float = _f(1e-4, "learning rate", gt=0.0)
    epochs: float = _f(2, "training epochs", gt=0.0)
    batch_size: int = _f(4, "per-device batch size", min=1)
    grad_accum: int = _f(1, "gradient accumulation steps", min=1)
    max_steps: int | None = _f(None, "stop after this many optimizer steps", min=1)
    val_fraction: float = _f(0.0, "share of the data held out for a validation loss curve", min=0.0, lt=1.0)
    save_steps: int = _f(100, "save a checkpoint every N optimizer steps (a killed run resumes from the last one)", min=1)
    save_minutes: float = _f(10.0, "also save a checkpoint when this many minutes have passed since the last one (0: off)", min=0.0)
    resume: bool = _f(True, "resume from the last checkpoint of the same run (--no-resume starts over)")
    seed: int = _f(0, "random seed", min=0)
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (trusted files only)")
    skip_invalid: bool = _f(False, "skip malformed records instead of stopping")
    objective: str = _f("sft", "training objective: " + choices_help(recovery_objectives()), choices=lambda: tuple(recovery_objectives()))
    kd_weight: float = _f(0.5, option_help("kd_weight"), min=0.0, max=1.0)
    kd_temperature: float = _f(1.0, option_help("kd_temperature"), gt=0.0)
    kd_topk: int = _f(64, option_help("kd_topk"), min=1)
    teacher: str = _f("smollm2-135m", option_help("teacher"))
    save_dtype: str = _f("auto", "dtype of merged/: auto (the model's own, from its config.json) | float32 | bfloat16 | float16", choices=("auto", "float32", "bfloat16", "float16"))
    cache_dir: str | None = _f(None, option_help("cache_dir"))
    report_to: str = _f("none", "experiment logging of the Trainer: none | tensorboard (logs in OUT/tensorboard) | wandb (offline unless WANDB_MODE is set)", choices=("none", "tensorboard", "wandb"))


@dataclass
class EvaluateArgs(_Validated):
    model: str = _f("", "model directory, embedded name, or LoRA adapter directory")
    tasks: str = _f("wikitext2,ptb,heldout,commonsense", "comma-separated: wikitext2, ptb, heldout (response loss), heldout_jsd (JSD to --reference on the held-out responses), boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; or all / commonsense; or lm_eval:NAME for any lm-evaluation-harness task whose data is on this machine (e.g. lm_eval:mmlu, lm_eval:paser_arc_easy)", check=_check_tasks)
    reference: str = _f("smollm2-135m", "heldout_jsd: the original (unpruned) model the evaluated model is compared with")
    heldout_split: str = _f("test", "held-out records: test (the 600 never in the pool) or dev (the dev split, for tuning)", choices=("test", "dev"))
    limit: int | None = _f(None, "items per task: a fixed, seeded subset so that runs compare", min=1)
    seed: int = _f(0, "seed of the --limit subset", min=0)
    out: str = _f("results.json", "results file")
    ppl_window: int = _f(512, "perplexity window (tokens)", min=2)
    ppl_tokens: int = _f(16384, "perplexity tokens (a fixed slice from the start of the corpus)", min=1)
    batch_size: int | None = _f(None, "batch size (default: 8 on a CPU, 32 on a GPU)", min=1)
    allow_pickle: bool = _f(False, "allow loading pickled checkpoints (trusted files only)")
    include_path: str | None = _f(None, "directory of your own lm-eval task YAMLs for lm_eval:NAME tasks (as lm_eval --include_path)")


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
                kw["choices"] = field_choices(f)
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
    """Make a `cls` from a dict (YAML or CLI), checking names, types and declared rules.

    With `source` (a YAML file) an error names the file, line and key; without it, the
    option as --flag.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, val in values.items():
        k = str(key).replace("-", "_")
        if k not in fields:
            raise InputError(str(source or "arguments"), f"unknown option; known: {', '.join(sorted(fields))}", line=_yaml_key_line(source, key), field=key)
        try:
            kwargs[k] = check_field(fields[k], hints[k], val)
        except ValueError as e:
            raise _option_error(k, str(e), source, key) from None
    try:
        return cls(**kwargs)
    except OptionError as e:  # a rule across fields: point at the option it names
        if source and not e.path:
            raise _option_error(e.option, e.reason, source, e.option) from None
        raise


def _option_error(name: str, message: str, source: str | Path | None, key: str) -> OptionError:
    if source:
        return OptionError(key, message, path=str(source), line=_yaml_key_line(source, key))
    return OptionError(name, message)


# ----------------------------------------------------------------------------- output paths

# Per command: the --out kind ("dir", "file"; "whole-dir" when writing replaces the directory
# as a whole, as `prune` does) and the options naming inputs it must not overwrite. Checked
# by the CLI (and `run_prune`) before any model loads.
_OUTPUTS = {
    "prune": ("whole-dir", ("model", "calibration")),
    "select": ("dir", ("original", "pruned")),
    "recover": ("dir", ("model", "data")),
    "evaluate": ("file", ("model",)),
}


def check_outputs(command: str, args: Any) -> None:
    """Refuse an --out that cannot work, before the work starts: a file where a directory is
    meant (or the reverse), a place that cannot be written, or one of the command's inputs."""
    spec = _OUTPUTS.get(command)
    out = getattr(args, "out", None)
    if spec is None or not out:
        return
    kind, inputs = spec
    check_output_path(out, kind, [getattr(args, name, None) for name in inputs])


def check_output_path(out: str | os.PathLike, kind: str, inputs: list[Any] = ()) -> None:
    from paser.errors import FileError

    whole = kind == "whole-dir"
    kind = "dir" if whole else kind
    p = Path(out).expanduser()
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise FileError(p, "--out is an existing file; it must name a directory")
        if kind == "file" and p.is_dir():
            raise FileError(p, "--out is a directory; it must name a file (e.g. results.json)")
    here = p.resolve()
    for inp in inputs:
        if not inp or not isinstance(inp, (str, os.PathLike)) or not Path(inp).expanduser().exists():
            continue
        src = Path(inp).expanduser().resolve()
        # An output replaced as a whole must neither be an input nor contain one.
        if here == src or (whole and here in src.parents):
            raise FileError(p, f"--out would overwrite the input {inp}; choose another output directory")
    _check_writable(p if kind == "dir" else p.parent, p)


def _check_writable(target: Path, out: Path) -> None:
    from paser.errors import FileError

    d = target
    while not d.exists() and d != d.parent:
        d = d.parent  # the nearest existing ancestor is where the directories will be made
    if not d.is_dir():
        raise FileError(out, f"cannot be created: {d} is a file, not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        ro = _read_only_fs(d)
        raise FileError(out, f"cannot be written: {d} is on a read-only file system" if ro else f"cannot be written: no write permission in {d}")


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
