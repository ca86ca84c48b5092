"""Pruning: make the pruned models that PASER recovers.

Pure maths per method (magnitude.py, wanda.py, sparsegpt.py, structured.py; masks.py for the
shared sparsity patterns), calibration text (calibration.py), and one driver that owns the model,
the hooks and the files (driver.py). The CLI and the Python API call `run_prune`.
"""

from paser.prune.calibration import Calibration, load_calibration, tokenize_calibration
from paser.prune.driver import METHODS, decoder_layers, prune_model, run_prune, save_pruned

__all__ = [
    "METHODS",
    "Calibration",
    "decoder_layers",
    "load_calibration",
    "prune_model",
    "run_prune",
    "save_pruned",
    "tokenize_calibration",
]
