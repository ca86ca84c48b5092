"""paser's own evaluation tasks as registry entries: perplexity on WikiText-2 and PTB, held-out
response loss, held-out JSD to the original model, and the 7 commonsense tasks.

Each task's code is imported when the task runs, not here: registering the tasks (which any
task-name check does) then costs no torch import and no scorer.
"""

from __future__ import annotations

import os

from paser.data import COMMONSENSE_TASKS
from paser.errors import PaserError
from paser.evaluate.registry import EvalOptions, register_task

# ----------------------------------------------------------------------------- perplexity


def _ppl_protocol(task: str, o: EvalOptions) -> dict:
    return {"task": task, "protocol": "ppl-v1:non-overlapping-windows", "window": o.ppl_window, "max_tokens": o.ppl_max_tokens}


def _ppl_run(em, task: str, o: EvalOptions) -> dict:
    from paser.score.perplexity import corpus_perplexity

    r = corpus_perplexity(em.model, em.tokenizer, task, window=o.ppl_window, max_tokens=o.ppl_max_tokens,
                          batch_size=max(1, o.batch_size // 2), show_progress=o.show_progress)
    return r.to_dict()


def _ppl_format(task: str, r: dict) -> list[str]:
    return [f"  {task:<14} perplexity {r['ppl']:.2f} (window {r['window']}, {r['n_tokens']} tokens)"]


for _name, _help in (("wikitext2", "WikiText-2 test perplexity"), ("ptb", "PTB test perplexity")):
    register_task(_name, _help, _ppl_protocol, _ppl_run, _ppl_format)

# ----------------------------------------------------------------------------- held-out


def _heldout_protocol(task: str, o: EvalOptions, template: str = "alpaca", cutoff: int = 256) -> dict:
    from paser.evaluate import heldout

    proto = {"task": task, "protocol": heldout.PROTOCOL if task == "heldout" else heldout.JSD_PROTOCOL,
             "limit": o.limit, "seed": o.seed, "template": template, "cutoff": cutoff}
    if o.split != "test":  # named only when not the default, so earlier cache keys stand
        proto["split"] = o.split
    if task == "heldout_jsd":
        proto["reference"] = o.reference_name
    return proto


def _heldout_run(em, task: str, o: EvalOptions) -> dict:
    from paser.evaluate import heldout

    return heldout.heldout_loss(em.model, em.tokenizer, limit=o.limit, seed=o.seed, split=o.split, batch_size=o.batch_size,
                                show_progress=o.show_progress)


def _heldout_format(task: str, r: dict) -> list[str]:
    caps = ", ".join(f"{c} {v['loss']:.3f}±{v['loss_stderr']:.3f}" for c, v in r["capabilities"].items())
    return [f"  {task:<14} response loss (nats): {caps}"]


_REFERENCES: dict[str, object] = {}  # reference models of heldout_jsd, loaded once per process


def reference_model(spec):
    """The original model that heldout_jsd measures against (a LoadedModel, or loaded by spec once)."""
    from paser.io.models import load_model

    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if str(spec) not in _REFERENCES:
        _REFERENCES.clear()  # one at a time: a 135M model is 0.5 GB
        _REFERENCES[str(spec)] = load_model(str(spec))
    return _REFERENCES[str(spec)]


def _jsd_run(em, task: str, o: EvalOptions) -> dict:
    from paser.evaluate import heldout

    if o.reference is None:
        raise PaserError("heldout_jsd needs the original model to compare with (--reference MODEL)")
    return heldout.heldout_jsd(em, reference_model(o.reference), limit=o.limit, seed=o.seed, split=o.split,
                               cache_dir=o.cache_dir, show_progress=o.show_progress)


def _jsd_format(task: str, r: dict) -> list[str]:
    caps = ", ".join(f"{c} {v['jsd']:.4f}±{v['jsd_stderr']:.4f}" for c, v in r["capabilities"].items())
    return [f"  {task:<14} JSD to {r['reference']['name']}: {caps}"]


register_task("heldout", "response loss per capability on the 600 held-out records (or the dev split)",
              _heldout_protocol, _heldout_run, _heldout_format)
register_task("heldout_jsd", "JSD to the original model (--reference) on the held-out responses",
              _heldout_protocol, _jsd_run, _jsd_format)

# ----------------------------------------------------------------------------- commonsense


def _cs_protocol(task: str, o: EvalOptions) -> dict:
    from paser.evaluate import zeroshot

    return {"task": task, "protocol": zeroshot.PROTOCOL, "limit": o.limit, "seed": o.seed}


def _cs_run(em, task: str, o: EvalOptions) -> dict:
    from paser.evaluate import zeroshot

    r = zeroshot.evaluate_task(em.model, em.tokenizer, task, limit=o.limit, seed=o.seed, batch_size=o.batch_size,
                               show_progress=o.show_progress)
    # with the per-item log-likelihoods ("items"), which paired comparisons between models use
    return r.to_dict(with_items=True)


def _cs_format(task: str, r: dict) -> list[str]:
    return [f"  {task:<14} acc {r['acc']:.3f}±{r['acc_stderr']:.3f}  acc_norm {r['acc_norm']:.3f}±{r['acc_norm_stderr']:.3f}  (n={r['n']})"]


for _name in COMMONSENSE_TASKS:
    register_task(_name, f"{_name}: zero-shot multiple choice by log-likelihood (acc, acc_norm as lm-eval)", _cs_protocol, _cs_run, _cs_format)
