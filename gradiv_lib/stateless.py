"""Calling a module with other tensors in place of its parameters and buffers, leaving it as it was.

``torch.func.functional_call`` does this for every transform in the library (the per-sample fallback, the
Hessian of ``sharpness``, the stacked clients of the federated simulation), but on a model that registers
one module under two names (``self.b = self.a``, a block reused by name) it swaps that module's tensors twice
and restores them in the wrong order: afterwards the model holds plain tensors, or functorch wrappers, where
its ``Parameter`` objects were (seen with torch 2.13, with ``tie_weights=True``, its default). The optimizer
then updates Parameters that the model no longer uses. :func:`functional_call` here swaps each tensor once:

* every module once, however many names reach it;
* every slot that holds one of the replaced tensors (by identity), so a Parameter tied across modules
  (``decoder.weight = encoder.weight``) is replaced everywhere, as ``tie_weights=True`` does;
* everything restored in reverse order, also when the call raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Inside the block, ``module``'s parameters and buffers named in ``tensors`` (names as in
    ``module.named_parameters()`` / ``named_buffers()``) are the given tensors, in every module and slot that
    held them; the originals are back afterwards."""
    swapped: list[tuple[dict[str, Any], str, Tensor]] = []
    try:
        _swap_in(module, _replacements(module, tensors), swapped)
        yield
    finally:
        for slots, attr, original in reversed(swapped):
            slots[attr] = original


def _replacements(module: nn.Module, tensors: Mapping[str, Tensor]) -> dict[int, Tensor]:
    """``{id(tensor the module holds): its replacement}`` for the names in ``tensors``."""
    replacements: dict[int, Tensor] = {}
    for name, tensor in tensors.items():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        if attr not in owner._parameters and attr not in owner._buffers:
            raise KeyError(f"functional_call: {name!r} is neither a parameter nor a buffer of {type(module).__qualname__}")
        original = owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]
        if original is None:  # (bias=False): nothing to replace, and the forward would not use it
            raise KeyError(f"functional_call: {name!r} of {type(module).__qualname__} is None, so it cannot be replaced")
        replacements[id(original)] = tensor
    return replacements


def _swap_in(module: nn.Module, replacements: dict[int, Tensor], swapped: list[tuple[dict[str, Any], str, Tensor]]) -> None:
    """Put each replacement in every slot holding its original, recording ``(slots, name, original)`` in
    ``swapped`` as it goes (so a failure half-way is undone too)."""
    for owner in module.modules():  # each module once, whatever the number of names it has
        for slots in (owner._parameters, owner._buffers):
            for attr, original in slots.items():
                if original is not None and id(original) in replacements:
                    swapped.append((slots, attr, original))
                    slots[attr] = replacements[id(original)]


def functional_call(
    module: nn.Module,
    tensors: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """``module(*args, **kwargs)`` with ``tensors`` (a dict, or a sequence of dicts, by parameter or buffer
    name) in place of its own, as ``torch.func.functional_call`` (usable under ``vmap`` and ``grad``), without
    its corruption of modules registered under two names (module docstring)."""
    merged: dict[str, Tensor] = {}
    for part in [tensors] if isinstance(tensors, Mapping) else tensors:
        merged.update(part)
    with reparametrized(module, merged):
        return module(*(args if isinstance(args, tuple) else (args,)), **(kwargs or {}))
