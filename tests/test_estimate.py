"""`paser estimate` against a real `paser select` on the embedded default model."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest


def _run(args, env):
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "paser", *args], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return time.time() - t, p.stdout


@pytest.mark.slow
def test_estimate_within_2x_of_select(tmp_path):
    env = dict(os.environ)
    pruned = tmp_path / "mag50"
    _run(["prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5", "--ppl-tokens", "0", "--out", str(pruned)], env)
    common = ["--pruned", str(pruned), "--limit", "48", "--budget", "6", "--k", "3", "--cache-dir", str(tmp_path / "cache")]

    # In its own process, as a user runs it, so its memory reading is not this test process's.
    code = (
        "import json; from paser.config import SelectArgs; from paser.select.estimate import estimate_selection; "
        f"e = estimate_selection(SelectArgs(pruned={str(pruned)!r}, limit=48, budget='6', k=3)); "
        "print(json.dumps(e.to_dict()))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    est = json.loads(p.stdout.strip().splitlines()[-1])
    assert est["pool_size"] == 48 and est["tokens"] > 48 * 20 and est["forward_sequences"] == 96

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    secs, _ = _run(["select", *common, "--out", str(tmp_path / "sel"), "--no-plots"], env)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rep = json.loads((tmp_path / "sel" / "report.json").read_text())
    measured = rep["timings_s"]["total"] - rep["timings_s"].get("estimate", 0.0)  # select also printed its own estimate
    assert "estimate" in rep  # select predicts its cost before scoring
    assert 0.5 <= est["total_seconds"] / measured <= 2.0, (est["seconds"], rep["timings_s"])
    if peak > before * 1024:  # the select child set the children's peak
        assert 0.5 <= est["peak_memory_bytes"] / peak <= 2.0, (est["peak_memory_bytes"], peak)
    assert rep["scoring"]["tokens"] == pytest.approx(est["tokens"], rel=0.5)
