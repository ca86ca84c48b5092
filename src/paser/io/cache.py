"""Content-addressed on-disk artifacts: atomic writes, keys, and resumable parquet shard stores.

Every expensive stage (model conversion, per-sample scoring, embeddings) writes its output under
a key built from what produced it, so a re-run redoes only what changed and a run killed
half-way resumes from the last shard it finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)


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


def hash_file_into(h, path: str | os.PathLike, chunk: int = 1 << 24) -> None:
    """Feed a file's bytes to the hashlib object `h`, `chunk` bytes at a time (a weight file
    is never read into memory whole)."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only be
    read by setting it, which briefly affects every thread's new files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half file.

    The file gets the permissions a plain open() would give (0666 less the umask): mkstemp
    makes its file 0600, which would leave every output private whatever the user's umask.
    An OSError (full disk, read-only) names the file being written.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if e.filename is None:  # write() and fsync() errors carry no file name
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a directory with `write(tmp)` in a hidden sibling, then swap it in for `target`.

    A crash or an exception in `write` leaves `target` as it was (an older model stays
    loadable) and no half-written directory under its name. The swap is two renames (old
    aside, new in) on one file system, so `target` is never half-written, only missing
    between them; the old copy is deleted after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by an earlier crash of this same pid number
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN/±Infinity replaced by None (JSON null), numpy scalars and arrays as
    plain values: strict JSON parsers (JSON.parse, jq, Go, Rust) reject NaN and Infinity."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def dumps_json(obj: Any, indent: int | None = 2, strict: bool = True) -> str:
    """The one JSON serialiser for paser's files: strict (no NaN/Infinity: null), UTF-8 text.

    strict=False keeps Python's NaN/Infinity extension, for a private cache that paser alone
    reads back and whose NaNs must survive the round trip (an undefined standard error must
    not come back as None into arithmetic and formatting).
    """
    if not strict:
        return json.dumps(obj, indent=indent, sort_keys=False, default=_json_default_nan, ensure_ascii=False)
    return json.dumps(strict_json(obj), indent=indent, sort_keys=False, default=_json_default, ensure_ascii=False, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, strict: bool = True) -> None:
    atomic_write_text(path, dumps_json(obj, strict=strict) + "\n")


def _json_default_nan(o: Any) -> Any:
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return _json_default(o)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return strict_json(o)
    if isinstance(o, np.ndarray):
        return strict_json(o)
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


def _parquet_bytes(columns: dict[str, Iterable]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: list(v) if not isinstance(v, np.ndarray) else v for k, v in columns.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# shard-r<rank>-<12 hex>[-<16 hex sha256 of the file>].parquet; shards written before the
# checksum existed have no third part and are range-checked only.
_SHARD_NAME = re.compile(r"shard-r(\d+)-([0-9a-f]{12})(?:-([0-9a-f]{16}))?\.parquet")

Validator = Callable[[dict[str, np.ndarray]], "str | None"]


class ShardStore:
    """A folder of parquet shards holding one row per record id, appended shard by shard.

    A shard is written atomically, so after a kill the store holds every finished shard and
    nothing half-written. Several processes may write to one store (each names its shards by
    rank), which is how multi-process scoring shares one cache.

    Verified on read: a shard's name carries the sha256 of its bytes, and `validate` (given
    the shard's columns, returns a reason when its values are impossible) checks its rows. A
    shard that fails either is removed with a warning, so its rows are simply computed again.
    Shards never change once written, so each is verified once per store object.
    """

    def __init__(self, root: str | os.PathLike, meta: dict | None = None, validate: Validator | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.validate = validate
        self._verified: dict[str, Any] = {}  # shard name -> its pyarrow table
        if meta is not None:
            meta_path = self.root / "meta.json"
            if not meta_path.exists():
                atomic_write_json(meta_path, meta)

    def shard_paths(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.parquet"))

    def _table(self, path: Path):
        """The shard's table, or None when it is corrupt or fails validation (then removed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        hit = self._verified.get(path.name)
        if hit is not None:
            return hit
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed by another process meanwhile
            return None
        m = _SHARD_NAME.fullmatch(path.name)
        reason = None
        table = None
        if m and m.group(3) and hashlib.sha256(data).hexdigest()[:16] != m.group(3):
            reason = "checksum mismatch (the file was changed or damaged after it was written)"
        else:
            try:
                table = pq.read_table(pa.BufferReader(data))
            except Exception as e:  # pyarrow raises several types for a damaged file
                reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            if table is not None and self.validate is not None:
                cols = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
                reason = self.validate(cols)
        if reason is not None:
            log.warning("cache shard %s dropped, its rows will be computed again: %s", path, reason)
            self._quarantine(path)
            return None
        self._verified[path.name] = table
        return table

    def _quarantine(self, path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    def read(self, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """All rows of all valid shards, as column arrays (ids kept first-seen)."""
        import pyarrow as pa

        tables = [t for t in (self._table(p) for p in self.shard_paths()) if t is not None]
        if not tables:
            return {}
        if columns is not None:
            tables = [t.select(columns) for t in tables]
        table = pa.concat_tables(tables)
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
        data = _parquet_bytes(columns)
        name = f"shard-r{rank:03d}-{uuid.uuid4().hex[:12]}-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        path = self.root / name
        atomic_write_bytes(path, data)
        return path

    @contextlib.contextmanager
    def lock(self, rank: int = 0):
        """Exclusive use of this store's rank `rank` while scoring into it.

        A second process scoring the same rows waits here, then finds them done, instead of
        computing everything twice. It is an OS lock (flock) on a file, so a holder that is
        killed releases it at once; where flock does not exist the store runs unlocked.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        path = self.root / f"lock-r{rank:03d}"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                log.info("waiting for %s, which is scoring into the same cache (%s)", holder, self.root)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
