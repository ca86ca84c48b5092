"""Adaptive scoring over the real scoring engine on tiny random models: the closure the
driver will pass, the exhaustive limit bit for bit, and resume after a kill."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import magnitude_prune_, tiny_llama

from paser.io.models import LoadedModel, fingerprint_model
from paser.io.records import Record
from paser.score import engine as eng
from paser.select.adaptive import adaptive_degradation, ies_rank
from paser.select.budget import allocate_budget, select_with_budget
from paser.select.efficiency import cluster_degradation, individual_efficiency


class CharTok:
    """Character-level tokenizer with the interface the engine uses."""

    bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, None

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 120) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def get_vocab(self):
        return {f"<{i}>": i for i in range(123)}


@pytest.fixture(scope="module")
def setup(one_thread):
    o = tiny_llama(128, seed=0, initializer_range=0.2, tie_word_embeddings=False)
    p = magnitude_prune_(copy.deepcopy(o), 0.5)
    orig = LoadedModel(o, CharTok(), "", fingerprint_model(o), "orig")
    pruned = LoadedModel(p, CharTok(), "", fingerprint_model(p), "pruned")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta sort these numbers classify the sentiment write a poem about cats".split()
    records = [
        Record(instruction=f"{' '.join(rng.choice(words, size=int(rng.integers(1, 5))))} {i}", input="",
               output=" ".join(rng.choice(words, size=int(rng.integers(1, 10)))))
        for i in range(90)
    ]
    labels = np.repeat(np.arange(3), 30)
    X = rng.normal(size=(90, 6)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    items = {it.id: it for it in eng.encode_records(records, CharTok(), "plain", 64)}
    n_prompt = np.array([items[r.id].n_prompt for r in records])
    n_resp = np.array([items[r.id].n_response for r in records])
    return orig, pruned, records, labels, X, n_prompt, n_resp


def closure(orig, pruned, records, cache, calls=None, die_after=None):
    """The driver's score_fn: score_degradation on the asked records (cache, resume from the engine)."""

    def score_fn(idx):
        if die_after is not None and len(calls) >= die_after:
            raise KeyboardInterrupt("killed")
        res = eng.score_degradation(orig, pruned, [records[i] for i in idx], "plain", 64, cache, max_batch_tokens=256, progress=False)
        if calls is not None:
            calls.append(res.stats.samples_scored)
        return np.asarray(res.jsd, dtype=np.float64)

    return score_fn


def run(setup, cache, confidence, **kw):
    orig, pruned, records, labels, X, n_prompt, n_resp = setup
    sizes = np.bincount(labels)
    rank = ies_rank(n_prompt, n_resp)
    res = adaptive_degradation(closure(orig, pruned, records, cache, **kw), labels, lambda c: allocate_budget(c, sizes, 12),
                               X, rank_fn=rank, n_prompt=n_prompt, n_response=n_resp, confidence=confidence, seed=0, pilot=8)
    prio = res.priority(rank)
    return res, select_with_budget(labels, prio, res.n_k, None, cds=res.cds, priority=prio)


def test_confidence_one_equals_exhaustive_bit_for_bit(setup, tmp_path):
    orig, pruned, records, labels, X, n_prompt, n_resp = setup
    full = eng.score_degradation(orig, pruned, records, "plain", 64, tmp_path / "exh", max_batch_tokens=256, progress=False)
    jsd = np.asarray(full.jsd, dtype=np.float64)
    cds = cluster_degradation(jsd, labels, 3)
    n_k = allocate_budget(cds, np.bincount(labels), 12)
    ies = individual_efficiency(jsd, np.asarray(full.n_prompt), np.asarray(full.n_response))
    ref = select_with_budget(labels, ies, n_k, None, cds=cds, priority=ies)

    res, out = run(setup, tmp_path / "ad", 1.0)
    assert np.array_equal(res.jsd, jsd)  # a separate cache: recomputed, and identical
    assert np.array_equal(n_prompt, full.n_prompt) and np.array_equal(n_resp, full.n_response)
    assert out.selected == ref.selected and np.array_equal(res.n_k, n_k)


def test_kill_during_adaptive_scoring_resumes_to_the_same_selection(setup, tmp_path):
    whole, sel_whole = run(setup, tmp_path / "a", 0.8)
    assert not whole.scored.all()  # adaptive really skipped some

    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "b", 0.8, calls=calls, die_after=2)
    assert len(calls) == 2
    again: list[int] = []
    resumed, sel_resumed = run(setup, tmp_path / "b", 0.8, calls=again)
    assert again[:2] == [0, 0]  # the two calls before the kill come from the cache
    assert sum(again) == whole.n_scored - sum(calls)
    assert np.array_equal(resumed.jsd, whole.jsd, equal_nan=True)
    assert sel_resumed.selected == sel_whole.selected


@pytest.mark.parametrize("extra", [("--budget", "777tok"), ("--budget", "777tok", "--allocation", "mass", "--tau", "0.5"),
                                   ("--budget", "10", "--allocation", "equal", "--ranking", "jsd")])
def test_cli_adaptive_at_confidence_1_equals_exhaustive_with_token_budgets_and_allocation_rules(
        tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread, extra):
    import json

    from paser.cli import main
    from paser.io.records import load_records

    def select(out, *more):
        rc = main(["select", "--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir), "--limit", "60", "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--no-plots", "--k-min", "2", "--k-max", "4", *extra, *more])
        assert rc == 0
        return json.loads((out / "report.json").read_text()), [r.id for r in load_records(out / "selected.jsonl")[0]]

    ex, ex_ids = select(tmp_path / "ex")
    ad, ad_ids = select(tmp_path / "ad", "--scoring", "adaptive", "--confidence", "1")
    assert ad_ids == ex_ids
    assert ad["clusters"]["n_k"] == ex["clusters"]["n_k"] and ad["clusters"]["fill_order"] == ex["clusters"]["fill_order"]
    if "777tok" in extra:
        assert ad["selected_tokens"] == ex["selected_tokens"] <= 777
    low, _ = select(tmp_path / "low", "--scoring", "adaptive", "--confidence", "0.5")
    if "777tok" in extra:
        assert low["selected_tokens"] <= 777 and low["paser"]["budget_unit"] == "tokens"
    else:
        assert low["selected"] == 10


def test_estimate_predicts_the_adaptive_cost_and_brackets_a_real_run(tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread):
    import json

    from paser.cli import main
    from paser.config import SelectArgs
    from paser.select.estimate import estimate_selection

    common = dict(original=str(tiny_model_dir), pruned=str(tiny_pruned_dir), limit=120, budget="12", k=3)
    ex = estimate_selection(SelectArgs(**common))
    assert ex.adaptive is None
    ests = {c: estimate_selection(SelectArgs(**common, scoring="adaptive", confidence=c)) for c in (0.5, 0.9, 1.0)}
    for c, e in ests.items():
        a = e.adaptive
        assert a["confidence"] == c and a["k"] == 3 and a["pool_size"] == 120
        assert a["sample_records"] <= a["expected_records"] <= a["upper_bound_records"] == 120
        assert a["upper_bound_tokens"] == e.tokens and a["expected_tokens"] <= e.tokens
        assert e.seconds["score"] == pytest.approx(a["expected_score_seconds"])
        assert a["expected_score_seconds"] == pytest.approx(a["upper_bound_score_seconds"] * a["expected_fraction"])
        assert "adaptive scoring at confidence" in e.summary()
    assert ests[1.0].adaptive["expected_records"] == 120
    assert ests[0.5].adaptive["expected_records"] < ests[0.9].adaptive["expected_records"] < 120

    rc = main(["select", "--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir), "--limit", "120", "--budget", "12",
               "--k", "3", "--scoring", "adaptive", "--confidence", "0.9", "--out", str(tmp_path / "s"),
               "--cache-dir", str(tmp_path / "c"), "--no-plots"])
    assert rc == 0
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["estimate"]["adaptive"]["expected_records"] == ests[0.9].adaptive["expected_records"]  # select printed the same plan
    scored = rep["adaptive"]["samples_scored"]
    assert ests[0.9].adaptive["sample_records"] * 0.5 <= scored <= 120
