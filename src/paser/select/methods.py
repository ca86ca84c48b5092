"""The selection methods, each one registered entry (see `paser.select.registry`).

A method gets a `Context` that the driver (`paser.select.run`) filled with what the entry
declared it needs (models, embeddings, clusters), and returns the selected indices and, where
it decides more than in/out, a decision per record. It writes its per-record columns into
``ctx.table`` (scores.parquet) and its summary into ``ctx.report`` (report.json).

Budgets: ``ctx.budget`` is in the budget's unit. ``ctx.cost`` is None for a record budget
and each record's response tokens for a token budget, so every method fills the same token
budget the same way: never over, short by less than one record.

The methods import their machinery (the scoring engine, NTM, the baselines) inside the
function: the registry is read by `paser.config` for the CLI's choices and help, which should
not load torch and every method's code, and the engine's functions are looked up when a
method runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from paser.io.records import Record
from paser.select.registry import register_method


@dataclass
class Context:
    args: Any  # SelectArgs
    records: list[Record]
    budget: int  # in the budget's unit (records, or tokens)
    cost: np.ndarray | None  # per-record cost of a token budget; None for a record budget
    cache: Path
    clusters: Any = None  # paser.select.cluster.Clusters
    embeddings: np.ndarray | None = None
    original: Any = None  # LoadedModel
    pruned: Any = None
    table: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def score_kw(self) -> dict:
        a = self.args
        return dict(template=a.template, cutoff=a.cutoff, cache_dir=self.cache, max_batch_tokens=a.max_batch_tokens)

    def unit_sizes(self, labels: np.ndarray, k: int) -> np.ndarray:
        """Cluster sizes in the budget's unit: records, or the tokens they hold."""
        if self.cost is None:
            return np.bincount(labels, minlength=k)
        return np.bincount(labels, weights=self.cost, minlength=k).astype(np.int64)


# ----------------------------------------------------------------------------- PASER


def _score_paser(args, records, models, cache, rank=0, world_size=1):
    from paser.score.engine import score_degradation

    kw = dict(template=args.template, cutoff=args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens)
    return score_degradation(models["original"], models["pruned"], records, rank=rank, world_size=world_size, **kw)


@register_method(
    "paser",
    "PASER: S2RIC clusters, budget by capability degradation (--allocation), order by --ranking, NTM gate",
    needs_pruned=True, needs_original=True, needs_embeddings=True, needs_clusters=True,
    scoring_passes=1, shares_scoring=True, score_share=_score_paser,
)
def run_paser(ctx: Context):
    from paser.select.budget import allocate_budget, select_with_budget
    from paser.select.concepts import DEFAULT_THRESHOLD, NTMGate, extract_concepts
    from paser.select.efficiency import cluster_degradation
    from paser.select.registry import ALLOCATION_RULES, RANKINGS, get

    args, records, table, report, timings = ctx.args, ctx.records, ctx.table, ctx.report, ctx.timings
    allocation = get(ALLOCATION_RULES, args.allocation, "allocation rule")
    ranking = get(RANKINGS, args.ranking, "ranking")
    labels, k = ctx.clusters.labels, ctx.clusters.k
    sizes = ctx.unit_sizes(labels, k)
    threshold = args.ntm_threshold if args.ntm_threshold is not None else DEFAULT_THRESHOLD
    concepts = None
    if args.ntm:
        concepts = extract_concepts(records, max_phrases=args.ntm_max_phrases, multiword_only=args.ntm_multiword_only, progress=False)
    if args.scoring == "adaptive":
        scores, outcome, gate, ad = _adaptive_paser(ctx, sizes, allocation, concepts, threshold)
        report["adaptive"] = ad.to_dict()
        jsd = ad.jsd
        cds, n_k = ad.cds, ad.n_k
        priority = ad.priority(_adaptive_rank(args.ranking, scores.n_prompt, scores.n_response))
    else:
        t = time.time()
        scores = _score_paser(args, records, {"original": ctx.original, "pruned": ctx.pruned}, ctx.cache)
        timings["score"] = time.time() - t
        jsd = np.asarray(scores.jsd, dtype=np.float64)

        t = time.time()
        cds = cluster_degradation(jsd, labels, k)
        weights = allocation.fn(cds, sizes, args.tau)
        n_k = allocate_budget(weights, sizes, ctx.budget)
        priority = ranking.fn(jsd, scores.n_prompt, scores.n_response)
        timings["budget"] = time.time() - t

        t = time.time()
        gate = NTMGate(concepts, threshold=threshold) if args.ntm else None
        # Clusters are filled in decreasing order of their allocation weight (CDS for Eq. 6),
        # and shortfalls pass on by the same weights.
        outcome = select_with_budget(labels, priority, n_k, gate, cds=weights, priority=priority, cost=ctx.cost)
        timings["ntm_select"] = time.time() - t
    report["scoring"] = scores.stats.__dict__ if hasattr(scores.stats, "__dict__") else {}
    n_prompt, n_resp = np.asarray(scores.n_prompt), np.asarray(scores.n_response)

    from paser.select.efficiency import individual_efficiency

    scored = np.isfinite(jsd)
    ies = np.full(len(jsd), np.nan)
    ies[scored] = individual_efficiency(jsd[scored], n_prompt[scored], n_resp[scored])
    table.update(jsd=jsd, n_prompt=n_prompt, n_response=n_resp, cost=(n_prompt + n_resp).astype(np.float64) ** 2, ies=ies)
    if args.ranking != "ies":
        table["priority"] = priority
    table["nll_pruned"] = np.asarray(scores.nll_pruned)
    table["nll_original"] = np.asarray(scores.nll_original)
    if concepts is not None:
        table["concepts"] = [list(c) for c in concepts]
    report["clusters"].update(
        cds=cds.tolist(),
        n_k=n_k.tolist(),
        n_k_final=outcome.quota_final.tolist(),
        selected=outcome.n_selected.tolist(),
        rejected=outcome.n_rejected.tolist(),
        fill_order=outcome.cluster_order,
    )
    report["paser"] = {"allocation": args.allocation, "tau": args.tau, "ranking": args.ranking,
                       "budget_unit": "tokens" if ctx.cost is not None else "records"}
    report["jsd"] = {"mean": float(np.nanmean(jsd)), "min": float(np.nanmin(jsd)), "max": float(np.nanmax(jsd)),
                     "scored": int(np.isfinite(jsd).sum())}
    report["ntm"] = {
        "enabled": gate is not None,
        "threshold": threshold,
        "max_phrases": args.ntm_max_phrases,
        "multiword_only": args.ntm_multiword_only,
        "checked": gate.n_checked if gate else 0,
        "rejected": gate.n_rejected if gate else 0,
        "overrides": outcome.n_ntm_override,
        "examples": [
            {"id": records[i].id, "instruction": records[i].instruction[:120], "conflicting_pairs": pairs[:5]}
            for i, pairs in list((gate.examples if gate else {}).items())[:10]
        ],
    }
    report["decisions"] = outcome.counts()
    return np.array(outcome.selected, dtype=np.int64), outcome.decisions


# ----------------------------------------------------------------------------- no model


@register_method("random", "a seeded random sample (records until the token budget is full)")
def run_random(ctx: Context):
    from paser.select.baselines import random_selection

    return random_selection(len(ctx.records), ctx.budget, ctx.args.seed, ctx.cost), None


@register_method("uniform", "the S2RIC clusters, an equal share each, random within (PASER without CDAIS)", needs_embeddings=True, needs_clusters=True)
def run_uniform(ctx: Context):
    from paser.select.baselines import uniform_selection

    selected, n_k = uniform_selection(ctx.clusters.labels, ctx.budget, ctx.args.seed, ctx.cost)
    ctx.report["clusters"]["n_k"] = n_k.tolist()
    return selected, None


def _adaptive_rank(ranking: str, n_prompt, n_response):
    """The ranking in force, in the form adaptive scoring takes: (jsd of idx, idx) -> priority."""
    from paser.select.adaptive import ies_rank, jsd_rank

    n_response = np.asarray(n_response, dtype=np.float64)
    return {"ies": ies_rank(np.asarray(n_prompt), np.asarray(n_response)), "jsd": jsd_rank,
            "jsd-sum": lambda jsd, idx: np.asarray(jsd, dtype=np.float64) * n_response[idx]}[ranking]


def _adaptive_paser(ctx: Context, sizes, allocation, concepts, threshold):
    """PASER with adaptive scoring (`--scoring adaptive`, `paser.select.adaptive`): a stratified
    sample per cluster gives CDS with confidence intervals, and a kNN predictor over the S2RIC
    embeddings orders the rest, scored until each cluster's top n_k is found at `--confidence`.
    Quotas, fill order and shortfalls follow `--allocation`/`--tau` as exhaustive's do, and a
    token budget is filled by the same first-fit rule (`select_with_budget(cost=...)`).
    Every score comes from the engine, so caching, resume and determinism are the engine's.
    Returns (scores of the scored records, SelectionOutcome, the last gate, AdaptiveResult)."""
    from paser.score.engine import encode_records, score_degradation
    from paser.select.adaptive import adaptive_select, text_statistics
    from paser.select.budget import allocate_budget
    from paser.select.concepts import NTMGate

    args, records = ctx.args, ctx.records
    t = time.time()
    enc = {it.id: it for it in encode_records(records, ctx.pruned.tokenizer, args.template, args.cutoff)}
    n_prompt = np.array([enc[r.id].n_prompt for r in records], dtype=np.int64)
    n_resp = np.array([enc[r.id].n_response for r in records], dtype=np.int64)
    kw = {**ctx.score_kw(), "progress": False}
    last: dict = {}

    def score_fn(idx):
        last["scores"] = score_degradation(ctx.original, ctx.pruned, [records[i] for i in idx], **kw)
        return np.asarray(last["scores"].jsd, dtype=np.float64)

    gates: list = []

    def make_gate():
        gates.append(NTMGate(concepts, threshold=threshold))
        return gates[-1]

    ad, outcome = adaptive_select(
        score_fn, ctx.clusters.labels, lambda c: allocate_budget(allocation.fn(c, sizes, args.tau), sizes, ctx.budget),
        ctx.embeddings, rank_fn=_adaptive_rank(args.ranking, n_prompt, n_resp), make_gate=make_gate if concepts is not None else None,
        fill_weights=lambda c: allocation.fn(c, sizes, args.tau), cost=ctx.cost,
        n_prompt=n_prompt, n_response=n_resp, confidence=args.confidence, seed=args.seed,
        extra_features=text_statistics([r.instruction + "\n" + r.input for r in records], [r.output for r in records]),
    )
    ctx.timings["score"] = time.time() - t
    # the per-record byproducts (both models' NLL) of every scored record, from the cache
    scored = np.flatnonzero(ad.scored)
    full = score_degradation(ctx.original, ctx.pruned, [records[i] for i in scored], **kw)
    out = SimpleNamespace(n_prompt=n_prompt, n_response=n_resp, stats=full.stats,
                          nll_pruned=np.full(len(records), np.nan), nll_original=np.full(len(records), np.nan))
    out.nll_pruned[scored], out.nll_original[scored] = full.nll_pruned, full.nll_original
    return out, outcome, (gates[-1] if gates else None), ad


# ----------------------------------------------------------------------------- loss-based baselines


def _score_losses(args, records, models, cache, rank=0, world_size=1, unconditioned=True):
    from paser.score.engine import score_loss

    kw = dict(template=args.template, cutoff=args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens, rank=rank, world_size=world_size)
    cond = score_loss(models["pruned"], records, condition_on_prompt=True, **kw)
    uncond = score_loss(models["pruned"], records, condition_on_prompt=False, **kw) if unconditioned else None
    return cond, uncond


@register_method(
    "ifd", "Cherry LLM's loss(y|x)/loss(y) on the pruned model, highest below 1 first",
    needs_pruned=True, scoring_passes=2, shares_scoring=True, score_share=_score_losses,
)
def run_ifd(ctx: Context):
    from paser.select.baselines import ifd_scores, ifd_selection

    t = time.time()
    cond, uncond = _score_losses(ctx.args, ctx.records, {"pruned": ctx.pruned}, ctx.cache)
    ctx.timings["score"] = time.time() - t
    c, u = np.asarray(cond.nll, dtype=np.float64), np.asarray(uncond.nll, dtype=np.float64)
    ifd = ifd_scores(c, u)
    ctx.table.update(loss_conditioned=c, loss_unconditioned=u, ifd=ifd)
    ctx.report["ifd"] = {"mean": float(ifd.mean()), "share_below_1": float((ifd < 1).mean())}
    return ifd_selection(ifd, ctx.budget, ctx.cost), None


@register_method(
    "instruction_mining", "a linear quality rule over kNN distance, perplexity, diversity and length (weights in baselines.py)",
    needs_pruned=True, needs_embeddings=True, scoring_passes=1, shares_scoring=True,
    score_share=lambda *a, **kw: _score_losses(*a, **kw, unconditioned=False),
)
def run_instruction_mining(ctx: Context):
    from paser.select.baselines import INSTRUCTION_MINING_WEIGHTS, instruction_mining_scores, knn_distance, lexical_diversity, top_b

    t = time.time()
    cond, _ = _score_losses(ctx.args, ctx.records, {"pruned": ctx.pruned}, ctx.cache, unconditioned=False)
    ctx.timings["score"] = time.time() - t
    ind = {
        "knn6_distance": knn_distance(ctx.embeddings, 6),
        "log_perplexity": np.asarray(cond.nll, dtype=np.float64),
        "lexical_diversity": np.array([lexical_diversity(r.output) for r in ctx.records]),
        "response_length": np.asarray(cond.n_response, dtype=np.float64),
    }
    q = instruction_mining_scores(ind)
    ctx.table.update({f"im_{k}": v for k, v in ind.items()}, im_quality=q)
    ctx.report["instruction_mining"] = {"weights": INSTRUCTION_MINING_WEIGHTS, "indicators": "z-scored"}
    return top_b(q, ctx.budget, ctx.cost), None


@register_method(
    "nuggets", "one-shot golden scores on a k-means anchor set (costs N × 8 forward passes, reported)",
    needs_pruned=True, needs_embeddings=True, scoring_passes=9,
)
def run_nuggets(ctx: Context, n_anchors: int = 8):
    """One-shot golden scores against a k-means anchor set (cost: N × anchors forward passes)."""
    from paser.io.templates import render_prompt
    from paser.score.engine import score_loss
    from paser.select.baselines import golden_scores, nuggets_anchor_indices, top_b

    args, records = ctx.args, ctx.records
    t = time.time()
    anchors = nuggets_anchor_indices(ctx.embeddings, n_anchors, args.seed)
    kw = dict(template="raw", cutoff=2 * args.cutoff, cache_dir=ctx.cache, max_batch_tokens=args.max_batch_tokens)
    zero = [Record(render_prompt(records[a], args.template), "", records[a].output) for a in anchors]
    zero_nll = np.asarray(score_loss(ctx.pruned, zero, **kw).nll, dtype=np.float64)
    pairs = []
    for r in records:
        demo = render_prompt(r, args.template) + r.output + "\n\n"
        pairs.extend(Record(demo + render_prompt(records[a], args.template), "", records[a].output) for a in anchors)
    scored = score_loss(ctx.pruned, pairs, **kw)
    one = np.asarray(scored.nll, dtype=np.float64).reshape(len(records), len(anchors))
    gs = golden_scores(zero_nll, one)
    ctx.timings["score"] = time.time() - t
    ctx.table["golden_score"] = gs
    ctx.report["nuggets"] = {
        "anchors": [records[a].id for a in anchors],
        "forward_sequences": len(pairs) + len(zero),
        "tokens": int(scored.stats.tokens) if hasattr(scored, "stats") else None,
        "seconds": ctx.timings["score"],
    }
    return top_b(gs, ctx.budget, ctx.cost), None


# ----------------------------------------------------------------------------- full data


@register_method("full", "every record (the full-data baseline; ignores the budget)")
def run_full(ctx: Context):
    return np.arange(len(ctx.records)), None
