"""The pool a selection draws from: the user's files (or the embedded pool), optionally a seeded
subset. Its own module, so that `select.run` (the driver) and `select.estimate` (the cost
estimate) both read it without importing each other."""

from __future__ import annotations

from paser.config import SelectArgs
from paser.io.records import Record, load_pool


def pool_seed(args: SelectArgs) -> int:
    """The seed of the --limit subset: --limit-seed when given, else --seed."""
    return args.seed if args.limit_seed is None else args.limit_seed


def load_selection_pool(args: SelectArgs) -> tuple[list[Record], list[dict]]:
    """The pool: the user's files (or the embedded pool), optionally a seeded subset of N."""
    from paser.data import pool_path

    paths = args.data or [str(pool_path())]
    records, reports = load_pool(paths, skip_invalid=args.skip_invalid)
    if args.limit is not None and args.limit < len(records):
        from paser.data import pool_subset_indices

        records = [records[i] for i in pool_subset_indices(len(records), args.limit, pool_seed(args))]
    return records, [{"path": r.path, "kept": r.kept, "skipped": dict(r.skipped)} for r in reports]
