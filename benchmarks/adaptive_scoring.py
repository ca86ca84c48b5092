"""Adaptive against exhaustive degradation scoring (issue 18): what it saves, what it costs.

Three parts, one run, every step cached and resumable (re-run the same command after a kill):

1. **Embedded pool** (7,400 records, `--pool-limit`), Wanda 50 % SmolLM2-135M, 10 % budget:
   one `paser pipeline` with two variants, `paser` (exhaustive) and `paser-adaptive`
   (`--scoring adaptive --confidence 0.9`), one recovery unit each (LoRA, 2 epochs) and the
   held-out loss / held-out JSD evaluation. From the two selections: the share of tokens
   adaptive scored (goal <= 1/4), the overlap of the selected ids, the predictor's rank
   correlation (leave-one-out on the stratified sample) and how many quotas moved; from the
   two units: the paired differences, adaptive - exhaustive, on held-out loss and JSD per
   capability with their paired SE (goal: within 1 SE).
2. **Alpaca-cleaned** (50,921 records, `../shared/data/instruct/alpaca_cleaned_50921.jsonl.gz`):
   the whole `paser select --scoring adaptive` as a user runs it (a subprocess: embedding,
   clustering, scoring, NTM), its wall time and peak resident memory (the child's own
   rusage). Goal: <= 90 minutes on the 2-core CPU, embedding included.
3. **The headline cost ratio**, from part 1: forward-token equivalents of select + recover
   against full-data recovery, for exhaustive and for adaptive. A scored pool token costs 2
   (both models run; 1 would be the original's states cached), a trained token 3 (forward
   and backward), counted over the tokens recovery really saw (prompt + response, all
   epochs); full data is the pool's tokens x epochs x 3. The embedding pass is left out (a
   22M-parameter encoder against a 135M model; it is timed in part 2). Goal: adaptive >= 5x
   cheaper than full data, where exhaustive is about 2.3x.

Rows go to the results archive `benchmarks/results/adaptive/<pruning>/` (the pipeline's
rows) and `benchmarks/results/adaptive/summary.json` (the table); commit them as they land.
`--summary` prints the table from what is there. `--quick` runs the same code path on a
200-record pool and 200 Alpaca records in a few minutes, with no archive.

    .venv/bin/python benchmarks/adaptive_scoring.py [--quick] [--skip-alpaca] [--summary]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_cleaned_50921.jsonl.gz"
WANDA = {"method": "wanda", "sparsity": 0.5, "n_calibration": 32}
EXHAUSTIVE, ADAPTIVE = "paser", "paser-adaptive"
SCORE_FWD, TRAIN_FWD = 2, 3  # forward-token equivalents per scored pair token / per trained token


def pipeline_config(out: Path, archive: Path | None, quick: bool, confidence: float, pool_limit: int) -> dict:
    methods = [EXHAUSTIVE, {"label": ADAPTIVE, "method": "paser", "scoring": "adaptive", "confidence": confidence}]
    cfg = {
        "out": str(out / "pipeline"),
        "original": "smollm2-135m",
        "prune": WANDA,
        "pool_limit": pool_limit,
        "budgets": ["0.1"],
        "methods": methods,
        "seeds": [0],
        "recover": {"epochs": 2, "batch_size": 4},
        "evaluate": {"tasks": "heldout,heldout_jsd", "limit": None},
        "include_dense": False,
        "include_unrecovered": True,
        "cache_dir": str(out / "cache"),
        "archive": str(archive) if archive else None,
    }
    if quick:
        cfg.update(pool_limit=200, recover={"epochs": 1, "batch_size": 4}, select={"k_min": 3, "k_max": 6},
                   evaluate={"tasks": "heldout,heldout_jsd", "limit": 8}, include_unrecovered=False,
                   prune={**WANDA, "n_calibration": 4, "ppl_tokens": 0})
    return cfg


def compare_selections(exh_dir: Path, ad_dir: Path) -> dict:
    """What the two selections share and what each scored, from their report.json and scores.parquet."""
    import numpy as np
    import pandas as pd

    ex = json.loads((exh_dir / "report.json").read_text())
    ad = json.loads((ad_dir / "report.json").read_text())
    ids = {}
    for name, d in (("ex", exh_dir), ("ad", ad_dir)):
        t = pd.read_parquet(d / "scores.parquet", columns=["id", "decision"])
        ids[name] = set(t["id"][t["decision"].isin(["selected", "ntm_override"])])
    a = ad["adaptive"]
    n_k_ex, n_k_ad = np.asarray(ex["clusters"]["n_k"]), np.asarray(ad["clusters"]["n_k"])
    return {
        "pool_size": ex["pool_size"],
        "selected": len(ids["ex"]),
        "tokens_total": a["tokens_total"],
        "tokens_scored_adaptive": a["tokens_scored"],
        "scored_tokens_ratio": a["fraction_tokens_scored"],
        "scored_records_ratio": a["fraction_scored"],
        "cds_sample_records": int(sum(a["clusters"]["sample_sizes"])),
        "id_overlap": len(ids["ex"] & ids["ad"]) / max(1, len(ids["ex"])),
        "rank_correlation": a["rank_correlation"],
        "confidence": a["confidence"],
        "quota_l1": int(np.abs(n_k_ex - n_k_ad).sum()),
        "passes": a["settings"].get("passes"),
        "certified": a["settings"].get("certified"),
        "select_seconds": {"exhaustive": ex["timings_s"]["total"], "adaptive": ad["timings_s"]["total"]},
    }


def headline(rows: list[dict], cmp: dict, epochs: int) -> dict:
    """Forward-token equivalents of select + recover against full-data recovery (see the docstring)."""
    out = {"full_data_forward_tokens": TRAIN_FWD * epochs * cmp["tokens_total"]}
    for label, scored in ((EXHAUSTIVE, cmp["tokens_total"]), (ADAPTIVE, cmp["tokens_scored_adaptive"])):
        row = next(r for r in rows if r["method"] == label)
        rep = json.loads((Path(row["recover_dir"]) / "recovery_report.json").read_text())
        seen = int(rep["training"]["tokens_seen"])
        sel, rec = SCORE_FWD * scored, TRAIN_FWD * seen
        out[label] = {"select_forward_tokens": sel, "recover_forward_tokens": rec,
                      "cheaper_than_full_data": out["full_data_forward_tokens"] / (sel + rec)}
    return out


def paired(rows: list[dict]) -> dict:
    """adaptive - exhaustive on held-out loss and JSD per capability: mean difference and paired SE."""
    from paser.report.paired import paired_table

    t = paired_table(rows, EXHAUSTIVE)
    if t is None:
        return {}
    header, body = t
    return {"header": header, "rows": [r for r in body if r and r[0] == ADAPTIVE]}


def alpaca_run(out: Path, quick: bool, confidence: float) -> dict:
    """The whole `paser select --scoring adaptive` on Alpaca-cleaned, in a subprocess: wall time
    and the child's own peak RSS (os.wait4). Cached: a finished run is read back, not redone."""
    done = out / "alpaca_run.json"
    if done.exists():
        return json.loads(done.read_text())
    if not ALPACA.exists():
        return {"skipped": f"{ALPACA} not found"}
    pruned = next((out / "pipeline" / "pruned").glob("*/config.json")).parent
    sel = out / "alpaca-select"
    cmd = [sys.executable, "-m", "paser", "select", "--pruned", str(pruned), "--data", str(ALPACA), "--budget", "0.1",
           "--scoring", "adaptive", "--confidence", str(confidence), "--out", str(sel), "--cache-dir", str(out / "alpaca-cache"), "--no-plots"]
    if quick:
        cmd += ["--limit", "200", "--k-min", "3", "--k-max", "6"]
    t = time.time()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"alpaca select failed ({status}): {' '.join(cmd)}")
    rep = json.loads((sel / "report.json").read_text())
    res = {"command": " ".join(cmd[1:]), "records": rep["pool_size"], "wall_seconds": wall,
           "peak_rss_bytes": int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024),
           "timings_s": rep["timings_s"], "fraction_tokens_scored": rep["adaptive"]["fraction_tokens_scored"],
           "tokens_scored": rep["adaptive"]["tokens_scored"], "k": rep["clusters"]["k"],
           "note": "a resumed run's wall time counts only its own part; delete alpaca-select/ and the cache to time it cold"}
    done.write_text(json.dumps(res, indent=1) + "\n")
    return res


def machine() -> str:
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"


def table(s: dict) -> str:
    c, h = s["selection"], s.get("headline", {})
    lines = [f"# benchmarks/adaptive_scoring.py, {s['date']}, {s['machine']}, code at {s['commit']}",
             f"pool {c['pool_size']} records, budget {c['selected']} records, confidence {c['confidence']}",
             f"scored tokens, adaptive / exhaustive: {c['scored_tokens_ratio']:.3f} (records {c['scored_records_ratio']:.3f}; CDS sample {c['cds_sample_records']})",
             f"selected-id overlap: {c['id_overlap']:.3f}; predictor rank correlation: {c['rank_correlation']}; quota L1 {c['quota_l1']}",
             f"select seconds: exhaustive {c['select_seconds']['exhaustive']:.0f}, adaptive {c['select_seconds']['adaptive']:.0f} "
             "(adaptive reads the scores exhaustive cached, so not a cold run; the Alpaca run is)"]
    if h:
        lines.append("forward-token equivalents, full data / (select + recover): "
                     + ", ".join(f"{k} {h[k]['cheaper_than_full_data']:.2f}x" for k in (EXHAUSTIVE, ADAPTIVE)))
    p = s.get("paired", {})
    if p.get("rows"):
        lines.append(" | ".join(p["header"]))
        lines.extend(" | ".join(r) for r in p["rows"])
    a = s.get("alpaca")
    if a and "wall_seconds" in a:
        lines.append(f"alpaca: {a['records']} records, wall {a['wall_seconds'] / 60:.1f} min, peak RSS {a['peak_rss_bytes'] / 2**30:.2f} GiB, "
                     f"tokens scored {a['fraction_tokens_scored']:.3f} of the pool; stages {json.dumps({k: round(v) for k, v in a['timings_s'].items()})}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ.get("PASER_CACHE", Path.home() / ".cache" / "paser")) / "benchmarks" / "adaptive"
    ap.add_argument("--out", type=Path, default=default_out, help=f"output and cache directory (default {default_out})")
    ap.add_argument("--archive", type=Path, default=REPO / "benchmarks" / "results" / "adaptive", help="results archive (none for --quick)")
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--pool-limit", type=int, default=7400)
    ap.add_argument("--quick", action="store_true", help="the same code path on a 200-record pool and 200 Alpaca records; no archive")
    ap.add_argument("--skip-alpaca", action="store_true", help="parts 1 and 3 only")
    ap.add_argument("--summary", action="store_true", help="print the table from the archive; run nothing")
    a = ap.parse_args(argv)
    archive = None if a.quick else a.archive
    summary_path = (a.out / "quick" / "summary.json") if a.quick else a.archive / "summary.json"
    if a.summary:
        if not summary_path.exists():
            print(f"no summary yet at {summary_path}; run without --summary first", file=sys.stderr)
            return 2
        print(table(json.loads(summary_path.read_text())))
        return 0

    from paser.pipeline import run_pipeline

    out = a.out / ("quick" if a.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    cfg = pipeline_config(out, archive / "wanda50" if archive else None, a.quick, a.confidence, a.pool_limit)
    cfg_path = out / "experiment.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(run_pipeline(cfg_path))
    res = json.loads((out / "pipeline" / "results.json").read_text())
    if res["failures"]:
        print(f"pipeline failures: {res['failures']}", file=sys.stderr)
        return 1
    rows = [r for r in res["rows"] if r.get("method") in (EXHAUSTIVE, ADAPTIVE)]
    by = {r["method"]: r for r in rows}
    cmp = compare_selections(Path(by[EXHAUSTIVE]["selection_dir"]), Path(by[ADAPTIVE]["selection_dir"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    s = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "commit": commit, "quick": a.quick,
         "selection": cmp, "paired": paired(rows), "headline": headline(rows, cmp, int(cfg["recover"]["epochs"]))}
    if not a.skip_alpaca:
        s["alpaca"] = alpaca_run(out, a.quick, a.confidence)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(s, indent=1) + "\n")
    print(table(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
