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
bias, a ``key_padding_mask`` (one row per sample), a 2-D ``attn_mask`` and ``is_causal`` (one mask for all
samples; boolean or additive, merged as ``F.multi_head_attention_forward`` merges them), no
``add_bias_kv``/``add_zero_attn``, the attention weights unused. Dropout on the
attention weights while training (``dropout > 0``, as in ``nn.TransformerEncoderLayer``'s default) is
replayed: the engine keeps the random generators' states from just before the layer's forward, and
the recomputation restores them and draws again on a tensor of the same shape, the same way the
module did (``need_weights=True``: dropout on the explicit attention matrix; ``False``: inside
``scaled_dot_product_attention``), so it applies the same mask. Every such call is checked: the
recomputed output must equal the module's own (to rounding of float32/float64, the only dtypes replayed)
and the generators must end where the forward left them; otherwise it raises. Anything else goes to the
exact ``torch.func`` fallback, which refuses a layer that drew random numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradiv_lib.norms.rules import SequenceStrategy, _linear_sequence_weight_sq_norms

def masks(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, bool]:
    """``(key_padding_mask, attn_mask, is_causal)`` of a call of ``nn.MultiheadAttention``."""
    padding = args[3] if len(args) == 4 else kwargs.get("key_padding_mask")
    return padding, kwargs.get("attn_mask"), bool(kwargs.get("is_causal", False))


def supports(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of ``module`` is one the batched rule reproduces exactly: masks of one row per sample
    (``key_padding_mask``, ``[B, S]``) or one for all samples (a 2-D ``attn_mask``, ``is_causal``); dropout while
    training only where :func:`replays_dropout`."""
    if type(module) is not nn.MultiheadAttention or len(args) < 3 or len(args) > 4:
        return False
    if module.bias_k is not None or module.add_zero_attn or not isinstance(args[0], Tensor) or args[0].dim() != 3:
        return False
    padding, attn_mask, _ = masks(args, kwargs)
    if padding is not None and (not isinstance(padding, Tensor) or padding.dim() != 2):
        return False
    if attn_mask is not None and (not isinstance(attn_mask, Tensor) or attn_mask.dim() != 2):
        return False
    return dropout_p(module) == 0.0 or replays_dropout(module, args)


def dropout_p(module: nn.MultiheadAttention) -> float:
    """The dropout probability the module applies in its current mode."""
    return float(module.dropout) if module.training else 0.0


def replays_dropout(module: nn.MultiheadAttention, args: tuple[Any, ...]) -> bool:
    """Whether the recomputation can draw the module's dropout mask again: float32/float64 inputs, no autocast
    (another dtype would draw on another tensor)."""
    q = args[0]
    return (
        isinstance(q, Tensor) and q.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(q.device.type)
    )


class Replay:
    """What redrawing a dropout mask needs: the random generators' states just before the module's forward
    (``rng``: CPU first, then the CUDA devices in ``devices``), those just after it (``rng_after``), and the
    module's output, batch first (``output``)."""

    __slots__ = ("rng", "rng_after", "devices", "output")

    def __init__(self, rng: list[Any], rng_after: list[Any], devices: list[int], output: Tensor) -> None:
        self.rng, self.rng_after, self.devices, self.output = rng, rng_after, devices, output


def _set_rng(states: list[Any], devices: list[int]) -> None:
    torch.default_generator.set_state(torch.from_numpy(states[0]))
    for device, state in zip(devices, states[1:]):
        torch.cuda.set_rng_state(torch.from_numpy(state), device)


def rng_states(devices: list[int]) -> list[np.ndarray]:
    """The CPU generator's state, then those of the CUDA devices ``devices`` (host copies)."""
    return [torch.default_generator.get_state().numpy()] + [torch.cuda.get_rng_state(d).numpy() for d in devices]


def _merged_mask(module: nn.MultiheadAttention, padding: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
                 need_weights: bool, dtype: torch.dtype, batch: int) -> tuple[Tensor | None, bool]:
    """The additive mask (and causal flag) ``F.multi_head_attention_forward`` hands to the attention, built the same
    way: boolean masks made additive, the 2-D ``attn_mask`` as ``[1, L, S]``, the padding mask repeated per head as
    ``[B·H, 1, S]`` and added to it."""
    padding = F._canonical_mask(mask=padding, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
                                other_name="attn_mask", target_type=dtype)
    if is_causal and padding is None and not need_weights:
        return None, True
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=dtype, check_other=False)
    if padding is not None:
        is_causal = False
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0)
    if padding is not None:
        heads, keys = module.num_heads, padding.shape[1]
        padding = padding.view(batch, 1, 1, keys).expand(-1, heads, -1, -1).reshape(batch * heads, 1, keys)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    return attn_mask, is_causal


def _core(split: list[Tensor], p: float, need_weights: bool, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """softmax(Q_h K_hᵀ/√d_h + mask) V_h per head, with dropout ``p`` on the attention weights, computed (and drawn)
    the way ``F.multi_head_attention_forward`` does it: an explicit ``[B·H, L, S]`` matrix when it returns the
    weights, else ``scaled_dot_product_attention``. ``split``: q, k, v as ``[B, H, L, d_h]``; ``mask`` from
    :func:`_merged_mask`."""
    q, k, v = split
    batch, heads, length, head_dim = q.shape
    if not need_weights:
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.view(batch, heads, -1, mask.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
    flat = [t.reshape(batch * heads, t.shape[2], head_dim) for t in (q, k, v)]
    scaled = flat[0] * math.sqrt(1.0 / head_dim)
    scores = torch.bmm(scaled, flat[1].transpose(1, 2)) if mask is None else torch.baddbmm(mask, scaled, flat[1].transpose(1, 2))
    weights = torch.softmax(scores, dim=-1)
    if p > 0.0:
        weights = F.dropout(weights, p=p)
    return torch.bmm(weights, flat[2]).view(batch, heads, length, head_dim)


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
    replay: Replay | None = None,
    call_masks: tuple[Tensor | None, Tensor | None, bool] = (None, None, False),
    need_weights: bool = False,
) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
    """Per-sample squared norms (or per-sample gradients) of the attention's trainable parameters.

    ``inputs`` are batch-first ``(q, k, v)`` and ``delta`` the batch-first output gradient; ``names``
    the trainable parameter names relative to ``module``. Returns ``(sq_norms, per_sample, sums)``:
    ``sq_norms`` is ``None`` and ``per_sample`` filled when ``materialize``; ``sums`` (the batch
    gradient the rule implies, for the engine's check) only when ``want_sums``. ``replay``: the states that
    redraw the forward's dropout mask (required when the module drops out, see the module docstring);
    ``call_masks``: the call's ``(key_padding_mask, attn_mask, is_causal)`` (:func:`masks`; the padding mask batch
    first); ``need_weights``: the call's, which decides how the module computed the attention.
    """
    q, k, v = (_working(t) for t in inputs)
    delta = _working(delta)
    batch, length, embed = q.shape
    heads = module.num_heads
    head_dim = embed // heads
    out_weight = _working(module.out_proj.weight.detach())
    p = dropout_p(module)
    if p > 0.0 and replay is None:
        raise RuntimeError(f"attention_grads: {type(module).__name__} drops out (p={p}) but no replay state was kept")
    with torch.enable_grad(), torch.random.fork_rng(devices=replay.devices if replay is not None else [], enabled=p > 0.0):
        if p > 0.0:
            _set_rng(replay.rng, replay.devices)
        projected = [F.linear(x, w, b).detach().requires_grad_() for x, (w, b) in zip((q, k, v), _projections(module))]
        split = [t.view(batch, t.shape[1], heads, head_dim).transpose(1, 2) for t in projected]
        mask, is_causal = _merged_mask(module, *call_masks, need_weights, q.dtype, batch)
        core = _core(split, p, need_weights, mask, is_causal).transpose(1, 2).reshape(batch, length, embed)
        if p > 0.0:
            _check_replay(module, core, replay)
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


_REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
"""Largest relative difference between the recomputed and the module's output when the mask was redrawn
(rounding: separate projections against the packed one; a different mask changes dropped entries by whole
attention weights)."""


def _check_replay(module: nn.MultiheadAttention, core: Tensor, replay: Replay) -> None:
    """Raise unless the redrawn dropout mask is the forward's: the generators must end where the forward left
    them, and the recomputed output must equal the module's."""
    with torch.no_grad():
        out_proj = module.out_proj
        recomputed = F.linear(core, out_proj.weight.detach(), None if out_proj.bias is None else out_proj.bias.detach())
        output = replay.output
        scale = float(output.abs().max()) or 1.0
        difference = float((recomputed - output).abs().max()) / scale
    same_draws = all(np.array_equal(a, b) for a, b in zip(rng_states(replay.devices), replay.rng_after))
    if same_draws and difference <= _REPLAY_TOLERANCE[output.dtype]:
        return
    raise ValueError(
        f"nn.MultiheadAttention with dropout={module.dropout} while training: redrawing its dropout mask for the "
        f"per-sample gradients did not reproduce its forward pass ({'' if same_draws else 'other random draws; '}"
        f"output differs by {difference:.2g} of its largest entry), so its norms would be wrong. Measure with the "
        "layer in eval mode (layer.eval()), or set its dropout to 0."
    )
