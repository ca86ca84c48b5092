"""Per cluster of a selection: size, CDS, budget, what was selected, the key phrases its records
share and two example selected records: what a user looks at to trust a selection.

Read from a selection directory: report.json (sizes, cds, n_k, selected, top_sources per
cluster), scores.parquet (`cluster`, `concepts`, `decision`, `ies`, `id` per pool record) and
selected.jsonl (the selected records as written). An archived row keeps only report.json, so
it gets the counts and sources without phrases or examples.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

N_PHRASES = 4
N_EXAMPLES = 2
TRUNCATE = 110  # characters of prompt and of response per example


def _truncate(text: str, n: int = TRUNCATE) -> str:
    text = " ".join(str(text).split())  # one line: newlines and runs of spaces would break tables
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def record_text(d: dict) -> tuple[str, str]:
    """(prompt, response) of a selected record in any of the schemas paser reads: Alpaca
    (instruction/input/output), OpenAI `messages`, ShareGPT `conversations`, prompt/completion."""
    if isinstance(d.get("messages"), list) and d["messages"]:
        msgs = [m for m in d["messages"] if isinstance(m, dict)]
        user = next((m.get("content", "") for m in msgs if m.get("role") == "user"), "")
        reply = next((m.get("content", "") for m in reversed(msgs) if m.get("role") == "assistant"), "")
        return str(user), str(reply)
    if isinstance(d.get("conversations"), list) and d["conversations"]:
        turns = [t for t in d["conversations"] if isinstance(t, dict)]
        user = next((t.get("value", "") for t in turns if t.get("from") in ("human", "user")), "")
        reply = next((t.get("value", "") for t in reversed(turns) if t.get("from") in ("gpt", "assistant")), "")
        return str(user), str(reply)
    prompt = d.get("instruction", d.get("prompt", d.get("question", "")))
    if d.get("input"):
        prompt = f"{prompt} {d['input']}"
    return str(prompt), str(d.get("output", d.get("completion", d.get("response", d.get("answer", "")))))


def _read_scores(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    cols = [c for c in ("id", "cluster", "concepts", "decision", "ies") if c in pq.read_schema(path).names]
    if "cluster" not in cols:
        return None
    return pq.read_table(path, columns=cols).to_pylist()


def _read_selected(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out[str(d.get("id"))] = d
    return out


def cluster_rows(sel_dir: str | Path) -> list[dict] | None:
    """One dict per cluster (cluster, size, cds, n_k, selected, sources, phrases, examples);
    None when the directory has no cluster report."""
    d = Path(sel_dir)
    try:
        rep = json.loads((d / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    cl = rep.get("clusters") or {}
    sizes = cl.get("sizes")
    if not sizes:
        return None
    scores = _read_scores(d / "scores.parquet")
    records = _read_selected(d / "selected.jsonl")
    rows = []
    for c, size in enumerate(sizes):
        row = {"cluster": c, "size": int(size)}
        for k in ("cds", "n_k", "selected"):
            if cl.get(k) is not None and c < len(cl[k]):
                row[k] = cl[k][c]
        if cl.get("top_sources") and c < len(cl["top_sources"]):
            row["sources"] = list(cl["top_sources"][c])[:2]
        if scores is not None:
            members = [s for s in scores if s["cluster"] == c]
            # key phrases: those most of the cluster's records share (counted once per record)
            counts = Counter(p for s in members for p in dict.fromkeys(s.get("concepts") or []))
            row["phrases"] = [p for p, _ in counts.most_common(N_PHRASES)]
            chosen = [s for s in members if str(s.get("decision", "")).startswith("selected") or s.get("decision") == "ntm_override"]
            chosen.sort(key=lambda s: -(s.get("ies") or 0.0))  # the method's own priority first
            row["examples"] = [record_text(records[str(s["id"])]) for s in chosen if str(s["id"]) in records][:N_EXAMPLES]
        rows.append(row)
    return rows


def cluster_table(rows: list[dict]) -> tuple[list[str], list[list[str]], list[list[tuple[str, str]]]]:
    """Header, text cells, and per row its examples as (prompt, response) truncated: the
    Markdown and HTML writers lay the examples out their own way."""
    has = {k: any(k in r for r in rows) for k in ("cds", "n_k", "selected", "phrases", "sources")}
    header = ["Cluster", "Size"] + (["CDS"] if has["cds"] else []) + (["Budget n_k"] if has["n_k"] else []) \
        + (["Selected"] if has["selected"] else []) + (["Key phrases"] if has["phrases"] else []) \
        + (["Main sources"] if has["sources"] and not has["phrases"] else [])
    body, examples = [], []
    for r in rows:
        cells = [str(r["cluster"]), f"{r['size']:,}"]
        if has["cds"]:
            cells.append(f"{r['cds']:.4f}" if r.get("cds") is not None else "-")
        if has["n_k"]:
            cells.append(str(r.get("n_k", "-")))
        if has["selected"]:
            cells.append(str(r.get("selected", "-")))
        if has["phrases"]:
            cells.append(", ".join(r.get("phrases") or []) or "-")
        if has["sources"] and not has["phrases"]:
            cells.append(", ".join(r.get("sources") or []) or "-")
        body.append(cells)
        examples.append([(_truncate(p), _truncate(a)) for p, a in r.get("examples") or []])
    return header, body, examples


def first_cluster_selection(selections: dict) -> tuple[str, Path] | None:
    """The selection the report's cluster section shows: the first PASER unit that has a
    cluster report (the others are in their own selection directories)."""
    for label, sel in selections.items():
        if label.startswith("paser") and sel.get("dir") and (Path(sel["dir"]) / "report.json").exists():
            return label, Path(sel["dir"])
    return None
