"""Streaming ingestion: a pool of millions of records loaded, deduplicated and stored without
ever holding all records in memory.

Records flow line by line (JSONL, optionally gzipped) or batch by batch (parquet) through the
same validation as `load_records`, and leave as parquet shards of normalised records. Only the
set of seen ids stays in memory: one 64-bit integer per record (the first 16 hex digits of the
content hash), about 70 bytes each in a Python set, so 2.6M records cost ~180 MB instead of the
gigabytes their text would.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from paser.errors import InputError
from paser.io.cache import atomic_write_json, write_parquet_atomic
from paser.io.records import Record, _default_source, _dumps, _iter_parquet, iter_jsonl_lines, load_records, normalise

RECORD_COLUMNS = ("id", "instruction", "input", "output", "source", "extra", "row")


def _row_json(r: Record) -> str:
    return _dumps(r.raw) if r.raw is not None else ""


def _iter_jsonl(path: Path, skip_invalid: bool, skipped: Counter) -> Iterator[tuple[int, object]]:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")

    def numbered() -> Iterator[tuple[int, str]]:
        lineno = 0
        with raw, io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="\n") as f:
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise InputError(str(path), f"not UTF-8 text ({e.reason})", line=lineno + 1) from None
                if not line:
                    return
                lineno += 1
                yield lineno, line

    yield from iter_jsonl_lines(numbered(), path, skip_invalid, skipped)


def iter_records(path: str | os.PathLike, skip_invalid: bool = False, skipped: Counter | None = None) -> Iterator[Record]:
    """Records of one file, one at a time. JSONL(.gz) and parquet stream; other formats (a JSON
    array, a saved dataset) are small enough in practice to load whole first."""
    p = Path(path)
    skipped = skipped if skipped is not None else Counter()
    name = p.name.lower()
    source = _default_source(p)
    if p.is_file() and (name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".ndjson")):
        rows: Iterable[tuple[int | None, object]] = _iter_jsonl(p, skip_invalid, skipped)
    elif p.is_file() and name.endswith(".parquet"):
        rows = _iter_parquet(p)
    else:
        recs, rep = load_records(p, skip_invalid=skip_invalid)
        skipped.update(rep.skipped)
        yield from recs
        return
    for line, obj in rows:
        try:
            yield normalise(obj, p, line, source)
        except InputError as e:
            if not skip_invalid:
                raise
            skipped[e.reason if e.field is None else f"bad '{e.field}'"] += 1


@dataclass
class IngestReport:
    out_dir: str
    records: int = 0
    duplicates: int = 0
    shards: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "records": self.records, "duplicates": self.duplicates, "shards": self.shards, "skipped": dict(self.skipped)}


def ingest_pool(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    shard_size: int = 100_000,
    skip_invalid: bool = False,
    show_progress: bool = True,
) -> IngestReport:
    """Stream files into parquet shards of unique normalised records (`load_records` reads them back)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = IngestReport(str(out))
    seen: set[int] = set()
    buf: list[Record] = []

    def flush() -> None:
        if not buf:
            return
        cols = {
            "id": [r.id for r in buf],
            "instruction": [r.instruction for r in buf],
            "input": [r.input for r in buf],
            "output": [r.output for r in buf],
            "source": [r.source for r in buf],
            "extra": [json.dumps(r.extra, ensure_ascii=False) if r.extra else "" for r in buf],
            # The row as it came in, so that a selection from the store keeps the user's
            # schema (messages, system prompt, own id); `load_records` reads it back.
            "row": [_row_json(r) for r in buf],
        }
        write_parquet_atomic(out / f"part-{rep.shards:05d}.parquet", cols)
        rep.shards += 1
        buf.clear()

    bar = tqdm(unit="rec", unit_scale=True, desc="ingest", disable=not show_progress)
    for path in paths:
        for rec in iter_records(path, skip_invalid, rep.skipped):
            key = int(rec.id, 16)
            if key in seen:
                rep.duplicates += 1
                continue
            seen.add(key)
            buf.append(rec)
            rep.records += 1
            bar.update(1)
            if len(buf) >= shard_size:
                flush()
    flush()
    bar.close()
    atomic_write_json(out / "ingest.json", rep.to_dict())
    return rep
