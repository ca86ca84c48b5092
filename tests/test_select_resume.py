"""`paser select` killed with SIGKILL during scoring resumes to the identical selection without
rescoring what it had cached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from paser.io.records import load_records


def test_sigkill_during_scoring_then_resume(tmp_path, tiny_model_dir, tiny_pruned_dir):
    common = ["select", "--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir), "--limit", "120", "--budget", "12",
              "--k", "3", "--no-plots", "--no-estimate", "--max-batch-tokens", "160"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "paser", *common, "--out", str(tmp_path / "ref"), "--cache-dir", str(tmp_path / "c_ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    cache = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "paser", *common, "--out", str(tmp_path / "run"), "--cache-dir", str(cache)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # Wait for the degradation scores themselves: the hidden-state cache under scores/final_hidden
        # flushes its own shard just before, and a kill between the two leaves no scores cached.
        if list((cache / "scores" / "degradation").rglob("shard-*.parquet")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("scoring finished before the kill landed")
    assert not (tmp_path / "run" / "selected.jsonl").exists()

    again = subprocess.run([sys.executable, "-m", "paser", *common, "--out", str(tmp_path / "run"), "--cache-dir", str(cache)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    ids = lambda d: [r.id for r in load_records(d / "selected.jsonl")[0]]
    assert ids(tmp_path / "run") == ids(tmp_path / "ref")
    scoring = json.loads((tmp_path / "run" / "report.json").read_text())["scoring"]
    assert scoring["samples_cached"] > 0 and scoring["samples_scored"] < 120
    assert scoring["samples_cached"] + scoring["samples_scored"] == 120
