"""The results archive: a pipeline run on a machine with an empty cache reuses the rows (and the
per-sample scores) that an earlier run archived, recomputes what the archive lacks, and says
so in its report."""

from __future__ import annotations

import json
import shutil

from conftest import write_pipeline_config


def _config(path, original, pruned, out, archive, methods, recover="{max_steps: 2, batch_size: 2}"):
    return write_pipeline_config(path, original, pruned, out, methods, recover=recover, extra=f"archive: {archive}\n")


def _numbers(res: dict) -> list:
    return [(r["method"], r["results"]["results"]["wikitext2"]["ppl"], r["results"]["results"]["heldout"]["record_loss"]) for r in res["rows"]]


def test_a_fresh_machine_reuses_the_archive(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch, one_thread):
    import paser.pipeline as pl
    from paser.score import engine

    pruned = tmp_path / "pruned"
    shutil.copytree(tiny_pruned_dir, pruned)
    archive = tmp_path / "archive"
    cfg1 = _config(tmp_path / "a.yaml", tiny_model_dir, pruned, tmp_path / "machine1", archive, ["random", "ifd", "paser"])
    pl.run_pipeline(cfg1)
    first = json.loads((tmp_path / "machine1" / "results.json").read_text())
    assert not first["failures"] and first["archive"]["reused"] == []
    rows = sorted(p.parent.name.rsplit("-", 1)[0] for p in archive.glob("rows/*/row.json"))
    assert rows == ["dense", "ifd-b6-s0", "paser-b6-s0", "random-b6-s0", "unrecovered"]
    assert list(archive.glob("scores/loss/*/shard-*.parquet"))  # ifd's per-sample losses travel too
    assert list(archive.glob("scores/degradation/*/shard-*.parquet"))  # and PASER's JSDs
    assert (next(archive.glob("rows/paser-b6-s0-*")) / "report.json").exists()
    ids = json.loads(next(archive.glob("rows/ifd-b6-s0-*/selected_ids.json")).read_text())
    assert len(ids) == 6

    # "Another machine": a new output and cache directory, nothing of machine 1 but the archive,
    # and a second seed. The archived rows must not be recomputed; the second seeds run, and
    # ifd and paser read every per-sample score from the restored stores instead of running
    # the models.
    real_unit, real_loss, real_jsd = pl.Experiment._run_unit, engine.score_loss, engine.score_degradation
    ran, scored = [], []

    def unit(self, p):
        ran.append((p.entry.label, p.seed))
        return real_unit(self, p)

    def loss(*a, **k):
        out = real_loss(*a, **k)
        scored.append(out.stats.samples_scored)
        return out

    def jsd(*a, **k):
        out = real_jsd(*a, **k)
        scored.append(out.stats.samples_scored)
        return out

    monkeypatch.setattr(pl.Experiment, "_run_unit", unit)
    monkeypatch.setattr(engine, "score_loss", loss)
    monkeypatch.setattr(engine, "score_degradation", jsd)
    cfg2 = _config(tmp_path / "b.yaml", tiny_model_dir, pruned, tmp_path / "machine2", archive, ["random", "ifd", "paser"])
    cfg2.write_text(cfg2.read_text().replace("seeds: [0]", "seeds: [0, 1]"))
    pl.run_pipeline(cfg2)
    second = json.loads((tmp_path / "machine2" / "results.json").read_text())
    assert not second["failures"]
    assert ran == [("random", 1), ("ifd", 1), ("paser", 1)]
    assert len(scored) == 3 and all(n == 0 for n in scored)  # loss(y|x), loss(y), JSD: all restored
    assert second["archive"]["reused"] == ["dense", "unrecovered", "random-b6-s0", "ifd-b6-s0", "paser-b6-s0"]
    assert second["archive"]["score_files_restored"] > 0 and second["archive"]["fingerprint_differs"] == []
    assert _numbers(second)[:5] == _numbers(first)
    assert second["selections"]["ifd-b6-s0"]["capabilities"] == first["selections"]["ifd-b6-s0"]["capabilities"]
    md = (tmp_path / "machine2" / "report.md").read_text()
    assert "5 row(s) were read from the results archive" in md

    # The archive alone gives the rows to a machine that has run nothing (benchmarks' --summary).
    summary = pl.archived_results(cfg2)
    assert [r["method"] for r in summary["rows"]][:2] == ["dense (unpruned)", "pruned, no recovery"]
    assert [(r["method"], r["seed"]) for r in summary["rows"][2:]] == [("random", 0), ("ifd", 0), ("paser", 0), ("random", 1), ("ifd", 1), ("paser", 1)]
    assert summary["progress"] == {"units_done": 6, "units_total": 6, "complete": True}


def test_the_archive_matches_by_what_made_a_row(tmp_path, tiny_model_dir, tiny_pruned_dir, one_thread):
    """Another recovery setting is another unit; a damaged row is recomputed, not trusted; a
    pruned model with other weights under the same name is reused but reported."""
    import paser.pipeline as pl
    import torch
    from safetensors.torch import load_file, save_file

    pruned = tmp_path / "pruned"
    shutil.copytree(tiny_pruned_dir, pruned)
    archive = tmp_path / "archive"
    cfg = _config(tmp_path / "a.yaml", tiny_model_dir, pruned, tmp_path / "m1", archive, ["random"])
    cfg.write_text(cfg.read_text() + "include_dense: false\n")
    pl.run_pipeline(cfg)
    cfg2 = _config(tmp_path / "b.yaml", tiny_model_dir, pruned, tmp_path / "m2", archive, ["random"], recover="{max_steps: 3, batch_size: 2}")
    cfg2.write_text(cfg2.read_text() + "include_dense: false\n")
    pl.run_pipeline(cfg2)
    res = json.loads((tmp_path / "m2" / "results.json").read_text())
    assert res["archive"]["reused"] == ["unrecovered"]  # max_steps differs: the unit ran again

    (row,) = archive.glob("rows/unrecovered-*/row.json")
    row.write_text(row.read_text()[:100])  # a torn or hand-damaged file
    weights = next(pruned.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name] = tensors[name] + 0.01 * torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    pl.run_pipeline(cfg, out=str(tmp_path / "m3"))
    res = json.loads((tmp_path / "m3" / "results.json").read_text())
    assert res["archive"]["reused"] == ["random-b6-s0"]  # the damaged unrecovered row was recomputed
    assert res["archive"]["fingerprint_differs"] == ["random-b6-s0"]
    assert "came from a pruned model whose weights differ" in (tmp_path / "m3" / "report.md").read_text()
    fps = pl.archived_results(cfg)["archive"]["pruned_fingerprints"]  # what benchmarks' --summary names
    assert set(fps) == {"unrecovered", "random-b6-s0"} and fps["unrecovered"] != fps["random-b6-s0"]
    json.loads(row.read_text())  # and rewritten whole

