"""How a batch loss relates to the per-sample losses: :math:`L = \\tfrac1c \\sum_i \\ell_i`.

Derived in chapter 2 of the book (book/ch02_computing_fast).

The per-sample loss :math:`\\ell_i` is ``loss_fn`` applied to sample :math:`i` alone. A ``"sum"`` loss
has :math:`c = 1`, a ``"mean"`` loss :math:`c = B`; hooks see gradients of :math:`L`, so per-sample
gradients are :math:`c` times what they see and squared norms :math:`c^2` times. Standard
``torch.nn`` losses are read from their ``reduction`` attribute; anything else (plain callables,
class-weighted or ``ignore_index`` cross-entropy, whose "mean" is not a mean over samples) is
checked numerically against the per-sample losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]


def _reduction_is_per_sample_uniform(loss_fn: nn.Module, targets: Tensor) -> bool:
    """True when the module's ``"mean"`` averages equally many elements per sample."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if loss_fn.weight is not None:
            return False
        if not targets.is_floating_point() and bool((targets == loss_fn.ignore_index).any()):
            return False
    return True


ELEMENTWISE_LOSSES: tuple[type[nn.Module], ...] = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
"""``torch.nn`` losses that broadcast outputs against targets of another shape (with only a warning)."""

_ELEMENTWISE_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
"""Their functional forms."""


def _is_elementwise(loss_fn: LossFn) -> bool:
    return isinstance(loss_fn, ELEMENTWISE_LOSSES) or any(loss_fn is f for f in _ELEMENTWISE_FUNCTIONS)


def check_loss_shapes(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> None:
    """Refuse an elementwise loss (``MSELoss``, ``L1Loss``, ``SmoothL1Loss``, ``HuberLoss`` or their
    ``F.*`` forms) on outputs and targets of different shapes: ``MSELoss`` on a ``(B, 1)`` output and a
    ``(B,)`` target broadcasts them to ``(B, B)``, so every sample's output is compared with every target,
    the loss mixes the samples and its value, its gradient and every per-sample gradient are wrong
    (PyTorch only warns)."""
    if _is_elementwise(loss_fn) and isinstance(outputs, Tensor) and isinstance(targets, Tensor) \
            and outputs.shape != targets.shape:
        name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else f"F.{loss_fn.__name__}"
        try:
            shape = tuple(torch.broadcast_shapes(outputs.shape, targets.shape))
        except RuntimeError:
            shape = None
        if shape is None:
            what = "they do not broadcast"
        elif shape != tuple(outputs.shape):
            what = f"it would broadcast them to {shape}, comparing every sample's output with other samples' targets"
        else:
            what = f"it would broadcast the targets to {shape}, comparing each target with several outputs"
        if not targets.is_floating_point():
            hint = "; integer targets look like class labels: use nn.CrossEntropyLoss with targets of shape (B,)"
        elif targets.dim() == 1 and outputs.dim() == 2 and outputs.shape[1] > 1:
            hint = "; class labels stored as floats? pass y.long() (integer labels get cross-entropy)"
        else:
            hint = ""
        raise ValueError(
            f"{name} got outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}: "
            f"{what}. Give the targets the outputs' shape (e.g. y.view(-1, 1) for one output per sample) or "
            f"squeeze the outputs (out.squeeze(-1)){hint}"
        )


def _eval_outputs(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)`` in eval mode without gradients (no running statistics updated, no dropout drawn)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(inputs)
    finally:
        model.train(was_training)


def check_loss_shapes_on(loss_fn: LossFn, model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    """:func:`check_loss_shapes` on ``model(inputs)``, run in eval mode without gradients (for a
    training loop to call once, on a few samples, before it starts); nothing is run for other losses."""
    if _is_elementwise(loss_fn):
        check_loss_shapes(loss_fn, _eval_outputs(model, inputs), targets)


def batch_loss_factor_on(loss_fn: LossFn, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    """:func:`batch_loss_factor` of ``loss_fn`` on ``model(inputs)``, run in eval mode without gradients
    (shapes checked too)."""
    outputs = _eval_outputs(model, inputs)
    with torch.no_grad():
        return batch_loss_factor(loss_fn, outputs, targets, loss_fn(outputs, targets))


def per_sample_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """:math:`\\ell_i` = ``loss_fn(outputs[i:i+1], targets[i:i+1])`` for every sample, shape ``[B]``.

    Vectorised with ``torch.func.vmap`` when the loss allows it, else evaluated sample by sample.
    """
    with torch.no_grad():
        try:
            losses = torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(outputs, targets)
        except Exception:  # data-dependent Python control flow: evaluate sample by sample
            losses = torch.stack([loss_fn(outputs[i : i + 1], targets[i : i + 1]) for i in range(outputs.shape[0])])
    return losses.reshape(outputs.shape[0])


def batch_loss_factor(loss_fn: LossFn, outputs: Tensor, targets: Tensor, loss: Tensor) -> float:
    """The factor :math:`c` with ``loss`` :math:`= \\tfrac1c \\sum_i \\ell_i` (1 for sum, B for mean).

    Parameters
    ----------
    loss_fn
        The loss, an ``nn`` loss module or any callable ``(outputs, targets) -> scalar``.
    outputs, targets
        Model outputs and targets of the batch (batch first).
    loss
        ``loss_fn(outputs, targets)``, already computed.

    Raises
    ------
    ValueError
        If the loss is neither the sum nor the mean of the per-sample losses.
    """
    check_loss_shapes(loss_fn, outputs, targets)
    batch_size = outputs.shape[0]
    if batch_size == 1:
        return 1.0
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.modules.loss._Loss) and _reduction_is_per_sample_uniform(loss_fn, targets):
        if reduction == "sum":
            return 1.0
        if reduction in ("mean", "batchmean"):
            return float(batch_size)
    losses = per_sample_losses(loss_fn, outputs.detach(), targets).double()
    total, value = losses.sum(), loss.detach().double()
    tolerance = 1e-4 * float(losses.abs().sum()) + 1e-12
    if abs(float(value - total)) <= tolerance:
        return 1.0
    if abs(float(value - total / batch_size)) <= tolerance / batch_size:
        return float(batch_size)
    raise ValueError(
        f"loss_fn returned {float(value):.6g}, which is neither the sum ({float(total):.6g}) nor the mean "
        f"({float(total) / batch_size:.6g}) of the per-sample losses loss_fn(outputs[i:i+1], targets[i:i+1]); "
        "per-sample gradients need a loss that is a sum or a mean over samples"
    )
