"""The experiment report's secondary tables: gold-choice log-probability and paired differences."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from paser.evaluate.zeroshot import choice_metrics, item_metrics
from paser.report.experiment import build_table, choice_logprob_columns, write_experiment_report
from paser.report.paired import combined_task_mean, paired_difference, paired_table, unit_values


def _result(rng, shift: float, n_rec: int = 40, n_items: int = 30, n_win: int = 8) -> dict:
    """An evaluation result with per-unit arrays; `shift` moves every loss by the same amount
    on top of a per-unit difficulty shared by all models (what makes pairing pay)."""
    diff_rec = np.linspace(1.0, 3.0, n_rec)
    diff_win = np.linspace(3.0, 4.0, n_win)
    caps = ["general", "math"] * (n_rec // 2)
    loss = diff_rec + shift + rng.normal(0, 0.01, n_rec)
    win = diff_win + shift + rng.normal(0, 0.01, n_win)
    lls = [[-1.0 - shift, -2.0 + 0.1 * (i % 3)] for i in range(n_items)]
    golds = [0] * n_items
    per_item = [item_metrics(ll, ["a", "bb"], g) for ll, g in zip(lls, golds)]
    cs = {m: float(np.mean([p[m] for p in per_item])) for m in per_item[0]}
    cs.update({f"{m}_stderr": 0.01 for m in per_item[0]})
    return {
        "results": {
            "wikitext2": {"ppl": float(math.exp(win.mean())), "nll": float(win.mean()), "window_nll": win.tolist()},
            "heldout": {
                "capabilities": {c: {"loss": float(loss[[k == c for k in caps]].mean()), "loss_stderr": 0.1} for c in ("general", "math")},
                "record_ids": [f"r{i}" for i in range(n_rec)],
                "record_capabilities": caps,
                "record_loss": loss.tolist(),
            },
            "piqa": {**cs, "n": n_items, "items": {"indices": list(range(n_items)), "lls": lls, "golds": golds}},
        },
        "summary": {},
    }


def test_choice_metrics_match_item_metrics_and_the_definition():
    lls, gold = [-3.0, -1.0, -2.0], 2
    m = choice_metrics(lls, gold)
    assert m["acc"] == 0.0 and m["gold_loglik"] == -2.0
    assert m["gold_choice_logprob"] == pytest.approx(-2.0 - math.log(math.exp(-3) + math.exp(-1) + math.exp(-2)))
    full = item_metrics(lls, ["a", "b", "c"], gold)
    assert all(full[k] == v for k, v in m.items())


def test_paired_difference_recovers_the_shift_with_a_small_error():
    rng = np.random.default_rng(0)
    a, b = _result(rng, -0.1), _result(rng, 0.0)
    mu, se, n = paired_difference([a], [b], "heldout", "all")
    assert n == 40 and mu == pytest.approx(-0.1, abs=0.01)
    # the unpaired error is dominated by the per-record difficulty; the paired one is not
    unpaired = np.std(a["results"]["heldout"]["record_loss"], ddof=1) / math.sqrt(40)
    assert se < unpaired / 10
    d = np.array(a["results"]["heldout"]["record_loss"]) - np.array(b["results"]["heldout"]["record_loss"])
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
    mu_m, _, n_m = paired_difference([a], [b], "heldout", "math")
    assert n_m == 20 and mu_m == pytest.approx(-0.1, abs=0.01)
    mu_w, _, n_w = paired_difference([a], [b], "wikitext2", "nll")
    assert n_w == 8 and mu_w == pytest.approx(-0.1, abs=0.01)
    mu_c, _, _ = paired_difference([a], [b], "piqa", "gold_loglik")
    assert mu_c == pytest.approx(0.1)


def test_seeds_are_averaged_per_unit_before_pairing():
    rng = np.random.default_rng(1)
    seeds = [_result(rng, s) for s in (-0.3, -0.1)]
    ref = _result(rng, 0.0)
    mu, _, _ = paired_difference(seeds, [ref], "wikitext2", "nll")
    assert mu == pytest.approx(-0.2, abs=0.01)


def test_results_without_per_unit_arrays_give_no_paired_number():
    rng = np.random.default_rng(2)
    a, b = _result(rng, 0.0), _result(rng, 0.0)
    del b["results"]["heldout"]["record_loss"]
    del b["results"]["wikitext2"]["window_nll"]
    assert paired_difference([a], [b], "heldout", "all") is None
    assert paired_difference([a], [b], "wikitext2", "nll") is None
    assert unit_values(a, "piqa", "acc_norm") is None  # needs choice strings, not stored
    assert unit_values(a, "boolq", "acc") is None


def test_combined_task_mean_adds_errors_in_quadrature():
    mu, se, n = combined_task_mean([(0.1, 0.03, 10), (0.3, 0.04, 20)])
    assert (mu, n) == (pytest.approx(0.2), 30) and se == pytest.approx(0.025)


def _rows(rng) -> list[dict]:
    return [
        {"method": "pruned, no recovery", "budget": None, "seed": None, "results": _result(rng, 0.5)},
        *[{"method": "random", "budget": "0.1", "seed": s, "results": _result(rng, 0.2)} for s in range(2)],
        *[{"method": "paser", "budget": "0.1", "seed": s, "results": _result(rng, 0.1)} for s in range(2)],
    ]


def test_paired_table_compares_each_method_with_the_reference_at_its_budget():
    header, body = paired_table(_rows(np.random.default_rng(3)), "random")
    assert header[:3] == ["Method", "Budget", "vs random"]
    assert "Δ held-out loss math" in header and "Δ WikiText-2 NLL" in header and header[-1].startswith("Δ gold log-prob")
    by = {r[0]: r for r in body}
    assert set(by) == {"paser"}  # the reference is not compared with itself; unrecovered has no random at its budget
    assert by["paser"][header.index("Δ held-out loss all")].startswith("-0.10")
    header2, body2 = paired_table(_rows(np.random.default_rng(3)), "pruned, no recovery")
    assert {r[0] for r in body2} == {"random", "paser"}
    assert {r[0]: r for r in body2}["random"][header2.index("Δ WikiText-2 NLL")].startswith("-0.30")


def test_gold_logprob_table_and_report_sections(tmp_path):
    rows = _rows(np.random.default_rng(4))
    cols = choice_logprob_columns(rows)
    assert cols == [("PIQA", "piqa", "gold_choice_logprob", 1.0)]
    header, body = build_table(rows, cols, mean_key="gold_choice_logprob")
    assert header[-1] == "Mean" and body[1][2] == "2"  # random: two seeds
    summary = {"rows": rows, "config": {"evaluate": {}}, "pruned_model": "p", "selections": {}, "costs_s": {"total": 1.0}}
    table, html_path = write_experiment_report(summary, tmp_path)
    md = (tmp_path / "report.md").read_text()
    for section in ("log-probability of the gold choice", "Paired differences against random", "Paired differences against pruned, no recovery"):
        assert section in md and section in html_path.read_text()
    assert "Paired differences against random" in table and "pruned, no recovery" in table
    assert (tmp_path / "metrics_by_method.png").stat().st_size > 10_000 and "metrics_by_method.png" in md


def test_cost_table_reads_each_stages_own_record():
    """A resumed run reads its stages back from the cache in milliseconds; the cost table must
    still show what each stage took when it ran, and "-" where nothing was recorded."""
    from paser.report.experiment import cost_table

    def ev(*secs):
        return {"results": {f"t{i}": {"seconds": s, "cached": True} for i, s in enumerate(secs)}}

    rows = [
        {"method": "dense (unpruned)", "budget": None, "seed": None, "results": ev(100.0, 20.0)},
        {"method": "paser", "budget": "0.1", "seed": 0, "results": ev(90.0, 30.0),
         "recovery": {"seconds": 5.0, "seconds_total": 600.0, "tokens_trained": 19000}},
        {"method": "random", "budget": "0.1", "seed": 0, "results": None, "recovery": {"seconds": 400.0}},  # eval failed
    ]
    summary = {"rows": rows, "selections": {"paser-b0.1-s0": {"seconds": 1500.0, "tokens_scored": 296936},
                                            "random-b0.1-s0": {"seconds": 0.1}}}
    header, body = cost_table(summary)
    by = {r[0]: dict(zip(header, r)) for r in body}
    assert by["dense (unpruned)"]["evaluate (s)"] == "120" and by["dense (unpruned)"]["select (s)"] == "-"
    p = by["paser-b0.1-s0"]
    assert (p["select (s)"], p["tokens scored"], p["recover (s)"], p["tokens trained"], p["evaluate (s)"]) == ("1,500", "296,936", "600", "19,000", "120")
    assert p["total (s)"] == "2,220"  # across resumes (seconds_total), not the last part (seconds)
    assert by["random-b0.1-s0"]["recover (s)"] == "400" and by["random-b0.1-s0"]["evaluate (s)"] == "-"
    assert by["all"]["total (s)"] == f"{120 + 2220 + 400.1:,.0f}" and by["all"]["tokens scored"] == "296,936"


def test_composition_table_counts_capabilities_and_skips_pools_without_them():
    from paser.report.experiment import composition_table

    rows = [{"method": "paser", "budget": "0.1", "seed": 0, "recovery": {"tokens_trained": 1234}}]
    summary = {"rows": rows, "selections": {"paser-b0.1-s0": {"selected": 4, "capabilities": {"code": 3, "math": 1}},
                                            "random-b0.1-s0": {"selected": 4, "capabilities": {"general": 4}}}}
    header, body = composition_table(summary)
    assert header == ["Unit", "code", "general", "math", "records", "response tokens trained"]
    assert body[0] == ["paser-b0.1-s0", "3 (75 %)", "0 (0 %)", "1 (25 %)", "4", "1,234"]
    assert body[1][2] == "4 (100 %)" and body[1][-1] == "-"
    assert composition_table({"rows": [], "selections": {"x": {"selected": 3, "capabilities": {}}}}) is None


# ----------------------------------------------------------------------------- a report that answers


def _selection_dir(root):
    """A PASER selection directory as `paser select` writes it: report.json (per-cluster sizes,
    CDS, budgets), scores.parquet (cluster, concepts, decision, ies per pool record) and the
    selected records (one Alpaca record with a long instruction, one OpenAI `messages` record)."""
    from paser.io.cache import atomic_write_json, write_parquet_atomic

    root.mkdir(parents=True)
    atomic_write_json(root / "report.json", {"clusters": {"k": 2, "sizes": [3, 2], "cds": [0.21, 0.12], "n_k": [2, 1],
                                                           "selected": [2, 1], "top_sources": [{"alpaca": 3}, {"chat": 2}]}})
    write_parquet_atomic(root / "scores.parquet", {
        "id": ["a", "b", "c", "d", "e"],
        "cluster": [0, 0, 0, 1, 1],
        "concepts": [["photosynthesis process", "green plant"], ["photosynthesis process"], ["solar energy"], ["prime number"], []],
        "decision": ["selected", "selected", "over_budget", "ntm_conflict", "selected"],
        "ies": [0.5, 0.9, 0.7, 0.8, 0.1],
    })
    long = "Explain how photosynthesis turns light into chemical energy " * 5
    recs = [{"id": "a", "instruction": long, "input": "", "output": "Plants use chlorophyll."},
            {"id": "b", "instruction": "Name a green plant.", "input": "", "output": "Fern."},
            {"id": "e", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 7 prime?"},
                                     {"role": "assistant", "content": "Yes, 7 is prime."}]}]
    (root / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def _answering_summary(tmp_path, budgets=("0.1",)):
    rng = np.random.default_rng(5)
    rows = [{"method": "pruned, no recovery", "budget": None, "seed": None, "results": _result(rng, 0.5)}]
    for b in budgets:
        for s in range(2):
            rows.append({"method": "random", "budget": b, "seed": s, "results": _result(rng, 0.2),
                         "recovery": {"tokens_trained": 3000 + s, "seconds_total": 100.0}})
            rows.append({"method": "paser", "budget": b, "seed": s, "results": _result(rng, 0.1),
                         "recovery": {"tokens_trained": 2000, "seconds_total": 80.0}})
    for r in rows:  # as the held-out task records it: every capability and all of them
        h = r["results"]["results"]["heldout"]
        h["capabilities"]["all"] = {"loss": float(np.mean(h["record_loss"])), "loss_stderr": 0.1}
    sel = _selection_dir(tmp_path / "select" / "paser-b0.1-s0")
    selections = {"paser-b0.1-s0": {"dir": str(sel), "seconds": 20.0}, "paser-b0.1-s1": {"dir": str(sel), "seconds": 20.0},
                  "random-b0.1-s0": {"seconds": 0.1}}
    return {"rows": rows, "config": {"evaluate": {}}, "pruned_model": "p", "selections": selections, "costs_s": {}}


def test_report_opens_with_a_verdict_and_shows_clusters_with_examples(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    summary = _answering_summary(tmp_path)
    printed, html_path = write_experiment_report(summary, out)
    md, page = (out / "report.md").read_text(), html_path.read_text()
    # the verdict comes first: which method, on what, by how much (paired against random), at what cost
    verdict = md[md.index("## Verdict"):md.index("Pruned model")]
    assert md.index("## Verdict") < md.index("| Method |")
    assert "on held-out loss, all capabilities" in verdict and "**paser** is best" in verdict
    mu, se, n = paired_difference([r["results"] for r in summary["rows"] if r["method"] == "paser"],
                                  [r["results"] for r in summary["rows"] if r["method"] == "random"], "heldout", "all")
    assert f"Paired paser − random: {mu:+.3f} ± {se:.3f} nats over {n} records" in verdict and "beyond 2 paired SE" in verdict
    assert "paser 2,000 trained tokens, 100 s" in verdict and "random 3,000 trained tokens, 100 s" in verdict  # 80+20; 100+0.1
    assert "<section class=\"verdict\">" in page and "<strong>paser</strong> is best" in page and printed.startswith("Verdict: ")
    # the best value per column: bold in Markdown, a class in HTML; paser has the lower losses
    paser_line = next(line for line in md.splitlines() if line.startswith("| paser | 0.1 | 2 |"))
    assert paser_line.count("**") >= 2 * 4 and "**" not in next(line for line in md.splitlines() if line.startswith("| random | 0.1 | 2 |"))
    assert 'class="best"' in page and "td {{ white-space: nowrap; }}".replace("{{", "{").replace("}}", "}") in page
    # per cluster: size, CDS, budget, key phrases, two selected examples (truncated), either schema
    clusters = md[md.index("## Clusters of paser-b0.1-s0"):md.index("## Costs")]
    row0 = next(line for line in clusters.splitlines() if line.startswith("| 0 |"))
    assert "| 3 | 0.2100 | 2 | 2 | photosynthesis process, green plant, solar energy |" in row0
    assert row0.index("Name a green plant.") < row0.index("Explain how photosynthesis")  # the higher IES first
    assert "…" in row0 and len(row0) < 600
    row1 = next(line for line in clusters.splitlines() if line.startswith("| 1 |"))
    assert "Is 7 prime? → Yes, 7 is prime." in row1 and "prime number" in row1  # a rejected record's phrase still counts
    assert "Name a green plant." in page and "paser-b0.1-s1" in clusters  # where the other selections are


def test_verdict_when_random_wins_reports_paser_against_random():
    from paser.report.verdict import verdicts

    rng = np.random.default_rng(6)
    rows = [*[{"method": "random", "budget": "50", "seed": s, "results": _result(rng, 0.0)} for s in range(2)],
            *[{"method": "paser", "budget": "50", "seed": s, "results": _result(rng, 0.05)} for s in range(2)],
            {"method": "full", "budget": "50", "seed": 0, "results": _result(rng, -0.5)}]
    (v,) = verdicts({"rows": rows})
    assert "**random** is best" in v and "Paired paser − random: +0.05" in v and "For reference, full data" in v
    assert "time not recorded" in v  # nothing recorded is said, not invented
    for r in rows:  # without held-out loss the primary metric is WikiText-2 perplexity
        del r["results"]["results"]["heldout"]
    (v,) = verdicts({"rows": rows})
    assert "WikiText-2 perplexity" in v and "nats of NLL over 8 windows" in v


def test_best_cells_compare_selection_methods_per_budget():
    from paser.report.verdict import best_cells

    header = ["Method", "Budget", "Seeds", "WikiText-2 PPL", "PIQA", "Mean acc", "held-out loss all"]
    body = [["dense (unpruned)", "-", "-", "20.0", "70.0 ± 1.0", "70.0", "1.000"],  # a reference: never marked
            ["paser", "0.1", "3", "30.1 ± 0.2", "60.0 ± 1.0", "55.0", "2.000 ± 0.010"],
            ["random", "0.1", "3", "29.9 ± 0.2", "60.0 ± 1.0", "54.0", "2.000 ± 0.020"],
            ["full", "0.1", "1", "25.0", "65.0", "60.0", "1.500"],  # full data: a reference too
            ["paser", "0.2", "3", "28.0", "61.0", "56.0", "1.900"]]  # alone at its budget: nothing to compare
    assert best_cells(header, body) == {(2, 3), (1, 5)}  # lower PPL; higher mean; PIQA and loss tie: no mark


def test_metrics_vs_budget_plot_only_with_two_budgets(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    s1 = _answering_summary(tmp_path / "a")
    for r in s1["rows"]:
        r["results"]["summary"] = {"mean_acc": 0.5, "wikitext2_ppl": 30.0}
    write_experiment_report(s1, one)
    assert not (one / "metrics_vs_budget.png").exists() and "metrics_vs_budget" not in (one / "report.md").read_text()
    s2 = _answering_summary(tmp_path / "b", budgets=("0.1", "0.2"))
    for r in s2["rows"]:
        r["results"]["summary"] = {"mean_acc": 0.5, "wikitext2_ppl": 30.0}
    write_experiment_report(s2, two)
    assert (two / "metrics_vs_budget.png").stat().st_size > 10_000 and "metrics_vs_budget.png" in (two / "report.md").read_text()
    assert len(verdict_lines := [x for x in (two / "report.md").read_text().splitlines() if x.startswith("- At budget")]) == 2, verdict_lines


def test_cluster_map_labels_do_not_overlap(tmp_path):
    from paser.report.plots import plot_cluster_map, spread_labels

    rng = np.random.default_rng(0)
    centres = np.r_[rng.normal(0, 0.01, (12, 2)), [[1.0, 1.0], [1.0, 1.0]]]  # twelve crowded, two identical
    labels = np.repeat(np.arange(14), 20)
    coords = centres[labels] + rng.normal(0, 0.005, (280, 2))
    box = (0.055, 0.045)
    places = plot_cluster_map(coords, labels, rng.uniform(0.1, 0.2, 14), tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 10_000 and places.shape == (14, 2)
    for i in range(14):
        for j in range(i + 1, 14):
            dx, dy = np.abs(places[i] - places[j])
            assert dx >= box[0] - 1e-6 or dy >= box[1] - 1e-6, (i, j, places[i], places[j])
    assert ((places >= 0) & (places <= 1)).all()
    far = spread_labels(np.array([[0.2, 0.2], [0.8, 0.8]]), box)
    assert np.allclose(far, [[0.2, 0.2], [0.8, 0.8]])  # labels with room stay on their cluster


def test_record_text_reads_every_schema():
    from paser.report.clusters import record_text

    assert record_text({"instruction": "Add", "input": "2 and 3", "output": "5"}) == ("Add 2 and 3", "5")
    assert record_text({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}) == ("Hi", "Hello")
    assert record_text({"prompt": "Q", "completion": "A"}) == ("Q", "A")


def test_lm_eval_tasks_get_their_own_table(tmp_path):
    from paser.report.experiment import headline_table

    def res(v):
        return {"results": {"lm_eval:my_task": {"headline": {"metric": "acc,none", "value": v, "stderr": 0.02, "higher_is_better": True}}}}

    rows = [{"method": "random", "budget": "0.1", "seed": 0, "results": res(0.40)},
            {"method": "paser", "budget": "0.1", "seed": 0, "results": res(0.45)}]
    header, body = headline_table(rows)
    assert header == ["Method", "Budget", "Seeds", "my_task acc ↑"] and body[1][3] == "45.0 ± 2.0"
    write_experiment_report({"rows": rows, "config": {"evaluate": {}}, "pruned_model": "p", "selections": {}}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## lm-evaluation-harness tasks" in md and "| paser | 0.1 | 1 | **45.0 ± 2.0** |" in md


def test_document_renders_the_same_blocks_to_markdown_and_html(tmp_path):
    """One document, two renderers: marks, inline bold/code, literal lists, example cells."""
    from paser.report.document import (
        BulletList, CodeBlock, Document, Examples, Figures, Heading, Image, Paragraph, Section, Table, to_html, to_markdown,
    )

    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG fake")
    doc = Document("T", style="td { }\n").add(
        Section([Heading("Verdict"), BulletList(["**a** wins"])], css_class="verdict"),
        Paragraph("model `m` <ok>"),
        Table(["Method", "x"], [["a", "1.0 ± 0.1"], ["b|c", "2.0"]], best={(0, 1)}),
        Table(["k", "Examples"], [["0", Examples([("q", "r")])], ["1", Examples([])]], css_class="clusters", column_classes=["num"]),
        Heading("Failed stages", tight=True), BulletList(["s: <err> **x**"], literal=True),
        Heading("Plots", tight=True), Figures([Image(png, "a plot", "p.png", wide=True)]),
        CodeBlock("{}", "json"),
    )
    md = to_markdown(doc)
    assert md == ("# T\n\n## Verdict\n\n- **a** wins\n\nmodel `m` <ok>\n\n| Method | x |\n|---|---|\n| a | **1.0 ± 0.1** |\n| b\\|c | 2.0 |\n\n"
                  "| k | Examples |\n|---|---|\n| 0 | 1. q → r |\n| 1 | - |\n\n## Failed stages\n- s: <err> **x**\n\n"
                  "## Plots\n![a plot](p.png)\n\n```json\n{}\n```\n")
    page = to_html(doc)
    assert '<section class="verdict"><h2>Verdict</h2><ul><li><strong>a</strong> wins</li></ul></section>' in page
    assert "<p>model <code>m</code> &lt;ok&gt;</p>" in page
    assert '<td class="best">1.0\u2009±\u20090.1</td>' in page and "<td>b|c</td>" in page
    assert '<table class="clusters">' in page and '<td class="num">0</td>' in page
    assert '<td class="examples"><p class="ex">1. q <span class="resp">→ r</span></p></td>' in page and '<td class="examples">-</td>' in page
    assert "<pre>s: &lt;err&gt; **x**</pre>" in page  # a literal list: no markup read into an error message
    assert '<figure class="wide"><img src="data:image/png;base64,' in page and "<title>T</title>" in page and "td { }" in page


def test_report_files_are_the_one_document_rendered_twice(tmp_path):
    from paser.report.document import to_html, to_markdown
    from paser.report.experiment import experiment_document

    out = tmp_path / "rep"
    out.mkdir()
    summary = _answering_summary(tmp_path)
    write_experiment_report(summary, out)
    doc = experiment_document(summary, out)
    assert to_markdown(doc) == (out / "report.md").read_text() and to_html(doc) == (out / "report.html").read_text()
