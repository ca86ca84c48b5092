"""`paser pipeline`: prune -> select (every method x budget x seed) -> recover -> evaluate -> report.

Every stage writes its output under a key made from everything that produced it, and a DONE
marker last; a stage whose marker exists is skipped. So adding a method or a budget to the
config and re-running does only the new work, a killed run resumes, and one failing stage is
recorded in the report without losing the others' results.

`plan_rows` says which rows a config asks for and the key each is archived under; an
`Experiment` runs them. The config is read and checked by paser.pipeline_config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from paser import stages
from paser.config import RecoverArgs, SelectArgs
from paser.errors import ResultText
from paser.evaluate.runner import evaluate_model, load_for_evaluation, resolve_tasks, summarise
from paser.io.archive import ResultArchive, archive_key
from paser.io.cache import atomic_write_json, default_cache_dir, stable_hash
from paser.io.models import fingerprint_directory
from paser.io.provenance import environment
from paser.pipeline_config import MethodEntry, PipelineConfig, load_pipeline_config
from paser.recover.objectives import get_objective
from paser.report.experiment import write_experiment_report
from paser.results import unit_label

__all__ = ["Experiment", "MethodEntry", "PipelineConfig", "PlannedRow", "Stage", "archived_results", "load_pipeline_config",
           "plan_rows", "run_pipeline"]

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlannedRow:
    """One row of the experiment's table, in run order, with the key it is archived under."""

    label: str
    method: str  # the entry's label: what the table's Method column shows
    budget: str | None
    seed: int | None
    key: dict
    entry: MethodEntry | None = None
    # A unit's options as written (what its stage keys are made of); the select options name
    # the pruned model by its key, not by where this machine keeps it.
    select: dict | None = None
    recover: dict | None = None


def prune_key(cfg: PipelineConfig) -> dict:
    """What the pruned model is made of: the given model, or the original and the prune options."""
    return {"pruned": cfg.pruned} if cfg.pruned else {"original": cfg.original, **cfg.prune.written}


def plan_rows(cfg: PipelineConfig) -> list[PlannedRow]:
    """Every row the config asks for: dense, unrecovered, then the units (see `_unit_order`)."""
    ev = cfg.evaluate.written
    plan = []
    if cfg.include_dense:
        plan.append(PlannedRow("dense", "dense (unpruned)", None, None, archive_key(kind="dense", original=cfg.original, evaluate=ev)))
    if cfg.include_unrecovered:
        plan.append(PlannedRow("unrecovered", "pruned, no recovery", None, None, archive_key(kind="unrecovered", prune=prune_key(cfg), evaluate=ev)))
    for budget, entry, seed in _unit_order(cfg):
        sel, rec = _unit_options(cfg, entry, budget, seed)
        # The unit's key leaves out where this machine keeps its caches.
        key = archive_key(kind="unit", select={k: v for k, v in sel.items() if k != "cache_dir"}, recover=rec, evaluate=ev)
        plan.append(PlannedRow(unit_label(entry.label, budget, seed), entry.label, budget, seed, key, entry, sel, rec))
    return plan


def _unit_order(cfg: PipelineConfig) -> list[tuple[str, MethodEntry, int]]:
    """(budget, entry, seed) of every unit, seed-major: every method's first seed comes before
    any second seed, so a long run that is interrupted already holds one complete comparison
    (and re-running continues it). Full data comes last, once: it has nothing to sample (one
    seed) and ignores the budget, and it costs as much as all the budgeted units together, so
    the seeded comparisons should not wait for it."""
    units = [(b, e, s) for s in cfg.seeds for b in cfg.budgets for e in cfg.methods if e.method != "full"]
    return units + [(cfg.budgets[0], e, cfg.seeds[0]) for e in cfg.methods if e.method == "full"]


def _unit_options(cfg: PipelineConfig, entry: MethodEntry, budget: str, seed: int) -> tuple[dict, dict]:
    """The select and recover options of one unit, as written (what its keys are made of).

    A plain method name adds nothing to the config's sections, so the keys of units made
    before variants existed are unchanged."""
    sel = {
        **cfg.select.written,
        **entry.select,
        "original": cfg.original,
        "pruned": prune_key(cfg),
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
    pool_seed = cfg.pool_seed if cfg.pool_seed is not None else cfg.seeds[0]
    if cfg.pool_limit is not None and pool_seed != seed:
        sel["limit_seed"] = pool_seed
    rec = {**cfg.recover.written, **entry.recover, "seed": seed}
    if get_objective(entry.recover_args.objective).needs_teacher and "teacher" not in rec:
        rec["teacher"] = cfg.original  # distillation from the model that was pruned
    return sel, rec


# ----------------------------------------------------------------------------- the run


class Experiment:
    """One run of a config: prune once, evaluate the dense and the unrecovered model, then each
    unit (select -> recover -> evaluate); every row is archived once it has results, and
    results.json and the report are rewritten after every unit."""

    def __init__(self, cfg: PipelineConfig, config_file: str | Path | None = None):
        self.cfg = cfg
        self.config_file = config_file
        self.root = Path(cfg.out)
        self.archive = ResultArchive(cfg.archive) if cfg.archive else None
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        # What this run has made and measured so far (filled by run()).
        self.pruned_dir: str | None = None
        self.pruned_fingerprint: str | None = None
        self.rows: list[dict] = []
        self.selections: dict[str, dict] = {}
        self.costs: dict[str, float] = {}
        self.failures: list[dict] = []
        self.archive_info: dict[str, Any] = {}
        self._t0 = 0.0  # when run() started
        self._env: dict = {}

    @classmethod
    def from_config(cls, path: str | Path, out: str | None = None) -> "Experiment":
        return cls(load_pipeline_config(path, out), path)

    def plan(self) -> list[PlannedRow]:
        return plan_rows(self.cfg)

    def run(self) -> ResultText:
        """Runs what the plan asks for that neither the stage cache nor the archive holds;
        the report's table and where the files are."""
        self._start()
        plan = self.plan()
        units = [p for p in plan if p.seed is not None]
        self.rows += [self._archived(p, lambda p=p: self._baseline_row(p)) for p in plan if p.seed is None]
        for k, p in enumerate(units):
            log.info("unit %d/%d: %s", k + 1, len(units), p.label)
            self.rows.append(self._unit(p))
            if k + 1 < len(units):
                self._write_report(k + 1, len(units))
        table, html_path = self._write_report(len(units), len(units))
        msg = table + f"\n\nreport: {html_path}\nalso: {self.root / 'report.md'}, {self.root / 'results.json'}"
        if self.failures:
            msg += f"\n{len(self.failures)} stage(s) failed; see the report"
        return ResultText(msg, failed=len(self.failures))  # the CLI exits non-zero when any stage failed

    def _start(self) -> None:
        """The pruned model (pruned now if need be), the archive opened, the environment read."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._t0 = time.time()
        self.pruned_dir = self._prune()
        log.info("pruned model: %s", self.pruned_dir)
        self._open_archive()
        self._env = environment()  # versions and git revision: the same for every rewrite of the report

    # --------------------------------------------------------------- bookkeeping

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Adds the block's wall time to `stage`'s cost, whether or not it raises."""
        t = time.time()
        try:
            yield
        finally:
            self.costs[stage] = self.costs.get(stage, 0.0) + time.time() - t

    def _failed(self, stage: str, e: Exception) -> None:
        """Records a failed stage; the run goes on with the others."""
        self.failures.append({"stage": stage, "error": repr(e), "traceback": traceback.format_exc(limit=5)})
        log.error("%s failed: %s", stage, e)

    def _write_report(self, done: int, total: int) -> tuple[str, Path]:
        """results.json and the report as they stand, so that an interrupted run leaves a
        report of what it finished."""
        self.costs["total"] = time.time() - self._t0
        summary = {
            "config": self.cfg.as_written(),
            "config_file": str(self.config_file),
            "pruned_model": self.pruned_dir,
            "rows": self.rows,
            "selections": self.selections,
            "costs_s": self.costs,
            "failures": self.failures,
            "progress": {"units_done": done, "units_total": total, "complete": done == total},
            "environment": self._env,
            **({"archive": self.archive_info} if self.archive is not None else {}),
        }
        atomic_write_json(self.root / "results.json", summary)
        return write_experiment_report(summary, self.root)

    # --------------------------------------------------------------- the archive

    def _open_archive(self) -> None:
        """Restores the archive's score stores into the cache and fingerprints the pruned model
        (rows made from other weights are reused, but said so)."""
        if self.archive is None:
            return
        restored = self.archive.restore_scores(self.cache_root)
        try:
            self.pruned_fingerprint = fingerprint_directory(self.pruned_dir)
        except Exception:  # a hub id or an unusual layout: rows are still matched by key
            self.pruned_fingerprint = None
        self.archive_info = {"dir": str(self.archive.root), "pruned_fingerprint": self.pruned_fingerprint,
                             "score_files_restored": restored, "reused": [], "fingerprint_differs": []}
        log.info("archive %s: %d score files restored", self.archive.root, restored)

    def _archived(self, p: PlannedRow, compute: Callable[[], dict]) -> dict:
        """The archived row of `p`, else `compute()`'s row, archived once it has results."""
        row = self._from_archive(p)
        if row is None:
            row = compute()
            self._to_archive(p, row)
        return row

    def _from_archive(self, p: PlannedRow) -> dict | None:
        rec = self.archive.get(p.label, p.key) if self.archive is not None else None
        if rec is None:
            return None
        log.info("%s: read from the archive (%s)", p.label, rec["row"]["archived_from"])
        self.archive_info["reused"].append(p.label)
        fp = rec.get("pruned_fingerprint")
        if self.pruned_fingerprint and fp and fp != self.pruned_fingerprint:
            log.warning("%s: archived from a pruned model with fingerprint %s, this run's is %s", p.label, fp, self.pruned_fingerprint)
            self.archive_info["fingerprint_differs"].append(p.label)
        return rec["row"]

    def _to_archive(self, p: PlannedRow, row: dict) -> None:
        if self.archive is None or row.get("results") is None:
            return
        sel_dir = row.get("selection_dir")
        self.archive.put(p.label, p.key, row, pruned_fingerprint=self.pruned_fingerprint, provenance=self._env, selection_dir=sel_dir,
                         selected_ids=_record_ids(Path(sel_dir) / "selected.jsonl") if sel_dir else None)
        self.archive.save_scores(self.cache_root, self.pruned_fingerprint)

    # --------------------------------------------------------------- the stages (their directories are their keys)

    def prune_stage(self) -> Stage:
        return Stage(self.root, "pruned", self.cfg.prune.args.method, prune_key(self.cfg))

    def select_stage(self, p: PlannedRow) -> Stage:
        return Stage(self.root, "select", p.label, p.select)

    def recover_stage(self, p: PlannedRow, selection: Stage) -> Stage:
        return Stage(self.root, "recover", p.label, {"selection": selection.hash, **p.recover, "pruned": prune_key(self.cfg)})

    def _prune(self) -> str:
        """The pruned model's directory: the given one, or the prune stage's (run once)."""
        if self.cfg.pruned:
            return self.cfg.pruned
        st = self.prune_stage()
        if not st.done:
            with self._timed("prune"):
                stages.prune(dataclasses.replace(self.cfg.prune.args, out=str(st.dir)))
            st.finish({})
        return str(st.dir)

    def _baseline_row(self, p: PlannedRow) -> dict:
        """The dense or the unrecovered model's row: evaluation only."""
        model = self.cfg.original if p.label == "dense" else self.pruned_dir
        return {"method": p.method, "budget": None, "seed": None, "results": self._evaluate(p.label, model)}

    def _unit(self, p: PlannedRow) -> dict:
        """One unit's row (from the archive or run); a failure is recorded, and its row says so."""
        try:
            row = self._archived(p, lambda: self._run_unit(p))
            self.selections[p.label] = row.pop("_selection")
            return row
        except Exception as e:
            self._failed(p.label, e)
            return {"method": p.method, "budget": p.budget, "seed": p.seed, "results": None, "error": repr(e)}

    def _run_unit(self, p: PlannedRow) -> dict:
        sel = self._select(p)
        rec = self._recover(p, sel)
        results = self._evaluate(p.label, str(rec.dir / "merged"))
        sel_info = sel.info()
        return {
            "method": p.method,
            "budget": p.budget,
            "seed": p.seed,
            "results": results,
            "selection_dir": str(sel.dir),
            "recover_dir": str(rec.dir),
            "recovery": rec.info(),
            "_selection": {  # taken out of the row into results.json's `selections`
                "dir": str(sel.dir),
                **{k: sel_info.get(k) for k in ("selected", "seconds", "tokens_scored", "selected_tokens", "budget_unit") if k in sel_info},
                "capabilities": _capability_counts(sel.dir / "selected.jsonl"),
            },
        }

    def _select(self, p: PlannedRow) -> Stage:
        st = self.select_stage(p)
        if not st.done:
            with self._timed("select"):
                rep = stages.select(SelectArgs(**{**p.select, "pruned": self.pruned_dir}, out=str(st.dir))).report
            st.finish({"selected": rep.get("selected"), "seconds": rep.get("timings_s", {}).get("total"),
                       "tokens_scored": rep.get("scoring", {}).get("tokens"), "selected_tokens": rep.get("selected_tokens"),
                       "budget_unit": rep.get("budget_unit")})
        return st

    def _recover(self, p: PlannedRow, sel: Stage) -> Stage:
        st = self.recover_stage(p, sel)
        if not st.done:
            args = RecoverArgs(model=self.pruned_dir, data=str(sel.dir / "selected.jsonl"), out=str(st.dir), **p.recover)
            with self._timed("recover"):
                rep = stages.recover(args).report
            st.finish({k: rep.get(k) for k in ("initial_loss", "final_loss", "seconds", "seconds_total", "tokens_trained") if k in rep})
        return st

    def _evaluate(self, name: str, model: str) -> dict | None:
        """Evaluates one model (loaded once) on every task, each with its own limit
        (`evaluate.limits`, else `evaluate.limit`); writes eval/NAME.json. None if it failed."""
        try:
            with self._timed("evaluate"):
                loaded = load_for_evaluation(model)
            merged: dict | None = None
            for limit, tasks in self._limit_groups().items():
                with self._timed("evaluate"):
                    res = self._evaluate_tasks(loaded, tasks, limit)
                merged = res if merged is None else _merge_results(merged, res)
            if merged is not None:
                merged["summary"] = summarise(merged["results"])
                atomic_write_json(self.root / "eval" / f"{name}.json", merged)
            return merged
        except Exception as e:  # one failing stage must not lose the others
            self._failed(f"evaluate {name}", e)
            return None

    def _limit_groups(self) -> dict[int | None, list[str]]:
        """The evaluation's tasks grouped by their item limit, in task order."""
        groups: dict[int | None, list[str]] = {}
        for t in resolve_tasks(self.cfg.evaluate.args.tasks):
            groups.setdefault(self.cfg.limits.get(t, self.cfg.evaluate.args.limit), []).append(t)
        return groups

    def _evaluate_tasks(self, loaded: Any, tasks: list[str], limit: int | None) -> dict:
        ev = self.cfg.evaluate.args
        res = evaluate_model(
            loaded,
            tasks=tasks,
            limit=limit,
            seed=ev.seed,
            out_path=None,
            ppl_window=ev.ppl_window,
            ppl_max_tokens=ev.ppl_tokens,
            batch_size=ev.batch_size,
            cache_dir=(Path(self.cfg.cache_dir) / "eval") if self.cfg.cache_dir else None,
            reference=ev.reference,
            heldout_split=ev.heldout_split,
            include_path=ev.include_path,
        )
        res["limits"] = {t: limit for t in tasks}
        return res


def run_pipeline(config_path: str | Path, out: str | None = None) -> str:
    """Run the experiment of `config_path` (into `out`, else the config's); the report's table
    and where the files are, as the CLI prints them."""
    return Experiment.from_config(config_path, out).run()


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
    return {"config": cfg.as_written(), "rows": rows, "selections": selections,
            "progress": {"units_done": done, "units_total": n_units, "complete": done == n_units},
            "archive": {"dir": str(archive.root), "reused": list(fingerprints), "pruned_fingerprints": fingerprints}}


def _merge_results(merged: dict, res: dict) -> dict:
    """One limit group's results added to the others' (one results file per model)."""
    merged["results"].update(res["results"])
    merged["tasks"] += res["tasks"]
    merged["limits"].update(res["limits"])
    merged["seconds_total"] += res["seconds_total"]
    return merged


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
