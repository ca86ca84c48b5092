"""Stream a LaMini-sized pool (2.6M records) through loading, validation and deduplication.

Writes a synthetic pool first (real instruction records of the embedded pool, each made unique
by a numbered variant suffix, plus a share of exact duplicates), then ingests it with
`paser.io.stream.ingest_pool` in a child process and prints the child's time and peak RSS next
to the size of the data, so "bounded memory" is a measured claim.

    .venv/bin/python benchmarks/streaming.py [--n 2600000] [--dup 0.03] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_pool(path: Path, n: int, dup: float, seed: int = 0) -> tuple[int, int]:
    from paser.data import pool_path

    with gzip.open(pool_path(), "rt", encoding="utf-8") as f:
        base = [json.loads(line) for line in f]
    rng = random.Random(seed)
    written = dups = 0
    last: list[str] = []
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as out:
        while written < n:
            if last and rng.random() < dup:
                line = rng.choice(last)
                dups += 1
            else:
                r = dict(base[written % len(base)])
                r["instruction"] = f"{r['instruction']} (variant {written})"
                line = json.dumps(r, ensure_ascii=False) + "\n"
                last.append(line)
                if len(last) > 1000:
                    last.pop(0)
            out.write(line)
            written += 1
    return written, dups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_600_000)
    ap.add_argument("--dup", type=float, default=0.03, help="share of exact duplicates")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # the measured part, in its own process
        from paser.io.stream import ingest_pool

        t = time.time()
        rep = ingest_pool([args.child], args.child.parent / "store", show_progress=False)
        print(json.dumps({**rep.to_dict(), "seconds": time.time() - t}))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="paser-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    pool = work / "pool.jsonl.gz"
    t = time.time()
    n, dups = write_pool(pool, args.n, args.dup)
    print(f"wrote {n:,} records ({dups:,} duplicates), {pool.stat().st_size / 2**20:.0f} MiB gzipped, in {time.time() - t:.0f} s")
    raw_bytes = 0
    with gzip.open(pool, "rb") as f:
        while chunk := f.read(1 << 24):
            raw_bytes += len(chunk)
    p = subprocess.run([sys.executable, __file__, "--child", str(pool)], capture_output=True, text=True)
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(p.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"ingested {res['records']:,} unique records, dropped {res['duplicates']:,} duplicates, {res['shards']} parquet shards")
    print(f"time: {res['seconds']:.0f} s ({res['records'] / res['seconds']:,.0f} records/s)")
    print(f"peak RSS of the ingesting process: {peak / 2**20:.0f} MiB; the pool's text is {raw_bytes / 2**20:.0f} MiB uncompressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
