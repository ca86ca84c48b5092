"""The `paser` command: parses arguments and calls the Python API; nothing else.

Every subcommand also takes `--config FILE.yaml`; options typed on the command line override
the file's values. One error boundary (`main`): a user's mistake (a `PaserError`, an I/O
error they can fix, a corrupt input file) ends with one line on stderr and exit status 2; a
bug in paser shows its traceback and asks to be reported (exit 1); a pipeline with a failed
stage exits 1 after writing its report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from paser import __version__
from paser.config import (
    EvaluateArgs,
    PruneArgs,
    RecoverArgs,
    SelectArgs,
    add_dataclass_arguments,
    build_args,
    check_outputs,
    load_yaml,
)
from paser.errors import FileError, PaserError, user_os_error

COMMANDS = {
    "prune": (PruneArgs, "prune a model (magnitude, Wanda, SparseGPT, structured)"),
    "select": (SelectArgs, "score and select recovery data (PASER and baselines)"),
    "recover": (RecoverArgs, "LoRA recovery of a pruned model on selected data"),
    "evaluate": (EvaluateArgs, "perplexity and zero-shot commonsense accuracy"),
    "estimate": (SelectArgs, "predict the cost of `paser select` with these arguments"),
}
_GLOBAL = ("command", "config", "verbose", "threads")

# Libraries that log INFO lines or warnings a user cannot act on (faiss's AVX2 probe,
# matplotlib's font cache, transformers/peft deprecations): quiet unless --verbose.
_NOISY_LOGGERS = ("faiss", "faiss.loader", "matplotlib", "transformers", "peft", "datasets", "huggingface_hub", "urllib3", "PIL", "numexpr", "sentence_transformers", "accelerate", "torch")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (argparse prints the whole usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {n})")
    return n


def _add_global_options(p: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the subcommand (`paser --threads 1 select` and `paser select
    # --threads 1`); on the subcommand they default to SUPPRESS so they never overwrite a value
    # given before it.
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and third-party messages and warnings", **default)
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch and BLAS (default: torch's choice; 1 helps on a busy machine)", **default)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paser", description="PASER: data selection for recovering pruned LLMs")
    parser.add_argument("--version", action="version", version=f"paser {__version__}")
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (cls, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", help="YAML file with option: value pairs (command-line options override it)")
        _add_global_options(p, top=False)
        add_dataclass_arguments(p, cls)
    p = sub.add_parser("pipeline", help="prune, select, recover, evaluate and report, from one YAML file")
    p.add_argument("--config", required=True, help="experiment YAML (see configs/demo.yaml)")
    p.add_argument("--out", help="output directory (overrides the file's)")
    _add_global_options(p, top=False)
    return parser


def _args_for(cls: type, ns: argparse.Namespace):
    values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    merged = dict(values)
    cli = {k: v for k, v in vars(ns).items() if k not in _GLOBAL}
    merged.update(cli)
    # Report a bad YAML key against the file, a bad CLI value against the arguments.
    build_args(cls, values, source=ns.config) if values else None
    return build_args(cls, merged, source=ns.config)


def setup_output(verbose: bool) -> None:
    """paser's own INFO lines; third-party INFO lines and warnings only with --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("paser").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    # transformers' "Loading weights" / "Writing model shards" bars, read when huggingface_hub
    # is imported; paser's own bars (scoring, training) stay.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!paser)")


def _set_threads(n: int | None) -> None:
    if not n:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)  # numpy/scipy/faiss BLAS too: oversubscribed cores crawl


def _run(ns: argparse.Namespace):
    from paser import api  # here, not at the top: `paser --help` and argument errors need none of the stages

    if ns.command == "pipeline":
        return api.pipeline(ns.config, out=ns.out)
    args = _args_for(COMMANDS[ns.command][0], ns)
    check_outputs(ns.command, args)  # before any model loads: never after an hour of work
    return getattr(api, ns.command)(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_output(bool(ns.verbose))
    prog = f"paser {ns.command}"
    try:
        _set_threads(ns.threads)
        result = _run(ns)
        if result is not None:
            print(result)  # every stage's result prints as its summary
        failed = int(getattr(result, "failed", 0) or 0)
        if failed:
            print(f"{prog}: {failed} stage(s) failed; their errors are in the report", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; cached work is kept, re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # the one error boundary
        user = as_user_error(e)
        if user is None:
            traceback.print_exc()
            print(f"{prog}: internal error ({type(e).__name__}): this is a bug in paser; please report it "
                  "to the paser issue tracker with the traceback above and the command you ran", file=sys.stderr)
            return 1
        if ns.verbose:
            traceback.print_exc()
        print(f"{prog}: error: {user}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- user errors

# Exceptions that mean "this input file is damaged" when a library raises them while reading
# one (zlib, gzip, pyarrow, safetensors, pickle, tokenizers' JSON): named by module and type so
# that the optional libraries need not be imported to recognise them.
_CORRUPT = {
    ("zlib", "error"),
    ("gzip", "BadGzipFile"),
    ("builtins", "EOFError"),
    ("builtins", "UnicodeDecodeError"),
    ("json.decoder", "JSONDecodeError"),
    ("_pickle", "UnpicklingError"),
    ("pickle", "UnpicklingError"),
    ("pyarrow.lib", "ArrowInvalid"),
    ("pyarrow.lib", "ArrowIOError"),
    ("pyarrow.lib", "ArrowException"),
    ("safetensors_rust", "SafetensorError"),
    ("builtins", "SafetensorError"),
    ("snappy", "UncompressError"),
}
_PATH_NAMES = ("path", "p", "file", "filename", "fname", "part", "src", "shard", "resolved_archive_file", "checkpoint_file")


def as_user_error(e: BaseException) -> PaserError | None:
    """The one-line user error for `e`, or None when `e` is a bug (show the traceback)."""
    if isinstance(e, PaserError):
        return e
    kind = (type(e).__module__, type(e).__name__)
    if isinstance(e, OSError) and kind not in _CORRUPT and e.errno is not None:
        return user_os_error(e)
    if kind in _CORRUPT or (isinstance(e, OSError) and e.errno is None):
        path = e.filename if isinstance(e, OSError) and e.filename else _file_in_traceback(e)
        if path is not None:
            return FileError(path, f"cannot be read: the file is corrupt or truncated ({type(e).__name__}: {_first_line(e)})")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no details"


def _file_in_traceback(e: BaseException) -> str | None:
    """The file a reader was working on when `e` was raised: the innermost frame holding a
    local named like a path that is an existing file. The readers (records, models) name their
    argument `path`; this keeps a corrupt file one clear line even where a reader forgot to
    catch its library's error."""
    tb = e.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _PATH_NAMES:
            v = frame.f_locals.get(name)
            if isinstance(v, (str, Path)) and str(v) and Path(v).is_file():
                return str(v)
    return None


if __name__ == "__main__":
    sys.exit(main())
