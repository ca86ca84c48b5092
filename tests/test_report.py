"""The experiment report's secondary tables: gold-choice log-probability and paired differences."""

from __future__ import annotations

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
