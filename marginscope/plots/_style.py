"""One look for every figure: a seaborn theme applied while a figure is built, on an Agg canvas.

Figures are `matplotlib.figure.Figure` objects attached to an Agg canvas, never pyplot figures: the
library opens no window, registers nothing with pyplot (so there is nothing to close) and leaves the
caller's rcParams and backend alone. The theme is applied with `rc_context` while a figure is built,
and ticks are instantiated inside it so the look survives a later `savefig` outside the context.
"""

from __future__ import annotations

import functools
import textwrap
from typing import Callable, TypeVar

import matplotlib as mpl
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

# Responses: chosen / rejected as in the papers (blue / orange), the top output y* in brown.
RESPONSE_COLORS = {"chosen": "#4e79a7", "rejected": "#f28e2b", "top": "#9c755f"}
_EXTRA_COLORS = ("#76b7b2", "#ff9da7", "#af7aa1", "#bab0ac")
# Cases (DESIGN §2): 1 intended, 2 both ↓ (likelihood displacement), 3 both ↑, 4 margin ↓, 0 undetermined.
CASE_COLORS = {1: "#59a14f", 2: "#e15759", 3: "#edc948", 4: "#b07aa1", 0: "#bab0ac"}
CASE_LABELS = {1: "Case 1: chosen ↑ rejected ↓", 2: "Case 2: both ↓", 3: "Case 3: both ↑",
               4: "Case 4: margin ↓", 0: "undetermined (NaN)"}
CASE_MARKERS = {1: "o", 2: "v", 3: "^", 4: "D", 0: "X"}
STEP_CMAP = "viridis"
NOTE_COLOR = "0.35"
DPI = 150

F = TypeVar("F", bound=Callable[..., Figure])


def theme_rc() -> dict:
    """rcParams of the marginscope look: seaborn "whitegrid" at a compact "notebook" scale."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.8)}
    rc.update({"font.sans-serif": ["DejaVu Sans", "Liberation Sans", "sans-serif"],
               "axes.titleweight": "bold", "figure.titlesize": 11, "figure.titleweight": "bold",
               "legend.frameon": False, "image.cmap": "vlag", "savefig.dpi": DPI, "figure.dpi": 100,
               "xtick.bottom": True, "ytick.left": True, "xtick.major.size": 3, "ytick.major.size": 3,
               "axes.formatter.limits": (-3, 4), "svg.hashsalt": "marginscope"})
    return rc


def response_colors(names: list[str]) -> list[str]:
    """Fixed colours for chosen / rejected / top; other response names cycle through a short palette."""
    extras = [n for n in names if n not in RESPONSE_COLORS]
    return [RESPONSE_COLORS.get(n) or _EXTRA_COLORS[extras.index(n) % len(_EXTRA_COLORS)] for n in names]


def run_colors(n: int) -> list:
    """One colour per compared run (seaborn's colour-blind palette)."""
    return sns.color_palette("colorblind", n)


def diverging_cmap() -> Colormap:
    """Seaborn's "vlag" (blue → white → red) with NaN cells in light grey."""
    return mpl.colormaps["vlag"].with_extremes(bad="0.88")


def themed(fn: F) -> F:
    """Build the figure inside the theme, then instantiate every axis' ticks while it still applies."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(theme_rc()):
            fig = fn(*args, **kwargs)
            for ax in fig.axes:
                for axis in (ax.xaxis, ax.yaxis):
                    axis.get_major_ticks()
                    axis.get_minor_ticks()
        return fig

    return wrapper  # type: ignore[return-value]


def new_figure(width: float, height: float, title: str) -> Figure:
    """An empty constrained-layout figure on an Agg canvas, with a title."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    return fig


def note(ax: Axes, text: str) -> None:
    """Write `text` in the middle of `ax` instead of data (an empty or unusable input)."""
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, textwrap.fill(text, 60), transform=ax.transAxes, ha="center", va="center",
            color=NOTE_COLOR, fontsize=9)


def message_figure(title: str, text: str, width: float = 7.0, height: float = 3.0) -> Figure:
    """A figure whose only content is a note, for a trace that cannot feed the figure at all."""
    fig = new_figure(width, height, title)
    note(fig.add_subplot(), text)
    return fig


def corner_text(ax: Axes, text: str, loc: str = "upper left") -> None:
    """Small grey annotation in a corner of `ax` (statistics, caveats)."""
    x = 0.02 if "left" in loc else 0.98
    y = 0.97 if "upper" in loc else 0.03
    ax.text(x, y, text, transform=ax.transAxes, ha="left" if "left" in loc else "right",
            va="top" if "upper" in loc else "bottom", fontsize=7.5, color=NOTE_COLOR,
            bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.85", "alpha": 0.9})


def footnote(ax: Axes, text: str) -> None:
    """Small grey text under `ax` (caveats that must not hide data)."""
    ax.text(0.0, -0.16, textwrap.fill(text, 70), transform=ax.transAxes, ha="left", va="top", fontsize=7.5,
            color=NOTE_COLOR)
