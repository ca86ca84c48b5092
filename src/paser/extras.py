"""Optional parts of paser and the one message that says how to install each.

A plain `pip install paser` works on the user's own models. Reading GGUF files (the embedded
models) and lm-eval are extras; the code that needs one calls `require` first, so a user who
lacks it gets one line naming the exact command instead of an ImportError deep in a library.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from paser.errors import PaserError


@dataclass(frozen=True)
class Extra:
    name: str  # the extra in pyproject.toml
    requirement: str  # what it installs (kept equal to pyproject.toml by tests/test_install.py)
    purpose: str


EXTRAS: dict[str, Extra] = {
    "gguf": Extra("embedded", "gguf>=0.19", "reading GGUF files (the embedded models)"),
    "lm_eval": Extra("lm-eval", "lm-eval>=0.4.13,<0.5", "running lm-evaluation-harness"),
}


def install_command(module: str) -> str:
    """The exact command that installs the extra providing `module`."""
    e = EXTRAS[module]
    return f"pip install '{e.requirement}'"


def require(module: str) -> None:
    """Raise PaserError naming the extra and its pip command when `module` is not importable."""
    if importlib.util.find_spec(module) is not None:
        return
    e = EXTRAS[module]
    raise PaserError(
        f"{e.purpose} needs the optional package '{module}' (paser's extra '{e.name}'); "
        f"install it with: {install_command(module)}"
    )
