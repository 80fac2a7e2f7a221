"""Per-sample gradients of a layer that no rule handles, by ``torch.func`` (or a per-sample loop).

Derived in chapter 2 of the book (book/ch02_computing_fast).

Given the module's saved inputs and the gradients :math:`\\delta_i` that reached its outputs, the
per-sample gradient of its parameters :math:`\\theta` is the vector-Jacobian product

.. math:: \\nabla_\\theta \\ell_i = \\nabla_\\theta \\langle f(x_i; \\theta), \\delta_i \\rangle,

evaluated for all samples at once with ``vmap(grad(...))`` over each tensor's batch axis (which the
engine's probe found: a ``(T, B, ·)`` RNN input is split along axis 1). Layers that ``vmap`` cannot
batch (the fused RNN/LSTM/GRU kernels, norm layers that update running statistics) take the same
vector-Jacobian product sample by sample, which is exact and slower. Either way the module's
forward runs again and a ``[B, *shape]`` gradient per parameter is materialised; a warning names
each layer type the first time it falls back. Buffers are passed as fresh copies on every
recomputation, so running statistics are not updated twice; a forward that updates a buffer before
using it (``spectral_norm``'s power iteration) is recomputed from the values it started with.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradiv_lib.stateless import functional_call

_warned_layer_types: set[type[nn.Module]] = set()
"""Layer types already reported by :func:`warn_fallback_once` in this process."""

_loop_layer_types: set[type[nn.Module]] = {nn.RNN, nn.LSTM, nn.GRU}
"""Layer types that ``vmap`` cannot batch; grown when ``vmap`` fails on a new type."""


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


_OWN_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                   "_forward_hooks_always_called")
"""The hook tables of a module's own ``__call__`` (its submodules keep theirs)."""


def _computes_a_parameter(hook: Any) -> str | None:
    """The attribute a forward pre-hook computes from the module's parameters (pruning's masked weight, the
    legacy ``weight_norm`` and ``spectral_norm``), or ``None`` for any other hook."""
    if isinstance(hook, BasePruningMethod):
        return hook._tensor_name
    if isinstance(hook, (_LegacyWeightNorm, _LegacySpectralNorm)):
        return hook.name
    return None


@contextlib.contextmanager
def _own_hooks_off(module: nn.Module) -> Iterator[None]:
    """The module's own forward (pre-)hooks switched off: the saved inputs are what its forward received
    (after the pre-hooks) and the output gradients are those at what its forward returned (the engine's
    hook runs first, before a user's hook replaces the output), so the recomputation is the bare forward.
    Pre-hooks that compute a weight from the parameters (``_computes_a_parameter``) stay on, since they are
    part of the forward, and the attribute they set is put back afterwards."""
    saved = {name: getattr(module, name) for name in _OWN_HOOK_DICTS if hasattr(module, name)}
    kept = OrderedDict((key, hook) for key, hook in module._forward_pre_hooks.items() if _computes_a_parameter(hook))
    computed = {name: module.__dict__[name] for name in map(_computes_a_parameter, kept.values()) if name in module.__dict__}
    try:
        for name in saved:
            object.__setattr__(module, name, OrderedDict())
        object.__setattr__(module, "_forward_pre_hooks", kept)
        yield
    finally:
        for name, table in saved.items():
            object.__setattr__(module, name, table)
        module.__dict__.update(computed)


@contextlib.contextmanager
def _parametrization_cache_off() -> Iterator[None]:
    """``torch.nn.utils.parametrize.cached()`` switched off: under it a parametrised weight is the one computed
    from the real parameters at its first use, so the recomputation's would not depend on the parameters it
    differentiates (their per-sample gradients came out zero)."""
    from torch.nn.utils import parametrize

    enabled = getattr(parametrize, "_cache_enabled", 0)
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled


def fallback_per_sample_grads(
    module: nn.Module,
    path: str,
    params: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    in_axes: Sequence[int | None],
    output_grads: Mapping[int, Tensor],
    out_axes: Sequence[int | None],
    batch_size: int,
    buffers: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [B, *shape]}`` of ``params`` (names relative to ``module``).

    Parameters
    ----------
    module, path
        The layer and its dotted path in the model (for error messages).
    params
        Trainable parameters of the layer's subtree, keyed by name relative to ``module``.
    args, kwargs
        The (detached) inputs of the forward call.
    in_axes
        Batch axis of every flattened leaf of ``(args, kwargs)``; ``None`` for leaves shared by all
        samples.
    output_grads, out_axes
        Gradients of the flattened outputs that received one (by leaf position), and the batch axis of
        every output leaf.
    batch_size
        Number of samples B.
    buffers
        Buffer values (names relative to ``module``) the forward call started with, where they differ from
        the module's current ones (the forward updated them); the others are read from the module.
    """
    leaves, spec = tree_flatten((args, kwargs))
    batched = [(i, axis) for i, axis in enumerate(in_axes) if axis is not None and isinstance(leaves[i], Tensor)]
    outputs = [(i, out_axes[i]) for i in output_grads]
    buffers = {name: b.detach() for name, b in module.named_buffers()} | dict(buffers or {})

    def objective(theta: dict[str, Tensor], sample_leaves: Sequence[Tensor], sample_deltas: Sequence[Tensor]) -> Tensor:
        """⟨f(x_i; θ), δ_i⟩ for one sample whose tensors keep a batch axis of size 1."""
        call_leaves = list(leaves)
        for (i, _), leaf in zip(batched, sample_leaves):
            call_leaves[i] = leaf
        call_args, call_kwargs = tree_unflatten(call_leaves, spec)
        with _own_hooks_off(module), _parametrization_cache_off():
            # fresh copies per call: a forward that updates its buffers in place must not see an earlier sample's update
            state = {name: b.clone() for name, b in buffers.items()}
            flat, _ = tree_flatten(functional_call(module, {**state, **theta}, call_args, call_kwargs))
        return sum((flat[i] * delta).sum() for (i, _), delta in zip(outputs, sample_deltas))

    theta = {name: p.detach() for name, p in params.items()}
    batched_leaves = tuple(leaves[i] for i, _ in batched)
    deltas = tuple(output_grads[i] for i, _ in outputs)
    try:
        with torch.enable_grad():
            if type(module) not in _loop_layer_types:
                try:
                    return _vmapped(objective, theta, batched, batched_leaves, outputs, deltas)
                except Exception:  # vmap has no batching rule for something in the layer: loop instead
                    _loop_layer_types.add(type(module))
            return _looped(objective, theta, batched, batched_leaves, outputs, deltas, batch_size)
    except Exception as error:  # re-raised with the layer named
        raise ValueError(
            f"the torch.func fallback failed for module '{path}' ({type(module).__qualname__}): {error}. "
            "The fallback needs a layer that treats samples independently and draws no random numbers "
            "(put dropout outside it, or use the layer in eval mode)."
        ) from error


def _vmapped(objective: Any, theta: dict[str, Tensor], batched: list[tuple[int, int]], batched_leaves: tuple[Tensor, ...],
             outputs: list[tuple[int, int]], deltas: tuple[Tensor, ...]) -> dict[str, Tensor]:
    def sample_objective(theta: dict[str, Tensor], sample_leaves: tuple[Tensor, ...], sample_deltas: tuple[Tensor, ...]) -> Tensor:
        leaves = [leaf.unsqueeze(axis) for (_, axis), leaf in zip(batched, sample_leaves)]
        return objective(theta, leaves, [d.unsqueeze(axis) for (_, axis), d in zip(outputs, sample_deltas)])

    in_dims = (None, tuple(axis for _, axis in batched), tuple(axis for _, axis in outputs))
    return vmap(grad(sample_objective), in_dims=in_dims)(theta, batched_leaves, deltas)


def _looped(objective: Any, theta: dict[str, Tensor], batched: list[tuple[int, int]], batched_leaves: tuple[Tensor, ...],
            outputs: list[tuple[int, int]], deltas: tuple[Tensor, ...], batch_size: int) -> dict[str, Tensor]:
    names = list(theta)
    per_sample: list[list[Tensor]] = [[] for _ in names]
    for i in range(batch_size):
        live = {name: t.detach().requires_grad_() for name, t in theta.items()}
        leaves = [leaf.narrow(axis, i, 1) for (_, axis), leaf in zip(batched, batched_leaves)]
        sample_deltas = [d.narrow(axis, i, 1) for (_, axis), d in zip(outputs, deltas)]
        value = objective(live, leaves, sample_deltas)
        grads = torch.autograd.grad(value, list(live.values()), allow_unused=True)
        for store, g, t in zip(per_sample, grads, live.values()):
            store.append(torch.zeros_like(t) if g is None else g)
    return {name: torch.stack(store) for name, store in zip(names, per_sample)}
