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
from paser.io.models import check_same_tokenizer, load_model, load_tokenizer
from paser.io.provenance import environment
from paser.io.records import Record, write_selected
from paser.io.templates import encode_example
from paser.select.budget import parse_budget, resolve_budget
from paser.select.cluster import cluster_purity, semantic_clusters
from paser.select.embed import embed_records
from paser.select.estimate import estimate_selection
from paser.select.methods import Context
from paser.select.plots import plot_budget_per_cluster, plot_cluster_map
from paser.select.pool import load_selection_pool, pool_seed  # noqa: F401  (re-exported)
from paser.select.registry import SELECTION_METHODS, get

log = logging.getLogger(__name__)



@dataclass
class SelectionResult:
    method: str
    budget: int
    pool_size: int
    selected_ids: list[str]
    out_dir: Path
    report: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.summary()

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


def _distributed_state():
    """accelerate's process state when launched with several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # cpu=True selects gloo: without it accelerate ignores WORLD_SIZE on a machine with no GPU.
    return PartialState(cpu=not torch.cuda.is_available())


def selection_cache_dir(args: SelectArgs) -> Path:
    """The folder of the selection's caches (embeddings, scores): --cache-dir, else the user cache."""
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _load_models(args: SelectArgs, need_original: bool):
    pruned = load_model(args.pruned, allow_pickle=args.allow_pickle)
    original = None
    if need_original:
        original = load_model(args.original, allow_pickle=args.allow_pickle)
        check_same_tokenizer(original.tokenizer, pruned.tokenizer)
        if original.fingerprint == pruned.fingerprint:
            log.warning("the original and pruned models are identical: every JSD will be 0")
    return original, pruned


def _tokenizer(args: SelectArgs, models: dict):
    """The tokenizer that counts a token budget: the pruned model's (already loaded for the
    methods that score), else the original's, loaded without its weights."""
    for m in (models.get("pruned"), models.get("original")):
        if m is not None:
            return m.tokenizer

    return load_tokenizer(args.pruned or args.original)


def response_token_costs(records: list[Record], tokenizer, template: str, cutoff: int) -> np.ndarray:
    """Each record's response tokens exactly as `paser recover` trains them (the labels that are
    not masked: same template, cutoff and EOS as `paser.io.templates.encode_example`)."""
    return np.array([max(1, encode_example(r, tokenizer, template, cutoff).n_response) for r in records], dtype=np.int64)


def run_selection(args: SelectArgs) -> SelectionResult:
    spec = get(SELECTION_METHODS, args.method, "selection method")
    if spec.needs_pruned and not args.pruned:
        raise PaserError(f"--method {args.method} needs --pruned MODEL (make one with `paser prune`)")
    budget_spec = parse_budget(args.budget)  # a malformed budget fails before anything loads
    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = selection_cache_dir(args)

    t = time.time()
    records, load_reports = load_selection_pool(args)
    n = len(records)
    if not budget_spec.is_tokens:
        budget = resolve_budget(args.budget, n)
    timings["load"] = time.time() - t

    state = _distributed_state()
    models: dict = {}
    if state is not None and spec.shares_scoring:
        t = time.time()
        original, pruned = _load_models(args, need_original=spec.needs_original)
        models = {"original": original, "pruned": pruned}
        spec.score_share(args, records, models, cache, state.process_index, state.num_processes)
        timings["score_share"] = time.time() - t
        state.wait_for_everyone()
        if not state.is_main_process:
            return SelectionResult(args.method, 0, n, [], out, {"rank": state.process_index, "timings_s": timings})
    elif state is not None and not state.is_main_process:
        state.wait_for_everyone()  # nothing to share for this method: the main process does it all
        return SelectionResult(args.method, 0, n, [], out, {"rank": state.process_index})

    if spec.needs_pruned and not models:
        t = time.time()
        original, pruned = _load_models(args, need_original=spec.needs_original)
        models = {"original": original, "pruned": pruned}
        timings["load_models"] = time.time() - t

    # Token budgets: every record's cost is its response tokens as recovery will train them.
    # For a record budget the tokenizer only reports the selection's tokens, so it is taken
    # only where it costs nothing extra (a loaded model, or a pruned model's directory).
    tokenizer = _tokenizer(args, models) if (budget_spec.is_tokens or models or args.pruned) else None
    cost = None
    if budget_spec.is_tokens:
        t = time.time()
        cost = response_token_costs(records, tokenizer, args.template, args.cutoff)
        budget = resolve_budget(args.budget, n, pool_tokens=int(cost.sum()))
        timings["count_tokens"] = time.time() - t
    log.info("pool: %d records, budget %d %s, method %s", n, budget, budget_spec.unit, args.method)

    table: dict[str, object] = {
        "id": [r.id for r in records],
        "source": [r.source for r in records],
    }
    report: dict = {
        "method": args.method,
        "budget": budget,
        "budget_arg": args.budget,
        "budget_unit": budget_spec.unit,
        "pool_size": n,
        "seed": args.seed,
        "limit": args.limit,
        "limit_seed": pool_seed(args),  # which pool subset
        "data": load_reports,
        "template": args.template,
        "cutoff": args.cutoff,
    }
    if cost is not None:
        report["pool_tokens"] = int(cost.sum())

    if models and args.estimate and state is None:  # before anything expensive runs
        t = time.time()
        est = estimate_selection(args, records=records, models=models)
        log.info("%s", est.summary())
        report["estimate"] = est.to_dict()
        timings["estimate"] = time.time() - t

    ctx = Context(args, records, budget, cost, cache, table=table, report=report, timings=timings,
                  original=models.get("original"), pruned=models.get("pruned"))
    if spec.needs_embeddings:
        t = time.time()
        ctx.embeddings = embed_records(records, cache_dir=cache, encoder=args.encoder)
        timings["embed"] = time.time() - t

    if spec.needs_clusters:
        t = time.time()
        ctx.clusters = semantic_clusters(ctx.embeddings, k=args.k, k_min=args.k_min, k_max=args.k_max, seed=args.seed)
        timings["cluster"] = time.time() - t
        table["cluster"] = ctx.clusters.labels
        report["clusters"] = _cluster_report(ctx.clusters, records)

    if models.get("pruned") is not None:
        report["models"] = {"pruned": {"spec": args.pruned, "fingerprint": models["pruned"].fingerprint}}
        if models.get("original") is not None:
            report["models"]["original"] = {"spec": args.original, "fingerprint": models["original"].fingerprint}
    selected, decisions = spec.run(ctx)
    clusters = ctx.clusters

    if decisions is None:
        decisions = np.full(n, "over_budget", dtype=object)
        decisions[selected] = "selected"
    table["decision"] = decisions
    table["reason"] = [_reason(d, args.method) for d in decisions]

    order = sorted(int(i) for i in selected)
    chosen = [records[i] for i in order]
    if args.method != "full":
        if cost is None and len(chosen) != min(budget, n):
            raise PaserError(f"internal error: {len(chosen)} records selected for a budget of {budget}")
        if cost is not None and int(cost[order].sum()) > budget:
            raise PaserError(f"internal error: {int(cost[order].sum())} tokens selected for a budget of {budget}")
    if tokenizer is not None:
        sel_cost = cost[order] if cost is not None else response_token_costs(chosen, tokenizer, args.template, args.cutoff)
        report["selected_tokens"] = int(sel_cost.sum())  # response tokens of one pass, as recovery trains them
    write_selected(out / "selected.jsonl", chosen, args.selected_format, args.template)
    write_parquet_atomic(out / "scores.parquet", {k: (v if not isinstance(v, np.ndarray) else v) for k, v in table.items()})

    if args.plots and clusters is not None:
        t = time.time()
        cds = np.asarray(report["clusters"].get("cds") or np.zeros(clusters.k))
        plot_cluster_map(clusters.coords, clusters.labels, cds, out / "cluster_map.png", title=f"S2RIC clusters ({args.method})")
        plot_budget_per_cluster(report["clusters"], out / "budget_per_cluster.png")
        timings["plots"] = time.time() - t

    timings["total"] = time.time() - t_start
    report.update(selected=len(chosen), timings_s=timings, environment=environment())
    atomic_write_json(out / "report.json", report)
    if state is not None and not spec.shares_scoring:
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
