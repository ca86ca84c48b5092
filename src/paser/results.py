"""Typed results of the stages: what the Python API returns and the pipeline consumes.

Each is a dataclass holding the stage's report (the dict its JSON file holds) and its output
paths; `summary()` is the text the CLI prints, and `str()` of a result is that text, so
`print(api.select(...))` prints what `paser select` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class _Printable:
    def summary(self) -> str:  # pragma: no cover - every result defines it
        raise NotImplementedError

    def __str__(self) -> str:
        return self.summary()


@dataclass
class PruneResult(_Printable):
    out_dir: Path
    report: dict = field(default_factory=dict)  # pruning_report.json

    def summary(self) -> str:
        lines = [f"pruned model written to {self.out_dir} (report: {self.out_dir / 'pruning_report.json'})"]
        if self.report.get("achieved_sparsity") is not None:
            lines.append(f"achieved sparsity: {self.report['achieved_sparsity']:.4f}")
        ppl = self.report.get("perplexity") or {}
        val = lambda v: v["ppl"] if isinstance(v, dict) else v  # noqa: E731
        if ppl.get("before") is not None and ppl.get("after") is not None:
            lines.append(f"WikiText-2 perplexity: before {val(ppl['before']):.2f}, after {val(ppl['after']):.2f}")
        return "\n".join(lines)


@dataclass
class RecoveryResult(_Printable):
    out_dir: Path
    report: dict = field(default_factory=dict)  # recovery_report.json (or a rank's note in a data-parallel run)

    @property
    def merged(self) -> Path:
        return self.out_dir / "merged"

    @property
    def adapter(self) -> Path:
        return self.out_dir / "adapter"

    def summary(self) -> str:
        if "rank" in self.report:
            return f"rank {self.report['rank']}: trained its data shard; the main process writes the outputs"
        msg = f"recovered model written to {self.merged} (adapter in {self.adapter})"
        first, last = self.report.get("initial_loss"), self.report.get("final_loss")
        if first is not None and last is not None:
            msg += f"\ntraining loss {first:.3f} -> {last:.3f}"
        return msg


@dataclass
class EvaluationResult(_Printable):
    results: dict  # the results JSON: model, tasks, per-task results, summary, provenance
    out: Path | None = None

    def summary(self) -> str:
        from paser.evaluate.runner import format_results  # here: the runner imports torch

        return format_results(self.results) + (f"\nresults written to {self.out}" if self.out else "")


def unit_label(method: str, budget, seed) -> str:
    """The name of one select/recover/evaluate unit, as its stage directories, the archive and
    the report's tables use it; a budget-less row (dense, unrecovered) is named by its method."""
    return method if seed is None else f"{method}-b{budget}-s{seed}"
