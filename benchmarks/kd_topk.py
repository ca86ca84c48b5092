"""Choosing --kd-topk: how much of the teacher is kept, and how far the bucketed KL is from the full one.

    PASER_CACHE=/tmp/pcache python benchmarks/kd_topk.py --student /tmp/kd-wanda --n 40 --threads 1

Teacher: the dense embedded model (default smollm2-135m); student: a pruned copy (e.g. Wanda
50 %: `paser prune --model smollm2-135m --method wanda --sparsity 0.5 --out /tmp/kd-wanda`).
On `--n` records of the embedded pool (seeded sample; pool records, never the held-out test
records), with recovery's template and cutoff, on every response-token prediction, for each k:

  mass      the teacher's probability on its top-k (mean, and the 5th percentile over tokens)
  KL ratio  mean bucketed KL / mean full-vocabulary KL (1 = exact; the bucketed one is a lower bound)
  grad cos  cosine between the gradients (w.r.t. the student's logits, all tokens stacked) of
            the bucketed and of the full KL: whether training with it pushes the same way
  grad err  |g_bucketed - g_full| / |g_full| over the same stacked gradients
  MB/1k tok cache size per 1,000 response tokens (int32 index + float32 log-prob, + tail)

at temperature 1 and 2. The full KL is what KD would cost without a cache (the teacher in memory).
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", default="/tmp/kd-wanda")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--ks", default="8,32,64,128,256")
    ap.add_argument("--temperatures", default="1,2")
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from paser.data import pool_path
    from paser.io.models import load_model
    from paser.io.records import load_records
    from paser.recover import encode_records
    from paser.recover.distill import bucketed_kl, full_kl, teacher_topk

    t0 = time.perf_counter()
    pool, _ = load_records(pool_path())
    recs = random.Random(a.seed).sample(pool, a.n)
    teacher = load_model(a.teacher)
    ds = encode_records(recs, teacher.tokenizer, "alpaca", a.cutoff)

    def response_logits(model) -> torch.Tensor:
        rows = []
        with torch.inference_mode():
            for ex in ds.examples:
                p = sum(1 for t in ex["labels"] if t == -100)
                logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, p - 1 : -1]
                rows.append(logits.float())
        return torch.cat(rows)

    t_logits = response_logits(teacher.model)
    del teacher
    student = load_model(a.student)
    s_logits = response_logits(student.model)
    del student
    n_tok, vocab = t_logits.shape
    print(f"teacher {a.teacher}, student {a.student}: {len(ds)} records, {n_tok} response tokens, vocabulary {vocab}"
          f" (forwards {time.perf_counter() - t0:.0f} s)")  # fmt: skip

    ks = [int(k) for k in a.ks.split(",")]
    chunk = 256
    for T in (float(x) for x in a.temperatures.split(",")):
        full_vals, full_grads = [], []
        for i in range(0, n_tok, chunk):
            s = s_logits[i : i + chunk].clone().requires_grad_(True)
            kl = full_kl(t_logits[i : i + chunk], s, T)
            kl.sum().backward()
            full_vals.append(kl.detach())
            full_grads.append(s.grad)
        full_v = torch.cat(full_vals)
        full_g = torch.cat(full_grads)
        print(f"\nT = {T:g}: full-vocabulary KL(teacher || student) = {full_v.mean():.4f} nats/token")
        print(f"{'k':>5} {'mass mean':>10} {'mass p5':>8} {'KL ratio':>9} {'grad cos':>9} {'grad err':>9} {'MB/1k tok':>10}")
        for k in ks:
            vals, grads, mass = [], [], []
            for i in range(0, n_tok, chunk):
                idx, logp, tail = teacher_topk(t_logits[i : i + chunk], k, T)
                s = s_logits[i : i + chunk].clone().requires_grad_(True)
                kl = bucketed_kl(idx, logp, tail, s, T)
                kl.sum().backward()
                vals.append(kl.detach())
                grads.append(s.grad)
                mass.append(1 - tail)
            v, g, m = torch.cat(vals), torch.cat(grads), torch.cat(mass)
            g64, f64 = g.double().flatten(), full_g.double().flatten()  # float32 sums of 1e8 terms drift past 1
            cos = float(g64 @ f64 / (g64.norm() * f64.norm()))
            rel = float((g64 - f64).norm() / f64.norm())
            mb = 1000 * (k * 8 + 4) / 2**20
            print(f"{k:>5} {m.mean():>10.4f} {m.quantile(0.05):>8.4f} {v.mean() / full_v.mean():>9.4f} {cos:>9.5f} {rel:>9.4f} {mb:>10.2f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
