"""`accelerate launch` with 2 CPU processes (gloo) selects exactly what one process selects.

accelerate's `--cpu` flag starts one process unless mpirun is set up; `--multi_gpu` starts the
processes through torch.distributed.run, and paser then picks gloo because there is no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paser.cli import main
from paser.io.records import load_records


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "paser", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )


def _ids(d: Path) -> list[str]:
    return [r.id for r in load_records(d / "selected.jsonl")[0]]


@pytest.mark.parametrize("method", ["paser", "ifd"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, tiny_pruned_dir, method):
    common = ["--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir), "--limit", "60", "--budget", "10", "--method", method, "--no-plots", "--k", "3"]
    assert main(["select", *common, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0

    p = _launch(["select", *common, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1: scored its share" in p.stdout
    assert _ids(tmp_path / "two") == _ids(tmp_path / "one")
    # both ranks wrote score shards into the one shared cache
    shards = [s.name for s in (tmp_path / "c2" / "scores").rglob("shard-r*.parquet")]
    assert any(s.startswith("shard-r000") for s in shards) and any(s.startswith("shard-r001") for s in shards)


def test_data_parallel_recovery(tmp_path, tiny_pruned_dir):
    from paser.data import pool_path
    from paser.io.records import write_jsonl

    recs = load_records(pool_path())[0][:12]
    write_jsonl(tmp_path / "sel.jsonl", [r.to_dict() for r in recs])
    p = _launch(["recover", "--model", str(tiny_pruned_dir), "--data", str(tmp_path / "sel.jsonl"), "--out", str(tmp_path / "rec"), "--max-steps", "3", "--batch-size", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1: trained its data shard" in p.stdout and "recovered model written" in p.stdout
    import json

    rep = json.loads((tmp_path / "rec" / "recovery_report.json").read_text())
    assert rep["training"]["steps"] == 3
    # each optimizer step saw both ranks' batches: 3 steps x 2 ranks x batch 2 examples
    assert rep["training"]["tokens_seen"] >= 3 * 2 * 2 * 10
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "rec" / "merged") is not None
