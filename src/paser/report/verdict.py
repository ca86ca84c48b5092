"""The report's answer first: which selection method won, by how much, at what cost; and the
best value of every table column.

The primary metric is the held-out response loss over all capabilities when it was
evaluated (it measures what recovery trains for, on records no method selected), else
WikiText-2 perplexity. "Won" is the lowest mean over seeds among the selection methods at one
budget; full data is the reference it is compared with, not a contender. The margin is read
against random with the paired difference of `paser.report.paired` (unit by unit, the error
that can tell methods apart at small budgets), and called clear only beyond 2 paired SE.
"""

from __future__ import annotations

import math

import numpy as np

from paser.results import unit_label
from paser.report.paired import TASK_LABELS, paired_difference, task_results

REFERENCE_METHODS = ("full",)  # rows with a budget that are references, not selections


def primary_metric(rows: list[dict]) -> tuple[str, str, str, str] | None:
    """(task, key of the table value, key of the paired difference, label); None when neither
    held-out loss nor WikiText-2 perplexity was evaluated."""
    for r in rows:
        h = task_results(r.get("results")).get("heldout")
        if h and "all" in (h.get("capabilities") or {}):
            return "heldout", "all", "all", "held-out loss, all capabilities (nats, lower is better)"
    if any("wikitext2" in task_results(r.get("results")) for r in rows):
        return "wikitext2", "ppl", "nll", "WikiText-2 perplexity (lower is better)"
    return None


def _value(results: dict, task: str, key: str) -> float | None:
    r = task_results(results).get(task)
    if not r:
        return None
    if task == "heldout":
        cap = (r.get("capabilities") or {}).get(key)
        return float(cap["loss"]) if cap else None
    return float(r[key]) if r.get(key) is not None else None


def _cost(rows: list[dict], selections: dict) -> tuple[float | None, float | None]:
    """Mean over seeds of (response tokens trained, select + recover seconds) as recorded."""
    tokens, secs = [], []
    for r in rows:
        rec = r.get("recovery") or {}
        if rec.get("tokens_trained") is not None:
            tokens.append(float(rec["tokens_trained"]))
        s_rec = rec.get("seconds_total", rec.get("seconds"))
        s_sel = (selections.get(unit_label(r["method"], r.get("budget"), r.get("seed"))) or {}).get("seconds")
        if s_rec is not None or s_sel is not None:
            secs.append(float(s_rec or 0) + float(s_sel or 0))
    return (float(np.mean(tokens)) if tokens else None, float(np.mean(secs)) if secs else None)


def _fmt_value(v: float, task: str) -> str:
    return f"{v:.1f}" if task == "wikitext2" else f"{v:.3f}"


def _pm(mu: float, se: float) -> str:
    """mean ± SE with enough decimals to show the SE (at least 3, at most 6)."""
    if math.isnan(se):
        return f"{mu:+.3f}"
    d = 3 if se <= 0 or se >= 1e-3 else min(6, 1 - math.floor(math.log10(se)))
    return f"{mu:+.{d}f} ± {se:.{d}f}"


def _fmt_cost(tokens: float | None, secs: float | None) -> str:
    parts = [f"{tokens:,.0f} trained tokens" if tokens is not None else "trained tokens not recorded",
             f"{secs:,.0f} s" if secs is not None else "time not recorded"]
    return ", ".join(parts)


def verdicts(summary: dict) -> list[str]:
    """One sentence per budget (plain text with **bold** for Markdown), best first."""
    rows = summary["rows"]
    pm = primary_metric(rows)
    if pm is None:
        return []
    task, key, pkey, label = pm
    unit = "nats" if task == "heldout" else "nats of NLL"
    selections = summary.get("selections") or {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("budget") is not None and r.get("results") and _value(r["results"], task, key) is not None:
            groups.setdefault((r["method"], str(r["budget"])), []).append(r)
    out = []
    for budget in dict.fromkeys(b for _, b in groups):
        cands = {m: rs for (m, b), rs in groups.items() if b == budget and m not in REFERENCE_METHODS}
        if not cands:
            continue
        means = {m: float(np.mean([_value(r["results"], task, key) for r in rs])) for m, rs in cands.items()}
        ranked = sorted(means, key=means.get)
        best = ranked[0]
        n_seeds = len(cands[best])
        s = (f"At budget {budget}, on {label}: **{best}** is best, {_fmt_value(means[best], task)} "
             f"({n_seeds} seed{'s' if n_seeds > 1 else ''})")
        if len(ranked) > 1:
            s += (f", {means[ranked[1]] - means[best]:.3g} below {ranked[1]}; ranking: "
                  + " < ".join(f"{m} {_fmt_value(means[m], task)}" for m in ranked))
        s += "."
        # paired differences against random: the best method's (the runner-up's when random is
        # best), and paser's, the method this tool is about
        other = best if best != "random" else (ranked[1] if len(ranked) > 1 else None)
        for m in dict.fromkeys(x for x in (other, "paser") if x in cands and x != "random"):
            if "random" not in cands:
                break
            d = paired_difference([r["results"] for r in cands[m]], [r["results"] for r in cands["random"]], task, pkey)
            if d is not None:
                mu, se, n = d
                clear = not math.isnan(se) and abs(mu) > 2 * se
                s += (f" Paired {m} − random: {_pm(mu, se)} {unit} over {n} {'records' if task == 'heldout' else 'windows'} "
                      f"({'beyond 2 paired SE: a clear difference' if clear else 'within 2 paired SE: no clear difference'}).")
        shown = list(dict.fromkeys(m for m in (best, other, "paser", "random") if m in cands))
        s += " Cost per seed (select + recover): " + "; ".join(f"{m} {_fmt_cost(*_cost(cands[m], selections))}" for m in shown) + "."
        ref = [(m, rs) for (m, b), rs in groups.items() if b == budget and m in REFERENCE_METHODS]
        for m, rs in ref:
            v = float(np.mean([_value(r["results"], task, key) for r in rs]))
            s += f" For reference, {m} data: {_fmt_value(v, task)} ({_fmt_cost(*_cost(rs, selections))})."
        out.append(s)
    return out


# ----------------------------------------------------------------------------- best per column


def column_direction(label: str) -> str | None:
    """'min' or 'max' for a metric column of the report's tables; None for the others."""
    low = label.lower()
    if label.endswith(("↑", "↓")):  # lm-eval columns carry lm-eval's own direction
        return "max" if label.endswith("↑") else "min"
    if label.startswith("Δ gold") or label in ("Mean", "Mean acc"):
        return "max"
    if any(w in low for w in ("ppl", "loss", "jsd", "nll")):
        return "min"
    return "max" if label in TASK_LABELS.values() else None


def _number(cell: str) -> float | None:
    try:
        return float(cell.split(" ± ")[0].replace(",", "").replace("**", ""))
    except ValueError:
        return None


def best_cells(header: list[str], body: list[list[str]]) -> set[tuple[int, int]]:
    """(row, column) of the best value of each metric column among the selection methods at the
    same budget (column 1), comparing the values as shown (equal shown values are all marked).
    Reference rows (no budget: dense, unrecovered; full data) are not contenders."""
    best: set[tuple[int, int]] = set()
    by_budget: dict[str, list[int]] = {}
    for i, row in enumerate(body):
        if len(row) > 1 and row[1] not in ("-", "") and row[0] not in REFERENCE_METHODS:
            by_budget.setdefault(row[1], []).append(i)
    for j, lab in enumerate(header):
        d = column_direction(lab)
        if d is None:
            continue
        for idx in by_budget.values():
            vals = {i: _number(body[i][j]) for i in idx if j < len(body[i])}
            vals = {i: v for i, v in vals.items() if v is not None}
            if len(vals) < 2:
                continue
            if len(set(vals.values())) == 1:  # all equal as shown: a mark would say nothing
                continue
            target = (min if d == "min" else max)(vals.values())
            best |= {(i, j) for i, v in vals.items() if v == target}
    return best
