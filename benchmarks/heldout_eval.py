"""Held-out response loss: paser's evaluator against the plain full-logits loop, in one run.

The baseline is the straightforward loop (one right-padded forward per batch, logits at every
position, log-softmax over all of them, mask the prompt); paser's `response_nll_sums` runs the
LM head only where a response token is predicted. Both score the same embedded held-out
records with the same model; the script prints tokens/s of each, their ratio, and the largest
per-record difference (they compute the same quantity).

    .venv/bin/python benchmarks/heldout_eval.py [--model smollm2-135m] [--n 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def full_logits_nll_sums(model, examples, *, pad_id: int, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: logits for every position of every batch."""
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
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
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            tgt = labels[:, 1:]
            valid = tgt != -100
            lp = logits[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits[:, :-1], -1)
            nll = (-(lp * valid)).double().sum(-1).numpy()
            for r, i in enumerate(idx):
                sums[i], counts[i] = nll[r], int(valid[r].sum())
    return sums, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=48, help="held-out records (spread over capabilities)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from paser.data import heldout_path
    from paser.evaluate.heldout import response_nll_sums
    from paser.io.models import load_model
    from paser.io.records import load_records
    from paser.io.templates import encode_example

    lm = load_model(args.model)
    recs = load_records(str(heldout_path()))[0]
    step = max(1, len(recs) // args.n)
    recs = recs[::step][: args.n]
    enc = [encode_example(r, lm.tokenizer, template="alpaca", cutoff=256) for r in recs]
    ex = [(e.input_ids, e.n_prompt) for e in enc]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (lm.tokenizer.eos_token_id or 0)
    n_tok = sum(len(e[0]) for e in ex)
    resp = sum(len(e[0]) - e[1] for e in ex)

    full_logits_nll_sums(lm.model, ex[:2], pad_id=pad)  # warm-up, both paths
    response_nll_sums(lm.model, ex[:2], pad_id=pad, show_progress=False)
    times = {}
    for name, fn in (("full logits (baseline)", lambda: full_logits_nll_sums(lm.model, ex, pad_id=pad)),
                     ("paser response_nll_sums", lambda: response_nll_sums(lm.model, ex, pad_id=pad, show_progress=False))):
        t = time.perf_counter()
        out = fn()
        times[name] = (time.perf_counter() - t, out)
    (tb, (sb, cb)), (tp, (sp, cp)) = times.values()
    assert (cb == cp).all(), "the two paths count different response tokens"
    diff = float(np.max(np.abs(sb / np.maximum(cb, 1) - sp / np.maximum(cp, 1))))
    print(f"{len(ex)} records, {n_tok} tokens ({100 * resp / n_tok:.0f} % response), {args.threads} threads")
    print(f"| path | seconds | tokens/s |\n|---|---|---|\n| full logits (baseline) | {tb:.1f} | {n_tok / tb:.0f} |\n"
          f"| paser | {tp:.1f} | {n_tok / tp:.0f} |")
    print(f"speed-up {tb / tp:.2f}x; max per-record loss difference {diff:.2e} nats")


if __name__ == "__main__":
    main()
