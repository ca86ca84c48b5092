"""Paired comparisons between models evaluated on the same units.

Two recovered models are scored on the same perplexity windows, the same held-out records and
the same multiple-choice items. Most of the spread of a per-unit number comes from the unit
(a hard window is hard for every model), so the difference unit by unit, averaged, has a far
smaller standard error than two separate means: METHOD/issue figures are about 0.02 nats paired
against 0.06 unpaired for the held-out loss. This is what can tell PASER from random at 10 %.

With several seeds, a method's value on a unit is its mean over the seeds; the spread over
seeds is reported separately (the main table), so the paired error here is the evaluation
sampling error only.

The per-unit arrays come from the evaluation results: `window_nll` (perplexity), `record_ids`
with `record_loss` and `record_capabilities` (held-out loss), `items` (multiple choice).
Results made before those arrays were recorded simply give no paired number.
"""

from __future__ import annotations

import math
from typing import Hashable

import numpy as np

from paser.data import COMMONSENSE_TASKS
from paser.evaluate.runner import HELDOUT_JSD_TASK, HELDOUT_TASK, PPL_TASKS
from paser.evaluate.zeroshot import choice_metrics, mean_and_stderr


# The commonsense tasks' column labels in the report's tables, in the paper's order.
TASK_LABELS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}


def task_results(results: dict | None) -> dict[str, dict]:
    """{task: result} of one evaluation results dict (empty for a failed or missing one)."""
    return (results or {}).get("results") or {}


def unit_values(results: dict | None, task: str, key: str) -> dict[Hashable, float] | None:
    """{unit id: value} for one task of one evaluation result, or None when not recorded.

    key: "nll" for perplexity tasks; a capability name (or "all") for "heldout" and
    "heldout_jsd"; a per-item
    metric of `paser.evaluate.zeroshot.item_metrics` ("acc", "gold_choice_logprob", ...) for
    a multiple-choice task.
    """
    r = task_results(results).get(task)
    if not r:
        return None
    if task in PPL_TASKS:
        w = r.get("window_nll")
        return {i: float(x) for i, x in enumerate(w)} if w else None
    if task in (HELDOUT_TASK, HELDOUT_JSD_TASK):
        values = "record_loss" if task == HELDOUT_TASK else "record_jsd"
        ids, losses, caps = r.get("record_ids"), r.get(values), r.get("record_capabilities")
        if not ids or losses is None or caps is None:
            return None
        return {i: float(x) for i, x, c in zip(ids, losses, caps) if x is not None and (key == "all" or c == key)}
    items = r.get("items")
    # acc_norm needs the choice strings, which are not stored: paired numbers use length-free metrics.
    if not items or items.get("golds") is None or key not in ("acc", "gold_loglik", "gold_choice_logprob"):
        return None
    return {idx: choice_metrics(lls, gold)[key] for idx, lls, gold in zip(items["indices"], items["lls"], items["golds"])}


def _mean_over_seeds(per_seed: list[dict[Hashable, float]]) -> dict[Hashable, float]:
    common = set.intersection(*(set(d) for d in per_seed))
    return {u: float(np.mean([d[u] for d in per_seed])) for u in common}


def paired_difference(a: list[dict | None], b: list[dict | None], task: str, key: str) -> tuple[float, float, int] | None:
    """Mean over common units of (A - B), its standard error, and the number of units.

    a, b: evaluation results of the seeds of method A and of method B (one each for a single
    model). None when any result lacks the per-unit values, or no unit is shared.
    """
    va = [unit_values(r, task, key) for r in a]
    vb = [unit_values(r, task, key) for r in b]
    if not va or not vb or any(v is None for v in va + vb):
        return None
    ma, mb = _mean_over_seeds(va), _mean_over_seeds(vb)
    common = sorted(set(ma) & set(mb), key=str)
    if not common:
        return None
    d = np.array([ma[u] - mb[u] for u in common])
    mu, se = mean_and_stderr(d)
    return mu, se, len(common)


def combined_task_mean(diffs: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """Mean of per-task paired differences; tasks are independent, so errors add in quadrature."""
    mus = [d[0] for d in diffs]
    ses = [d[1] for d in diffs]
    return float(np.mean(mus)), math.sqrt(sum(s * s for s in ses)) / len(ses), sum(d[2] for d in diffs)


def paired_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(label, task, key) of every paired metric some row's results carry."""
    present: dict[str, dict] = {}
    for row in rows:
        for t, r in task_results(row.get("results")).items():
            present.setdefault(t, r)
    cols = []
    for t, lab in (("wikitext2", "Δ WikiText-2 NLL"), ("ptb", "Δ PTB NLL")):
        if t in present and present[t].get("window_nll"):
            cols.append((lab, t, "nll"))
    for task, lab in ((HELDOUT_TASK, "Δ held-out loss"), (HELDOUT_JSD_TASK, "Δ held-out JSD")):
        h = present.get(task)
        if h and h.get("record_capabilities"):
            for c in [*dict.fromkeys(h["record_capabilities"]), "all"]:
                cols.append((f"{lab} {c}", task, c))
    return cols


def paired_table(rows: list[dict], reference: str) -> tuple[list[str], list[list[str]]] | None:
    """Each method and budget minus `reference` (a method name at the same budget, or a
    budget-less row such as "pruned, no recovery"), unit by unit: mean difference ± paired SE.
    Negative is better for NLL and loss; positive is better for the gold-choice log-probability."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("results"):
            groups.setdefault((row["method"], row.get("budget")), []).append(row["results"])
    cols = paired_columns(rows)
    cs_tasks = [t for t in COMMONSENSE_TASKS if any(t in task_results(r.get("results")) for r in rows)]
    if not cols and not cs_tasks:
        return None
    header = ["Method", "Budget", f"vs {reference}"] + [c[0] for c in cols] + (["Δ gold log-prob (task mean)"] if cs_tasks else [])
    body = []
    for (method, budget), res in groups.items():
        if method == reference:
            continue
        ref = groups.get((reference, budget)) or groups.get((reference, None))
        if not ref:
            continue
        cells = [method, "-" if budget is None else str(budget), reference]
        for _, task, key in cols:
            d = paired_difference(res, ref, task, key)
            cells.append(_fmt(d, 4 if task == HELDOUT_JSD_TASK else 3) if d else "-")
        if cs_tasks:
            ds = [paired_difference(res, ref, t, "gold_choice_logprob") for t in cs_tasks]
            ds = [d for d in ds if d]
            cells.append(_fmt(combined_task_mean(ds)) if ds else "-")
        body.append(cells)
    return (header, body) if body else None


def _fmt(d: tuple[float, float, int], digits: int = 3) -> str:
    # JSD differences between recovered models are a few thousandths: they get 4 digits.
    mu, se, _ = d
    return f"{mu:+.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{mu:+.{digits}f}"
