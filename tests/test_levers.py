"""The recovery levers of selection: token budgets, allocation rules, within-cluster rankings,
held-out JSD to the original model, the dev split, and the registries they are entries of."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_pipeline_config

from paser.cli import main
from paser.errors import PaserError
from paser.io.records import load_records
from paser.select.budget import (
    BudgetError,
    allocate_budget,
    fill_in_order,
    mass_weights,
    parse_budget,
    resolve_budget,
    select_with_budget,
)
from paser.select.efficiency import individual_efficiency, rank_ies, rank_jsd, rank_jsd_sum

# ----------------------------------------------------------------------------- token budgets


@pytest.mark.parametrize("raw,tokens", [("16000tok", 16000), ("16ktok", 16000), ("1.5M tokens", 1_500_000), ("32_000tok", 32000), ("7 tok", 7)])
def test_token_budgets_parse(raw, tokens):
    assert parse_budget(raw).is_tokens
    assert resolve_budget(raw, 10) == tokens  # a token budget is not capped by the record count
    assert resolve_budget(raw, 10, pool_tokens=5000) == min(tokens, 5000)


@pytest.mark.parametrize("raw", ["12.5tok", "0tok", "abctok", "tok"])
def test_bad_token_budgets_are_refused(raw):
    with pytest.raises(BudgetError):
        parse_budget(raw)


def test_record_budgets_unchanged():
    assert not parse_budget("0.1").is_tokens
    assert resolve_budget("0.1", 2000) == 200 and resolve_budget("16", 160) == 16


def _never_over_short_by_less_than_one(selected, cost, budget, excluded=()):
    spent = int(cost[selected].sum())
    assert spent <= budget
    left_out = [i for i in range(len(cost)) if i not in set(selected.tolist()) and i not in set(excluded)]
    assert all(cost[i] > budget - spent for i in left_out), "a left-out record still fits the budget"
    return spent


def test_fill_in_order_fills_a_token_budget_exactly_on_odd_lengths():
    rng = np.random.default_rng(3)
    cost = rng.integers(7, 301, size=97)  # odd lengths
    for budget in (1, 500, 4321, int(cost.sum()) - 1, int(cost.sum()) + 10):
        sel = fill_in_order(rng.permutation(97), cost, budget)
        _never_over_short_by_less_than_one(sel, cost, budget)


def test_select_with_budget_in_tokens_per_cluster_and_overall():
    rng = np.random.default_rng(0)
    n, k = 120, 4
    labels = rng.integers(0, k, size=n)
    cost = rng.integers(5, 200, size=n)
    prio = rng.random(n)
    budget = 3001
    sizes = np.bincount(labels, weights=cost, minlength=k).astype(np.int64)
    n_k = allocate_budget(np.array([0.4, 0.1, 0.3, 0.2]), sizes, budget)
    assert n_k.sum() == budget
    out = select_with_budget(labels, prio, n_k, cds=np.array([0.4, 0.1, 0.3, 0.2]), priority=prio, cost=cost)
    sel = np.array(out.selected)
    _never_over_short_by_less_than_one(sel, cost, budget)
    # within each cluster the best-ranked candidates come first: a selected record is never
    # outranked by a left-out one of its cluster that would have fitted its quota as well
    assert len(set(sel.tolist())) == len(sel)


def test_select_with_budget_tokens_with_a_gate_never_overspends():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=60)
    cost = rng.integers(3, 50, size=60)
    prio = rng.random(60)
    bad = set(range(0, 60, 3))
    n_k = allocate_budget(np.ones(3), np.bincount(labels, weights=cost, minlength=3).astype(np.int64), 700)
    out = select_with_budget(labels, prio, n_k, lambda i: i not in bad, cds=np.ones(3), priority=prio, cost=cost)
    spent = int(cost[np.array(out.selected)].sum())
    assert spent <= 700
    # whatever was never taken (neither accepted nor an override) does not fit what is left
    taken = set(out.selected)
    assert all(cost[i] > 700 - spent for i in range(60) if i not in taken)


def test_unit_costs_reproduce_the_record_budget_selection():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, size=80)
    prio = rng.random(80)
    cds = rng.random(5)
    n_k = allocate_budget(cds, np.bincount(labels, minlength=5), 23)
    a = select_with_budget(labels, prio, n_k, lambda i: i % 7 != 0, cds=cds, priority=prio)
    b = select_with_budget(labels, prio, n_k, lambda i: i % 7 != 0, cds=cds, priority=prio, cost=np.ones(80, dtype=np.int64))
    assert a.selected == b.selected and (a.decisions == b.decisions).all()


# ----------------------------------------------------------------------------- rules and rankings


def test_mass_allocation_equals_the_formula():
    cds = np.array([0.15, 0.25, 0.2, 0.18])
    sizes = np.array([535, 60, 450, 955])
    for tau in (0.0, 1.0, 2.0):
        w = mass_weights(cds, sizes, tau)
        np.testing.assert_allclose(w, sizes * cds**tau)
        n_k = allocate_budget(w, sizes, 200)
        assert n_k.sum() == 200
        np.testing.assert_allclose(n_k, 200 * w / w.sum(), atol=1.0)  # largest remainder: within one
    with pytest.raises(BudgetError):
        mass_weights(cds, sizes, -1.0)


def test_rankings():
    jsd = np.array([0.1, 0.3, 0.2])
    n_p, n_r = np.array([10, 50, 5]), np.array([100, 20, 7])
    np.testing.assert_allclose(rank_ies(jsd, n_p, n_r), individual_efficiency(jsd, n_p, n_r))
    np.testing.assert_allclose(rank_jsd(jsd, n_p, n_r), jsd)
    np.testing.assert_allclose(rank_jsd_sum(jsd, n_p, n_r), jsd * n_r)


def test_registries_list_every_variant_and_refuse_unknown_names():
    from paser.select.registry import ALLOCATION_RULES, RANKINGS, get, selection_methods

    assert {"paser", "random", "uniform", "ifd", "instruction_mining", "nuggets", "full"} <= set(selection_methods())
    assert {"cds", "mass", "equal"} <= set(ALLOCATION_RULES) and {"ies", "jsd", "jsd-sum"} <= set(RANKINGS)
    with pytest.raises(PaserError, match="choose one of: cds, mass"):
        get(ALLOCATION_RULES, "softmax", "allocation rule")


# ----------------------------------------------------------------------------- end to end


def _select(tmp_path, original, pruned, out, *extra):
    rc = main(["select", "--original", str(original), "--pruned", str(pruned), "--limit", "60", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--no-plots", "--k-min", "2", "--k-max", "4", *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("method,extra", [("random", ()), ("uniform", ()), ("paser", ("--allocation", "mass", "--ranking", "jsd")), ("paser", ())])
def test_token_budget_is_met_as_recovery_counts_tokens(tmp_path, tiny_model_dir, tiny_pruned_dir, tiny_tokenizer, one_thread, method, extra):
    from paser.recover.data import encode_records

    out = tmp_path / "sel"
    rep = _select(tmp_path, tiny_model_dir, tiny_pruned_dir, out, "--method", method, "--budget", "777tok", *extra)
    chosen, _ = load_records(out / "selected.jsonl")
    trained = encode_records(chosen, tiny_tokenizer, "alpaca", 256).n_response_tokens  # what `paser recover` trains on
    assert rep["budget_unit"] == "tokens" and rep["budget"] == 777
    assert trained == rep["selected_tokens"] <= 777
    # short of the budget by less than any record left out
    from paser.select.run import response_token_costs

    pool_ids = {r.id for r in chosen}
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").to_pydict()
    pool = [r for r in load_records(str(__import__("paser.data", fromlist=["pool_path"]).pool_path()))[0] if r.id in set(table["id"])]
    left = [r for r in pool if r.id not in pool_ids]
    costs = response_token_costs(left, tiny_tokenizer, "alpaca", 256)
    excluded = {i for i, d in zip(table["id"], table["decision"]) if d == "ntm_conflict"}
    assert all(c > 777 - trained for r, c in zip(left, costs) if r.id not in excluded)


def test_heldout_jsd_is_zero_against_itself_and_paired(tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread):
    from paser.evaluate.runner import evaluate_model
    from paser.io.models import load_model
    from paser.report.experiment import build_table
    from paser.report.paired import paired_table

    ref = load_model(str(tiny_model_dir))
    kw = dict(tasks=["heldout_jsd", "heldout"], limit=3, seed=0, out_path=None, cache_dir=tmp_path / "eval", reference=ref)
    same = evaluate_model(str(tiny_model_dir), **kw)
    other = evaluate_model(str(tiny_pruned_dir), **kw)
    r0, r1 = same["results"]["heldout_jsd"], other["results"]["heldout_jsd"]
    assert r0["capabilities"]["all"]["jsd"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < r1["capabilities"]["all"]["jsd"] <= np.log(2)
    assert len(r1["record_jsd"]) == len(r1["record_ids"]) == 9  # 3 per capability
    assert r1["record_ids"] == other["results"]["heldout"]["record_ids"]  # the same records as held-out loss
    rows = [{"method": "a", "budget": "1", "seed": 0, "results": same}, {"method": "random", "budget": "1", "seed": 0, "results": other}]
    header, body = build_table(rows)
    assert "held-out JSD all" in header
    ph, pb = paired_table(rows, "random")
    col = ph.index("Δ held-out JSD all")
    assert pb[0][col].startswith("-") and len(pb[0][col].split(" ± ")[0]) == 7  # 4 digits: -0.xxxx


def test_dev_split_avoids_the_benchmark_pools_and_the_test_set():
    from paser.data import BENCHMARK_POOLS, dev_records, heldout_path, pool_path, pool_subset_indices

    dev = dev_records()
    pool = load_records(str(pool_path()))[0]
    used = {pool[i].id for limit, seed in BENCHMARK_POOLS for i in pool_subset_indices(len(pool), limit, seed)}
    test_ids = {r.id for r in load_records(str(heldout_path()))[0]}
    ids = {r.id for r in dev}
    assert len(dev) == 300 and not ids & used and not ids & test_ids
    assert [r.id for r in dev_records()] == [r.id for r in dev]  # deterministic


def test_a_registered_toy_method_runs_through_cli_pipeline_and_report(tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread):
    from paser.select import registry

    @registry.register_method("first_b", "the first B records of the pool (a toy)")
    def first_b(ctx):
        return np.arange(min(ctx.budget, len(ctx.records))), None

    try:
        out = tmp_path / "sel"
        rep = _select(tmp_path, tiny_model_dir, tiny_pruned_dir, out, "--method", "first_b", "--budget", "5")
        assert rep["method"] == "first_b" and rep["selected"] == 5
        cfg = write_pipeline_config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run",
                                    ["random", {"label": "toy", "method": "first_b"}],
                                    extra="include_dense: false\ninclude_unrecovered: false\n")
        assert main(["pipeline", "--config", str(cfg)]) == 0
        report = (tmp_path / "run" / "report.md").read_text()
        assert "| toy |" in report
        res = json.loads((tmp_path / "run" / "results.json").read_text())
        assert [r["method"] for r in res["rows"]] == ["random", "toy"] and not res["failures"]
    finally:
        registry.SELECTION_METHODS.pop("first_b", None)


def test_pipeline_variants_are_validated_before_any_stage(tmp_path, tiny_model_dir, tiny_pruned_dir, capsys):
    cfg = write_pipeline_config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run",
                                [{"label": "p", "method": "paser", "allocation": "softmax"}])
    assert main(["pipeline", "--config", str(cfg)]) == 2
    assert "allocation" in capsys.readouterr().err
    cfg = write_pipeline_config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", [{"label": "p", "method": "best"}])
    assert main(["pipeline", "--config", str(cfg)]) == 2
    assert "unknown method 'best'" in capsys.readouterr().err


def test_adaptive_scoring_at_confidence_1_equals_exhaustive_and_scores_less_below(tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread):
    ex = _select(tmp_path, tiny_model_dir, tiny_pruned_dir, tmp_path / "ex", "--method", "paser", "--budget", "10")
    ad1 = _select(tmp_path, tiny_model_dir, tiny_pruned_dir, tmp_path / "ad1", "--method", "paser", "--budget", "10",
                  "--scoring", "adaptive", "--confidence", "1")
    ids = lambda d: [r.id for r in load_records(d / "selected.jsonl")[0]]
    assert ids(tmp_path / "ad1") == ids(tmp_path / "ex")
    assert ad1["adaptive"]["tokens_scored"] == ad1["adaptive"]["tokens_total"]
    ad = _select(tmp_path, tiny_model_dir, tiny_pruned_dir, tmp_path / "ad", "--method", "paser", "--budget", "10",
                 "--scoring", "adaptive", "--confidence", "0.5", "--cache-dir", str(tmp_path / "cache2"))
    assert ad["selected"] == 10 and ad["jsd"]["scored"] <= 60
    assert set(ad["adaptive"]) >= {"clusters", "confidence", "rank_correlation", "tokens_scored"} and "cds_ci" in ad["adaptive"]["clusters"]


def test_a_registered_toy_evaluation_task_runs_through_cli_pipeline_and_report(tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread):
    from paser.evaluate.registry import EVAL_TASKS, eval_tasks, register_task

    eval_tasks()

    def run(em, task, o):
        import torch

        emb = em.model.get_input_embeddings().weight
        return {"headline": {"metric": "embedding_norm", "value": float(torch.linalg.norm(emb)), "higher_is_better": None}}

    register_task("toy_norm", "the embedding matrix's norm (a toy)", lambda t, o: {"task": t, "protocol": "toy-v1"}, run)
    try:
        out = tmp_path / "r.json"
        assert main(["evaluate", "--model", str(tiny_model_dir), "--tasks", "toy_norm", "--out", str(out)]) == 0
        assert json.loads(out.read_text())["results"]["toy_norm"]["headline"]["value"] > 0
        cfg = write_pipeline_config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", ["random"],
                                    extra="include_dense: false\n")
        cfg.write_text(cfg.read_text().replace('tasks: "wikitext2,heldout,piqa"', 'tasks: "wikitext2,toy_norm"'))
        assert main(["pipeline", "--config", str(cfg)]) == 0
        assert "toy_norm embedding_norm" in (tmp_path / "run" / "report.md").read_text()
    finally:
        EVAL_TASKS.pop("toy_norm", None)


def test_pipeline_refuses_a_trl_selection_format(tmp_path, tiny_model_dir, tiny_pruned_dir, capsys):
    cfg = write_pipeline_config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", ["random"])
    cfg.write_text(cfg.read_text().replace("select: {k_min: 2", "select: {selected_format: messages, k_min: 2"))
    assert main(["pipeline", "--config", str(cfg)]) == 2
    assert "selected_format must be records" in capsys.readouterr().err
