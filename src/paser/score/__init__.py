"""Scoring: per-sample statistics of response tokens under teacher forcing.

`divergence` holds the pure maths (token JSD, NLL, response positions); `engine` owns the
models, batching and caches. PASER's capability degradation (CDAIS) and the IFD baseline
both go through `engine`, so they see the same tokens.
"""

from paser.score.divergence import token_jsd, token_jsd_and_nll, token_nll
from paser.score.engine import (
    DegradationScores,
    EngineStats,
    LossScores,
    score_degradation,
    score_loss,
)

__all__ = [
    "DegradationScores",
    "EngineStats",
    "LossScores",
    "score_degradation",
    "score_loss",
    "token_jsd",
    "token_jsd_and_nll",
    "token_nll",
]
