"""Distillation from the original (unpruned) model: the KD objective of `paser recover`.

The recovery objective can be the dataset's answers (sft), the original model's next-token
distribution (kd), or a mix (sft+kd):

    loss = (1 - w) · CE(response tokens)  +  w · T² · KL_T(teacher ‖ student)      (sft+kd)
    loss = T² · KL_T(teacher ‖ student)                                              (kd)

KL_T compares the two models' softmax(logits / T) on the same positions as the CE (the
predictions of the response tokens, with the shared template, cutoff and mask), averaged over
those tokens exactly as the CE is. The T² factor (Hinton et al. 2015) keeps the gradient scale
of the KD term independent of T, so w means the same at every temperature.

The teacher is not kept in memory while training: its top-k log-probabilities and the mass
left outside them (the tail) are computed once per (teacher, records, template, cutoff, k, T,
tokenizer), written to the cache, verified when read, and streamed from disk batch by batch.
The KL is then exact over k + 1 buckets: the k tokens the teacher ranked highest, and the rest
lumped into one bucket whose student mass is everything the student does not put on those k.
(By the grouping property of KL this lower-bounds the full-vocabulary KL, and equals it when
k covers the vocabulary; benchmarks/kd_topk.py measures the gap on the real models.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paser.errors import PaserError
from paser.io.batching import right_pad
from paser.io.cache import atomic_write_bytes, atomic_write_json, hash_file_into, stable_hash
from paser.recover.data import pad_batch
from paser.recover.objectives import ObjectiveContext, TrainerPiece, register_objective

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
TOPK_FILE = "topk.safetensors"
META_FILE = "meta.json"  # written after the tensor file: its presence marks a complete entry


# ----------------------------------------------------------------------------- the maths


def log_tail_mass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `idx` for each row of full log-probabilities `logp`.

    Computed as a logsumexp over the vocabulary with the kept entries masked out, not as
    log(1 - Σ kept): when the kept tokens hold nearly all the mass, 1 - Σ loses every digit in
    float32 (and can come out negative), while the masked logsumexp stays exact. -inf when
    `idx` covers the whole vocabulary.
    """
    masked = logp.scatter(-1, idx, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [N, k], log-probabilities [N, k], tail mass [N]) of softmax(logits / T).

    Computed in float32 whatever the dtype of the logits. k is clipped to the vocabulary.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    k = min(int(k), logp.shape[-1])
    vals, idx = logp.topk(k, dim=-1)
    tail = log_tail_mass(logp, idx).exp()
    return idx, vals, tail


# Above this kept student mass, log(1 − Σ kept q) from the kept log-probabilities loses too
# many float32 digits (its relative error is ~1e-6 / (1 − Σ)), and the tail is recomputed
# exactly from the other V − k logits instead (only for those rows: it costs a copy of them).
EXACT_TAIL_ABOVE = 0.99


def bucketed_kl(
    teacher_idx: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_tail: torch.Tensor,
    student_logits: torch.Tensor,
    T: float = 1.0,
) -> torch.Tensor:
    """Per-row KL(teacher ‖ student) over the teacher's k kept tokens plus one tail bucket.

        KL = Σ_{i ∈ top-k} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

    with q = softmax(student_logits / T), q_tail = 1 − Σ_{i ∈ top-k} q_i and p_tail the
    teacher's stored tail mass. Terms with p = 0 contribute 0.
    Shapes: teacher_idx/teacher_logp [N, k], teacher_tail [N], student_logits [N, V].
    Returns [N] float32 (differentiable in the student logits). Not multiplied by T².

    Cost: one logsumexp over the vocabulary per row (what a cross-entropy costs) rather than a
    full log-softmax plus a masked copy: the first version did both and made a KD step 1.5x
    an SFT step on the CPU (benchmarks/kd_step.py).
    """
    s = student_logits.float()
    if T != 1.0:  # a division is one more [N, V] copy (and its gradient): skip it at T = 1
        s = s / T
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    idx = teacher_idx.long()
    q_kept = s.gather(-1, idx) - lse  # the student's log-probabilities on the teacher's top-k
    p_logp = teacher_logp.float()
    kept = (p_logp.exp() * (p_logp - q_kept)).sum(-1)

    p_tail = teacher_tail.float().clamp_min(0.0)
    has_tail = p_tail > 0
    lse_kept = torch.logsumexp(q_kept, dim=-1)  # log Σ kept q (≤ 0)
    limit = math.log(EXACT_TAIL_ABOVE)
    # clamped first, so the rows recomputed below carry no inf/NaN into the gradient
    q_tail = torch.log(-torch.expm1(lse_kept.clamp(max=limit)))
    near = torch.nonzero(has_tail & (lse_kept > limit)).squeeze(-1)
    if near.numel():
        exact = log_tail_mass(s[near], idx[near]) - lse[near, 0]
        q_tail = q_tail.index_put((near,), exact)
    # 0 · log 0 = 0: rows without teacher tail mass (k = V) get no tail term
    safe_p = torch.where(has_tail, p_tail, torch.ones_like(p_tail))
    tail = torch.where(has_tail, p_tail * (safe_p.log() - q_tail), torch.zeros_like(p_tail))
    return kept + tail


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Per-row KL(softmax(t/T) ‖ softmax(s/T)) over the whole vocabulary (the exact reference)."""
    p = torch.log_softmax(teacher_logits.float() / T, dim=-1)
    q = torch.log_softmax(student_logits.float() / T, dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def distill_loss(kl_sum: torch.Tensor, ce: torch.Tensor | None, n_tokens: torch.Tensor | int, weight: float, T: float) -> torch.Tensor:
    """The training loss from the summed per-token KL and the token count that averages it
    (the same count the CE was averaged over): T²·KL alone when `ce` is None (kd), else
    (1 − weight)·CE + weight·T²·KL with the already token-averaged CE (sft+kd)."""
    kd = (T * T) * kl_sum / n_tokens
    if ce is None:
        return kd
    return (1.0 - weight) * ce + weight * kd


# ----------------------------------------------------------------------------- the teacher cache


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def tokens_hash(examples: Sequence[dict]) -> str:
    """Hash of every example's token ids and response start: what the teacher is run on."""
    h = hashlib.sha256()
    for e in examples:
        n_prompt = sum(1 for t in e["labels"] if t == -100)
        h.update(json.dumps([n_prompt, e["input_ids"]]).encode())
    return h.hexdigest()[:16]


def teacher_cache_key(
    *, teacher_fingerprint: str, teacher_dtype: str, ids: Sequence[str], examples: Sequence[dict],
    template: str, cutoff: int, k: int, temperature: float, tokenizer_key: str,
) -> dict[str, Any]:  # fmt: skip
    """Everything the cached top-k depends on (its hash names the cache entry)."""
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_fingerprint,
        "teacher_dtype": teacher_dtype,
        "records": stable_hash(list(ids)),
        "tokens": tokens_hash(examples),
        "template": template,
        "cutoff": int(cutoff),
        "k": int(k),
        "temperature": float(temperature),
        "tokenizer": tokenizer_key,
    }


@dataclass
class TeacherTargets:
    """The cached top-k of one teacher on one dataset, opened lazily from disk (safetensors
    memory-maps the file, so a large cache does not sit in RAM).

    Rows are the response-token predictions of every example, example after example; example i
    owns rows offsets[i] .. offsets[i+1].
    """

    path: Path
    offsets: list[int]
    k: int
    _handle: Any = None

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle

    def rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        f = self._open()
        return f.get_slice("idx")[a:b], f.get_slice("logp")[a:b], f.get_slice("tail")[a:b]

    def __getstate__(self):  # a DataLoader worker reopens the file itself
        return {**self.__dict__, "_handle": None}


def _response_counts(examples: Sequence[dict]) -> list[int]:
    return [sum(1 for t in e["labels"] if t != -100) for e in examples]


def _verify(entry: Path, key: dict, examples: Sequence[dict], vocab_size: int) -> TeacherTargets | str:
    """The entry's TeacherTargets, or the reason it cannot be used."""
    from safetensors import safe_open

    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {META_FILE} ({e})"
    if meta.get("key") != key:
        return "its key does not match"
    path = entry / TOPK_FILE
    try:
        if _sha256_file(path) != meta.get("sha256"):
            return f"{TOPK_FILE} does not match its checksum"
        counts = _response_counts(examples)
        with safe_open(str(path), framework="pt") as f:
            offsets = f.get_tensor("offsets").tolist()
            n_rows = offsets[-1] if offsets else -1
            if len(offsets) != len(counts) + 1 or [b - a for a, b in zip(offsets, offsets[1:])] != counts:
                return "its rows do not match the records' response tokens"
            k = int(meta["k"])
            for name, shape in (("idx", [n_rows, k]), ("logp", [n_rows, k]), ("tail", [n_rows])):
                if list(f.get_slice(name).get_shape()) != shape:
                    return f"tensor {name!r} has the wrong shape"
            step = 1 << 16
            for a in range(0, n_rows, step):  # range checks, chunk by chunk
                idx = f.get_slice("idx")[a : a + step]
                logp = f.get_slice("logp")[a : a + step]
                tail = f.get_slice("tail")[a : a + step]
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
                    return "token indices outside the vocabulary"
                if not (torch.isfinite(logp).all() and bool((logp <= 1e-6).all())):
                    return "log-probabilities that are not finite or above 0"
                if not (torch.isfinite(tail).all() and bool((tail >= 0).all()) and bool((tail <= 1 + 1e-6).all())):
                    return "tail masses outside [0, 1]"
                total = logp.double().exp().sum(-1) + tail.double()
                if total.numel() and float((total - 1).abs().max()) > 1e-3:
                    return "probabilities that do not sum to 1"
    except Exception as e:  # a truncated or garbled file: safetensors raises its own errors
        return f"unreadable {TOPK_FILE} ({type(e).__name__}: {e})"
    return TeacherTargets(path, offsets, k)


def _teacher_rows(model, examples: Sequence[dict], k: int, temperature: float, max_batch_tokens: int = 4096):
    """Top-k rows of every example's response-token predictions, in example order."""
    from paser.score.engine import plan_batches

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    lengths = [len(examples[i]["input_ids"]) for i in order]
    per_example: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for a, b in plan_batches(lengths, max_batch_tokens=max_batch_tokens):
            batch = [order[j] for j in range(a, b)]
            # pad id 0: right padding under causal attention, no real position sees it
            ids, att = right_pad([examples[i]["input_ids"] for i in batch], 0)
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
            for r, i in enumerate(batch):
                labels = examples[i]["labels"]
                n = len(labels)
                n_prompt = sum(1 for t in labels if t == -100)
                # position t predicts token t+1: the response tokens n_prompt..n-1 come from n_prompt-1..n-2
                rows = logits[r, n_prompt - 1 : n - 1]
                idx, logp, tail = teacher_topk(rows, k, temperature)
                per_example[i] = (idx.to("cpu", torch.int32), logp.cpu(), tail.cpu())
    return [per_example[i] for i in range(len(examples))]


def build_teacher_targets(model, examples: Sequence[dict], key: dict, entry: Path) -> TeacherTargets:
    """Run the teacher once over `examples` and write the cache entry (tensor file, then meta)."""
    from safetensors.torch import save

    k, temperature = key["k"], key["temperature"]
    rows = _teacher_rows(model, examples, k, temperature)
    counts = [r[0].shape[0] for r in rows]
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int64)
    k_eff = rows[0][0].shape[1] if rows else k
    tensors = {
        "idx": torch.cat([r[0] for r in rows]).contiguous(),
        "logp": torch.cat([r[1] for r in rows]).contiguous(),
        "tail": torch.cat([r[2] for r in rows]).contiguous(),
        "offsets": offsets,
    }
    blob = save(tensors)
    entry.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(entry / TOPK_FILE, blob)
    meta = {"key": key, "k": int(k_eff), "rows": int(offsets[-1]), "records": len(examples),
            "sha256": hashlib.sha256(blob).hexdigest()}  # fmt: skip
    atomic_write_json(entry / META_FILE, meta)
    return TeacherTargets(entry / TOPK_FILE, offsets.tolist(), int(k_eff))


def open_or_build_teacher_targets(
    entry: Path, key: dict, examples: Sequence[dict], vocab_size: int, load_teacher
) -> tuple[TeacherTargets, bool]:
    """(targets, built): the verified cache entry, or a fresh one from `load_teacher()` (a
    callable returning the teacher model, called only when needed; the model is dropped here,
    so the caller's memory holds no teacher afterwards)."""
    if (entry / META_FILE).exists():
        got = _verify(entry, key, examples, vocab_size)
        if isinstance(got, TeacherTargets):
            return got, False
        log.warning("teacher cache %s is not usable (%s); recomputing it", entry, got)
    teacher = load_teacher()
    try:
        targets = build_teacher_targets(teacher, examples, key, entry)
    finally:
        del teacher
    return targets, True


# ----------------------------------------------------------------------------- training glue


@dataclass
class DistillCollator:
    """Pads like ResponseCollator and adds the teacher's rows of the batch's training examples.

    The rows are concatenated in the order the response positions appear in the padded batch
    (example by example, left to right), which is the order `labels[:, 1:] != -100` selects
    them in, so compute_loss needs no index bookkeeping. Validation items carry no "kd_row"
    and get no teacher tensors (validation loss is the plain response cross-entropy).
    """

    pad_token_id: int
    targets: TeacherTargets
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, self.pad_token_id, self.pad_to_multiple_of)
        if features and all("kd_row" in f for f in features):
            parts = [self.targets.rows(int(f["kd_row"])) for f in features]
            batch["teacher_idx"] = torch.cat([p[0] for p in parts]).long()
            batch["teacher_logp"] = torch.cat([p[1] for p in parts])
            batch["teacher_tail"] = torch.cat([p[2] for p in parts])
        return batch


class DistillDataset(torch.utils.data.Dataset):
    """A RecoveryDataset whose items also name their row block in the teacher cache."""

    def __init__(self, base):
        self.base = base
        self.examples = base.examples
        self.ids = base.ids

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {**self.base.examples[i], "kd_row": i}


def make_distill_trainer_class():
    """A transformers.Trainer whose training loss is the KD objective (imported lazily)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        kd_with_ce: bool = False  # sft+kd: the loss mixes in the response cross-entropy
        kd_weight: float = 0.5
        kd_temperature: float = 1.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher = [inputs.pop(name, None) for name in ("teacher_idx", "teacher_logp", "teacher_tail")]
            if teacher[0] is None:  # validation batches: the response cross-entropy, as for sft
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            fwd = dict(inputs)
            if not self.kd_with_ce:
                fwd.pop("labels")  # no CE to compute
            elif self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                fwd["num_items_in_batch"] = num_items_in_batch
            outputs = model(**fwd)
            mask = labels[:, 1:] != -100  # the positions whose next token is a response token
            student = outputs.logits[:, :-1][mask]
            if student.shape[0] != teacher[0].shape[0]:
                raise RuntimeError(f"teacher rows ({teacher[0].shape[0]}) do not match response tokens ({student.shape[0]})")
            kl = bucketed_kl(*teacher, student, self.kd_temperature)
            # Average over the same token count the model's CE uses, so that the two terms, and
            # gradient accumulation, are normalised alike.
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                n = num_items_in_batch
            else:
                n = mask.sum()
            ce = outputs.loss if self.kd_with_ce else None
            loss = distill_loss(kl.sum(), ce, n, self.kd_weight, self.kd_temperature)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # as Trainer.compute_loss does: the global token count divides each rank's sum
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


# ----------------------------------------------------------------------------- the objectives

# The options both distillation objectives read (kd_weight only sft+kd), with their help text.
_KD_OPTIONS = {
    "kd_temperature": "temperature T of both softmaxes; the KL term is scaled by T^2",
    "kd_topk": "teacher tokens kept per position; the rest is one tail bucket, so the KL is exact over k + 1 buckets "
               "(64 chosen by benchmarks/kd_topk.py)",
    "teacher": "the original, unpruned model whose next-token distribution is distilled (embedded name or directory)",
    "cache_dir": "where the teacher's top-k cache lives, under teacher/ (default: $PASER_CACHE or ~/.cache/paser)",
}  # fmt: skip
_KD_WEIGHT = {"kd_weight": "weight w of the distillation term, loss = (1 - w) * CE + w * T^2 * KL (0 = sft, 1 = kd)"}


def check_kd_options(o) -> None:
    """Both distillation objectives check every KD option (kd_weight too), before any model loads."""
    if not 0.0 <= o.kd_weight <= 1.0:
        raise PaserError(f"recover: kd_weight must be in [0, 1], got {o.kd_weight}")
    if not o.kd_temperature > 0:
        raise PaserError(f"recover: kd_temperature must be > 0, got {o.kd_temperature}")
    if o.kd_topk < 1:
        raise PaserError(f"recover: kd_topk must be >= 1, got {o.kd_topk}")
    if not o.teacher:
        raise PaserError("recover: objective kd needs --teacher (the original, unpruned model)")


def _distill_piece(ctx: ObjectiveContext, with_ce: bool) -> TrainerPiece:
    trainer_cls = make_distill_trainer_class()
    trainer_cls.kd_with_ce, trainer_cls.kd_weight = with_ce, ctx.options.kd_weight
    trainer_cls.kd_temperature = ctx.options.kd_temperature
    collator = DistillCollator(ctx.pad_id, ctx.targets, pad_to_multiple_of=ctx.pad_to_multiple_of)
    return TrainerPiece(trainer_cls, collator, DistillDataset(ctx.train_ds))


@register_objective("kd", "T^2 * KL(teacher || student) on the same response tokens",
                    needs_teacher=True, options=_KD_OPTIONS, check=check_kd_options)  # fmt: skip
def _kd(ctx: ObjectiveContext) -> TrainerPiece:
    return _distill_piece(ctx, with_ce=False)


@register_objective("sft+kd", "(1 - kd_weight) * CE + kd_weight * T^2 * KL",
                    needs_teacher=True, options={**_KD_WEIGHT, **_KD_OPTIONS}, check=check_kd_options)  # fmt: skip
def _sft_kd(ctx: ObjectiveContext) -> TrainerPiece:
    return _distill_piece(ctx, with_ce=True)
