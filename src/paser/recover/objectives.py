"""The recovery objectives, one registered entry each (in the style of `paser.select.registry`).

An objective decides what LoRA recovery minimises: the dataset's answers (sft), the original
model's next-token distribution (kd), or a mix (sft+kd). Each entry declares whether it needs
the teacher's top-k targets (computed once into the cache before training, see distill.py),
which of `recover()`'s options it reads (with their help text: `paser recover --help` shows
it), how those options are checked, and how it builds its part of the training: the Trainer
class whose loss it is, the collator and the training dataset. `--objective`'s choices,
config validation, the pipeline and recovery_report.json all read this table, so adding an
objective is one `register_objective` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from paser.errors import PaserError
from paser.recover.data import ResponseCollator

DEFAULT_OBJECTIVE = "sft"


@dataclass(frozen=True)
class TrainerPiece:
    """What an objective adds to the Trainer: its class (the loss), the collator, the data."""

    trainer_cls: type
    collator: Callable
    train_data: Any


@dataclass
class ObjectiveContext:
    """What an objective's `build` may read. `options` is the run's RecoverOptions; `targets`
    the teacher's cached top-k (`paser.recover.distill.TeacherTargets`) when it needs a teacher."""

    options: Any
    pad_id: int
    pad_to_multiple_of: int | None
    train_ds: Any  # a paser.recover.data.RecoveryDataset
    targets: Any = None


@dataclass(frozen=True)
class RecoveryObjective:
    """A recovery objective.

    options: the `recover()` options (RecoverArgs fields) it reads, each with its help text;
    those values enter the run key and the report. check(options) raises PaserError on a bad
    value, before any model loads. build(ctx) -> TrainerPiece.
    """

    name: str
    help: str
    build: Callable[[ObjectiveContext], TrainerPiece]
    needs_teacher: bool = False
    options: dict[str, str] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None


RECOVERY_OBJECTIVES: dict[str, RecoveryObjective] = {}


def register_objective(name: str, help: str, *, needs_teacher: bool = False, options: dict[str, str] | None = None,
                       check: Callable[[Any], None] | None = None) -> Callable:  # fmt: skip
    """Decorator: ``@register_objective("kd", "…", needs_teacher=True, options={…})`` on ``build(ctx)``."""

    def deco(build: Callable) -> Callable:
        if name in RECOVERY_OBJECTIVES:
            raise ValueError(f"recovery objective {name!r} is registered twice")
        RECOVERY_OBJECTIVES[name] = RecoveryObjective(name, help, build, needs_teacher, dict(options or {}), check)
        return build

    return deco


def recovery_objectives() -> dict[str, RecoveryObjective]:
    # The distillation entries live beside their loss; importing the module registers them
    # (imported here, not at the top, because distill.py itself imports this module).
    import paser.recover.distill  # noqa: F401

    return RECOVERY_OBJECTIVES


def get_objective(name: str) -> RecoveryObjective:
    """The entry, or a PaserError naming the allowed objectives."""
    table = recovery_objectives()
    if name not in table:
        raise PaserError(f"recover: objective must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def option_help(option: str) -> str:
    """Help text of an objective's option for its command-line flag: "kd, sft+kd: what it does"."""
    users = [o for o in recovery_objectives().values() if option in o.options]
    if not users:
        return ""
    return f"{', '.join(o.name for o in users)}: {users[0].options[option]}"


@register_objective(DEFAULT_OBJECTIVE, "cross-entropy on the responses")
def _sft(ctx: ObjectiveContext) -> TrainerPiece:
    # the stock Trainer, exactly as before objectives existed (imported late: transformers is
    # heavy and `paser --help` reads this table)
    from transformers import Trainer

    return TrainerPiece(Trainer, ResponseCollator(ctx.pad_id, pad_to_multiple_of=ctx.pad_to_multiple_of), ctx.train_ds)
