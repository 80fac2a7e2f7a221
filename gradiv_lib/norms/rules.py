"""Per-layer rules for per-sample squared gradient norms ("ghost norms").

Derived in chapter 2 of the book (book/ch02_computing_fast).

For one layer and one sample :math:`i`, let :math:`a_i` be the layer input and
:math:`\\delta_i = \\partial L / \\partial y_i` the gradient that reaches the layer output
:math:`y_i` when :math:`L = \\sum_i \\ell_i` is back-propagated. Because the layer treats samples
independently, :math:`\\delta_i` is exactly :math:`\\partial \\ell_i / \\partial y_i`, so every
per-sample parameter gradient is a function of :math:`(a_i, \\delta_i)` alone:

* Linear, 2-D input: :math:`\\nabla_W \\ell_i = \\delta_i a_i^\\top`, hence
  :math:`\\|\\nabla_W \\ell_i\\|^2 = \\|a_i\\|^2 \\|\\delta_i\\|^2` and
  :math:`\\|\\nabla_b \\ell_i\\|^2 = \\|\\delta_i\\|^2`.
* Linear on a sequence (and convolution after ``unfold``), :math:`A_i \\in \\mathbb R^{T\\times d}`,
  :math:`D_i \\in \\mathbb R^{T\\times p}`: :math:`\\nabla_W \\ell_i = D_i^\\top A_i`, whose squared norm is
  either materialised (cost :math:`T d p`; for convolutions by im2col + batched GEMM or by one
  grouped weight-gradient convolution) or taken in Gram form
  :math:`\\sum_{t,s} (a_t\\cdot a_s)(\\delta_t\\cdot\\delta_s)` (cost :math:`T^2 (d + p)`); ``"auto"``
  times the methods whose modelled cost is within 4x of the cheapest on the first call for a shape
  and keeps the fastest (``fastest.py``).
* Embedding: the rows of :math:`\\nabla_E \\ell_i` are :math:`\\sum_{t: x_t = v} \\delta_t`.
* LayerNorm, GroupNorm, InstanceNorm, eval-mode BatchNorm: :math:`\\nabla_\\gamma \\ell_i = \\sum \\hat x_i \\odot
  \\delta_i`, :math:`\\nabla_\\beta \\ell_i = \\sum \\delta_i` over the axes the affine parameters
  are broadcast along.

Each rule gives either the squared norms (shape ``[B]``) or the per-sample gradients
(``{parameter name: [B, *parameter.shape]}``); the engine needs the latter when a parameter is used
more than once, because the per-sample gradient is then a sum over the uses.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradiv_lib.norms.fastest import run_fastest, winner_of, within_factor

SequenceStrategy = Literal["auto", "gram", "materialize"]
"""How layers with a position axis (sequence Linear, convolution) form per-sample norms."""

SEQUENCE_STRATEGIES: tuple[str, ...] = get_args(SequenceStrategy)

_CHUNK_ELEMENTS = 1 << 24
"""Largest temporary (in elements) a rule allocates at once; bigger batches are processed in chunks."""


def _save_input(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """What most rules keep from the forward pass: the layer input (autograd keeps it anyway)."""
    return x.detach()


@dataclass(frozen=True)
class LayerRule:
    """How to obtain one layer type's per-sample gradient information.

    Attributes
    ----------
    sq_norms
        ``(module, saved, grad_output, strategy) -> Tensor[B]``: per-sample squared norm of the
        gradient of the module's trainable parameters.
    per_sample_grads
        ``(module, saved, grad_output) -> {name: Tensor[B, *shape]}``: per-sample gradients of the
        module's trainable parameters, keyed by parameter name.
    batched_input_dim
        Smallest number of input dimensions that includes a batch axis (unbatched calls are refused).
    save
        ``(module, input, output) -> saved``, run in the forward pass: what the backward rule needs
        (the detached input by default).
    leading_dims
        ``(module, grad_output) -> k`` for layers that act on the last axes only (Linear, Embedding,
        LayerNorm): the batch may be on any of the first ``k`` axes and is moved to axis 0 before the
        rule runs. ``None``: the batch must be on axis 0 (convolutions, GroupNorm, BatchNorm).
    sq_norm_factors
        Optional ``(module, saved, grad_output) -> (u, v, c)`` with ``sq_norms = (u² + c) v²``
        (``u``, ``v`` of shape ``[B]``), or ``None`` where the layer call does not factor so. The engine
        then combines the factors of all such layers at once (2-D Linear: ``u = ‖a_i‖``,
        ``v = ‖δ_i‖``, ``c = 1`` with a trainable bias).
    """

    sq_norms: Callable[[nn.Module, Any, Tensor, SequenceStrategy], Tensor]
    per_sample_grads: Callable[[nn.Module, Any, Tensor], dict[str, Tensor]]
    batched_input_dim: int
    save: Callable[[nn.Module, Tensor, Tensor], Any] = _save_input
    leading_dims: Callable[[nn.Module, Tensor], int] | None = None
    sq_norm_factors: Callable[[nn.Module, Any, Tensor], tuple[Tensor, Tensor, float] | None] | None = None


def _trainable(param: Tensor | None) -> bool:
    return param is not None and param.requires_grad


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _working_precision(tensor: Tensor) -> Tensor:
    """Half-precision tensors are upcast: their squared norms overflow."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def _in_batch_chunks(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, g: Tensor, elements_per_sample: int) -> Tensor:
    """Apply ``fn`` to slices of the batch so no temporary exceeds ``_CHUNK_ELEMENTS``."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, elements_per_sample))
    if chunk >= a.shape[0]:
        return fn(a, g)
    return torch.cat([fn(a[s : s + chunk], g[s : s + chunk]) for s in range(0, a.shape[0], chunk)])


def _gram_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """Σ_{t,s} (a_t·a_s)(δ_t·δ_s) for a: [B, ..., T, d], g: [B, ..., T, p]; returns shape [B]."""
    per_group = (torch.matmul(a, a.transpose(-1, -2)) * torch.matmul(g, g.transpose(-1, -2))).sum((-1, -2))
    return per_group.reshape(a.shape[0], -1).sum(1)


def _materialized_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """‖Aᵀ D‖²_F for a: [B, ..., T, d], g: [B, ..., T, p]; returns shape [B]."""
    return torch.matmul(a.transpose(-1, -2), g).square().reshape(a.shape[0], -1).sum(1)


def _terms_bound(a: Tensor, g: Tensor) -> Tensor:
    """Per sample, ‖A‖²_F ‖D‖²_F ≥ (Σ_t ‖a_t‖ ‖δ_t‖)² ≥ ‖Σ_t δ_t a_tᵀ‖²: the size of the terms a per-sample
    norm is a sum of, whatever it cancels to (Cauchy-Schwarz); the scale of the race's agreement check."""
    return _sq_sum_rows(a.double()) * _sq_sum_rows(g.double())


def _method_costs(positions: int, in_features: int, out_features: int) -> dict[str, float]:
    """Multiply-adds per sample and group: Gram T²(d + p), materialisation T·d·p."""
    return {"gram": positions * positions * (in_features + out_features), "materialize": positions * in_features * out_features}


def _allowed_methods(costs: dict[str, float], strategy: SequenceStrategy) -> set[str]:
    """``"auto"`` keeps the methods within 4x of the cheapest modelled cost; others force one."""
    return within_factor(costs) if strategy == "auto" else {strategy}


# --- Linear -----------------------------------------------------------------------------------


def _linear_sequence_weight_sq_norms(a: Tensor, g: Tensor, strategy: SequenceStrategy) -> Tensor:
    positions, in_features, out_features = a.shape[1], a.shape[2], g.shape[2]
    allowed = _allowed_methods(_method_costs(positions, in_features, out_features), strategy)
    candidates = {}
    if "gram" in allowed:
        candidates["gram"] = lambda: _in_batch_chunks(_gram_sq_norms, a, g, 2 * positions * positions)
    if "materialize" in allowed:
        candidates["materialize"] = lambda: _in_batch_chunks(_materialized_sq_norms, a, g, in_features * out_features)
    key = ("linear", tuple(a.shape), tuple(g.shape), a.dtype, a.device, strategy)
    return run_fastest(key, candidates, a.device, lambda: _terms_bound(a, g))


def _linear_sq_norms(module: nn.Module, a: Tensor, g: Tensor, strategy: SequenceStrategy) -> Tensor:
    a, g = _working_precision(a), _working_precision(g)
    batch = a.shape[0]
    if a.dim() == 2:
        # ‖δ_i a_iᵀ‖² + ‖δ_i‖² = (‖a_i‖² + 1)‖δ_i‖²: two row-norm reductions (no [B, d] temporary, which
        # for large layers costs a fresh allocation and page faults on every step) and [B]-sized arithmetic
        g_sq = torch.linalg.vector_norm(g, dim=1).square_()
        if not _trainable(module.weight):
            return g_sq if _trainable(module.bias) else torch.zeros_like(g_sq)
        total = torch.linalg.vector_norm(a, dim=1).square_()
        if _trainable(module.bias):
            total.add_(1.0)
        return total.mul_(g_sq)
    a = a.reshape(batch, -1, a.shape[-1])
    g = g.reshape(batch, -1, g.shape[-1])
    total = a.new_zeros(batch)
    if _trainable(module.weight):
        total = total + _linear_sequence_weight_sq_norms(a, g, strategy)
    if _trainable(module.bias):
        total = total + g.sum(1).square().sum(1)
    return total


def _linear_sq_norm_factors(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, float] | None:
    """``(‖a_i‖, ‖δ_i‖, 1 or 0)`` for a 2-D input with a trainable weight (``None`` otherwise, and for
    half precision, whose norms are upcast by :func:`_linear_sq_norms`)."""
    if a.dim() != 2 or not _trainable(module.weight) or a.dtype in _HALF_DTYPES or g.dtype in _HALF_DTYPES:
        return None
    return torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(g, dim=1), 1.0 if _trainable(module.bias) else 0.0


def _linear_per_sample_grads(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    a, g = _working_precision(a), _working_precision(g)
    batch = a.shape[0]
    a = a.reshape(batch, -1, a.shape[-1])
    g = g.reshape(batch, -1, g.shape[-1])
    grads = {}
    if _trainable(module.weight):
        grads["weight"] = torch.bmm(g.transpose(1, 2), a)
    if _trainable(module.bias):
        grads["bias"] = g.sum(1)
    return grads


# --- Conv1d / Conv2d ----------------------------------------------------------------------------


def _conv_geometry(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Kernel, dilation and stride as 2-D tuples (Conv1d is a convolution over a height-1 image)."""
    kernel, dilation, stride = tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride)
    if len(kernel) == 1:
        return (1, *kernel), (1, *dilation), (1, *stride)
    return kernel, dilation, stride


def _padded_conv_input(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The conv input with the module's padding applied explicitly, as a contiguous [B, C, H, W]."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    elif any(module.padding):
        x = F.pad(x, [p for p in reversed(module.padding) for _ in range(2)])
    if x.dim() == 3:
        x = x.unsqueeze(2)
    return x.contiguous()


def _conv_windows(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The receptive fields of the conv input, ``[B, G, C_in/G, k_h, k_w, H_out, W_out]``: a strided view of
    the padded input (no copy)."""
    padded = _padded_conv_input(module, x)
    (kh, kw), (dh, dw), (sh, sw) = _conv_geometry(module)
    batch, channels, height, width = padded.shape
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    groups = module.groups
    st = padded.stride()
    return padded.as_strided(
        (batch, groups, channels // groups, kh, kw, out_h, out_w),
        (st[0], channels // groups * st[1], st[1], st[2] * dh, st[3] * dw, st[2] * sh, st[3] * sw),
        padded.storage_offset(),
    )


def _conv_factors(module: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Unfolded input [B, G, L, d_g] and output gradient [B, G, L, p_g] (views), per group."""
    batch, groups = x.shape[0], module.groups
    windows = _conv_windows(module, x)
    positions = windows.shape[-2] * windows.shape[-1]
    a = windows.reshape(batch, groups, -1, positions).transpose(-1, -2)
    d = g.reshape(batch, groups, -1, positions).transpose(-1, -2)
    return a, d


def _conv_weight_grads_by_grouped_conv(module: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients [B, *weight.shape] as ONE weight-gradient convolution with the
    batch folded into the groups (groups = B·G), so the backend's convolution kernels do the work."""
    kernel, dilation, stride = _conv_geometry(module)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        x, padding = _padded_conv_input(module, x), (0, 0)
    else:
        x, padding = (x.unsqueeze(2), (0, *module.padding)) if x.dim() == 3 else (x, tuple(module.padding))
    g = g.unsqueeze(2) if g.dim() == 3 else g
    batch, in_channels = x.shape[0], x.shape[1]
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(1, batch * in_channels, *x.shape[2:]),
        (batch * module.out_channels, in_channels // module.groups, *kernel),
        g.reshape(1, batch * module.out_channels, *g.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=batch * module.groups,
    )
    return grads.view(batch, *module.weight.shape)


_CACHE_CHUNK_ELEMENTS = 1 << 20
"""Conv norm temporaries are processed in batch chunks of about this many elements (4 MB in float32),
so the unfolded input of a chunk is still in cache when the batched GEMM reads it."""


def _sq_sum_rows(t: Tensor) -> Tensor:
    """Σ over all but the first axis of t² (one reduction, no temporary of t's size)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square_()


def _conv_bias_grads(g: Tensor) -> Tensor:
    """Per-sample gradients of a convolution's bias, Σ over positions of δ: ``[B, C_out]``."""
    return g.reshape(g.shape[0], g.shape[1], -1).sum(2)


def _conv_factors_with_ones(module: nn.Module, x: Tensor, g: Tensor, ones: bool) -> tuple[Tensor, Tensor]:
    """Unfolded input [B, G, d_g (+1), L] (one copy of the windows, plus a row of ones per group when
    ``ones``: the bias gradient then comes out of the same GEMM as the weight gradient) and the output
    gradient [B, G, p_g, L] (a view)."""
    batch, groups = x.shape[0], module.groups
    windows = _conv_windows(module, x)
    rows = math.prod(windows.shape[2:5])
    positions = windows.shape[-2] * windows.shape[-1]
    if ones:
        a = windows.new_empty(batch, groups, rows + 1, positions)
        a[:, :, :rows].view(windows.shape).copy_(windows)
        a[:, :, rows].fill_(1.0)
    else:
        a = windows.reshape(batch, groups, rows, positions)
    return a, g.reshape(batch, groups, -1, positions)


def _conv_chunked(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, g: Tensor, elements_per_sample: int) -> Tensor:
    chunk = max(1, _CACHE_CHUNK_ELEMENTS // max(1, elements_per_sample))
    if chunk >= x.shape[0]:
        return fn(x, g)
    return torch.cat([fn(x[s : s + chunk], g[s : s + chunk]) for s in range(0, x.shape[0], chunk)])


def _conv_with_bias(module: nn.Module) -> bool:
    return _trainable(module.bias)


def _conv_sq_norms_gram(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
    """Σ_{t,s} (a_t·a_s + [bias])(δ_t·δ_s) per group: weight (and bias) squared norms."""
    a, d = _conv_factors_with_ones(module, x, g, False)
    gram_a = torch.matmul(a.transpose(-1, -2), a)
    if bias:
        gram_a.add_(1.0)
    gram_d = torch.matmul(d.transpose(-1, -2), d)
    return gram_a.mul_(gram_d).reshape(x.shape[0], -1).sum(1)


def _conv1d_sq_norms_shifted_gram(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
    """Gram form of a Conv1d without unfolding: the patch Gram matrix is a sum of shifted windows of
    the channel Gram matrix of the padded input,

    .. math:: (A A^\\top)_{ts} = \\sum_k \\sum_c x_{c, st+kd}\\, x_{c, ss+kd} = \\sum_k X_{st+kd,\\, ss+kd},
              \\qquad X = x_\\text{pad}^\\top x_\\text{pad},

    (stride s, dilation d), which costs :math:`L_\\text{pad}^2 C_\\text{in}/G + k T^2` per sample and group
    instead of :math:`T^2 C_\\text{in} k / G` and needs no im2col copy. With zero padding, :math:`X` is the
    unpadded input's channel Gram matrix with zero rows and columns around it: padding that smaller matrix
    costs less than padding the input (the same numbers, bit for bit)."""
    batch, groups = x.shape[0], module.groups
    (_, kernel), (_, dilation), (_, stride) = _conv_geometry(module)
    positions = g.shape[-1]
    zeros = module.padding_mode == "zeros"
    source = x if zeros else _padded_conv_input(module, x).squeeze(2)  # [B, C, L] or [B, C, L_pad]
    xg = source.reshape(batch, groups, -1, source.shape[-1])
    channel_gram = torch.matmul(xg.transpose(-1, -2), xg)  # [B, G, L, L] (or L_pad)
    if zeros and any(module._reversed_padding_repeated_twice):
        left, right = module._reversed_padding_repeated_twice[:2]
        channel_gram = F.pad(channel_gram, (left, right, left, right))  # [B, G, L_pad, L_pad]
    span = stride * (positions - 1) + 1
    gram_a = channel_gram[..., :span:stride, :span:stride].clone()
    for k in range(1, kernel):
        offset = k * dilation
        gram_a.add_(channel_gram[..., offset : offset + span : stride, offset : offset + span : stride])
    if bias:
        gram_a.add_(1.0)
    d = g.reshape(batch, groups, -1, positions)
    gram_d = torch.matmul(d.transpose(-1, -2), d)
    return gram_a.mul_(gram_d).reshape(batch, -1).sum(1)


def _conv_sq_norms_im2col(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
    """‖D_i [A_i; 1]ᵀ‖² per sample by im2col + batched GEMM (the ones row only with ``bias``)."""
    a, d = _conv_factors_with_ones(module, x, g, bias)
    return _sq_sum_rows(torch.matmul(a, d.transpose(-1, -2)))  # [A; 1] Dᵀ: the faster orientation for MKL here


def _conv_sq_norms_grouped_conv(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
    """Per-sample weight gradients by one grouped weight-gradient convolution (+ bias sums)."""
    total = _sq_sum_rows(_conv_weight_grads_by_grouped_conv(module, x, g))
    if bias:
        total.add_(_sq_sum_rows(_conv_bias_grads(g)))
    return total


def _conv_weight_sq_norms_gram(module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Weight-only squared norms by the Gram form."""
    return _conv_sq_norms_gram(module, x, g, False)


def _conv_weight_sq_norms_im2col(module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Weight-only squared norms by im2col + batched GEMM."""
    return _conv_sq_norms_im2col(module, x, g, False)


def _conv_weight_sq_norms_grouped_conv(module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Weight-only squared norms by a grouped weight-gradient convolution."""
    return _conv_sq_norms_grouped_conv(module, x, g, False)


_ConvPlan = tuple[Callable[..., Tensor], Callable[..., Tensor], int]
"""(chunking helper, method, elements per sample) of one conv norm method."""

_conv_plans: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _ConvPlan]] = weakref.WeakKeyDictionary()
"""The chosen method per module and (shapes, dtype, device, strategy, bias): later calls skip the cost
model, the candidate set and the autotuner's key (tens of microseconds per layer and step). Bypassed
while ``run_fastest`` is replaced (the test harness then checks every candidate on every call)."""

_RACE = run_fastest


def _conv_weight_sq_norms(module: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor, strategy: SequenceStrategy) -> Tensor:
    """Squared norms of the per-sample gradients of weight and (when trainable) bias."""
    bias = _conv_with_bias(module)
    fast_key = (x.shape, g.shape, x.dtype, x.device, strategy, bias)
    known = _conv_plans.get(module)
    plan = known.get(fast_key) if known is not None and run_fastest is _RACE else None
    if plan is not None:
        chunked, method, elements = plan
        return chunked(partial(method, module, bias=bias), x, g, elements)
    positions = math.prod(g.shape[2:])
    groups = module.groups
    in_per_group = module.in_channels // groups * math.prod(module.kernel_size)
    out_per_group = module.out_channels // groups
    unfolded = (in_per_group + 1) * groups * positions
    costs = _method_costs(positions, in_per_group, out_per_group)
    one_d = x.dim() == 3
    if one_d:  # shifted Gram (Conv1d only): channel Gram of the padded input, k shifted windows, output Gram
        padded_length = x.shape[-1] + 2 * (module.padding[0] if not isinstance(module.padding, str) else module.kernel_size[0])
        costs["shifted_gram"] = padded_length**2 * module.in_channels // groups + (module.kernel_size[0] + out_per_group) * positions**2
    allowed = _allowed_methods(costs, strategy)
    if strategy == "gram" and one_d:
        allowed.add("shifted_gram")
    plans: dict[str, _ConvPlan] = {}
    if "gram" in allowed:
        plans["gram"] = (_conv_chunked, _conv_sq_norms_gram, unfolded + 2 * groups * positions * positions)
    if "shifted_gram" in allowed:
        elements = groups * (x.shape[-1] + 2 * module.kernel_size[0] * module.dilation[0]) ** 2 + 2 * groups * positions * positions
        plans["shifted_gram"] = (_conv_chunked, _conv1d_sq_norms_shifted_gram, elements)
    if "materialize" in allowed:
        elements = unfolded + groups * (in_per_group + 1) * out_per_group
        plans["im2col"] = (_conv_chunked, _conv_sq_norms_im2col, elements)
        plans["grouped_conv"] = (_in_batch_chunks, _conv_sq_norms_grouped_conv, elements)

    def run(plan: _ConvPlan) -> Callable[[], Tensor]:
        chunked, method, elements = plan
        return lambda: chunked(partial(method, module, bias=bias), x, g, elements)

    key = (
        "conv", module.kernel_size, module.stride, module.padding, module.dilation, groups, module.padding_mode,
        bias, tuple(x.shape), tuple(g.shape), x.dtype, x.device, strategy,
    )
    def terms() -> Tensor:
        """‖A‖²_F ‖D‖²_F (``_terms_bound``) with ‖A‖²_F ≤ k_h·k_w ‖x_pad‖² (an entry of the padded input
        is in at most k_h·k_w windows), plus one per position and group for the bias's ones row."""
        windows = math.prod(module.kernel_size) * _sq_sum_rows(_padded_conv_input(module, x).double())
        return windows.add_(positions * groups if bias else 0) * _sq_sum_rows(g.double())

    result = run_fastest(key, {name: run(plan) for name, plan in plans.items()}, x.device, terms)
    winner = next(iter(plans)) if len(plans) == 1 else winner_of(key)
    if winner is not None:
        _conv_plans.setdefault(module, {})[fast_key] = plans[winner]
    return result


def _conv_sq_norms(module: nn.Module, x: Tensor, g: Tensor, strategy: SequenceStrategy) -> Tensor:
    x, g = _working_precision(x), _working_precision(g)
    if _trainable(module.weight):
        return _conv_weight_sq_norms(module, x, g, strategy)  # includes the bias when it is trainable
    if _trainable(module.bias):
        return _sq_sum_rows(_conv_bias_grads(g))
    return x.new_zeros(x.shape[0])


def _conv_per_sample_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    x, g = _working_precision(x), _working_precision(g)
    batch = x.shape[0]
    grads = {}
    if _trainable(module.weight):
        a, d = _conv_factors(module, x, g)
        grads["weight"] = torch.matmul(d.transpose(-1, -2), a).reshape(batch, *module.weight.shape)
    if _trainable(module.bias):
        grads["bias"] = _conv_bias_grads(g)
    return grads


# --- Embedding ----------------------------------------------------------------------------------


def _embedding_rows(module: nn.Embedding, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Flat keys ``i·V + token`` and the matching output-gradient rows (padding rows zeroed)."""
    batch, dim = ids.shape[0], g.shape[-1]
    ids = ids.reshape(batch, -1)
    rows = _working_precision(g).reshape(batch, -1, dim)
    if module.padding_idx is not None:
        rows = rows * (ids != module.padding_idx).unsqueeze(-1)
    offsets = torch.arange(batch, device=ids.device).unsqueeze(1) * module.num_embeddings
    return (ids + offsets).reshape(-1), rows.reshape(-1, dim)


def _embedding_sq_norms(module: nn.Module, ids: Tensor, g: Tensor, strategy: SequenceStrategy) -> Tensor:
    if not _trainable(module.weight):
        return _working_precision(g).new_zeros(ids.shape[0])
    keys, rows = _embedding_rows(module, ids, g)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    summed = rows.new_zeros(unique_keys.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
    sample_of_key = torch.div(unique_keys, module.num_embeddings, rounding_mode="floor")
    return rows.new_zeros(ids.shape[0]).index_add_(0, sample_of_key, summed.square().sum(1))


def _embedding_per_sample_grads(module: nn.Module, ids: Tensor, g: Tensor) -> dict[str, Tensor]:
    if not _trainable(module.weight):
        return {}
    keys, rows = _embedding_rows(module, ids, g)
    dense = rows.new_zeros(ids.shape[0] * module.num_embeddings, rows.shape[1]).index_add_(0, keys, rows)
    return {"weight": dense.view(ids.shape[0], *module.weight.shape)}


# --- LayerNorm / GroupNorm / eval-mode BatchNorm --------------------------------------------------


def _layer_norm_per_sample_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    shape = tuple(module.normalized_shape)
    features = math.prod(shape)
    batch = x.shape[0]
    positions = x.numel() // (batch * features)
    g = _working_precision(g).reshape(batch, positions, features)
    grads = {}
    if _trainable(module.weight):
        xhat = F.layer_norm(_working_precision(x), shape, eps=module.eps).reshape(batch, positions, features)
        grads["weight"] = (xhat * g).sum(1).view(batch, *shape)
    if _trainable(module.bias):
        grads["bias"] = g.sum(1).view(batch, *shape)
    return grads


def _save_group_norm(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Input and per-(sample, group) mean and 1/std, read from the autograd node when it saved them.

    They are detached: a saved output unpacks with the node as its ``grad_fn``, and keeping that in a
    hook on the same node would be a reference cycle that leaks the whole graph.
    """
    node = y.grad_fn
    if type(node).__name__ == "NativeGroupNormBackward0":
        return x.detach(), node._saved_result1.detach(), node._saved_result2.detach()
    batch, channels = x.shape[0], module.num_channels
    _, mean, rstd = torch.ops.aten.native_group_norm(x.detach(), None, None, batch, channels, x.numel() // (batch * channels), module.num_groups, module.eps)
    return x.detach(), mean, rstd


def _group_norm_per_sample_grads(module: nn.Module, saved: tuple[Tensor, Tensor, Tensor], g: Tensor) -> dict[str, Tensor]:
    """One fused GroupNorm weight/bias-gradient kernel with the batch folded into the channels
    (B·C channels in B·G groups of a single sample), which yields per-sample γ, β gradients."""
    x, mean, rstd = saved
    x, g = _working_precision(x), _working_precision(g)
    batch, channels, groups = x.shape[0], module.num_channels, module.num_groups
    folded_channels, folded_groups = batch * channels, batch * groups
    positions = x.numel() // folded_channels
    _, weight_grad, bias_grad = torch.ops.aten.native_group_norm_backward(
        g.reshape(1, folded_channels, positions),
        x.reshape(1, folded_channels, positions),
        mean.reshape(1, folded_groups).to(x.dtype),
        rstd.reshape(1, folded_groups).to(x.dtype),
        x.new_ones(folded_channels),
        1,
        folded_channels,
        positions,
        folded_groups,
        [False, _trainable(module.weight), _trainable(module.bias)],
    )
    grads = {}
    if _trainable(module.weight):
        grads["weight"] = weight_grad.view(batch, channels)
    if _trainable(module.bias):
        grads["bias"] = bias_grad.view(batch, channels)
    return grads


def _eval_batch_norm_per_sample_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """γ, β broadcast along channel axis 1 of [B, C, *]: sums of x̂ ⊙ δ and δ over the other axes."""
    batch, channels = g.shape[0], g.shape[1]
    g = _working_precision(g).reshape(batch, channels, -1)
    grads = {}
    if _trainable(module.weight):
        xhat = F.batch_norm(_working_precision(x), module.running_mean, module.running_var, training=False, eps=module.eps)
        grads["weight"] = torch.linalg.vecdot(xhat.reshape(batch, channels, -1), g)
    if _trainable(module.bias):
        grads["bias"] = g.sum(2)
    return grads


def _instance_norm_per_sample_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """γ, β per channel of [B, C, *]: sums of x̂ ⊙ δ and δ over the spatial axes, with x̂ normalised by
    the sample's own statistics, or by the running ones in eval mode with ``track_running_stats``."""
    batch, channels = g.shape[0], g.shape[1]
    g = _working_precision(g).reshape(batch, channels, -1)
    grads = {}
    if _trainable(module.weight):
        use_input_stats = module.training or not module.track_running_stats
        running = (None, None) if use_input_stats else (module.running_mean, module.running_var)
        xhat = F.instance_norm(_working_precision(x), *running, use_input_stats=use_input_stats, eps=module.eps)
        grads["weight"] = torch.linalg.vecdot(xhat.reshape(batch, channels, -1), g)
    if _trainable(module.bias):
        grads["bias"] = g.sum(2)
    return grads


def _sq_norms_from_per_sample_grads(per_sample_grads: Callable[[nn.Module, Any, Tensor], dict[str, Tensor]]) -> Callable[[nn.Module, Any, Tensor, SequenceStrategy], Tensor]:
    """For layers whose per-sample gradients are small (B × channels), norms are taken from them."""

    def sq_norms(module: nn.Module, saved: Any, g: Tensor, strategy: SequenceStrategy) -> Tensor:
        total = _working_precision(g).new_zeros(g.shape[0])
        for grad in per_sample_grads(module, saved, g).values():
            total = total + grad.reshape(grad.shape[0], -1).square().sum(1)
        return total

    return sq_norms


def _rule_from_per_sample_grads(per_sample_grads: Callable[[nn.Module, Any, Tensor], dict[str, Tensor]], batched_input_dim: int, **options: Any) -> LayerRule:
    return LayerRule(_sq_norms_from_per_sample_grads(per_sample_grads), per_sample_grads, batched_input_dim, **options)


def summed_grads(rule: LayerRule, module: nn.Module, saved: Any, g: Tensor) -> dict[str, Tensor]:
    """:math:`\\sum_i \\nabla \\ell_i` as the rule sees it (for the engine's gradient-sum check), from
    its per-sample gradients in batch chunks so no temporary exceeds ``_CHUNK_ELEMENTS``."""
    if type(module) is nn.Linear:  # Σ_i δ_iᵀ a_i is one GEMM over all rows
        a, d = _working_precision(saved), _working_precision(g)
        a, d = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
        sums = {"weight": d.T @ a, "bias": d.sum(0)}
        return {name: sums[name] for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    if type(module) is nn.Embedding:  # rows of δ added at their token ids
        if not _trainable(module.weight):
            return {}
        keys, rows = _embedding_rows(module, saved, g)
        ids = torch.remainder(keys, module.num_embeddings)
        return {"weight": rows.new_zeros(module.weight.shape).index_add_(0, ids, rows)}
    if not isinstance(saved, Tensor):
        return {name: grad.sum(0) for name, grad in rule.per_sample_grads(module, saved, g).items()}
    per_sample = sum(p.numel() for p in module.parameters(recurse=False))
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    totals: dict[str, Tensor] = {}
    for start in range(0, g.shape[0], chunk):
        for name, grad in rule.per_sample_grads(module, saved[start : start + chunk], g[start : start + chunk]).items():
            totals[name] = grad.sum(0) if name not in totals else totals[name] + grad.sum(0)
    return totals


def _all_but_last(module: nn.Module, g: Tensor) -> int:
    return g.dim() - 1


def _before_normalized(module: nn.Module, g: Tensor) -> int:
    return g.dim() - len(module.normalized_shape)


def computes_its_class_formula(module: nn.Module) -> bool:
    """Whether a call of ``module`` applies its class's formula to its own ``weight`` and ``bias``: not when
    its instance ``forward`` was replaced, nor when it has other parameters from which a forward pre-hook
    computes the weight (``torch.nn.utils.prune``'s ``weight_orig``, the legacy ``weight_norm``'s ``weight_g``
    and ``weight_v``, the legacy ``spectral_norm``'s ``weight_orig``)."""
    return "forward" not in module.__dict__ and set(module._parameters) <= {"weight", "bias"}


LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LayerRule(_linear_sq_norms, _linear_per_sample_grads, 2, leading_dims=_all_but_last, sq_norm_factors=_linear_sq_norm_factors),
    nn.Conv1d: LayerRule(_conv_sq_norms, _conv_per_sample_grads, 3),
    nn.Conv2d: LayerRule(_conv_sq_norms, _conv_per_sample_grads, 4),
    nn.Embedding: LayerRule(_embedding_sq_norms, _embedding_per_sample_grads, 1, leading_dims=_all_but_last),
    nn.LayerNorm: _rule_from_per_sample_grads(_layer_norm_per_sample_grads, 2, leading_dims=_before_normalized),
    nn.GroupNorm: _rule_from_per_sample_grads(_group_norm_per_sample_grads, 2, save=_save_group_norm),
    nn.BatchNorm1d: _rule_from_per_sample_grads(_eval_batch_norm_per_sample_grads, 2),
    nn.BatchNorm2d: _rule_from_per_sample_grads(_eval_batch_norm_per_sample_grads, 4),
    nn.BatchNorm3d: _rule_from_per_sample_grads(_eval_batch_norm_per_sample_grads, 5),
    nn.InstanceNorm1d: _rule_from_per_sample_grads(_instance_norm_per_sample_grads, 3),
    nn.InstanceNorm2d: _rule_from_per_sample_grads(_instance_norm_per_sample_grads, 4),
    nn.InstanceNorm3d: _rule_from_per_sample_grads(_instance_norm_per_sample_grads, 5),
}
"""Rules by exact module type (subclasses may change ``forward``, so they use the fallback)."""
