"""`paser select` end to end on tiny models: exact budget, valid scores, determinism, every method."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from paser.cli import main
from paser.data import pool_path
from paser.io.records import load_records


def _select(tmp_path, tiny_model_dir, tiny_pruned_dir, method, out, *extra):
    rc = main(
        [
            "select", "--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir),
            "--limit", "90", "--budget", "15", "--method", method, "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-plots", *extra,
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def paser_run(tmp_path_factory, tiny_model_dir, tiny_pruned_dir):
    tmp = tmp_path_factory.mktemp("sel")
    out = _select(tmp, tiny_model_dir, tiny_pruned_dir, "paser", tmp / "a", "--plots")
    return tmp, out


def test_paser_selects_exactly_the_budget_from_the_pool(paser_run):
    _, out = paser_run
    sel, _ = load_records(out / "selected.jsonl")
    pool_ids = {r.id for r in load_records(pool_path())[0]}
    assert len(sel) == 15 and {r.id for r in sel} <= pool_ids
    rep = json.loads((out / "report.json").read_text())
    assert sum(rep["clusters"]["n_k"]) == 15
    assert sum(rep["clusters"]["sizes"]) == 90
    assert (out / "cluster_map.png").stat().st_size > 1000 and (out / "budget_per_cluster.png").exists()


def test_scores_table_is_complete_and_valid(paser_run):
    _, out = paser_run
    t = pq.read_table(out / "scores.parquet").to_pydict()
    jsd = np.array(t["jsd"])
    assert len(jsd) == 90 and np.all(jsd >= 0) and np.all(jsd <= math.log(2)) and not np.isnan(jsd).any()
    assert sum(d == "selected" or d == "ntm_override" for d in t["decision"]) == 15
    assert all(t["reason"]) and set(t) >= {"cluster", "cost", "ies", "concepts", "decision"}


def test_same_seed_same_selection(paser_run, tiny_model_dir, tiny_pruned_dir):
    tmp, out = paser_run
    again = _select(tmp, tiny_model_dir, tiny_pruned_dir, "paser", tmp / "b")
    ids = lambda d: [r.id for r in load_records(d / "selected.jsonl")[0]]
    assert ids(out) == ids(again)


@pytest.mark.parametrize("method", ["random", "uniform", "ifd", "instruction_mining"])
def test_baselines_respect_the_budget(paser_run, tiny_model_dir, tiny_pruned_dir, method):
    tmp, _ = paser_run
    out = _select(tmp, tiny_model_dir, tiny_pruned_dir, method, tmp / method)
    sel, _ = load_records(out / "selected.jsonl")
    assert len(sel) == 15 and len({r.id for r in sel}) == 15


def test_missing_pruned_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["select", "--limit", "20", "--budget", "5", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "needs --pruned" in capsys.readouterr().err
