"""The experiment report: a table shaped like the paper's Table 1, plots, costs and provenance,
as Markdown and as a self-contained HTML page (plots embedded as base64 PNGs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from paser.io.cache import atomic_write_text
from paser.io.figures import pyplot, save_png
from paser.report.clusters import cluster_rows, cluster_table, first_cluster_selection
from paser.report.document import (
    BulletList, CodeBlock, Document, Examples, Figures, Heading, Image, Paragraph, Section, Table, html_table,
    markdown_table, to_html, to_markdown,
)
from paser.report.paired import TASK_LABELS, paired_table, task_results
from paser.report.verdict import best_cells, verdicts
from paser.results import unit_label

__all__ = ["build_table", "choice_logprob_columns", "composition_table", "cost_table", "headline_table", "html_table",
           "experiment_document", "markdown_table", "write_experiment_report", "TASK_LABELS"]


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


def _plot_vs_budget(rows: list[dict], path: Path) -> bool:
    """Mean accuracy and WikiText-2 perplexity against budget, one line per method."""
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
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
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
    save_png(fig, path, dpi=110, tight_layout=True)
    return True


def _plot_by_method(rows: list[dict], path: Path) -> bool:
    """One point per method and budget (and the reference rows) for the primary metrics: WikiText-2
    perplexity, held-out loss over all capabilities, mean gold-choice log-probability. Points are
    means over seeds, whiskers the std over seeds (none for a single seed)."""
    plt = pyplot()
    import matplotlib.ticker  # with pyplot: on first use only

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
    save_png(fig, path, dpi=110, tight_layout=True)
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


_STYLE = """body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1800px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.8rem; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
td { white-space: nowrap; } /* a value and its ± stay on one line */
th { background: #f0f3f8; } td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #e6f4ea; }
table.clusters td, table.clusters th { text-align: left; vertical-align: top; }
table.clusters td.num { text-align: right; }
table.clusters td.text { white-space: normal; min-width: 14rem; max-width: 22rem; }
table.clusters td.examples { white-space: normal; min-width: 28rem; max-width: 46rem; font-size: 0.8rem; }
.ex { margin: 0 0 4px 0; } .ex .resp { color: #555; }
.verdict { background: #f7f9fc; border-left: 4px solid #4c78a8; padding: 0.2rem 1rem; margin-bottom: 1rem; }
.verdict h2 { margin: 0.5rem 0; font-size: 1.2rem; } .verdict li { margin: 0.3rem 0; }
figure { display: inline-block; margin: 1rem; vertical-align: top; } img { max-width: 640px; border: 1px solid #ddd; }
figure.wide { display: block; } figure.wide img { max-width: 100%; }
pre { background: #f7f7f7; padding: 1rem; overflow-x: auto; font-size: 0.8rem; }
"""

_BEST_NOTE = ("Bold: the best value of each column among the selection methods at the same budget "
              "(not the dense, unrecovered or full-data references).")


def _secondary_tables(summary: dict) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:
    """(title, note, table) of the tables after the main one: log-probability of the gold choice
    (separates small models better than accuracy), further tasks, paired differences against
    random and against the unrecovered model, and the selected data by capability."""
    rows = summary["rows"]
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
    return extra


def _plots(summary: dict, root: Path) -> list[Image]:
    """The report's own plots (drawn into root) and the first PASER selection's (drawn by select)."""
    rows = summary["rows"]

    def image(title: str, p: Path, wide: bool = False) -> Image:
        return Image(p, title, str(p.relative_to(root) if p.is_relative_to(root) else p), wide)

    plots = []
    if _plot_by_method(rows, root / "metrics_by_method.png"):
        # wider than it is tall: the page's width in HTML, where the others get 640 px
        plots.append(image("Primary metrics by method (mean over seeds, whiskers: std over seeds)", root / "metrics_by_method.png", wide=True))
    if _plot_vs_budget(rows, root / "metrics_vs_budget.png"):
        plots.append(image("Accuracy and perplexity against budget", root / "metrics_vs_budget.png"))
    for label, sel in summary.get("selections", {}).items():
        if label.startswith("paser"):
            d = Path(sel["dir"])
            for name, title in (("cluster_map.png", "Cluster map (PASER, coloured by CDS)"), ("budget_per_cluster.png", "Budget per cluster (PASER)")):
                if (d / name).exists():
                    plots.append(image(f"{title}: {label}", d / name))
            break
    return plots


def _status(summary: dict) -> str:
    """What a reader must know before the numbers: an incomplete run, rows read from the archive."""
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
    return status


def experiment_document(summary: dict, root: Path) -> Document:
    """The experiment report as a document (drawing its plots into root): verdict, main table,
    secondary tables, clusters, costs, failures, plots, configuration and environment."""
    return _report(summary, root)[0]


def _report(summary: dict, root: Path) -> tuple[Document, str]:
    """The document, and what the terminal shows: the verdict, the main table and the paired
    comparison with random, the question a user asks first ("does this selection beat random
    at this budget?")."""
    rows = summary["rows"]
    header, body = build_table(rows)
    eval_cfg = summary["config"].get("evaluate", {})
    doc = Document("paser experiment report", style=_STYLE)
    verdict = verdicts(summary)
    extra = _secondary_tables(summary)
    shown = ("\n".join(f"Verdict: {v.replace('**', '')}" for v in verdict) + "\n\n" if verdict else "") + markdown_table(header, body)
    for title, _, (h, b) in extra:
        if title.startswith("Paired differences against random"):
            shown += f"\n\n{title} (negative is better for NLL and loss):\n" + markdown_table(h, b)
    if verdict:
        doc.add(Section([Heading("Verdict"), BulletList(verdict)], css_class="verdict"))
    doc.add(Paragraph(
        f"Pruned model: `{summary['pruned_model']}`. Evaluation: {json.dumps(eval_cfg)} "
        "(accuracies in %, ± standard error for one seed, ± std over seeds for several; perplexity: windows of "
        f"{eval_cfg.get('ppl_window', 512)} tokens over the first {eval_cfg.get('ppl_tokens', 16384)} tokens). {_BEST_NOTE}"))
    status = _status(summary)
    if status:
        doc.add(Paragraph(f"**{status}**"))
    doc.add(Table(header, body, best_cells(header, body)))
    for title, note, (h, b) in extra:
        doc.add(Heading(title), Paragraph(note), Table(h, b, best_cells(h, b)))
    clusters = _cluster_section(summary)
    if clusters:
        doc.add(Heading("Clusters of " + clusters["label"]), Paragraph(clusters["note"]), _cluster_table(clusters))
    cost_h, cost_b = cost_table(summary)
    costs = summary.get("costs_s", {})
    cost_note = "Per unit, as each stage recorded it when it ran (cached stages keep their original cost)." + (
        " This invocation's wall time: " + ", ".join(f"{k} {v:,.0f} s" for k, v in costs.items()) + "." if costs else "")
    doc.add(Heading("Costs"), Paragraph(cost_note), Table(cost_h, cost_b))
    if summary.get("failures"):
        doc.add(Heading("Failed stages", tight=True), BulletList([f"{f['stage']}: {f['error']}" for f in summary["failures"]], literal=True))
    plots = _plots(summary, root)
    if plots:
        doc.add(Heading("Plots", tight=True), Figures(plots))
    doc.add(Heading("Configuration", tight=True), CodeBlock(json.dumps(summary["config"], indent=2), "json"),
            Heading("Environment", tight=True), CodeBlock(json.dumps(summary.get("environment", {}), indent=2), "json"))
    return doc, shown


def write_experiment_report(summary: dict, root: Path) -> tuple[str, Path]:
    """Writes report.md and report.html under root; returns (the tables to print, html path)."""
    doc, shown = _report(summary, root)
    atomic_write_text(root / "report.md", to_markdown(doc))
    atomic_write_text(root / "report.html", to_html(doc))
    return shown, root / "report.html"


def _cluster_section(summary: dict) -> dict | None:
    """The first PASER selection's clusters: table cells and examples, with a note saying what
    the columns are and where the other selections' clusters are."""
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


def _cluster_table(c: dict) -> Table:
    """Text columns wrap in HTML, numbers align right; the examples column only when there are examples."""
    has_ex = any(c["examples"])
    header = c["header"] + (["Examples (prompt → response)"] if has_ex else [])
    body = [list(r) + ([Examples(list(ex))] if has_ex else []) for r, ex in zip(c["body"], c["examples"])]
    classes = ["text" if x in ("Key phrases", "Main sources") else "num" for x in c["header"]]
    return Table(header, body, css_class="clusters", column_classes=classes)
