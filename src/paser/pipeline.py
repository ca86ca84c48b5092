"""`paser pipeline`: prune -> select (every method x budget x seed) -> recover -> evaluate -> report.

Every stage writes its output under a key made from everything that produced it, and a DONE
marker last; a stage whose marker exists is skipped. So adding a method or a budget to the
config and re-running does only the new work, a killed run resumes, and one failing stage is
recorded in the report without losing the others' results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paser.config import EvaluateArgs, RecoverArgs, SelectArgs, _yaml_key_line, build_args, load_yaml
from paser.errors import InputError, PaserError
from paser.io.archive import ResultArchive, archive_key
from paser.io.cache import atomic_write_json, default_cache_dir, stable_hash
from paser.recover.objectives import DEFAULT_OBJECTIVE, get_objective

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    out: str = "runs/experiment"
    original: str = "smollm2-135m"
    pruned: str | None = None  # an existing pruned model: skips the prune stage
    prune: dict = field(default_factory=lambda: {"method": "wanda", "sparsity": 0.5})
    data: list = field(default_factory=list)  # pool files; empty = the embedded pool
    pool_limit: int | None = None
    pool_seed: int | None = None  # seed of the pool_limit subset; default: the first seed, one pool for all seeds
    budgets: list = field(default_factory=lambda: ["0.1"])
    # Each entry: a method name, or a variant {label: NAME, method: M, <select options>...,
    # recover: {<recover options>}} (e.g. {label: paser-mass, method: paser, allocation: mass}).
    methods: list = field(default_factory=lambda: ["paser", "random", "uniform"])
    seeds: list = field(default_factory=lambda: [0])
    select: dict = field(default_factory=dict)  # further SelectArgs options
    recover: dict = field(default_factory=dict)  # RecoverArgs options
    evaluate: dict = field(default_factory=lambda: {"tasks": "wikitext2,ptb,heldout,commonsense", "limit": 50})
    include_dense: bool = True
    include_unrecovered: bool = True
    cache_dir: str | None = None
    # A results archive (see paser.io.archive): finished rows are kept there as small files and
    # reused by any later run with the same archive, on any machine; commit it to carry a long
    # experiment across machines.
    archive: str | None = None


def load_pipeline_config(path: str | Path, out: str | None = None) -> PipelineConfig:
    """The experiment config, every key checked before the first stage runs: section types,
    method names, budgets, seeds, evaluation tasks and every nested option (with file and
    line), so that a typo fails in a second rather than after an hour of pruning."""
    from paser.config import EvaluateArgs, PruneArgs, _check_budget, select_methods
    from paser.errors import OptionError

    raw = load_yaml(path)
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    for key in raw:
        if key not in names:
            raise InputError(str(path), f"unknown key; known: {', '.join(sorted(names))}", line=_yaml_key_line(path, key), field=key)

    def bad(key: str, message: str) -> OptionError:
        return OptionError(key, message, path=str(path), line=_yaml_key_line(path, key))

    for key in ("prune", "select", "recover", "evaluate"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], dict):
            raise bad(key, f"expected a section of option: value pairs, got {raw[key]!r}")
        if key in raw and raw[key] is None:
            raw[key] = {}
    for key in ("out", "original", "pruned", "archive", "cache_dir"):
        v = raw.get(key)
        if v is not None and not isinstance(v, str):
            what = "a model path or name" if key in ("original", "pruned") else "a directory path"
            raise bad(key, f"expected {what}, got {v!r}")
    for key in ("include_dense", "include_unrecovered"):
        if key in raw and not isinstance(raw[key], bool):
            raise bad(key, f"expected true or false, got {raw[key]!r}")
    for key in ("budgets", "methods", "seeds", "data"):
        if key in raw and not isinstance(raw[key], list):
            raw[key] = [raw[key]]
        if key in raw and not raw[key] and key != "data":
            raise bad(key, "the list is empty")
    cfg = PipelineConfig(**raw)
    if out:
        cfg.out = out
    for key in ("pool_limit", "pool_seed"):
        v = getattr(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "pool_limit" else 0)):
            raise bad(key, f"expected an integer >= {1 if key == 'pool_limit' else 0}, got {v!r}")
    known = select_methods()
    for m in cfg.methods:  # a name, or a mapping naming one under `method` (a variant)
        name = m.get("method") if isinstance(m, dict) else m
        if isinstance(m, dict) and name is None:
            continue  # the variant's own checks name what is missing
        if not isinstance(name, str) or name not in known:
            raise bad("methods", f"unknown method {name!r}; choose from {', '.join(known)}")
    for s in cfg.seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise bad("seeds", f"a seed must be an integer >= 0, got {s!r}")
    for b in cfg.budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float, str)):
            raise bad("budgets", f"a budget is a fraction or a count, got {b!r}")
        try:
            _check_budget(str(b))  # the budget module's own parser (counts, fractions, tokens)
        except ValueError as e:
            raise bad("budgets", str(e)) from None
    for d in cfg.data:
        if not isinstance(d, str):
            raise bad("data", f"expected file paths, got {d!r}")
    limits = cfg.evaluate.get("limits")
    if limits is not None:
        if not isinstance(limits, dict):
            raise bad("limits", f"expected task: count pairs, got {limits!r}")
        from paser.evaluate.runner import resolve_tasks

        for t, n in limits.items():
            try:
                resolve_tasks([str(t)])
            except PaserError as e:
                raise bad("limits", str(e)) from None
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise bad("limits", f"{t}: expected an integer >= 1, got {n!r}")
    # Validate the nested option blocks now, not after an hour of work.
    build_args(SelectArgs, {**cfg.select, "method": "paser"}, source=path)
    build_args(RecoverArgs, cfg.recover, source=path)
    build_args(PruneArgs, cfg.prune, source=path)
    build_args(EvaluateArgs, {k: v for k, v in cfg.evaluate.items() if k != "limits"}, source=path)
    fmt = {**cfg.select}.get("selected_format", "records")
    if fmt != "records" or any(isinstance(m, dict) and m.get("selected_format", "records") != "records" for m in cfg.methods):
        # recovery reads selected.jsonl back as records; a TRL format would be templated twice
        raise InputError(str(path), "the pipeline recovers from selected.jsonl: selected_format must be records",
                         line=_yaml_key_line(path, "selected_format"), field="selected_format")
    for e in method_entries(cfg, path):  # each variant's own options, with the sections' defaults
        build_args(SelectArgs, {**cfg.select, **e.select, "method": e.method}, source=path)
        build_args(RecoverArgs, {**cfg.recover, **e.recover}, source=path)
    return cfg


class Stage:
    """A cached unit of work: its directory holds DONE.json once it has finished."""

    def __init__(self, root: Path, kind: str, name: str, key: dict):
        self.key = key
        self.hash = stable_hash(key, 10)
        self.dir = root / kind / f"{name}-{self.hash}"

    @property
    def done(self) -> bool:
        return (self.dir / "DONE.json").exists()

    def finish(self, info: dict) -> None:
        atomic_write_json(self.dir / "DONE.json", {"key": self.key, **info})

    def info(self) -> dict:
        return json.loads((self.dir / "DONE.json").read_text())


def run_pipeline(config_path: str | Path, out: str | None = None) -> str:
    cfg = load_pipeline_config(config_path, out)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    costs: dict[str, float] = {}
    failures: list[dict] = []
    rows: list[dict] = []

    def timed(label: str, fn, *a, **kw):
        t = time.time()
        try:
            return fn(*a, **kw)
        finally:
            costs[label] = costs.get(label, 0.0) + time.time() - t

    # 1. prune (or take the given pruned model)
    prune_key = _prune_key(cfg)
    if cfg.pruned:
        pruned_dir = cfg.pruned
    else:
        st = Stage(root, "pruned", cfg.prune.get("method", "wanda"), prune_key)
        if not st.done:
            from paser import api

            timed("prune", api.prune, model=cfg.original, out=str(st.dir), **cfg.prune)
            st.finish({})
        pruned_dir = str(st.dir)
    log.info("pruned model: %s", pruned_dir)

    ev = dict(cfg.evaluate)
    archive = ResultArchive(cfg.archive) if cfg.archive else None
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    archive_info: dict[str, Any] = {}
    pruned_fp: str | None = None
    if archive is not None:
        from paser.io.models import fingerprint_directory

        restored = archive.restore_scores(cache_root)
        try:
            pruned_fp = fingerprint_directory(pruned_dir)
        except Exception:  # a hub id or an unusual layout: rows are still matched by key
            pruned_fp = None
        archive_info = {"dir": str(archive.root), "pruned_fingerprint": pruned_fp, "score_files_restored": restored,
                        "reused": [], "fingerprint_differs": []}
        log.info("archive %s: %d score files restored", archive.root, restored)

    # The evaluate section as the real argument dataclass: its defaults are `paser evaluate`'s.
    eva = build_args(EvaluateArgs, {k: v for k, v in ev.items() if k != "limits"})

    def evaluate(name: str, model: str) -> dict | None:
        """Evaluate one model; `evaluate.limits` ({task: n}) overrides `evaluate.limit` per task."""
        from paser.evaluate.runner import evaluate_model, load_for_evaluation, resolve_tasks

        tasks = [t.strip() for t in eva.tasks.split(",") if t.strip()]
        limits = dict(ev.get("limits") or {})
        groups: dict = {}
        for t in resolve_tasks(tasks):
            groups.setdefault(limits.get(t, eva.limit), []).append(t)
        merged: dict | None = None
        try:
            loaded = timed("evaluate", load_for_evaluation, model)  # once, for every limit group
            for limit, group in groups.items():
                res = timed(
                    "evaluate",
                    evaluate_model,
                    loaded,
                    tasks=group,
                    limit=limit,
                    seed=eva.seed,
                    out_path=None,
                    ppl_window=eva.ppl_window,
                    ppl_max_tokens=eva.ppl_tokens,
                    batch_size=eva.batch_size,
                    cache_dir=(Path(cfg.cache_dir) / "eval") if cfg.cache_dir else None,
                    # the model that was pruned, unless the section names another reference
                    reference=ev.get("reference", cfg.original),
                    heldout_split=eva.heldout_split,
                    include_path=eva.include_path,
                )
                res["limits"] = {t: limit for t in group}
                if merged is None:
                    merged = res
                else:
                    merged["results"].update(res["results"])
                    merged["tasks"] += res["tasks"]
                    merged["limits"].update(res["limits"])
                    merged["seconds_total"] += res["seconds_total"]
            if merged is not None:
                from paser.evaluate.runner import summarise

                merged["summary"] = summarise(merged["results"])
                atomic_write_json(root / "eval" / f"{name}.json", merged)
            return merged
        except Exception as e:  # one failing stage must not lose the others
            failures.append({"stage": f"evaluate {name}", "error": repr(e), "traceback": traceback.format_exc(limit=5)})
            log.error("evaluate %s failed: %s", name, e)
            return None

    from paser.io.provenance import environment
    from paser.report.experiment import write_experiment_report

    plan = plan_rows(cfg)  # dense, unrecovered, then the units in their run order
    units = [p for p in plan if p.seed is not None]
    selections: dict[str, dict] = {}
    env = environment()  # versions and git revision: the same for every rewrite of the report

    def write_report(done: int) -> tuple[str, Path]:
        """results.json and the report as they stand; rewritten after every unit, so an
        interrupted run leaves a report of what it finished."""
        costs["total"] = time.time() - t0
        summary = {
            "config": dataclasses.asdict(cfg),
            "config_file": str(config_path),
            "pruned_model": pruned_dir,
            "rows": rows,
            "selections": selections,
            "costs_s": costs,
            "failures": failures,
            "progress": {"units_done": done, "units_total": len(units), "complete": done == len(units)},
            "environment": env,
            **({"archive": archive_info} if archive is not None else {}),
        }
        atomic_write_json(root / "results.json", summary)
        return write_experiment_report(summary, root)

    def archived(label: str, key: dict, compute) -> dict:
        """The archived row for `key`, else `compute()`'s row, archived once it has results."""
        if archive is not None:
            rec = archive.get(label, key)
            if rec is not None:
                log.info("%s: read from the archive (%s)", label, rec["row"]["archived_from"])
                archive_info["reused"].append(label)
                if pruned_fp and rec.get("pruned_fingerprint") and rec["pruned_fingerprint"] != pruned_fp:
                    log.warning("%s: archived from a pruned model with fingerprint %s, this run's is %s",
                                label, rec["pruned_fingerprint"], pruned_fp)
                    archive_info["fingerprint_differs"].append(label)
                return rec["row"]
        row = compute()
        if archive is not None and row.get("results") is not None:
            sel_dir = row.get("selection_dir")
            archive.put(label, key, row, pruned_fingerprint=pruned_fp, provenance=env, selection_dir=sel_dir,
                        selected_ids=_record_ids(Path(sel_dir) / "selected.jsonl") if sel_dir else None)
            archive.save_scores(cache_root, pruned_fp)
        return row

    for p in plan:
        if p.seed is None:  # the dense and the unrecovered model
            model = cfg.original if p.label == "dense" else pruned_dir
            rows.append(archived(p.label, p.key, lambda: {
                "method": p.method, "budget": None, "seed": None, "results": evaluate(p.label, model)}))
    for k, p in enumerate(units):
        label, method, budget, seed = p.label, p.method, p.budget, p.seed
        log.info("unit %d/%d: %s", k + 1, len(units), label)
        try:
            row = archived(label, p.key, lambda: _run_unit(cfg, root, pruned_dir, prune_key, p.entry, budget, seed, timed, evaluate))
            selections[label] = row.pop("_selection")
            rows.append(row)
        except Exception as e:
            failures.append({"stage": label, "error": repr(e), "traceback": traceback.format_exc(limit=5)})
            log.error("%s failed: %s", label, e)
            rows.append({"method": method, "budget": budget, "seed": seed, "results": None, "error": repr(e)})
        if k + 1 < len(units):
            write_report(k + 1)

    table, html_path = write_report(len(units))
    msg = table + f"\n\nreport: {html_path}\nalso: {root / 'report.md'}, {root / 'results.json'}"
    if failures:
        msg += f"\n{len(failures)} stage(s) failed; see the report"
    from paser.errors import ResultText

    return ResultText(msg, failed=len(failures))  # the CLI exits non-zero when any stage failed


@dataclass(frozen=True)
class MethodEntry:
    """One entry of the config's `methods`: a selection method, or a named variant of one with
    its own select and recover options (what the table calls it is `label`)."""

    label: str
    method: str
    select: dict = field(default_factory=dict)
    recover: dict = field(default_factory=dict)


def method_entries(cfg: "PipelineConfig", source: str | Path | None = None) -> list[MethodEntry]:
    from paser.select.registry import selection_methods

    out = []
    for m in cfg.methods:
        if isinstance(m, str):
            out.append(MethodEntry(m, m))
            continue
        if not isinstance(m, dict) or "method" not in m or "label" not in m:
            raise InputError(str(source or "pipeline"), f"a methods entry is a method name or a mapping with label and method, got {m!r}",
                             line=_yaml_key_line(source, "methods"), field="methods")
        opts = {k: v for k, v in m.items() if k not in ("label", "method", "recover")}
        rec = m.get("recover") or {}
        if not isinstance(rec, dict):
            raise InputError(str(source or "pipeline"), f"{m['label']}: recover must be a mapping of options", line=_yaml_key_line(source, "methods"), field="methods")
        out.append(MethodEntry(str(m["label"]), str(m["method"]), opts, dict(rec)))
    known = selection_methods()
    labels = [e.label for e in out]
    for e in out:
        if e.method not in known:
            raise InputError(str(source or "pipeline"), f"unknown selection method {e.method!r}; choose one of: {', '.join(known)}",
                             line=_yaml_key_line(source, "methods"), field="methods")
        if labels.count(e.label) > 1:
            raise InputError(str(source or "pipeline"), f"two methods entries are labelled {e.label!r}", line=_yaml_key_line(source, "methods"), field="methods")
    return out


@dataclass(frozen=True)
class PlannedRow:
    """One row of the experiment's table, in run order, with the key it is archived under."""

    label: str
    method: str  # the entry's label: what the table's Method column shows
    budget: str | None
    seed: int | None
    key: dict
    entry: MethodEntry | None = None


def _prune_key(cfg: PipelineConfig) -> dict:
    return {"pruned": cfg.pruned} if cfg.pruned else {"original": cfg.original, **cfg.prune}


def plan_rows(cfg: PipelineConfig) -> list[PlannedRow]:
    """Every row the config asks for: dense, unrecovered, then the units.

    Seed-major order: every method's first seed comes before any second seed, so a long run
    that is interrupted already holds one complete comparison (and re-running continues it).
    Full data comes last, once: it has nothing to sample (one seed) and ignores the budget,
    and it costs as much as all the budgeted units together, so the seeded comparisons
    should not wait for it.
    """
    from paser.results import unit_label

    prune_key = _prune_key(cfg)
    ev = dict(cfg.evaluate)
    plan = []
    if cfg.include_dense:
        plan.append(PlannedRow("dense", "dense (unpruned)", None, None, archive_key(kind="dense", original=cfg.original, evaluate=ev)))
    if cfg.include_unrecovered:
        plan.append(PlannedRow("unrecovered", "pruned, no recovery", None, None, archive_key(kind="unrecovered", prune=prune_key, evaluate=ev)))
    entries = method_entries(cfg)
    units = [(str(b), e, int(s)) for s in cfg.seeds for b in cfg.budgets for e in entries if e.method != "full"]
    units += [(str(cfg.budgets[0]), e, int(cfg.seeds[0])) for e in entries if e.method == "full"]
    for budget, entry, seed in units:
        # The unit's key leaves out where this machine keeps the pruned model and its caches.
        sel_opts, rec_opts = _unit_options(cfg, "", entry, budget, seed)
        sel_key = {**{k: v for k, v in sel_opts.items() if k != "cache_dir"}, "pruned": prune_key}
        key = archive_key(kind="unit", select=sel_key, recover=rec_opts, evaluate=ev)
        plan.append(PlannedRow(unit_label(entry.label, budget, seed), entry.label, budget, seed, key, entry))
    return plan


def archived_results(config_path: str | Path) -> dict | None:
    """The rows an experiment's archive holds, shaped like its results.json (for a summary on a
    machine that has not run it); None when the config names no archive."""
    cfg = load_pipeline_config(config_path)
    if not cfg.archive:
        return None
    archive = ResultArchive(cfg.archive)
    plan = plan_rows(cfg)
    rows, selections = [], {}
    fingerprints: dict[str, str | None] = {}  # label -> its pruned model's fingerprint, in plan order
    for p in plan:
        rec = archive.get(p.label, p.key)
        if rec is None:
            continue
        row = rec["row"]
        fingerprints[p.label] = rec.get("pruned_fingerprint")
        if "_selection" in row:
            selections[p.label] = row.pop("_selection")
        rows.append(row)
    n_units = sum(1 for p in plan if p.seed is not None)
    done = sum(1 for p in plan if p.seed is not None and p.label in fingerprints)
    return {"config": dataclasses.asdict(cfg), "rows": rows, "selections": selections,
            "progress": {"units_done": done, "units_total": n_units, "complete": done == n_units},
            "archive": {"dir": str(archive.root), "reused": list(fingerprints), "pruned_fingerprints": fingerprints}}


def _unit_options(cfg: PipelineConfig, pruned_dir: str, entry: MethodEntry, budget: str, seed: int) -> tuple[dict, dict]:
    """The select and recover options of one unit (what its stage keys are made of).

    A plain method name adds nothing to the config's sections, so the keys of units made
    before variants existed are unchanged."""
    sel_opts = {
        **cfg.select,
        **entry.select,
        "original": cfg.original,
        "pruned": pruned_dir,
        "data": cfg.data,
        "budget": budget,
        "method": entry.method,
        "seed": seed,
        "limit": cfg.pool_limit,
        "cache_dir": cfg.cache_dir,
    }
    # Every seed selects from the same pool: the seeds vary what a method draws and how LoRA
    # trains, not the data it may choose from (and PASER's scores are computed once). The
    # option is named only when it differs from the seed, so that the stages of runs made
    # before it existed keep their keys and caches.
    pool_seed = cfg.pool_seed if cfg.pool_seed is not None else int(cfg.seeds[0])
    if cfg.pool_limit is not None and pool_seed != seed:
        sel_opts["limit_seed"] = pool_seed
    rec_opts = {**cfg.recover, **entry.recover, "seed": seed}
    if get_objective(rec_opts.get("objective", DEFAULT_OBJECTIVE)).needs_teacher and "teacher" not in rec_opts:
        rec_opts["teacher"] = cfg.original  # distillation from the model that was pruned
    return sel_opts, rec_opts


def _run_unit(cfg: PipelineConfig, root: Path, pruned_dir: str, prune_key: dict, entry: MethodEntry, budget: str, seed: int, timed, evaluate) -> dict:
    from paser import api
    from paser.results import unit_label

    sel_opts, rec_opts = _unit_options(cfg, pruned_dir, entry, budget, seed)
    label, method = unit_label(entry.label, budget, seed), entry.label
    sel = Stage(root, "select", label, {**sel_opts, "pruned": prune_key})
    if not sel.done:
        rep = timed("select", api.select, SelectArgs(**{k: v for k, v in sel_opts.items()}, out=str(sel.dir))).report
        sel.finish({"selected": rep.get("selected"), "seconds": rep.get("timings_s", {}).get("total"), "tokens_scored": rep.get("scoring", {}).get("tokens"),
                    "selected_tokens": rep.get("selected_tokens"), "budget_unit": rep.get("budget_unit")})
    sel_info = sel.info()

    rec = Stage(root, "recover", label, {"selection": sel.hash, **rec_opts, "pruned": prune_key})
    if not rec.done:
        rep = timed("recover", api.recover, RecoverArgs(model=pruned_dir, data=str(sel.dir / "selected.jsonl"), out=str(rec.dir), **rec_opts)).report
        rec.finish({k: rep.get(k) for k in ("initial_loss", "final_loss", "seconds", "seconds_total", "tokens_trained") if k in rep})
    results = evaluate(label, str(rec.dir / "merged"))
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "results": results,
        "selection_dir": str(sel.dir),
        "recover_dir": str(rec.dir),
        "recovery": rec.info(),
        "_selection": {
            "dir": str(sel.dir),
            **{k: sel_info.get(k) for k in ("selected", "seconds", "tokens_scored", "selected_tokens", "budget_unit") if k in sel_info},
            "capabilities": _capability_counts(sel.dir / "selected.jsonl"),
        },
    }


def _record_ids(path: Path) -> list[str]:
    """The ids of a selection's records, in file order (what the archive keeps of it)."""
    with open(path, encoding="utf-8") as f:
        return [str(json.loads(line).get("id")) for line in f if line.strip()]


def _capability_counts(path: Path) -> dict[str, int]:
    """Selected records per capability: what each method spent its budget on (the report's
    composition table). Empty when the records carry no `capability` field."""
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                cap = json.loads(line).get("capability")
                if cap:
                    counts[str(cap)] = counts.get(str(cap), 0) + 1
    return dict(sorted(counts.items()))
