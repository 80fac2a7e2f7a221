"""One figure style for the whole book.

The style is a matplotlib style file, :data:`STYLE` (``gradiv_lib/book.mplstyle``): every chapter
applies it through :func:`gradiv_lib.setup_book`, and your own code can use it for a few figures with
``plt.style.context(STYLE)``. The helpers here draw so that the same method has the same colour on
every page. This module needs matplotlib (``pip install "gradiv_lib[book]"``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

#: A colour-blind-safe palette (Okabe & Ito, 2008), in the order lines are drawn.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

#: Fixed colours for the methods that recur across chapters.
METHOD_COLORS: dict[str, str] = {
    "sgd": PALETTE[7],
    "fixed": PALETTE[7],
    "adabatch": PALETTE[4],
    "divebatch": PALETTE[0],
    "noise_scale": PALETTE[3],
    "local_sgd": PALETTE[2],
    "dsgd": PALETTE[1],
    "fedavg": PALETTE[7],
    "fedavgm": PALETTE[5],
    "fedadam": PALETTE[4],
    "fedaware": PALETTE[0],
    "spectral": PALETTE[0],
    "l2": PALETTE[4],
    "l2_init": PALETTE[2],
    "wasserstein": PALETTE[3],
    "shrink_perturb": PALETTE[5],
    "none": PALETTE[7],
}

#: Width of a full-width figure in inches (the book's text column).
FULL_WIDTH = 7.5

#: The book's matplotlib style file: ``plt.style.use(STYLE)`` or ``with plt.style.context(STYLE): ...``.
STYLE: str = str(Path(__file__).resolve().with_name("book.mplstyle"))


def use_book_style() -> None:
    """Apply the book's matplotlib style (:data:`STYLE`: fonts, sizes, colour cycle, grid) globally,
    and inside IPython show figures as high-resolution PNG. :func:`gradiv_lib.setup_book` calls it."""
    plt.style.use(STYLE)
    _use_png_inline()


def _use_png_inline() -> None:
    """Inside IPython, show figures as high-resolution PNG (compact, and never compared by nbval)."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: nothing to configure
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def method_color(name: str) -> str:
    """Colour of a method (e.g. ``"divebatch"``); unknown names get a stable palette colour."""
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return PALETTE[sum(map(ord, key)) % (len(PALETTE) - 1)]


def subplots(ncols: int = 1, nrows: int = 1, *, height: float = 3.0, width: float = FULL_WIDTH,
             **kwargs: Any) -> tuple[plt.Figure, Any]:
    """``plt.subplots`` sized for the book: ``width`` inches wide, ``height`` inches per row."""
    if ncols < 1 or nrows < 1:
        raise ValueError(f"ncols and nrows must be >= 1, got ncols={ncols}, nrows={nrows}")
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), **kwargs)


def small_multiples(values: Sequence[Any], draw: Callable[[plt.Axes, Any], None], *,
                    title: Callable[[Any], str] | str = "{}", ncols: int | None = None,
                    height: float = 2.4, sharey: bool = True, **kwargs: Any) -> plt.Figure:
    """One panel per value of a widget's slider: the static stand-in for an explorer.

    ``draw(ax, value)`` draws one panel; ``title`` is a format string or a function of the value.
    """
    values = list(values)
    if not values:
        raise ValueError("values must hold at least one slider value, got an empty sequence")
    ncols = ncols or min(len(values), 4)
    nrows = int(np.ceil(len(values) / ncols))
    fig, axes = subplots(ncols, nrows, height=height, sharey=sharey, squeeze=False, **kwargs)
    for ax, value in zip(axes.flat, values):
        draw(ax, value)
        ax.set_title(title(value) if callable(title) else title.format(value))
    for ax in axes.flat[len(values):]:
        ax.set_visible(False)
    return fig
