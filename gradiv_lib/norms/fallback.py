"""Per-sample gradients of a layer that no rule handles, by ``torch.func``.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Given the module's saved inputs and the gradients :math:`\\delta_i` that reached its outputs, the
per-sample gradient of its parameters :math:`\\theta` is the vector-Jacobian product

.. math:: \\nabla_\\theta \\ell_i = \\nabla_\\theta \\langle f(x_i; \\theta), \\delta_i \\rangle,

evaluated for all samples at once with ``vmap(grad(...))`` over the batch axis. This re-runs the
module's forward once (vectorised) and materialises a ``[B, *shape]`` gradient per parameter, so it
is slower than a rule; a warning names each layer type the first time it falls back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

_warned_layer_types: set[type[nn.Module]] = set()
"""Layer types already reported by :func:`warn_fallback_once` in this process."""


def warn_fallback_once(module: nn.Module, path: str) -> None:
    """Warn, once per layer type and process, that ``module`` is handled by the slow fallback."""
    layer_type = type(module)
    if layer_type in _warned_layer_types:
        return
    _warned_layer_types.add(layer_type)
    warnings.warn(
        f"gradiv_lib.norms: no per-sample norm rule for layer type {layer_type.__qualname__} "
        f"(first seen at '{path or '<model>'}'); its per-sample gradients are computed with the torch.func "
        "fallback, which re-runs its forward and materialises them (slower than a rule).",
        UserWarning,
        stacklevel=3,
    )


def fallback_per_sample_grads(
    module: nn.Module,
    path: str,
    params: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output_indices: Sequence[int],
    output_grads: Sequence[Tensor | None],
    batch_size: int,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [B, *shape]}`` of ``params`` (names relative to ``module``).

    Parameters
    ----------
    module, path
        The layer and its dotted path in the model (for error messages).
    params
        Trainable parameters of the layer's subtree, keyed by name relative to ``module``.
    args, kwargs
        The (detached) inputs of the forward call; tensors whose first dimension is ``batch_size`` are
        split per sample, everything else is shared.
    output_indices, output_grads
        Positions of the differentiable tensors among the flattened outputs, and their gradients
        (``None`` where no gradient arrived).
    batch_size
        Number of samples B.
    """
    leaves, spec = tree_flatten((args, kwargs))
    is_batched = [isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch_size for leaf in leaves]
    batched_leaves = tuple(leaf for leaf, batched in zip(leaves, is_batched) if batched)
    pairs = [(index, g) for index, g in zip(output_indices, output_grads) if g is not None]
    for _, g in pairs:
        if g.dim() == 0 or g.shape[0] != batch_size:
            raise ValueError(
                f"module '{path}' ({type(module).__qualname__}) returned an output of shape {tuple(g.shape)}, "
                f"expected a batch-first output with {batch_size} samples; per-sample gradients need batch-first layers"
            )
    indices = [index for index, _ in pairs]
    deltas = tuple(g for _, g in pairs)

    def sample_objective(theta: dict[str, Tensor], sample_leaves: tuple[Tensor, ...], sample_deltas: tuple[Tensor, ...]) -> Tensor:
        per_sample = iter(sample_leaves)
        call_leaves = [next(per_sample).unsqueeze(0) if batched else leaf for leaf, batched in zip(leaves, is_batched)]
        call_args, call_kwargs = tree_unflatten(call_leaves, spec)
        outputs, _ = tree_flatten(functional_call(module, theta, call_args, call_kwargs))
        return sum((outputs[index] * delta.unsqueeze(0)).sum() for index, delta in zip(indices, sample_deltas))

    theta = {name: p.detach() for name, p in params.items()}
    try:
        with torch.enable_grad():
            return vmap(grad(sample_objective), in_dims=(None, 0, 0))(theta, batched_leaves, deltas)
    except Exception as error:  # re-raised with the layer named
        raise ValueError(
            f"the torch.func fallback failed for module '{path}' ({type(module).__qualname__}): {error}. "
            "The fallback needs a layer that treats samples independently, takes batch-first tensors and "
            "draws no random numbers (put dropout outside it)."
        ) from error
