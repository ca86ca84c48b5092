"""The `paser` command: parses arguments and calls the Python API; nothing else.

Every subcommand also takes `--config FILE.yaml`; options typed on the command line override
the file's values. A user's mistake ends with one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from paser import __version__
from paser.config import (
    EvaluateArgs,
    PruneArgs,
    RecoverArgs,
    SelectArgs,
    add_dataclass_arguments,
    build_args,
    load_yaml,
)
from paser.errors import PaserError

COMMANDS = {
    "prune": (PruneArgs, "prune a model (magnitude, Wanda, SparseGPT, structured)"),
    "select": (SelectArgs, "score and select recovery data (PASER and baselines)"),
    "recover": (RecoverArgs, "LoRA recovery of a pruned model on selected data"),
    "evaluate": (EvaluateArgs, "perplexity and zero-shot commonsense accuracy"),
    "estimate": (SelectArgs, "predict the cost of `paser select` with these arguments"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paser", description="PASER: data selection for recovering pruned LLMs")
    parser.add_argument("--version", action="version", version=f"paser {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", help="YAML file with option: value pairs (command-line options override it)")
        add_dataclass_arguments(p, cls)
    p = sub.add_parser("pipeline", help="prune, select, recover, evaluate and report, from one YAML file")
    p.add_argument("--config", required=True, help="experiment YAML (see configs/demo.yaml)")
    p.add_argument("--out", help="output directory (overrides the file's)")
    return parser


def _args_for(cls: type, ns: argparse.Namespace):
    values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    merged = dict(values)
    cli = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "verbose", "threads")}
    merged.update(cli)
    # Report a bad YAML key against the file, a bad CLI value against the arguments.
    build_args(cls, values, source=ns.config) if values else None
    return build_args(cls, merged, source=ns.config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if ns.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(ns.threads)
        threadpool_limits(ns.threads)  # numpy/scipy/faiss BLAS too: oversubscribed cores crawl
    from paser import api

    try:
        if ns.command == "pipeline":
            from paser.pipeline import run_pipeline

            result = run_pipeline(ns.config, out=ns.out)
        else:
            args = _args_for(COMMANDS[ns.command][0], ns)
            result = getattr(api, ns.command)(args)
        if isinstance(result, str):
            print(result)
        return 0
    except PaserError as e:
        print(f"paser {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"paser {ns.command}: interrupted; cached work is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
