"""Held-out response loss per capability: how well a model predicts answers it never trained on.

For each held-out record, the mean NLL (nats) of its response tokens given its prompt, both
built by `paser.io.templates.encode_example` (the template recovery training uses, so the
number measures exactly what recovery optimises, on records outside the pool). Reported per
capability (the embedded file has general / math / code) as the mean over records with its
standard error, plus the token-weighted mean. Small CPU runs resolve recovery differences
with it that accuracy on 50 questions cannot (METHOD.md §3b: standard error about 0.06 nats).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from paser.evaluate.zeroshot import mean_and_stderr, subset_indices

PROTOCOL = "heldout-v1:encode_example:mean-over-records"


def response_nll_sums(
    model, examples: list[tuple[list[int], int]], *, pad_id: int, batch_size: int = 8, show_progress: bool = True,
    desc: str = "held-out loss",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and token count of each example's response (ids[n_prompt:] given ids[:n_prompt]).

    Length-sorted, right-padded batches; float32 log-softmax over the full vocabulary.
    """
    device = next(model.parameters()).device
    sums = np.zeros(len(examples))
    counts = np.zeros(len(examples), dtype=np.int64)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    bar = tqdm(total=sum(len(e[0]) for e in examples), unit="tok", unit_scale=True, desc=desc, disable=not show_progress)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            L = max(len(examples[i][0]) for i in idx)
            ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            labels = torch.full((len(idx), L), -100, dtype=torch.long)
            for r, i in enumerate(idx):
                seq, n_prompt = examples[i]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                labels[r, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            tgt = labels[:, 1:].to(logits.device)
            valid = tgt != -100
            lp = logits[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits[:, :-1], -1)
            nll = (-(lp * valid)).double().sum(-1).cpu().numpy()
            for r, i in enumerate(idx):
                sums[i] = nll[r]
                counts[i] = int(valid[r].sum())
            bar.update(int(mask.sum()))
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


def heldout_loss(
    model,
    tokenizer,
    records=None,
    *,
    limit: int | None = None,
    seed: int = 0,
    template: str = "alpaca",
    cutoff: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict:
    """Held-out response loss per capability (`extra["capability"]`, else "general").

    `records` defaults to the embedded held-out file; `limit` takes a seeded subset of that
    many records per capability (the same records every run for the same seed and limit).
    """
    from paser.io.templates import encode_example

    if records is None:
        from paser.data import heldout_path
        from paser.io.records import load_records

        records = load_records(str(heldout_path()))[0]
    by_cap: dict[str, list] = defaultdict(list)
    for r in records:
        by_cap[str(r.extra.get("capability") or "general")].append(r)
    chosen = []
    for cap in sorted(by_cap):
        rs = by_cap[cap]
        chosen += [(cap, rs[i]) for i in subset_indices(len(rs), limit, seed)]
    enc = [encode_example(r, tokenizer, template=template, cutoff=cutoff) for _, r in chosen]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sums, counts = response_nll_sums(
        model, [(e.input_ids, e.n_prompt) for e in enc], pad_id=int(pad_id), batch_size=batch_size, show_progress=show_progress
    )
    per_record = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {
        "capabilities": summarise([c for c, _ in chosen], sums, counts),
        "template": template,
        "cutoff": cutoff,
        "record_ids": [r.id for _, r in chosen],
        # Per record, aligned with record_ids: what paired comparisons between models use.
        "record_capabilities": [c for c, _ in chosen],
        "record_loss": [None if math.isnan(x) else float(x) for x in per_record],
    }
