"""Any lm-evaluation-harness task, run on the model paser already loaded: `--tasks lm_eval:NAME`.

lm-eval does the work (its task registry, prompts, metrics and aggregation); paser only wraps
the loaded model in lm-eval's HFLM (no second load), picks the same seeded subset as its own
tasks (`zeroshot.subset_indices`, passed as lm-eval's `samples`), keeps the run offline, and
turns lm-eval's results into one entry of paser's results file.

Task names are lm-eval's (`lm_eval ls tasks`), from its built-in registry, the user's
`--include-path DIR` (YAML task files, as `lm_eval --include_path`) and paser's own
`paser/evaluate/tasks/` (the `paser_*` tasks, the embedded commonsense data).
A built-in task runs only where its data is already in the Hugging Face cache: there is no
network at run time (set HF_HUB_OFFLINE=0 yourself to let lm-eval download).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import json
import math
import os
from pathlib import Path

from paser.errors import PaserError

log = logging.getLogger(__name__)

PREFIX = "lm_eval:"
PROTOCOL = "lm-eval-v1:seeded-samples"
# bootstrap_iters for lm-eval's stderrs: its "mean" metrics use the closed form (mean_stderr)
# whatever this is; only metrics without one (f1, mcc, bleu...) are bootstrapped.
BOOTSTRAP_ITERS = 1000


def is_lm_eval(task: str) -> bool:
    return task.startswith(PREFIX)


def task_name(task: str) -> str:
    name = task[len(PREFIX):].strip()
    if not name:
        raise PaserError(f"{task!r}: give an lm-eval task name after '{PREFIX}', e.g. lm_eval:arc_easy")
    return name


def include_paths(include_path: str | os.PathLike | None) -> list[Path]:
    """paser's own task directory, then the user's (checked: a typo'd path must not silently
    fall back to the built-in tasks)."""
    from paser.evaluate.tasks import TASKS_DIR

    paths = [TASKS_DIR]
    if include_path:
        p = Path(include_path).expanduser().resolve()
        if not p.is_dir():
            raise PaserError(f"--include-path {include_path}: not a directory")
        paths.append(p)
    return paths


def _tree_hash(root: Path) -> str:
    """Identity of a task directory for the cache key: the content of its task files (YAML,
    Python, templates) and the size and modification time of everything else (data files can
    be large; a changed file changes its mtime)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode())
        if f.suffix in (".yaml", ".yml", ".py", ".jinja", ".j2", ".txt"):
            h.update(f.read_bytes())
        else:
            st = f.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def protocol(task: str, *, limit, seed, include_path=None) -> dict:
    """What besides the model decides an lm-eval task's numbers (the cache key's payload)."""
    return {"task": task, "protocol": PROTOCOL, "limit": limit, "seed": seed, "lm_eval": _lm_eval_version(),
            "include": [_tree_hash(p) for p in include_paths(include_path)]}


def _lm_eval_version() -> str:
    """lm-eval's version; a clear line when it is not installed (it is an optional part)."""
    from paser.extras import require

    require("lm_eval")
    import lm_eval

    return lm_eval.__version__


@contextlib.contextmanager
def offline():
    """Hugging Face hub and datasets offline for the duration (`paser.offline.hub_offline`);
    HF_HUB_OFFLINE=0 in the environment opts out (lm-eval may then download a task's data)."""
    if os.environ.get("HF_HUB_OFFLINE") == "0":
        yield
        return
    import datasets.config  # noqa: F401  (imported first, so hub_offline sets the constant it caches;
    import transformers  # noqa: F401  transformers brings huggingface_hub's)

    from paser.offline import hub_offline

    with hub_offline():
        yield


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every step at INFO and warns that a loaded model is "not of type str" (which
    is how it is meant to be used here); keep that out of paser's output unless --verbose."""
    from unittest import mock

    import lm_eval.evaluator

    lg = logging.getLogger("lm_eval")
    old = lg.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        lg.setLevel(logging.ERROR)
    # lm-eval runs `git describe` in the working directory for its own results, which prints
    # "fatal: not a git repository" outside one; paser records its own git revision instead.
    try:
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            yield
    finally:
        lg.setLevel(old)


@contextlib.contextmanager
def _global_rng_kept():
    import random

    import numpy as np
    import torch

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


_MANAGERS: dict = {}


def _task_manager(cls, paths: tuple[str, ...], defaults: bool, metadata: dict | None = None):
    """One TaskManager per set of task directories in a process: building the index of every
    YAML lm-eval ships takes seconds to tens of seconds, and a pipeline evaluates many models."""
    key = (paths, defaults, json.dumps(metadata, sort_keys=True))
    if key not in _MANAGERS:
        _MANAGERS[key] = cls(include_path=list(paths), include_defaults=defaults, metadata=metadata)
    return _MANAGERS[key]


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


def _load(tm, name: str, where: str):
    """lm-eval's Task/Group objects for `name`, or one clear line saying why not."""
    if name not in tm.all_tasks:
        close = difflib.get_close_matches(name, tm.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
        raise PaserError(f"lm-eval has no task {name!r} ({where}){hint}")
    try:
        return tm.load([name])
    except Exception as e:  # datasets/lm-eval raise many kinds; the user needs the first line only
        raise PaserError(
            f"lm_eval:{name}: cannot load the task's data offline ({_first_line(e)}); download it once "
            "(e.g. run lm_eval with this task on a connected machine), or give --include-path with a task "
            "whose data files are local"
        ) from None


def _finite(v):
    """lm-eval writes "N/A" or NaN where a stderr is undefined: null in paser's strict JSON."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _metrics(row: dict) -> dict:
    return {k: _finite(v) for k, v in row.items() if "," in k}


def _headline(name: str, res: dict) -> dict | None:
    """The first metric lm-eval reports for the task (or group) asked for, with its stderr."""
    row = (res.get("results") or {}).get(name) or (res.get("groups") or {}).get(name)
    if not row:
        return None
    hib = (res.get("higher_is_better") or {}).get(name, {})
    for k, v in row.items():
        if "," in k and "_stderr" not in k and _finite(v) is not None:
            metric, filt = k.split(",", 1)
            return {"metric": k, "value": _finite(v), "stderr": _finite(row.get(f"{metric}_stderr,{filt}")),
                    "higher_is_better": hib.get(metric)}
    return None


def _items(samples: list[dict]) -> dict:
    """Per item, the choices' log-likelihoods and the gold index (multiple-choice tasks), in the
    shape paser's own tasks record, so paired comparisons between models work on them too."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    # paser_* tasks built as a subset (metadata) keep each doc's position in the full file
    return {"indices": [int(s["doc"].get("paser_index", s["doc_id"])) if isinstance(s.get("doc"), dict) else int(s["doc_id"])
                        for s in samples],
            "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "golds": _golds(samples)}


def _golds(samples: list[dict]) -> list[int] | None:
    """The gold choice index per item where lm-eval's target is one (None otherwise: e.g.
    Winogrande's partial scoring, whose target is the shared continuation)."""
    try:
        return [int(s["target"][0] if isinstance(s["target"], list) else s["target"]) for s in samples]
    except (TypeError, ValueError, IndexError):
        return None


def run(model, tokenizer, task: str, *, limit: int | None, seed: int, batch_size: int,
        include_path: str | os.PathLike | None = None, softmax_dtype: str | None = None,
        metadata: dict | None = None) -> dict:
    """Run one lm-eval task (or group, or tag) on an already-loaded model; paser's result dict.

    softmax_dtype: lm-eval's HFLM option; None keeps lm-eval's default (the model's dtype), so
    numbers match its CLI. "float64" removes lm-eval's float32 log-softmax rounding (the cross-
    check with paser's scorer uses it; see zeroshot's module notes). metadata: lm-eval's
    task metadata (`--metadata`), e.g. {"paser_limit": N, "paser_seed": S} for the paser_*
    tasks, which then build only that subset."""
    name = task_name(task)
    paths = include_paths(include_path)
    if name.startswith("paser_") and limit and metadata is None:
        # paser's own tasks build the seeded subset themselves (the same items), instead of
        # preparing every doc of the full file for lm-eval to pick from
        metadata, limit = {"paser_limit": limit, "paser_seed": seed}, None
    where = "built-in tasks" + (f" and {include_path}" if include_path else "")
    _lm_eval_version()
    with offline(), _quiet_lm_eval():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from paser.evaluate.zeroshot import subset_indices

        # paser's and the user's own tasks first, without indexing lm-eval's thousands of
        # built-in YAMLs; the full registry only for names found nowhere else (or whose
        # files build on built-in ones).
        tm = _task_manager(TaskManager, tuple(str(p) for p in paths), defaults=False, metadata=metadata)
        try:
            loaded = tm.load([name]) if name in tm.all_tasks else None
        except Exception:  # e.g. an `include:` of a built-in template: retry with the registry
            loaded = None
        if loaded is None:
            tm = _task_manager(TaskManager, tuple(str(p) for p in paths), defaults=True, metadata=metadata)
            loaded = _load(tm, name, where)
        n_total = {t: len(obj.eval_docs) for t, obj in loaded["tasks"].items()}
        samples = {t: subset_indices(n, limit, seed) for t, n in n_total.items()} if limit else None
        top = [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=softmax_dtype)
        multiple_choice = {t for t, obj in loaded["tasks"].items() if obj.get_config("output_type") == "multiple_choice"}
        try:
            # lm-eval's own default seeds (few-shot sampling as its CLI does); paser's seed picks
            # the subset. simple_evaluate seeds the global generators, which are put back after.
            with _global_rng_kept():
                res = simple_evaluate(model=lm, tasks=top, task_manager=tm, samples=samples,
                                      log_samples=bool(multiple_choice), bootstrap_iters=BOOTSTRAP_ITERS)
        except Exception as e:  # lm-eval raises many kinds; one line says which and why
            raise PaserError(f"lm_eval:{name}: lm-eval failed ({_first_line(e)})") from None
    out = {
        "task": task,
        "lm_eval_task": name,
        "headline": _headline(name, res),
        "metrics": {t: _metrics(row) for t, row in {**(res.get("results") or {}), **(res.get("groups") or {})}.items()},
        "n": {t: v["effective"] for t, v in (res.get("n-samples") or {}).items()},
        "n_total": n_total,
        "n_shot": res.get("n-shot") or {},
        "versions": {t: str(v) for t, v in (res.get("versions") or {}).items()},
        "higher_is_better": res.get("higher_is_better") or {},
        "lm_eval_version": res.get("lm_eval_version"),
    }
    if multiple_choice and res.get("samples"):
        out["items"] = {t: _items(s) for t, s in res["samples"].items() if t in multiple_choice}
    return out


def format_result(r: dict) -> list[str]:
    """Lines for `runner.format_results`: the headline, then every subtask (at most 10)."""
    h = r.get("headline")
    head = f"{h['metric']} {h['value']:.4g}" + (f"±{h['stderr']:.3g}" if h.get("stderr") is not None else "") if h else "no numeric metric"
    n = sum(r.get("n", {}).values())
    lines = [f"  {r['task']:<14} {head}  (n={n})"]
    subs = [t for t in r.get("metrics", {}) if t != r["lm_eval_task"]]
    for t in subs[:10]:
        vals = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"][t].items() if v is not None and "_stderr" not in k)
        lines.append(f"    {t}: {vals}")
    if len(subs) > 10:
        lines.append(f"    ... and {len(subs) - 10} more in the results file")
    return lines
