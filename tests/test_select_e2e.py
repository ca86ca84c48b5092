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


def test_the_api_takes_records_in_memory(tmp_path, tiny_model_dir, tiny_pruned_dir):
    """A list of dicts, of Records, or a datasets.Dataset selects exactly what the same records
    in a file select, and recover trains on in-memory records as on their file."""
    import datasets

    from paser import api
    from paser.errors import PaserError
    from paser.io.records import write_jsonl

    pool = load_records(pool_path())[0][:40]
    rows = [r.as_given() for r in pool]
    f = tmp_path / "pool.jsonl"
    write_jsonl(f, rows)
    common = dict(original=str(tiny_model_dir), pruned=str(tiny_pruned_dir), budget="8", method="paser",
                  cache_dir=str(tmp_path / "cache"), plots=False, k_min=2, k_max=3)
    want = api.select(data=[str(f)], out=str(tmp_path / "file"), **common)
    want_ids = want.selected_ids
    for name, data in (("dicts", rows), ("records", pool), ("dataset", datasets.Dataset.from_list(rows))):
        got = api.select(data=data, out=str(tmp_path / name), **common)
        assert (tmp_path / name / "input.jsonl").exists()
        assert (tmp_path / name / "selected.jsonl").read_text() == (tmp_path / "file" / "selected.jsonl").read_text(), name
        assert got.selected_ids == want_ids
    sel, _ = load_records(tmp_path / "file" / "selected.jsonl")
    res = api.recover(model=str(tiny_pruned_dir), data=sel, out=str(tmp_path / "rec"), max_steps=1, batch_size=2)
    assert res.report["tokens_trained"] > 0
    with pytest.raises(PaserError, match="data item 0 is a int"):
        api.recover(model=str(tiny_pruned_dir), data=[3], out=str(tmp_path / "bad"))


def test_cached_embeddings_need_no_encoder(paser_run, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    """Once the pool's vectors are cached, select (its up-front estimate included) neither
    loads nor needs the sentence encoder, and predicts no embedding time; the same selection."""
    from paser.errors import ModelError
    from paser.select import embed

    tmp, out = paser_run

    def missing():
        raise ModelError("the default sentence encoder is missing")

    monkeypatch.setattr(embed, "default_model_dir", missing)
    again = _select(tmp, tiny_model_dir, tiny_pruned_dir, "paser", tmp / "no-encoder")
    ids = lambda d: [r.id for r in load_records(d / "selected.jsonl")[0]]
    assert ids(again) == ids(out)
    assert json.loads((again / "report.json").read_text())["estimate"]["seconds"]["embed"] == 0.0
