"""Scoring throughput: the engine against a per-sample loop and against this machine's GEMM bound.

On the real SmolLM2-135M (dense = original) and a pruned copy (the 50 % smallest-magnitude
weights of every Linear in the decoder layers zeroed, inline here), over N real Alpaca
records, prints:

  (a) the GEMM-bound rate: measured fp32 matmul FLOP/s ÷ (2 · parameters), as tokens/s for
      one model forward and for an (original, pruned) pair;
  (b) a batch-1 per-sample loop, each model run separately with full logits and a naive
      probability-space JSD (the reference code's way, but running each model once per
      sample where the reference runs it twice);
  (c) the engine with a cold cache (both models run), and with the original's hidden states
      already cached (what each further pruned variant costs);

and the ratios engine ÷ loop and engine ÷ GEMM bound. "tokens" are prompt + response
tokens of the scored samples in every line, so the rates compare like with like.

    PASER_CACHE=/tmp/pcache python benchmarks/scoring.py [--n 64] [--max-batch-tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from paser.io.models import LoadedModel, fingerprint_model, load_model
from paser.io.records import load_records
from paser.io.templates import encode_example
from paser.score import engine

# ../shared/data beside the checkout (the project's data folder).
DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_cleaned_50921.jsonl.gz")


def magnitude_prune_copy(model: torch.nn.Module, frac: float = 0.5) -> torch.nn.Module:
    """Zero the `frac` smallest-magnitude weights of each Linear inside the decoder layers."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    a = mod.weight.abs().flatten().numpy()
                    k = int(a.size * frac)
                    thr = np.partition(a, k - 1)[k - 1]  # O(n), much faster than a sort
                    mod.weight[mod.weight.abs() <= float(thr)] = 0.0
    return m


def gemm_flops(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best-of-`reps` fp32 matmul FLOP/s on large square matrices: (per wall s, per CPU s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return 2 * n**3 / best, 2 * n**3 / max(best_cpu, 1e-9)


def naive_jsd(lo: torch.Tensor, lp: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Probability-space JSD with an epsilon, over whatever rows it is given."""
    p, q = torch.softmax(lo.float(), -1), torch.softmax(lp.float(), -1)
    m = 0.5 * (p + q)
    return 0.5 * (p * ((p + eps) / (m + eps)).log()).sum(-1) + 0.5 * (q * ((q + eps) / (m + eps)).log()).sum(-1)


def per_sample_loop(orig, pruned, tok, records, template, cutoff) -> tuple[dict[str, float], float, float]:
    out: dict[str, float] = {}
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for r in records:
            enc = encode_example(r, tok, template=template, cutoff=cutoff)
            ids = torch.tensor([enc.input_ids])
            lo = orig(input_ids=ids).logits[0]
            lp = pruned(input_ids=ids).logits[0]
            j = naive_jsd(lo, lp)  # every position, as the reference does
            out[r.id] = float(j[enc.n_prompt - 1 : len(enc.input_ids) - 1].mean())
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="records to score (default 64)")
    ap.add_argument("--offset", type=int, default=0, help="first record of the file to use")
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--template", default="alpaca")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--skip-loop", action="store_true", help="skip the per-sample loop (b)")
    args = ap.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    lm = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    t = time.perf_counter()
    pm = magnitude_prune_copy(lm.model).eval()
    pruned = LoadedModel(pm, lm.tokenizer, "", fingerprint_model(pm), "magnitude-50")
    print(f"pruned copy made in {time.perf_counter() - t:.1f} s")
    records, _ = load_records(DATA)
    records = records[args.offset : args.offset + args.n]
    encs = [encode_example(r, lm.tokenizer, template=args.template, cutoff=args.cutoff) for r in records]
    n_tok = sum(len(e.input_ids) for e in encs)
    n_resp = sum(e.n_response for e in encs)
    print(f"{len(records)} records, {n_tok} tokens ({n_resp} response), mean length {n_tok / len(records):.0f}")

    n_params = sum(p.numel() for p in lm.model.parameters())
    threads = torch.get_num_threads()
    flops, flops_cpu = gemm_flops()
    # Two clocks: wall seconds, and process CPU seconds ÷ threads ("CPU-equivalent wall"),
    # which discounts time lost to other processes on a shared machine.
    bound = {"wall": flops / (2 * n_params), "cpu": flops_cpu * threads / (2 * n_params)}
    print(f"(a) GEMM: {flops / 1e9:.1f} GFLOP/s fp32 wall ({flops_cpu * threads / 1e9:.1f} CPU-equivalent); "
          f"{n_params / 1e6:.1f} M params → bound {bound['wall']:,.0f} tok/s per model forward, "
          f"{bound['wall'] / 2:,.0f} per pair (CPU-equivalent: {bound['cpu']:,.0f} / {bound['cpu'] / 2:,.0f})")

    def rates(seconds: float, cpu_seconds: float) -> dict[str, float]:
        return {"wall": n_tok / seconds, "cpu": n_tok / (cpu_seconds / threads)}

    loop_r = None
    if not args.skip_loop:
        loop, loop_s, loop_c = per_sample_loop(lm.model, pm, lm.tokenizer, records, args.template, args.cutoff)
        loop_r = rates(loop_s, loop_c)
        print(f"(b) per-sample loop, batch 1, naive JSD: {loop_s:.1f} s, {loop_r['wall']:,.0f} tok/s per pair "
              f"(CPU-equivalent {loop_r['cpu']:,.0f})")

    with tempfile.TemporaryDirectory() as cache:
        res = engine.score_degradation(
            lm, pruned, records, args.template, args.cutoff, cache, max_batch_tokens=args.max_batch_tokens, progress=True
        )
        cold = res.stats
        cold_r = rates(cold.seconds, cold.cpu_seconds)
        print(f"(c) engine, cold cache: {cold.seconds:.1f} s, {cold_r['wall']:,.0f} tok/s per pair "
              f"(CPU-equivalent {cold_r['cpu']:,.0f}), {cold.batches} batches, mean JSD {np.mean(res.jsd):.4f}")
        # Another pruned variant: new results key, same original → its hidden states come from the cache.
        variant = LoadedModel(pm, lm.tokenizer, "", pruned.fingerprint + "-variant", "variant")
        warm = engine.score_degradation(
            lm, variant, records, args.template, args.cutoff, cache, max_batch_tokens=args.max_batch_tokens, progress=True
        ).stats
        assert warm.original_forward_samples == 0
        warm_r = rates(warm.seconds, warm.cpu_seconds)
        hid_bytes = sum(f.stat().st_size for f in Path(cache).rglob("hid-*.npy"))
        print(f"    engine, original cached (a further variant): {warm.seconds:.1f} s, {warm_r['wall']:,.0f} tok/s "
              f"(CPU-equivalent {warm_r['cpu']:,.0f}); hidden cache {hid_bytes / 1e6:.1f} MB "
              f"({hid_bytes / max(n_resp, 1):,.0f} B per response token)")

    if loop_r is not None:
        diff = max(abs(loop[r.id] - float(j)) for r, j in zip(records, res.jsd))
        print(f"    max |JSD_loop − JSD_engine| = {diff:.2e} (naive eps-JSD vs log-space JSD)")
    for clock in ("wall", "cpu"):
        line = f"ratios ({clock:4s}): "
        if loop_r is not None:
            line += f"engine ÷ loop = {cold_r[clock] / loop_r[clock]:.2f}× (target ≥ 10×); "
        line += (f"engine ÷ pair bound = {100 * cold_r[clock] / (bound[clock] / 2):.0f} % (target ≥ 60 %); "
                 f"further variant ÷ one-model bound = {100 * warm_r[clock] / bound[clock]:.0f} %")
        print(line)
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)")


if __name__ == "__main__":
    main()
