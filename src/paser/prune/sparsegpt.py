"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Layer-wise OBS reconstruction: with the layer Hessian H = 2 XᵀX of the calibration inputs, walk
the input columns left to right; prune a column's masked weights and spread the error they cause
onto the not-yet-processed columns through the inverse Hessian, so that W'X stays close to WX.
Columns are processed in blocks (128 by default); inside a block the mask is chosen adaptively
from w² / [H⁻¹]_jj² (unstructured: the lowest share of the whole block; N:M: the lowest M-N of
each group of M columns, chosen when the group starts). Written after the paper's reference
code (IST-DASLab/sparsegpt) and llm-compressor's `sparsegpt_sparsify.py`; we do not depend on
llm-compressor: 0.14 pins transformers <= 5.17 (we need 5.24) and weighs ~1.5 GB.
"""

from __future__ import annotations

import torch

from paser.prune.masks import n_to_prune


def update_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean of 2 x xᵀ over tokens: returns (H [in, in] float32, tokens seen).

    A running mean (as in the reference code) keeps H's scale independent of the token count,
    which keeps float32 accumulation well conditioned over many batches.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if b == 0:
        return h, n
    h = h * (n / (n + b))
    x = x * (2.0 / (n + b)) ** 0.5
    h = h + x.T @ x
    return h, n + b


def _inverse_hessian_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening H by `percdamp` of its mean diagonal.

    Done in float64 (one O(in³) step per layer, cheap next to the column loop) so that a nearly
    singular H from few calibration tokens does not break the factorisation; if it still fails,
    the dampening grows tenfold until it succeeds.
    """
    h64 = h.double()
    damp = percdamp * torch.mean(torch.diag(h64))
    eye = torch.eye(h64.shape[0], dtype=h64.dtype, device=h64.device)
    for _ in range(6):
        try:
            l = torch.linalg.cholesky(h64 + damp * eye)
            hinv = torch.cholesky_inverse(l)
            return torch.linalg.cholesky(hinv, upper=True).float()
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            damp = damp * 10 if damp > 0 else torch.tensor(1e-6, dtype=h64.dtype, device=h64.device)
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even with heavy dampening")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W [out, in] with OBS error compensation. Returns (new weight float32, mask True=pruned).

    `hessian` is H = 2 XᵀX / n over the calibration inputs of this layer (see `update_hessian`).
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    if nm is not None:
        n_keep, m = nm
        if cols % m:
            raise ValueError(f"N:M pattern needs the input size ({cols}) to be a multiple of M={m}")
        blocksize = max(m, (blocksize // m) * m)  # a group must not straddle two blocks
    # Inputs that never fire carry no information: prune them outright and keep H invertible.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_cholesky(h, percdamp)

    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        if nm is None:
            # Adaptive mask selection over the whole block: the OBS saliency w² / [H⁻¹]_jj².
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            k = n_to_prune(w1.numel(), sparsity)
            if k:
                sal = (w1 * w1) / (d1.reshape(1, -1) ** 2)
                mask1.view(-1)[torch.topk(sal.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if nm is not None and i % m == 0:
                # Choose the group's mask now, on weights already updated by earlier columns.
                sal = w1[:, i : i + m] ** 2 / (d1[i : i + m].reshape(1, -1) ** 2)
                idx = torch.topk(sal, m - n_keep, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            q = col.clone()
            q[mask1[:, i]] = 0.0
            q1[:, i] = q
            e = (col - q) / d
            # Compensate the remaining columns of the block for the error just made.
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        # Lazy batch update: the rest of the matrix absorbs the whole block's error at once.
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    mask |= dead.reshape(1, -1).expand_as(mask)
    w[mask] = 0.0
    return w, mask
