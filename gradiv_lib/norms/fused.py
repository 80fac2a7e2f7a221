"""Layers whose weight gradient is the sum of the per-sample gradients the engine needs anyway.

Derived in chapter 2 of the book (book/ch02_computing_fast).

For a convolution, the exact per-sample gradient :math:`G_i = D_i [A_i; 1]^\\top` (``rules.py``: im2col
input :math:`A_i`, output gradient :math:`D_i`, a row of ones for the bias) costs as many multiply-adds
as the batch's weight gradient :math:`\\nabla_W L = \\sum_i G_i`; so does a Linear layer applied to a
sequence (:math:`A_i` its ``[T, d]`` inputs, :math:`D_i` their output gradients). Autograd would compute
that sum a second time. Here the layer's output is routed through :class:`FusedWeightGrad`, whose
backward pass computes the input gradient as autograd does (the same convolution kernel,
``grad_output @ W`` for a Linear layer), the per-sample gradients once (one batched GEMM, or for a
convolution one grouped weight-gradient convolution, whichever was timed faster: :data:`FUSED_METHODS`),
their squared norms, and the weight and bias gradients as their sum over the batch:

.. math:: \\nabla_W L = \\sum_i G_i, \\qquad \\|\\nabla_W \\ell_i\\|^2 = \\|G_i\\|_F^2 .

So measuring costs the copy of the (unfolded) input and the norms instead of a second weight gradient.
``.grad`` then equals autograd's up to float rounding (the same sum, added in another order; measured
differences are ~1e-7 of the gradient in float32), not bit for bit: :class:`~gradiv_lib.norms.DiversityMeter`
takes ``exact_grad=True`` for that. The engine uses this path where it was timed faster than autograd's
weight gradient plus the hook rule's norms (once per layer and shape, :func:`decide`; one batched GEMM
over short sequences is often slower than autograd's single large one, so Linear layers are fused only
where the clock says so), and only where it is exact by construction:
float32/float64 without autocast, zero padding (convolutions), an input with a sequence axis (Linear: a
2-D input's norms cost two row norms, nothing to save), batch on axis 0, a layer whose output carries no
other tensor hooks, and never on the checked first call of a model (``check``). Second derivatives
through it raise (``once_differentiable``) instead of being silently wrong.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gradiv_lib.norms.fastest import time_interleaved
from gradiv_lib.norms.rules import (
    _CACHE_CHUNK_ELEMENTS, _conv_bias_grads, _conv_factors_with_ones, _conv_plans, _conv_weight_grads_by_grouped_conv, _linear_sq_norms,
    _sq_sum_rows,
)

FUSABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_FUSABLE_DTYPES = (torch.float32, torch.float64)


_decisions: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], str | bool]] = weakref.WeakKeyDictionary()
"""Per module and (input shape, output shape, dtype, device, strategy, bias): the fused method (a key of
:data:`FUSED_METHODS`) where fusing was timed faster than autograd's weight gradient plus the hook rule's
norms, else ``False`` (``decide``)."""

FUSED_METHODS = ("gemm", "grouped_conv")
"""How the fused backward forms the per-sample gradients: ``"gemm"``, im2col (convolutions) and one
batched GEMM; ``"grouped_conv"`` (convolutions only), one weight-gradient convolution with the batch
folded into the groups (``rules._conv_weight_grads_by_grouped_conv``), no im2col copy. Which one is
faster depends on the shapes (measured at B = 32, two threads: 0.70 against 2.67 ms for a 3→32-channel
layer on 32×32 images, 2.63 against 1.94 ms for 32→64 channels on 16×16), so :func:`decide` times both."""


def _key(module: nn.Module, x: Tensor, y: Tensor, strategy: str) -> tuple[Any, ...]:
    return (x.shape, y.shape, x.dtype, x.device, strategy, module.bias is not None and module.bias.requires_grad)


def _eligible(module: nn.Module, x: Tensor, y: Tensor) -> bool:
    if isinstance(module, nn.Linear):  # on sequences only: a 2-D input's norms cost two row norms
        layout_ok = x.dim() >= 3
    else:
        layout_ok = module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return layout_ok and module.weight.requires_grad and y.dtype in _FUSABLE_DTYPES and x.dtype == y.dtype == module.weight.dtype


def fusable(module: nn.Module, x: Tensor, y: Tensor, strategy: str) -> str | None:
    """The fused method (:data:`FUSED_METHODS`) for this call of ``module`` when :class:`FusedWeightGrad`
    reproduces it exactly (see the module docstring) and was timed faster than the hook rule for these
    shapes (:func:`decide`, on the checked first call); ``None`` otherwise."""
    if x.dim() < 3 and isinstance(module, nn.Linear):  # never eligible (``_eligible``): skip the lookup, every step
        return None
    known = _decisions.get(module)
    method = known.get(_key(module, x, y, strategy), False) if known is not None else False
    if not method or y._backward_hooks or y.grad_fn is None or torch.is_autocast_enabled(y.device.type):
        return None
    return method


_ROUNDS = 5
"""Interleaved timing rounds of :func:`decide` (best of each; once per layer and shape)."""


def decide(module: nn.Module, x: Tensor, g: Tensor, strategy: str) -> None:
    """Time, once per shape, the fused backward work (per-sample gradients, their norms and their sum)
    against what it replaces (autograd's weight gradient plus the rule's norms, with the method the
    autotuner chose for these shapes), interleaved, best of :data:`_ROUNDS`, on the layer's real
    input and output gradient; remember whether fusing is faster. Materialising costs as many
    multiply-adds as the weight gradient it replaces, so it wins where materialising is the best norm
    method anyway; where the Gram form is much cheaper (few positions, many channels) it may not."""
    key = _key(module, x, g, strategy)
    known = _decisions.setdefault(module, {})
    if key in known:
        return
    if not _eligible(module, x, g):
        known[key] = False
        return
    bias = key[-1]
    if isinstance(module, nn.Linear):
        def hooks() -> Any:
            rows, out = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
            return _linear_sq_norms(module, x, g, strategy), out.t().mm(rows), out.sum(0) if bias else None
    else:
        plan = _conv_plans.get(module, {}).get(key)
        if plan is None:
            known[key] = False
            return
        chunked, method, elements = plan
        bias_sizes = [module.out_channels] if bias else None

        def hooks() -> Any:
            return (
                chunked(partial(method, module, bias=bias), x, g, elements),
                torch.ops.aten.convolution_backward(
                    g, x, module.weight, bias_sizes, module.stride, module.padding, module.dilation, False,
                    [0] * (x.dim() - 2), module.groups, [False, True, bias],
                ),
            )
    methods = ("gemm",) if isinstance(module, nn.Linear) else FUSED_METHODS
    candidates = {"hooks": hooks} | {
        method: partial(summed_per_sample_grads, module, x, g, bias, lambda grads, start: sq_norms_of(grads), method)
        for method in methods
    }
    best, _ = time_interleaved(candidates, x.device, _ROUNDS)
    method = _fastest_fused({name: best[name] for name in methods})
    known[key] = method if _fused_wins(best[method], best["hooks"]) else False


def _fastest_fused(seconds: dict[str, float]) -> str:
    """The fused method :func:`decide` weighs against the hooks: the fastest (the tests replace this to
    force one)."""
    return min(seconds, key=seconds.__getitem__)


def _fused_wins(fused_seconds: float, hooks_seconds: float) -> bool:
    """The decision rule of :func:`decide` (the tests replace it to force either path)."""
    return fused_seconds < hooks_seconds


def fused_decision(module: nn.Module) -> dict[tuple[Any, ...], str | bool]:
    """What :func:`decide` found for ``module``, per shape key (for tests and benchmarks)."""
    return dict(_decisions.get(module, {}))


def per_sample_weight_grads(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
    """``[B, G, d (+1), p]``: per sample and group, the transposed gradient of the group's weight block
    (rows: input channel × kernel position, or input feature, plus the bias as the last row when ``bias``)."""
    if isinstance(module, nn.Linear):
        batch = x.shape[0]
        rows = x.reshape(batch, -1, x.shape[-1])  # [B, T, d]
        if bias:
            with_ones = rows.new_empty(batch, rows.shape[1], rows.shape[2] + 1)
            with_ones[..., :-1].copy_(rows)
            with_ones[..., -1].fill_(1.0)
            rows = with_ones
        return torch.matmul(rows.transpose(1, 2), g.reshape(batch, -1, g.shape[-1])).unsqueeze(1)
    a, d = _conv_factors_with_ones(module, x, g, bias)
    return torch.matmul(a, d.transpose(-1, -2))


def _sizes(module: nn.Module, g: Tensor) -> tuple[int, int, int, int]:
    """(input rows per group without the bias, outputs, positions per sample, groups)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, math.prod(g.shape[1:-1]), 1
    rows = module.in_channels // module.groups * math.prod(module.kernel_size)
    return rows, module.out_channels, math.prod(g.shape[2:]), module.groups


PerSampleGrads = Tensor | tuple[Tensor, Tensor | None]
"""One batch chunk's per-sample gradients as a fused method forms them: ``"gemm"``, one ``[B_c, G, d (+1), p]``
tensor (:func:`per_sample_weight_grads`); ``"grouped_conv"``, the weight's ``[B_c, *W.shape]`` and the
bias's ``[B_c, C_out]`` (or ``None``)."""


def sq_norms_of(grads: PerSampleGrads) -> Tensor:
    """Per-sample squared norms ``[B_c]`` of one chunk's per-sample gradients, in either layout."""
    if isinstance(grads, Tensor):
        return _sq_sum_rows(grads)
    weight, bias = grads
    return _sq_sum_rows(weight) if bias is None else _sq_sum_rows(weight).add_(_sq_sum_rows(bias))


def per_sample_parameter_grads(module: nn.Module, parts: list[PerSampleGrads], bias: bool) -> dict[str, Tensor]:
    """``{"weight": [B, *W.shape], "bias": [B, C_out]}`` from the chunks of one batch, in either layout."""
    if isinstance(parts[0], Tensor):
        weight, bias_grads = weight_and_bias(module, parts[0] if len(parts) == 1 else torch.cat(parts), bias)
    else:
        weight = parts[0][0] if len(parts) == 1 else torch.cat([w for w, _ in parts])
        bias_grads = (parts[0][1] if len(parts) == 1 else torch.cat([b for _, b in parts])) if bias else None
    return {"weight": weight} if bias_grads is None else {"weight": weight, "bias": bias_grads}


def _grouped_conv_grads(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Per-sample weight gradients by one grouped weight-gradient convolution, and the bias's Σ_t δ_t."""
    weight = _conv_weight_grads_by_grouped_conv(module, x, g)
    return weight, (_conv_bias_grads(g) if bias else None)


def summed_per_sample_grads(
    module: nn.Module, x: Tensor, g: Tensor, bias: bool, report: Callable[[PerSampleGrads, int], Any], method: str = "gemm"
) -> tuple[Tensor, Tensor | None]:
    """The weight and bias gradients Σ_i G_i, with the per-sample gradients formed by ``method``
    (:data:`FUSED_METHODS`) in batch chunks of about ``_CACHE_CHUNK_ELEMENTS`` elements, each chunk handed to
    ``report(grads, start)`` first (:data:`PerSampleGrads`)."""
    batch = x.shape[0]
    rows, outputs, positions, groups = _sizes(module, g)
    rows += 1 if bias else 0
    if method == "grouped_conv":
        per_sample = rows * outputs + x[0].numel()
        form = partial(_grouped_conv_grads, module, bias=bias)
    else:
        per_sample = rows * (outputs + positions * groups)
        form = partial(per_sample_weight_grads, module, bias=bias)
    chunk = max(1, _CACHE_CHUNK_ELEMENTS // max(1, per_sample))
    whole = chunk >= batch  # one chunk: no slicing
    summed: list[Tensor | None] | None = None
    for start in range(0, batch, chunk):
        grads = form(x if whole else x[start : start + chunk], g if whole else g[start : start + chunk])
        report(grads, start)
        parts = [grads.sum(0)] if isinstance(grads, Tensor) else [t.sum(0) if t is not None else None for t in grads]
        summed = parts if summed is None else [s.add_(p) if s is not None else None for s, p in zip(summed, parts)]
    if method == "grouped_conv":
        return summed[0], summed[1]
    return weight_and_bias(module, summed[0], bias)


def weight_and_bias(module: nn.Module, grads: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Split transposed gradients ``[..., G, d (+1), p]`` (the sum Σ_i G_iᵀ, or per-sample ones with a
    leading batch axis) into the weight's ``[..., *W.shape]`` and the bias's ``[..., C_out]``."""
    lead, rows = grads.shape[:-3], grads.shape[-2] - (1 if bias else 0)
    weight = grads[..., :rows, :].transpose(-1, -2).reshape(*lead, *module.weight.shape)
    return weight, (grads[..., rows, :].reshape(*lead, -1) if bias else None)


class FusedWeightGrad(torch.autograd.Function):
    """``y = conv(x, W, b)`` or ``y = x Wᵀ + b`` (already computed by the module) with the fused backward
    pass above.

    ``report(per_sample, start)`` receives the per-sample gradients of one batch chunk at a time
    (:data:`PerSampleGrads`; ``start``: its first sample) during the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, output: list[Tensor], module: nn.Module,
                report: Callable[[PerSampleGrads, int], None], method: str) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.report, ctx.method, ctx.has_bias = module, report, method, bias is not None and bias.requires_grad
        # the module's output, detached, handed over in a list: a tensor argument returned as-is would
        # become a view of an input, which autograd forbids to modify in place (ReLU(inplace=True))
        return output.pop()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        module, bias = ctx.module, ctx.has_bias
        grad_input = None
        if ctx.needs_input_grad[0]:
            if isinstance(module, nn.Linear):
                grad_input = grad_output.matmul(weight)
            else:
                grad_input = torch.ops.aten.convolution_backward(
                    grad_output, x, weight, None, module.stride, module.padding, module.dilation, False,
                    [0] * (x.dim() - 2), module.groups, [True, False, False],
                )[0]
        weight_grad, bias_grad = summed_per_sample_grads(module, x.detach(), grad_output, bias, ctx.report, ctx.method)
        return grad_input, weight_grad, bias_grad, None, None, None, None


def fused_output(module: nn.Module, x: Tensor, y: Tensor, report: Callable[[PerSampleGrads, int], None], method: str) -> Tensor:
    """The module output, re-attached to ``x``, ``W`` and ``b`` through :class:`FusedWeightGrad`, whose
    backward pass forms the per-sample gradients by ``method`` (:data:`FUSED_METHODS`)."""
    return FusedWeightGrad.apply(x, module.weight, module.bias, [y.detach()], module, report, method)
