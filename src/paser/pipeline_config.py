"""The experiment config of `paser pipeline`, checked whole before the first stage runs.

The `prune:`, `select:`, `recover:` and `evaluate:` sections are the commands' own argument
dataclasses (paser.config), made once here: their options, rules and defaults are those of
`paser prune`, `paser select`, ... Each section also keeps its options as the file wrote them,
because stage and archive keys are made of those: a default never enters a key, so a default
added to a dataclass later leaves every cached stage and archived row valid.

Every error is one line naming the file, the line and the key, so that a typo fails in a
second rather than after an hour of pruning.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from paser.config import EvaluateArgs, PruneArgs, RecoverArgs, SelectArgs, _check_budget, _yaml_key_line, build_args, load_yaml
from paser.errors import InputError, OptionError, PaserError
from paser.evaluate.runner import resolve_tasks
from paser.select.registry import selection_methods

A = TypeVar("A")


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# The file's keys and what each means when absent, in the order results.json records them.
DEFAULTS: dict[str, Any] = {
    "out": "runs/experiment",
    "original": "smollm2-135m",
    "pruned": None,  # an existing pruned model: skips the prune stage
    # An absent prune or evaluate section is written as these options, which are part of the
    # stage and archive keys of every config that leaves the section out. The values are the
    # dataclasses' own, except the evaluation limit: 50 items per task keeps a config without
    # an evaluate section a quick run (`paser evaluate` evaluates every item).
    "prune": {"method": _default(PruneArgs, "method"), "sparsity": _default(PruneArgs, "sparsity")},
    "data": [],  # pool files; empty = the embedded pool
    "pool_limit": None,
    "pool_seed": None,  # seed of the pool_limit subset; default: the first seed, one pool for all seeds
    "budgets": ["0.1"],
    # Each entry: a method name, or a variant {label: NAME, method: M, <select options>...,
    # recover: {<recover options>}} (e.g. {label: paser-mass, method: paser, allocation: mass}).
    "methods": ["paser", "random", "uniform"],
    "seeds": [0],
    "select": {},  # SelectArgs options
    "recover": {},  # RecoverArgs options
    "evaluate": {"tasks": _default(EvaluateArgs, "tasks"), "limit": 50},  # EvaluateArgs options, and limits: {task: n}
    "include_dense": True,
    "include_unrecovered": True,
    "cache_dir": None,
    # A results archive (see paser.io.archive): finished rows are kept there as small files and
    # reused by any later run with the same archive, on any machine; commit it to carry a long
    # experiment across machines.
    "archive": None,
}
SECTIONS = ("prune", "select", "recover", "evaluate")
_LISTS = ("budgets", "methods", "seeds", "data")

# Options of a section that the pipeline sets itself, and from what.
_SET_BY_PIPELINE = {
    "prune": {"model": "original", "out": "the stage directory"},
    "select": {"original": "original", "pruned": "the pruned model", "data": "data", "budget": "budgets", "method": "methods",
               "seed": "seeds", "limit": "pool_limit", "cache_dir": "cache_dir", "out": "the stage directory"},
    "recover": {"model": "the pruned model", "data": "the unit's selection", "seed": "seeds", "out": "the stage directory"},
    "evaluate": {"model": "each row's model", "out": "eval/ in out"},
}


@dataclass(frozen=True)
class Section(Generic[A]):
    """One stage's options: as the file wrote them, and as the stage's argument dataclass."""

    written: dict  # what stage and archive keys are made of
    args: A  # what the stage runs with (the dataclass's defaults for what the file leaves out)


@dataclass(frozen=True)
class MethodEntry:
    """One entry of the config's `methods`: a selection method, or a named variant of one with
    its own select and recover options (what the table calls it is `label`)."""

    label: str
    method: str
    select: dict = field(default_factory=dict)  # the variant's own select options, as written
    recover: dict = field(default_factory=dict)  # and recover options
    # The section's options with the variant's on top, as the argument dataclasses (set at load).
    select_args: SelectArgs | None = field(default=None, compare=False, repr=False)
    recover_args: RecoverArgs | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class PipelineConfig:
    """An experiment, validated; made by `load_pipeline_config`."""

    out: str
    original: str
    pruned: str | None
    prune: Section[PruneArgs]  # its model is `original`
    data: list[str]
    pool_limit: int | None
    pool_seed: int | None
    budgets: tuple[str, ...]
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...]
    select: Section[SelectArgs]
    recover: Section[RecoverArgs]
    evaluate: Section[EvaluateArgs]  # its reference is `original` unless the section names another
    limits: dict[str, int | None]  # evaluate.limits: items per task, where it differs from evaluate.limit
    include_dense: bool
    include_unrecovered: bool
    cache_dir: str | None
    archive: str | None
    written: dict = field(repr=False)  # the file with every key present (DEFAULTS for the absent ones)

    def as_written(self) -> dict:
        """The config as results.json records it."""
        return copy.deepcopy(self.written)


def load_pipeline_config(path: str | Path, out: str | None = None) -> PipelineConfig:
    """The experiment config, every key checked before the first stage runs: section types,
    method names, budgets, seeds, evaluation tasks and every nested option (with file and
    line). `out` replaces the file's `out`."""
    w = _read(path, out)
    _check_scalars(w, path)
    methods = _method_entries(w["methods"], path)
    _check_lists(w, path)
    limits = _limits(w["evaluate"].get("limits"), path)
    select = _section(SelectArgs, "select", w["select"], path)
    recover = _section(RecoverArgs, "recover", w["recover"], path)
    prune = _section(PruneArgs, "prune", w["prune"], path, model=w["original"])
    ev_options = {k: v for k, v in w["evaluate"].items() if k != "limits"}
    evaluate = _section(EvaluateArgs, "evaluate", w["evaluate"], path, options=ev_options, reference=w["original"])
    methods = tuple(_with_args(e, select, recover, path) for e in methods)
    if select.args.selected_format != "records" or any(e.select_args.selected_format != "records" for e in methods):
        # recovery reads selected.jsonl back as records; a TRL format would be templated twice
        raise InputError(str(path), "the pipeline recovers from selected.jsonl: selected_format must be records",
                         line=_yaml_key_line(path, "selected_format"), field="selected_format")
    return PipelineConfig(
        out=w["out"], original=w["original"], pruned=w["pruned"], prune=prune, data=list(w["data"]),
        pool_limit=w["pool_limit"], pool_seed=w["pool_seed"], budgets=tuple(str(b) for b in w["budgets"]),
        methods=methods, seeds=tuple(w["seeds"]), select=select, recover=recover, evaluate=evaluate, limits=limits,
        include_dense=w["include_dense"], include_unrecovered=w["include_unrecovered"], cache_dir=w["cache_dir"],
        archive=w["archive"], written=w,
    )


def _bad(path: str | Path, key: str, message: str) -> OptionError:
    return OptionError(key, message, path=str(path), line=_yaml_key_line(path, key))


def _read(path: str | Path, out: str | None) -> dict:
    """The file's mapping with every key present, in DEFAULTS' order: known keys only, each
    section a mapping ({} when empty), each list key a list."""
    raw = load_yaml(path)
    for key in raw:
        if key not in DEFAULTS:
            raise InputError(str(path), f"unknown key; known: {', '.join(sorted(DEFAULTS))}", line=_yaml_key_line(path, key), field=key)
    for key in SECTIONS:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise _bad(path, key, f"expected a section of option: value pairs, got {raw[key]!r}")
        if key in raw and raw[key] is None:
            raw[key] = {}
    for key in ("out", "original", "pruned", "archive", "cache_dir"):
        v = raw.get(key)
        if v is not None and not isinstance(v, str):
            what = "a model path or name" if key in ("original", "pruned") else "a directory path"
            raise _bad(path, key, f"expected {what}, got {v!r}")
    for key in ("include_dense", "include_unrecovered"):
        if key in raw and not isinstance(raw[key], bool):
            raise _bad(path, key, f"expected true or false, got {raw[key]!r}")
    for key in _LISTS:
        if key in raw and not isinstance(raw[key], list):
            raw[key] = [raw[key]]
        if key in raw and not raw[key] and key != "data" and not (key == "methods" and _reference_rows(raw)):
            # `methods: []` with the dense or unrecovered row is a run that only measures the
            # damage (benchmarks/verdict.py --experiment damage); with neither it would do nothing.
            raise _bad(path, key, "the list is empty" + (" (and include_dense and include_unrecovered are false: nothing to run)" if key == "methods" else ""))
    written = {**copy.deepcopy(DEFAULTS), **raw}
    if out:
        written["out"] = out
    return written


def _reference_rows(raw: dict) -> bool:
    return raw.get("include_dense", DEFAULTS["include_dense"]) or raw.get("include_unrecovered", DEFAULTS["include_unrecovered"])


def _check_scalars(w: dict, path: str | Path) -> None:
    for key, least in (("pool_limit", 1), ("pool_seed", 0)):
        v = w[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise _bad(path, key, f"expected an integer >= {least}, got {v!r}")


def _method_entries(methods: list, path: str | Path) -> list[MethodEntry]:
    """Each `methods` entry: a known method's name, or a mapping with a label and a known
    method (the rest of it select options, and `recover:` recover options); labels unique."""
    known = selection_methods()
    entries = []
    for m in methods:
        if isinstance(m, dict) and "method" in m and "label" in m:
            rec = m.get("recover") or {}
            if not isinstance(rec, dict):
                raise InputError(str(path), f"{m['label']}: recover must be a mapping of options", line=_yaml_key_line(path, "methods"), field="methods")
            opts = {k: v for k, v in m.items() if k not in ("label", "method", "recover")}
            entry = MethodEntry(str(m["label"]), m["method"], opts, dict(rec))
        elif isinstance(m, str):
            entry = MethodEntry(m, m)
        else:
            raise InputError(str(path), f"a methods entry is a method name or a mapping with label and method, got {m!r}",
                             line=_yaml_key_line(path, "methods"), field="methods")
        if not isinstance(entry.method, str) or entry.method not in known:
            raise _bad(path, "methods", f"unknown method {entry.method!r}; choose from {', '.join(known)}")
        if any(e.label == entry.label for e in entries):
            raise InputError(str(path), f"two methods entries are labelled {entry.label!r}", line=_yaml_key_line(path, "methods"), field="methods")
        entries.append(entry)
    return entries


def _check_lists(w: dict, path: str | Path) -> None:
    for s in w["seeds"]:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise _bad(path, "seeds", f"a seed must be an integer >= 0, got {s!r}")
    for b in w["budgets"]:
        if isinstance(b, bool) or not isinstance(b, (int, float, str)):
            raise _bad(path, "budgets", f"a budget is a fraction or a count, got {b!r}")
        try:
            _check_budget(str(b))  # the budget module's own parser (counts, fractions, tokens)
        except ValueError as e:
            raise _bad(path, "budgets", str(e)) from None
    for d in w["data"]:
        if not isinstance(d, str):
            raise _bad(path, "data", f"expected file paths, got {d!r}")


def _limits(limits: Any, path: str | Path) -> dict[str, int | None]:
    """evaluate.limits: {task: items} (None: every item) for the tasks whose count differs
    from evaluate.limit."""
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise _bad(path, "limits", f"expected task: count pairs, got {limits!r}")
    for t, n in limits.items():
        try:
            resolve_tasks([str(t)])
        except PaserError as e:
            raise _bad(path, "limits", str(e)) from None
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise _bad(path, "limits", f"{t}: expected an integer >= 1, got {n!r}")
    return dict(limits)


def _section(cls: type, name: str, written: dict, path: str | Path, options: dict | None = None, **fallback) -> Section:
    """The section as `cls`: `options` (default: all it wrote), refusing the options the
    pipeline sets itself; `fallback` fills what the section leaves out where the pipeline's
    value differs from the command's default."""
    options = written if options is None else options
    _refuse_set_by_pipeline(name, options, path)
    args = build_args(cls, options, source=path)
    given = {k: v for k, v in fallback.items() if k not in options}
    return Section(written, dataclasses.replace(args, **given) if given else args)


def _refuse_set_by_pipeline(section: str, options: dict, path: str | Path, label: str | None = None) -> None:
    for key in options:
        source = _SET_BY_PIPELINE[section].get(str(key).replace("-", "_"))
        if source is not None:
            where = f"{label}: " if label else ""
            raise OptionError(str(key), f"{where}the pipeline sets this {section} option itself (from {source}); remove it",
                              path=str(path), line=_yaml_key_line(path, str(key)))


def _with_args(e: MethodEntry, select: Section, recover: Section, path: str | Path) -> MethodEntry:
    """The entry with its variant's options on top of the sections', validated."""
    _refuse_set_by_pipeline("select", e.select, path, e.label)
    _refuse_set_by_pipeline("recover", e.recover, path, e.label)
    sel = build_args(SelectArgs, {**select.written, **e.select, "method": e.method}, source=path)
    rec = build_args(RecoverArgs, {**recover.written, **e.recover}, source=path)
    return dataclasses.replace(e, select_args=sel, recover_args=rec)
