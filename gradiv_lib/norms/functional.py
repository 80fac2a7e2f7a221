"""Per-sample squared gradient norms of a batch in one forward and one backward pass.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Returns :math:`\\|\\nabla_w \\ell_i\\|^2` for every sample and :math:`\\|\\sum_i \\nabla_w \\ell_i\\|^2`,
where :math:`\\ell_i` is ``loss_fn`` on sample :math:`i` alone, whatever reduction ``loss_fn`` uses.
The parameters' ``.grad`` are left untouched (the gradient is taken with ``torch.autograd.grad``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradiv_lib.norms.engine import Check, PerSampleNormEngine
from gradiv_lib.norms.loss_scale import LossFn, batch_loss_factor, check_loss_shapes
from gradiv_lib.norms.rules import SequenceStrategy


def check_batch(inputs: Tensor, targets: Tensor) -> int:
    """Validate a batch and return its size B (``inputs.shape[0]``).

    Raises
    ------
    TypeError
        If ``inputs`` or ``targets`` is not a tensor.
    ValueError
        If the batch is empty or ``targets`` has a different number of samples.
    """
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor with the batch along dimension 0, got {type(value).__qualname__}")
        if value.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; it needs the batch along dimension 0")
    batch_size = int(inputs.shape[0])
    if batch_size == 0:
        raise ValueError(f"inputs has batch size 0 (shape {tuple(inputs.shape)}); a batch needs at least 1 sample")
    if targets.shape[0] != batch_size:
        raise ValueError(
            f"targets has {targets.shape[0]} samples (shape {tuple(targets.shape)}) but inputs has {batch_size} "
            f"(shape {tuple(inputs.shape)}); they must have the same first dimension"
        )
    return batch_size


def check_finite_loss(loss: Tensor) -> None:
    """Raise ``ValueError`` unless ``loss`` is a finite scalar tensor."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__qualname__
        raise ValueError(f"loss_fn must return a scalar tensor (reduction 'mean' or 'sum'), got {shape}")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"the loss is not finite ({value}); per-sample gradients are undefined")


def check_finite_results(sq_norms: Tensor, sq_norm_of_sum: Tensor) -> None:
    """Raise ``ValueError`` if any per-sample norm or the norm of the summed gradient is not finite."""
    bad = (~torch.isfinite(sq_norms)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"non-finite per-sample gradient norms for samples {bad[:10].tolist()} (inf or nan gradients)")
    if not math.isfinite(float(sq_norm_of_sum)):
        raise ValueError(f"the gradient of the summed loss is not finite (squared norm {float(sq_norm_of_sum)})")


def per_sample_sq_norms_and_grad_sum(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    sequence_strategy: SequenceStrategy = "auto",
    check: Check = "first_call",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample squared gradient norms, the squared norm of their sum, and the batch loss.

    .. math:: q_i = \\|\\nabla_w \\ell_i\\|^2, \\qquad N = \\Big\\|\\sum_{i=1}^B \\nabla_w \\ell_i\\Big\\|^2,

    over all parameters with ``requires_grad=True``, from one forward and one backward pass.

    Parameters
    ----------
    model
        Batch-first network whose layers treat samples independently (BatchNorm in eval mode).
    loss_fn
        ``(outputs, targets) -> scalar`` with reduction ``"mean"`` or ``"sum"`` over samples (an ``nn``
        loss or a plain callable; the reduction is detected).
    inputs, targets
        The batch, samples along dimension 0.
    sequence_strategy
        ``"auto"``, ``"gram"`` or ``"materialize"`` for sequence Linear layers and convolutions.
    check
        When to run the batch-axis probe and the gradient-sum check: ``"first_call"`` (once per model
        and input signature), ``"every_call"`` or ``"off"`` (see :class:`PerSampleNormEngine`).

    Returns
    -------
    sq_norms : Tensor
        Shape ``[B]``, :math:`q_i`, in the dtype of the parameters (float32 for half precision).
    sq_norm_of_sum : Tensor
        0-d float64 tensor, :math:`N`.
    loss : Tensor
        The detached batch loss ``loss_fn(model(inputs), targets)``.

    Raises
    ------
    ValueError
        For an empty batch, mismatched ``inputs``/``targets``, a non-scalar or non-finite loss,
        non-finite gradients, a model without trainable parameters, sample-mixing layers, a layer whose
        batch axis cannot be found, or a parameter used where no hook sees it.
    """
    batch_size = check_batch(inputs, targets)
    engine = PerSampleNormEngine(model, sequence_strategy=sequence_strategy, batch_size=batch_size, check=check)
    with engine, torch.enable_grad():
        outputs = model(inputs)
        check_loss_shapes(loss_fn, outputs, targets)  # before the loss, which would only warn
        loss = loss_fn(outputs, targets)
        check_finite_loss(loss)
        factor = batch_loss_factor(loss_fn, outputs, targets, loss)
        torch.autograd.grad(loss, engine.trainable_parameters, allow_unused=True)
    sq_norms = engine.sq_norms() * factor**2
    sq_norm_of_sum = engine.grad_sum_sq_norm() * factor**2
    check_finite_results(sq_norms, sq_norm_of_sum)
    return sq_norms, sq_norm_of_sum, loss.detach()


def per_sample_sq_norms(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    sequence_strategy: SequenceStrategy = "auto",
    check: Check = "first_call",
) -> Tensor:
    """Per-sample squared gradient norms :math:`\\|\\nabla_w \\ell_i\\|^2`, shape ``[B]``.

    One forward and one backward pass; see :func:`per_sample_sq_norms_and_grad_sum` for the
    parameters, conventions and errors.
    """
    sq_norms, _, _ = per_sample_sq_norms_and_grad_sum(model, loss_fn, inputs, targets, sequence_strategy=sequence_strategy, check=check)
    return sq_norms
