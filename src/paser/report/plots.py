"""The selection's plots, where they were before they moved to `paser.select.plots` (the select
stage draws them; the report only shows the PNGs)."""

from paser.select.plots import plot_budget_per_cluster, plot_cluster_map, spread_labels

__all__ = ["plot_budget_per_cluster", "plot_cluster_map", "spread_labels"]
