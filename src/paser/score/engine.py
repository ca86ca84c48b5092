"""The one scoring engine: teacher-forced, length-bucketed forward passes with resumable caches.

PASER's capability degradation (CDAIS, docs/METHOD.md §2) and the IFD baseline both need, per
sample, a statistic of the response tokens under teacher forcing. The reference code ran
each model per sample at batch size 1 (twice), over every position. This engine instead:

- encodes every record once with the shared template (`paser.io.templates.encode_example`),
- sorts samples by length and packs them into batches under a token budget, right-padded
  only to the longest sample in the batch (so padding waste is small),
- runs each model's decoder once per batch and applies the LM head only at the positions
  that predict response tokens, a chunk of tokens at a time (bounded memory),
- caches the ORIGINAL model's final hidden states (the LM head's input) at those positions,
  so scoring a second or third pruned variant costs one pruned forward plus one small
  matmul for the original, never a second original forward,
- writes results to parquet shards every few batches (atomically), so a killed run resumes
  where it stopped and ends with identical numbers,
- takes `rank`/`world_size` so several processes can share one cache.

Batch independence. With right padding and causal attention a sample's real tokens never
see padding (so no attention mask is needed, see `ModelView.hidden`), and its score does
not depend on its batch mates except through floating-point reduction order (different
GEMM shapes). Measured on a tiny Llama, batch 1 vs one batch of 40: max |ΔJSD_i| 7e-9,
max |ΔNLL_i| 5e-7 (the tests allow 1e-5 / 1e-4). Within one cache, batches are formed from the full, sorted list of
the rank's samples (not from what is left to do), so a resumed run recomputes exactly the
batches it lost and reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from paser.io.batching import right_pad
from paser.errors import ModelError, PaserError
from paser.io.adapter import decoder, lm_head, pad_id, unwrap
from paser.io.cache import ShardStore, atomic_write_bytes, default_cache_dir, stable_hash
from paser.io.records import Record
from paser.io.templates import EncodedExample, encode_example
from paser.score.divergence import LN2, Workspace, gather_response, segment_mean, token_jsd_and_nll, token_nll

log = logging.getLogger(__name__)

ENGINE_VERSION = 1  # bump when a change alters cached numbers
_HIDDEN_DTYPES = {"float32": np.float32, "float16": np.float16}


# ----------------------------------------------------------------------------- results


@dataclass
class EngineStats:
    """What one call actually computed (the rest came from the cache)."""

    samples_total: int = 0
    samples_cached: int = 0
    samples_scored: int = 0
    batches: int = 0
    tokens: int = 0  # prompt + response tokens of the scored samples
    original_forward_samples: int = 0  # samples the original model ran a forward for
    seconds: float = 0.0  # wall clock of the scoring loop
    cpu_seconds: float = 0.0  # process CPU time of the loop (all threads): robust to other load

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class DegradationScores:
    """Per-record capability degradation, one row per input record (input order).

    jsd: mean over response tokens of JSD(P_original ‖ P_pruned) (the paper's JSD_i).
    nll_pruned / nll_original: mean response NLL, loss(y|x), of each model (byproducts).
    Rows not yet scored (another rank's share, world_size > 1) hold NaN; see `complete`.
    """

    ids: list[str]
    jsd: np.ndarray
    nll_pruned: np.ndarray
    nll_original: np.ndarray
    n_response: np.ndarray
    n_prompt: np.ndarray
    stats: EngineStats = field(default_factory=EngineStats)

    @property
    def complete(self) -> bool:
        return not bool(np.isnan(self.jsd).any())

    def as_dict(self) -> dict[str, tuple[float, int, int]]:
        """id → (jsd_mean, n_response_tokens, n_prompt_tokens)."""
        return {
            i: (float(j), int(r), int(p)) for i, j, r, p in zip(self.ids, self.jsd, self.n_response, self.n_prompt)
        }

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class LossScores:
    """Per-record mean response NLL: loss(y|x) when conditioned on the prompt, else loss(y)."""

    ids: list[str]
    nll: np.ndarray
    n_response: np.ndarray
    n_prompt: np.ndarray  # tokens before the response in the scored sequence (1 for loss(y))
    conditioned: bool
    stats: EngineStats = field(default_factory=EngineStats)

    @property
    def complete(self) -> bool:
        return not bool(np.isnan(self.nll).any())

    def as_dict(self) -> dict[str, float]:
        return {i: float(v) for i, v in zip(self.ids, self.nll)}

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------- cache validation

# Float tolerance of the range checks: values are float32 means of values clamped to [0, ln 2].
_TOL = 1e-5


def _bad_rows(name: str, ok: np.ndarray) -> str | None:
    n = int((~ok).sum())
    return f"{n} row(s) with an impossible {name}" if n else None


def validate_degradation_shard(cols: dict[str, np.ndarray]) -> str | None:
    """Why a degradation shard cannot be trusted (JSD outside [0, ln 2], non-finite or negative
    NLL, no ids), else None. Such a shard is dropped and its rows scored again."""
    for c in ("id", "jsd", "nll_original", "nll_pruned"):
        if c not in cols:
            return f"column {c!r} missing"
    jsd = np.asarray(cols["jsd"], dtype=np.float64)
    reason = _bad_rows("JSD (must be in [0, ln 2])", np.isfinite(jsd) & (jsd >= -_TOL) & (jsd <= LN2 + _TOL))
    for c in ("nll_original", "nll_pruned"):
        v = np.asarray(cols[c], dtype=np.float64)
        reason = reason or _bad_rows(f"{c} (must be finite, >= 0)", np.isfinite(v) & (v >= -_TOL))
    return reason


def validate_loss_shard(cols: dict[str, np.ndarray]) -> str | None:
    if "id" not in cols or "nll" not in cols:
        return "column 'id' or 'nll' missing"
    v = np.asarray(cols["nll"], dtype=np.float64)
    return _bad_rows("NLL (must be finite, >= 0)", np.isfinite(v) & (v >= -_TOL))


def validate_hidden_index(cols: dict[str, np.ndarray]) -> str | None:
    for c in ("id", "file", "offset", "n"):
        if c not in cols:
            return f"column {c!r} missing"
    ok = (np.asarray(cols["offset"]) >= 0) & (np.asarray(cols["n"]) >= 0)
    ok &= np.array([isinstance(f, str) and "/" not in f and "\\" not in f and f.endswith(".npy") for f in cols["file"]], dtype=bool)
    return _bad_rows("entry", ok)


# ----------------------------------------------------------------------------- encoding & batching


@dataclass(frozen=True)
class ScoreItem:
    """One record encoded for scoring: its id, the token ids of prompt and response (as the
    template and cutoff give them), and where the response starts. Public: the held-out
    evaluation scores its examples with the same items and `ModelView`."""

    id: str
    input_ids: tuple[int, ...]
    n_prompt: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def encode_records(
    records: Sequence[Record], tokenizer, template: str, cutoff: int, condition_on_prompt: bool = True
) -> list[ScoreItem]:
    """One item per distinct record id, encoded with the shared template.

    Unconditioned (loss(y), for IFD) keeps exactly the response tokens that the conditioned
    encoding keeps, after one start token, so loss(y|x) and loss(y) average the same tokens.
    """
    items: dict[str, ScoreItem] = {}
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for rec in records:
        if rec.id in items:
            continue
        try:
            enc: EncodedExample = encode_example(rec, tokenizer, template=template, cutoff=cutoff)
        except ValueError as e:  # unknown template, chat template missing
            raise PaserError(str(e)) from None
        if condition_on_prompt:
            items[rec.id] = ScoreItem(rec.id, tuple(enc.input_ids), enc.n_prompt)
        else:
            if start is None:
                raise PaserError("scoring loss(y) without a prompt needs a tokenizer with a BOS or EOS token")
            items[rec.id] = ScoreItem(rec.id, (int(start),) + tuple(enc.input_ids[enc.n_prompt :]), 1)
    return list(items.values())


def rank_share(items: Sequence[ScoreItem], rank: int = 0, world_size: int = 1) -> list[ScoreItem]:
    """Sort by (length, id) and keep every world_size-th item from `rank`.

    The order depends only on the items, never on what is cached, so every rank agrees on
    the split and a resumed run sees the same batches.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise PaserError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    ordered = sorted(items, key=lambda it: (it.length, it.id))
    return ordered[rank::world_size]


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int = 4096, max_batch_size: int = 256, overhead_tokens: int = 128
) -> list[tuple[int, int]]:
    """Split ascending `lengths` into [start, end) batches of padded size ≤ max_batch_tokens.

    Minimises Σ over batches of (overhead_tokens + count × longest length) by dynamic
    programming: padding costs compute, but so does every extra batch (small GEMMs run at
    half speed on a CPU; measured: batch 1 at ~100 tokens 170 tok/s, 16 × 64 338 tok/s), and
    `overhead_tokens` prices that. Filling batches greedily up to the budget instead padded
    16 Alpaca samples (40–256 tokens) to 4,096 tokens for 1,706 real ones. A sample longer
    than the budget gets a batch of its own.
    """
    L = np.asarray(lengths, dtype=np.int64)
    n = len(L)
    if n and bool((np.diff(L) < 0).any()):
        raise ValueError("plan_batches needs lengths in ascending order")
    best = np.zeros(n + 1, dtype=np.float64)
    start = np.zeros(n + 1, dtype=np.int64)
    for e in range(1, n + 1):
        le = int(L[e - 1])
        k = max(1, min(max_batch_size, max_batch_tokens // max(le, 1), e))
        s = np.arange(e - k, e)
        cost = best[s] + overhead_tokens + (e - s) * le
        j = int(np.argmin(cost))
        best[e], start[e] = cost[j], s[j]
    out: list[tuple[int, int]] = []
    e = n
    while e > 0:
        out.append((int(start[e]), e))
        e = int(start[e])
    return out[::-1]


def _collate(batch: Sequence[ScoreItem], pad_id: int, device: torch.device):
    """Right-padded ids [B, L] (L = longest in the batch), lengths [B], prompt sizes [B]."""
    ids, _ = right_pad([it.input_ids for it in batch], pad_id)
    lengths = torch.tensor([it.length for it in batch])
    n_prompt = torch.tensor([it.n_prompt for it in batch])
    return ids.to(device), lengths, n_prompt


# ----------------------------------------------------------------------------- model view


class ModelView:
    """A causal LM split into decoder (→ final hidden states) and LM head (→ logits).

    Running the head only where a response token is predicted saves most of the head's cost,
    and the split is what lets the original's hidden states be cached and its logits
    recomputed exactly. `verify` checks the split against the model's own forward once; a
    model whose logits need more than head + final soft-capping falls back to full forwards.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        base = unwrap(model)
        self.decoder = decoder(base)
        self.head = lm_head(base)
        if self.head is None:
            raise ModelError(f"{type(base).__name__} has no separate decoder and LM head to score with")
        cfg = base.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        cap = getattr(text_cfg, "final_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.direct = False  # True: the split failed verification; use model(...).logits
        self.verified = False

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L, H] final hidden states (or [B, L, V] logits in direct mode) of a right-padded batch.

        No attention mask, on purpose: with right padding and causal attention a real token
        only ever attends to earlier, real tokens, so the mask changes nothing we read (the
        padded positions' outputs are discarded), and without it SDPA runs its causal kernel
        (13 % faster on SmolLM2, measured). Positions are 0..L-1 either way.
        """
        if self.direct:
            return self.model(input_ids=input_ids, use_cache=False).logits
        return self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """LM head (+ soft-capping) on [N, H] hidden states; writes into `out` when it can."""
        if self.direct:
            return hidden
        h = hidden.to(self.dtype)
        head = self.head
        if out is not None and type(head) is torch.nn.Linear and out.dtype == h.dtype and out.shape == (h.shape[0], head.out_features):
            logits = torch.mm(h, head.weight.t(), out=out)  # no fresh 50 MB tensor per chunk
            if head.bias is not None:
                logits += head.bias
        else:
            logits = head(h)
        if self.softcap is not None:  # Gemma 2/3: logits = cap · tanh(logits / cap)
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def verify(self, item: ScoreItem) -> float:
        """Max |split − direct| logit difference on one sample; switches to direct mode if large."""
        ids = torch.tensor([item.input_ids], device=self.device)
        direct = self.model(input_ids=ids, use_cache=False).logits[0].float()
        split = self.logits(self.hidden(ids)[0]).float()
        err = float((direct - split).abs().max())
        tol = (1e-3 if self.dtype == torch.float32 else 5e-2) * (1.0 + float(direct.abs().max()))
        if not math.isfinite(err) or err > tol:
            log.warning(
                "%s: decoder + LM head does not reproduce the model's logits (max diff %.3g); "
                "scoring with full forwards, without the hidden-state cache",
                type(unwrap(self.model)).__name__,
                err,
            )
            self.direct = True
        self.verified = True
        return err


def _logit_size(view: ModelView) -> int | None:
    head = view.head
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if w is not None else None


def check_same_vocabulary(view_o: ModelView, view_p: ModelView, name_o: str = "original", name_p: str = "pruned") -> None:
    """The JSD compares two next-token distributions element by element: both models' LM heads
    must have one vocabulary size. Checked before any scoring, since an identical tokenizer
    does not imply it (a checkpoint padded to a multiple of 64 or 128 has extra rows)."""
    vo, vp = _logit_size(view_o), _logit_size(view_p)
    if vo is not None and vp is not None and vo != vp:
        raise ModelError(
            f"the {name_o} and {name_p} models have different vocabulary sizes ({vo} vs {vp} output logits) "
            "although they share a tokenizer; PASER compares their next-token distributions and needs one size "
            "(was one of them resized or padded, e.g. resize_token_embeddings(pad_to_multiple_of=...)?)"
        )


# ----------------------------------------------------------------------------- hidden-state cache


class HiddenCache:
    """The original model's final hidden states at response-predicting positions, per record.

    Stored as .npy blobs (one per flush, memory-mapped on read) plus a parquet index in a
    ShardStore (id, file, offset, n). The blob is written before its index shard, so a kill
    between the two leaves only an unreferenced file. ~576 floats per response token for
    SmolLM2.
    """

    def __init__(self, root: Path, dtype: str = "float32", meta: dict | None = None):
        self.np_dtype = _HIDDEN_DTYPES[dtype]
        self.store = ShardStore(root, meta=meta, validate=validate_hidden_index)
        self.root = self.store.root
        cols = self.store.read()
        self.index: dict[str, tuple[str, int, int]] = {}
        if cols:
            for i, f, o, n in zip(cols["id"], cols["file"], cols["offset"], cols["n"]):
                self.index[str(i)] = (str(f), int(o), int(n))
        self._maps: dict[str, np.ndarray] = {}
        self._pending: list[tuple[str, np.ndarray]] = []

    def get(self, item_id: str, n: int) -> np.ndarray | None:
        hit = self.index.get(item_id)
        if hit is None or hit[2] != n:
            return None
        f, o, _ = hit
        arr = self._maps.get(f)
        if arr is None:
            arr = self._open_blob(f)
            if arr is None:
                return None
        if o + n > arr.shape[0]:
            return None
        return np.asarray(arr[o : o + n])

    def _open_blob(self, f: str) -> np.ndarray | None:
        """The blob memory-mapped, once its bytes match the checksum in its name; None (and its
        entries forgotten, so the original model runs again) when it is missing or damaged."""
        path = self.root / f
        want = f.rsplit("-", 1)[-1][: -len(".npy")] if f.count("-") >= 4 else None
        try:
            if want is not None and len(want) == 16:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest()[:16] != want:
                    raise ValueError("checksum mismatch")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.ndim != 2:
                raise ValueError(f"expected a 2-D array, got shape {arr.shape}")
        except (OSError, ValueError) as e:
            log.warning("hidden-state cache file %s dropped, the original model will run again: %s", path, e)
            self.index = {i: v for i, v in self.index.items() if v[0] != f}
            return None
        self._maps[f] = arr
        return arr

    def round(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a cache round trip does to `hidden`: fresh and cached values must agree exactly."""
        if self.np_dtype == np.float16:
            return hidden.to(torch.float16).to(hidden.dtype)
        return hidden

    def put(self, item_id: str, hidden: torch.Tensor) -> None:
        self._pending.append((item_id, hidden.detach().to("cpu", torch.float32).numpy().astype(self.np_dtype)))

    def flush(self, rank: int = 0) -> None:
        if not self._pending:
            return
        blob = np.concatenate([h for _, h in self._pending], axis=0)
        buf = io.BytesIO()
        np.save(buf, blob, allow_pickle=False)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()[:16]  # checked before the blob is first read
        name = f"hid-r{rank:03d}-{stable_hash([i for i, _ in self._pending], 12)}-{time.time_ns() % 10**9:09d}-{digest}.npy"
        atomic_write_bytes(self.root / name, data)
        offs = np.cumsum([0] + [len(h) for _, h in self._pending])[:-1]
        cols = {
            "id": [i for i, _ in self._pending],
            "file": [name] * len(self._pending),
            "offset": offs.astype(np.int64),
            "n": np.array([len(h) for _, h in self._pending], dtype=np.int64),
        }
        self.store.append(cols, rank=rank)
        for (i, h), o in zip(self._pending, offs):
            self.index[i] = (name, int(o), len(h))
        self._pending = []


# ----------------------------------------------------------------------------- the driver


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    return stable_hash([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])


BatchFn = Callable[[list[ScoreItem]], dict[str, np.ndarray]]


def _drive(
    items: list[ScoreItem],
    store: ShardStore,
    batch_fn: BatchFn,
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    flush_every: int,
    flush_seconds: float = 60.0,
    overhead_tokens: int = 128,
    rank: int,
    world_size: int,
    desc: str,
    progress: bool,
    before_flush: Callable[[], None] | None = None,
) -> EngineStats:
    """Score this rank's share batch by batch, skipping batches already in `store`.

    `batch_fn` returns columns (including "id") for every item of a batch; only rows not yet
    in the store are kept. Pending rows are appended as one shard every `flush_every`
    batches or `flush_seconds` seconds, whichever comes first, and at the end
    (`before_flush` runs first: the hidden cache writes its blobs). So a kill loses at most
    that much scoring; an interrupt (Ctrl-C) or an error keeps every finished batch.
    """
    from tqdm.auto import tqdm

    share = rank_share(items, rank, world_size)
    done = store.done_ids()
    stats = EngineStats(samples_total=len(share), samples_cached=sum(it.id in done for it in share))
    todo_batches = [
        (s, e)
        for s, e in plan_batches([it.length for it in share], max_batch_tokens, max_batch_size, overhead_tokens)
        if any(share[k].id not in done for k in range(s, e))
    ]
    pending: dict[str, list] = {}
    n_pending_batches = 0
    t0, c0 = time.perf_counter(), time.process_time()
    last_flush = t0

    def flush() -> None:
        nonlocal pending, n_pending_batches, last_flush
        if before_flush is not None:
            before_flush()
        if pending and pending["id"]:
            store.append({k: (v if k == "id" else np.asarray(v)) for k, v in pending.items()}, rank=rank)
        pending, n_pending_batches, last_flush = {}, 0, time.perf_counter()

    if not todo_batches:  # say so, rather than draw an empty progress bar
        log.info("%s: cached (%d samples)", desc, len(share))
        return stats
    bar = tqdm(
        total=len(share) - stats.samples_cached, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True
    )
    try:
        with torch.inference_mode():
            for s, e in todo_batches:
                batch = share[s:e]
                cols = batch_fn(batch)
                keep = [k for k, it in enumerate(batch) if it.id not in done]
                for name, values in cols.items():
                    pending.setdefault(name, []).extend(np.asarray(values)[keep].tolist())
                stats.batches += 1
                stats.samples_scored += len(keep)
                stats.tokens += sum(batch[k].length for k in keep)
                n_pending_batches += 1
                if n_pending_batches >= flush_every or time.perf_counter() - last_flush >= flush_seconds:
                    flush()
                bar.update(len(keep))
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"{stats.tokens / max(el, 1e-9):,.0f} tok/s")
            flush()
    except BaseException:
        try:
            flush()  # the rows of finished batches are valid: keep them for the resumed run
        except Exception as e:  # e.g. the disk is full: the first error is the one to report
            log.warning("could not save the finished batches: %s", e)
        raise
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    stats.cpu_seconds = time.process_time() - c0
    return stats


def _gather_results(
    records: Sequence[Record], store: ShardStore, columns: list[str], items: list[ScoreItem]
) -> dict[str, np.ndarray]:
    """Cached columns in the order of `records`; NaN / -1 where a row is not (yet) scored."""
    cols = store.read()
    n = len(records)
    out: dict[str, np.ndarray] = {c: np.full(n, np.nan) for c in columns}
    by_item = {it.id: it for it in items}
    out["n_response"] = np.array([by_item[r.id].n_response for r in records], dtype=np.int64)
    out["n_prompt"] = np.array([by_item[r.id].n_prompt for r in records], dtype=np.int64)
    if cols:
        pos = {str(i): k for k, i in enumerate(cols["id"])}
        for j, r in enumerate(records):
            k = pos.get(r.id)
            if k is not None:
                for c in columns:
                    out[c][j] = cols[c][k]
    return out


def _response_hidden(view: ModelView, ids, lengths, n_prompt) -> tuple[torch.Tensor, torch.Tensor]:
    h = view.hidden(ids)
    return gather_response(h, ids, lengths, n_prompt)


def _logit_buffer(view: ModelView, rows: int, cache: dict) -> torch.Tensor | None:
    """A reusable [rows, V] buffer for `view.logits` (see divergence.Workspace for why)."""
    if view.direct:
        return None
    V = view.head.out_features if hasattr(view.head, "out_features") else None
    if V is None:
        return None
    key = (id(view), view.device, view.dtype, V)
    buf = cache.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = cache[key] = torch.empty(rows, V, dtype=view.dtype, device=view.device)
    return buf[:rows]


def _open_store(cache_dir: str | Path | None, kind: str, key: dict, validate) -> ShardStore:
    """The shard store of one scoring key (under cache_dir, default the paser cache)."""
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return ShardStore(cache_root / "scores" / kind / stable_hash(key), meta=key, validate=validate)


def _batch_columns(batch: Sequence[ScoreItem], counts: list[int], **scores: np.ndarray) -> dict[str, np.ndarray]:
    """A batch's rows for the store: id, the per-record scores, then the token counts."""
    return {
        "id": np.array([it.id for it in batch], dtype=object),
        **scores,
        "n_response": np.array(counts, dtype=np.int64),
        "n_prompt": np.array([it.n_prompt for it in batch], dtype=np.int64),
    }


def _verify_once(views: Sequence[ModelView], items: Sequence[ScoreItem]) -> None:
    """Check each view's decoder/head split on the shortest item (by length, then id), once."""
    shortest = min(items, key=lambda it: (it.length, it.id))
    with torch.inference_mode():
        for v in views:
            if not v.verified:
                v.verify(shortest)


def _require_complete(scores, world_size: int):
    if world_size == 1 and not scores.complete:  # pragma: no cover - would be an engine bug
        raise RuntimeError("scoring finished with rows missing from the cache")
    return scores


def _score_into(items, records, store, batch_fn, columns, *, prepare=None, rank=0, world_size=1, **drive_kw):
    """The skeleton every per-record score shares: under the store's lock (a concurrent run on
    this cache waits, then reads what this one scored), `prepare()` once if this rank has
    anything left to score, the batches not yet in the store, then the columns in the order of
    `records`. Returns (EngineStats, columns)."""
    with store.lock(rank):
        if prepare is not None and items:
            done = store.done_ids()
            if any(it.id not in done for it in rank_share(items, rank, world_size)):
                prepare()
        stats = _drive(items, store, batch_fn, rank=rank, world_size=world_size, **drive_kw)
        return stats, _gather_results(records, store, columns, items)


def score_degradation(
    original,
    pruned,
    records: Sequence[Record],
    template: str = "alpaca",
    cutoff: int = 256,
    cache_dir: str | Path | None = None,
    *,
    tokenizer=None,
    max_batch_tokens: int = 4096,
    max_batch_size: int = 256,
    chunk: int = 256,
    flush_every: int = 8,
    flush_seconds: float = 60.0,
    rank: int = 0,
    world_size: int = 1,
    reuse_original: bool = True,
    hidden_dtype: str = "float32",
    progress: bool = True,
) -> DegradationScores:
    """Per-sample capability degradation JSD_i of `pruned` against `original` (CDAIS, Eq. 5).

    original, pruned: `paser.io.models.LoadedModel`s sharing one tokenizer. Each record is
    encoded with `template` and `cutoff` (as recovery training does) and teacher-forced
    through both models; JSD_i is the mean over its response tokens of the full-vocabulary
    token JSD. Results are cached under `cache_dir` keyed by both fingerprints, template,
    cutoff and tokenizer; the original's hidden states are cached by its fingerprint alone
    (`reuse_original`), so further pruned variants never rerun the original.

    With world_size > 1 each rank scores its share into the shared cache and returns what
    the cache holds so far (NaN elsewhere); call again with world_size=1 once all ranks are
    done to read (and complete) the full table.
    """
    from paser.io.models import check_same_tokenizer

    if hidden_dtype not in _HIDDEN_DTYPES:
        raise PaserError(f"hidden_dtype must be one of {', '.join(_HIDDEN_DTYPES)}, got {hidden_dtype!r}")
    tok = tokenizer if tokenizer is not None else original.tokenizer
    if tokenizer is None and pruned.tokenizer is not None and pruned.tokenizer is not original.tokenizer:
        check_same_tokenizer(original.tokenizer, pruned.tokenizer)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()  # the hidden cache's too
    items = encode_records(records, tok, template, cutoff)
    tkey = _tokenizer_key(tok)
    key = {
        "kind": "degradation",
        "original": original.fingerprint,
        "pruned": pruned.fingerprint,
        "template": template,
        "cutoff": cutoff,
        "tokenizer": tkey,
        "hidden_dtype": hidden_dtype if reuse_original else "none",
        "version": ENGINE_VERSION,
    }
    store = _open_store(cache_root, "degradation", key, validate_degradation_shard)
    view_o, view_p = ModelView(original.model), ModelView(pruned.model)
    check_same_vocabulary(view_o, view_p, original.name or "original", pruned.name or "pruned")
    for m in (original.model, pruned.model):
        m.eval()

    hidden_cache: HiddenCache | None = None
    workspace, buffers = Workspace(), {}
    stats_extra = {"original_forward_samples": 0}
    pad = pad_id(tok)
    drive_kw = dict(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, flush_every=flush_every,
                    flush_seconds=flush_seconds, rank=rank, world_size=world_size, progress=progress)

    def prepare() -> None:
        nonlocal hidden_cache
        _verify_once((view_o, view_p), items)
        if reuse_original and not view_o.direct:
            hkey = {
                "kind": "final_hidden",
                "original": original.fingerprint,
                "template": template,
                "cutoff": cutoff,
                "tokenizer": tkey,
                "dtype": hidden_dtype,
                "version": ENGINE_VERSION,
            }
            hidden_cache = HiddenCache(cache_root / "scores" / "final_hidden" / stable_hash(hkey), hidden_dtype, meta=hkey)

    def batch_fn(batch: list[ScoreItem]) -> dict[str, np.ndarray]:
        ids, lengths, n_prompt = _collate(batch, pad, view_p.device)
        counts = [it.n_response for it in batch]
        cached = [hidden_cache.get(it.id, it.n_response) for it in batch] if hidden_cache is not None else None
        if cached is not None and all(c is not None for c in cached):
            h_o = torch.from_numpy(np.concatenate(cached, axis=0)).to(view_o.device, torch.float32)
        else:
            h_o, _ = _response_hidden(view_o, ids.to(view_o.device), lengths, n_prompt)
            stats_extra["original_forward_samples"] += len(batch)
            if hidden_cache is not None:
                h_o = hidden_cache.round(h_o.float())
                offs = np.cumsum([0] + counts)
                for k, it in enumerate(batch):
                    if cached[k] is None:
                        hidden_cache.put(it.id, h_o[offs[k] : offs[k + 1]])
        h_p, targets = _response_hidden(view_p, ids, lengths, n_prompt)
        N = h_p.shape[0]
        jsd = torch.empty(N, dtype=torch.float32)
        nll_o = torch.empty(N, dtype=torch.float32)
        nll_p = torch.empty(N, dtype=torch.float32)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            lo = view_o.logits(h_o[s:e], out=_logit_buffer(view_o, e - s, buffers))
            lp = view_p.logits(h_p[s:e], out=_logit_buffer(view_p, e - s, buffers)).to(lo.device)
            j, no, npr = token_jsd_and_nll(lo, lp, targets[s:e].to(lo.device), chunk=chunk, workspace=workspace)
            jsd[s:e], nll_o[s:e], nll_p[s:e] = j.cpu(), no.cpu(), npr.cpu()
        return _batch_columns(batch, counts, jsd=segment_mean(jsd, counts).numpy(),
                              nll_original=segment_mean(nll_o, counts).numpy(), nll_pruned=segment_mean(nll_p, counts).numpy())

    stats, cols = _score_into(
        items, records, store, batch_fn, ["jsd", "nll_pruned", "nll_original"],
        prepare=prepare, before_flush=lambda: hidden_cache.flush(rank) if hidden_cache is not None else None,
        desc=f"degradation ({pruned.name or 'pruned'})", **drive_kw,
    )
    stats.original_forward_samples = stats_extra["original_forward_samples"]
    return _require_complete(DegradationScores(
        ids=[r.id for r in records],
        jsd=cols["jsd"],
        nll_pruned=cols["nll_pruned"],
        nll_original=cols["nll_original"],
        n_response=cols["n_response"],
        n_prompt=cols["n_prompt"],
        stats=stats,
    ), world_size)


def score_loss(
    model,
    records: Sequence[Record],
    template: str = "alpaca",
    cutoff: int = 256,
    cache_dir: str | Path | None = None,
    condition_on_prompt: bool = True,
    *,
    tokenizer=None,
    max_batch_tokens: int = 4096,
    max_batch_size: int = 256,
    chunk: int = 256,
    flush_every: int = 8,
    flush_seconds: float = 60.0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> LossScores:
    """Per-sample mean response NLL under `model` (a LoadedModel): loss(y|x) or loss(y).

    IFD (Cherry LLM) = loss(y|x) / loss(y): call this twice, with condition_on_prompt True
    and False. Both average exactly the same response tokens (those the template encoding
    keeps); loss(y) sees them after a single BOS (or EOS) token instead of the prompt.
    Same batching, caching and sharding as `score_degradation`.
    """
    tok = tokenizer if tokenizer is not None else model.tokenizer
    items = encode_records(records, tok, template, cutoff, condition_on_prompt)
    key = {
        "kind": "loss",
        "model": model.fingerprint,
        "template": template,
        "cutoff": cutoff,
        "conditioned": bool(condition_on_prompt),
        "tokenizer": _tokenizer_key(tok),
        "version": ENGINE_VERSION,
    }
    store = _open_store(cache_dir, "loss", key, validate_loss_shard)
    view = ModelView(model.model)
    model.model.eval()
    pad = pad_id(tok)
    drive_kw = dict(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, flush_every=flush_every,
                    flush_seconds=flush_seconds, rank=rank, world_size=world_size, progress=progress)
    buffers: dict = {}

    def batch_fn(batch: list[ScoreItem]) -> dict[str, np.ndarray]:
        _verify_once((view,), items)
        ids, lengths, n_prompt = _collate(batch, pad, view.device)
        counts = [it.n_response for it in batch]
        h, targets = _response_hidden(view, ids, lengths, n_prompt)
        nll = torch.empty(h.shape[0], dtype=torch.float32)
        for s in range(0, h.shape[0], chunk):
            e = min(h.shape[0], s + chunk)
            logits = view.logits(h[s:e], out=_logit_buffer(view, e - s, buffers))
            nll[s:e] = token_nll(logits, targets[s:e], chunk=chunk).cpu()
        return _batch_columns(batch, counts, nll=segment_mean(nll, counts).numpy())

    stats, cols = _score_into(items, records, store, batch_fn, ["nll"], desc=f"loss(y{'|x' if condition_on_prompt else ''}) {model.name}", **drive_kw)
    return _require_complete(LossScores(
        ids=[r.id for r in records],
        nll=cols["nll"],
        n_response=cols["n_response"],
        n_prompt=cols["n_prompt"],
        conditioned=bool(condition_on_prompt),
        stats=stats,
    ), world_size)
