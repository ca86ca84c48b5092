"""One normalised record type and the loaders that produce it.

Formats: Alpaca JSON arrays and JSONL (optionally gzipped), ShareGPT / "messages"
conversations, parquet, and datasets saved with `datasets.save_to_disk`. Every problem in a
user's file is reported with its file, line and field (and a JSON array's element index);
`skip_invalid=True` skips bad rows instead and counts them. Exact duplicates are dropped and
counted, with a warning.

A Record keeps the row it came from (`raw`) and the user's own `id` (`user_id`), so that the
selection can be written back in the user's schema (`write_selected`); `Record.id` is paser's
content hash, which every cache is keyed by, since user ids can repeat across files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from paser.errors import InputError
from paser.io.cache import atomic_write_bytes
from paser.io.templates import chat_messages, normalise_turns, render_prompt

log = logging.getLogger(__name__)

# Field aliases found in the common instruction sets (GSM8K: question/answer; Dolly: context/response).
INSTRUCTION_KEYS = ("instruction", "question", "prompt", "query")
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("output", "answer", "response", "completion")
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model", "bot"}


@dataclass
class Record:
    """One instruction sample (x = instruction + input, y = output).

    A conversation (ShareGPT / OpenAI messages) is its first exchange: `system` holds the
    system prompt, `instruction` the first user turn, `output` the assistant's reply, and
    `chat` is True, so that the prompt is built with the tokenizer's chat template.
    """

    instruction: str
    input: str
    output: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    system: str = ""
    chat: bool = False
    later_turns: list = field(default_factory=list)  # turns after the first exchange (kept, not scored)
    user_id: Any = None  # the row's own "id", if it had one: written back, never a cache key
    raw: dict[str, Any] | None = field(default=None, repr=False)  # the row as read

    def __post_init__(self) -> None:
        if not self.id:
            self.id = record_id(self.instruction, self.input, self.output, self.system, self.chat, self.later_turns)

    def to_dict(self) -> dict[str, Any]:
        """The record normalised (Alpaca fields), plus our id and source. A conversation stays
        a conversation (an Alpaca row would lose its system role), so it reads back the same."""
        if self.chat:
            return {**self.as_given(), "id": self.id, "source": self.source}
        d = dict(self.extra)
        d.update(id=self.id, instruction=self.instruction, input=self.input, output=self.output, source=self.source)
        return d

    def as_given(self) -> dict[str, Any]:
        """The row in the user's own schema: as it came in, or, for a record made in code or
        read from an old ingested store, its normalised fields. A row without an id gets
        paser's content id (the key of scores.parquet), so a selection can be traced back."""
        if self.raw is not None:
            d = dict(self.raw)
            d.setdefault("id", self.id)
            return d
        d = {"id": self.id if self.user_id is None else self.user_id}
        if self.chat:
            turns = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": self.instruction}, {"role": "assistant", "content": self.output}]
            d["messages"] = turns + list(self.later_turns)
        else:
            d.update(instruction=self.instruction, input=self.input, output=self.output)
        d.update({k: v for k, v in self.extra.items() if k != "later_turns"})
        if self.source:
            d.setdefault("source", self.source)
        return d


def record_id(instruction: str, input: str, output: str, system: str = "", chat: bool = False, later_turns: list | None = None) -> str:
    """Stable content hash: the same sample gets the same id in every file and every run.

    An Alpaca record hashes its three fields only (ids of existing data and caches do not
    change). A conversation also hashes a marker (its prompt is built differently), its
    system prompt and its later turns, so two conversations that differ only there are not
    taken for duplicates.
    """
    h = hashlib.sha256()
    for part in (instruction, input, output):
        h.update(part.strip().encode("utf-8"))
        h.update(b"\x00")
    if chat or system or later_turns:
        h.update(b"chat\x00" if chat else b"\x00")
        h.update(system.strip().encode("utf-8") + b"\x00")
        if later_turns:
            h.update(json.dumps(later_turns, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
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


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, int, Any]]:
    """Yield (line, element index, element) of a top-level JSON array, so that errors can name
    both (a one-line array has every element on line 1)."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    expect_value = True
    index = 0
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "]":
            return
        if c == ",":
            if expect_value:
                raise InputError(str(path), f"malformed JSON: unexpected ','{_element(index)}", line=_line_of(text, i))
            expect_value = True
            i += 1
            continue
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"malformed JSON: {e.msg}{_element(index)}", line=e.lineno) from None
        yield _line_of(text, i), index, obj
        index += 1
        i = end
        expect_value = False
    raise InputError(str(path), "malformed JSON: the array is never closed", line=_line_of(text, n))


def _element(index: int | None) -> str:
    return "" if index is None else f" (array element {index}, counting from 0)"


def _iter_rows(path: Path, skip_invalid: bool, report: LoadReport) -> Iterator[tuple[int | None, int | None, Any]]:
    """(line, JSON array element index or None, raw row) for every row of a file or dataset."""
    name = path.name.lower()
    if path.is_dir() and any(path.glob("part-*.parquet")):
        for line, obj in _iter_ingested(path):  # a pool stored by `paser.io.stream.ingest_pool`
            yield line, None, obj
        return
    if path.is_dir():
        for line, obj in _iter_hf_dataset(path):
            yield line, None, obj
        return
    if name.endswith(".parquet"):
        for line, obj in _iter_parquet(path):
            yield line, None, obj
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
                    for j, obj in enumerate(doc[key]):
                        yield None, j, obj
                    return
    # not splitlines(): JSON strings may hold U+2028
    for line, obj in iter_jsonl_lines(enumerate(text.split("\n"), start=1), path, skip_invalid, report.skipped):
        yield line, None, obj


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
            if obj.get("row"):  # the user's row as it came in (stores written since the "row" column)
                given = json.loads(obj["row"])
                if isinstance(given, dict) and obj.get("source") and "source" not in given:
                    given["source"] = obj["source"]  # the file it was ingested from
                yield row, given
                continue
            extra = obj.pop("extra", "") or ""
            obj.pop("row", None)
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
        if isinstance(value, float) and not math.isfinite(value):
            # json.loads accepts NaN/Infinity and parquet holds them; str() would train on "nan".
            raise InputError(str(path), f"not a finite number ({value}); expected text", line=line, field=key)
        return str(value)
    raise InputError(str(path), f"expected text, found {type(value).__name__}", line=line, field=key)


def _turns_of(obj: dict, path: Path, line: int | None) -> tuple[str, list]:
    """(field name, list of turns) of a conversation row. TRL's conversational
    prompt-completion rows ({"prompt": [turns], "completion": [turns]}) count as one too."""
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        return key, obj[key]
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(completion, list):
        raise InputError(str(path), "a prompt given as a list of turns needs a completion given as one", line=line, field="completion")
    return "prompt", list(prompt) + list(completion)


def is_conversation(obj: dict) -> bool:
    return "conversations" in obj or "messages" in obj or isinstance(obj.get("prompt"), list)


def _from_conversation(obj: dict, path: Path, line: int | None) -> tuple[str, str, str, list, dict]:
    """ShareGPT ("conversations": from/value), OpenAI-style ("messages": role/content), or TRL's
    conversational prompt-completion.

    Returns (first user turn, system prompt, the assistant's reply to it, later turns, the
    row's other fields). The system prompt stays a system prompt: it is never the `input`.
    """
    key, turns = _turns_of(obj, path, line)
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
            if not text.strip():
                raise InputError(str(path), f"turn {j}: empty user turn", line=line, field=key)
            user = text
        elif role in _ASSISTANT_ROLES and user is not None:
            if not text.strip():
                # Nothing to score or train on; recovery would reject it later anyway.
                raise InputError(str(path), f"turn {j}: empty assistant reply", line=line, field=key)
            assistant, used = text, j + 1
            break
    if user is None:
        raise InputError(str(path), "no user turn ('human'/'user')", line=line, field=key)
    if assistant is None:
        raise InputError(str(path), "no assistant turn after the first user turn", line=line, field=key)
    drop = {key, "completion"} if key == "prompt" else {key}
    extra = {k: v for k, v in obj.items() if k not in drop}
    return user, system, assistant, list(turns[used:]), extra


def normalise(obj: Any, path: Path, line: int | None, source: str) -> Record:
    """Map one raw row to a Record, or raise InputError naming the missing or bad field."""
    if not isinstance(obj, dict):
        raise InputError(str(path), f"expected a JSON object, found {type(obj).__name__}", line=line)
    system, later, chat = "", [], False
    if is_conversation(obj):
        instruction, system, output, later, extra = _from_conversation(obj, path, line)
        inp, chat = "", True
        if later:
            extra["later_turns"] = later
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
    user_id = extra.pop("id", None)
    return Record(
        instruction=instruction, input=inp, output=output, source=str(src), extra=extra,
        system=system, chat=chat, later_turns=later, user_id=user_id, raw=obj,
    )


def load_records(
    path: str | os.PathLike,
    source: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Record], LoadReport]:
    """Load one file or saved dataset into Records.

    Raises InputError (file, line, field; the element index in a JSON array) on the first bad
    row unless `skip_invalid`, in which case bad rows are skipped and counted in the report.
    Exact duplicates (same content id) are always dropped, counted and warned about.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "no such file or directory")
    src = source or _default_source(p)
    report = LoadReport(path=str(p))
    records: list[Record] = []
    seen: set[str] = set()
    for line, index, obj in _iter_rows(p, skip_invalid, report):
        try:
            rec = normalise(obj, p, line, src)
        except InputError as e:
            if skip_invalid:
                report.skipped[e.reason if e.field is None else f"bad '{e.field}'"] += 1
                continue
            if index is not None:
                raise InputError(e.path, e.reason + _element(index), line=e.line, field=e.field) from None
            raise
        if rec.id in seen:
            report.skipped["duplicate"] += 1
            continue
        seen.add(rec.id)
        records.append(rec)
    if report.skipped.get("duplicate"):
        log.warning("%s: dropped %d exact duplicate record(s) (same content as an earlier one)", p, report.skipped["duplicate"])
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
        if rep.skipped.get("duplicate across files"):
            log.warning("%s: dropped %d record(s) already in an earlier file", path, rep.skipped["duplicate across files"])
        reports.append(rep)
    warn_if_near_identical(pool)
    return pool, reports


_FOLD = re.compile(r"[\W_]+", re.UNICODE)


def _folded_prompt(r: Record) -> str:
    """The prompt with case, spacing and punctuation folded away: records that differ only
    there are the same task to a sentence encoder and to the clustering. Digits are kept:
    two math problems that differ in their numbers are different problems."""
    return _FOLD.sub(" ", f"{r.system} {r.instruction} {r.input}".lower()).strip()


NEAR_IDENTICAL_SHARE = 0.9


def near_identical_share(records: list[Record]) -> float:
    """Share of the records whose folded prompt is the most common one (1.0: all the same)."""
    if not records:
        return 0.0
    counts = Counter(_folded_prompt(r) for r in records)
    return counts.most_common(1)[0][1] / len(records)


def warn_if_near_identical(records: list[Record]) -> bool:
    """Warn when (almost) every record asks the same thing: semantic clusters, the K criterion
    and diversity-based selection are then degenerate. Returns whether it warned."""
    if len(records) < 4:
        return False
    share = near_identical_share(records)
    if share < NEAR_IDENTICAL_SHARE:
        return False
    log.warning(
        "%.0f%% of the %d records have the same instruction (ignoring case, spacing and punctuation): "
        "clustering and selection have nothing to tell apart; check the data",
        100 * share, len(records),
    )
    return True


def _default_source(p: Path) -> str:
    name = p.name
    for suf in (".gz", ".jsonl", ".json", ".ndjson", ".parquet"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomic JSONL write (gzipped when the name ends in .gz), strict JSON: a non-finite number
    (NaN from a parquet column, say) is written as null, since strict parsers reject NaN."""
    data = "".join(_dumps(r) + "\n" for r in rows).encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


def _dumps(row: dict) -> str:
    # default=str: parquet and saved datasets can hold dates and other non-JSON values.
    try:
        return json.dumps(row, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:  # a NaN or infinity somewhere: the slow path, only for such rows
        return json.dumps(_finite_or_null(row), ensure_ascii=False, allow_nan=False, default=str)


def _finite_or_null(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_or_null(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_null(x) for x in v]
    return v


# ----------------------------------------------------------------------------- selected.jsonl

SELECTED_FORMATS = ("records", "prompt-completion", "messages")


def selected_row(r: Record, fmt: str = "records", template: str = "alpaca") -> dict[str, Any]:
    """One selected record as `fmt` writes it.

    records: the row as the user gave it (same fields, own id; `paser recover` reads it back to
    the same records). prompt-completion and messages are the dataset formats TRL's SFTTrainer
    reads: an instruction record's prompt is paser's own rendering with `template` (so TRL trains
    on what paser scored); a conversation (or `template` chat) is given as turns, for TRL to
    apply the model's chat template.
    """
    if fmt == "records":
        return r.as_given()
    rid = r.id if r.user_id is None else r.user_id
    if fmt == "messages":
        return {"id": rid, "messages": chat_messages(r, with_reply=True) + normalise_turns(r.later_turns)}
    if fmt == "prompt-completion":
        if r.chat or template == "chat":
            return {"id": rid, "prompt": chat_messages(r), "completion": [{"role": "assistant", "content": r.output}]}
        return {"id": rid, "prompt": render_prompt(r, template), "completion": r.output}
    raise ValueError(f"unknown selected format {fmt!r}; choose one of {', '.join(SELECTED_FORMATS)}")


def write_selected(path: str | os.PathLike, records: Iterable[Record], fmt: str = "records", template: str = "alpaca") -> None:
    """Write the selection (atomically) in the user's schema or a TRL format; see `selected_row`."""
    if fmt not in SELECTED_FORMATS:
        raise ValueError(f"unknown selected format {fmt!r}; choose one of {', '.join(SELECTED_FORMATS)}")
    write_jsonl(path, (selected_row(r, fmt, template) for r in records))
