"""The evaluation driver: load a model (merged, embedded, or base + PEFT adapter), run the asked
tasks, cache each task's result on disk, and write one results JSON that says exactly how the
numbers were made (fingerprint, seeds, limit, perplexity protocol, library versions, git
revision, time per task).

A task result is cached under (model fingerprint, task, limit, seed, protocol), so re-running
with more tasks, or after an interruption, computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from paser.data import COMMONSENSE_TASKS
from paser.errors import ModelError, PaserError
from paser.evaluate import lm_eval_tasks
from paser.evaluate.registry import EvalOptions, eval_tasks
from paser.io.cache import atomic_write_json, default_cache_dir, stable_hash
from paser.io.models import LoadedModel, hash_files, load_model
from paser.io.provenance import git_revision, library_versions

log = logging.getLogger(__name__)

PPL_TASKS = ("wikitext2", "ptb")
HELDOUT_TASK = "heldout"
HELDOUT_JSD_TASK = "heldout_jsd"  # JSD to the original model on the held-out responses
HELDOUT_TASKS = (HELDOUT_TASK, HELDOUT_JSD_TASK)


def _commonsense() -> tuple[str, ...]:
    return tuple(COMMONSENSE_TASKS)


VALID_TASKS: tuple[str, ...] = PPL_TASKS + HELDOUT_TASKS + _commonsense()
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "all": VALID_TASKS,
    "commonsense": _commonsense(),
    "ppl": PPL_TASKS,
    "perplexity": PPL_TASKS,
}
def _valid_tasks() -> tuple[str, ...]:
    """Every registered task (paser's own and any added with `register_task`)."""
    return tuple(eval_tasks())


# Aliases people type; mapped to our names.
_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}


def resolve_tasks(tasks: list[str] | tuple[str, ...] | str) -> list[str]:
    """Expand shorthands ("all", "commonsense", "ppl") and comma lists; keep order, no repeats.
    "lm_eval:NAME" names any lm-evaluation-harness task (kept as typed: lm-eval's names are
    case-sensitive)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[str] = []
    for raw in tasks:
        for name in (n.strip() for n in str(raw).split(",")):
            if not name:
                continue
            if name.lower().startswith(lm_eval_tasks.PREFIX):
                name = lm_eval_tasks.PREFIX + lm_eval_tasks.task_name(name)
                if name not in out:
                    out.append(name)
                continue
            name = name.lower()
            name = _ALIASES.get(name, name)
            expanded = SHORTHANDS.get(name, (name,))
            for t in expanded:
                if t not in _valid_tasks():
                    raise PaserError(
                        f"unknown evaluation task {raw!r}; valid: {', '.join(_valid_tasks())} "
                        f"(or {', '.join(SHORTHANDS)}, or lm_eval:NAME for any lm-evaluation-harness task)"
                    )
                if t not in out:
                    out.append(t)
    if not out:
        raise PaserError("no evaluation tasks given")
    return out


# ----------------------------------------------------------------------------- model loading


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").exists()


@dataclass
class EvalModel:
    """What evaluation needs: model, tokenizer, and the identity that keys its cached results."""

    model: torch.nn.Module
    tokenizer: object
    fingerprint: str  # base fingerprint, combined with the adapter's when there is one
    name: str
    spec: str
    base_fingerprint: str
    adapter: str | None = None
    adapter_fingerprint: str | None = None


def load_for_evaluation(spec, adapter: str | None = None, *, device=None, dtype=None, allow_pickle: bool = False) -> EvalModel:
    """Accept a LoadedModel, a merged model directory, an embedded name, or a PEFT adapter
    directory (its base comes from `base_model_name_or_path`), plus an optional `adapter`."""
    if isinstance(spec, EvalModel):
        if adapter is None:
            return spec
        spec = LoadedModel(spec.model, spec.tokenizer, "", spec.fingerprint, spec.name)
    if isinstance(spec, (str, os.PathLike)) and adapter is None and is_adapter_dir(spec):
        spec, adapter = None, str(spec)
    if spec is None:
        try:
            cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{adapter}: unreadable adapter_config.json ({e})") from None
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter}: adapter_config.json names no base_model_name_or_path; pass the base model too")
        spec = base
    if isinstance(spec, LoadedModel):
        lm = spec
    elif isinstance(spec, (str, os.PathLike)):
        lm = load_model(str(spec), device=device, dtype=dtype, allow_pickle=allow_pickle)
    else:
        raise PaserError(f"cannot evaluate a {type(spec).__name__}; give a model directory, an embedded name or a LoadedModel")
    model, fp = lm.model, lm.fingerprint
    adapter_fp = None
    if adapter is not None:
        from peft import PeftModel

        a = Path(adapter)
        if not is_adapter_dir(a):
            raise ModelError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        files = [f for f in a.iterdir() if f.name == "adapter_config.json" or f.suffix in (".safetensors", ".bin")]
        adapter_fp = hash_files(files)
        try:
            model = PeftModel.from_pretrained(model, str(a))
        except Exception as e:  # peft raises many kinds (ValueError, KeyError, RuntimeError)
            raise ModelError(f"cannot apply adapter {adapter} to {lm.name}: {e}") from None
        model.eval()
        fp = hashlib.sha256(f"{lm.fingerprint}+{adapter_fp}".encode()).hexdigest()[:16]
    return EvalModel(model, lm.tokenizer, fp, lm.name, str(spec if not isinstance(spec, LoadedModel) else lm.path or lm.name),
                     lm.fingerprint, str(adapter) if adapter else None, adapter_fp)


# ----------------------------------------------------------------------------- provenance


# ----------------------------------------------------------------------------- tasks


def _default_batch_size(device: torch.device) -> int:
    return 32 if device.type == "cuda" else 8


def _options(**kw) -> EvalOptions:
    ref = kw.get("reference")
    kw["reference_name"] = None if ref is None else str(ref if isinstance(ref, (str, os.PathLike)) else ref.fingerprint)
    return EvalOptions(**kw)


def task_protocol(task: str, *, limit, seed, ppl_window, ppl_max_tokens, split: str = "test", reference=None, include_path=None) -> dict:
    """Everything besides the model that decides a task's numbers (the cache key's payload)."""
    if lm_eval_tasks.is_lm_eval(task):
        return lm_eval_tasks.protocol(task, limit=limit, seed=seed, include_path=include_path)
    o = _options(limit=limit, seed=seed, ppl_window=ppl_window, ppl_max_tokens=ppl_max_tokens, split=split, reference=reference)
    return eval_tasks()[task].protocol(task, o)


def run_task(em: EvalModel, task: str, *, limit, seed, ppl_window, ppl_max_tokens, batch_size, show_progress=True,
             split: str = "test", reference=None, cache_dir=None, include_path=None) -> dict:
    """Compute one task's result dict (no caching of the result itself)."""
    if lm_eval_tasks.is_lm_eval(task):
        return lm_eval_tasks.run(em.model, em.tokenizer, task, limit=limit, seed=seed, batch_size=batch_size,
                                 include_path=include_path)
    o = _options(limit=limit, seed=seed, ppl_window=ppl_window, ppl_max_tokens=ppl_max_tokens, batch_size=batch_size,
                 show_progress=show_progress, split=split, reference=reference, cache_dir=cache_dir)
    return eval_tasks()[task].run(em, task, o)


def summarise(results: dict[str, dict]) -> dict:
    """Headline numbers: mean acc / acc_norm over the commonsense tasks present, perplexities,
    held-out loss. Mean over tasks counts every task once, as the paper's 7-task average does."""
    cs = [t for t in COMMONSENSE_TASKS if t in results]
    out: dict = {}
    if cs:
        out["commonsense_tasks"] = cs
        for m in ("acc", "acc_norm"):
            out[f"mean_{m}"] = sum(results[t][m] for t in cs) / len(cs)
    for t in PPL_TASKS:
        if t in results:
            out[f"{t}_ppl"] = results[t]["ppl"]
    if HELDOUT_TASK in results:
        out["heldout_loss"] = {c: v["loss"] for c, v in results[HELDOUT_TASK]["capabilities"].items()}
    if HELDOUT_JSD_TASK in results:
        out["heldout_jsd"] = {c: v["jsd"] for c, v in results[HELDOUT_JSD_TASK]["capabilities"].items()}
    lm = {t: r["headline"] for t, r in results.items() if t.startswith("lm_eval:") and r.get("headline")}
    if lm:
        out["lm_eval"] = {t: {"metric": h["metric"], "value": h["value"]} for t, h in lm.items()}
    return out


def evaluate_model(
    model_spec_or_loaded,
    tasks: list[str],
    limit: int | None,
    seed: int,
    out_path: str | os.PathLike | None,
    ppl_window: int = 512,
    ppl_max_tokens: int = 16384,
    batch_size: int | None = None,
    adapter: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    show_progress: bool = True,
    allow_pickle: bool = False,
    reference: str | None = "smollm2-135m",
    heldout_split: str = "test",
    include_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate one model on `tasks` (names from VALID_TASKS or SHORTHANDS) and write the results JSON.

    model_spec_or_loaded: a merged model directory, an embedded name ("smollm2-135m"), a PEFT
    adapter directory, a `paser.io.models.LoadedModel` or an `EvalModel`; `adapter` applies a
    PEFT adapter on top. `limit` (per task; per capability for heldout) takes a seeded subset;
    perplexity always uses the first `ppl_max_tokens` tokens in windows of `ppl_window`.
    `reference`: the original model that `heldout_jsd` measures against (a spec or a
    LoadedModel); `heldout_split`: "test" (the 600 held-out records) or "dev" (the dev split,
    for tuning options) for both held-out tasks.
    `include_path`: a directory of the user's lm-eval task YAMLs, for "lm_eval:NAME" tasks.
    Returns the dict written to `out_path` (atomically; None writes nothing).
    """
    if limit is not None and limit <= 0:
        raise PaserError(f"limit must be a positive number of items, got {limit}")
    if ppl_window < 2 or ppl_max_tokens < ppl_window:
        raise PaserError(f"perplexity needs window >= 2 and max_tokens >= window (got {ppl_window}, {ppl_max_tokens})")
    names = resolve_tasks(tasks)
    t_start = time.time()
    em = load_for_evaluation(model_spec_or_loaded, adapter, allow_pickle=allow_pickle)
    device = next(em.model.parameters()).device
    bs = batch_size or _default_batch_size(device)
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir() / "eval"

    results: dict[str, dict] = {}
    for task in names:
        proto = task_protocol(task, limit=limit, seed=seed, ppl_window=ppl_window, ppl_max_tokens=ppl_max_tokens,
                              split=heldout_split, reference=reference, include_path=include_path)
        safe = re.sub(r"[^\w.-]", "_", task)  # "lm_eval:NAME": no ':' in file names (Windows)
        cpath = cache_root / em.fingerprint / f"{safe}-{stable_hash(proto)}.json"
        if use_cache and cpath.exists():
            try:
                cached = json.loads(cpath.read_text())
                results[task] = {**cached["result"], "seconds": cached["seconds"], "cached": True}
                log.info("%s: cached result from %s", task, cpath)
                continue
            except (OSError, json.JSONDecodeError, KeyError):
                log.warning("%s: unreadable cache entry %s; recomputing", task, cpath)
        t0 = time.time()
        res = run_task(em, task, limit=limit, seed=seed, ppl_window=ppl_window, ppl_max_tokens=ppl_max_tokens,
                       batch_size=bs, show_progress=show_progress, split=heldout_split, reference=reference,
                       cache_dir=cache_root.parent if cache_dir is None else cache_root, include_path=include_path)
        secs = time.time() - t0
        if use_cache:
            # A private cache read back only here: strict=False keeps NaN (e.g. the standard error of
            # one item) a NaN, where strict JSON's null would come back as None.
            atomic_write_json(cpath, {"key": proto, "fingerprint": em.fingerprint, "result": res, "seconds": secs}, strict=False)
        results[task] = {**res, "seconds": secs, "cached": False}

    out = {
        "model": {
            "spec": em.spec,
            "name": em.name,
            "fingerprint": em.fingerprint,
            "base_fingerprint": em.base_fingerprint,
            "adapter": em.adapter,
            "adapter_fingerprint": em.adapter_fingerprint,
            "dtype": str(next(em.model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
        },
        "tasks": names,
        "limit": limit,
        "seed": seed,
        "perplexity": {"window": ppl_window, "max_tokens": ppl_max_tokens},
        **({"include_path": str(Path(include_path).resolve())} if include_path else {}),
        "batch_size": bs,
        "versions": library_versions(),
        "git_revision": git_revision(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds_total": time.time() - t_start,
        "summary": summarise(results),
        "results": results,
    }
    if out_path is not None:
        atomic_write_json(out_path, out)
    return out


def format_results(results: dict) -> str:
    """The results as a short plain-text table, one line per task."""
    lines = [f"model {results['model']['name']} (fingerprint {results['model']['fingerprint']}), limit {results['limit']}, seed {results['seed']}"]
    for task, r in results["results"].items():
        entry = eval_tasks().get(task)
        if lm_eval_tasks.is_lm_eval(task):
            lines += lm_eval_tasks.format_result(r)
        elif entry is not None and entry.format is not None:
            lines += entry.format(task, r)
        elif r.get("headline"):
            h = r["headline"]
            lines.append(f"  {task:<14} {h['metric']} {h['value']:.4g}")
    s = results.get("summary", {})
    if "mean_acc" in s:
        lines.append(f"  {'mean':<14} acc {s['mean_acc']:.3f}  acc_norm {s['mean_acc_norm']:.3f} over {len(s['commonsense_tasks'])} tasks")
    return "\n".join(lines)
