"""The hook engine: per-sample squared gradient norms during one ordinary backward pass.

Derived in chapter 2 of the book (book/ch02_computing_fast).

For every layer that owns trainable parameters, a forward hook keeps the layer input and puts a
tensor hook on the layer output; when the output gradient :math:`\\delta` arrives during the backward
pass, the layer's rule (``rules.py``) turns :math:`(a, \\delta)` into per-sample squared norms, which
add over layers because the parameter blocks are disjoint:

.. math:: \\|\\nabla_w \\ell_i\\|^2 = \\sum_{\\text{layers } l} \\|\\nabla_{w_l} \\ell_i\\|^2 .

A parameter used more than once (a layer called twice, weights tied between layers) has per-sample
gradient :math:`\\sum_u g_i^{(u)}` over its uses, whose squared norm is not the sum of the squared
norms of the uses; for such layers the engine materialises per-sample gradients, sums them over the
uses and squares at the end. A hook on every trainable parameter records
:math:`\\|\\sum_i \\nabla_w \\ell_i\\|^2` from the gradient the same backward pass produces, without
touching ``.grad``. Layers without a rule go to the ``torch.func`` fallback (``fallback.py``), and
sample-mixing layers (BatchNorm with batch statistics) are refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from gradiv_lib.norms.fallback import fallback_per_sample_grads, warn_fallback_once
from gradiv_lib.norms.rules import LAYER_RULES, SEQUENCE_STRATEGIES, LayerRule, SequenceStrategy


@dataclass(eq=False)
class _Layer:
    """A module whose trainable parameters one rule (or the fallback) is responsible for."""

    path: str
    module: nn.Module = field(repr=False)
    params: dict[str, nn.Parameter] = field(repr=False)
    rule: LayerRule | None = field(repr=False)
    shares_parameters: bool = False
    calls: int = 0
    covered: bool = False
    param_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.param_ids = frozenset(id(p) for p in self.params.values())

    @property
    def name(self) -> str:
        return f"'{self.path or '<model>'}' ({type(self.module).__qualname__})"


class _OutputGradHook:
    """The tensor hook on one layer output: forward-pass state for exactly one backward hook call,
    dropped when used. The hook object lives as long as the autograd graph, and holding activations
    there would keep them alive until the end of the backward pass instead of letting autograd free
    them layer by layer. (One small object per layer call: this runs on every training step.)"""

    __slots__ = ("_engine", "_layer", "_saved")

    def __init__(self, engine: PerSampleNormEngine, layer: _Layer, saved: Any) -> None:
        self._engine, self._layer, self._saved = engine, layer, saved

    def __call__(self, grad_output: Tensor) -> None:
        saved, self._saved = self._saved, None
        if saved is None:  # a second backward pass through a retained graph; _check_complete reports it
            return
        self._engine._on_rule_output_grad(self._layer, saved, grad_output)


class _SavedOnce:
    """Forward-pass state for exactly one backward hook call (the fallback's), dropped when taken."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def take(self) -> Any:
        value, self._value = self._value, None
        return value


def _trainable_direct_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def _plan_layers(model: nn.Module) -> list[_Layer]:
    """Assign every trainable parameter to the module that will report its per-sample gradients."""
    layers: list[_Layer] = []
    visited: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        rule = LAYER_RULES.get(type(module))
        direct = _trainable_direct_params(module)
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq and direct:
            raise ValueError(
                f"Embedding '{path or '<model>'}' has scale_grad_by_freq=True, which divides each token's gradient "
                "by its frequency in the whole batch and so mixes samples; per-sample gradients are undefined. "
                "Construct it with scale_grad_by_freq=False."
            )
        if rule is None and direct:
            subtree = {name: p for name, p in module.named_parameters() if p.requires_grad}
            layers.append(_Layer(path, module, subtree, None))
            return
        if rule is not None and direct:
            layers.append(_Layer(path, module, direct, rule))
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    uses = Counter(pid for layer in layers for pid in layer.param_ids)
    for layer in layers:
        layer.shares_parameters = any(uses[pid] > 1 for pid in layer.param_ids)
    return layers


class PerSampleNormEngine:
    """Hooks that compute per-sample squared gradient norms while an ordinary backward pass runs.

    Attach with ``with engine:`` (or :meth:`attach` / :meth:`detach`), run one forward pass and one
    backward pass, then read :meth:`sq_norms` and :meth:`grad_sum_sq_norm`. Both are in the scale of
    the loss that was back-propagated: for :math:`L = c\\sum_i \\ell_i` they are :math:`c^2` times the
    values for :math:`\\ell_i` (callers undo the factor). ``.grad`` is never modified.

    Parameters
    ----------
    model
        The network. Every layer must see the batch along dimension 0 and treat samples independently.
        Which parameters are trainable is read here: build the engine after freezing parameters.
    sequence_strategy
        For Linear layers on sequences and for convolutions: ``"auto"`` (time the methods that the
        FLOP model leaves in the race once per layer shape, then use the fastest), ``"gram"`` or
        ``"materialize"``.
    batch_size
        Expected number of samples, checked against every layer input; inferred from the first layer
        call when ``None``.

    Raises
    ------
    ValueError
        If the model has no trainable parameters, ``sequence_strategy`` is unknown, or a layer mixes
        samples (``Embedding(scale_grad_by_freq=True)``; BatchNorm using batch statistics is refused
        when it runs).
    """

    def __init__(self, model: nn.Module, *, sequence_strategy: SequenceStrategy = "auto", batch_size: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__qualname__}")
        if sequence_strategy not in SEQUENCE_STRATEGIES:
            raise ValueError(f"sequence_strategy must be one of {SEQUENCE_STRATEGIES}, got {sequence_strategy!r}")
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        if not self._parameters:
            raise ValueError(
                f"model ({type(model).__qualname__}) has no trainable parameters (none with requires_grad=True); "
                "there is no gradient to measure"
            )
        self._parameter_names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self._layers = _plan_layers(model)
        self._batch_norms = [(path, m) for path, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._strategy: SequenceStrategy = sequence_strategy
        self._expected_batch_size = batch_size
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._paused = False
        # Hooks are bound once here: attach() runs on every measured training step.
        self._forward_hooks: list[tuple[nn.Module, Any, bool]] = [
            (layer.module, partial(self._record_fallback_call, layer), True) if layer.rule is None
            else (layer.module, partial(self._record_rule_call, layer), False)
            for layer in self._layers
        ]
        self._batch_norm_hooks = [(module, partial(self._refuse_batch_statistics, path)) for path, module in self._batch_norms]
        self._parameter_hooks = [(p, partial(self._record_parameter_grad, id(p))) for p in self._parameters]
        self.reset()

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are measured (``requires_grad=True``), deduplicated."""
        return list(self._parameters)

    @property
    def batch_size(self) -> int | None:
        """Number of samples seen by the layers in this measurement (``None`` before the forward pass)."""
        return self._batch_size

    def reset(self) -> None:
        """Forget everything recorded, to measure another forward/backward pass."""
        self._batch_size = self._expected_batch_size
        self._sq_norm_parts: list[Tensor] = []
        self._per_sample_grads: dict[int, Tensor] = {}
        self._grad_norms: list[Tensor] = []
        self._grad_counts: Counter[int] = Counter()
        for layer in self._layers:
            layer.calls = 0
            layer.covered = False

    def attach(self) -> PerSampleNormEngine:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        handles = [module.register_forward_hook(hook, with_kwargs=with_kwargs) for module, hook, with_kwargs in self._forward_hooks]
        handles += [module.register_forward_pre_hook(hook) for module, hook in self._batch_norm_hooks]
        handles += [p.register_hook(hook) for p, hook in self._parameter_hooks]
        self._handles = handles
        return self

    def detach(self) -> None:
        """Remove the hooks; recorded results stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> PerSampleNormEngine:
        self.reset()
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # --- forward ---------------------------------------------------------------------------------

    def _recording(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    def _refuse_batch_statistics(self, path: str, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        if not self._recording() or not (module.training or module.running_mean is None):
            return
        raise ValueError(
            f"BatchNorm layer '{path or '<model>'}' ({type(module).__qualname__}) normalises with batch statistics "
            f"(training={module.training}, track_running_stats={module.track_running_stats}), which mixes the samples "
            "of a batch, so per-sample gradients are undefined. Put the norm layers in eval mode with running "
            "statistics (model.eval(), or .eval() on the BatchNorm modules only) while measuring, or replace "
            "BatchNorm by nn.GroupNorm / nn.LayerNorm."
        )

    def _check_batch(self, layer: _Layer, tensor: Tensor) -> None:
        if tensor.dim() == 0:
            raise ValueError(f"layer {layer.name} received a 0-d tensor; per-sample norms need a batch dimension first")
        if self._batch_size is None:
            self._batch_size = int(tensor.shape[0])
        elif tensor.shape[0] != self._batch_size:
            raise ValueError(
                f"layer {layer.name} received a tensor of shape {tuple(tensor.shape)} whose first dimension is "
                f"{tensor.shape[0]}, but the batch has {self._batch_size} samples; per-sample norms need every "
                "layer to see the batch along dimension 0 (use batch_first=True for sequence layers)"
            )

    def _record_rule_call(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        # output.requires_grad is False under no_grad/inference mode, so this also skips evaluation passes
        if self._paused or not output.requires_grad:
            return
        activation = args[0]
        if activation.dim() < layer.rule.batched_input_dim:
            raise ValueError(
                f"layer {layer.name} was called on an unbatched input of shape {tuple(activation.shape)}; "
                f"it needs at least {layer.rule.batched_input_dim} dimensions with the batch first"
            )
        if activation.shape[0] != self._batch_size:
            self._check_batch(layer, activation)
        layer.calls += 1
        output.register_hook(_OutputGradHook(self, layer, layer.rule.save(module, activation, output)))

    def _record_fallback_call(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._recording():
            return
        leaves, _ = tree_flatten(output)
        indices = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]
        if not indices:
            return
        for index in indices:
            self._check_batch(layer, leaves[index])
        layer.calls += 1
        warn_fallback_once(module, layer.path)
        saved = _SavedOnce(tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, (args, kwargs)))
        hook = partial(self._on_fallback_output_grads, layer, saved, indices)
        torch.autograd.graph.register_multi_grad_hook([leaves[i] for i in indices], hook, mode="all")

    # --- backward --------------------------------------------------------------------------------

    def _materializes(self, layer: _Layer) -> bool:
        return layer.shares_parameters or layer.calls > 1

    def _on_rule_output_grad(self, layer: _Layer, saved: Any, grad_output: Tensor) -> None:
        if torch.is_grad_enabled():  # backward(create_graph=True): keep the norms out of the graph
            with torch.no_grad():
                return self._on_rule_output_grad(layer, saved, grad_output)
        if self._materializes(layer):
            self._add_per_sample_grads(layer, layer.rule.per_sample_grads(layer.module, saved, grad_output))
        else:
            self._sq_norm_parts.append(layer.rule.sq_norms(layer.module, saved, grad_output, self._strategy))
        layer.covered = True

    def _on_fallback_output_grads(self, layer: _Layer, saved_once: _SavedOnce, indices: list[int], grads: list[Tensor | None]) -> None:
        saved = saved_once.take()
        if saved is None:  # a second backward pass through a retained graph; _check_complete reports it
            return
        args, kwargs = saved
        self._paused = True
        try:
            per_sample = fallback_per_sample_grads(layer.module, layer.path, layer.params, args, kwargs, indices, grads, self._batch_size)
        finally:
            self._paused = False
        with torch.no_grad():
            if self._materializes(layer):
                self._add_per_sample_grads(layer, per_sample)
            else:
                for g in per_sample.values():
                    self._sq_norm_parts.append(g.reshape(g.shape[0], -1).square().sum(1))
        layer.covered = True

    def _add_per_sample_grads(self, layer: _Layer, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            pid = id(layer.params[name])
            previous = self._per_sample_grads.get(pid)
            self._per_sample_grads[pid] = g if previous is None else previous + g

    def _record_parameter_grad(self, pid: int, grad: Tensor) -> None:
        self._grad_counts[pid] += 1
        values = grad.coalesce().values() if grad.is_sparse else grad
        self._grad_norms.append(torch.linalg.vector_norm(values.detach()))

    # --- results ---------------------------------------------------------------------------------

    def _check_complete(self) -> None:
        if not self._grad_counts:
            raise RuntimeError(
                "no gradient reached the model's trainable parameters while the hooks were attached; "
                "run the forward pass and the backward pass inside the measurement"
            )
        passes = max(self._grad_counts.values())
        if passes > 1:
            raise RuntimeError(
                f"{passes} backward passes reached the parameters during one measurement; a measurement covers "
                "exactly one backward pass (start a new one per micro-batch)"
            )
        covered = {pid for layer in self._layers if layer.covered for pid in layer.param_ids}
        missing = [self._parameter_names[pid] for pid in self._grad_counts if pid not in covered]
        if missing:
            raise ValueError(
                f"parameters {missing} received gradients, but no per-sample rule saw their module run: they are used "
                "outside their own module's forward (for example F.linear(x, layer.weight)); call the module instead, "
                "or keep the parameters in a small custom module so the torch.func fallback handles them"
            )

    def sq_norms(self) -> Tensor:
        """Per-sample squared gradient norms, shape ``[B]``, in the scale of the back-propagated loss."""
        self._check_complete()
        parts = self._sq_norm_parts + [g.reshape(g.shape[0], -1).square().sum(1) for g in self._per_sample_grads.values()]
        if len(parts) == 1:
            return parts[0]
        if all(part.dtype == parts[0].dtype for part in parts):
            return torch.stack(parts).sum(0)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def grad_sum_sq_norm(self) -> Tensor:
        """Squared norm of the gradient this backward pass produced (a 0-d float64 tensor)."""
        self._check_complete()
        return torch.linalg.vector_norm(torch.stack(self._grad_norms).double()).square()
