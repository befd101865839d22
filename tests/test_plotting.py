"""The one matplotlib door: user strings are plain text, and so are the tick labels of log axes."""
from __future__ import annotations

from icehpc.plotting import log_axis, pyplot


def test_a_math_looking_name_is_drawn_as_text():
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.bar([r"$\frac{x$ col", "plate"], [1, 2])
    ax.set_title(r"$\frac{x$ col")
    fig.canvas.draw()  # raises on math text parsing when it is on
    assert [t.get_text() for t in ax.get_xticklabels()] == [r"$\frac{x$ col", "plate"]
    plt.close(fig)


def test_log_axes_label_their_ticks_in_plain_text():
    """Math text is off for user strings, so matplotlib's default log labels would print as
    ``$\\mathdefault{10^{2}}$``: every log axis icehpc draws goes through log_axis."""
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1, 100, 10_000])
    log_axis(ax, "y")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and not any("$" in t or "mathdefault" in t for t in labels), labels
    assert "100" in labels
    plt.close(fig)


def test_no_module_sets_a_log_scale_around_the_plain_labels():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "icehpc"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "plotting.py"
                 and any(k in p.read_text() for k in ('set_yscale("log")', 'set_xscale("log")', "semilog", "loglog"))]
    assert offenders == []
