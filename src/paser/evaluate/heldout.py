"""Held-out response loss per capability: how well a model predicts answers it never trained on.

For each held-out record, the mean NLL (nats) of its response tokens given its prompt, both
built by `paser.io.templates.encode_example` (the template recovery training uses, so the
number measures exactly what recovery optimises, on records outside the pool). Reported per
capability (the embedded file has general / math / code) as the mean over records with its
standard error, plus the token-weighted mean. Small CPU runs resolve recovery differences
with it that accuracy on 50 questions cannot (docs/METHOD.md §3b: standard error about 0.06 nats).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from paser.data import dev_records, heldout_path
from paser.errors import ModelError, PaserError
from paser.evaluate.zeroshot import mean_and_stderr, subset_indices
from paser.io.adapter import pad_id as pad_of
from paser.io.batching import right_pad
from paser.io.records import load_records
from paser.io.templates import encode_example
from paser.score import engine  # engine.score_degradation looked up at call time (tests wrap it)
from paser.score.engine import ModelView, ScoreItem

PROTOCOL = "heldout-v1:encode_example:mean-over-records"


def response_nll_sums(
    model, examples: list[tuple[list[int], int]], *, pad_id: int, batch_size: int = 8, show_progress: bool = True,
    desc: str = "held-out loss",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and token count of each example's response (ids[n_prompt:] given ids[:n_prompt]).

    Length-sorted, right-padded batches; float32 log-softmax over the full vocabulary. The LM
    head runs only at the positions that predict a response token (the scoring engine's
    decoder / head split, verified against the model's own logits once): SmolLM2's
    49K-vocabulary head is about a seventh of its forward time on a CPU, and skipping it at
    prompt and padding positions measured 1.15x with identical losses
    (`benchmarks/heldout_eval.py`). A model without a separate head is scored by full forwards.
    """
    device = next(model.parameters()).device
    sums = np.zeros(len(examples))
    counts = np.zeros(len(examples), dtype=np.int64)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    try:
        view: ModelView | None = ModelView(model)
    except (ModelError, AttributeError):  # no decoder / LM head to split the model into
        view = None
    bar = tqdm(total=sum(len(e[0]) for e in examples), unit="tok", unit_scale=True, desc=desc, disable=not show_progress)
    with torch.inference_mode():
        if examples and view is not None:
            shortest = min(examples, key=lambda e: len(e[0]))
            view.verify(ScoreItem("verify", tuple(shortest[0]), shortest[1]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            ids, _ = right_pad([examples[i][0] for i in idx], pad_id)
            rows, cols, tgts = [], [], []
            for r, i in enumerate(idx):
                seq, n_prompt = examples[i]
                # position t predicts token t + 1: the response tokens seq[n_prompt:] are
                # predicted at positions n_prompt - 1 … len(seq) - 2
                start = max(n_prompt, 1)
                rows += [r] * (len(seq) - start)
                cols += range(start - 1, len(seq) - 1)
                tgts += seq[start:]
            if rows:
                # Right padding and causal attention: no real position attends to padding,
                # so no mask is needed (see ModelView.hidden).
                h = view.hidden(ids.to(device)) if view is not None else model(input_ids=ids.to(device), use_cache=False).logits
                r_idx, c_idx = torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)
                logits = (view.logits(h[r_idx, c_idx]) if view is not None else h[r_idx, c_idx]).float()
                tgt = torch.tensor(tgts, device=logits.device)
                nll = (torch.logsumexp(logits, -1) - logits.gather(-1, tgt[:, None]).squeeze(-1)).double()
                per_row = torch.zeros(len(idx), dtype=torch.float64, device=nll.device).index_add_(0, r_idx.to(nll.device), nll)
                n_row = torch.bincount(r_idx, minlength=len(idx)).cpu().numpy()
                for r, i in enumerate(idx):
                    sums[i] = float(per_row[r])
                    counts[i] = int(n_row[r])
            bar.update(sum(len(examples[i][0]) for i in idx))
    bar.close()
    return sums, counts


def summarise(capabilities: list[str], sums: np.ndarray, counts: np.ndarray) -> dict[str, dict]:
    """Per capability and overall: mean per-record loss ± standard error, token-weighted loss."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(capabilities):
        groups[c].append(i)
    groups_all = {**{c: groups[c] for c in sorted(groups)}, "all": list(range(len(capabilities)))}
    out = {}
    for cap, idx in groups_all.items():
        idx = [i for i in idx if counts[i] > 0]
        per_record = sums[idx] / counts[idx]
        mu, se = mean_and_stderr(per_record)
        n_tok = int(counts[idx].sum())
        tok_loss = float(sums[idx].sum() / n_tok) if n_tok else float("nan")
        out[cap] = {"loss": mu, "loss_stderr": se, "token_loss": tok_loss, "ppl": math.exp(tok_loss) if n_tok else float("nan"),
                    "n": len(idx), "n_tokens": n_tok}
    return out


def heldout_records(limit: int | None = None, seed: int = 0, split: str = "test", records=None) -> list[tuple[str, object]]:
    """(capability, record) pairs: the embedded held-out records ("test", the 600 never in the
    pool) or the dev split ("dev", `paser.data.dev_records`), or the given records; `limit`
    takes a seeded subset of that many per capability (the same records every run)."""
    if records is None:
        if split == "dev":
            records = dev_records()
        elif split == "test":
            records = load_records(str(heldout_path()))[0]
        else:
            raise PaserError(f"unknown held-out split {split!r}; choose test or dev")
    by_cap: dict[str, list] = defaultdict(list)
    for r in records:
        by_cap[str(r.extra.get("capability") or "general")].append(r)
    chosen = []
    for cap in sorted(by_cap):
        rs = by_cap[cap]
        chosen += [(cap, rs[i]) for i in subset_indices(len(rs), limit, seed)]
    return chosen


def heldout_loss(
    model,
    tokenizer,
    records=None,
    *,
    limit: int | None = None,
    seed: int = 0,
    split: str = "test",
    template: str = "alpaca",
    cutoff: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict:
    """Held-out response loss per capability (`extra["capability"]`, else "general").

    `records` defaults to the embedded held-out file (split "test") or the dev split ("dev");
    `limit` takes a seeded subset of that many records per capability.
    """
    chosen = heldout_records(limit, seed, split, records)
    enc = [encode_example(r, tokenizer, template=template, cutoff=cutoff) for _, r in chosen]

    pad_id = pad_of(tokenizer)
    sums, counts = response_nll_sums(
        model, [(e.input_ids, e.n_prompt) for e in enc], pad_id=int(pad_id), batch_size=batch_size, show_progress=show_progress
    )
    per_record = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {
        "capabilities": summarise([c for c, _ in chosen], sums, counts),
        "template": template,
        "cutoff": cutoff,
        "split": split,
        "record_ids": [r.id for _, r in chosen],
        # Per record, aligned with record_ids: what paired comparisons between models use.
        "record_capabilities": [c for c, _ in chosen],
        "record_loss": [None if math.isnan(x) else float(x) for x in per_record],
    }


JSD_PROTOCOL = "heldout-jsd-v1:score_degradation:mean-over-records"


def heldout_jsd(
    model,
    reference,
    *,
    limit: int | None = None,
    seed: int = 0,
    split: str = "test",
    template: str = "alpaca",
    cutoff: int = 256,
    cache_dir=None,
    show_progress: bool = True,
) -> dict:
    """How far the model's next-token distributions are from the original model's on the
    held-out responses: per record the mean over response tokens of JSD(P_reference ‖ P_model)
    (full vocabulary, natural log, in [0, ln 2]), per capability the mean over records ± SE.

    Held-out loss rewards moving toward the data's answers, which can overshoot the original
    (full-data SFT ended below the dense model's loss on math); this measures recovery toward
    the model that was pruned. It is PASER's own degradation score, computed by the scoring
    engine (`paser.score.engine.score_degradation`) with `reference` as the original, so the
    reference's hidden states are cached once and every further model costs one forward.
    model, reference: objects with .model, .tokenizer, .fingerprint, .name (LoadedModel,
    EvalModel).
    """
    chosen = heldout_records(limit, seed, split)
    recs = [r for _, r in chosen]
    scores = engine.score_degradation(reference, model, recs, template=template, cutoff=cutoff, cache_dir=cache_dir, progress=show_progress)
    caps = [c for c, _ in chosen]
    jsd = np.asarray(scores.jsd, dtype=np.float64)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(caps):
        groups[c].append(i)
    out_caps = {}
    for cap, idx in {**{c: groups[c] for c in sorted(groups)}, "all": list(range(len(caps)))}.items():
        mu, se = mean_and_stderr(jsd[idx])
        out_caps[cap] = {"jsd": mu, "jsd_stderr": se, "n": len(idx)}
    return {
        "capabilities": out_caps,
        "template": template,
        "cutoff": cutoff,
        "split": split,
        "reference": {"name": reference.name, "fingerprint": reference.fingerprint},
        "record_ids": [r.id for r in recs],
        "record_capabilities": caps,
        "record_jsd": [float(x) for x in jsd],
    }
