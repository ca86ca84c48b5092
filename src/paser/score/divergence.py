"""Token-level divergences and losses: pure tensor functions, no models, no files.

CDAIS (docs/METHOD.md §2) measures capability degradation per sample as the mean, over the
response tokens, of the Jensen-Shannon divergence between the original and the pruned
model's next-token distributions; IFD needs the mean response negative log-likelihood.
Both are computed here from logits, in float32 log space, a chunk of tokens at a time so
that memory stays bounded by `chunk × vocabulary` whatever the number of tokens.

Position convention (causal LM): the logits at position t predict token t+1, so a response
that occupies positions [n_prompt, L) is scored by the logits at [n_prompt − 1, L − 1).
"""

from __future__ import annotations

import math

import torch

from paser.errors import ModelError

LN2 = math.log(2.0)

# log-probabilities of exactly-zero probabilities (-inf logits) are clamped to this finite
# value: exp() of it is still exactly 0, and 0 · (finite) = 0 where 0 · (−inf) would be NaN.
_LOG_FLOOR = -1e30


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last axis, with −inf replaced by a finite floor."""
    return torch.log_softmax(logits.float(), dim=-1).clamp_min_(_LOG_FLOOR)


class NonFiniteLogits(ModelError, ValueError):
    """A model produced logits that are not a distribution: a user-facing model problem (NaN
    weights are refused at load, so this is an overflow, e.g. in float16), and a ValueError for
    callers of these tensor functions."""


def _check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    # A NaN here can only come from NaN/+inf logits or an all −inf row: not a distribution.
    # Refuse loudly rather than let a broken model's NaN slip into a ranking.
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise NonFiniteLogits(
            f"{what}: logits contain NaN, +inf, or a row that is entirely -inf "
            "(the model's activations overflow: try float32, or check its weights)"
        )
    return values


class Workspace:
    """Reusable [chunk, V] float32 scratch buffers for the chunked JSD.

    Why by hand: every full-vocabulary temporary is ~50 MB at chunk 256 × 49,152, and
    allocating one (fresh pages from the OS) cost as much as the arithmetic on it (40 ms vs
    4 ms for an in-place pass, measured). Reusing four buffers across chunks and batches
    made the JSD ~3× faster. Holding one is optional; it only saves time.
    """

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []

    def get(self, rows: int, vocab: int, device: torch.device, n: int = 4) -> list[torch.Tensor]:
        b = self._bufs
        if not b or b[0].shape[0] < rows or b[0].shape[1] != vocab or b[0].device != device:
            self._bufs = b = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(n)]
        return [t[:rows] for t in b]


def _log_softmax_into(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log_softmax(x) written into `out` (float32), −inf floored; `scratch` is clobbered."""
    mx = x.amax(-1, keepdim=True).float()
    torch.sub(x, mx, out=out)
    torch.exp(out, out=scratch)
    out.sub_(scratch.sum(-1, keepdim=True).log_())
    return out.clamp_min_(_LOG_FLOOR)


def token_jsd_and_nll(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    targets: torch.Tensor | None = None,
    chunk: int = 256,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token JSD(P‖Q) and, when `targets` is given, both models' NLL of the targets.

    logits_p, logits_q: [T, V] (any float dtype; promoted to float32 chunk by chunk).
    targets: [T] token ids, or None. Returns (jsd [T], nll_p [T] | None, nll_q [T] | None),
    float32, on the logits' device. The log-softmax is shared between the divergence and the
    losses, which is why this is one function: the engine needs all three and the
    full-vocabulary passes are the expensive part.

    JSD is ½ Σ P (log P − log M) + ½ Σ Q (log Q − log M) with log M = logaddexp(log P,
    log Q) − log 2, summed per element rather than as H(M) − ½H(P) − ½H(Q): the entropy form
    subtracts numbers of a few nats to get values near 0 and loses them to float32 rounding,
    while here identical rows give exactly 0. Log-probabilities are floored at −1e30 so that
    a zero probability contributes exp(−1e30) · finite = 0 instead of 0 · (−inf) = NaN.
    """
    if logits_p.shape != logits_q.shape or logits_p.dim() != 2:
        raise ValueError(f"expected two [T, V] logits of one shape, got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    if targets is not None and targets.shape != logits_p.shape[:1]:
        raise ValueError(f"targets must be [T]={logits_p.shape[0]}, got {tuple(targets.shape)}")
    T, V = logits_p.shape
    dev = logits_p.device
    jsd = torch.empty(T, dtype=torch.float32, device=dev)
    nll_p = torch.empty(T, dtype=torch.float32, device=dev) if targets is not None else None
    nll_q = torch.empty(T, dtype=torch.float32, device=dev) if targets is not None else None
    step = max(1, int(chunk))
    ws = workspace if workspace is not None else Workspace()
    for s in range(0, T, step):
        e = min(T, s + step)
        lp, lq, lm, tmp = ws.get(e - s, V, dev)
        _log_softmax_into(logits_p[s:e], lp, tmp)
        _log_softmax_into(logits_q[s:e].to(dev), lq, tmp)
        if targets is not None:
            t = targets[s:e].to(dev).long().unsqueeze(-1)
            nll_p[s:e] = -lp.gather(-1, t).squeeze(-1)
            nll_q[s:e] = -lq.gather(-1, t).squeeze(-1)
        torch.logaddexp(lp, lq, out=lm).sub_(LN2)
        # Σ P (log P − log M) + Σ Q (log Q − log M), in place: tmp ← P, lp ← (lp − lm) · P
        torch.exp(lp, out=tmp)
        kl = lp.sub_(lm).mul_(tmp).sum(-1)
        torch.exp(lq, out=tmp)
        kl += lq.sub_(lm).mul_(tmp).sum(-1)
        jsd[s:e] = kl.mul_(0.5).clamp_(0.0, LN2)
    _check_finite(jsd, "token_jsd")
    return jsd, nll_p, nll_q


def token_jsd(logits_p: torch.Tensor, logits_q: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """JSD(P‖Q) per token over the full vocabulary, natural log, in [0, ln 2]. [T,V],[T,V] → [T].

    JSD = ½ KL(P‖M) + ½ KL(Q‖M), M = ½(P + Q), log M = logaddexp(log P, log Q) − log 2, all
    in float32, `chunk` tokens at a time (a full-vocabulary pass over a whole batch at once
    reached 8.3 GB). Zero-probability tokens (−inf logits) contribute 0, never NaN.
    """
    return token_jsd_and_nll(logits_p, logits_q, None, chunk)[0]


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Negative log-likelihood of `targets` [T] under `logits` [T, V], float32, per token.

    A target whose logit is −inf gets a large finite loss (the floor, 1e30), not inf/NaN.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [T, V] and targets [T], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, int(chunk))
    for s in range(0, logits.shape[0], step):
        lp = _log_probs(logits[s : s + step])
        out[s : s + step] = -lp.gather(-1, targets[s : s + step].to(logits.device).long().unsqueeze(-1)).squeeze(-1)
    return _check_finite(out, "token_nll")


# ----------------------------------------------------------------------------- positions


def response_positions(lengths: torch.Tensor, n_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, column) indices of the logits that predict each response token.

    For row b with length L_b and prompt n_b (≥ 1), the response tokens sit at columns
    [n_b, L_b) and are predicted from columns [n_b − 1, L_b − 1). Returned in row-major
    order, so a per-sample segment is contiguous and has L_b − n_b entries.
    """
    lengths = lengths.long().cpu()
    n_prompt = n_prompt.long().cpu()
    if bool((n_prompt < 1).any()):
        raise ValueError("every sequence needs at least one prompt token (the first token has no prediction)")
    if bool((lengths < n_prompt).any()):
        raise ValueError("a sequence is shorter than its prompt")
    counts = lengths - n_prompt
    rows = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    starts = torch.repeat_interleave(n_prompt - 1, counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return rows, starts + offsets


def gather_response(
    hidden_or_logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor, n_prompt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From a right-padded batch [B, L, D] take the rows predicting response tokens.

    Returns (values [N, D], targets [N]) with N = Σ_b (L_b − n_b), samples in batch order.
    """
    rows, cols = response_positions(lengths, n_prompt)
    rows_d, cols_d = rows.to(hidden_or_logits.device), cols.to(hidden_or_logits.device)
    values = hidden_or_logits[rows_d, cols_d]
    targets = input_ids[rows.to(input_ids.device), (cols + 1).to(input_ids.device)]
    return values, targets


def segment_mean(values: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
    """Mean of consecutive segments of `values` [N] with the given lengths; empty → NaN-free 0."""
    counts_t = torch.as_tensor(counts, dtype=torch.long, device=values.device)
    seg = torch.repeat_interleave(torch.arange(len(counts_t), device=values.device), counts_t)
    sums = torch.zeros(len(counts_t), dtype=torch.float64, device=values.device).index_add_(0, seg, values.double())
    return (sums / counts_t.clamp_min(1).double()).float()
