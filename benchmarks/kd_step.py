"""Cost of distillation recovery: time per training step and peak memory of kd and sft+kd,
as ratios to sft measured in the same run.

    PASER_CACHE=/tmp/pcache python benchmarks/kd_step.py --model /tmp/kd-wanda --threads 1

Each objective trains in its own fresh process (so that peak memory is its own: peak RSS on
a CPU, torch's peak allocated memory on a GPU) on the same records, with the same LoRA
settings, for --steps steps; the step time is the median over the steps after the first.
The teacher's top-k cache is built first, into a fresh temporary cache, in a process of its own (its time and memory are
printed too: that is a one-off cost per data set), so the kd runs measure training only,
which holds the pruned model and reads the teacher from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(a) -> None:
    import resource

    import torch
    from transformers import TrainerCallback

    from paser.data import pool_path
    from paser.io.records import load_records
    from paser.recover import recover

    if a.threads:
        torch.set_num_threads(a.threads)
    pool, _ = load_records(pool_path())
    recs = random.Random(a.seed).sample(pool, a.n)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = StepTimer()
    t0 = time.perf_counter()
    rep = recover(
        a.model, recs, a.out, objective=a.objective, teacher=a.teacher, kd_topk=a.kd_topk, batch_size=a.batch_size,
        cutoff=a.cutoff, max_steps=a.steps, seed=a.seed, show_progress=False, callbacks=[] if a.build_only else [timer],
        resume=False, cache_dir=a.cache_dir,
    )  # fmt: skip
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({
        "objective": a.objective, "seconds": time.perf_counter() - t0, "step_times": timer.times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda_peak_mb": cuda / 2**20 if cuda else None,
        "device": rep["device"], "dtype": rep["dtype"], "cache_built": (rep.get("kd") or {}).get("teacher_cache_built"),
        "response_tokens": rep["data"]["response_tokens_per_epoch"],
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/kd-wanda", help="the pruned model")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8, help="pool records (seeded sample)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--kd-topk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per objective (the fastest is kept)")
    ap.add_argument("--objective", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.objective:
        return child(a)

    def run(objective: str, work: Path, build_only: bool = False) -> dict:
        cmd = [sys.executable, __file__, "--objective", objective, "--out", str(work / objective), "--model", a.model,
               "--teacher", a.teacher, "--n", str(a.n), "--steps", str(1 if build_only else a.steps), "--batch-size",
               str(a.batch_size), "--cutoff", str(a.cutoff), "--kd-topk", str(a.kd_topk), "--seed", str(a.seed),
               "--threads", str(a.threads), "--cache-dir", str(work / "cache")]
        cmd += ["--build-only"] if build_only else []  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            sys.exit(f"{objective} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build = run("kd", work / "build", build_only=True)
        # Interleaved repeats, the best median of each kept: on a shared machine the load
        # changes between runs, and the fastest run is the one least disturbed.
        runs: dict[str, list[dict]] = {}
        for _ in range(a.repeats):
            for obj in ("sft", "kd", "sft+kd"):
                runs.setdefault(obj, []).append(run(obj, work))
        med = lambda r: statistics.median(r["step_times"][1:] or r["step_times"])  # noqa: E731
        rows = {obj: min(rs, key=med) for obj, rs in runs.items()}
    base = rows["sft"]
    print(f"model {a.model} (teacher {a.teacher}), {rows['sft']['device']} {rows['sft']['dtype']}, threads {a.threads or 'default'}; "
          f"{a.n} pool records ({base['response_tokens']} response tokens), batch {a.batch_size}, cutoff {a.cutoff}, "
          f"{a.steps} steps, kd_topk {a.kd_topk}, best of {a.repeats} interleaved runs")  # fmt: skip
    assert build["cache_built"] is True, "the first kd process must build the teacher cache (a fresh cache dir)"
    print(f"teacher cache built once in {build['seconds']:.1f} s (that process, with 1 training step: peak RSS {build['peak_rss_mb']:.0f} MB"
          + (f", GPU peak {build['cuda_peak_mb']:.0f} MB" if build["cuda_peak_mb"] else "") + ")")  # fmt: skip
    mem_key = "cuda_peak_mb" if base["cuda_peak_mb"] else "peak_rss_mb"
    print(f"{'objective':>9} {'s/step':>8} {'ratio':>6} {'peak MB':>8} {'ratio':>6}   ({mem_key})")
    for obj, r in rows.items():
        assert obj == "sft" or r["cache_built"] is False, "the kd runs must read the prebuilt cache"
        st = statistics.median(r["step_times"][1:] or r["step_times"])
        st0 = statistics.median(base["step_times"][1:] or base["step_times"])
        print(f"{obj:>9} {st:>8.3f} {st / st0:>6.3f} {r[mem_key]:>8.0f} {r[mem_key] / base[mem_key]:>6.3f}")


if __name__ == "__main__":
    main()
