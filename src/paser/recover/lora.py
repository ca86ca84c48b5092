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

The stage runs in five steps, each a function below: plan (check the options, load the model,
encode the data, fix the run key: a RecoverPlan), resume (return a finished run's report, or
find the checkpoint to continue), train (the objective's Trainer on a LoRA model: a
TrainingSetup), merge (adapter and merged model, each swapped in whole), report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paser.errors import PaserError
from paser.io import adapter
from paser.io.cache import atomic_write_dir, atomic_write_json, default_cache_dir, stable_hash
from paser.io.models import (
    LoadedModel,
    _cached_dir_fingerprint,
    check_same_tokenizer,
    default_dtype,
    fingerprint_directory,
    load_model,
    resolve_model_path,
)
from paser.io.records import Record
from paser.recover.callbacks import ELAPSED_FILE, make_callbacks, summarise_log
from paser.recover.data import RecoveryDataset, encode_records, split_validation
from paser.recover.distill import TeacherTargets, open_or_build_teacher_targets, teacher_cache_key
from paser.recover.merge import linear_sparsity, merge_keep_sparsity, sparsity_masks
from paser.recover.objectives import DEFAULT_OBJECTIVE, ObjectiveContext, RecoveryObjective, get_objective

log = logging.getLogger(__name__)

REPORT_FILE = "recovery_report.json"
LOG_FILE = "training_log.json"
RUN_FILE = "run.json"  # the key of the run that owns checkpoints/, so a resume never mixes runs
# benchmarks/kd_topk.py, SmolLM2-135M vs its Wanda-50 % prune, 40 pool records, T = 1: k = 64
# keeps 95.1 % of the teacher's mass (5th percentile 78 %), 94 % of the full-vocabulary KL, and
# its gradient is within 1.8 % of the full KL's (cosine 0.9998); k = 256 gains 0.6 % gradient
# error for 4x the cache (0.49 MB per 1,000 response tokens at k = 64).
DEFAULT_KD_TOPK = 64
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
# the package each Trainer integration imports (transformers checks these names itself)
_REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


# ----------------------------------------------------------------------------- LoRA targets


def lora_target_modules(model: nn.Module) -> tuple[str, list[str]]:
    """(peft `target_modules` regex, sorted leaf names) for every nn.Linear in a decoder layer.

    Detected, not hard-coded, so LLaMA (q_proj … down_proj), Gemma-3 and any decoder whose
    linears sit inside numbered layers work; the LM head and embeddings are never targeted.
    Only the text decoder's linears count: a multimodal checkpoint (Gemma-3 4B+) also has a
    vision tower whose layers carry the same projection names.
    """
    prefix = adapter.decoder_prefix(model)
    out_emb = adapter.lm_head(model)
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
    return report_to


@contextlib.contextmanager
def offline_logging(report_to: str):
    """WANDB_MODE=offline while one run trains, unless the user set WANDB_MODE (their opt-in to
    a network): paser never needs one. wandb reads the mode only from the environment when the
    Trainer starts it, so it is set here for the run and removed after, not for the process."""
    if report_to != "wandb" or "WANDB_MODE" in os.environ:
        yield
        return
    os.environ["WANDB_MODE"] = "offline"
    try:
        yield
    finally:
        os.environ.pop("WANDB_MODE", None)


def _vocab_size(model: nn.Module) -> int:
    """Rows of the LM head: the size of the distribution the model predicts."""
    head = adapter.lm_head(model)
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    return stable_hash([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])


def _teacher_identity(teacher: str, device: torch.device, allow_pickle: bool) -> tuple[str, str]:
    """(fingerprint, dtype) of the teacher as load_model would load it, without loading its
    weights when it is an embedded name or a local model directory (the cached-teacher path)."""
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


# ----------------------------------------------------------------------------- options and plan


@dataclass
class RecoverOptions:
    """Every setting of `recover()` (its keyword arguments), with the defaults of the reference
    training code. What each one does is in `recover`'s docstring."""

    template: str = "alpaca"
    cutoff: int = 256
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    epochs: float = 2
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    val_fraction: float = 0.0
    val_records: Sequence[Record] | None = None
    save_steps: int = 100
    save_minutes: float = 10.0
    eval_steps: int | None = None
    resume: bool = True
    max_steps: int | None = None
    warmup: float = 0.03
    group_by_length: bool = False
    gradient_checkpointing: bool = False
    keep_checkpoints: bool = False
    show_progress: bool = True
    allow_pickle: bool = False
    callbacks: Sequence[Any] = ()
    objective: str = DEFAULT_OBJECTIVE
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    kd_topk: int = DEFAULT_KD_TOPK
    teacher: str = "smollm2-135m"
    save_dtype: str = "auto"
    report_to: str = "none"
    cache_dir: str | os.PathLike | None = None

    @classmethod
    def from_args(cls, args: Any) -> RecoverOptions:
        """The options an argument object (RecoverArgs) names; the rest keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


@dataclass
class RecoverPlan:
    """One run, decided before any training: the loaded model, its data, its settings, and the
    run key that names them (a resume continues only checkpoints of the same key)."""

    model_spec: str
    records: Sequence[Record]
    out: Path
    opts: RecoverOptions
    objective: RecoveryObjective
    lm: LoadedModel
    dtype: torch.dtype  # the dtype training runs in (never float16)
    device: torch.device
    pad_id: int
    train_recs: list[Record]
    val_recs: list[Record]
    train_ds: RecoveryDataset
    val_ds: RecoveryDataset | None
    target_regex: str
    eval_steps: int
    config: dict  # the training settings, as the run key and the report record them
    run_key: str
    kd_key: dict | None = None  # names the teacher's cache entry (objectives that need a teacher)
    kd_info: dict | None = None  # the same dict as config["kd"]: the report adds cache facts to it

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE


def check_options(o: RecoverOptions, records: Sequence[Record]) -> RecoveryObjective:
    """Every check that needs no model, so that a bad option fails before one loads."""
    if not records:
        raise PaserError("recover: no records to train on")
    if o.epochs <= 0 and not o.max_steps:
        raise PaserError(f"recover: epochs must be > 0, got {o.epochs}")
    for name in ("batch_size", "grad_accum", "cutoff", "r", "save_steps"):
        if getattr(o, name) < 1:
            raise PaserError(f"recover: {name} must be >= 1, got {getattr(o, name)}")
    if o.save_minutes < 0:
        raise PaserError(f"recover: save_minutes must be >= 0, got {o.save_minutes}")
    if o.val_records is not None and o.val_fraction:
        raise PaserError("recover: give either val_fraction or val_records, not both")
    objective = get_objective(o.objective)
    if objective.check is not None:
        objective.check(o)
    resolve_save_dtype(o.save_dtype, None, torch.float32)
    _report_integration(o.report_to)
    return objective


def _encode(o: RecoverOptions, records: Sequence[Record], tok) -> tuple[list, list, RecoveryDataset, RecoveryDataset | None]:
    """(training records, validation records, their encoded datasets)."""
    if o.val_records is not None:
        train_recs, val_recs = list(records), list(o.val_records)
    else:
        train_recs, val_recs = split_validation(records, o.val_fraction, o.seed)
    train_ds = encode_records(train_recs, tok, o.template, o.cutoff)
    val_ds = encode_records(val_recs, tok, o.template, o.cutoff) if val_recs else None
    return train_recs, val_recs, train_ds, val_ds


def _eval_steps(o: RecoverOptions, n_train: int) -> int:
    """The validation interval: the one given, else about 10 evaluations per run."""
    if o.eval_steps is not None:
        return o.eval_steps
    steps_per_epoch = math.ceil(math.ceil(n_train / o.batch_size) / o.grad_accum)
    total_steps = int(o.max_steps) if o.max_steps else math.ceil(steps_per_epoch * o.epochs)
    return max(1, total_steps // 10)


def _training_config(o: RecoverOptions, eval_steps: int, target_names: list[str]) -> dict:
    # Every key here is in the run key: renaming or adding one would orphan users' checkpoints.
    return {
        "template": o.template, "cutoff": o.cutoff, "r": o.r, "alpha": o.alpha, "dropout": o.dropout, "lr": o.lr,
        "epochs": o.epochs, "batch_size": o.batch_size, "grad_accum": o.grad_accum, "seed": o.seed,
        "max_steps": o.max_steps, "warmup": o.warmup, "group_by_length": o.group_by_length,
        "val_fraction": o.val_fraction, "eval_steps": eval_steps, "target_modules": target_names,
        "scheduler": "linear", "optimizer": "adamw_torch", "max_grad_norm": 1.0,
    }  # fmt: skip


def _teacher_plan(o: RecoverOptions, objective: RecoveryObjective, train_ds: RecoveryDataset, tok, device) -> tuple[dict, dict]:
    """(the teacher cache's key, the run's kd record) for an objective that needs a teacher."""
    teacher_fp, teacher_dtype = _teacher_identity(o.teacher, device, o.allow_pickle)
    kd_key = teacher_cache_key(
        teacher_fingerprint=teacher_fp, teacher_dtype=teacher_dtype, ids=train_ds.ids, examples=train_ds.examples,
        template=o.template, cutoff=o.cutoff, k=o.kd_topk, temperature=o.kd_temperature, tokenizer_key=_tokenizer_key(tok),
    )  # fmt: skip
    kd_info = {"weight": o.kd_weight if "kd_weight" in objective.options else None, "temperature": o.kd_temperature,
               "topk": o.kd_topk, "teacher": o.teacher, "teacher_fingerprint": teacher_fp,
               "teacher_cache": stable_hash(kd_key)}  # fmt: skip
    return kd_key, kd_info


def plan_run(model_spec: str, records: Sequence[Record], out_dir: str | os.PathLike, o: RecoverOptions,
             objective: RecoveryObjective) -> RecoverPlan:  # fmt: skip
    """Load the model, encode the data, and fix the settings and the run key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(model_spec, allow_pickle=o.allow_pickle)
    model, tok = lm.model, lm.tokenizer
    dtype = _training_dtype(model)
    device = next(model.parameters()).device
    pad_id = adapter.pad_id(tok, strict=True, name=model_spec)  # strict: labels are built beside it
    train_recs, val_recs, train_ds, val_ds = _encode(o, records, tok)
    target_regex, target_names = lora_target_modules(model)
    eval_steps = _eval_steps(o, len(train_ds))
    config = _training_config(o, eval_steps, target_names)
    kd_key = kd_info = None
    if objective.needs_teacher:
        kd_key, kd_info = _teacher_plan(o, objective, train_ds, tok, device)
    # The default objective adds nothing to the key, so an sft run keeps the key (and resumes
    # the checkpoints) it had before objectives existed; any other names itself and its options.
    if objective.name != DEFAULT_OBJECTIVE:
        config["objective"] = objective.name
        if kd_info is not None:
            config["kd"] = kd_info
        elif objective.options:
            config["options"] = {k: getattr(o, k) for k in objective.options}
    key_parts = {"model": lm.fingerprint, "train": train_ds.ids, "val": val_ds.ids if val_ds else [],
                 "config": config, "dtype": str(dtype)}  # fmt: skip
    return RecoverPlan(
        model_spec=model_spec, records=records, out=out, opts=o, objective=objective, lm=lm, dtype=dtype, device=device,
        pad_id=pad_id, train_recs=train_recs, val_recs=val_recs, train_ds=train_ds, val_ds=val_ds,
        target_regex=target_regex, eval_steps=eval_steps, config=config, run_key=stable_hash(key_parts),
        kd_key=kd_key, kd_info=kd_info,
    )  # fmt: skip


# ----------------------------------------------------------------------------- resume


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


def finished_report(plan: RecoverPlan) -> dict | None:
    """The stored report when out_dir already holds this run's finished result."""
    old = _read_json(plan.out / REPORT_FILE)
    if plan.opts.resume and old and old.get("run_key") == plan.run_key and (plan.out / "merged" / "config.json").exists():
        return old
    return None


def claim_checkpoints(plan: RecoverPlan) -> str | None:
    """The checkpoint to resume from (None: a fresh start), after making checkpoints/ this run's.

    Checkpoints of another run key are refused, not deleted: they may be hours of someone's
    training, and only --no-resume may throw them away.
    """
    resume_from = None
    if plan.opts.resume:
        last = _last_checkpoint(plan.ckpt_dir)
        if last is not None:
            owner = (_read_json(plan.out / RUN_FILE) or {}).get("run_key")
            if owner != plan.run_key:
                raise PaserError(
                    f"{plan.ckpt_dir} holds checkpoints of a different run (other model, data or settings); "
                    "use another output directory, or resume=False (--no-resume) to start over"
                )
            resume_from = last
    elif plan.ckpt_dir.exists():
        shutil.rmtree(plan.ckpt_dir)
    if resume_from is None:
        plan.log_path.unlink(missing_ok=True)  # a fresh start: no curve of an earlier run mixed in
    atomic_write_json(plan.out / RUN_FILE, {"run_key": plan.run_key, "model": plan.model_spec, "config": plan.config})
    return resume_from


# ----------------------------------------------------------------------------- train


def teacher_targets(plan: RecoverPlan) -> TeacherTargets | None:
    """The teacher's cached top-k (built now when missing) for an objective that needs them."""
    if not plan.objective.needs_teacher:
        return None
    o, model, tok, device = plan.opts, plan.lm.model, plan.lm.tokenizer, plan.device
    vocab = _vocab_size(model)

    def load_teacher():
        t = load_model(o.teacher, allow_pickle=o.allow_pickle)
        check_same_tokenizer(t.tokenizer, tok, "teacher", "pruned")
        if _vocab_size(t.model) != vocab:
            raise PaserError(f"recover: the teacher {o.teacher} predicts {_vocab_size(t.model)} tokens, the pruned model {vocab}")
        log.info("recover: computing the teacher's top-%d log-probabilities once (%d examples)", o.kd_topk, len(plan.train_ds))
        return t.model

    entry = (Path(o.cache_dir) if o.cache_dir else default_cache_dir()) / "teacher" / plan.kd_info["teacher_cache"]
    # On an accelerator the pruned model waits on the CPU while the teacher runs, so the
    # device never holds both; the teacher is gone before training starts.
    if device.type != "cpu":
        model.to("cpu")
    try:
        targets, built = open_or_build_teacher_targets(entry, plan.kd_key, plan.train_ds.examples, vocab, load_teacher)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if device.type != "cpu":
            model.to(device)
    plan.kd_info.update(teacher_cache_dir=str(entry), teacher_cache_built=built, teacher_k_stored=targets.k)
    return targets


@dataclass
class TrainingSetup:
    """The model under training and what the report later needs of its start."""

    peft_model: Any
    trainer: Any
    log_writer: Any
    masks: dict  # zero masks of the pruned weights, taken before any adapter touched the model
    sparsity_before: dict
    n_trainable: int
    resume_from: str | None
    prior_seconds: float  # training time before the checkpoint resumed from


def _checkpointing_kwarg(training_args_cls, on: bool) -> dict[str, bool]:
    """transformers renamed TrainingArguments' gradient_checkpointing to activation_checkpointing
    after 5.17; paser supports both, so that it installs beside llm-compressor (transformers<=5.17)."""
    import inspect

    params = inspect.signature(training_args_cls.__init__).parameters
    return {"activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing": on}


def _training_arguments(plan: RecoverPlan):
    # transformers is imported here, not at the top: `paser --help` must not pay for it
    from transformers import TrainingArguments

    o, val = plan.opts, plan.val_ds is not None
    extra_args: dict[str, Any] = {}
    if o.report_to == "tensorboard":
        extra_args["logging_dir"] = str(plan.out / "tensorboard")
    return TrainingArguments(
        output_dir=str(plan.ckpt_dir),
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        num_train_epochs=float(o.epochs) if o.epochs > 0 else 1.0,
        max_steps=int(o.max_steps) if o.max_steps else -1,
        learning_rate=o.lr,
        lr_scheduler_type="linear",
        warmup_steps=o.warmup,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=plan.dtype == torch.bfloat16,  # autocast, so the float32 LoRA weights meet bf16 base weights
        fp16=False,
        seed=o.seed,
        data_seed=o.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=o.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if val else "no",
        eval_steps=plan.eval_steps if val else None,
        train_sampling_strategy="group_by_length" if o.group_by_length else "random",
        **_checkpointing_kwarg(TrainingArguments, o.gradient_checkpointing),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=o.report_to,
        ddp_find_unused_parameters=False,  # LoRA uses every adapter in every step
        disable_tqdm=not o.show_progress,
        dataloader_pin_memory=plan.device.type == "cuda",
        use_cpu=plan.device.type == "cpu",
        **extra_args,
    )


def build_training(plan: RecoverPlan, resume_from: str | None, targets: TeacherTargets | None) -> TrainingSetup:
    """LoRA on the pruned model, and the Trainer whose loss is the objective's."""
    # peft and transformers are imported here, not at the top: `paser --help` must not pay for them
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, ProgressCallback, set_seed

    o, model = plan.opts, plan.lm.model
    masks = sparsity_masks(model)
    sparsity_before = linear_sparsity(model)
    set_seed(o.seed)  # the LoRA A matrices are initialised randomly: make them reproducible
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache during training (and no warning about it)
    lora_cfg = LoraConfig(
        r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=plan.target_regex, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, lora_cfg)
    if o.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    args = _training_arguments(plan)
    prior = (_read_json(Path(resume_from) / ELAPSED_FILE) or {}).get("seconds", 0.0) if resume_from else 0.0
    log_writer, progress = make_callbacks(plan.log_path, o.show_progress, prior_seconds=float(prior), save_minutes=o.save_minutes)
    ctx = ObjectiveContext(options=o, pad_id=plan.pad_id, pad_to_multiple_of=8 if plan.device.type == "cuda" else None,
                           train_ds=plan.train_ds, targets=targets)  # fmt: skip
    piece = plan.objective.build(ctx)
    trainer = piece.trainer_cls(
        model=peft_model,
        args=args,
        train_dataset=piece.train_data,
        eval_dataset=plan.val_ds,
        data_collator=piece.collator,
        callbacks=[log_writer, *o.callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress is not None:
        trainer.add_callback(progress)
    return TrainingSetup(peft_model, trainer, log_writer, masks, sparsity_before, n_trainable, resume_from, prior)


@dataclass
class TrainingOutcome:
    seconds: float  # this call's training time (after a resume: the resumed part only)
    step0: int  # the step training resumed from (0 for a fresh start)
    curves: dict[str, list[dict]]


def train(plan: RecoverPlan, setup: TrainingSetup) -> TrainingOutcome:
    """Train (from the checkpoint, if any), with a validation loss at the start and the end."""
    with offline_logging(plan.opts.report_to):
        return _train(plan, setup)


def _train(plan: RecoverPlan, setup: TrainingSetup) -> TrainingOutcome:
    trainer, resume_from = setup.trainer, setup.resume_from
    if plan.val_ds is not None and resume_from is None:
        setup.log_writer.initial_eval = trainer.evaluate()  # validation loss before training: step 0 of the curve
    t0 = time.perf_counter()
    step0 = 0
    if resume_from is not None:
        log.info("recover: resuming from %s", resume_from)
        step0 = int(Path(resume_from).name.rsplit("-", 1)[-1])
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - t0
    state = trainer.state
    if plan.val_ds is not None:
        last_eval_step = max((h["step"] for h in state.log_history if "eval_loss" in h), default=-1)
        if last_eval_step != state.global_step:
            trainer.evaluate()  # the final validation loss, when the schedule did not end on one
    return TrainingOutcome(seconds, step0, summarise_log(state.log_history))


# ----------------------------------------------------------------------------- merge


@dataclass
class SavedModel:
    adapter_dir: Path
    merged_dir: Path
    dtype: torch.dtype  # the dtype merged/ was written in
    sparsity_after: dict
    restored: int  # zeros a plain merge would have filled in, reset


def save_outputs(plan: RecoverPlan, setup: TrainingSetup) -> SavedModel:
    """Adapter, then the merged model (masks re-applied), each written whole or not at all."""
    lm, tok, peft_model = plan.lm, plan.lm.tokenizer, setup.peft_model
    adapter_dir = plan.out / "adapter"
    # peft records the path the base was loaded from, which may be relative to the current
    # directory ("runs/x"); the resolved path loads from anywhere (a hub id stays as it is).
    base_path = str(Path(lm.path).resolve()) if lm.path else plan.model_spec
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = base_path
    atomic_write_dir(adapter_dir, lambda d: (peft_model.save_pretrained(d), tok.save_pretrained(d)))
    merged, restored = merge_keep_sparsity(peft_model, setup.masks)
    if hasattr(merged.config, "use_cache"):
        merged.config.use_cache = True
    out_dtype = resolve_save_dtype(plan.opts.save_dtype, _config_dtype(lm.path), plan.dtype)
    if out_dtype != next(merged.parameters()).dtype:
        merged.to(out_dtype)  # exact zeros stay exact zeros in every float dtype
    sparsity_after = linear_sparsity(merged)

    def write_merged(d: Path) -> None:
        merged.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        atomic_write_json(
            d / "paser_model.json",
            {"name": f"{lm.name}+lora", "fingerprint": fingerprint_directory(d), "recovered_from": lm.fingerprint},
        )

    merged_dir = plan.out / "merged"
    atomic_write_dir(merged_dir, write_merged)
    return SavedModel(adapter_dir, merged_dir, out_dtype, sparsity_after, restored)


# ----------------------------------------------------------------------------- report


def build_report(plan: RecoverPlan, setup: TrainingSetup, outcome: TrainingOutcome, saved: SavedModel) -> dict:
    """What recovery_report.json holds: the run's identity, data, cost, losses and sparsity."""
    o, state, curves, seconds = plan.opts, setup.trainer.state, outcome.curves, outcome.seconds
    train_ds, val_ds, lw = plan.train_ds, plan.val_ds, setup.log_writer
    steps_now = state.global_step - outcome.step0
    tokens_now = lw.tokens_at_end - lw.tokens_at_begin
    dropped = len(plan.train_recs) - len(train_ds) + (len(plan.val_recs) - len(val_ds) if val_ds else 0)
    report = {
        "run_key": plan.run_key,
        "model": plan.model_spec,
        "model_fingerprint": plan.lm.fingerprint,
        "device": str(plan.device),
        "dtype": str(plan.dtype).replace("torch.", ""),
        "config": plan.config,
        "objective": plan.objective.name,
        "kd": plan.kd_info,  # null for objectives without a teacher
        "save_dtype": str(saved.dtype).replace("torch.", ""),
        "report_to": o.report_to,
        "trainable_parameters": setup.n_trainable,
        "data": {
            "records": len(plan.records),
            "train_examples": len(train_ds),
            "val_examples": len(val_ds) if val_ds else 0,
            "dropped_no_response": dropped,
            "tokens_per_epoch": train_ds.n_tokens,
            "response_tokens_per_epoch": train_ds.n_response_tokens,
        },
        "training": {
            "steps": state.global_step,
            "epochs": state.epoch,
            "resumed_from_step": outcome.step0 if setup.resume_from else None,
            "tokens_seen": state.num_input_tokens_seen,  # prompt + response, no padding
            "response_tokens_trained": round(train_ds.n_response_tokens * (state.epoch or 0)),
            "seconds": seconds,  # this call (after a resume: the resumed part only)
            "seconds_total": setup.prior_seconds + seconds,  # across resumes, as the checkpoints recorded it
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
            "before": setup.sparsity_before["sparsity"],
            "after_merge": saved.sparsity_after["sparsity"],
            "masked_modules": len(setup.masks),
            "entries_reset_to_zero": saved.restored,  # what a plain merge would have filled in
        },
        "paths": {"adapter": str(saved.adapter_dir), "merged": str(saved.merged_dir), "training_log": str(plan.log_path)},
    }
    # Flat summary keys, as the API and pipeline read them.
    report.update(
        initial_loss=report["loss"]["initial_train"],
        final_loss=report["loss"]["final_train"],
        seconds=seconds,
        seconds_total=report["training"]["seconds_total"],
        tokens_trained=report["training"]["response_tokens_trained"],
    )
    return report


# ----------------------------------------------------------------------------- the stage


def recover(
    model_spec: str,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    options: RecoverOptions | None = None,
    **kwargs: Any,
) -> dict:
    """LoRA-recover `model_spec` on `records`; write adapter/, merged/, logs and a report into out_dir.

    The settings come as a RecoverOptions, or as its fields by keyword (not both):
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
    objective: a registered recovery objective (`paser.recover.objectives`): "sft"
    (cross-entropy on the responses), "kd" (T²·KL from `teacher`, the original model, on the
    same tokens) or "sft+kd" ((1 − kd_weight)·CE + kd_weight·T²·KL); see recover/distill.py.
    The teacher's top-`kd_topk` log-probabilities at temperature `kd_temperature` are computed
    once into `cache_dir`/teacher/ (default: $PASER_CACHE) and the teacher is freed before
    training. Validation loss is the response CE for every objective.
    save_dtype: dtype of merged/ ("auto": the dtype the model's config.json names).
    report_to: "none", "tensorboard" or "wandb" (offline unless WANDB_MODE is set).
    Returns the report that recovery_report.json holds.
    """
    if options is not None and kwargs:
        raise TypeError("recover: give a RecoverOptions or keyword settings, not both")
    o = options if options is not None else RecoverOptions(**kwargs)
    objective = check_options(o, records)
    plan = plan_run(model_spec, records, out_dir, o, objective)
    done = finished_report(plan)
    if done is not None:
        log.info("recover: %s already holds this run's result; nothing to do", plan.out)
        return done
    resume_from = claim_checkpoints(plan)
    setup = build_training(plan, resume_from, teacher_targets(plan))
    outcome = train(plan, setup)
    if not setup.trainer.is_world_process_zero():
        # Data-parallel run (`accelerate launch`): every rank trained its shard of each batch and
        # holds the same synchronised weights; only the main process writes the outputs.
        return {"rank": setup.trainer.args.process_index, "steps": setup.trainer.state.global_step, "seconds": outcome.seconds}
    atomic_write_json(plan.log_path, outcome.curves)
    report = build_report(plan, setup, outcome, save_outputs(plan, setup))
    atomic_write_json(plan.out / REPORT_FILE, report)
    if not o.keep_checkpoints and plan.ckpt_dir.exists():
        shutil.rmtree(plan.ckpt_dir)
    return report
