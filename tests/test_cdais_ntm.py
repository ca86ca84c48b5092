"""CDAIS budget allocation, efficiency score and the NTM concept consistency graph."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paser.errors import PaserError
from paser.select.budget import (
    NTM_CONFLICT,
    NTM_OVERRIDE,
    OVER_BUDGET,
    SELECTED,
    BudgetError,
    allocate_budget,
    resolve_budget,
    select_with_budget,
)
from paser.select.concepts import (
    ConceptConsistencyGraph,
    NTMGate,
    extract_concepts,
    prose_only,
    rake,
    record_concepts,
)
from paser.select.efficiency import cluster_degradation, individual_efficiency

# ----------------------------------------------------------------------------- resolve_budget


@pytest.mark.parametrize(
    "budget, n, expected",
    [(0.1, 7400, 740), ("0.1", 7400, 740), ("10%", 7400, 740), (5000, 7400, 5000), ("5000", 7400, 5000),
     (5000.0, 7400, 5000), (9000, 7400, 7400), (1.0, 7400, 7400), (1, 7400, 1), (0.001, 10, 1), (0.25, 10, 3)],
)
def test_resolve_budget(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@pytest.mark.parametrize("bad", [0, -3, 0.0, -0.5, 1.5, "2.5", "abc", "", float("nan"), True, None, "150%"])
def test_resolve_budget_rejects(bad):
    with pytest.raises(BudgetError) as e:
        resolve_budget(bad, 100)
    assert isinstance(e.value, PaserError) and isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------- allocate_budget


def test_allocation_is_proportional_and_sums_exactly():
    cds = np.array([0.1, 0.2, 0.3, 0.4])
    n = allocate_budget(cds, np.array([1000] * 4), 100)
    assert n.tolist() == [10, 20, 30, 40]
    # Not a softmax: softmax of these CDS would be nearly uniform.
    n = allocate_budget(np.array([1.0, 1.0, 1.0]), np.array([50, 50, 50]), 10)
    assert n.sum() == 10 and sorted(n.tolist()) == [3, 3, 4]
    assert n.tolist() == [4, 3, 3]  # ties -> smaller index


def test_largest_remainder_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = rng.integers(1, 12)
        cds = rng.random(k) * (rng.random(k) > 0.2)
        sizes = rng.integers(0, 60, k)
        b = int(rng.integers(0, sizes.sum() + 20))
        n = allocate_budget(cds, sizes, b)
        assert n.sum() == min(b, sizes.sum())
        assert np.all(n <= sizes) and np.all(n >= 0)
        if b >= sizes.sum():
            assert np.array_equal(n, sizes)


def test_tiny_cluster_with_huge_cds_is_capped_and_excess_redistributed():
    cds = np.array([10.0, 1.0, 3.0])
    sizes = np.array([5, 1000, 1000])
    n = allocate_budget(cds, sizes, 100)
    assert n[0] == 5
    assert n.sum() == 100
    # The 95 left over are split 1:3 between the others.
    assert (n[1], n[2]) in {(24, 71), (23, 72)} and abs(n[2] / n[1] - 3) < 0.2


def test_all_zero_cds_falls_back_to_size():
    n = allocate_budget(np.zeros(3), np.array([10, 30, 60]), 10)
    assert n.tolist() == [1, 3, 6]


def test_zero_cds_cluster_gets_remainder_only_when_others_are_full():
    n = allocate_budget(np.array([1.0, 0.0]), np.array([4, 100]), 10)
    assert n.tolist() == [4, 6]


def test_budget_covering_pool_gives_everything():
    sizes = np.array([3, 0, 7])
    assert allocate_budget(np.array([0.5, 0.2, 0.1]), sizes, 50).tolist() == [3, 0, 7]


def test_allocation_rejects_bad_input():
    with pytest.raises(ValueError):
        allocate_budget(np.array([0.1, np.nan]), np.array([1, 1]), 1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([0.1, -0.1]), np.array([1, 1]), 1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([0.1]), np.array([1, 1]), 1)


# ----------------------------------------------------------------------------- efficiency


def test_ies_hand_values_and_small_cost_guard():
    jsd = np.array([0.3, 0.3, 0.2, 0.5])
    nx = np.array([10, 1, 0, 0])
    ny = np.array([10, 0, 2, 3])
    ies = individual_efficiency(jsd, nx, ny)
    assert ies[0] == pytest.approx(0.3 / math.log(400))
    assert ies[1] == pytest.approx(0.3 / 2.0)  # C = 1 -> floor e^2 -> log = 2 (no division by 0)
    assert ies[2] == pytest.approx(0.2 / 2.0)  # C = 4 < e^2
    assert ies[3] == pytest.approx(0.5 / math.log(9))  # C = 9 > e^2: untouched
    assert np.all(np.isfinite(ies))
    # A custom floor.
    assert individual_efficiency(np.array([1.0]), np.array([1]), np.array([1]), min_cost=100.0)[0] == pytest.approx(
        1 / math.log(100)
    )
    with pytest.raises(ValueError):
        individual_efficiency(np.array([np.nan]), np.array([1]), np.array([1]))
    with pytest.raises(ValueError):
        individual_efficiency(np.array([0.1]), np.array([1]), np.array([1]), min_cost=1.0)


def test_cluster_degradation_is_mean_per_cluster():
    jsd = np.array([0.1, 0.3, 0.5, 0.2])
    labels = np.array([0, 0, 2, 2])
    cds = cluster_degradation(jsd, labels, 4)
    assert cds == pytest.approx([0.2, 0.0, 0.35, 0.0])


# ----------------------------------------------------------------------------- select_with_budget


def _pool():
    # 3 clusters; priority = IES; cluster 2 is tiny.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    ies = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.95, 0.1])
    return labels, ies


def test_select_without_gate_takes_quota_in_cds_then_ies_order():
    labels, ies = _pool()
    out = select_with_budget(labels, ies, np.array([2, 1, 2]), cds=np.array([0.2, 0.1, 0.5]))
    assert out.cluster_order == [2, 0, 1]
    assert out.selected == [8, 9, 0, 1, 4]
    assert out.counts() == {SELECTED: 5, OVER_BUDGET: 5, NTM_CONFLICT: 0, NTM_OVERRIDE: 0}
    assert out.quota_final.tolist() == [2, 1, 2]


def test_shortfall_from_rejections_passes_to_other_clusters():
    labels, ies = _pool()
    rejected = {8, 9}  # the whole of cluster 2 conflicts
    out = select_with_budget(labels, ies, np.array([2, 2, 2]), lambda i: i not in rejected, cds=np.array([0.3, 0.1, 0.5]))
    assert len(out.selected) == 6
    assert out.decisions[8] == NTM_CONFLICT and out.decisions[9] == NTM_CONFLICT
    # Cluster 2's two slots are re-split 3:1 between clusters 0 and 1 -> cluster 0 gets +2 (or +1 +1)
    assert out.quota_final[2] == 0 and out.quota_final.sum() == 6
    assert out.quota_final[0] >= 3
    assert out.n_rejected.tolist() == [0, 0, 2]
    assert out.n_override.sum() == 0
    # Within a cluster, selection order follows IES.
    sel0 = [i for i in out.selected if labels[i] == 0]
    assert sel0 == sorted(sel0, key=lambda i: -ies[i])


def test_gate_rejection_inside_cluster_takes_next_candidate():
    labels, ies = _pool()
    out = select_with_budget(labels, ies, np.array([2, 0, 0]), lambda i: i != 0, cds=np.array([1.0, 0.5, 0.1]))
    assert out.selected == [1, 2]
    assert out.decisions[0] == NTM_CONFLICT and out.decisions[3] == OVER_BUDGET


def test_exact_budget_with_override_when_gate_rejects_too_much():
    labels, ies = _pool()
    accepted_once = set()

    def gate(i):  # accepts only 3 samples in total
        if len(accepted_once) < 3:
            accepted_once.add(i)
            return True
        return False

    out = select_with_budget(labels, ies, np.array([3, 3, 2]), gate, cds=np.array([0.3, 0.2, 0.5]), priority=ies)
    assert len(out.selected) == 8
    assert out.counts()[SELECTED] == 3 and out.counts()[NTM_OVERRIDE] == 5
    assert out.n_override.sum() == 5
    # Overrides are the highest-priority rejected samples.
    overridden = [i for i in out.selected if out.decisions[i] == NTM_OVERRIDE]
    rejected = [i for i in range(10) if out.decisions[i] in (NTM_OVERRIDE, NTM_CONFLICT)]
    assert sorted(overridden, key=lambda i: -ies[i]) == sorted(rejected, key=lambda i: -ies[i])[:5]


def test_quota_larger_than_pool_gives_whole_pool_and_dict_order():
    labels, ies = _pool()
    order = {0: [3, 2, 1, 0], 1: [4, 5, 6, 7], 2: [9, 8]}
    out = select_with_budget(labels, order, np.array([10, 10, 10]))
    assert sorted(out.selected) == list(range(10))
    assert out.selected[:4] == [3, 2, 1, 0]  # equal weights -> cluster 0 first; dict order respected
    with pytest.raises(ValueError):
        select_with_budget(labels, {0: [4]}, np.array([1, 0, 0]))


def test_select_is_deterministic_on_random_pools():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n, k = 60, 5
        labels = rng.integers(0, k, n)
        ies = rng.random(n)
        cds = rng.random(k)
        b = int(rng.integers(1, n + 5))
        nk = allocate_budget(cds, np.bincount(labels, minlength=k), b)
        bad = set(rng.choice(n, 20, replace=False).tolist())
        runs = [select_with_budget(labels, ies, nk, lambda i: i not in bad, cds=cds, priority=ies) for _ in range(2)]
        assert runs[0].selected == runs[1].selected
        assert len(runs[0].selected) == min(b, n) == len(set(runs[0].selected))


# ----------------------------------------------------------------------------- concept graph


def test_strict_rule_on_hand_cases():
    g = ConceptConsistencyGraph()
    g.add(["sort", "number"])
    g.add(["classify", "sentiment"])
    # Two known concepts never seen together -> conflict under the strict rule.
    assert not g.is_consistent(["sort", "sentiment"], 0.0)
    assert g.conflicting_pairs(["sort", "sentiment"]) == [("sort", "sentiment")]
    # Adjacent known concepts -> fine.
    assert g.is_consistent(["number", "sort", "list"], 0.0)
    # Only one known concept -> nothing to contradict.
    assert g.is_consistent(["sort", "banana", "apple"], 0.0)
    assert g.conflict_share(["sort", "banana"]) == 0.0
    assert g.n_nodes == 4 and g.n_edges == 2 and g.n_samples == 2


def test_threshold_semantics():
    g = ConceptConsistencyGraph()
    g.add(["a", "b", "c"])
    g.add(["d"])
    # Known pairs of [a, b, d]: (a,b) adjacent, (a,d) and (b,d) not -> share 2/3.
    assert g.conflict_share(["a", "b", "d"]) == pytest.approx(2 / 3)
    assert not g.is_consistent(["a", "b", "d"], 0.0)
    assert not g.is_consistent(["a", "b", "d"], 0.5)
    assert g.is_consistent(["a", "b", "d"], 0.75)
    assert g.is_consistent(["a", "b", "d"], 1.0)
    with pytest.raises(ValueError):
        g.is_consistent(["a"], 1.5)
    g.add(["a", "b", "d"])
    assert g.is_consistent(["a", "b", "d"], 0.0)


def test_graph_caps_concepts_per_sample():
    g = ConceptConsistencyGraph(max_concepts=4)
    g.add([f"c{i}" for i in range(10)])
    assert g.n_nodes == 4 and g.n_edges == 6


def test_ntm_gate_adds_only_accepted():
    concepts = [["sort", "number"], ["classify", "sentiment"], ["sort", "sentiment"], ["sort", "number", "list"]]
    gate = NTMGate(concepts, threshold=0.0)
    assert [gate(i) for i in range(4)] == [True, True, False, True]
    assert gate.n_rejected == 1 and gate.examples == {2: [("sort", "sentiment")]}
    assert gate.graph.adjacent("list", "number") and not gate.graph.adjacent("sort", "sentiment")


def test_gate_inside_selection_loop():
    labels = np.array([0, 0, 0, 1])
    concepts = [["sort", "number"], ["classify", "sentiment"], ["sort", "sentiment"], ["poem", "rhyme"]]
    out = select_with_budget(labels, np.array([4.0, 3, 2, 1]), np.array([3, 1]), NTMGate(concepts, 0.0),
                             cds=np.array([1.0, 0.5]), priority=np.array([4.0, 3, 2, 1]))
    assert out.decisions.tolist() == [SELECTED, SELECTED, NTM_OVERRIDE, SELECTED]


# ----------------------------------------------------------------------------- RAKE


def test_rake_on_the_original_paper_example():
    text = (
        "Compatibility of systems of linear constraints over the set of natural numbers. Criteria of "
        "compatibility of a system of linear Diophantine equations, strict inequations, and nonstrict "
        "inequations are considered."
    )
    top = rake(text, max_phrases=5)
    # Rose et al. (2010), Table 1.1: the top keywords are these multi-word phrases.
    assert top == ["linear diophantine equation", "linear constraint", "natural number", "strict inequation",
                   "nonstrict inequation"]


def test_rake_normalises_and_splits_on_stop_words_and_punctuation():
    assert rake("Sort these NUMBERS:   3, 1, 2.  Sort the numbers!", max_phrases=10) == ["sort", "number"]
    assert rake("", 5) == [] and rake("the of and", 5) == []


def test_record_concepts_strip_code_and_multiword():
    rec = {"instruction": "Write a Python function that reverses a linked list.", "input": "",
           "output": "def reverse(head):\n    prev = None\n    while head:\n        head.next, prev, head = prev, head, head.next\n    return prev"}
    assert "def reverse" not in prose_only(rec["output"]) and prose_only(rec["output"]).strip() == ""
    c = record_concepts(rec, max_phrases=5, multiword_only=True)
    assert c == ["python function", "linked list"]
    c_all = record_concepts(rec, max_phrases=10, multiword_only=False)
    assert "reverse" in c_all and "write" not in c_all  # "write" is an instruction stop word
    # GSM8K arithmetic stays (it is prose with numbers), its calculator annotations go.
    assert prose_only("Now add in the fee $90 + $20 = $<<90+20=110>>110.") == "Now add in the fee $90 + $20 = $110."


def test_extract_concepts_accepts_records_dicts_and_strings():
    from paser.io.records import Record

    out = extract_concepts([Record("Name the capital of France.", "", "Paris is the capital of France."),
                            {"instruction": "Name the capital of France."}, "capital city"], max_phrases=3,
                           multiword_only=False, progress=False)
    assert out[0][:2] == ["capital", "france"] or set(out[0]) >= {"capital", "france"}
    assert out[2] == ["capital city"]
