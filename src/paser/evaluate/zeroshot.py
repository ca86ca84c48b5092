"""Zero-shot commonsense multiple choice by log-likelihood, defined as lm-evaluation-harness does.

What is scored (lm-eval 0.4 `output_type: multiple_choice`, zero-shot, no chat template):
- Each choice i is a request (context_i, " " + choice_i): the target delimiter " " comes before
  the choice. Winogrande is "multiple input" (partial scoring): the contexts differ (the
  sentence up to the blank, filled with each option) and the continuation (the rest of the
  sentence) is shared.
- Tokenisation as lm-eval's HFLM `_encode_pair`: trailing spaces of the context move to the
  continuation; the whole string is tokenised, and the continuation is the whole encoding
  after the first len(encode(context)) tokens. The tokenizer's own default for special tokens
  is used (lm-eval's `add_bos_token=None`).
- ll_i = sum of log P(continuation tokens | context) over the full vocabulary.
- acc: argmax_i ll_i == gold. acc_norm: argmax_i ll_i / len(choice_i) == gold, where len is the
  choice string's length in characters without the delimiter (lm-eval 0.4.13 `completion_len`;
  equal to the byte length for ASCII text; lm-eval's byte-length variant is `acc_bytes`, also
  recorded). For Winogrande lm-eval divides by the length of each *context* option
  (its `choices` are the contexts); we do the same, although lm-eval only reports acc there.
- np.argmax semantics: ties go to the first choice.
- Standard error of a mean metric: sample standard deviation (n-1) / sqrt(n), lm-eval's
  `mean_stderr`.
We add two per-task numbers that separate small models better than accuracy: the mean summed
log-likelihood of the gold continuation (`gold_loglik`, nats), and the mean log-probability of
the gold choice among the choices, log softmax(ll)[gold] (`gold_choice_logprob`; on tasks whose
choices differ much in length, e.g. hellaswag and piqa, it mostly measures length, as lm-eval's
own `prob_norm` does).

Prompt formats follow lm-eval's default task YAMLs, rebuilt from the fields our embedded
files keep (see `format_item`). This module implements the scoring itself instead of calling
lm-eval because lm-eval would re-run the shared context once per choice, would need the data
written out as files and its task registry scanned on every run, and does not hand back the
per-item log-likelihoods we cache. `paser.evaluate.tasks.lm_eval_crosscheck` runs lm-eval
on the same items; a test compares the two.

Agreement with lm-eval (measured 2026-12-03, SmolLM2-135M, float32, CPU): lm-eval's HFLM takes
the log-softmax over the whole vocabulary in the model's dtype (float32) and that rounding,
not ours, is what separates the two: against a float64 forward of the same model, lm-eval's
default is off by up to 2.3e-4 nats per choice on ARC-e (201 choices) and 7.4e-4 on HellaSwag
(80 choices, longer continuations), paser's scorer by up to 4.9e-5 and 7.4e-5. With lm-eval's
`softmax_dtype=float64` the two agree within 3.1e-5 (ARC-e) and 7.1e-5 (HellaSwag), so the
stated bound is 1e-4 against lm-eval with a float64 log-softmax; against lm-eval's default
expect differences that grow with the vocabulary and the continuation length (2.0e-4 on ARC-e,
7.1e-4 on HellaSwag here). Batching, padding, the shared-prefix KV cache and the tokenisation
split add nothing measurable (every variant of ours is within 5e-5 of the float64 forward).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from paser.data import COMMONSENSE_TASKS, load_commonsense
from paser.errors import PaserError
from paser.io import adapter
from paser.io.batching import right_pad

log = logging.getLogger(__name__)

TARGET_DELIMITER = " "
# Bump when anything that changes the numbers changes: it keys the on-disk result cache.
PROTOCOL = "zeroshot-v1:lm-eval-0.4-multiple_choice:delim=' ':acc_norm=len(choice)"


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question as lm-eval scores it: a (context, continuation) request per choice."""

    index: int  # position in the task's data file
    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]  # lm-eval's `doc_to_choice` strings: their lengths normalise acc_norm
    gold: int


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (removes WikiHow bracket artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_context(query: str) -> str:
    """Our file keeps "activity_label: ctx_a ctx_b" with ctx_b lower-case; lm-eval capitalises
    ctx_b (`ctx_b.capitalize()`). ctx_b is not stored separately, so we take it to be the
    fragment after the last sentence end (or after the label) when it starts lower-case:
    "…on a roof. he" -> "…on a roof. He". Items whose ctx_b is empty are left as they are."""
    cut = max(query.rfind(". "), query.rfind("! "), query.rfind("? "))
    start = cut + 2 if cut >= 0 else (query.find(": ") + 2 if ": " in query else 0)
    tail = query[start:]
    if tail[:1].islower():
        query = query[:start] + tail.capitalize()
    return hellaswag_preprocess(query)


def format_item(task: str, doc: dict, index: int) -> MultipleChoiceItem:
    """Build the lm-eval requests for one record of an embedded commonsense file.

    lm-eval default YAMLs reproduced (zero-shot):
      boolq      "{passage}\\nQuestion: {question}?\\nAnswer:"   choices " no" / " yes"
      piqa       "Question: {goal}\\nAnswer:"                    choices sol1 / sol2
      arc_*      "Question: {question}\\nAnswer:"                choices text
      openbookqa "{question_stem}"                               choices text
      hellaswag  preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())   preprocess(endings)
      winogrande contexts sentence[:blank] + option, continuation " " + sentence[blank+1:].strip()
    """
    d = TARGET_DELIMITER
    if task == "boolq":
        q = doc["query"]
        ctx = (q[len("Passage: ") :] if q.startswith("Passage: ") else q) + "\nAnswer:"
        choices = tuple(doc["choices"])
        return MultipleChoiceItem(index, tuple((ctx, d + c) for c in choices), choices, int(doc["gold"]))
    if task == "piqa":
        ctx = doc["query"].rstrip("\n") + "\nAnswer:"
        choices = tuple(doc["choices"])
        return MultipleChoiceItem(index, tuple((ctx, d + c) for c in choices), choices, int(doc["gold"]))
    if task in ("arc_easy", "arc_challenge"):
        ctx = f"Question: {doc['question']}\nAnswer:"
        choices = tuple(doc["choices"])
        return MultipleChoiceItem(index, tuple((ctx, d + c) for c in choices), choices, int(doc["gold"]))
    if task == "openbookqa":
        ctx = doc["query"]
        choices = tuple(doc["choices"])
        return MultipleChoiceItem(index, tuple((ctx, d + c) for c in choices), choices, int(doc["gold"]))
    if task == "hellaswag":
        ctx = _hellaswag_context(doc["query"])
        choices = tuple(hellaswag_preprocess(e) for e in doc["endings"])
        return MultipleChoiceItem(index, tuple((ctx, d + c) for c in choices), choices, int(doc["label"]))
    if task == "winogrande":
        contexts = tuple(doc["context_options"])
        cont = d + doc["continuation"].strip()
        return MultipleChoiceItem(index, tuple((c, cont) for c in contexts), contexts, int(doc["gold"]))
    raise PaserError(f"unknown commonsense task {task!r}")


def subset_indices(n_total: int, limit: int | None, seed: int) -> list[int]:
    """A fixed, seeded subset of item positions, in file order.

    The same (n_total, limit, seed) always gives the same items, and a larger limit with the
    same seed contains every item of a smaller one (a prefix of one seeded permutation), so
    numbers from runs with different limits still compare item for item.
    """
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit <= 0:
        raise PaserError(f"--limit must be positive, got {limit}")
    perm = np.random.default_rng(seed).permutation(n_total)
    return sorted(int(i) for i in perm[:limit])


def load_items(task: str, limit: int | None = None, seed: int = 0) -> tuple[list[MultipleChoiceItem], int]:
    """The task's items (a seeded subset when `limit` is set) and the size of the full set."""
    if task not in COMMONSENSE_TASKS:
        raise PaserError(f"unknown commonsense task {task!r}; known: {', '.join(COMMONSENSE_TASKS)}")
    docs = load_commonsense(task)
    return [format_item(task, docs[i], i) for i in subset_indices(len(docs), limit, seed)], len(docs)


# ----------------------------------------------------------------------------- metrics (pure)


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and lm-eval's `mean_stderr` (sample std with n-1, over sqrt(n)); NaN stderr for n < 2."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    return float(a.mean()), se


def choice_metrics(lls, gold: int) -> dict[str, float]:
    """The per-item metrics that need only the log-likelihoods (not the choice strings)."""
    lls = np.asarray(lls, dtype=np.float64)
    return {
        "acc": float(np.argmax(lls) == gold),
        "gold_loglik": float(lls[gold]),
        "gold_choice_logprob": float(lls[gold] - np.logaddexp.reduce(lls)),
    }


def item_metrics(lls, choices, gold: int) -> dict[str, float]:
    """Per-item metrics from the per-choice summed log-likelihoods (lm-eval's process_results)."""
    lls = np.asarray(lls, dtype=np.float64)
    char_len = np.array([float(len(c)) for c in choices])
    byte_len = np.array([float(len(c.encode("utf-8"))) for c in choices])
    return {
        **choice_metrics(lls, gold),
        "acc_norm": float(np.argmax(lls / char_len) == gold),
        "acc_bytes": float(np.argmax(lls / byte_len) == gold),
    }


METRICS = ("acc", "acc_norm", "acc_bytes", "gold_loglik", "gold_choice_logprob")


def aggregate(per_item: list[dict[str, float]]) -> dict[str, float]:
    """Mean and standard error of every per-item metric."""
    out: dict[str, float] = {}
    for m in METRICS:
        mu, se = mean_and_stderr([r[m] for r in per_item])
        out[m] = mu
        out[f"{m}_stderr"] = se
    return out


# ----------------------------------------------------------------------------- tokenisation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM `_encode_pair` for a causal model (context must be non-empty)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer(context + continuation)["input_ids"])
    ctx = list(tokenizer(context)["input_ids"])
    return ctx, whole[len(ctx) :]


def _max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048  # lm-eval's default when the config says nothing


def _truncate(ctx: list[int], cont: list[int], max_len: int) -> list[int]:
    """lm-eval keeps the last max_len + 1 tokens of context + continuation (left truncation)."""
    keep = max_len + 1 - len(cont)
    if keep < 1:
        raise PaserError(f"a continuation of {len(cont)} tokens does not fit the model's {max_len} positions")
    return ctx[-keep:] if len(ctx) > keep else ctx


# ----------------------------------------------------------------------------- scoring engine


def _forward_params(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def _cont_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] over the full vocabulary, in float32: logit - logsumexp."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.inference_mode()
def _loglik_direct(model, batches, pad_id: int, device, bar) -> dict[int, float]:
    """One right-padded forward per batch of (context + continuation)[:-1], as lm-eval does."""
    out: dict[int, float] = {}
    for batch in batches:  # list of (request_id, ctx, cont)
        seqs = [(ctx + cont)[:-1] for _, ctx, cont in batch]
        ids, mask = right_pad(seqs, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, (rid, ctx, cont) in enumerate(batch):
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logits.device)
            tgt = torch.tensor(cont, device=logits.device)
            out[rid] = float(_cont_logprob(logits[r, pos], tgt).double().sum())
        bar.update(sum(len(s) for s in seqs))
    return out


@torch.inference_mode()
def _loglik_shared(model, groups, pad_id: int, device, bar, params: set[str]) -> dict[int, float]:
    """Contexts run once (left-padded, KV cache kept), then all continuations of a batch's
    contexts run together on the cache. Token for token the same computation as the direct
    path, with each shared context computed once instead of once per choice."""
    cache_kw = "cache" if "cache" in params else "past_key_values"
    out: dict[int, float] = {}
    for batch in groups:  # list of (ctx, [(request_id, cont), ...])
        G = len(batch)
        Lc = max(len(ctx) for ctx, _ in batch)
        ids = torch.full((G, Lc), pad_id, dtype=torch.long)
        mask = torch.zeros((G, Lc), dtype=torch.long)
        for g, (ctx, _) in enumerate(batch):
            ids[g, Lc - len(ctx) :] = torch.tensor(ctx)
            mask[g, Lc - len(ctx) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"use_cache": True}
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = 1
        o1 = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), **kw)
        last = o1.logits[:, -1]  # predicts each continuation's first token
        cache = getattr(o1, "cache", None)
        if cache is None:
            cache = getattr(o1, "past_key_values", None)
        rows = [(g, rid, cont) for g, (_, conts) in enumerate(batch) for rid, cont in conts]
        first = _cont_logprob(last[[g for g, _, _ in rows]], torch.tensor([c[0] for _, _, c in rows], device=last.device))
        L2 = max(len(c) for _, _, c in rows) - 1
        rest = torch.zeros(len(rows), dtype=torch.float32)
        if L2 > 0:
            gidx = torch.tensor([g for g, _, _ in rows], device=device)
            ids2 = torch.full((len(rows), L2), pad_id, dtype=torch.long)
            m2 = torch.zeros((len(rows), L2), dtype=torch.long)
            for r, (_, _, c) in enumerate(rows):
                if len(c) > 1:
                    ids2[r, : len(c) - 1] = torch.tensor(c[:-1])
                    m2[r, : len(c) - 1] = 1
            cache.reorder_cache(gidx)  # one cache row per continuation, copied from its context
            mask2 = torch.cat([mask.to(device)[gidx], m2.to(device)], dim=1)
            ctx_len = mask.sum(-1).to(device)[gidx]
            pos2 = ctx_len[:, None] + torch.arange(L2, device=device)[None, :]
            o2 = model(input_ids=ids2.to(device), attention_mask=mask2, position_ids=pos2, use_cache=True, **{cache_kw: cache})
            for r, (_, _, c) in enumerate(rows):
                if len(c) > 1:
                    tgt = torch.tensor(c[1:], device=o2.logits.device)
                    rest[r] = _cont_logprob(o2.logits[r, : len(c) - 1], tgt).double().sum().float()
        for r, (_, rid, c) in enumerate(rows):
            out[rid] = float(first[r].double()) + float(rest[r].double())
        bar.update(int(mask.sum()) + (int(m2.sum()) if L2 > 0 else 0))
    return out


def loglikelihoods(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 8,
    share_prefix: bool = True,
    show_progress: bool = True,
    desc: str = "loglikelihood",
) -> list[float]:
    """Summed log-likelihood of each continuation given its context (lm-eval `loglikelihood`).

    Batches are length-sorted (longest first, so a memory problem shows at once). With
    `share_prefix`, requests with the same context tokens form one group whose context runs
    once; `batch_size` counts contexts (groups) per forward pass, or requests when not sharing.
    """
    device = next(model.parameters()).device
    max_len = _max_length(model)
    pad_id = adapter.pad_id(tokenizer)
    enc = []
    for rid, (ctx_s, cont_s) in enumerate(requests):
        if not ctx_s:
            raise PaserError("empty contexts are not supported in zero-shot scoring")
        ctx, cont = encode_pair(tokenizer, ctx_s, cont_s)
        if not cont:
            raise PaserError(f"continuation {cont_s!r} encodes to no tokens")
        enc.append((rid, _truncate(ctx, cont, max_len), cont))

    params = _forward_params(model)
    if share_prefix:
        by_ctx: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for rid, ctx, cont in enc:
            by_ctx.setdefault(tuple(ctx), []).append((rid, cont))
        groups = sorted(by_ctx.items(), key=lambda kv: -(len(kv[0]) + max(len(c) for _, c in kv[1])))
        batches = [[(list(k), v) for k, v in groups[i : i + batch_size]] for i in range(0, len(groups), batch_size)]
        total = sum(len(k) + sum(len(c) - 1 for _, c in v) for k, v in groups)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not show_progress)
        try:
            res = _loglik_shared(model, batches, pad_id, device, bar, params)
        except (TypeError, AttributeError, NotImplementedError) as e:
            # A model without a usable KV cache (unusual architectures): score the plain way.
            log.warning("prefix sharing failed (%s); scoring each choice in full", e)
            bar.close()
            return loglikelihoods(
                model, tokenizer, requests, batch_size=batch_size, share_prefix=False, show_progress=show_progress, desc=desc
            )
    else:
        order = sorted(enc, key=lambda x: -(len(x[1]) + len(x[2])))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        bar = tqdm(total=sum(len(c) + len(k) - 1 for _, k, c in enc), unit="tok", unit_scale=True, desc=desc, disable=not show_progress)
        res = _loglik_direct(model, batches, pad_id, device, bar)
    bar.close()
    return [res[i] for i in range(len(requests))]


# ----------------------------------------------------------------------------- task driver


@dataclass
class ZeroShotResult:
    task: str
    n: int  # items scored
    n_total: int  # items in the full set
    metrics: dict[str, float]
    indices: list[int] = field(repr=False)
    lls: list[list[float]] = field(repr=False)  # per item, per choice
    golds: list[int] = field(repr=False)

    def to_dict(self, with_items: bool = False) -> dict:
        d = {"task": self.task, "n": self.n, "n_total": self.n_total, **self.metrics}
        if with_items:
            d["items"] = {"indices": self.indices, "lls": self.lls, "golds": self.golds}
        return d


def score_items(
    model, tokenizer, task: str, items: list[MultipleChoiceItem], n_total: int, *, batch_size: int = 8,
    share_prefix: bool = True, show_progress: bool = True,
) -> ZeroShotResult:
    flat = [req for it in items for req in it.requests]
    lls_flat = loglikelihoods(
        model, tokenizer, flat, batch_size=batch_size, share_prefix=share_prefix, show_progress=show_progress, desc=task
    )
    lls, per_item, k = [], [], 0
    for it in items:
        ll = lls_flat[k : k + len(it.requests)]
        k += len(it.requests)
        lls.append(ll)
        per_item.append(item_metrics(ll, it.choices, it.gold))
    return ZeroShotResult(task, len(items), n_total, aggregate(per_item), [it.index for it in items], lls, [it.gold for it in items])


def evaluate_task(
    model,
    tokenizer,
    task: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    share_prefix: bool = True,
    show_progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot acc / acc_norm (+ gold log-likelihoods) of one embedded commonsense task."""
    items, n_total = load_items(task, limit, seed)
    return score_items(
        model, tokenizer, task, items, n_total, batch_size=batch_size, share_prefix=share_prefix, show_progress=show_progress
    )
