"""Calibration text for pruning: where it comes from and how it becomes token ids.

Wanda and SparseGPT calibrate on 128 random 2,048-token windows of C4; we ship no C4, and a
CPU cannot afford that much. The default is the first `n` records of the embedded instruction
pool (already shuffled across sources), rendered exactly as scoring and recovery see them:
the Alpaca prompt followed by the response. A user may instead give a record file (anything
`paser.io.records.load_records` reads), a plain-text file, or a list of strings.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from paser.errors import InputError, PaserError

_TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".text", ".raw", ".tokens")
# A plain-text file is cut at blank lines and paragraphs are joined until a chunk has at least
# this many characters (~250 tokens of English), so a chunk fills most of a 256-token window.
_MIN_CHUNK_CHARS = 1000


@dataclass
class Calibration:
    texts: list[str]
    source: str  # what the texts came from, for the report

    def describe(self) -> dict:
        return {"source": self.source, "count": len(self.texts)}


def _pick(items: Sequence, n: int, seed: int | None) -> list:
    """The first n (seed None: deterministic and cheap), or a seeded random sample of n."""
    if n <= 0:
        raise PaserError(f"the number of calibration samples must be positive, got {n}")
    if seed is None or n >= len(items):
        return list(items[:n])
    return random.Random(seed).sample(list(items), n)


def _text_chunks(text: str, min_chars: int = _MIN_CHUNK_CHARS) -> list[str]:
    chunks, cur = [], []
    size = 0
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        cur.append(para)
        size += len(para)
        if size >= min_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def records_to_texts(records) -> list[str]:
    """Prompt + response, the way PASER's scoring and LoRA recovery see a record."""
    from paser.io.templates import render_prompt

    return [render_prompt(r) + r.output for r in records]


def load_calibration(
    source: str | Path | Sequence[str] | None = None, n: int = 32, seed: int | None = None
) -> Calibration:
    """Calibration texts from the embedded pool (None), a record file, a text file, or a list of strings."""
    if source is None:
        from paser.data import pool_path
        from paser.io.records import load_records

        records, _ = load_records(pool_path())
        return Calibration(records_to_texts(_pick(records, n, seed)), "embedded pool (first records)" if seed is None else f"embedded pool (seed {seed})")
    if not isinstance(source, (str, Path)):
        texts = [t for t in source if isinstance(t, str) and t.strip()]
        if not texts:
            raise PaserError("the calibration list holds no non-empty strings")
        return Calibration(_pick(texts, n, seed), "list of strings")
    p = Path(source).expanduser()
    if not p.exists():
        raise InputError(str(p), "calibration source: no such file or directory")
    name = p.name.lower()
    if p.is_file() and name.endswith(_TEXT_SUFFIXES):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            chunks = _text_chunks(f.read())
        if not chunks:
            raise InputError(str(p), "calibration text file is empty")
        return Calibration(_pick(chunks, n, seed), f"text file {p}")
    from paser.io.records import load_records

    records, _ = load_records(p)
    return Calibration(records_to_texts(_pick(records, n, seed)), f"record file {p}")


def tokenize_calibration(texts: Sequence[str], tokenizer, seq_len: int) -> list[torch.Tensor]:
    """One [1, T] id tensor per text, T <= seq_len (with the tokenizer's BOS), texts under 2 tokens dropped.

    Kept as separate sequences of their own length rather than padded into a batch: no padding
    token ever reaches the statistics, and no attention mask is needed.
    """
    if seq_len < 2:
        raise PaserError(f"calibration seq_len must be at least 2, got {seq_len}")
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 2:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise PaserError("no calibration text was long enough to use (need at least 2 tokens)")
    return out
