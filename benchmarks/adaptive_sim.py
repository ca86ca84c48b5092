"""Offline simulation of adaptive scoring against exhaustive, on archived real PASER scores.

No model runs: `score_fn` looks the JSD up in the archived per-sample scores of the
recovery benchmark (Wanda 50 % SmolLM2-135M, the 2,000-record seeded subset of the
embedded pool, `benchmarks/results/recovery/wanda50/scores/degradation`). Records, S2RIC
embeddings and clusters are recomputed exactly as `paser select --limit 2000 --seed 0` does
(embedding 2,000 records takes about 30 s at one thread, cached under --cache).

For each setting it reports, against exhaustive scoring with the same allocation rule and
ranking (NTM off, so that only scoring differs): the fraction of samples and of tokens
scored, the overlap of the selected ids, the L1 distance between the quotas, the
predictor's rank correlation on the stratified sample (leave-one-out), and, as a control,
the overlap a stratified random subset of the same size would give.

    PYTHONPATH=src python benchmarks/adaptive_sim.py --cache /tmp/paser-cache-ad --out results.json
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np

ARCHIVE = Path(__file__).resolve().parent / "results" / "recovery" / "wanda50" / "scores" / "degradation"


def load_benchmark(cache: str, archive: Path = ARCHIVE):
    import pandas as pd

    from paser.config import SelectArgs
    from paser.select.cluster import semantic_clusters
    from paser.select.embed import embed_records
    from paser.select.run import load_selection_pool

    records, _ = load_selection_pool(SelectArgs(limit=2000, seed=0))
    emb = embed_records(records, cache_dir=cache, show_progress=False)
    clusters = semantic_clusters(emb, seed=0)
    shards = glob.glob(str(archive / "*" / "*.parquet"))
    if not shards:
        raise SystemExit(f"no archived scores under {archive}")
    df = pd.concat([pd.read_parquet(f) for f in shards]).drop_duplicates("id").set_index("id")
    df = df.loc[[r.id for r in records]]
    from paser.select.adaptive import text_statistics
    from paser.select.concepts import extract_concepts

    return dict(
        ids=[r.id for r in records],
        concepts=extract_concepts(records, max_phrases=5, multiword_only=True, progress=False),  # paser select's defaults
        text=text_statistics([r.instruction + "\n" + r.input for r in records], [r.output for r in records]),
        emb=emb,
        labels=clusters.labels,
        jsd=df["jsd"].to_numpy(np.float64),
        n_prompt=df["n_prompt"].to_numpy(np.int64),
        n_resp=df["n_response"].to_numpy(np.int64),
    )


def make_gate(data, ntm):
    from paser.select.concepts import DEFAULT_THRESHOLD, NTMGate

    return (lambda: NTMGate(data["concepts"], threshold=DEFAULT_THRESHOLD)) if ntm else None


def exhaustive(data, budget, rank_fn, ntm=False):
    from paser.select.budget import allocate_budget, select_with_budget
    from paser.select.efficiency import cluster_degradation

    labels, jsd = data["labels"], data["jsd"]
    k = int(labels.max()) + 1
    cds = cluster_degradation(jsd, labels, k)
    n_k = allocate_budget(cds, np.bincount(labels, minlength=k), budget)
    prio = rank_fn(jsd, np.arange(jsd.size))
    gate = make_gate(data, ntm)
    out = select_with_budget(labels, prio, n_k, gate() if gate else None, cds=cds, priority=prio)
    return set(out.selected), n_k


def random_control(data, n_scored, n_k, rank_fn, seed):
    """Overlap of a stratified random subset of the same size, topped by the same ranking."""
    labels, jsd = data["labels"], data["jsd"]
    rng = np.random.default_rng(seed)
    k = len(n_k)
    sizes = np.bincount(labels, minlength=k)
    take = np.minimum(sizes, np.maximum(n_k, np.round(sizes * n_scored / labels.size).astype(int)))
    sel = []
    for c in range(k):
        mem = np.flatnonzero(labels == c)
        sub = rng.choice(mem, size=take[c], replace=False)
        r = rank_fn(jsd[sub], sub)
        sel.extend(sub[np.lexsort((sub, -r))][: n_k[c]].tolist())
    return set(sel)


# kNN within the cluster (the default), or over the whole pool ("/global").
PREDICTORS = {
    "knn+len": dict(heteroscedastic=False),
    "+het": dict(heteroscedastic=True),
    "+het+text": dict(heteroscedastic=True, text=True),
    "+het+text/global": dict(heteroscedastic=True, text=True, neighbours="global"),
}


def run(data, budget, ranking, confidence, cds_rel_error, seed, exact_quota=False, predictor="+het+text", ntm=False):
    kw = dict(PREDICTORS[predictor])
    if kw.pop("text", False):
        kw["extra_features"] = data["text"]
    from paser.select.adaptive import adaptive_select, ies_rank, jsd_rank
    from paser.select.budget import allocate_budget

    labels, jsd = data["labels"], data["jsd"]
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    rank_fn = ies_rank(data["n_prompt"], data["n_resp"]) if ranking == "ies" else jsd_rank
    ref, n_k_ref = exhaustive(data, budget, rank_fn, ntm)
    n_k_fn = (lambda c: n_k_ref) if exact_quota else (lambda c: allocate_budget(c, sizes, budget))
    calls = []

    def score_fn(idx):
        calls.append(len(idx))
        return jsd[idx]

    t = time.time()
    res, out = adaptive_select(score_fn, labels, n_k_fn, data["emb"], rank_fn=rank_fn, make_gate=make_gate(data, ntm),
                               n_prompt=data["n_prompt"], n_response=data["n_resp"], confidence=confidence,
                               cds_rel_error=cds_rel_error, seed=seed, **kw)
    secs = time.time() - t
    sel = set(out.selected)
    ctrl = random_control(data, res.n_scored, res.n_k, rank_fn, seed)
    # What the misses give up: the selection's mean JSD and mean ranking value against exhaustive's.
    a, r = np.array(sorted(sel)), np.array(sorted(ref))
    all_rank = rank_fn(jsd, np.arange(jsd.size))
    true_cds = np.bincount(labels, weights=jsd, minlength=k) / sizes
    covered = np.abs(res.cds - true_cds) <= res.cds_half_width + 1e-12
    return dict(
        ranking=ranking, predictor=predictor, ntm=ntm, passes=res.settings["passes"], confidence=confidence, cds_rel_error=cds_rel_error, seed=seed, exact_quota=exact_quota,
        fraction_scored=res.n_scored / labels.size,
        fraction_tokens=res.tokens_scored / res.tokens_total,
        fraction_sampled=float(res.sampled.mean()),
        overlap=len(sel & ref) / len(ref),
        overlap_random_control=len(ctrl & ref) / len(ref),
        jsd_ratio=float(jsd[a].mean() / jsd[r].mean()),
        jsd_ratio_random_control=float(jsd[np.array(sorted(ctrl))].mean() / jsd[r].mean()),
        rank_ratio=float(all_rank[a].mean() / all_rank[r].mean()),
        quota_l1=int(np.abs(res.n_k - n_k_ref).sum()),
        cds_ci_coverage=float(covered.mean()),
        rank_correlation=res.rank_correlation,
        rounds=res.rounds,
        seconds=secs,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/paser-cache-ad")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--rel-error", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--ranking", nargs="+", default=["ies", "jsd"])
    ap.add_argument("--predictor", nargs="+", default=list(PREDICTORS))
    ap.add_argument("--ntm", action="store_true", help="NTM on (paser select's defaults), in the loop of adaptive_select")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    data = load_benchmark(a.cache)
    if a.ntm and a.budget == 200:
        # The reproduction check: exhaustive + NTM here must be the archived benchmark's selection.
        from paser.select.adaptive import ies_rank

        archived = json.loads((ARCHIVE.parents[1] / "rows" / "paser-b0.1-s0-2470d796c7f0" / "selected_ids.json").read_text())
        mine, _ = exhaustive(data, 200, ies_rank(data["n_prompt"], data["n_resp"]), ntm=True)
        print(f"exhaustive + NTM reproduces the archived paser-b0.1-s0 selection: {sorted(archived) == sorted(data['ids'][i] for i in mine)}")
    rows = []
    settings = [("ies", p, c, e, False) for p in a.predictor for c in a.confidence for e in a.rel_error]
    settings += [("ies", "+het+text", c, 0.1, True) for c in a.confidence]  # search alone: the exhaustive quotas
    settings += [(r, "+het+text", c, 0.1, False) for r in a.ranking if r != "ies" for c in a.confidence]
    settings += [(r, "+het+text", 1.0, 0.1, False) for r in a.ranking]
    print(f"{'rank':4} {'predictor':10} {'conf':>5} {'eps':>4} {'quota':>5} | {'scored':>6} {'tokens':>6} {'sample':>6} | {'overlap':>7} {'ctrl':>5} {'jsd%':>5} {'ctrl%':>5} {'L1':>4} {'cover':>5} {'rho':>5}")
    for ranking, pred, conf, eps, exact in settings:
        rs = [run(data, a.budget, ranking, conf, eps, s, exact_quota=exact, predictor=pred, ntm=a.ntm) for s in range(a.seeds)]
        rows.extend(rs)
        m = {key: float(np.mean([r[key] for r in rs])) for key in rs[0] if isinstance(rs[0][key], (int, float)) and not isinstance(rs[0][key], bool)}
        print(f"{ranking:4} {pred:10} {conf:5.2f} {eps:4.2f} {'exact' if exact else 'est':>5} | {m['fraction_scored']:6.3f} {m['fraction_tokens']:6.3f} "
              f"{m['fraction_sampled']:6.3f} | {m['overlap']:7.3f} {m['overlap_random_control']:5.3f} {100 * m['jsd_ratio']:5.1f} {100 * m['jsd_ratio_random_control']:5.1f} {m['quota_l1']:4.1f} "
              f"{m['cds_ci_coverage']:5.2f} {m['rank_correlation']:5.2f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"budget": a.budget, "pool": 2000, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
