"""Convolutions whose weight gradient is the sum of the per-sample gradients the engine needs anyway.

Derived in chapter 2 of the book (book/ch02_computing_fast).

For a convolution, the exact per-sample gradient :math:`G_i = D_i [A_i; 1]^\\top` (``rules.py``: im2col
input :math:`A_i`, output gradient :math:`D_i`, a row of ones for the bias) costs as many multiply-adds
as the batch's weight gradient :math:`\\nabla_W L = \\sum_i G_i`. Autograd would compute that sum a
second time. Here the layer's output is routed through :class:`FusedConv`, whose backward pass
computes the input gradient with the same kernel autograd uses, the per-sample gradients once by one
batched GEMM, their squared norms, and the weight and bias gradients as their sum over the batch:

.. math:: \\nabla_W L = \\sum_i G_i, \\qquad \\|\\nabla_W \\ell_i\\|^2 = \\|G_i\\|_F^2 .

So measuring costs the im2col copy and the norms instead of a second weight-gradient convolution.
``.grad`` then equals autograd's up to float rounding (the same sum, added in another order; measured
differences are ~1e-7 of the gradient in float32), not bit for bit: :class:`~gradiv_lib.norms.DiversityMeter`
takes ``exact_grad=True`` for that. The engine uses this path only where it is exact by construction:
float32/float64 without autocast, zero padding, batch on axis 0, a layer whose output carries no other
tensor hooks, and never on the checked first call of a model (``check``). Second derivatives through
it raise (``once_differentiable``) instead of being silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gradiv_lib.norms.rules import _CACHE_CHUNK_ELEMENTS, _conv_factors_with_ones

FUSABLE_TYPES = (nn.Conv1d, nn.Conv2d)
_FUSABLE_DTYPES = (torch.float32, torch.float64)


def fusable(module: nn.Module, x: Tensor, y: Tensor) -> bool:
    """Whether :class:`FusedConv` reproduces this call of ``module`` exactly (see the module docstring)."""
    return (
        module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.requires_grad
        and y.dtype in _FUSABLE_DTYPES
        and x.dtype == y.dtype == module.weight.dtype
        and not y._backward_hooks
        and y.grad_fn is not None
        and not torch.is_autocast_enabled(y.device.type)
    )


def per_sample_weight_grads(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
    """``[B, G, d (+1), p]``: per sample and group, the transposed gradient of the group's weight block
    (rows: input channel × kernel position, plus the bias as the last row when ``bias``)."""
    a, d = _conv_factors_with_ones(module, x, g, bias)
    return torch.matmul(a, d.transpose(-1, -2))


def _weight_and_bias(module: nn.Module, summed: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Split Σ_i G_iᵀ (``[G, d (+1), p]``) into the weight's and the bias's gradients."""
    rows = summed.shape[1] - (1 if bias else 0)
    weight = summed[:, :rows].transpose(1, 2).reshape(module.weight.shape)
    return weight, (summed[:, rows].reshape(-1) if bias else None)


class FusedConv(torch.autograd.Function):
    """``y = conv(x, W, b)`` (already computed by the module) with the fused backward pass above.

    ``report(per_sample, start)`` receives the per-sample gradients ``[B_c, G, d (+1), p]`` of one batch
    chunk at a time (``start``: its first sample) during the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, output: list[Tensor], module: nn.Module,
                report: Callable[[Tensor, int], None]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.report, ctx.has_bias = module, report, bias is not None and bias.requires_grad
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
            dims = x.dim() - 2
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, module.stride, module.padding, module.dilation, False,
                [0] * dims, module.groups, [True, False, False],
            )[0]
        x, g = x.detach(), grad_output
        batch = x.shape[0]
        rows = module.in_channels // module.groups * weight[0, 0].numel() + (1 if bias else 0)
        per_sample = rows * module.out_channels + rows * g[0, 0].numel() * module.groups
        chunk = max(1, _CACHE_CHUNK_ELEMENTS // max(1, per_sample))
        summed = None
        for start in range(0, batch, chunk):
            grads = per_sample_weight_grads(module, x[start : start + chunk], g[start : start + chunk], bias)
            ctx.report(grads, start)
            part = grads.sum(0)
            summed = part if summed is None else summed.add_(part)
        weight_grad, bias_grad = _weight_and_bias(module, summed, bias)
        return grad_input, weight_grad, bias_grad, None, None, None


def fused_output(module: nn.Module, x: Tensor, y: Tensor, report: Callable[[Tensor, int], None]) -> Tensor:
    """The module output, re-attached to ``x``, ``W`` and ``b`` through :class:`FusedConv`."""
    return FusedConv.apply(x, module.weight, module.bias, [y.detach()], module, report)
