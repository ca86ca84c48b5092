"""paser: post-training data selection (PASER) for efficient recovery of pruned LLMs."""

__version__ = "0.1.0"
