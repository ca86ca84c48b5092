"""`paser select`: the driver that owns files, models and caches, and runs one selection method.

PASER's stages in the paper's order: S2RIC (embed -> manifold -> clusters), CDAIS (JSD per
sample -> CDS per cluster -> budget per cluster -> IES order), NTM (concept consistency gate).
The baselines reuse the same artifacts where they need them. Everything expensive is cached
(embeddings, scores), so re-running with another method or budget is cheap.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paser.config import SelectArgs
from paser.errors import PaserError
from paser.io.cache import atomic_write_json, default_cache_dir, write_parquet_atomic
from paser.io.records import Record, load_pool, write_selected

log = logging.getLogger(__name__)

NEEDS_CLUSTERS = {"paser", "uniform"}
NEEDS_EMBEDDINGS = {"paser", "uniform", "instruction_mining", "nuggets"}
NEEDS_PRUNED = {"paser", "ifd", "instruction_mining", "nuggets"}


@dataclass
class SelectionResult:
    method: str
    budget: int
    pool_size: int
    selected_ids: list[str]
    out_dir: Path
    report: dict = field(default_factory=dict)

    def summary(self) -> str:
        if "rank" in self.report:
            return f"rank {self.report['rank']}: scored its share into the cache; the main process writes the selection"
        lines = [f"{self.method}: selected {len(self.selected_ids)} of {self.pool_size} records -> {self.out_dir / 'selected.jsonl'}"]
        k = self.report.get("clusters", {}).get("k")
        if k:
            lines.append(f"clusters: K={k} ({self.report['clusters']['criterion']})")
        ntm = self.report.get("ntm")
        if ntm and ntm.get("enabled"):
            lines.append(f"NTM: {ntm['rejected']} rejected, {ntm['overrides']} taken to meet the budget")
        return "\n".join(lines)


def pool_seed(args: SelectArgs) -> int:
    """The seed of the --limit subset: --limit-seed when given, else --seed."""
    return args.seed if args.limit_seed is None else args.limit_seed


def load_selection_pool(args: SelectArgs) -> tuple[list[Record], list[dict]]:
    """The pool: the user's files (or the embedded pool), optionally a seeded subset of N."""
    from paser.data import pool_path

    paths = args.data or [str(pool_path())]
    records, reports = load_pool(paths, skip_invalid=args.skip_invalid)
    if args.limit is not None and args.limit < len(records):
        rng = np.random.default_rng(pool_seed(args))
        keep = np.sort(rng.choice(len(records), size=args.limit, replace=False))
        records = [records[i] for i in keep]
    return records, [{"path": r.path, "kept": r.kept, "skipped": dict(r.skipped)} for r in reports]


def _distributed_state():
    """accelerate's process state when launched with several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # cpu=True selects gloo: without it accelerate ignores WORLD_SIZE on a machine with no GPU.
    return PartialState(cpu=not torch.cuda.is_available())


def _score_share(args: SelectArgs, records: list[Record], cache: Path, rank: int, world_size: int) -> dict:
    """Every rank scores its share of the pool into the shared cache (the expensive part).

    The main process then reads the complete table from the cache and runs clustering and
    selection once, so the result is the same as a single process's.
    """
    from paser.score.engine import score_degradation, score_loss

    original, pruned = _load_models(args, need_original=args.method == "paser")
    kw = dict(template=args.template, cutoff=args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens, rank=rank, world_size=world_size)
    if args.method == "paser":
        score_degradation(original, pruned, records, **kw)
    elif args.method in ("ifd", "instruction_mining"):
        score_loss(pruned, records, condition_on_prompt=True, **kw)
        if args.method == "ifd":
            score_loss(pruned, records, condition_on_prompt=False, **kw)
    return {"original": original, "pruned": pruned}


def _cache_dir(args: SelectArgs) -> Path:
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _load_models(args: SelectArgs, need_original: bool):
    from paser.io.models import check_same_tokenizer, load_model

    pruned = load_model(args.pruned, allow_pickle=args.allow_pickle)
    original = None
    if need_original:
        original = load_model(args.original, allow_pickle=args.allow_pickle)
        check_same_tokenizer(original.tokenizer, pruned.tokenizer)
        if original.fingerprint == pruned.fingerprint:
            log.warning("the original and pruned models are identical: every JSD will be 0")
    return original, pruned


def run_selection(args: SelectArgs) -> SelectionResult:
    if args.method in NEEDS_PRUNED and not args.pruned:
        raise PaserError(f"--method {args.method} needs --pruned MODEL (make one with `paser prune`)")
    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = _cache_dir(args)

    t = time.time()
    records, load_reports = load_selection_pool(args)
    n = len(records)
    from paser.select.budget import resolve_budget

    budget = resolve_budget(args.budget, n)
    timings["load"] = time.time() - t
    log.info("pool: %d records, budget %d, method %s", n, budget, args.method)

    state = _distributed_state()
    models: dict = {}
    if state is not None and args.method in ("paser", "ifd", "instruction_mining"):
        t = time.time()
        models = _score_share(args, records, cache, state.process_index, state.num_processes)
        timings["score_share"] = time.time() - t
        state.wait_for_everyone()
        if not state.is_main_process:
            return SelectionResult(args.method, budget, n, [], out, {"rank": state.process_index, "timings_s": timings})
    elif state is not None and not state.is_main_process:
        state.wait_for_everyone()  # nothing to share for this method: the main process does it all
        return SelectionResult(args.method, budget, n, [], out, {"rank": state.process_index})

    table: dict[str, object] = {
        "id": [r.id for r in records],
        "source": [r.source for r in records],
    }
    report: dict = {
        "method": args.method,
        "budget": budget,
        "budget_arg": args.budget,
        "pool_size": n,
        "seed": args.seed,
        "limit": args.limit,
        "limit_seed": pool_seed(args),  # which pool subset
        "data": load_reports,
        "template": args.template,
        "cutoff": args.cutoff,
    }

    if args.method in NEEDS_PRUNED and not models:
        t = time.time()
        original, pruned = _load_models(args, need_original=args.method == "paser")
        models = {"original": original, "pruned": pruned}
        timings["load_models"] = time.time() - t
        if args.estimate:  # before anything expensive runs
            from paser.select.estimate import estimate_selection

            t = time.time()
            est = estimate_selection(args, records=records, models=models)
            log.info("%s", est.summary())
            report["estimate"] = est.to_dict()
            timings["estimate"] = time.time() - t

    embeddings = None
    if args.method in NEEDS_EMBEDDINGS:
        from paser.select.embed import embed_records

        t = time.time()
        embeddings = embed_records(records, cache_dir=cache, encoder=args.encoder)
        timings["embed"] = time.time() - t

    clusters = None
    if args.method in NEEDS_CLUSTERS:
        from paser.select.cluster import semantic_clusters

        t = time.time()
        clusters = semantic_clusters(embeddings, k=args.k, k_min=args.k_min, k_max=args.k_max, seed=args.seed)
        timings["cluster"] = time.time() - t
        table["cluster"] = clusters.labels
        report["clusters"] = _cluster_report(clusters, records)

    decisions = None
    if args.method == "full":
        selected = np.arange(n)
    elif args.method == "random":
        from paser.select.baselines import random_selection

        selected = random_selection(n, budget, args.seed)
    elif args.method == "uniform":
        from paser.select.baselines import uniform_selection

        selected, n_k = uniform_selection(clusters.labels, budget, args.seed)
        report["clusters"]["n_k"] = n_k.tolist()
    else:
        original, pruned = models["original"], models["pruned"]
        report["models"] = {"pruned": {"spec": args.pruned, "fingerprint": pruned.fingerprint}}
        if original is not None:
            report["models"]["original"] = {"spec": args.original, "fingerprint": original.fingerprint}
        if args.method == "paser":
            selected, decisions = _run_paser(args, records, clusters, original, pruned, budget, cache, table, report, timings)
        elif args.method == "ifd":
            selected = _run_ifd(args, records, pruned, budget, cache, table, report, timings)
        elif args.method == "instruction_mining":
            selected = _run_instruction_mining(args, records, pruned, embeddings, budget, cache, table, report, timings)
        elif args.method == "nuggets":
            selected = _run_nuggets(args, records, pruned, embeddings, budget, cache, table, report, timings)
        else:  # pragma: no cover - argparse restricts the choices
            raise PaserError(f"unknown method {args.method!r}")

    if decisions is None:
        decisions = np.full(n, "over_budget", dtype=object)
        decisions[selected] = "selected"
    table["decision"] = decisions
    table["reason"] = [_reason(d, args.method) for d in decisions]

    chosen = [records[i] for i in sorted(int(i) for i in selected)]
    if len(chosen) != min(budget, n) and args.method != "full":
        raise PaserError(f"internal error: {len(chosen)} records selected for a budget of {budget}")
    write_selected(out / "selected.jsonl", chosen, args.selected_format, args.template)
    write_parquet_atomic(out / "scores.parquet", {k: (v if not isinstance(v, np.ndarray) else v) for k, v in table.items()})

    if args.plots and clusters is not None:
        from paser.report.plots import plot_budget_per_cluster, plot_cluster_map

        t = time.time()
        cds = np.asarray(report["clusters"].get("cds") or np.zeros(clusters.k))
        plot_cluster_map(clusters.coords, clusters.labels, cds, out / "cluster_map.png", title=f"S2RIC clusters ({args.method})")
        plot_budget_per_cluster(report["clusters"], out / "budget_per_cluster.png")
        timings["plots"] = time.time() - t

    from paser.io.provenance import environment

    timings["total"] = time.time() - t_start
    report.update(selected=len(chosen), timings_s=timings, environment=environment())
    atomic_write_json(out / "report.json", report)
    if state is not None and args.method not in ("paser", "ifd", "instruction_mining"):
        state.wait_for_everyone()
    return SelectionResult(args.method, budget, n, [r.id for r in chosen], out, report)


def _reason(decision: str, method: str) -> str:
    return {
        "selected": f"selected by {method}",
        "over_budget": "not selected: its cluster's budget was filled by samples with higher efficiency" if method == "paser" else "not selected: outside the budget",
        "ntm_conflict": "rejected by NTM: its concepts conflict with the concept consistency graph",
        "ntm_override": "selected although NTM rejected it: too few consistent samples to meet the budget",
    }.get(decision, decision)


def _cluster_report(clusters, records: list[Record]) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from paser.select.cluster import cluster_purity

    sources = [r.source for r in records]
    caps = [str(r.extra.get("capability", r.source)) for r in records]
    rep = {
        "k": clusters.k,
        "criterion": clusters.criterion,
        "criterion_values": {str(k): float(v) for k, v in clusters.criterion_values.items()},
        "nmf_errors": {str(k): float(v) for k, v in clusters.nmf_errors.items()},
        "sizes": clusters.sizes().tolist(),
        "timings_s": clusters.timings,
    }
    if len(set(sources)) > 1:
        rep["agreement_with_source"] = {
            "purity": float(cluster_purity(clusters.labels, sources)),
            "ari": float(adjusted_rand_score(sources, clusters.labels)),
        }
    if len(set(caps)) > 1 and caps != sources:
        rep["agreement_with_capability"] = {
            "purity": float(cluster_purity(clusters.labels, caps)),
            "ari": float(adjusted_rand_score(caps, clusters.labels)),
        }
    comp = []
    for c in range(clusters.k):
        idx = np.flatnonzero(clusters.labels == c)
        counts: dict[str, int] = {}
        for i in idx:
            counts[sources[i]] = counts.get(sources[i], 0) + 1
        comp.append(dict(sorted(counts.items(), key=lambda kv: -kv[1])[:5]))
    rep["top_sources"] = comp
    return rep


def _run_paser(args, records, clusters, original, pruned, budget, cache, table, report, timings):
    from paser.score.engine import score_degradation
    from paser.select.budget import allocate_budget, select_with_budget
    from paser.select.concepts import DEFAULT_THRESHOLD, NTMGate, extract_concepts
    from paser.select.efficiency import cluster_degradation, individual_efficiency

    t = time.time()
    scores = score_degradation(
        original, pruned, records, template=args.template, cutoff=args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens
    )
    timings["score"] = time.time() - t
    report["scoring"] = scores.stats.__dict__ if hasattr(scores.stats, "__dict__") else {}
    jsd = np.asarray(scores.jsd, dtype=np.float64)
    n_prompt, n_resp = np.asarray(scores.n_prompt), np.asarray(scores.n_response)

    t = time.time()
    labels, k = clusters.labels, clusters.k
    cds = cluster_degradation(jsd, labels, k)
    sizes = np.bincount(labels, minlength=k)
    n_k = allocate_budget(cds, sizes, budget)
    ies = individual_efficiency(jsd, n_prompt, n_resp)
    timings["budget"] = time.time() - t

    t = time.time()
    gate = None
    concepts = None
    threshold = args.ntm_threshold if args.ntm_threshold is not None else DEFAULT_THRESHOLD
    if args.ntm:
        concepts = extract_concepts(records, max_phrases=args.ntm_max_phrases, multiword_only=args.ntm_multiword_only, progress=False)
        gate = NTMGate(concepts, threshold=threshold)
    outcome = select_with_budget(labels, ies, n_k, gate, cds=cds, priority=ies)
    timings["ntm_select"] = time.time() - t

    table.update(jsd=jsd, n_prompt=n_prompt, n_response=n_resp, cost=(n_prompt + n_resp).astype(np.float64) ** 2, ies=ies)
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
    report["jsd"] = {"mean": float(jsd.mean()), "min": float(jsd.min()), "max": float(jsd.max())}
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
    selected = np.array(outcome.selected, dtype=np.int64)
    return selected, outcome.decisions


def _ifd_losses(args, records, pruned, cache):
    from paser.score.engine import score_loss

    kw = dict(template=args.template, cutoff=args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens)
    cond = score_loss(pruned, records, condition_on_prompt=True, **kw)
    uncond = score_loss(pruned, records, condition_on_prompt=False, **kw)
    return np.asarray(cond.nll, dtype=np.float64), np.asarray(uncond.nll, dtype=np.float64), cond


def _run_ifd(args, records, pruned, budget, cache, table, report, timings):
    from paser.select.baselines import ifd_scores, ifd_selection

    t = time.time()
    cond, uncond, _ = _ifd_losses(args, records, pruned, cache)
    timings["score"] = time.time() - t
    ifd = ifd_scores(cond, uncond)
    table.update(loss_conditioned=cond, loss_unconditioned=uncond, ifd=ifd)
    report["ifd"] = {"mean": float(ifd.mean()), "share_below_1": float((ifd < 1).mean())}
    return ifd_selection(ifd, budget)


def _run_instruction_mining(args, records, pruned, embeddings, budget, cache, table, report, timings):
    from paser.score.engine import score_loss
    from paser.select.baselines import INSTRUCTION_MINING_WEIGHTS, instruction_mining_scores, knn_distance, lexical_diversity, top_b

    t = time.time()
    cond = score_loss(pruned, records, template=args.template, cutoff=args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens)
    timings["score"] = time.time() - t
    ind = {
        "knn6_distance": knn_distance(embeddings, 6),
        "log_perplexity": np.asarray(cond.nll, dtype=np.float64),
        "lexical_diversity": np.array([lexical_diversity(r.output) for r in records]),
        "response_length": np.asarray(cond.n_response, dtype=np.float64),
    }
    q = instruction_mining_scores(ind)
    table.update({f"im_{k}": v for k, v in ind.items()}, im_quality=q)
    report["instruction_mining"] = {"weights": INSTRUCTION_MINING_WEIGHTS, "indicators": "z-scored"}
    return top_b(q, budget)


def _run_nuggets(args, records, pruned, embeddings, budget, cache, table, report, timings, n_anchors: int = 8):
    """One-shot golden scores against a k-means anchor set (cost: N × anchors forward passes)."""
    from paser.io.templates import render_prompt
    from paser.score.engine import score_loss
    from paser.select.baselines import golden_scores, nuggets_anchor_indices, top_b

    t = time.time()
    anchors = nuggets_anchor_indices(embeddings, n_anchors, args.seed)
    kw = dict(template="raw", cutoff=2 * args.cutoff, cache_dir=cache, max_batch_tokens=args.max_batch_tokens)
    zero = [Record(render_prompt(records[a], args.template), "", records[a].output) for a in anchors]
    zero_nll = np.asarray(score_loss(pruned, zero, **kw).nll, dtype=np.float64)
    pairs = []
    for r in records:
        demo = render_prompt(r, args.template) + r.output + "\n\n"
        pairs.extend(Record(demo + render_prompt(records[a], args.template), "", records[a].output) for a in anchors)
    scored = score_loss(pruned, pairs, **kw)
    one = np.asarray(scored.nll, dtype=np.float64).reshape(len(records), len(anchors))
    gs = golden_scores(zero_nll, one)
    timings["score"] = time.time() - t
    table["golden_score"] = gs
    report["nuggets"] = {
        "anchors": [records[a].id for a in anchors],
        "forward_sequences": len(pairs) + len(zero),
        "tokens": int(scored.stats.tokens) if hasattr(scored, "stats") else None,
        "seconds": timings["score"],
    }
    return top_b(gs, budget)
