"""Perplexity by a stated protocol (the one LLM-Pruner and PASER report).

Protocol: the corpus text (WikiText-2 rows joined with "\\n\\n") is tokenised once; its first
`max_tokens` tokens are cut into non-overlapping windows of `window` tokens; every window is
scored on its own (no context carried over) and perplexity = exp(mean NLL over all predicted
tokens). Window, token count and corpus are reported with the number, because perplexities
with different windows do not compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from paser.data import ppl_text


@dataclass
class PerplexityResult:
    corpus: str
    ppl: float
    nll: float  # mean NLL per predicted token, nats
    nll_stderr: float  # standard error of the per-window mean NLLs
    n_tokens: int  # predicted tokens
    window: int
    n_windows: int
    # Mean NLL of each window, in order: two models scored on the same windows compare pairwise
    # (paser.report.paired), which resolves far smaller differences than two separate errors.
    window_nll: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def window_token_ids(token_ids: torch.Tensor, window: int, max_tokens: int | None) -> torch.Tensor:
    """Cut a 1-D id tensor into [n_windows, window]; a short tail is dropped, as in LLM-Pruner."""
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"text too short: {ids.numel()} tokens for a window of {window}")
    return ids[: n * window].view(n, window)


@torch.inference_mode()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = True) -> torch.Tensor:
    """Per-window summed NLL (float64) of each window's tokens 1..W-1 given the preceding ones."""
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=windows.numel(), unit="tok", desc="perplexity", disable=not show_progress, unit_scale=True)
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)
        out.append(nll.double().sum(dim=1).cpu())
        bar.update(batch.numel())
    bar.close()
    return torch.cat(out)


def leading_token_ids(tokenizer, text: str, max_tokens: int | None, margin: int = 64) -> torch.Tensor:
    """The first `max_tokens` ids of `tokenizer(text)`, without tokenising all of a long corpus.

    Tokenising WikiText-2 whole takes seconds to tens of seconds, and only the first few
    thousand tokens are used. A prefix of the text is tokenised instead, grown until it yields
    `margin` tokens more than needed: tokenizers split text into pre-tokens (words, spaces) that
    never merge across a boundary, so only the last few tokens of a prefix can differ from the
    full encoding, and those are beyond the tokens kept.
    """
    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    if max_tokens is None:
        return torch.tensor(enc(text), dtype=torch.long)
    n_chars = max(4096, 8 * (max_tokens + margin))
    while n_chars < len(text):
        ids = enc(text[:n_chars])
        if len(ids) >= max_tokens + margin:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        n_chars *= 2
    return torch.tensor(enc(text)[:max_tokens], dtype=torch.long)


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    corpus: str = "text",
    window: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    show_progress: bool = True,
) -> PerplexityResult:
    ids = leading_token_ids(tokenizer, text, max_tokens)
    windows = window_token_ids(ids, window, max_tokens)
    sums = window_nlls(model, windows, batch_size=batch_size, show_progress=show_progress)
    per_window = sums / (window - 1)
    n_tok = windows.shape[0] * (window - 1)
    nll = float(sums.sum() / n_tok)
    stderr = float(per_window.std(unbiased=True) / math.sqrt(len(per_window))) if len(per_window) > 1 else float("nan")
    return PerplexityResult(corpus, math.exp(nll), nll, stderr, n_tok, window, windows.shape[0], [float(x) for x in per_window])


def corpus_perplexity(model, tokenizer, corpus: str = "wikitext2", **kw) -> PerplexityResult:
    """Perplexity on an embedded corpus ("wikitext2" or "ptb")."""
    return perplexity(model, tokenizer, ppl_text(corpus), corpus=corpus, **kw)
