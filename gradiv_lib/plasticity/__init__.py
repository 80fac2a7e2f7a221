"""Continual learning and loss of plasticity: regularizers, plasticity metrics and a continual loop.

Derived in chapter 8 of the book (``book/ch08_plasticity``), after Lewandowski et al., *Learning
Continually by Spectral Regularization* (ICLR 2025, arXiv 2406.06811). One module per idea, every public name
re-exported here (``from gradiv_lib import plasticity as pl; pl.Spectral(...)``):

* :mod:`~gradiv_lib.plasticity.regularizers` (sections 8.1-8.3): one interface, build, :meth:`Regularizer.bind`
  to the model at its initial weights :math:`\\theta_0`, add ``reg(model)`` to the loss; with those weights

  * :class:`L2`: :math:`\\lambda\\lVert\\theta\\rVert_2^2`;
  * :class:`L2Init` (Kumar et al.): :math:`\\lambda\\lVert\\theta-\\theta_0\\rVert_2^2`;
  * :class:`WassersteinInit`: :math:`\\lambda\\sum_l\\sum_i(\\theta_{l,(i)}-\\theta^0_{l,(i)})^2`, with
    :math:`\\theta_{l,(i)}` the :math:`i`-th smallest entry of tensor :math:`l`; this is :math:`n_l W_2^2`
    between the empirical distributions of the current and initial entries, so it is zero for any
    permutation of the initial weights;
  * :class:`Spectral`: :math:`\\lambda\\sum_l[(\\sigma_{\\max}(W_l)^k-1)^2+\\lVert b_l\\rVert_2^{2k}]`, with
    :math:`\\sigma_{\\max}` from one power-iteration step per call on a persistent vector and the
    *differentiable* :math:`\\sigma=u^\\top W v` (:math:`u, v` detached, so
    :math:`\\partial\\sigma/\\partial W = uv^\\top`);
  * :class:`ShrinkPerturb` (Ash & Adams): no penalty; at every task boundary
    :math:`\\theta\\leftarrow s\\,\\theta + p\\,\\mathrm{std}(\\theta_0)\\,\\varepsilon` (scaled Gaussian) or
    :math:`s\\,\\theta + p\\,\\theta^{\\text{new}}` (a fresh initialisation, ``perturbation="init"``).

* :mod:`~gradiv_lib.plasticity.metrics` (8.1, 8.2): :func:`task_accuracy`, :func:`effective_rank`,
  :func:`dormant_fraction`, :func:`hidden_features`, :func:`sigma_max`.
* :mod:`~gradiv_lib.plasticity.continual` (every section): :func:`train_continual` on a stream of tasks
  (:func:`make_tasks` from :mod:`gradiv_lib.data`'s task streams, or your own through :func:`as_tasks`), which
  records the metrics at every task boundary and checkpoints atomically after every task (a run started again
  with the same arguments resumes and gives the same history); the probe :func:`plasticity`.
* :mod:`~gradiv_lib.plasticity.tuning` (8.2, 8.3): fair tuning, a strength grid centred on each penalty's own
  scale (:func:`strength_scale`, :func:`log_grid`, :func:`refine_decades`, :func:`method_params`) and sensitivity
  as the width of the range that beats a baseline (:func:`beating_range`).
* :mod:`~gradiv_lib.plasticity.runs` (8.2, 8.3): the book's run protocols (:data:`EXPERIMENTS`, :func:`run_one`,
  :func:`compact_history`) behind the command line.

Command line: ``gradiv plasticity NAME`` (or ``python -m gradiv_lib.plasticity NAME``) writes the chapter's
precomputed results (:mod:`gradiv_lib.experiments.continual`).
"""
from __future__ import annotations

from collections.abc import Sequence

from . import continual, metrics, regularizers, runs, tuning  # noqa: F401
from ._checks import _check_int, _check_model, _check_number  # noqa: F401
from .continual import (CHECKPOINT_FORMAT, STREAMS, ContinualHistory, _diversity, _make_optimizer, _probe,  # noqa: F401
                        _train_steps, as_tasks, make_tasks, plasticity, train_continual)
from .metrics import dormant_fraction, effective_rank, hidden_features, sigma_max, task_accuracy
from .regularizers import (REGULARIZERS, L2, L2Init, NoRegularizer, Regularizer, ShrinkPerturb, Spectral,
                           WassersteinInit, fresh_init, make_regularizer, power_iteration)
from .runs import DATASETS, EXPERIMENTS, compact_history, load_dataset, run_one
from .tuning import beating_range, log_grid, method_params, refine_decades, strength_scale

__all__ = [
    "CHECKPOINT_FORMAT", "EXPERIMENTS", "REGULARIZERS", "STREAMS", "ContinualHistory", "L2", "L2Init", "NoRegularizer",
    "Regularizer", "ShrinkPerturb", "Spectral", "WassersteinInit", "as_tasks", "compact_history", "dormant_fraction",
    "effective_rank", "fresh_init", "hidden_features", "make_regularizer", "make_tasks", "plasticity",
    "power_iteration", "run_one", "sigma_max", "task_accuracy", "train_continual",
    "DATASETS", "beating_range", "load_dataset", "log_grid", "method_params", "refine_decades", "strength_scale",
]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradiv_lib.plasticity NAME [options]``: an alias of ``gradiv plasticity NAME`` (:mod:`gradiv_lib.cli`;
    quick by default, ``--book`` for the book's settings)."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["plasticity", *(sys.argv[1:] if argv is None else argv)], prog="python -m gradiv_lib.plasticity")
