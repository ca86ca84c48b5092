"""Matplotlib figures saved as PNG: one way to get pyplot on a machine without a display, and
one way to write a figure (atomically: a report reader never sees half an image)."""

from __future__ import annotations

import io
import os

from paser.io.cache import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display on servers and CI).

    Imported on first use: matplotlib takes a noticeable part of a second to import, which
    `paser --help` and every stage that draws nothing should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, *, dpi: int, tight_layout: bool = False, bbox_inches: str | None = None) -> None:
    """Write `fig` as a PNG at `path` atomically and close it. tight_layout: lay the figure out
    again first; bbox_inches="tight": crop the saved image to what is drawn."""
    if tight_layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=bbox_inches)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
