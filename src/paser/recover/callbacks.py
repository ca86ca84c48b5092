"""The Trainer callbacks of recovery: a training log written as it grows, the wall time kept
across resumes, time-based checkpoints, and a labelled progress bar.

transformers is imported inside `make_callbacks`, not at the top: the callback classes
subclass its TrainerCallback, and `paser --help` must not pay for importing it.
"""

from __future__ import annotations

import time
from pathlib import Path

from paser.io.cache import atomic_write_json

ELAPSED_FILE = "paser_elapsed.json"  # in each checkpoint: training seconds up to it, across resumes
PROGRESS_LABEL = "LoRA recovery"


def summarise_log(history: list[dict]) -> dict[str, list[dict]]:
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


LOG_WRITE_SECONDS = 10.0  # how often training_log.json is rewritten during training


def make_callbacks(log_path: Path, show_progress: bool, prior_seconds: float = 0.0, save_minutes: float = 0.0):
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
            self.t_logged = float("-inf")  # the first log event writes the file

        def on_train_begin(self, args, state, control, **kw):
            self.tokens_at_begin = state.num_input_tokens_seen
            self.t_begin = self.t_saved = time.perf_counter()
            if self.initial_eval is not None and state.global_step == 0:
                # into the Trainer's own history, so checkpoints carry it across a resume
                state.log_history.insert(0, {**self.initial_eval, "epoch": 0.0, "step": 0})

        def on_train_end(self, args, state, control, **kw):
            self.tokens_at_end = state.num_input_tokens_seen
            self.write_log(state)  # the whole curve, whatever the clock said

        def on_log(self, args, state, control, logs=None, **kw):
            # Every LOG_WRITE_SECONDS, not every step: each write rewrites the whole curve and
            # fsyncs it, which on a GPU, where a step of a small model takes milliseconds, is a
            # cost of its own; a killed run loses at most that much of the curve.
            now = time.perf_counter()
            if now - self.t_logged >= LOG_WRITE_SECONDS:
                self.write_log(state)
                self.t_logged = now

        def write_log(self, state) -> None:
            atomic_write_json(log_path, summarise_log(state.log_history))

        def on_step_end(self, args, state, control, **kw):
            # The Trainer saves by steps only; on a CPU, 100 steps can be 20 minutes of work.
            # One process only: in a data-parallel run each rank's clock would decide on its
            # own, and ranks that disagree on a save can wait on each other for ever.
            if save_minutes > 0 and args.world_size == 1 and time.perf_counter() - self.t_saved >= 60 * save_minutes:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            self.t_saved = time.perf_counter()
            self.write_log(state)  # a checkpoint and the curve up to it go together
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
