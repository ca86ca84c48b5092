"""Benchmark S2RIC clustering: time and peak memory, and quality on a mixed pool.

    python benchmarks/clustering.py mixed                     # purity / ARI vs source
    python benchmarks/clustering.py alpaca --limit 10000      # real pool (embeddings cached)
    python benchmarks/clustering.py synthetic --synthetic-n 100000

Embedding is a separate, cached step (`paser.select.embed.embed_records`), timed on its own;
the clustering figures exclude it. Peak memory: the process's peak RSS (getrusage) and the
Python-heap peak of the clustering call (tracemalloc; numpy arrays included, faiss's C++
buffers not). Run the big sizes with `nice -n 10` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

# ../shared/data beside the checkout (the project's data folder); override with the options below.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"


def rss_peak_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_cluster(X: np.ndarray, args: argparse.Namespace, trace: bool = True):
    from paser.select.cluster import semantic_clusters

    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    res = semantic_clusters(
        X, k=args.k, k_min=args.k_min, k_max=args.k_max, n_neighbors=args.n_neighbors,
        n_components=args.n_components, seed=args.seed, nmf_errors=args.nmf_errors,
    )
    wall = time.perf_counter() - t0
    heap = tracemalloc.get_traced_memory()[1] / 2**20 if trace else float("nan")
    if trace:
        tracemalloc.stop()
    return res, wall, heap


def report(name: str, n: int, res, wall: float, heap: float, extra: dict | None = None) -> dict:
    row = {
        "case": name, "n": n, "k": res.k, "criterion": res.criterion, "wall_s": round(wall, 2),
        "cpu_s": round(time.process_time(), 1), "rss_peak_mb": round(rss_peak_mb(), 1),
        "heap_peak_mb": round(heap, 1), "timings": {k: round(v, 2) for k, v in res.timings.items()},
        "sizes": res.sizes().tolist(),
        "eigengaps": {k: round(v, 4) for k, v in res.criterion_values.items()},
        "nmf_errors": {k: round(v, 4) for k, v in res.nmf_errors.items()},
        "eigenvalues": [round(float(v), 4) for v in res.eigenvalues[:12]],
    }
    row.update(extra or {})
    print(json.dumps(row))
    return row


def embed_cached(records, args) -> tuple[np.ndarray, float]:
    from paser.select.embed import embed_records

    t0 = time.perf_counter()
    X = embed_records(records, cache_dir=args.cache_dir, show_progress=not args.quiet)
    return X, time.perf_counter() - t0


def load_mixed(args):
    from paser.io.records import load_records

    rng = random.Random(args.seed)
    parts = [
        (Path(args.alpaca), args.mixed_alpaca, "alpaca"),
        (Path(args.gsm8k), args.mixed_gsm8k, "gsm8k"),
        (Path(args.code), args.mixed_code, "code"),
    ]
    pool = []
    for path, n, src in parts:
        recs, _ = load_records(path, source=src, skip_invalid=True)
        pool += rng.sample(recs, min(n, len(recs)))
    return pool


def case_mixed(args) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from paser.select.cluster import cluster_purity

    pool = load_mixed(args)
    X, t_embed = embed_cached(pool, args)
    sources = np.array([r.source for r in pool])
    res, wall, heap = timed_cluster(X, args)
    out = {"embed_s": round(t_embed, 2), "purity": round(cluster_purity(res.labels, sources), 4),
           "ari": round(adjusted_rand_score(sources, res.labels), 4)}
    # Per cluster: its size and source mix, to see where each source went.
    comp = {}
    for c in range(res.k):
        s, n = np.unique(sources[res.labels == c], return_counts=True)
        comp[c] = dict(zip(s.tolist(), n.tolist()))
    out["composition"] = comp
    for fixed in args.also_k:
        r2, _, _ = timed_cluster(X, argparse.Namespace(**{**vars(args), "k": fixed, "nmf_errors": False}), trace=False)
        out[f"k={fixed}"] = {"purity": round(cluster_purity(r2.labels, sources), 4),
                             "ari": round(adjusted_rand_score(sources, r2.labels), 4)}
    return report("mixed", len(pool), res, wall, heap, out)


def case_alpaca(args) -> dict:
    from paser.io.records import load_records

    recs, _ = load_records(args.alpaca, skip_invalid=True)
    if args.limit:
        recs = recs[: args.limit]
    X, t_embed = embed_cached(recs, args)
    res, wall, heap = timed_cluster(X, args)
    return report("alpaca", len(recs), res, wall, heap, {"embed_s": round(t_embed, 2)})


def synthetic_blobs(n: int, n_blobs: int, dim: int = 384, spread: float = 1.2, seed: int = 0):
    """Unit vectors around `n_blobs` random centres with unequal weights (float32, chunked)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = rng.uniform(0.5, 2.0, n_blobs)
    y = rng.choice(n_blobs, size=n, p=w / w.sum())
    X = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        X[s:e] = centres[y[s:e]] + noise
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y


def case_synthetic(args) -> dict:
    from sklearn.metrics import adjusted_rand_score

    t0 = time.perf_counter()
    X, y = synthetic_blobs(args.synthetic_n, args.blobs, seed=args.seed)
    t_gen = time.perf_counter() - t0
    # tracemalloc slows nothing measurable here, but its bookkeeping costs memory at 1M: off.
    res, wall, heap = timed_cluster(X, args, trace=args.synthetic_n <= 200_000)
    return report("synthetic", len(X), res, wall, heap,
                  {"gen_s": round(t_gen, 2), "blobs": args.blobs, "ari_vs_blobs": round(adjusted_rand_score(y, res.labels), 4)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["mixed", "alpaca", "synthetic"])
    p.add_argument("--alpaca", default=str(DATA / "alpaca_cleaned_50921.jsonl.gz"))
    p.add_argument("--gsm8k", default=str(DATA / "gsm8k_train_7473.jsonl"))
    p.add_argument("--code", default=str(DATA / "code_alpaca_2k.json"))
    p.add_argument("--mixed-alpaca", type=int, default=600)
    p.add_argument("--mixed-gsm8k", type=int, default=200)
    p.add_argument("--mixed-code", type=int, default=200)
    p.add_argument("--also-k", type=int, nargs="*", default=[], help="mixed: also score these fixed K")
    p.add_argument("--limit", type=int, default=0, help="alpaca: first N records only (0 = all)")
    p.add_argument("--synthetic-n", type=int, default=1_000_000)
    p.add_argument("--blobs", type=int, default=12)
    p.add_argument("--cache-dir", default=None, help="embedding cache (default $PASER_CACHE/embeddings)")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--k-min", type=int, default=None)
    p.add_argument("--k-max", type=int, default=None)
    p.add_argument("--n-neighbors", type=int, default=15)
    p.add_argument("--n-components", type=int, default=32)
    p.add_argument("--nmf-errors", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="cap BLAS and faiss threads (default: library defaults)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from paser.select.cluster import K_MAX_DEFAULT, K_MIN_DEFAULT

    args.k_min = args.k_min or K_MIN_DEFAULT
    args.k_max = args.k_max or K_MAX_DEFAULT
    run = {"mixed": case_mixed, "alpaca": case_alpaca, "synthetic": case_synthetic}[args.case]
    if args.threads:
        import faiss
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(args.threads)
        with threadpool_limits(args.threads):
            run(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
