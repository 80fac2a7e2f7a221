"""Interactive explorers for live kernels, each paired with a static figure for the HTML book.

A chapter's explorer is a drawing function of a few parameters. :func:`explorer` wraps it in
ipywidgets controls for Colab, Binder and local Jupyter; :func:`gradiv_lib.plotting.small_multiples`
draws the same function over the slider's values so a reader of the static book sees the effect
without a kernel.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt


def explorer(draw: Callable[..., Any], **controls: Any) -> widgets.VBox:
    """Controls plus a live plot: ``draw(**values)`` is redrawn whenever a control moves.

    Parameters
    ----------
    draw : callable
        Draws a new figure; called with one keyword per control.
    **controls
        ipywidgets controls, or anything ``ipywidgets.interactive`` accepts (``(lo, hi, step)`` tuples,
        lists of options), keyed by ``draw``'s parameter names.
    """
    if not controls:
        raise ValueError("explorer needs at least one control, e.g. explorer(draw, n=IntSlider(...))")
    if not callable(draw):
        raise TypeError(f"draw must be callable, got {type(draw).__name__}")

    def redraw(**values: Any) -> None:
        draw(**values)
        plt.show()

    ui = widgets.interactive(redraw, **controls)
    ui.layout = widgets.Layout(border="1px solid #ddd", padding="6px")
    return ui
