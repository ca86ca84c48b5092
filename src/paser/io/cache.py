"""Content-addressed on-disk artifacts: atomic writes, keys, and resumable parquet shard stores.

Every expensive stage (model conversion, per-sample scoring, embeddings) writes its output under
a key built from what produced it, so a re-run redoes only what changed and a run killed
half-way resumes from the last shard it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def default_cache_dir() -> Path:
    """$PASER_CACHE, else $XDG_CACHE_HOME/paser, else ~/.cache/paser."""
    env = os.environ.get("PASER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paser"


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hash of a JSON-able object with sorted keys: the same config gives the same key."""
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, ensure_ascii=False) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet_atomic(path: str | os.PathLike, columns: dict[str, Iterable]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: list(v) if not isinstance(v, np.ndarray) else v for k, v in columns.items()})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ShardStore:
    """A folder of parquet shards holding one row per record id, appended shard by shard.

    A shard is written atomically, so after a kill the store holds every finished shard and
    nothing half-written. Several processes may write to one store (each names its shards by
    rank), which is how multi-process scoring shares one cache.
    """

    def __init__(self, root: str | os.PathLike, meta: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if meta is not None:
            meta_path = self.root / "meta.json"
            if not meta_path.exists():
                atomic_write_json(meta_path, meta)

    def shard_paths(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.parquet"))

    def read(self, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """All rows of all shards, as column arrays (ids kept first-seen)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths = self.shard_paths()
        if not paths:
            return {}
        table = pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
        out = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        if "id" in out:
            _, first = np.unique(out["id"], return_index=True)
            keep = np.sort(first)
            if len(keep) != len(out["id"]):
                out = {k: v[keep] for k, v in out.items()}
        return out

    def done_ids(self) -> set[str]:
        cols = self.read(columns=["id"])
        return set(cols["id"].tolist()) if cols else set()

    def append(self, columns: dict[str, Iterable], rank: int = 0) -> Path:
        name = f"shard-r{rank:03d}-{uuid.uuid4().hex[:12]}.parquet"
        path = self.root / name
        write_parquet_atomic(path, columns)
        return path
