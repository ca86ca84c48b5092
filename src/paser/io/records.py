"""One normalised record type and the loaders that produce it.

Formats: Alpaca JSON arrays and JSONL (optionally gzipped), ShareGPT / "messages"
conversations, parquet, and datasets saved with `datasets.save_to_disk`. Every problem in a
user's file is reported with its file, line and field; `skip_invalid=True` skips bad rows
instead and counts them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from paser.errors import InputError

# Field aliases found in the common instruction sets (GSM8K: question/answer; Dolly: context/response).
INSTRUCTION_KEYS = ("instruction", "question", "prompt", "query")
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("output", "answer", "response", "completion")
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model", "bot"}


@dataclass
class Record:
    """One instruction sample (x = instruction + input, y = output)."""

    instruction: str
    input: str
    output: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = record_id(self.instruction, self.input, self.output)

    def to_dict(self) -> dict[str, Any]:
        """The record as the user gave it, plus our id and source."""
        d = dict(self.extra)
        d.update(id=self.id, instruction=self.instruction, input=self.input, output=self.output, source=self.source)
        return d


def record_id(instruction: str, input: str, output: str) -> str:
    """Stable content hash: the same sample gets the same id in every file and every run."""
    h = hashlib.sha256()
    for part in (instruction, input, output):
        h.update(part.strip().encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


@dataclass
class LoadReport:
    """What a load saw: kept rows and skipped rows by reason."""

    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        s = f"{self.path}: {self.kept} records"
        if self.skipped:
            s += ", skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return s


# ----------------------------------------------------------------------------- raw rows


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InputError(str(path), f"not a valid gzip file ({e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(str(path), f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", line=line) from None


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, element) of a top-level JSON array, so errors can name the element's line."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    expect_value = True
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "]":
            return
        if c == ",":
            if expect_value:
                raise InputError(str(path), "malformed JSON: unexpected ','", line=_line_of(text, i))
            expect_value = True
            i += 1
            continue
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"malformed JSON: {e.msg}", line=e.lineno) from None
        yield _line_of(text, i), obj
        i = end
        expect_value = False
    raise InputError(str(path), "malformed JSON: the array is never closed", line=_line_of(text, n))


def _iter_rows(path: Path, skip_invalid: bool, report: LoadReport) -> Iterator[tuple[int | None, Any]]:
    name = path.name.lower()
    if path.is_dir() and any(path.glob("part-*.parquet")):
        yield from _iter_ingested(path)  # a pool stored by `paser.io.stream.ingest_pool`
        return
    if path.is_dir():
        yield from _iter_hf_dataset(path)
        return
    if name.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    text = _read_text(path)
    if not text.strip():
        raise InputError(str(path), "the file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(text, path)
        return
    if stripped.startswith("{") and not (".jsonl" in name or ".ndjson" in name):
        # A single JSON document holding a list under a common key ({"data": [...]}), else JSONL.
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            for key in ("data", "records", "examples", "train"):
                if isinstance(doc.get(key), list):
                    for obj in doc[key]:
                        yield None, obj
                    return
    # not splitlines(): JSON strings may hold U+2028
    yield from iter_jsonl_lines(enumerate(text.split("\n"), start=1), path, skip_invalid, report.skipped)


def iter_jsonl_lines(numbered_lines: Iterable[tuple[int, str]], path: Path, skip_invalid: bool, skipped: Counter) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-blank JSONL line; a malformed line is an InputError
    naming its line, or, with skip_invalid, a count in `skipped`."""
    for lineno, line in numbered_lines:
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            if skip_invalid:
                skipped["malformed JSON"] += 1
                continue
            raise InputError(str(path), f"malformed JSON: {e.msg} (column {e.colno})", line=lineno) from None


def _iter_parquet(path: Path) -> Iterator[tuple[int | None, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(str(path), f"not a readable parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def _iter_ingested(path: Path) -> Iterator[tuple[int | None, Any]]:
    row = 0
    for part in sorted(path.glob("part-*.parquet")):
        for _, obj in _iter_parquet(part):
            row += 1
            extra = obj.pop("extra", "") or ""
            yield row, {**(json.loads(extra) if extra else {}), **obj}


def _iter_hf_dataset(path: Path) -> Iterator[tuple[int | None, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InputError(str(path), f"not a dataset saved with datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, obj in enumerate(ds, start=1):
        yield i, obj


# ----------------------------------------------------------------------------- normalisation


def _pick(obj: dict, keys: Iterable[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in obj:
            return k, obj[k]
    return None, None


def _as_text(value: Any, path: Path, line: int | None, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise InputError(str(path), f"expected text, found {type(value).__name__}", line=line, field=key)


def _from_conversation(obj: dict, path: Path, line: int | None) -> tuple[str, str, str, dict]:
    """ShareGPT ("conversations": from/value) or OpenAI-style ("messages": role/content).

    The first user turn is the instruction and the assistant's reply to it the output; a system
    prompt becomes the input; later turns stay in the record's extra fields.
    """
    key = "conversations" if "conversations" in obj else "messages"
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise InputError(str(path), "expected a non-empty list of turns", line=line, field=key)
    system, user, assistant, used = "", None, None, 0
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise InputError(str(path), f"turn {j} is not an object", line=line, field=key)
        role = str(t.get("from", t.get("role", ""))).lower()
        text = t.get("value", t.get("content"))
        if not isinstance(text, str):
            raise InputError(str(path), f"turn {j} has no text ('value' or 'content')", line=line, field=key)
        if role == "system" and user is None:
            system = text
        elif role in _USER_ROLES and user is None:
            user = text
        elif role in _ASSISTANT_ROLES and user is not None:
            assistant, used = text, j + 1
            break
    if user is None:
        raise InputError(str(path), "no user turn ('human'/'user')", line=line, field=key)
    if assistant is None:
        raise InputError(str(path), "no assistant turn after the first user turn", line=line, field=key)
    extra = {k: v for k, v in obj.items() if k != key}
    if used < len(turns):
        extra["later_turns"] = turns[used:]
    return user, system, assistant, extra


def normalise(obj: Any, path: Path, line: int | None, source: str) -> Record:
    """Map one raw row to a Record, or raise InputError naming the missing or bad field."""
    if not isinstance(obj, dict):
        raise InputError(str(path), f"expected a JSON object, found {type(obj).__name__}", line=line)
    if "conversations" in obj or "messages" in obj:
        instruction, inp, output, extra = _from_conversation(obj, path, line)
    else:
        ik, iv = _pick(obj, INSTRUCTION_KEYS)
        if ik is None:
            raise InputError(str(path), "missing field (also accepted: " + ", ".join(INSTRUCTION_KEYS) + ")", line=line, field="instruction")
        ok, ov = _pick(obj, OUTPUT_KEYS)
        if ok is None:
            raise InputError(str(path), "missing field (also accepted: " + ", ".join(OUTPUT_KEYS) + ")", line=line, field="output")
        nk, nv = _pick(obj, INPUT_KEYS)
        instruction = _as_text(iv, path, line, ik)
        output = _as_text(ov, path, line, ok)
        inp = _as_text(nv, path, line, nk) if nk else ""
        used = {ik, ok, nk}
        extra = {k: v for k, v in obj.items() if k not in used}
        if not instruction.strip():
            raise InputError(str(path), "empty instruction", line=line, field=ik)
        if not output.strip():
            raise InputError(str(path), "empty output", line=line, field=ok)
    src = extra.pop("source", None) or source
    extra.pop("id", None)
    return Record(instruction=instruction, input=inp, output=output, source=str(src), extra=extra)


def load_records(
    path: str | os.PathLike,
    source: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Record], LoadReport]:
    """Load one file or saved dataset into Records.

    Raises InputError (file, line, field) on the first bad row unless `skip_invalid`, in which
    case bad rows and duplicates are skipped and counted in the report.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "no such file or directory")
    src = source or _default_source(p)
    report = LoadReport(path=str(p))
    records: list[Record] = []
    seen: dict[str, int | None] = {}
    for line, obj in _iter_rows(p, skip_invalid, report):
        try:
            rec = normalise(obj, p, line, src)
        except InputError as e:
            if skip_invalid:
                report.skipped[e.reason if e.field is None else f"bad '{e.field}'"] += 1
                continue
            raise
        if rec.id in seen:
            if skip_invalid:
                report.skipped["duplicate"] += 1
                continue
            first = seen[rec.id]
            raise InputError(
                str(p), f"duplicate record id {rec.id} (same instruction, input and output as line {first})", line=line, field="id"
            )
        seen[rec.id] = line
        records.append(rec)
    if not records:
        raise InputError(str(p), "no valid records" + (f" ({report.n_skipped} skipped)" if report.n_skipped else ""))
    report.kept = len(records)
    return records, report


def load_pool(paths: Iterable[str | os.PathLike], skip_invalid: bool = False) -> tuple[list[Record], list[LoadReport]]:
    """Load several files into one pool; a record found in two files is kept once."""
    pool: list[Record] = []
    reports: list[LoadReport] = []
    seen: set[str] = set()
    for path in paths:
        recs, rep = load_records(path, skip_invalid=skip_invalid)
        for r in recs:
            if r.id in seen:
                rep.skipped["duplicate across files"] += 1
                continue
            seen.add(r.id)
            pool.append(r)
        rep.kept = len(recs) - rep.skipped.get("duplicate across files", 0)
        reports.append(rep)
    return pool, reports


def _default_source(p: Path) -> str:
    name = p.name
    for suf in (".gz", ".jsonl", ".json", ".ndjson", ".parquet"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomic JSONL write (gzipped when the name ends in .gz)."""
    from paser.io.cache import atomic_write_bytes

    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
