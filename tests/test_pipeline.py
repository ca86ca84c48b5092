"""`paser pipeline` on tiny models: every stage runs, the report is written, and a re-run with
one more method does only the new work."""

from __future__ import annotations

import dataclasses
import json

import pytest

from paser.cli import main

from conftest import write_pipeline_config as _config


def test_pipeline_end_to_end_and_incremental(tmp_path, tiny_model_dir, tiny_pruned_dir, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, out, ["random"])
    assert main(["pipeline", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and "report.html" in printed
    res = json.loads((out / "results.json").read_text())
    assert not res["failures"]
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["dense (unpruned)", "pruned, no recovery", "random"]
    assert all(r["results"]["results"]["wikitext2"]["ppl"] > 1 for r in res["rows"])
    html = (out / "report.html").read_text()
    assert "<table>" in html and "WikiText-2 PPL" in html
    done_before = sorted(p.parent.name for p in out.glob("*/*/DONE.json"))

    _config(cfg, tiny_model_dir, tiny_pruned_dir, out, ["random", "uniform"])
    assert main(["pipeline", "--config", str(cfg)]) == 0
    res2 = json.loads((out / "results.json").read_text())
    done_after = sorted(p.parent.name for p in out.glob("*/*/DONE.json"))
    new = set(done_after) - set(done_before)
    assert {n.split("-")[0] for n in new} == {"uniform"} and len(new) == 2  # select + recover, nothing else
    assert "recover" not in res2["costs_s"] or res2["costs_s"]["recover"] > 0
    assert [r["method"] for r in res2["rows"]][-1] == "uniform"
    # the report shows what each unit selected and what each stage cost when it ran, including
    # the random unit that this second run only read back from its cache
    caps = res2["selections"]["random-b6-s0"]["capabilities"]
    assert sum(caps.values()) == 6 and set(caps) <= {"general", "math", "code"}
    md = (out / "report.md").read_text()
    assert "## Selected data by capability" in md and "| uniform-b6-s0 |" in md
    costs = md[md.index("## Costs"):]
    random_row = next(line for line in costs.splitlines() if line.startswith("| random-b6-s0 |")).split("|")
    assert random_row[4].strip() != "-" and float(random_row[4].strip().replace(",", "")) >= 0  # recover (s)


def test_interrupted_pipeline_leaves_a_partial_report_and_resumes(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    import paser.pipeline as pl

    out = tmp_path / "run"
    cfg = _config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, out, ["random", "uniform"])
    real = pl.Experiment._run_unit

    def killed_at_uniform(self, unit):
        if unit.entry.label == "uniform":
            raise KeyboardInterrupt  # as Ctrl-C or a kill would stop the run here
        return real(self, unit)

    monkeypatch.setattr(pl.Experiment, "_run_unit", killed_at_uniform)
    with pytest.raises(KeyboardInterrupt):
        pl.run_pipeline(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["progress"] == {"units_done": 1, "units_total": 2, "complete": False}
    assert [r["method"] for r in res["rows"]] == ["dense (unpruned)", "pruned, no recovery", "random"]
    assert "Incomplete: 1 of 2" in (out / "report.md").read_text() and "Incomplete: 1 of 2" in (out / "report.html").read_text()
    done_before = {p.parent.name for p in out.glob("*/*/DONE.json")}

    monkeypatch.setattr(pl.Experiment, "_run_unit", real)
    pl.run_pipeline(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["progress"]["complete"] and "Incomplete" not in (out / "report.md").read_text()
    new = {p.parent.name for p in out.glob("*/*/DONE.json")} - done_before
    assert len(new) == 2 and all(n.startswith("uniform-b6-s0-") for n in new)  # its select and recover stages only
    assert "select" not in res["costs_s"] or res["costs_s"]["select"] > 0


def test_pipeline_units_run_seed_major(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    import paser.pipeline as pl

    cfg = _config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", ["random", "full"])
    text = cfg.read_text().replace("seeds: [0]", "seeds: [0, 1]").replace('budgets: ["6"]', 'budgets: ["6", "8"]')
    cfg.write_text(text + "include_dense: false\ninclude_unrecovered: false\n")
    order = []

    def record(self, unit):
        order.append((unit.entry.label, unit.budget, unit.seed))
        raise RuntimeError("not run here")

    monkeypatch.setattr(pl.Experiment, "_run_unit", record)
    pl.run_pipeline(cfg)
    # full data ignores the budget and has nothing to sample: one unit, after the seeded ones
    assert order == [("random", "6", 0), ("random", "8", 0), ("random", "6", 1), ("random", "8", 1), ("full", "6", 0)]


def test_pipeline_config_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("out: x\nmethodz: [paser]\n")
    assert main(["pipeline", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml, line 2, field 'methodz'" in err
    cfg.write_text("out: x\npool_limit: 200\npool_seed: first\n")
    assert main(["pipeline", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml, line 3, field 'pool_seed'" in err and "expected an integer" in err and "Traceback" not in err
    cfg.write_text("out: x\narchive: [a, b]\n")
    assert main(["pipeline", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml, line 2, field 'archive'" in err and "expected a directory path" in err


def test_every_seed_selects_from_the_same_pool(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    """pool_limit takes one seeded subset for all seeds (the first seed's), so seeds compare
    methods on one pool; seed 0's options are unchanged, so its cached stages stay valid."""
    from paser import stages
    from paser.select.run import load_selection_pool

    cfg = _config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", ["random"])
    cfg.write_text(cfg.read_text().replace("seeds: [0]", "seeds: [0, 1]") + "include_dense: false\ninclude_unrecovered: false\n")
    seen = []

    def fake_select(args):
        seen.append(args)
        raise RuntimeError("not run here")

    monkeypatch.setattr(stages, "select", fake_select)
    import paser.pipeline as pl

    pl.run_pipeline(cfg)
    assert [(a.seed, a.limit_seed) for a in seen] == [(0, None), (1, 0)]
    pools = [[r.id for r in load_selection_pool(a)[0]] for a in seen]
    assert len(pools[0]) == 40 and pools[0] == pools[1]
    # without the fixed seed, seed 1 would have drawn another pool
    other = dataclasses.replace(seen[1], limit_seed=None)
    assert [r.id for r in load_selection_pool(other)[0]] != pools[0]
