"""The one way icehpc opens matplotlib: headless (Agg), house style, and every string plain text.

User strings (class names, campaign labels, file names) reach titles, tick labels and legends;
matplotlib would parse ``$...$`` in them as math text and raise on ``$\\frac{x$``. With
``text.parse_math`` off every string is drawn as written, so no name can crash a figure.
"""
from __future__ import annotations

from typing import Any

STYLE = {"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none",
         "text.parse_math": False, "text.usetex": False}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend with :data:`STYLE` applied (math text off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def log_axis(ax: Any, which: str = "y") -> None:
    """Put ``ax``'s x or y axis on a log scale with plain tick labels (``1``, ``10``, ``100``, ``0.1``).

    matplotlib writes log tick labels as math text (``$\\mathdefault{10^{2}}$``), which :data:`STYLE`
    turns off for the sake of user strings; these labels need none."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
