"""The evaluation tasks, one registered entry each (in the style of lm-evaluation-harness's
`register_task`): what decides a task's numbers (its protocol, the cache key's payload), how
to compute it on a loaded model, and how to print it. `paser evaluate --tasks`, config
validation, the pipeline and the results file all read this table; adding a task is one
`register_task` call. Any lm-evaluation-harness task is reachable as `lm_eval:NAME` without
an entry (see `paser.evaluate.lm_eval_tasks`).

A result may carry a "headline" {"metric", "value", "higher_is_better"}: the report shows it
in its table of further tasks, so a registered task needs no report code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class EvalOptions:
    """Everything besides the model that a task may read."""

    limit: int | None = None
    seed: int = 0
    ppl_window: int = 512
    ppl_max_tokens: int = 16384
    batch_size: int = 8
    show_progress: bool = True
    split: str = "test"  # held-out tasks: the test records or the dev split
    reference: Any = None  # heldout_jsd: the original model (a spec or a LoadedModel)
    reference_name: str | None = None  # its name in the protocol
    cache_dir: Any = None
    include_path: Any = None  # lm_eval:NAME tasks


@dataclass(frozen=True)
class EvalTask:
    name: str
    help: str
    protocol: Callable[[str, EvalOptions], dict]
    run: Callable[[Any, str, EvalOptions], dict]  # (EvalModel, task, options) -> result dict
    format: Callable[[str, dict], list[str]] | None = None  # lines for `paser evaluate`'s output


EVAL_TASKS: dict[str, EvalTask] = {}


def register_task(name: str, help: str, protocol, run, format=None) -> None:
    if name in EVAL_TASKS:
        raise ValueError(f"evaluation task {name!r} is registered twice")
    EVAL_TASKS[name] = EvalTask(name, help, protocol, run, format)


def eval_tasks() -> dict[str, EvalTask]:
    import paser.evaluate.builtin_tasks  # noqa: F401  (registers paser's own tasks)

    return EVAL_TASKS
