"""The one place per selection variant: methods, budget-allocation rules, within-cluster rankings.

In the style of lm-evaluation-harness's `register_task`: each variant is one entry that says
what it needs and which function runs it. The CLI's choices, config validation, `paser
estimate`, the pipeline and the report all read these tables, so adding a variant is one
`register_*` call next to its function (see `paser.select.methods` for the methods,
`paser.select.budget` / `paser.select.efficiency` for the rules and rankings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class SelectionMethod:
    """A data-selection method and what it costs to run.

    needs_*: which artifacts the driver must build before calling ``run`` (the original and
    the pruned model, sentence embeddings, S2RIC clusters). ``scoring_passes``: forward
    passes per record through each model it scores with (for `paser estimate`).
    ``scores_original``: whether scoring also runs the original model (PASER's JSD).
    ``run(ctx) -> (selected indices, decisions or None)``, ctx a `paser.select.methods.Context`.
    """

    name: str
    help: str
    run: Callable
    needs_pruned: bool = False
    needs_original: bool = False
    needs_embeddings: bool = False
    needs_clusters: bool = False
    scoring_passes: int = 0
    shares_scoring: bool = False  # its scores can be computed by several processes (accelerate)
    score_share: Callable | None = None  # (args, records, models, cache, rank, world) -> None


@dataclass(frozen=True)
class Rule:
    """A named function with help text: a budget-allocation rule or a within-cluster ranking."""

    name: str
    help: str
    fn: Callable


SELECTION_METHODS: dict[str, SelectionMethod] = {}
ALLOCATION_RULES: dict[str, Rule] = {}
RANKINGS: dict[str, Rule] = {}


def register_method(name: str, help: str, **needs) -> Callable:
    """Decorator: ``@register_method("paser", "…", needs_pruned=True, …)`` on ``run(ctx)``."""

    def deco(fn: Callable) -> Callable:
        if name in SELECTION_METHODS:
            raise ValueError(f"selection method {name!r} is registered twice")
        SELECTION_METHODS[name] = SelectionMethod(name, help, fn, **needs)
        return fn

    return deco


def register_rule(table: dict[str, Rule], name: str, help: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = Rule(name, help, fn)
        return fn

    return deco


def _load() -> None:
    # The entries live beside their functions; importing the modules registers them.
    import paser.select.budget  # noqa: F401  (allocation rules)
    import paser.select.efficiency  # noqa: F401  (rankings)
    import paser.select.methods  # noqa: F401  (selection methods)


def selection_methods() -> dict[str, SelectionMethod]:
    _load()
    return SELECTION_METHODS


def allocation_rules() -> dict[str, Rule]:
    _load()
    return ALLOCATION_RULES


def rankings() -> dict[str, Rule]:
    _load()
    return RANKINGS


def get(table: dict, name: str, what: str):
    """The entry, or a PaserError naming the option's allowed values."""
    from paser.errors import PaserError

    _load()
    if name not in table:
        raise PaserError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}")
    return table[name]


def choices_help(table: dict) -> str:
    """'name: help; name: help' for an option's help text."""
    return "; ".join(f"{r.name}: {r.help}" for r in table.values())
