"""The experiment report: a table shaped like the paper's Table 1, plots, costs and provenance,
as Markdown and as a self-contained HTML page (plots embedded as base64 PNGs)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from paser.io.cache import atomic_write_text
from paser.results import unit_label
from paser.report.paired import paired_table, task_results

TASK_LABELS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}


def _metric(results: dict | None, task: str, key: str) -> tuple[float, float] | None:
    r = task_results(results).get(task)
    if r is None:
        return None
    if task in ("heldout", "heldout_jsd"):
        value = "loss" if task == "heldout" else "jsd"
        cap = r.get("capabilities", {}).get(key)
        return (cap[value], cap.get(f"{value}_stderr", float("nan"))) if cap else None
    if key == "ppl":
        return r["ppl"], float("nan")
    return r[key], r.get(f"{key}_stderr", float("nan"))


def _agg(values: list[tuple[float, float]]) -> tuple[float, float, int]:
    """One value: (value, its stderr, 1). Several seeds: (mean, std over seeds, n)."""
    if len(values) == 1:
        return values[0][0], values[0][1], 1
    v = np.array([x[0] for x in values], dtype=float)
    return float(v.mean()), float(v.std(ddof=1)), len(v)


def _columns(rows: list[dict]) -> list[tuple[str, str, str, float]]:
    """(label, task, key, scale) for every metric some row has."""
    present: set[str] = set()
    caps: dict[str, list[str]] = {"heldout": [], "heldout_jsd": []}
    for row in rows:
        res = task_results(row.get("results"))
        present |= set(res)
        for task, seen in caps.items():
            for c in (res.get(task) or {}).get("capabilities", {}):
                if c not in seen:
                    seen.append(c)
    cols = []
    for t, lab in (("wikitext2", "WikiText-2 PPL"), ("ptb", "PTB PPL")):
        if t in present:
            cols.append((lab, t, "ppl", 1.0))
    for c in caps["heldout"]:
        cols.append((f"held-out loss {c}", "heldout", c, 1.0))
    for c in caps["heldout_jsd"]:
        cols.append((f"held-out JSD {c}", "heldout_jsd", c, 1.0))
    for t, lab in TASK_LABELS.items():
        if t in present:
            cols.append((lab, t, "acc", 100.0))
    return cols


def build_table(rows: list[dict], cols: list[tuple[str, str, str, float]] | None = None, mean_key: str | None = "acc") -> tuple[list[str], list[list[str]]]:
    """One row per (method, budget): the given columns (default: the main table's), each as
    value ± stderr for one seed or mean ± std over seeds, plus the mean over the commonsense
    tasks of `mean_key` (None: no mean column)."""
    cols = _columns(rows) if cols is None else cols
    mean_tasks = [c[1] for c in cols if c[2] == mean_key and c[1] in TASK_LABELS]
    scale = next((c[3] for c in cols if c[2] == mean_key), 1.0)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("budget")), []).append(row)
    header = ["Method", "Budget", "Seeds"] + [c[0] for c in cols] + (["Mean acc" if mean_key == "acc" else "Mean"] if mean_tasks else [])
    body = []
    for (method, budget), rs in groups.items():
        ok = [r for r in rs if r.get("results")]
        cells = [method, "-" if budget is None else str(budget), str(len(ok)) if budget is not None else "-"]
        if not ok:
            body.append(cells + ["failed"] * (len(header) - 3))
            continue
        for _, task, key, sc in cols:
            vals = [m for m in (_metric(r["results"], task, key) for r in ok) if m is not None]
            cells.append(_fmt(_agg(vals), sc, task) if vals else "-")
        if mean_tasks:
            per = [[_metric(r["results"], t, mean_key) for t in mean_tasks] for r in ok]
            if any(m is None for p in per for m in p):
                cells.append("-")
                body.append(cells)
                continue
            means = [(float(np.mean([m[0] for m in p])), float("nan")) for p in per]
            if len(ok) == 1:  # stderr of a mean of independent task means
                ses = [m[1] for m in per[0]]
                means = [(means[0][0], math.sqrt(sum(x * x for x in ses)) / len(ses))]
            cells.append(_fmt(_agg(means), scale))
        body.append(cells)
    return header, body


def headline_table(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """The further tasks some row has (lm_eval:NAME, and any registered task whose result has a
    "headline"): each task's headline metric (lm-eval's first, e.g. acc,none), value ± stderr
    for one seed or mean ± std over seeds; None when there are none. Columns end in ↑ or ↓
    (higher_is_better), which the best-value marks follow."""
    heads: dict[str, dict] = {}
    for row in rows:
        for t, r in task_results(row.get("results")).items():
            if r.get("headline"):
                heads.setdefault(t, r["headline"])
    if not heads:
        return None
    arrow = {True: " ↑", False: " ↓"}
    header = ["Method", "Budget", "Seeds"] + [f"{t.removeprefix('lm_eval:')} {h['metric'].split(',')[0]}{arrow.get(h.get('higher_is_better'), '')}"
                                              for t, h in heads.items()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("budget")), []).append(row)
    body = []
    for (method, budget), rs in groups.items():
        ok = [r for r in rs if r.get("results")]
        cells = [method, "-" if budget is None else str(budget), str(len(ok)) if budget is not None else "-"]
        for t, h in heads.items():
            vals = []
            for r in ok:
                hr = (task_results(r["results"]).get(t) or {}).get("headline")
                if hr and hr.get("metric") == h["metric"] and hr.get("value") is not None:
                    vals.append((hr["value"], hr["stderr"] if hr.get("stderr") is not None else float("nan")))
            cells.append(_fmt(_agg(vals), 100.0 if h["metric"].split(",")[0].startswith("acc") else 1.0) if vals else "-")
        body.append(cells)
    return header, body


def choice_logprob_columns(rows: list[dict]) -> list[tuple[str, str, str, float]]:
    """The commonsense tasks present, as mean log-probability of the gold choice (nats)."""
    return [(lab, t, "gold_choice_logprob", 1.0) for lab, t, key, _ in _columns(rows) if key == "acc"]


def _fmt(v: tuple[float, float, int], scale: float, task: str = "") -> str:
    mean, err, _ = v
    if task == "heldout_jsd":  # values ~0.1 that differ by thousandths: 4 digits
        return f"{mean:.4f}" + (f" ± {err:.4f}" if not math.isnan(err) else "")
    if scale == 1.0 and mean > 20:
        s = f"{mean:.1f}"
        return s + (f" ± {err:.1f}" if not math.isnan(err) else "")
    digits = 1 if scale == 100.0 else 3
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ± {err * scale:.{digits}f}" if not math.isnan(err) else "")


def markdown_table(header: list[str], body: list[list[str]], best: set[tuple[int, int]] | None = None) -> str:
    """A Markdown table; cells in `best` ((row, column) pairs) in bold."""
    def cell(i: int, j: int, c: str) -> str:
        c = c.replace("|", "\\|")
        return f"**{c}**" if best and (i, j) in best else c

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(r)) + " |" for i, r in enumerate(body)]
    return "\n".join(lines)


def _plot_vs_budget(rows: list[dict], path: Path) -> bool:
    """Mean accuracy and WikiText-2 perplexity against budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, dict[float, list[dict]]] = {}
    for r in rows:
        if r.get("budget") is None or not r.get("results"):
            continue
        try:
            b = float(r["budget"])
        except ValueError:
            continue
        by.setdefault(r["method"], {}).setdefault(b, []).append(r["results"])
    if not any(len(pts) >= 2 for pts in by.values()):  # one budget is a dot per method: no line to read
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    refs = {r["method"]: r["results"] for r in rows if r.get("budget") is None and r.get("results")}
    for method, pts in sorted(by.items()):
        bs = sorted(pts)
        accs, ppls = [], []
        for b in bs:
            summ = [res.get("summary", {}) for res in pts[b]]
            accs.append(np.mean([s.get("mean_acc", np.nan) for s in summ]) * 100)
            ppls.append(np.mean([s.get("wikitext2_ppl", np.nan) for s in summ]))
        axes[0].plot(bs, accs, "o-", label=method)
        axes[1].plot(bs, ppls, "o-", label=method)
    for name, res in refs.items():
        s = res.get("summary", {})
        if "mean_acc" in s:
            axes[0].axhline(s["mean_acc"] * 100, ls="--", lw=1, color="grey")
            axes[0].annotate(name, (axes[0].get_xlim()[0], s["mean_acc"] * 100), fontsize=7, color="grey")
        if "wikitext2_ppl" in s:
            axes[1].axhline(s["wikitext2_ppl"], ls="--", lw=1, color="grey")
            axes[1].annotate(name, (axes[1].get_xlim()[0], s["wikitext2_ppl"]), fontsize=7, color="grey")
    axes[0].set(xlabel="budget", ylabel="mean accuracy (%)", title="7-task mean accuracy")
    axes[1].set(xlabel="budget", ylabel="perplexity", title="WikiText-2 perplexity (lower is better)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save_figure(fig, path)
    return True


def _save_figure(fig, path: Path) -> None:
    """PNG written atomically (a report reader never sees half an image), figure closed."""
    import io

    import matplotlib.pyplot as plt

    from paser.io.cache import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plot_by_method(rows: list[dict], path: Path) -> bool:
    """One point per method and budget (and the reference rows) for the primary metrics: WikiText-2
    perplexity, held-out loss over all capabilities, mean gold-choice log-probability. Points are
    means over seeds, whiskers the std over seeds (none for a single seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("results"):
            label = r["method"] if r.get("budget") is None else f"{r['method']} @{r['budget']}"
            groups.setdefault(label, []).append(r["results"])
    if len(groups) < 2:
        return False
    cs_tasks = [t for t in TASK_LABELS if any(t in task_results(g) for rs in groups.values() for g in rs)]

    def lp_mean(res: dict) -> float:
        vals = [task_results(res)[t]["gold_choice_logprob"] for t in cs_tasks if t in task_results(res)]
        return float(np.mean(vals)) if vals else float("nan")

    def one(task: str, key: str):
        return lambda res: (_metric(res, task, key) or (float("nan"),))[0]

    panels = [
        ("WikiText-2 perplexity (lower is better)", one("wikitext2", "ppl")),
        ("held-out loss, all capabilities (nats, lower is better)", one("heldout", "all")),
        ("gold-choice log-prob, task mean (higher is better)", lp_mean),
    ]
    labels = list(groups)
    # only the panels some model was evaluated on: an empty panel carries nothing
    panels = [(t, fn) for t, fn in panels if any(np.isfinite(fn(res)) for rs in groups.values() for res in rs)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 1.3 + 0.4 * len(labels)), squeeze=False)
    axes = axes[0]
    for ax, (title, fn) in zip(axes, panels):
        vals = [np.array([fn(res) for res in groups[lab]], dtype=float) for lab in labels]
        means = [float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for v in vals]
        errs = [float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0 for v in vals]
        y = np.arange(len(labels))
        # points, not bars: the axis is zoomed on the differences, and bars would exaggerate them
        for yi, m, e, lab in zip(y, means, errs, labels):
            ax.errorbar([m], [yi], xerr=[e], fmt="o", capsize=3, color="#9aa5b1" if "@" not in lab else "#4c78a8")
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(labels))
        ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top, no point on the frame
        finite = [m for m in means if np.isfinite(m)]
        if finite:  # zoom on the differences between models
            lo, hi = min(finite), max(finite)
            pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
            ax.set_xlim(lo - pad, hi + pad)
        else:
            ax.text(0.5, 0.5, "not evaluated", transform=ax.transAxes, ha="center", color="grey")
            ax.set_xticks([])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        for yi, m in zip(y, means):
            if np.isfinite(m):
                ax.annotate(f"{m:.3g}", (m, yi), xytext=(6, 5), textcoords="offset points", va="bottom", fontsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
    _save_figure(fig, path)
    return True


def _row_label(row: dict) -> str:
    return unit_label(row["method"], row.get("budget"), row.get("seed"))


def _whole(v) -> str:
    """A count or a number of seconds, rounded, with thousands separators; "-" when unknown."""
    return "-" if v is None else f"{v:,.0f}"


def cost_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Records, time and tokens per unit and stage, read from what each stage recorded when it ran.

    The stages record their own cost, so a run resumed from its cache still reports what
    each stage took, not the milliseconds of reading it back. Evaluation time is the sum of
    the tasks' recorded times. Selection time includes scoring only where this unit scored:
    seeds after the first reuse the cached scores. "-": not run or not recorded.
    """
    header = ["Unit", "select (s)", "tokens scored", "recover (s)", "tokens trained", "evaluate (s)", "total (s)", "records"]
    sels = summary.get("selections", {})
    body: list[list[str]] = []
    sums = [0.0, 0, 0.0, 0, 0.0]
    for r in summary["rows"]:
        label = _row_label(r)
        sel = sels.get(label, {})
        rec = r.get("recovery") or {}
        tasks = task_results(r.get("results"))
        ev = sum(t.get("seconds") or 0.0 for t in tasks.values()) if tasks else None
        vals = [sel.get("seconds"), sel.get("tokens_scored"), rec.get("seconds_total", rec.get("seconds")), rec.get("tokens_trained"), ev]
        for i, v in enumerate(vals):
            sums[i] += v or 0
        secs = [v for v in (vals[0], vals[2], vals[4]) if v is not None]
        body.append([label, _whole(vals[0]), _whole(vals[1]), _whole(vals[2]), _whole(vals[3]), _whole(vals[4]),
                     _whole(sum(secs) if secs else None), _whole(sel.get("selected"))])
    if body:
        body.append(["all", *(_whole(v) for v in sums), _whole(sums[0] + sums[2] + sums[4]), "-"])
    return header, body


def composition_table(summary: dict) -> tuple[list[str], list[list[str]]] | None:
    """Selected records per capability for every unit (None when records carry no capability):
    where each method spent its budget, which is what explains most per-capability differences."""
    sels = summary.get("selections", {})
    caps = sorted({c for s in sels.values() for c in (s.get("capabilities") or {})})
    if not caps:
        return None
    tokens = {_row_label(r): (r.get("recovery") or {}).get("tokens_trained") for r in summary["rows"]}
    header = ["Unit", *caps, "records", "response tokens trained"]
    body = []
    for label, s in sels.items():
        c = s.get("capabilities") or {}
        n = sum(c.values())
        body.append([label, *(f"{c.get(k, 0)} ({100 * c.get(k, 0) / n:.0f} %)" if n else "0" for k in caps), str(s.get("selected") or n), _whole(tokens.get(label))])
    return header, body


def write_experiment_report(summary: dict, root: Path) -> tuple[str, Path]:
    """Writes report.md and report.html under root; returns (the tables to print, html path)."""
    rows = summary["rows"]
    header, body = build_table(rows)
    table = markdown_table(header, body)
    # Secondary tables: log-probability of the gold choice (separates small models better than
    # accuracy), and paired differences against random and against the unrecovered model.
    extra: list[tuple[str, str, tuple[list[str], list[list[str]]]]] = []
    lp_cols = choice_logprob_columns(rows)
    if lp_cols:
        extra.append(("Commonsense: log-probability of the gold choice",
                      "Mean over items of log softmax(choice log-likelihoods)[gold], nats; higher is better. "
                      "± standard error (one seed) or std over seeds.",
                      build_table(rows, lp_cols, mean_key="gold_choice_logprob")))
    lm = headline_table(rows)
    if lm:
        only_lm_eval = all(t.startswith("lm_eval:") for row in rows for t, r in task_results(row.get("results")).items() if r.get("headline"))
        extra.append(("lm-evaluation-harness tasks" if only_lm_eval else "Further tasks",
                      "Tasks run with --tasks lm_eval:NAME (lm-eval's own prompts and metrics on the same models) "
                      "and registered tasks with a headline metric (acc in %). ± stderr (one seed) or std over seeds.", lm))
    methods = {r["method"] for r in rows}
    for ref in ("random", "pruned, no recovery"):
        pt = paired_table(rows, ref) if ref in methods else None
        if pt:
            extra.append((f"Paired differences against {ref}",
                          "Per window, record or item, method minus reference (each method's value averaged over its seeds "
                          "first), then mean ± paired standard error. Negative is better for NLL and loss, positive for "
                          "the gold log-probability.", pt))
    comp = composition_table(summary)
    if comp:
        extra.append(("Selected data by capability",
                      "Records each unit selected, by the pool's `capability` field (full data: the whole pool), "
                      "and the response tokens its recovery trained on (all epochs).", comp))
    plots: list[tuple[str, Path]] = []
    if _plot_by_method(rows, root / "metrics_by_method.png"):
        plots.append(("Primary metrics by method (mean over seeds, whiskers: std over seeds)", root / "metrics_by_method.png"))
    if _plot_vs_budget(rows, root / "metrics_vs_budget.png"):
        plots.append(("Accuracy and perplexity against budget", root / "metrics_vs_budget.png"))
    for label, sel in summary.get("selections", {}).items():
        if label.startswith("paser"):
            d = Path(sel["dir"])
            for name, title in (("cluster_map.png", "Cluster map (PASER, coloured by CDS)"), ("budget_per_cluster.png", "Budget per cluster (PASER)")):
                if (d / name).exists():
                    plots.append((f"{title}: {label}", d / name))
            break

    cost_h, cost_b = cost_table(summary)
    costs = summary.get("costs_s", {})
    cost_note = "Per unit, as each stage recorded it when it ran (cached stages keep their original cost)." + (
        " This invocation's wall time: " + ", ".join(f"{k} {v:,.0f} s" for k, v in costs.items()) + "." if costs else "")
    env = summary.get("environment", {})
    eval_cfg = summary["config"].get("evaluate", {})
    prog = summary.get("progress") or {}
    status = (
        f"Incomplete: {prog['units_done']} of {prog['units_total']} select/recover/evaluate units done; "
        "re-run the same command to continue (finished stages are cached)."
        if prog and not prog.get("complete", True) else ""
    )
    arch = summary.get("archive") or {}
    if arch.get("reused"):
        status += (" " if status else "") + (
            f"{len(arch['reused'])} row(s) were read from the results archive `{arch['dir']}` "
            f"({', '.join(arch['reused'])}), where earlier runs left them."
        )
    if arch.get("fingerprint_differs"):
        status += (
            f" Of those, {', '.join(arch['fingerprint_differs'])} came from a pruned model whose weights differ "
            f"from this run's ({arch.get('pruned_fingerprint')}): the same pruning configuration, another machine's result."
        )
    from paser.report.verdict import best_cells, verdicts

    verdict = verdicts(summary)
    best = best_cells(header, body)
    extra_best = [best_cells(h, b) for _, _, (h, b) in extra]
    best_note = ("Bold: the best value of each column among the selection methods at the same budget "
                 "(not the dense, unrecovered or full-data references).")
    clusters = _cluster_section(summary)
    md = [
        "# paser experiment report",
        "",
        *(["## Verdict", "", *[f"- {v}" for v in verdict], ""] if verdict else []),
        f"Pruned model: `{summary['pruned_model']}`. Evaluation: {json.dumps(eval_cfg)} "
        "(accuracies in %, ± standard error for one seed, ± std over seeds for several; perplexity: windows of "
        f"{eval_cfg.get('ppl_window', 512)} tokens over the first {eval_cfg.get('ppl_tokens', 16384)} tokens). {best_note}",
        "",
        *([f"**{status}**", ""] if status else []),
        markdown_table(header, body, best),
        "",
    ]
    for (title, note, (h, b)), bst in zip(extra, extra_best):
        md += [f"## {title}", "", note, "", markdown_table(h, b, bst), ""]
    if clusters:
        md += ["## Clusters of " + clusters["label"], "", clusters["note"], "", _cluster_markdown(clusters), ""]
    md += [
        "## Costs",
        "",
        cost_note,
        "",
        markdown_table(cost_h, cost_b),
        "",
    ]
    if summary.get("failures"):
        md += ["## Failed stages", *[f"- {f['stage']}: {f['error']}" for f in summary["failures"]], ""]
    if plots:
        md += ["## Plots", *[f"![{t}]({p.relative_to(root) if p.is_relative_to(root) else p})" for t, p in plots], ""]
    md += ["## Configuration", "```json", json.dumps(summary["config"], indent=2), "```", "", "## Environment", "```json", json.dumps(env, indent=2), "```"]
    atomic_write_text(root / "report.md", "\n".join(md) + "\n")

    def img(p: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    extra_html = "".join(f"<h2>{html.escape(t)}</h2><p>{html.escape(n)}</p>{html_table(h, b, bst)}"
                         for (t, n, (h, b)), bst in zip(extra, extra_best))
    # A figure wider than it is tall (the by-method panels) gets the page's width, the others 640 px.
    figs = "".join(
        f'<figure class="{"wide" if p.name == "metrics_by_method.png" else ""}"><img src="{img(p)}" alt="{html.escape(t)}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, p in plots
    )
    verdict_html = ("<section class=\"verdict\"><h2>Verdict</h2><ul>" + "".join(f"<li>{_md_bold_to_html(v)}</li>" for v in verdict)
                    + "</ul></section>") if verdict else ""
    clusters_html = (f"<h2>Clusters of {html.escape(clusters['label'])}</h2><p>{html.escape(clusters['note'])}</p>"
                     + _cluster_html(clusters)) if clusters else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>paser experiment report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1800px; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 0.8rem; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
td {{ white-space: nowrap; }} /* a value and its ± stay on one line */
th {{ background: #f0f3f8; }} td:first-child, th:first-child {{ text-align: left; }}
td.best {{ font-weight: bold; background: #e6f4ea; }}
table.clusters td, table.clusters th {{ text-align: left; vertical-align: top; }}
table.clusters td.num {{ text-align: right; }}
table.clusters td.text {{ white-space: normal; min-width: 14rem; max-width: 22rem; }}
table.clusters td.examples {{ white-space: normal; min-width: 28rem; max-width: 46rem; font-size: 0.8rem; }}
.ex {{ margin: 0 0 4px 0; }} .ex .resp {{ color: #555; }}
.verdict {{ background: #f7f9fc; border-left: 4px solid #4c78a8; padding: 0.2rem 1rem; margin-bottom: 1rem; }}
.verdict h2 {{ margin: 0.5rem 0; font-size: 1.2rem; }} .verdict li {{ margin: 0.3rem 0; }}
figure {{ display: inline-block; margin: 1rem; vertical-align: top; }} img {{ max-width: 640px; border: 1px solid #ddd; }}
figure.wide {{ display: block; }} figure.wide img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 1rem; overflow-x: auto; font-size: 0.8rem; }}
</style></head><body>
<h1>paser experiment report</h1>
{verdict_html}
<p>Pruned model: <code>{html.escape(summary['pruned_model'])}</code>. Evaluation: <code>{html.escape(json.dumps(eval_cfg))}</code>.
Accuracies in %, ± standard error (one seed) or ± std over seeds. {html.escape(best_note)}</p>
{f"<p><strong>{html.escape(status)}</strong></p>" if status else ""}
{html_table(header, body, best)}
{extra_html}
{clusters_html}
<h2>Costs</h2><p>{html.escape(cost_note)}</p>{html_table(cost_h, cost_b)}
{"<h2>Failed stages</h2><pre>" + html.escape(chr(10).join(f['stage'] + ': ' + f['error'] for f in summary['failures'])) + "</pre>" if summary.get('failures') else ""}
{"<h2>Plots</h2>" + figs if plots else ""}
<h2>Configuration</h2><pre>{html.escape(json.dumps(summary['config'], indent=2))}</pre>
<h2>Environment</h2><pre>{html.escape(json.dumps(env, indent=2))}</pre>
</body></html>
"""
    atomic_write_text(root / "report.html", page)
    # What the terminal shows: the verdict, the main table and the paired comparison with
    # random, the question a user asks first ("does this selection beat random at this budget?").
    shown = ("\n".join(f"Verdict: {v.replace('**', '')}" for v in verdict) + "\n\n" if verdict else "") + table
    for title, _, (h, b) in extra:
        if title.startswith("Paired differences against random"):
            shown += f"\n\n{title} (negative is better for NLL and loss):\n" + markdown_table(h, b)
    return shown, root / "report.html"


def html_table(h: list[str], b: list[list[str]], best: set[tuple[int, int]] | None = None) -> str:
    """An HTML table (in a horizontally scrolling box); cells in `best` get class "best"."""
    th = "".join(f"<th>{html.escape(x)}</th>" for x in h)
    mark = ' class="best"'

    def td(i: int, j: int, c: str) -> str:
        # thin spaces around ±: wide tables (17 columns) fit a 1400 px page without wrapping
        return f"<td{mark if best and (i, j) in best else ''}>{html.escape(c).replace(' ± ', chr(0x2009) + '±' + chr(0x2009))}</td>"

    trs = "".join("<tr>" + "".join(td(i, j, c) for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(b))
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>'


def _md_bold_to_html(text: str) -> str:
    """The verdict's **bold** (written for Markdown) as <strong>, everything else escaped."""
    parts = text.split("**")
    return "".join(f"<strong>{html.escape(p)}</strong>" if k % 2 else html.escape(p) for k, p in enumerate(parts))


def _cluster_section(summary: dict) -> dict | None:
    """The first PASER selection's clusters: table cells and examples, with a note saying what
    the columns are and where the other selections' clusters are."""
    from paser.report.clusters import cluster_rows, cluster_table, first_cluster_selection

    found = first_cluster_selection(summary.get("selections") or {})
    if found is None:
        return None
    label, d = found
    rows = cluster_rows(d)
    if not rows:
        return None
    header, body, examples = cluster_table(rows)
    note = ("Per cluster: records in the pool, CDS (its mean JSD between the original and the pruned model), "
            "budget n_k given by CDS, records selected, key phrases most of its records share, and the two selected "
            "records the method ranked first (truncated).")
    if not any(examples):
        note += (" Key phrases and examples need the selection's scores.parquet and selected.jsonl, which "
                 f"{d} does not hold (archived rows keep only the selection's report).")
    others = [k for k in (summary.get("selections") or {}) if k.startswith("paser") and k != label]
    if others:
        note += f" Other PASER selections ({', '.join(others)}): their selection directories."
    return {"label": label, "dir": str(d), "header": header, "body": body, "examples": examples, "note": note}


def _cluster_markdown(c: dict) -> str:
    has_ex = any(c["examples"])
    header = c["header"] + (["Examples (prompt → response)"] if has_ex else [])
    body = [r + ([" · ".join(f"{i + 1}. {p} → {a}" for i, (p, a) in enumerate(ex)) or "-"] if has_ex else [])
            for r, ex in zip(c["body"], c["examples"])]
    return markdown_table(header, body)


def _cluster_html(c: dict) -> str:
    has_ex = any(c["examples"])
    th = "".join(f"<th>{html.escape(x)}</th>" for x in c["header"] + (["Examples (prompt → response)"] if has_ex else []))
    text_cols = {j for j, x in enumerate(c["header"]) if x in ("Key phrases", "Main sources")}
    trs = []
    for r, ex in zip(c["body"], c["examples"]):
        tds = "".join(f'<td class="{"text" if j in text_cols else "num"}">{html.escape(v)}</td>' for j, v in enumerate(r))
        if has_ex:
            tds += '<td class="examples">' + ("".join(
                f'<p class="ex">{i + 1}. {html.escape(p)} <span class="resp">→ {html.escape(a)}</span></p>'
                for i, (p, a) in enumerate(ex)) or "-") + "</td>"
        trs.append(f"<tr>{tds}</tr>")
    return f'<div class="scroll"><table class="clusters"><thead><tr>{th}</tr></thead><tbody>{"".join(trs)}</tbody></table></div>'
