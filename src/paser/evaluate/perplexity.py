"""Perplexity by a stated protocol: the maths lives in `paser.score.perplexity` (pruning
reports it too, and prune must not depend on evaluate); re-exported here for callers of
`paser.evaluate.perplexity`."""

from paser.score.perplexity import (
    PerplexityResult, corpus_perplexity, leading_token_ids, perplexity, window_nlls, window_token_ids,
)

__all__ = ["PerplexityResult", "corpus_perplexity", "leading_token_ids", "perplexity", "window_nlls", "window_token_ids"]
