"""Gradient diversity of the batch in the user's own training step, at no extra backward pass.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Inside ``with DiversityMeter(model) as meter:`` the user runs their forward pass, loss and
``loss.backward()`` as usual; the hooks record :math:`\\|\\nabla_w \\ell_i\\|^2` per sample and the
squared norm of the gradient this backward pass produced. With a mean loss
:math:`L = \\tfrac1B\\sum_i \\ell_i` both are rescaled by :math:`B^2`, so

.. math:: \\Delta_B = \\frac{\\sum_i \\|\\nabla_w \\ell_i\\|^2}{\\|\\sum_i \\nabla_w \\ell_i\\|^2}

refers to the per-sample losses whatever the reduction. ``.grad`` is exactly what it would be
without the meter, so the optimizer step is unaffected; gradients already accumulated in ``.grad``
before the backward pass are not counted.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from gradiv_lib.diversity import DiversityResult
from gradiv_lib.norms.engine import PerSampleNormEngine
from gradiv_lib.norms.functional import check_finite_results
from gradiv_lib.norms.rules import SequenceStrategy

LOSS_REDUCTIONS = ("mean", "sum")


class DiversityMeter:
    """Context manager measuring per-sample gradient norms and Δ during one training step.

    Parameters
    ----------
    model
        Batch-first network whose layers treat samples independently (BatchNorm in eval mode).
    loss_reduction
        How the loss that is back-propagated reduces the per-sample losses: ``"mean"``
        (:math:`\\tfrac1B\\sum_i\\ell_i`, the ``torch.nn`` default) or ``"sum"``.
    sequence_strategy
        ``"auto"``, ``"gram"`` or ``"materialize"`` for sequence Linear layers and convolutions.

    Examples
    --------
    >>> with DiversityMeter(model, loss_reduction="mean") as meter:  # doctest: +SKIP
    ...     loss = criterion(model(x), y)
    ...     loss.backward()
    >>> optimizer.step()  # doctest: +SKIP
    >>> meter.result.diversity  # doctest: +SKIP

    One meter context covers one forward and one backward pass; for gradient accumulation open one
    per micro-batch.
    """

    def __init__(self, model: nn.Module, loss_reduction: Literal["mean", "sum"] = "mean", *, sequence_strategy: SequenceStrategy = "auto") -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self._engine = PerSampleNormEngine(model, sequence_strategy=sequence_strategy)
        self._loss_reduction = loss_reduction
        self._sq_norms: Tensor | None = None
        self._result: DiversityResult | None = None

    def __enter__(self) -> DiversityMeter:
        self._sq_norms = None
        self._result = None
        self._engine.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._engine.__exit__(*exc_info)

    def _factor(self, batch_size: int) -> float:
        """c in L = (1/c) Σ ℓ_i: per-sample gradients are c times what the hooks see."""
        return float(batch_size) if self._loss_reduction == "mean" else 1.0

    @property
    def sq_norms(self) -> Tensor:
        """Per-sample squared gradient norms :math:`\\|\\nabla_w \\ell_i\\|^2`, shape ``[B]``."""
        if self._sq_norms is None:
            seen = self._engine.sq_norms()
            self._sq_norms = seen * self._factor(seen.shape[0]) ** 2
        return self._sq_norms

    @property
    def result(self) -> DiversityResult:
        """:class:`~gradiv_lib.diversity.DiversityResult` of the measured batch.

        Raises
        ------
        RuntimeError
            If no forward/backward pass, or more than one backward pass, was recorded.
        ValueError
            If gradients are not finite, or some parameter's gradient was produced outside a hooked layer.
        """
        if self._result is None:
            seen = self._engine.sq_norms()
            scale = self._factor(seen.shape[0]) ** 2
            # Python floats straight away (two conversions in all); the squared norms are >= 0, so their
            # sum is finite exactly when every one of them is, and the per-sample check runs only to name
            # the offending samples
            sum_sq_norms = float(seen.sum(dtype=torch.float64)) * scale
            sq_norm_of_sum = float(self._engine.grad_sum_sq_norm()) * scale
            if not (math.isfinite(sum_sq_norms) and math.isfinite(sq_norm_of_sum)):
                check_finite_results(seen, torch.tensor(sq_norm_of_sum, dtype=torch.float64))
            self._result = DiversityResult(sum_sq_norms=sum_sq_norms, sq_norm_of_sum=sq_norm_of_sum, n=int(seen.shape[0]))
        return self._result
