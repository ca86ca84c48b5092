"""PNG plots of a selection: the cluster map coloured by capability degradation, the budget per cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    from paser.io.cache import atomic_write_bytes
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_cluster_map(coords: np.ndarray, labels: np.ndarray, cds: np.ndarray, path: str | Path, title: str = "S2RIC clusters") -> None:
    """2-D map (the first two diffusion coordinates), each point coloured by its cluster's CDS."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    xy = coords[:, :2] if coords.shape[1] >= 2 else np.c_[coords[:, 0], np.zeros(len(coords))]
    colour = cds[labels] if len(cds) and np.any(cds) else labels
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=6, cmap="viridis", alpha=0.7, linewidths=0)
    for c in range(int(labels.max()) + 1):
        m = labels == c
        if m.any():
            cx, cy = np.median(xy[m, 0]), np.median(xy[m, 1])
            ax.annotate(str(c), (cx, cy), fontsize=10, weight="bold", ha="center", va="center",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8))
    fig.colorbar(sc, ax=ax, label="cluster CDS (mean JSD)" if np.any(cds) else "cluster")
    ax.set_xlabel("diffusion coordinate 1")
    ax.set_ylabel("diffusion coordinate 2")
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def plot_budget_per_cluster(cluster_report: dict, path: str | Path) -> None:
    """Bars: cluster size, budget n_k and samples selected, per cluster (with CDS when known)."""
    plt = _plt()
    sizes = np.asarray(cluster_report["sizes"])
    k = len(sizes)
    x = np.arange(k)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * k + 2), 4.5))
    ax.bar(x - 0.27, sizes, width=0.27, label="cluster size", color="#c7d4e8")
    if "n_k" in cluster_report:
        ax.bar(x, cluster_report["n_k"], width=0.27, label="budget n_k", color="#4c72b0")
    if "selected" in cluster_report:
        ax.bar(x + 0.27, cluster_report["selected"], width=0.27, label="accepted by NTM", color="#55a868")
    ax.set_xticks(x)
    ax.set_xlabel("cluster")
    ax.set_ylabel("records")
    if "cds" in cluster_report:
        ax2 = ax.twinx()
        ax2.plot(x, cluster_report["cds"], "o-", color="#c44e52", label="CDS")
        ax2.set_ylabel("CDS (mean JSD)", color="#c44e52")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Budget per cluster")
    _save(fig, path)
    plt.close(fig)
