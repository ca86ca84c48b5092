"""Recovery: LoRA fine-tuning of a pruned model on the selected records (peft + HF Trainer).

Defaults follow the reference training code (LLM-Pruner / PASER): r 8, alpha 16, dropout 0.05
on every linear projection of the decoder (q,k,v,o,gate,up,down), cutoff 256, lr 1e-4, loss
on the response tokens only, with the prompt template the scoring used. Two of its defects are
fixed: the LoRA config is really applied, and training never runs in float16 (NaN losses were
reported there): float32 on CPU, bfloat16 on GPUs that support it.

Output directory:
    adapter/              the peft adapter (what training learned)
    merged/               a plain model directory (`AutoModelForCausalLM.from_pretrained` loads it);
                          a sparse model keeps its exact zero pattern (see merge.py)
    training_log.json     train loss per step, validation loss per evaluation
    recovery_report.json  config, data, tokens, time, losses, sparsity before/after merge
    checkpoints/          while training only: adapter + optimizer + RNG every `save_steps`,
                          so a killed run resumes where it stopped with the same result
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paser.errors import PaserError
from paser.io.cache import atomic_write_json, default_cache_dir, stable_hash
from paser.io.records import Record
from paser.recover.data import RecoveryDataset, ResponseCollator, encode_records, split_validation
from paser.recover.distill import (
    OBJECTIVES,
    DistillCollator,
    DistillDataset,
    TeacherTargets,
    make_distill_trainer_class,
    open_or_build_teacher_targets,
    teacher_cache_key,
)
from paser.recover.merge import linear_sparsity, merge_keep_sparsity, sparsity_masks

log = logging.getLogger(__name__)

REPORT_FILE = "recovery_report.json"
LOG_FILE = "training_log.json"
ELAPSED_FILE = "paser_elapsed.json"  # in each checkpoint: training seconds up to it, across resumes
RUN_FILE = "run.json"  # the key of the run that owns checkpoints/, so a resume never mixes runs
# benchmarks/kd_topk.py, SmolLM2-135M vs its Wanda-50 % prune, 40 pool records, T = 1: k = 64
# keeps 95.1 % of the teacher's mass (5th percentile 78 %), 94 % of the full-vocabulary KL, and
# its gradient is within 1.8 % of the full KL's (cosine 0.9998); k = 256 gains 0.6 % gradient
# error for 4x the cache (0.49 MB per 1,000 response tokens at k = 64).
DEFAULT_KD_TOPK = 64
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
PROGRESS_LABEL = "LoRA recovery"
# the package each Trainer integration imports (transformers checks these names itself)
_REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


# ----------------------------------------------------------------------------- LoRA targets


def _decoder_prefix(model: nn.Module) -> str:
    """Module path of the text decoder inside `model` ("model" for LLaMA/Gemma causal LMs).

    A multimodal checkpoint (Gemma-3 4B+) also has a vision tower whose layers carry the same
    projection names; only the text decoder is recovered.
    """
    try:
        decoder = model.get_decoder()
    except Exception:  # exotic models raise; fall back to the whole model
        return ""
    for name, mod in model.named_modules():
        if mod is decoder:
            return name
    return ""


def lora_target_modules(model: nn.Module) -> tuple[str, list[str]]:
    """(peft `target_modules` regex, sorted leaf names) for every nn.Linear in a decoder layer.

    Detected, not hard-coded, so LLaMA (q_proj … down_proj), Gemma-3 and any decoder whose
    linears sit inside numbered layers work; the LM head and embeddings are never targeted.
    """
    prefix = _decoder_prefix(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    leaves = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is out_emb:
            continue
        if prefix and not name.startswith(prefix + "."):
            continue
        if not re.search(r"\.\d+\.", "." + name):  # inside a numbered (decoder) layer
            continue
        leaves.add(name.rsplit(".", 1)[-1])
    if not leaves:
        raise PaserError(f"{type(model).__name__}: found no linear layers inside decoder layers to put LoRA on")
    names = sorted(leaves)
    head = re.escape(prefix) + r"\." if prefix else ""
    # peft applies a string target as re.fullmatch on module names of the base model
    regex = rf"{head}(?:.*\.)?\d+\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"
    return regex, names


# ----------------------------------------------------------------------------- Trainer callbacks


def _summarise_log(history: list[dict]) -> dict[str, list[dict]]:
    """Trainer's log_history → {"train": [{step, epoch, loss, lr, grad_norm}], "val": [{step, epoch, loss}]}."""
    train, val = [], []
    for h in history:
        if "loss" in h:
            train.append(
                {
                    "step": h.get("step"),
                    "epoch": h.get("epoch"),
                    "loss": h["loss"],
                    "lr": h.get("learning_rate"),
                    "grad_norm": h.get("grad_norm"),
                }
            )
        elif "eval_loss" in h:
            val.append({"step": h.get("step"), "epoch": h.get("epoch"), "loss": h["eval_loss"]})
    return {"train": train, "val": val}


def _make_callbacks(log_path: Path, show_progress: bool, prior_seconds: float = 0.0, save_minutes: float = 0.0):
    from transformers import ProgressCallback, TrainerCallback

    class LogWriter(TrainerCallback):
        """Writes training_log.json at every log event, so a killed run leaves its curve behind.
        log_history comes back from the checkpoint on resume, so the file stays continuous."""

        def __init__(self):
            self.tokens_at_begin = 0
            self.tokens_at_end = 0
            self.initial_eval: dict | None = None  # evaluate() before train(): train() resets the history
            self.prior_seconds = prior_seconds  # training time before the checkpoint resumed from
            self.t_begin = time.perf_counter()
            self.t_saved = self.t_begin

        def on_train_begin(self, args, state, control, **kw):
            self.tokens_at_begin = state.num_input_tokens_seen
            self.t_begin = self.t_saved = time.perf_counter()
            if self.initial_eval is not None and state.global_step == 0:
                # into the Trainer's own history, so checkpoints carry it across a resume
                state.log_history.insert(0, {**self.initial_eval, "epoch": 0.0, "step": 0})

        def on_train_end(self, args, state, control, **kw):
            self.tokens_at_end = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            atomic_write_json(log_path, _summarise_log(state.log_history))

        def on_step_end(self, args, state, control, **kw):
            # The Trainer saves by steps only; on a CPU, 100 steps can be 20 minutes of work.
            # One process only: in a data-parallel run each rank's clock would decide on its
            # own, and ranks that disagree on a save can wait on each other for ever.
            if save_minutes > 0 and args.world_size == 1 and time.perf_counter() - self.t_saved >= 60 * save_minutes:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            self.t_saved = time.perf_counter()
            # The Trainer's checkpoints keep no wall time; without this a resumed run would
            # report only its last part as the cost of recovery.
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                atomic_write_json(ckpt / ELAPSED_FILE, {"seconds": self.elapsed()})

        def elapsed(self) -> float:
            return self.prior_seconds + time.perf_counter() - self.t_begin

    class QuietProgress(ProgressCallback):
        """The Trainer's bar, labelled, with the loss as a postfix instead of one printed dict per step."""

        def on_train_begin(self, args, state, control, **kw):
            super().on_train_begin(args, state, control, **kw)
            if self.training_bar is not None:
                self.training_bar.set_description(PROGRESS_LABEL, refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.training_bar is not None and logs:
                post = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if k in logs}
                if post:
                    self.training_bar.set_postfix(post, refresh=False)

    return LogWriter(), (QuietProgress() if show_progress else None)


# ----------------------------------------------------------------------------- helpers


def _training_dtype(model: nn.Module) -> torch.dtype:
    """Never float16: a float16 model is moved to bfloat16 (GPU with bf16) or float32."""
    dt = next(model.parameters()).dtype
    if dt == torch.float16:
        dev = next(model.parameters()).device
        target = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        log.warning("model is float16; training in %s instead (float16 LoRA training gives NaN losses)", target)
        model.to(target)
        return target
    return dt


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete.

    The Trainer writes a checkpoint's weights, optimizer and RNG state first and
    trainer_state.json last, so a readable trainer_state.json of the right step, next to the
    adapter weights, marks a checkpoint whose save finished (a kill during the save leaves
    a directory without it).
    """
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was interrupted)"
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable trainer_state.json ({type(e).__name__})"
    step = ckpt.name.rsplit("-", 1)[-1]
    if not isinstance(data, dict) or str(data.get("global_step")) != step:
        return "trainer_state.json does not belong to this step"
    if not any((ckpt / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors")):
        return "no adapter weights"
    return None


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint in `ckpt_dir`; incomplete ones are removed with a warning.

    Removed, not only skipped: the Trainer's own checkpoint rotation counts every
    checkpoint-N directory, and would otherwise delete a good checkpoint to keep a broken one.
    """
    if not ckpt_dir.is_dir():
        return None
    found = []
    for d in ckpt_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        why = checkpoint_problem(d)
        if why is None:
            return str(d)
        log.warning("recover: ignoring incomplete checkpoint %s: %s; removing it", d, why)
        shutil.rmtree(d, ignore_errors=True)
    return None


def _config_dtype(model_path: str) -> str | None:
    """The dtype a model directory's config.json declares ("dtype", or the older "torch_dtype")."""
    if not model_path:
        return None
    cfg = _read_json(Path(model_path) / "config.json") or {}
    dt = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(dt).replace("torch.", "") if dt else None


def resolve_save_dtype(save_dtype: str, config_dtype: str | None, trained: torch.dtype) -> torch.dtype:
    """The dtype merged/ is written in: the named one, or for "auto" the model's own (its
    config.json's), falling back to the dtype it was trained in."""
    name = config_dtype if save_dtype == "auto" else save_dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name in table:
        return table[name]
    if save_dtype != "auto":
        raise PaserError(f"recover: save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    return trained


def _report_integration(report_to: str) -> str:
    """Check that the experiment logger's package is installed; make wandb offline by default."""
    if report_to not in REPORT_TO:
        raise PaserError(f"recover: report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return report_to
    import importlib.util

    pkgs = _REPORT_PACKAGES[report_to]
    if not any(importlib.util.find_spec(p) is not None for p in pkgs):
        raise PaserError(f"recover: --report-to {report_to} needs the '{pkgs[0]}' package: pip install {pkgs[0]}")
    if report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # paser never needs a network; the user may opt in
    return report_to


def _vocab_size(model: nn.Module) -> int:
    """Rows of the LM head: the size of the distribution the model predicts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    return stable_hash([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])


def _teacher_identity(teacher: str, device: torch.device, allow_pickle: bool) -> tuple[str, str]:
    """(fingerprint, dtype) of the teacher as load_model would load it, without loading its
    weights when it is an embedded name or a local model directory (the cached-teacher path)."""
    from paser.io.models import _cached_dir_fingerprint, default_dtype, load_model, resolve_model_path

    dtype = str(default_dtype(device))
    p = Path(teacher).expanduser()
    if not (p.is_file() and p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf")):
        path, _ = resolve_model_path(teacher)
        if Path(path).is_dir() and (Path(path) / "config.json").exists():
            return _cached_dir_fingerprint(Path(path)), dtype
    t = load_model(teacher, allow_pickle=allow_pickle)  # a hub id, a GGUF or a pickle: identity needs the weights
    fp = t.fingerprint
    del t
    gc.collect()
    return fp, dtype


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first(xs: list[dict], key: str = "loss") -> float | None:
    return xs[0][key] if xs else None


def _last(xs: list[dict], key: str = "loss") -> float | None:
    return xs[-1][key] if xs else None


# ----------------------------------------------------------------------------- the stage


def _checkpointing_kwarg(training_args_cls, on: bool) -> dict[str, bool]:
    """transformers renamed TrainingArguments' gradient_checkpointing to activation_checkpointing
    after 5.17; paser supports both, so that it installs beside llm-compressor (transformers<=5.17)."""
    import inspect

    params = inspect.signature(training_args_cls.__init__).parameters
    return {"activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing": on}


def recover(
    model_spec: str,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    *,
    template: str = "alpaca",
    cutoff: int = 256,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    lr: float = 1e-4,
    epochs: float = 2,
    batch_size: int = 4,
    grad_accum: int = 1,
    seed: int = 0,
    val_fraction: float = 0.0,
    val_records: Sequence[Record] | None = None,
    save_steps: int = 100,
    save_minutes: float = 10.0,
    eval_steps: int | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    warmup: float = 0.03,
    group_by_length: bool = False,
    gradient_checkpointing: bool = False,
    keep_checkpoints: bool = False,
    show_progress: bool = True,
    allow_pickle: bool = False,
    callbacks: Sequence[Any] = (),
    objective: str = "sft",
    kd_weight: float = 0.5,
    kd_temperature: float = 1.0,
    kd_topk: int = DEFAULT_KD_TOPK,
    teacher: str = "smollm2-135m",
    save_dtype: str = "auto",
    report_to: str = "none",
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """LoRA-recover `model_spec` on `records`; write adapter/, merged/, logs and a report into out_dir.

    model_spec: anything `paser.io.models.load_model` accepts (embedded name, model directory).
    epochs / max_steps: max_steps, when given, overrides epochs (Trainer semantics).
    batch_size × grad_accum is the effective batch. warmup: a share of the steps (< 1) or a count.
    val_fraction holds out that share of `records` (by `seed`); `val_records` gives the
    validation set explicitly instead. Validation loss is logged every `eval_steps`
    (default: about 10 evaluations per run) and before training starts.
    save_steps / save_minutes: a checkpoint every save_steps steps, and also whenever
    save_minutes have passed since the last one (0: off), so that on a slow machine a killed
    run loses minutes, not the whole run. Neither changes the result.
    resume: continue from the latest checkpoint in out_dir (only one written by the same run:
    same model, data and hyper-parameters), and return the stored report at once when that
    run already finished. resume=False starts over.
    group_by_length batches records of similar length (less padding; a different data order).
    callbacks: extra `transformers.TrainerCallback`s (tests use one to simulate a crash).
    objective: "sft" (cross-entropy on the responses), "kd" (T²·KL from `teacher`, the
    original model, on the same tokens) or "sft+kd" ((1 − kd_weight)·CE + kd_weight·T²·KL);
    see recover/distill.py. The teacher's top-`kd_topk` log-probabilities at temperature
    `kd_temperature` are computed once into `cache_dir`/teacher/ (default: $PASER_CACHE) and
    the teacher is freed before training. Validation loss is the response CE for every objective.
    save_dtype: dtype of merged/ ("auto": the dtype the model's config.json names).
    report_to: "none", "tensorboard" or "wandb" (offline unless WANDB_MODE is set).
    Returns the report that recovery_report.json holds.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments, set_seed

    from paser.io.models import check_same_tokenizer, fingerprint_directory, load_model

    if not records:
        raise PaserError("recover: no records to train on")
    if epochs <= 0 and not max_steps:
        raise PaserError(f"recover: epochs must be > 0, got {epochs}")
    for name, v in (("batch_size", batch_size), ("grad_accum", grad_accum), ("cutoff", cutoff), ("r", r), ("save_steps", save_steps)):
        if v < 1:
            raise PaserError(f"recover: {name} must be >= 1, got {v}")
    if save_minutes < 0:
        raise PaserError(f"recover: save_minutes must be >= 0, got {save_minutes}")
    if val_records is not None and val_fraction:
        raise PaserError("recover: give either val_fraction or val_records, not both")
    if objective not in OBJECTIVES:
        raise PaserError(f"recover: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    distill = objective != "sft"
    if distill:
        if not 0.0 <= kd_weight <= 1.0:
            raise PaserError(f"recover: kd_weight must be in [0, 1], got {kd_weight}")
        if not kd_temperature > 0:
            raise PaserError(f"recover: kd_temperature must be > 0, got {kd_temperature}")
        if kd_topk < 1:
            raise PaserError(f"recover: kd_topk must be >= 1, got {kd_topk}")
        if not teacher:
            raise PaserError("recover: objective kd needs --teacher (the original, unpruned model)")
    resolve_save_dtype(save_dtype, None, torch.float32)  # a bad name fails before any model loads
    report_to = _report_integration(report_to)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"

    lm = load_model(model_spec, allow_pickle=allow_pickle)
    model, tok = lm.model, lm.tokenizer
    dtype = _training_dtype(model)
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise PaserError(f"{model_spec}: the tokenizer has neither a pad nor an EOS token")

    if val_records is not None:
        train_recs, val_recs = list(records), list(val_records)
    else:
        train_recs, val_recs = split_validation(records, val_fraction, seed)
    train_ds = encode_records(train_recs, tok, template, cutoff)
    val_ds: RecoveryDataset | None = encode_records(val_recs, tok, template, cutoff) if val_recs else None

    target_regex, target_names = lora_target_modules(model)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) / batch_size) / grad_accum)
    total_steps = int(max_steps) if max_steps else math.ceil(steps_per_epoch * epochs)
    if eval_steps is None:
        eval_steps = max(1, total_steps // 10)

    config = {
        "template": template, "cutoff": cutoff, "r": r, "alpha": alpha, "dropout": dropout, "lr": lr,
        "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed,
        "max_steps": max_steps, "warmup": warmup, "group_by_length": group_by_length,
        "val_fraction": val_fraction, "eval_steps": eval_steps, "target_modules": target_names,
        "scheduler": "linear", "optimizer": "adamw_torch", "max_grad_norm": 1.0,
    }  # fmt: skip
    key_parts = {
        "model": lm.fingerprint,
        "train": train_ds.ids,
        "val": val_ds.ids if val_ds else [],
        "config": config,
        "dtype": str(dtype),
    }
    kd_info: dict[str, Any] | None = None
    if distill:
        teacher_fp, teacher_dtype = _teacher_identity(teacher, device, allow_pickle)
        kd_key = teacher_cache_key(
            teacher_fingerprint=teacher_fp, teacher_dtype=teacher_dtype, ids=train_ds.ids, examples=train_ds.examples,
            template=template, cutoff=cutoff, k=kd_topk, temperature=kd_temperature, tokenizer_key=_tokenizer_key(tok),
        )  # fmt: skip
        kd_info = {"weight": kd_weight if objective == "sft+kd" else None, "temperature": kd_temperature,
                   "topk": kd_topk, "teacher": teacher, "teacher_fingerprint": teacher_fp,
                   "teacher_cache": stable_hash(kd_key)}  # fmt: skip
        config["objective"] = objective
        config["kd"] = kd_info
    # Only a distillation run adds its options to the key, so an sft run keeps the key (and
    # resumes the checkpoints) it had before the objective existed.
    run_key = stable_hash(key_parts)

    # A finished run with the same key: its outputs are already there.
    old = _read_json(out / REPORT_FILE)
    if resume and old and old.get("run_key") == run_key and (out / "merged" / "config.json").exists():
        log.info("recover: %s already holds this run's result; nothing to do", out)
        return old

    resume_from = None
    if resume:
        last = _last_checkpoint(ckpt_dir)
        if last is not None:
            owner = (_read_json(out / RUN_FILE) or {}).get("run_key")
            if owner != run_key:
                raise PaserError(
                    f"{ckpt_dir} holds checkpoints of a different run (other model, data or settings); "
                    "use another output directory, or resume=False (--no-resume) to start over"
                )
            resume_from = last
    elif ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    if resume_from is None:
        (out / LOG_FILE).unlink(missing_ok=True)  # a fresh start: no curve of an earlier run mixed in
    atomic_write_json(out / RUN_FILE, {"run_key": run_key, "model": model_spec, "config": config})

    targets: TeacherTargets | None = None
    if distill:
        vocab = _vocab_size(model)

        def load_teacher():
            t = load_model(teacher, allow_pickle=allow_pickle)
            check_same_tokenizer(t.tokenizer, tok, "teacher", "pruned")
            if _vocab_size(t.model) != vocab:
                raise PaserError(f"recover: the teacher {teacher} predicts {_vocab_size(t.model)} tokens, the pruned model {vocab}")
            log.info("recover: computing the teacher's top-%d log-probabilities once (%d examples)", kd_topk, len(train_ds))
            return t.model

        entry = Path(cache_dir) if cache_dir else default_cache_dir()
        entry = entry / "teacher" / kd_info["teacher_cache"]
        # On an accelerator the pruned model waits on the CPU while the teacher runs, so the
        # device never holds both; the teacher is gone before training starts.
        if device.type != "cpu":
            model.to("cpu")
        try:
            targets, built = open_or_build_teacher_targets(entry, kd_key, train_ds.examples, vocab, load_teacher)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if device.type != "cpu":
                model.to(device)
        kd_info["teacher_cache_dir"] = str(entry)
        kd_info["teacher_cache_built"] = built
        kd_info["teacher_k_stored"] = targets.k

    # Zero masks of the pruned weights, recorded before any adapter touches the model.
    masks = sparsity_masks(model)
    sparsity_before = linear_sparsity(model)

    set_seed(seed)  # the LoRA A matrices are initialised randomly: make them reproducible
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache during training (and no warning about it)
    lora_cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, lora_cfg)
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    extra_args: dict[str, Any] = {}
    if report_to == "tensorboard":
        extra_args["logging_dir"] = str(out / "tensorboard")
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=float(epochs) if epochs > 0 else 1.0,
        max_steps=int(max_steps) if max_steps else -1,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=dtype == torch.bfloat16,  # autocast, so the float32 LoRA weights meet bf16 base weights
        fp16=False,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        eval_strategy="steps" if val_ds is not None else "no",
        eval_steps=eval_steps if val_ds is not None else None,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        **_checkpointing_kwarg(TrainingArguments, gradient_checkpointing),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=report_to,
        ddp_find_unused_parameters=False,  # LoRA uses every adapter in every step
        disable_tqdm=not show_progress,
        dataloader_pin_memory=device.type == "cuda",
        use_cpu=device.type == "cpu",
        **extra_args,
    )
    log_path = out / LOG_FILE
    prior = (_read_json(Path(resume_from) / ELAPSED_FILE) or {}).get("seconds", 0.0) if resume_from else 0.0
    log_writer, progress = _make_callbacks(log_path, show_progress, prior_seconds=float(prior), save_minutes=save_minutes)
    pad_multiple = 8 if device.type == "cuda" else None
    if targets is not None:
        trainer_cls = make_distill_trainer_class()
        trainer_cls.kd_objective, trainer_cls.kd_weight, trainer_cls.kd_temperature = objective, kd_weight, kd_temperature
        collator = DistillCollator(pad_id, targets, pad_to_multiple_of=pad_multiple)
        train_data: Any = DistillDataset(train_ds)
    else:  # sft: the stock Trainer, exactly as before the objective existed
        trainer_cls, collator, train_data = Trainer, ResponseCollator(pad_id, pad_to_multiple_of=pad_multiple), train_ds
    trainer = trainer_cls(
        model=peft_model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_ds,
        data_collator=collator,
        callbacks=[log_writer, *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress is not None:
        trainer.add_callback(progress)

    if val_ds is not None and resume_from is None:
        log_writer.initial_eval = trainer.evaluate()  # validation loss before training: step 0 of the curve

    t0 = time.perf_counter()
    step0 = 0
    if resume_from is not None:
        log.info("recover: resuming from %s", resume_from)
        step0 = int(Path(resume_from).name.rsplit("-", 1)[-1])
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - t0
    state = trainer.state
    if val_ds is not None:
        last_eval_step = max((h["step"] for h in state.log_history if "eval_loss" in h), default=-1)
        if last_eval_step != state.global_step:
            trainer.evaluate()  # the final validation loss, when the schedule did not end on one
    curves = _summarise_log(state.log_history)
    if not trainer.is_world_process_zero():
        # Data-parallel run (`accelerate launch`): every rank trained its shard of each batch and
        # holds the same synchronised weights; only the main process writes the outputs.
        return {"rank": trainer.args.process_index, "steps": state.global_step, "seconds": seconds}
    atomic_write_json(log_path, curves)

    # Adapter, then the merged model (masks re-applied), each written whole or not at all.
    adapter_dir = out / "adapter"
    # peft records the path the base was loaded from, which may be relative to the current
    # directory ("runs/x"); the resolved path loads from anywhere (a hub id stays as it is).
    base_path = str(Path(lm.path).resolve()) if lm.path else model_spec
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = base_path
    _save_dir(adapter_dir, lambda d: (peft_model.save_pretrained(d), tok.save_pretrained(d)))
    merged, restored = merge_keep_sparsity(peft_model, masks)
    if hasattr(merged.config, "use_cache"):
        merged.config.use_cache = True
    out_dtype = resolve_save_dtype(save_dtype, _config_dtype(lm.path), dtype)
    if out_dtype != next(merged.parameters()).dtype:
        merged.to(out_dtype)  # exact zeros stay exact zeros in every float dtype
    sparsity_after = linear_sparsity(merged)
    merged_dir = out / "merged"

    def _write_merged(d: Path) -> None:
        merged.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        atomic_write_json(
            d / "paser_model.json",
            {"name": f"{lm.name}+lora", "fingerprint": fingerprint_directory(d), "recovered_from": lm.fingerprint},
        )

    _save_dir(merged_dir, _write_merged)

    steps_now = state.global_step - step0
    tokens_now = log_writer.tokens_at_end - log_writer.tokens_at_begin
    report = {
        "run_key": run_key,
        "model": model_spec,
        "model_fingerprint": lm.fingerprint,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "config": config,
        "objective": objective,
        "kd": kd_info,  # null for sft
        "save_dtype": str(out_dtype).replace("torch.", ""),
        "report_to": report_to,
        "trainable_parameters": n_trainable,
        "data": {
            "records": len(records),
            "train_examples": len(train_ds),
            "val_examples": len(val_ds) if val_ds else 0,
            "dropped_no_response": len(train_recs) - len(train_ds) + (len(val_recs) - len(val_ds) if val_ds else 0),
            "tokens_per_epoch": train_ds.n_tokens,
            "response_tokens_per_epoch": train_ds.n_response_tokens,
        },
        "training": {
            "steps": state.global_step,
            "epochs": state.epoch,
            "resumed_from_step": step0 if resume_from else None,
            "tokens_seen": state.num_input_tokens_seen,  # prompt + response, no padding
            "response_tokens_trained": round(train_ds.n_response_tokens * (state.epoch or 0)),
            "seconds": seconds,  # this call (after a resume: the resumed part only)
            "seconds_total": prior + seconds,  # across resumes, as the checkpoints recorded it
            "seconds_per_step": seconds / steps_now if steps_now else None,
            "tokens_per_second": tokens_now / seconds if seconds > 0 else None,
        },
        "loss": {
            "initial_train": _first(curves["train"]),
            "final_train": _last(curves["train"]),
            "initial_val": _first(curves["val"]),
            "final_val": _last(curves["val"]),
        },
        "sparsity": {
            "before": sparsity_before["sparsity"],
            "after_merge": sparsity_after["sparsity"],
            "masked_modules": len(masks),
            "entries_reset_to_zero": restored,  # what a plain merge would have filled in
        },
        "paths": {"adapter": str(adapter_dir), "merged": str(merged_dir), "training_log": str(log_path)},
    }
    # Flat summary keys, as the API and pipeline read them.
    report.update(
        initial_loss=report["loss"]["initial_train"],
        final_loss=report["loss"]["final_train"],
        seconds=seconds,
        seconds_total=report["training"]["seconds_total"],
        tokens_trained=report["training"]["response_tokens_trained"],
    )
    atomic_write_json(out / REPORT_FILE, report)
    if not keep_checkpoints and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    return report


def _save_dir(target: Path, write) -> None:
    """Write a directory beside `target`, then swap it in: a crash never leaves half a model."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
