"""Per-sample gradients of ``nn.MultiheadAttention`` without ``vmap``: one batched recomputation.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Attention treats samples independently, but its projections happen inside the module, so hooks only
see its inputs :math:`q, k, v` and the gradient :math:`\\delta` of its output. The rule recomputes the
attention core once for the whole batch from the saved inputs,

.. math:: Q = q W_q^\\top + b_q,\\ K = k W_k^\\top + b_k,\\ V = v W_v^\\top + b_v,\\quad
          C = \\operatorname{softmax}\\!\\big(Q_h K_h^\\top/\\sqrt{d_h}\\big) V_h \\ \\text{(per head)},\\quad
          y = C W_o^\\top + b_o,

and back-propagates :math:`\\delta_C = \\delta W_o` through the core only, which gives the gradients
:math:`\\delta_Q, \\delta_K, \\delta_V` at the three projections. Every parameter is then a Linear map
on a sequence with known input and output gradient, so the sequence-Linear rule applies:
:math:`\\nabla_{W_q}\\ell_i = \\delta_{Q,i}^\\top q_i` (and so on), whose squared norm is taken in Gram or
materialised form (``rules.py``); the packed ``in_proj_weight`` is the three blocks stacked, so its
squared norm is the sum of theirs. Cost: one extra attention forward and backward for the batch,
instead of ``vmap(grad)`` over samples.

Supported: ``batch_first`` either way, self- and cross-attention (``kdim``/``vdim``), with or without
bias, no masks, ``dropout == 0`` or eval mode, no ``add_bias_kv``/``add_zero_attn``, the attention
weights unused. Anything else goes to the exact ``torch.func`` fallback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradiv_lib.norms.rules import SequenceStrategy, _linear_sequence_weight_sq_norms

_MASK_ARGUMENTS = ("key_padding_mask", "attn_mask")


def supports(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of ``module`` is one the batched rule reproduces exactly."""
    if type(module) is not nn.MultiheadAttention or len(args) < 3 or len(args) > 4:
        return False
    if module.bias_k is not None or module.add_zero_attn or (module.training and module.dropout > 0):
        return False
    if (len(args) == 4 and args[3] is not None) or any(kwargs.get(name) is not None for name in _MASK_ARGUMENTS):
        return False
    return not kwargs.get("is_causal", False)


def _working(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _projections(module: nn.MultiheadAttention) -> list[tuple[Tensor, Tensor | None]]:
    """(W, b) of the q, k and v projections (views into the packed parameter when there is one)."""
    bias = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    return [(_working(w.detach()), None if b is None else _working(b.detach())) for w, b in zip(weights, bias)]


def attention_grads(
    module: nn.MultiheadAttention,
    names: set[str],
    inputs: tuple[Tensor, Tensor, Tensor],
    delta: Tensor,
    strategy: SequenceStrategy,
    materialize: bool,
    want_sums: bool,
) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
    """Per-sample squared norms (or per-sample gradients) of the attention's trainable parameters.

    ``inputs`` are batch-first ``(q, k, v)`` and ``delta`` the batch-first output gradient; ``names``
    the trainable parameter names relative to ``module``. Returns ``(sq_norms, per_sample, sums)``:
    ``sq_norms`` is ``None`` and ``per_sample`` filled when ``materialize``; ``sums`` (the batch
    gradient the rule implies, for the engine's check) only when ``want_sums``.
    """
    q, k, v = (_working(t) for t in inputs)
    delta = _working(delta)
    batch, length, embed = q.shape
    heads = module.num_heads
    head_dim = embed // heads
    out_weight = _working(module.out_proj.weight.detach())
    with torch.enable_grad():
        projected = [F.linear(x, w, b).detach().requires_grad_() for x, (w, b) in zip((q, k, v), _projections(module))]
        split = [p.view(batch, p.shape[1], heads, head_dim).transpose(1, 2) for p in projected]
        core = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(batch, length, embed)
        core_delta = delta @ out_weight
        deltas = torch.autograd.grad(core, projected, core_delta)
    blocks = {
        "q": (q, deltas[0]), "k": (k, deltas[1]), "v": (v, deltas[2]), "out": (core.detach(), delta),
    }
    weight_blocks = {"in_proj_weight": ("q", "k", "v"), "q_proj_weight": ("q",), "k_proj_weight": ("k",), "v_proj_weight": ("v",), "out_proj.weight": ("out",)}
    bias_blocks = {"in_proj_bias": ("q", "k", "v"), "out_proj.bias": ("out",)}
    sq_norms = None if materialize else delta.new_zeros(batch)
    per_sample: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    for name, parts in weight_blocks.items():
        if name not in names:
            continue
        if materialize:
            per_sample[name] = torch.cat([torch.bmm(blocks[p][1].transpose(1, 2), blocks[p][0]) for p in parts], 1)
        else:
            for p in parts:
                sq_norms = sq_norms + _linear_sequence_weight_sq_norms(blocks[p][0], blocks[p][1], strategy)
        if want_sums:
            sums[name] = torch.cat([blocks[p][1].flatten(0, 1).T @ blocks[p][0].flatten(0, 1) for p in parts], 0)
    for name, parts in bias_blocks.items():
        if name not in names:
            continue
        per_sample_bias = torch.cat([blocks[p][1].sum(1) for p in parts], 1)
        if materialize:
            per_sample[name] = per_sample_bias
        else:
            sq_norms = sq_norms + per_sample_bias.square().sum(1)
        if want_sums:
            sums[name] = per_sample_bias.sum(0)
    return sq_norms, per_sample, sums
