"""PNG plots of a selection: the cluster map coloured by capability degradation, the budget per cluster.

`paser select --plots` draws them into the selection's directory; the experiment report shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from paser.io.figures import pyplot, save_png


def plot_cluster_map(coords: np.ndarray, labels: np.ndarray, cds: np.ndarray, path: str | Path, title: str = "S2RIC clusters") -> np.ndarray:
    """2-D map (the first two diffusion coordinates), each point coloured by its cluster's CDS;
    one label per cluster, moved off the others where their centres crowd (with a leader line).
    Returns the labels' positions (axes fractions), for checking."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    xy = coords[:, :2] if coords.shape[1] >= 2 else np.c_[coords[:, 0], np.zeros(len(coords))]
    colour = cds[labels] if len(cds) and np.any(cds) else labels
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=6, cmap="viridis", alpha=0.7, linewidths=0)
    ids = [c for c in range(int(labels.max()) + 1) if (labels == c).any()]
    centres = np.array([[np.median(xy[labels == c, 0]), np.median(xy[labels == c, 1])] for c in ids]).reshape(-1, 2)
    ax.margins(0.08)  # room at the frame for labels pushed outwards
    fig.canvas.draw()  # the final axis limits, so label boxes can be measured in axes fractions
    to_axes = ax.transData + ax.transAxes.inverted()
    anchors = to_axes.transform(centres) if len(centres) else centres
    places = spread_labels(anchors, box=(0.055, 0.045))
    for c, (ax_, ay_), (px, py) in zip(ids, anchors, places):
        moved = abs(px - ax_) + abs(py - ay_) > 1e-3
        ax.annotate(str(c), (ax_, ay_), xycoords="axes fraction", xytext=(px, py), textcoords="axes fraction",
                    fontsize=9, weight="bold", ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.85, lw=0.5),
                    arrowprops=dict(arrowstyle="-", lw=0.6, color="0.3") if moved else None)
    fig.colorbar(sc, ax=ax, label="cluster CDS (mean JSD)" if np.any(cds) else "cluster")
    ax.set_xlabel("diffusion coordinate 1")
    ax.set_ylabel("diffusion coordinate 2")
    ax.set_title(title)
    save_png(fig, path, dpi=120, bbox_inches="tight")
    return places


def spread_labels(points: np.ndarray, box: tuple[float, float], iters: int = 400) -> np.ndarray:
    """Label positions (axes fractions) near `points` whose boxes of size `box` do not overlap.

    Overlapping pairs are pushed apart along the axis where they overlap least, until none
    overlaps or `iters` rounds pass; positions stay inside the axes. Written by hand because
    the usual library for this (adjustText) is not a dependency, and k <= a few dozen labels
    make the quadratic loop instant. Deterministic: the same map always gets the same labels.
    """
    pos = np.array(points, dtype=float).reshape(-1, 2).copy()
    w, h = box
    lo, hi = np.array([w / 2, h / 2]), np.array([1 - w / 2, 1 - h / 2])
    pos = np.clip(pos, lo, hi)
    rng = np.random.default_rng(0)  # breaks exact ties (identical centres) the same way every time
    for _ in range(iters):
        moved = False
        for i in range(len(pos)):
            for j in range(i + 1, len(pos)):
                dx, dy = pos[j] - pos[i]
                ox, oy = w - abs(dx), h - abs(dy)
                if ox <= 0 or oy <= 0:
                    continue
                moved = True
                if abs(dx) < 1e-9 and abs(dy) < 1e-9:
                    dx, dy = rng.normal(size=2) * 1e-3
                sx, sy = (1.0 if dx >= 0 else -1.0), (1.0 if dy >= 0 else -1.0)
                if ox / w < oy / h:  # cheaper to separate sideways
                    step = np.array([sx * (ox / 2 + 1e-4), 0.0])
                else:
                    step = np.array([0.0, sy * (oy / 2 + 1e-4)])
                pos[i] = np.clip(pos[i] - step, lo, hi)
                pos[j] = np.clip(pos[j] + step, lo, hi)
        if not moved:
            break
    return pos


def plot_budget_per_cluster(cluster_report: dict, path: str | Path) -> None:
    """Bars: cluster size, budget n_k and samples selected, per cluster (with CDS when known)."""
    plt = pyplot()
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
    save_png(fig, path, dpi=120, bbox_inches="tight")
