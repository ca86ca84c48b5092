"""A results archive: what an experiment finished, small enough to commit and carry to another machine.

A pipeline's own stage cache holds model weights, adapters and hidden states (gigabytes) and
lives on one machine. A long experiment on a small machine outlives that machine (a CPU run of
the recovery benchmark takes longer than one working session, and a fresh machine starts with
an empty cache). The archive keeps, per finished row (the dense model, the unrecovered model,
each select/recover/evaluate unit), only what the report needs: the evaluation results with
their per-item arrays (paired comparisons), the selection's and recovery's summaries, the
selected record ids and the PASER figures. It also mirrors the per-sample score stores (a few
hundred kB), so that a later selection on the same pruned model reads its scores instead of
re-running both models.

A row is found by a key made from everything that produced it, with machine-specific paths
left out. It also records the pruned model's fingerprint; a run whose pruned model differs
still reuses the row (pruning is re-run on each machine, and floating-point sums may break a
tie at the mask threshold differently), but says so in its log and report.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from paser.io.cache import atomic_write_bytes, atomic_write_json, stable_hash

log = logging.getLogger(__name__)

# Bump when the row format or what a key means changes: old rows then no longer match.
ARCHIVE_VERSION = 1
# The files of a selection that the report shows (the PASER figures) or that document it.
SELECTION_FILES = ("report.json", "cluster_map.png", "budget_per_cluster.png")
# Score stores worth carrying: per-sample numbers keyed by model fingerprints. Hidden states
# and embeddings are large and cheap to recompute by comparison, so they stay behind.
SCORE_STORES = ("degradation", "loss")


class ResultArchive:
    """A folder of finished rows: `rows/<label>-<hash>/row.json` plus the unit's small files,
    and `scores/<kind>/<hash>/` mirrors of the pipeline's score stores."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, label: str, key: dict) -> Path:
        return self.root / "rows" / f"{label}-{stable_hash({'archive': ARCHIVE_VERSION, **key}, 12)}"

    def get(self, label: str, key: dict) -> dict | None:
        """The archived record (row, provenance) for this key, or None."""
        path = self._dir(label, key) / "row.json"
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:  # a damaged file is recomputed, not trusted
            log.warning("archive: ignoring unreadable %s (%s)", path, e)
            return None
        if rec.get("key") != json.loads(json.dumps(key, default=str)):
            log.warning("archive: %s holds another key (hash collision or hand edit); ignoring it", path)
            return None
        row = rec["row"]
        row["archived_from"] = str(path.parent)
        if "_selection" in row:  # the PASER figures travel with the archived row
            row["_selection"]["dir"] = row["archived_from"]
        return rec

    def put(self, label: str, key: dict, row: dict, *, pruned_fingerprint: str | None, provenance: dict,
            selection_dir: str | Path | None = None, selected_ids: list[str] | None = None) -> Path:
        """Archive one finished row; files are written atomically, row.json last (it marks the row done)."""
        d = self._dir(label, key)
        d.mkdir(parents=True, exist_ok=True)
        if selection_dir is not None:
            for name in SELECTION_FILES:
                src = Path(selection_dir) / name
                if src.exists():
                    atomic_write_bytes(d / name, src.read_bytes())
        if selected_ids is not None:
            atomic_write_json(d / "selected_ids.json", selected_ids)
        rec = {
            "key": key,
            "label": label,
            "pruned_fingerprint": pruned_fingerprint,
            "archived_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance,
            "row": _portable(row),
        }
        # Compact JSON: the per-item arrays make up most of a row.
        blob = json.dumps(rec, sort_keys=False, default=str, ensure_ascii=False, separators=(",", ":"))
        atomic_write_bytes(d / "row.json", (blob + "\n").encode("utf-8"))
        return d

    # ------------------------------------------------------------------ score stores

    def save_scores(self, cache_dir: str | Path, fingerprint: str | None) -> int:
        """Copy the finished shards of the cache's score stores that scored the model with this
        fingerprint (a cache may hold other experiments' stores too) into the archive; returns
        the number of files copied."""
        if not fingerprint:
            return 0
        return _mirror(Path(cache_dir) / "scores", self.root / "scores", fingerprint)

    def restore_scores(self, cache_dir: str | Path) -> int:
        """Copy archived score shards into a cache where it lacks them; returns files copied."""
        return _mirror(self.root / "scores", Path(cache_dir) / "scores")


def _scored_model(store: Path) -> str | None:
    """The fingerprint of the model a store scored: `pruned` (degradation) or `model` (loss)."""
    try:
        meta = json.loads((store / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta.get("pruned") or meta.get("model")


def _mirror(src_root: Path, dst_root: Path, fingerprint: str | None = None) -> int:
    """Copy meta.json and shard files of every store under src_root/<kind>/<hash>/ that dst lacks
    (only the stores of the model with `fingerprint`, when given).

    Shards are immutable once written (named by a random id), so copying the missing ones is a
    complete sync; each copy is atomic, so a kill leaves no half shard.
    """
    n = 0
    for kind in SCORE_STORES:
        for store in sorted((src_root / kind).glob("*")) if (src_root / kind).is_dir() else []:
            if fingerprint is not None and _scored_model(store) != fingerprint:
                continue
            for f in sorted(store.iterdir()):
                if f.name == "meta.json" or (f.name.startswith("shard-") and f.suffix == ".parquet"):
                    dst = dst_root / kind / store.name / f.name
                    if not dst.exists():
                        atomic_write_bytes(dst, f.read_bytes())
                        n += 1
    return n


def _portable(row: dict) -> dict:
    """The row without this machine's paths to weights (they do not travel)."""
    out = {k: v for k, v in row.items() if k not in ("selection_dir", "recover_dir")}
    return json.loads(json.dumps(out, default=str))


def archive_key(**parts: Any) -> dict:
    """A key from named parts, JSON-normalised (tuples become lists, paths strings)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))
