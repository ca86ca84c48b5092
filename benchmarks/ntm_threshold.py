"""How many samples does NTM reject, per threshold and key-phrase setting? (docs/METHOD.md §3)

Streams a real mixed pool (the embedded 7,400-record pool) through the NTM gate and reports,
as acceptance grows to 400 / 1,000 / 2,000 samples, how many candidates were rejected in
total and the rejection rate among the candidates seen since the previous milestone.

Orders: "random" (a random permutation), and "grouped" (capability groups one after the
other, random within a group: the way CDAIS presents candidates, cluster by cluster).

    python benchmarks/ntm_threshold.py --n 4000 --examples 4

The defaults in ``paser.select.concepts`` were chosen from this script's output.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from paser.data import pool_path
from paser.io.records import load_records
from paser.select.concepts import ConceptConsistencyGraph, extract_concepts

THRESHOLDS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
MILESTONES = (400, 1000, 2000)
PHRASE_SETTINGS = {
    # The prototype's setting: top-10 RAKE phrases, code kept, scikit-learn stop words only.
    "reference": dict(max_phrases=10, multiword_only=False, strip_code=False, instruction_stop_words=False),
    "top10": dict(max_phrases=10, multiword_only=False),
    "top5": dict(max_phrases=5, multiword_only=False),
    "top3": dict(max_phrases=3, multiword_only=False),
    "multi10": dict(max_phrases=10, multiword_only=True),
    "multi5": dict(max_phrases=5, multiword_only=True),  # the default (paser.select.concepts)
}


def stream(concepts, order, threshold, milestones=MILESTONES):
    """Run the gate over ``order``; return milestone rows, rejected (index, pairs), and the mask."""
    g = ConceptConsistencyGraph()
    accepted = rejected = 0
    rows, last_seen, last_rej = [], 0, 0
    rejected_examples = []
    seen = 0
    ms = list(milestones)
    rejected_mask = np.zeros(len(concepts), dtype=bool)
    for i in order:
        seen += 1
        c = concepts[i]
        n_pairs, bad = g._known_pairs(c)
        if (len(bad) / n_pairs if n_pairs else 0.0) <= threshold:
            g.add(c)
            accepted += 1
            if ms and accepted == ms[0]:
                window = seen - last_seen
                rows.append((ms.pop(0), rejected, (rejected - last_rej) / window))
                last_seen, last_rej = seen, rejected
        else:
            rejected += 1
            rejected_mask[i] = True
            rejected_examples.append((i, bad, n_pairs))
    for m in ms:
        rows.append((m, None, None))  # pool ran out before this milestone
    return rows, rejected_examples, rejected_mask, accepted, rejected, g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="records drawn from the pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", default="random,grouped")
    ap.add_argument("--settings", default=",".join(PHRASE_SETTINGS))
    ap.add_argument("--examples", type=int, default=4, help="rejected examples printed per setting (tau=0 and default)")
    args = ap.parse_args()

    recs, _ = load_records(pool_path())
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(recs))[: args.n]
    recs = [recs[i] for i in pick]
    caps = np.array([r.extra.get("capability", r.source) for r in recs])
    print(f"pool: {len(recs)} records; capabilities {dict(Counter(caps.tolist()))}")

    orders = {}
    for name in args.orders.split(","):
        if name == "random":
            orders[name] = rng.permutation(len(recs))
        elif name == "grouped":
            o = []
            for cap in sorted(set(caps.tolist())):
                idx = np.flatnonzero(caps == cap)
                o.extend(rng.permutation(idx).tolist())
            orders[name] = np.array(o)
        else:
            raise SystemExit(f"unknown order {name}")

    for sname in args.settings.split(","):
        kw = PHRASE_SETTINGS[sname]
        t0 = time.perf_counter()
        concepts = extract_concepts(recs, progress=False, **kw)
        dt = time.perf_counter() - t0
        lens = np.array([len(c) for c in concepts])
        print(f"\n=== phrases {sname} {kw}: extracted in {dt:.2f} s; concepts/sample mean {lens.mean():.2f}, "
              f"zero for {np.mean(lens == 0):.1%}")
        for oname, order in orders.items():
            print(f"  order={oname}")
            print("    tau   | rejected by acc=400 / 1000 / 2000 | window rejection rate at 400 / 1000 / 2000 | "
                  "total rej / seen | rejected share by capability")
            for tau in THRESHOLDS:
                rows, rej_ex, mask, acc, rej, g = stream(concepts, order, tau)
                cum = " / ".join("-" if r[1] is None else f"{r[1]:5d}" for r in rows)
                win = " / ".join("-" if r[2] is None else f"{r[2]:5.1%}" for r in rows)
                by_cap = {cap: f"{mask[caps == cap].mean():.0%}" for cap in sorted(set(caps.tolist()))}
                print(f"    {tau:4.2f}  | {cum:>33s} | {win:>42s} | {rej:5d} / {acc + rej:5d} | {by_cap}"
                      f"  (G: {g.n_nodes} nodes, {g.n_edges} edges)")
                if oname == "random" and tau in (0.0, 0.5, 0.75) and args.examples:
                    print(f"      examples rejected at tau={tau} (share of known pairs non-adjacent):")
                    for i, bad, n_pairs in rej_ex[len(rej_ex) // 2 : len(rej_ex) // 2 + args.examples]:
                        r = recs[i]
                        print(f"        [{caps[i]}] {r.instruction[:90]!r}")
                        print(f"           {len(bad)}/{n_pairs} pairs, e.g. {bad[:4]}")


if __name__ == "__main__":
    main()
