"""Gradient diversity of the batch in the user's own training step, at no extra backward pass.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Inside ``with DiversityMeter(model) as meter:`` the user runs their forward pass, loss and
``loss.backward()`` as usual; the hooks record :math:`\\|\\nabla_w \\ell_i\\|^2` per sample and the
squared norm of the gradient this backward pass produced. With a mean loss
:math:`L = \\tfrac1B\\sum_i \\ell_i` both are rescaled by :math:`B^2`, so

.. math:: \\Delta_B = \\frac{\\sum_i \\|\\nabla_w \\ell_i\\|^2}{\\|\\sum_i \\nabla_w \\ell_i\\|^2}

refers to the per-sample losses whatever the reduction. ``.grad`` is what it would be without the
meter, so the optimizer step is unaffected; gradients already accumulated in ``.grad`` before the
backward pass are not counted. By default the weight gradient of a convolution, or of a Linear layer
on sequences, is formed as the sum of the per-sample gradients the meter computes anyway where that
was timed faster (``fused.py``: one weight-gradient computation less per layer), which equals
autograd's to float rounding; ``exact_grad=True`` keeps autograd's own, bit for bit, at that extra
cost. When every ``.grad`` is empty before the backward pass (the usual
``zero_grad(set_to_none=True)``), :math:`\\|\\sum_i \\nabla_w \\ell_i\\|^2` is read from ``.grad`` at
the end of the pass instead of by a hook on every parameter.

**What a wrong ``loss_reduction`` does, and what the meter can see.** The hooks see the gradient of
the loss that was back-propagated, so the per-sample gradients they imply always add up to the
parameter gradient, whatever the reduction: the declaration cannot be checked against ``.grad``. A
wrong declaration scales ``sq_norms`` and ``sq_norm_of_sum`` by :math:`B^{\\pm 2}` and leaves
:math:`\\Delta` unchanged. The meter checks the one case it can recognise from gradients alone: a
2-D output whose gradient rows sum to zero over the classes is a softmax cross-entropy, whose
per-sample gradient :math:`p_i - q_i` has :math:`\\|p_i - q_i\\|_1 \\le 2`; if the declared ``"mean"``
makes :math:`\\|B\\,\\delta_i\\|_1 > 2` for some sample, the loss was a sum and the meter warns (class
weights above 1 can trigger it too, hence a warning, not an error). A ``"sum"`` declared for a mean
loss, other losses, and sequence outputs cannot be told apart; :func:`~gradiv_lib.norms.per_sample_sq_norms`
sees the loss function and detects the reduction itself. The check runs on the first measurement
of a meter (the reduction is a property of the loss, not of the batch), so later steps pay nothing.

**Losses whose "mean" is not a mean over samples.** A class-weighted cross-entropy
(``weight=w``) divides by :math:`\\sum_j w_{y_j}`, and ``ignore_index`` by the number of targets
kept, not by :math:`B`. The hooks cannot see that. With ``loss_reduction="mean"`` the meter then
measures the per-sample terms whose mean is the loss,
:math:`\\tilde\\ell_i = B\\, w_{y_i} \\ell_i / \\sum_j w_{y_j}` (zero for an ignored target), not the
unweighted :math:`\\ell_i`. :func:`~gradiv_lib.norms.per_sample_sq_norms` refuses such a loss
because it is neither a sum nor a mean of ``loss_fn`` on single samples.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradiv_lib.diversity import DiversityResult
from gradiv_lib.norms.engine import Check, PerSampleNormEngine
from gradiv_lib.norms.functional import check_finite_results
from gradiv_lib.norms.rules import SequenceStrategy

LOSS_REDUCTIONS = ("mean", "sum")


class DiversityMeter:
    """Context manager measuring per-sample gradient norms and Δ during one training step.

    Parameters
    ----------
    model
        Batch-first network whose layers treat samples independently (BatchNorm in eval mode). The hooks
        are planned for the model as it is now: a layer or parameter added, replaced, renamed (pruning) or
        unfrozen later is refused at the next measurement (build a new meter); freezing parameters, or
        swapping a parameter-free module such as the activation, is fine.
    loss_reduction
        How the loss that is back-propagated reduces the per-sample losses: ``"mean"``
        (:math:`\\tfrac1B\\sum_i\\ell_i`, the ``torch.nn`` default) or ``"sum"``.
    sequence_strategy
        ``"auto"``, ``"gram"`` or ``"materialize"`` for sequence Linear layers and convolutions.
    check
        When to run the batch-axis probe and the gradient-sum check: ``"first_call"`` (once per model
        and input signature), ``"every_call"`` or ``"off"`` (see :class:`PerSampleNormEngine`; ``"off"`` cannot
        notice a model that mixes samples or uses a parameter outside its module, and then returns wrong
        norms without an error: turn it off only for a model that has passed the check). The probe
        runs extra forward passes without autograd: Python side effects of ``forward`` (a counter, a hook
        of yours that records activations) happen on them too; buffers are put back.
    exact_grad
        ``True``: leave every weight gradient to autograd, so ``.grad`` is bit for bit what it is
        without the meter (costs one more weight-gradient computation per conv or sequence Linear layer
        and step). ``False`` (default): those layers sum their per-sample gradients into ``.grad`` (equal to
        float rounding).
    sq_norm_of_sum
        ``False``: measure the per-sample norms only (:attr:`sq_norms`), not
        :math:`\\|\\sum_i \\nabla_w \\ell_i\\|^2`, for a loop that sums the gradients itself (``train()``
        accumulates them over an epoch); :attr:`result` then raises. Saves reading every gradient once
        per step.
    grad_scaler
        The ``torch.amp.GradScaler`` of a mixed-precision loop (``scaler.scale(loss).backward()``): the
        backward pass then carries the loss times the scale :math:`S`, which the meter reads when the ``with``
        block opens and divides out, so :attr:`sq_norms` and :attr:`result` refer to the unscaled loss.
        Without it they are :math:`S^2` too large (Δ is unaffected). A step whose gradients overflow (the
        scaler skips it) has non-finite norms: :attr:`result` raises, :attr:`sq_norms` holds them.

    Examples
    --------
    >>> with DiversityMeter(model, loss_reduction="mean") as meter:  # doctest: +SKIP
    ...     loss = criterion(model(x), y)
    ...     loss.backward()
    >>> optimizer.step()  # doctest: +SKIP
    >>> meter.result.diversity  # doctest: +SKIP

    One meter context covers one forward and one backward pass; for gradient accumulation open one
    per micro-batch. A later backward pass through the measured graph (``retain_graph=True``) after the
    ``with`` block is not part of the measurement; inside the next one it is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: Literal["mean", "sum"] = "mean",
        *,
        sequence_strategy: SequenceStrategy = "auto",
        check: Check = "first_call",
        exact_grad: bool = False,
        sq_norm_of_sum: bool = True,
        grad_scaler: Any = None,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if not isinstance(exact_grad, bool):
            raise TypeError(f"exact_grad must be a bool, got {exact_grad!r}")
        if not isinstance(sq_norm_of_sum, bool):
            raise TypeError(f"sq_norm_of_sum must be a bool, got {sq_norm_of_sum!r}")
        if grad_scaler is not None and not (callable(getattr(grad_scaler, "get_scale", None)) and callable(getattr(grad_scaler, "is_enabled", None))):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (with get_scale and is_enabled), got {type(grad_scaler).__name__}")
        self._grad_scaler = grad_scaler
        self._scale = 1.0  # the GradScaler's scale S in this measurement (read when the with block opens)
        self._engine = PerSampleNormEngine(
            model, sequence_strategy=sequence_strategy, check=check, grad_source="backward", fuse_weight_grads=not exact_grad,
            measure_sum=sq_norm_of_sum,
        )
        self._with_sum = sq_norm_of_sum
        self._model = model
        self._loss_reduction = loss_reduction
        self._sq_norms: Tensor | None = None
        self._result: DiversityResult | None = None
        self._output_grad: Tensor | None = None
        self._handle: Any = None
        self._reduction_checked = False  # the summed-loss check runs on the first measurement only

    def __enter__(self) -> DiversityMeter:
        self._sq_norms = None
        self._result = None
        self._output_grad = None
        scaler = self._grad_scaler
        self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._engine.__enter__()
        if self._loss_reduction == "mean" and not self._reduction_checked:
            self._handle = self._model.register_forward_hook(self._watch_output)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._engine.__exit__(*exc_info)

    def hold(self) -> DiversityMeter:
        """Keep the hooks registered across ``with meter:`` blocks until :meth:`release` (a training loop
        that owns the model calls this once per epoch instead of registering and removing the hooks on
        every step). Outside the ``with`` blocks the hooks ignore the model's forward and backward passes.
        Always pair with :meth:`release` (in a ``finally``)."""
        self._engine.hold()
        return self

    def release(self) -> None:
        """Remove the hooks kept by :meth:`hold` (idempotent)."""
        self._engine.release()

    def _watch_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == 2 and output.requires_grad and torch.is_grad_enabled():
            output.register_hook(self._keep_output_grad)

    def _keep_output_grad(self, grad: Tensor) -> None:
        self._output_grad = grad.detach()

    def _warn_if_summed_cross_entropy(self) -> None:
        """The softmax cross-entropy signature of a summed loss declared as a mean (module docstring)."""
        delta = self._output_grad
        if delta is None or delta.shape[0] < 2:
            return
        self._reduction_checked = True  # a property of the loss, not of the batch: once per meter
        delta = delta.double()
        rows = delta.abs().sum(1)
        if float(delta.sum(1).abs().max()) > 1e-6 * float(rows.max()) + 1e-300:
            return  # not a softmax cross-entropy
        largest = float(rows.max()) * delta.shape[0] / self._scale
        if largest > 2.0 * (1 + 1e-3):
            warnings.warn(
                f"DiversityMeter(loss_reduction='mean'): the model output's gradient looks like a softmax "
                f"cross-entropy, whose per-sample gradient p - q has L1 norm at most 2, but B·δ reaches {largest:.3g}: "
                "the loss is probably a sum over samples (reduction='sum'); declare loss_reduction='sum' (Δ is "
                "unaffected, sq_norms and sq_norm_of_sum are B² too large). Class weights above 1 also cause this.",
                UserWarning,
                stacklevel=3,
            )

    def _factor(self, batch_size: int) -> float:
        """c / S with L = (1/c) Σ ℓ_i and the back-propagated loss S·L (S: the GradScaler's scale, else 1):
        per-sample gradients are c / S times what the hooks see."""
        return (float(batch_size) if self._loss_reduction == "mean" else 1.0) / self._scale

    @property
    def sq_norms(self) -> Tensor:
        """Per-sample squared gradient norms :math:`\\|\\nabla_w \\ell_i\\|^2`, shape ``[B]``."""
        if self._sq_norms is None:
            self._warn_if_summed_cross_entropy()
            seen = self._engine.sq_norms()
            self._sq_norms = seen * self._factor(seen.shape[0]) ** 2
        return self._sq_norms

    @property
    def result(self) -> DiversityResult:
        """:class:`~gradiv_lib.diversity.DiversityResult` of the measured batch.

        Raises
        ------
        RuntimeError
            If no forward/backward pass, or more than one backward pass, was recorded, or the meter was
            built with ``sq_norm_of_sum=False``.
        ValueError
            If gradients are not finite, or some parameter's gradient was produced outside a hooked layer.
        """
        if self._result is None:
            if not self._with_sum:
                raise RuntimeError(
                    "this DiversityMeter was built with sq_norm_of_sum=False, so it measures the per-sample norms "
                    "only (meter.sq_norms); build it with sq_norm_of_sum=True (the default) to read meter.result"
                )
            self._warn_if_summed_cross_entropy()
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
