"""Fair tuning of the regularizers: a strength grid centred on each penalty's own scale, the shrink-and-perturb
family on the same footing, and sensitivity as the width of the strength range that beats a baseline.

Chapter 8: the tuned comparison of section 8.2 (``book/ch08_plasticity/02_regularizers_compared``) and the
sensitivity of section 8.3 (``03_sensitivity_and_explorer``) are made with these by
``gradiv plasticity mnist1d`` (:mod:`gradiv_lib.experiments.continual`).

The penalties measure different things (:math:`\\lVert\\theta\\rVert^2` counts every weight,
:math:`\\lVert\\theta-\\theta_0\\rVert^2` only how far they moved, the spectral term one number per layer) and
nothing makes their scales agree, so one absolute :math:`\\lambda` grid for all of them favours whichever happens to
sit at the right place in it.
:func:`strength_scale` puts every method on its own scale: :math:`\\lambda_c = \\ell_0 / R(\\theta_1)`, the
strength at which the penalty of weights that moved as far as one unregularised task moves them equals the task
loss at initialisation :math:`\\ell_0` (:math:`\\ln 10` for ten balanced classes). Grids are then
:math:`\\lambda_c\\cdot10^{k}` (:func:`log_grid`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ._checks import _check_model, _check_number
from .regularizers import REGULARIZERS, make_regularizer

__all__ = ["PENALTIES", "beating_range", "log_grid", "method_params", "refine_decades", "strength_scale"]

#: The methods whose strength is a penalty weight :math:`\lambda` (shrink-and-perturb is parametrised by
#: :func:`method_params`).
PENALTIES = ("l2", "l2_init", "wasserstein", "spectral")


def strength_scale(name: str, init_model: nn.Module, trained_model: nn.Module, reference_loss: float = math.log(10),
                   **kwargs: Any) -> float:
    """:math:`\\lambda_c = \\ell_0 / R(\\theta_1)`: the strength of penalty ``name`` (bound at ``init_model``'s
    weights :math:`\\theta_0`) at which it equals ``reference_loss`` for ``trained_model``'s weights
    :math:`\\theta_1` (:meth:`~gradiv_lib.plasticity.Regularizer.raw`, exact). ``kwargs`` go to the regularizer
    (e.g. ``k`` of the spectral penalty)."""
    if name not in PENALTIES:
        raise ValueError(f"name must be a penalty, one of {PENALTIES}, got {name!r}")
    _check_model(init_model)
    _check_model(trained_model)
    _check_number(reference_loss, "reference_loss", strict=True)
    raw = make_regularizer(name, 1.0, **kwargs).bind(init_model).raw(trained_model)
    if not (math.isfinite(raw) and raw > 0):
        raise ValueError(f"the {name} penalty of trained_model is {raw!r}; a scale needs a positive finite penalty "
                         "(did trained_model move away from init_model?)")
    return reference_loss / raw


def log_grid(center: float, decades: Sequence[float]) -> list[float]:
    """``[center * 10**k for k in decades]``."""
    _check_number(center, "center", strict=True)
    if not decades:
        raise ValueError("decades must name at least one exponent")
    return [center * 10.0 ** float(k) for k in decades]


def refine_decades(decades: Sequence[float], scores: Sequence[float], step: float = 0.5) -> list[float]:
    """The exponents ``best ± step`` (``best`` the exponent of the highest score) that are not in ``decades``
    yet: the fine stage of a coarse-then-fine search."""
    decades, scores = [float(k) for k in decades], [float(v) for v in scores]
    if len(decades) != len(scores) or not decades:
        raise ValueError(f"decades and scores must be non-empty and of equal length, got {len(decades)} and {len(scores)}")
    _check_number(step, "step", strict=True)
    best = decades[max(range(len(scores)), key=lambda i: scores[i])]
    have = {round(float(k), 6) for k in decades}
    return [float(k) for k in (best - step, best + step) if round(float(k), 6) not in have]


def method_params(method: str, strength: float, **fixed: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`~gradiv_lib.plasticity.make_regularizer` for ``method`` at one ``strength``.

    For a penalty, ``strength`` is :math:`\\lambda`. For ``"shrink_perturb"`` it is :math:`\\alpha\\in(0, 1]`, the
    step toward a fresh initialisation at every task boundary,
    :math:`\\theta\\leftarrow(1-\\alpha)\\,\\theta+\\alpha\\,\\theta^{\\text{new}}` (``shrink=1-α, noise=α``,
    ``perturbation="init"``): one knob from "nothing" (:math:`\\alpha\\to0`) to a full reset (:math:`\\alpha=1`), so
    it is tuned on a grid of the same size as the penalties'."""
    if method not in REGULARIZERS or method == "none":
        raise ValueError(f"method must be one of {sorted(set(REGULARIZERS) - {'none'})}, got {method!r}")
    if method == "shrink_perturb":
        _check_number(strength, "strength", strict=True, maximum=1.0)
        return {"shrink": 1.0 - strength, "noise": strength, "perturbation": "init", **fixed}
    _check_number(strength, "strength", strict=True)
    return {"strength": strength, **fixed}


def beating_range(decades: Sequence[float], scores: Sequence[float], baseline: float) -> dict[str, Any]:
    """The range of strengths (in decades, on the grid ``decades``) over which ``scores`` beat ``baseline``.

    Starting from the best grid point, the range grows over neighbours whose score is above ``baseline``; at
    each end the crossing is placed by linear interpolation in the exponent between the last point above and the
    first point below. An end that reaches the grid's edge is open (``open_low`` / ``open_high``): the true range
    is at least that wide. Returns ``lo``, ``hi`` (exponents), ``width`` (decades, ``hi - lo``; 0 when even the
    best point does not beat the baseline) and the two flags.
    """
    decades, scores = [float(k) for k in decades], [float(v) for v in scores]
    if len(decades) != len(scores) or not decades:
        raise ValueError(f"decades and scores must be non-empty and of equal length, got {len(decades)} and {len(scores)}")
    order = sorted(range(len(decades)), key=lambda i: decades[i])
    k = [float(decades[i]) for i in order]
    s = [float(scores[i]) for i in order]
    if len(set(k)) != len(k):
        raise ValueError(f"decades must be distinct, got {sorted(decades)}")
    best = max(range(len(s)), key=lambda i: s[i])
    if not s[best] > baseline:
        return {"lo": k[best], "hi": k[best], "width": 0.0, "open_low": False, "open_high": False}
    i = best
    while i > 0 and s[i - 1] > baseline:
        i -= 1
    j = best
    while j < len(s) - 1 and s[j + 1] > baseline:
        j += 1

    def cross(a: int, b: int) -> float:      # a above the baseline, b below or at it
        t = (s[a] - baseline) / (s[a] - s[b])
        return k[a] + t * (k[b] - k[a])

    lo = k[0] if i == 0 else cross(i, i - 1)
    hi = k[-1] if j == len(s) - 1 else cross(j, j + 1)
    return {"lo": lo, "hi": hi, "width": hi - lo, "open_low": i == 0, "open_high": j == len(s) - 1}
