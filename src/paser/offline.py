"""Offline for one block of code, without changing the process for the user's other code.

Setting HF_HUB_OFFLINE in os.environ for good would also cut off the user's own hub calls in
the same process. huggingface_hub and datasets read the variables once, at import, into module
constants, so this sets both the variables (for modules imported inside the block) and the
constants of modules already imported, and restores everything on exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# (module, attribute) pairs that cache the offline switch at import time.
_CONSTANTS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block, huggingface_hub, transformers and datasets never use the network."""
    saved_env = {k: os.environ.get(k) for k in _ENV}
    saved_const: list[tuple[object, str, object]] = []
    for mod_name, attr in _CONSTANTS:
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            saved_const.append((mod, attr, getattr(mod, attr)))
    try:
        for k in _ENV:
            os.environ[k] = "1"
        for mod, attr, _ in saved_const:
            setattr(mod, attr, True)
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, attr, v in saved_const:
            setattr(mod, attr, v)
