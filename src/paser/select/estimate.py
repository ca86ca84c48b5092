"""`paser estimate`: what `paser select` will cost, predicted from a sample before anything expensive runs.

Tokens come from tokenising a seeded sample of the pool with the shared template; speed comes
from timing one real scoring batch (forward passes and the chunked JSD) and the sentence
encoder on this device; memory is the resident size after the models are loaded plus the
peak that one batch added. All of it extrapolates linearly to the pool (a cold cache).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from paser.config import SelectArgs

# Seconds per record for S2RIC's kNN graph + diffusion map + NMF, measured by
# benchmarks/clustering.py on this project's 2-core reference machine (50,921 records).
CLUSTER_SECONDS_PER_RECORD = 6e-4


def _rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@dataclass
class Estimate:
    method: str
    pool_size: int
    budget: int  # records, or response tokens when budget_unit is "tokens"
    sample_size: int
    tokens_per_record: float
    tokens: int  # prompt + response tokens through one model
    padded_tokens: int  # what the length-bucketed batches really compute
    forward_sequences: int  # sequences through any model
    tokens_per_second: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    device: str = "cpu"
    budget_unit: str = "records"
    adaptive: dict | None = None  # --scoring adaptive: the plan (paser.select.adaptive.plan_adaptive) and its tokens/time

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
        return (
            f"estimate for `paser select --method {self.method}` on {self.pool_size} records (budget {self._budget_text()}), "
            f"from a sample of {self.sample_size}:\n"
            f"  tokens: {self.tokens:,} ({self.tokens_per_record:.0f} per record; {self.padded_tokens:,} after batching)\n"
            f"  forward passes: {self.forward_sequences:,} sequences\n"
            f"  time on {self.device}: about {self.total_seconds / 60:.1f} min ({parts})\n"
            f"  peak memory: about {self.peak_memory_bytes / 2**30:.2f} GiB"
        ) + (self._adaptive_line() if self.adaptive else "")

    def _budget_text(self) -> str:
        return f"{self.budget:,} tokens" if self.budget_unit == "tokens" else str(self.budget)

    def _adaptive_line(self) -> str:
        a = self.adaptive
        return (f"\n  adaptive scoring at confidence {a['confidence']:g}: expected {a['expected_fraction']:.0%} of the records "
                f"({a['expected_tokens']:,} tokens, {a['expected_score_seconds'] / 60:.1f} min; the CDS sample alone "
                f"{a['sample_fraction']:.0%}), at most all of them ({a['upper_bound_tokens']:,} tokens, "
                f"{a['upper_bound_score_seconds'] / 60:.1f} min)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_seconds"] = self.total_seconds
        return d


def _time_batch(model, items, pad_id: int, device) -> tuple[float, torch.Tensor]:
    """Seconds for one forward over these items (right-padded), and the logits."""
    from paser.io.batching import right_pad

    ids, mask = right_pad([it.input_ids for it in items], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        model(input_ids=ids[:1, :8], attention_mask=mask[:1, :8])  # warm-up: kernels, allocator
        t = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, logits


def estimate_selection(args: SelectArgs, sample_size: int = 64, records: list | None = None, models: dict | None = None) -> Estimate:
    """Predict the cost of `paser select` with `args`. `records` and `models` ({"original",
    "pruned"}: LoadedModels) may be passed when the caller has them already (select does)."""
    from paser.io.models import load_model
    from paser.score.divergence import token_jsd
    from paser.score.engine import encode_records, plan_batches
    from paser.select.budget import parse_budget, resolve_budget
    from paser.select.registry import SELECTION_METHODS, get
    from paser.select.pool import load_selection_pool

    spec = get(SELECTION_METHODS, args.method, "selection method")

    t_load = time.time()
    if records is None:
        records, _ = load_selection_pool(args)
    n = len(records)
    budget = resolve_budget(args.budget, n)
    rng = np.random.default_rng(args.seed)
    sample = [records[i] for i in np.sort(rng.choice(n, size=min(sample_size, n), replace=False))]
    seconds: dict[str, float] = {}
    tps: dict[str, float] = {}
    device = "cpu"
    tokens = padded = 0
    per_record = 0.0
    sequences = 0
    adaptive = None

    if spec.needs_pruned:
        if models:
            scored = [m for m in (models.get("original"), models["pruned"]) if m is not None]
        else:
            scored = [load_model(args.pruned, allow_pickle=args.allow_pickle)]
            if spec.needs_original:
                scored.insert(0, load_model(args.original, allow_pickle=args.allow_pickle))
        seconds["load models"] = time.time() - t_load
        tok = scored[-1].tokenizer
        items = encode_records(sample, tok, args.template, args.cutoff)
        lengths = sorted(len(it.input_ids) for it in items)
        per_record = float(np.mean(lengths))
        batches = plan_batches(lengths, args.max_batch_tokens)
        pad_ratio = sum((e - s) * lengths[e - 1] for s, e in batches) / max(1, sum(lengths))
        tokens = int(per_record * n)
        padded = int(tokens * pad_ratio)
        passes = spec.scoring_passes  # per model scored; nuggets: 8 anchors + itself
        # the largest batch the real run will form, so the memory peak is representative
        s, e = max(batches, key=lambda b: (b[1] - b[0]) * lengths[b[1] - 1])
        by_len = sorted(items, key=lambda it: len(it.input_ids))[s:e]
        batch_tokens = sum(len(it.input_ids) for it in by_len)
        from paser.io.adapter import pad_id as pad_of

        pad_id = pad_of(tok)
        logits = []
        for lm in scored:
            dev = next(lm.model.parameters()).device
            device = str(dev)
            secs, lg = _time_batch(lm.model, by_len, pad_id, dev)
            tps[lm.name] = batch_tokens / secs
            logits.append(lg)
        score_s = sum(padded / v for v in tps.values()) * passes
        if spec.needs_original:  # the JSD between the two models
            resp = [len(it.input_ids) - it.n_prompt for it in by_len]
            flat_p = torch.cat([logits[0][r, it.n_prompt - 1 : len(it.input_ids) - 1] for r, it in enumerate(by_len)])
            flat_q = torch.cat([logits[1][r, it.n_prompt - 1 : len(it.input_ids) - 1] for r, it in enumerate(by_len)])
            t = time.perf_counter()
            token_jsd(flat_p, flat_q)
            jsd_per_token = (time.perf_counter() - t) / max(1, sum(resp))
            resp_share = sum(resp) / batch_tokens
            score_s += jsd_per_token * tokens * resp_share
            tps["jsd"] = 1.0 / max(jsd_per_token, 1e-9)
        seconds["score"] = score_s
        sequences = n * passes * len(scored)
        if args.method == "paser" and getattr(args, "scoring", "exhaustive") == "adaptive":
            adaptive = _adaptive_estimate(args, n, budget, items, by_len, logits, score_s, tokens)
            seconds["score"] = adaptive["expected_score_seconds"]
            sequences = adaptive["expected_records"] * passes * len(scored)
        del logits
    if spec.needs_embeddings:
        from paser.select.embed import count_uncached, embed_texts, record_text, resolve_encoder
        from paser.select.run import selection_cache_dir

        missing = count_uncached(records, selection_cache_dir(args), args.encoder)
        seconds["embed"] = 0.0  # every vector cached: the run loads no encoder, nor does this
        if missing:
            texts = [record_text(r) for r in sample[:32]]
            enc_dir, _ = resolve_encoder(args.encoder)  # time the encoder the run will use
            embed_texts(texts[:2], enc_dir, show_progress=False)  # load the encoder outside the timing
            t = time.perf_counter()
            embed_texts(texts, enc_dir, show_progress=False)
            rate = len(texts) / (time.perf_counter() - t)
            tps["embed records"] = rate
            seconds["embed"] = missing / rate
        seconds["cluster"] = n * CLUSTER_SECONDS_PER_RECORD
    peak = _rss_bytes() + (n * 384 * 4 * 6 if spec.needs_embeddings else 0)  # embeddings, kNN graph, diffusion coords
    return Estimate(
        method=args.method,
        pool_size=n,
        budget=budget,
        budget_unit="tokens" if parse_budget(args.budget).is_tokens else "records",
        sample_size=len(sample),
        tokens_per_record=per_record,
        tokens=tokens,
        padded_tokens=padded,
        forward_sequences=sequences,
        tokens_per_second=tps,
        seconds=seconds,
        peak_memory_bytes=peak,
        device=device,
        adaptive=adaptive,
    )


def _adaptive_estimate(args, n: int, budget: int, items, by_len, logits, score_s: float, tokens: int) -> dict:
    """`--scoring adaptive`: the plan from the timed batch's own JSD spread, in tokens and seconds.

    The coefficient of variation of per-record JSD comes from the records of the timed batch
    (both models already ran on them); with fewer than 8 it is the benchmark pool's. K is
    --k, or the middle of [--k-min, --k-max] (the clusters are chosen after embedding).
    Tokens and time scale the exhaustive estimate by the records' share (the search favours
    short records under IES, so this errs high for tokens).
    """
    from paser.score.divergence import token_jsd
    from paser.select.adaptive import DEFAULT_JSD_CV, plan_adaptive
    from paser.select.budget import parse_budget

    cv = DEFAULT_JSD_CV
    if len(by_len) >= 8 and len(logits) == 2:
        vals = []
        for r, it in enumerate(by_len):
            sl = slice(it.n_prompt - 1, len(it.input_ids) - 1)
            if sl.stop > sl.start:
                vals.append(float(token_jsd(logits[0][r, sl], logits[1][r, sl]).mean()))
        v = np.asarray(vals)
        if v.size >= 8 and v.mean() > 0:
            cv = float(v.std(ddof=1) / v.mean())
    resp = np.array([len(it.input_ids) - it.n_prompt for it in items], dtype=np.float64)
    if parse_budget(args.budget).is_tokens:
        frac = budget / max(1.0, float(resp.mean()) * n)
    else:
        frac = budget / max(n, 1)
    k = args.k if args.k else (args.k_min + args.k_max) // 2
    plan = plan_adaptive(n, k, min(frac, 1.0), args.confidence, cv=cv)
    share = plan.expected_fraction
    return {**plan.to_dict(), "expected_tokens": int(round(tokens * share)), "upper_bound_tokens": int(tokens),
            "expected_score_seconds": score_s * share, "upper_bound_score_seconds": score_s}
