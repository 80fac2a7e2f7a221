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

Right or loud: two checks guard what hooks cannot see (``check="first_call"``, the default, runs them
once per model and input signature; ``"every_call"`` on every measurement; ``"off"`` never).

* **Batch axes and sample mixing** (``batch_axes.py``): a permutation probe finds which axis of every
  layer's tensors holds the samples, so a ``(T, B, ·)`` tensor inside a batch-first model is handled on
  its real batch axis (or refused with the layer named) even when ``T == B``; a third probe pass with
  one sample replaced refuses operations between layers that mix samples yet commute with every
  permutation (``h - h.mean(0)``, a softmax over the batch), which the gradient-sum check below
  cannot see (the per-sample terms still add up to the batch gradient).
* **Unseen parameter uses**: the per-sample gradients the hooks imply must add up to the gradient
  autograd produced, :math:`\\sum_i g_i^{\\text{hooks}} = \\nabla_w L`. A parameter also used outside
  its module (``x @ emb.weight.T``) or a layer that mixes samples breaks the identity; the engine then
  raises with the parameter's name. The sum costs one weight-gradient-sized computation per layer,
  which is why it runs on the first call only by default.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from gradiv_lib.norms import batch_axes, fused, rules_attention
from gradiv_lib.norms.batch_axes import MIXED, Layout
from gradiv_lib.norms.fallback import fallback_per_sample_grads, warn_fallback_once
from gradiv_lib.norms.rules import LAYER_RULES, SEQUENCE_STRATEGIES, LayerRule, SequenceStrategy, computes_its_class_formula, summed_grads

Check = Literal["first_call", "every_call", "off"]
"""When the engine runs its batch-axis probe and gradient-sum check."""

CHECKS: tuple[str, ...] = get_args(Check)

GradSource = Literal["hooks", "backward"]
"""Where the engine reads the gradient the backward pass produced (for ‖Σ_i ∇ℓ_i‖²)."""

GRAD_SOURCES: tuple[str, ...] = get_args(GradSource)

GRAD_SUM_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
"""Relative tolerance of the gradient-sum check by parameter dtype (half precision or autocast: 5e-2)."""


_TRAINING = operator.attrgetter("training")
_TRAINING_ONLY_NOTE = (
    " This happens in training mode only: in eval mode the model treats samples independently, so a module of it "
    "mixes samples while training (it normalises or mixes across the batch). Measure with that module in eval mode, "
    "or make it per sample."
)
"""Appended to a refusal of mixed samples that the probe saw in training mode only."""


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
    fusable: bool = False
    buffers_before: Any = field(default=None, repr=False)  # fallback layers: buffer state as the forward began
    rng_before: Any = field(default=None, repr=False)  # fallback layers: (CUDA devices, generator states) as it began
    encloses_layers: bool = False  # fallback layers: another layer's module runs inside this one (shared with it)
    param_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.param_ids = frozenset(id(p) for p in self.params.values())

    @property
    def name(self) -> str:
        return f"'{self.path or '<model>'}' ({type(self.module).__qualname__})"


class _SavedOnce:
    """Forward-pass state for exactly one backward hook call, dropped when taken: the hook object
    lives as long as the autograd graph, and holding activations there would keep them alive until
    the end of the backward pass instead of letting autograd free them layer by layer."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def take(self) -> Any:
        value, self._value = self._value, None
        return value


class _OutputGradHook:
    """The tensor hook on one rule layer's output: forward-pass state for exactly one backward hook
    call, dropped when used (the hook object lives as long as the autograd graph, and holding
    activations there would keep them alive until the end of the backward pass). One small object per
    layer call instead of a partial and a holder: this runs on every measured training step."""

    __slots__ = ("_engine", "_layer", "_root", "_index", "_saved", "_shape")

    def __init__(
        self, engine: PerSampleNormEngine, layer: _Layer, root: _RootCall | None, index: int, saved: Any, shape: torch.Size | None
    ) -> None:
        self._engine, self._layer, self._root, self._index, self._saved = engine, layer, root, index, saved
        self._shape = shape  # set when the hook sits on the output's base (``_hook_target``): reshape to it

    def __call__(self, grad_output: Tensor) -> None:
        saved, self._saved = self._saved, None
        if saved is None:  # a second backward pass through a retained graph
            self._engine._note_extra_pass()
            return
        if self._shape is not None:
            grad_output = grad_output.reshape(self._shape)
        self._engine._on_backward()
        self._engine._on_rule_output_grad(self._layer, self._root, self._index, saved, grad_output)


class _FusedReport:
    """Receives one fused layer call's per-sample gradients during the backward pass
    (``fused.py``), chunk by chunk, and records their squared norms (or the gradients themselves
    when the layer runs more than once) once the whole batch has been seen."""

    __slots__ = ("_engine", "_layer", "_batch", "_parts", "_done")

    def __init__(self, engine: PerSampleNormEngine, layer: _Layer, batch: int) -> None:
        self._engine, self._layer, self._batch, self._parts, self._done = engine, layer, batch, [], False

    def __call__(self, grads: fused.PerSampleGrads, start: int) -> None:
        engine, layer = self._engine, self._layer
        if self._done:  # a second backward pass through a retained graph
            engine._note_extra_pass()
            return
        if start == 0:
            engine._on_backward()
        materialize = engine._materializes(layer)
        self._parts.append(grads if materialize else fused.sq_norms_of(grads))
        if start + (grads if isinstance(grads, Tensor) else grads[0]).shape[0] < self._batch:
            return
        self._done = True
        parts, self._parts = self._parts, []
        if materialize:
            engine._add_per_sample_grads(layer, fused.per_sample_parameter_grads(layer.module, parts, "bias" in layer.params))
        else:
            engine._sq_norm_parts.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        layer.covered = True


def _hook_target(output: Tensor) -> Tensor:
    """The tensor whose gradient hook sees a rule layer's output gradient. ``F.linear`` on an input with
    more than two axes returns a view of its 2-D product, and an in-place operation on that view
    (``relu_``, ``+=``) re-bases the view's history and drops the hooks registered on it; the product
    itself then receives, reshaped, the gradient of the output as it was before the in-place operation.
    So for a view that covers all of a contiguous base the hook goes on the base."""
    if not output._is_view():
        return output
    base = output._base
    if base.requires_grad and base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous():
        return base
    return output


def _rng_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[int], list[np.ndarray]]:
    """The CUDA devices the call's tensors are on, and the states of the CPU generator and of theirs."""
    # (flattening the call's arguments costs more than the CPU state: only where CUDA is there)
    devices = batch_axes.cuda_devices((args, kwargs)) if torch.cuda.is_available() else []
    return devices, rules_attention.rng_states(devices)


def _trainable_direct_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def _plan_layers(model: nn.Module) -> tuple[list[_Layer], list[tuple[str, nn.Module, tuple[str, ...]]]]:
    """Assign every trainable parameter to the module that will report its per-sample gradients. Also
    returns the rule-type modules outside any fallback layer that lack a ``weight`` or ``bias`` parameter
    (path, module, the missing names): a forward pre-hook or the parent may set that attribute to a
    tensor computed from other parameters, which no hook would see (``_refuse_computed_weight``)."""
    layers: list[_Layer] = []
    computed: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    visited: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        if isinstance(module, torch.jit.ScriptModule) and any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"module '{path or '<model>'}' is a TorchScript module (torch.jit.script or torch.jit.trace) with "
                "trainable parameters; PyTorch runs no forward hooks on TorchScript modules, so their per-sample "
                "gradients cannot be recorded. Measure the eager module (script a copy for deployment), or "
                "freeze its parameters (p.requires_grad_(False) for each) if they are not trained."
            )
        rule = LAYER_RULES.get(type(module))
        direct = _trainable_direct_params(module)
        if rule is not None and not computes_its_class_formula(module):  # the rule's formula is not the layer's
            rule = None
        if rule is not None:
            formula = ("weight",) if isinstance(module, nn.Embedding) else ("weight", "bias")  # what the class registers
            missing = tuple(name for name in formula if name not in module._parameters and name not in module._buffers)
            if missing:
                computed.append((path, module, missing))
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
    layer_modules = {id(layer.module) for layer in layers}
    for layer in layers:
        layer.shares_parameters = any(uses[pid] > 1 for pid in layer.param_ids)
        # a module both in a fallback layer's subtree and a layer of its own elsewhere (a Linear used directly and
        # inside a custom module with a parameter): the fallback's recomputation covers its calls inside
        layer.encloses_layers = layer.rule is None and any(id(m) in layer_modules for m in layer.module.modules() if m is not layer.module)
    return layers, computed


def planned_members(model: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """Every parameter and every BatchNorm layer of ``model`` by id, with its name: what an engine's hooks are
    planned for (it refuses a model whose members changed; ``train()`` builds a new meter then)."""
    params = {id(p): name for name, p in model.named_parameters()}
    return params, {id(m): path for path, m in model.named_modules() if isinstance(m, _BatchNorm)}


@dataclass(eq=False)
class _RootCall:
    """One call of the model itself: where each layer's calls start, and the probed layout."""

    base: dict[str, int]
    layout: Layout | None = None
    leading_sizes: tuple[int, ...] = ()  # of the tensor arguments, kept when there are several (for error messages)


_HALF = (torch.float16, torch.bfloat16)


_DOT_CHUNK = 1 << 19
"""Longest stretch of a gradient one dot product sums (longer ones: chunks, added in float64)."""


def _squared_norms(grads: list[Tensor], multi_tensor: bool) -> list[Tensor]:
    """‖g‖² of every gradient (0-d tensors, in no particular order). ``multi_tensor`` (off the CPU): the
    dense float32/float64 ones by one multi-tensor norm kernel (``torch._foreach_norm``: a few kernel
    launches for all of them instead of one per gradient, and a reduction tree, accurate in float32),
    the rest by :func:`_squared_norm`."""
    if not multi_tensor:
        return [_squared_norm(g) for g in grads]
    dense = [g for g in grads if not g.is_sparse and g.dtype in (torch.float32, torch.float64)]
    others = [_squared_norm(g) for g in grads if g.is_sparse or g.dtype not in (torch.float32, torch.float64)]
    if not dense:
        return others
    norms = torch._foreach_norm(dense)
    return [*torch._foreach_mul(norms, norms), *others]


def _squared_norm(grad: Tensor) -> Tensor:
    """‖grad‖² as a 0-d tensor. float32/float64: BLAS dots of the flattened gradient (measured here at
    half the time of ``torch._foreach_norm`` over an MLP's 2.7 MB of gradients at two threads). One
    float32 dot accumulates rounding along its length (measured relative errors: 1e-6 at 4·10⁵ entries,
    2e-3 at 4·10⁷; the norm reduction: 6e-6 and 5e-3), so a longer gradient is summed in chunks of
    :data:`_DOT_CHUNK` whose dots add in float64. Half precision in float32 (its squares overflow);
    sparse: the stored values."""
    if grad.is_sparse:
        grad = grad.coalesce().values()
    if grad.dtype in (torch.float32, torch.float64):
        flat = grad.reshape(-1)
        if flat.numel() <= _DOT_CHUNK:
            return torch.dot(flat, flat)
        return torch.stack([torch.dot(chunk, chunk) for chunk in flat.split(_DOT_CHUNK)]).sum(dtype=torch.float64)
    return torch.linalg.vector_norm(grad, dtype=torch.float32 if grad.dtype in _HALF else None).square()


class PerSampleNormEngine:
    """Hooks that compute per-sample squared gradient norms while an ordinary backward pass runs.

    Attach with ``with engine:`` (or :meth:`attach` / :meth:`detach`), run one forward pass and one
    backward pass, then read :meth:`sq_norms` and :meth:`grad_sum_sq_norm`. Both are in the scale of
    the loss that was back-propagated: for :math:`L = c\\sum_i \\ell_i` they are :math:`c^2` times the
    values for :math:`\\ell_i` (callers undo the factor). ``.grad`` is autograd's (with
    ``fuse_weight_grads=True``, equal to it to float rounding).

    Parameters
    ----------
    model
        The network, called on batch-first inputs (samples along dimension 0 of every tensor argument).
        Inside it, layers may hold the batch on another axis (``(T, B, ·)`` sequence layers): the
        permutation probe finds it. Which parameters are trainable is read here: build the engine after
        freezing parameters.
    sequence_strategy
        For Linear layers on sequences and for convolutions: ``"auto"`` (time the methods that the
        FLOP model leaves in the race once per layer shape, check they agree, then use the fastest),
        ``"gram"`` or ``"materialize"``.
    batch_size
        Expected number of samples; inferred from the model's first tensor argument when ``None``.
    check
        ``"first_call"`` (default): run the batch-axis probe and the gradient-sum check once per model
        and input signature; ``"every_call"``: on every measurement (for models whose control flow
        changes between calls); ``"off"``: never — batch axes are then read from shapes, and a shape
        with several axes of size B is refused. With ``"off"`` nothing detects a model that mixes samples
        (``x - x.mean(0)``) or a parameter used outside its module's forward (a tied output head through
        ``F.linear``): their norms are then wrong without an error, so turn the check off only for a model
        that has passed it. The probe runs the model's forward three more times
        (five with a module in training mode), without autograd; buffers are put back afterwards, but
        Python side effects of ``forward`` (a call counter, a user's hook that records activations)
        happen on those passes too.
    grad_source
        Where :math:`\\|\\sum_i \\nabla\\ell_i\\|^2` comes from: ``"hooks"`` (one hook per parameter; works
        with ``torch.autograd.grad``) or ``"backward"`` (read from ``.grad`` once when the backward pass
        ends, when every ``.grad`` was empty before it; the per-parameter hooks otherwise).
    measure_sum
        ``False``: skip :math:`\\|\\sum_i \\nabla\\ell_i\\|^2` (:meth:`grad_sum_sq_norm` then raises), for a
        loop that sums the gradients itself (``train()`` over an epoch); the gradients are still counted for
        the checks.
    fuse_weight_grads
        ``True``: after the checked first call, convolutions and Linear layers on sequences whose fused
        backward pass was timed faster form their weight gradient as the sum of the per-sample gradients
        (``fused.py``).

    Raises
    ------
    ValueError
        If the model has no trainable parameters, an option is unknown, or a layer mixes samples
        (``Embedding(scale_grad_by_freq=True)``; BatchNorm using batch statistics, a layer whose batch
        axis the probe cannot find, or a parameter with uses the hooks do not see are refused when
        they run; so are, on every call whatever ``check`` says, a Linear, convolution or norm layer whose
        ``weight`` or ``bias`` is not its parameter but a tensor computed from others, which a forward
        pre-hook or the parent set, and a layer without a rule whose forward draws random numbers, which
        the torch.func fallback cannot recompute: dropout inside an LSTM or an attention layer while training).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sequence_strategy: SequenceStrategy = "auto",
        batch_size: int | None = None,
        check: Check = "first_call",
        grad_source: GradSource = "hooks",
        fuse_weight_grads: bool = False,
        measure_sum: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__qualname__}")
        if sequence_strategy not in SEQUENCE_STRATEGIES:
            raise ValueError(f"sequence_strategy must be one of {SEQUENCE_STRATEGIES}, got {sequence_strategy!r}")
        if check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
        if grad_source not in GRAD_SOURCES:
            raise ValueError(f"grad_source must be one of {GRAD_SOURCES}, got {grad_source!r}")
        if not isinstance(fuse_weight_grads, bool):
            raise TypeError(f"fuse_weight_grads must be a bool, got {fuse_weight_grads!r}")
        if not isinstance(measure_sum, bool):
            raise TypeError(f"measure_sum must be a bool, got {measure_sum!r}")
        self._measure_sum = measure_sum
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        if not self._parameters:
            raise ValueError(
                f"model ({type(model).__qualname__}) has no trainable parameters (none with requires_grad=True); "
                "there is no gradient to measure"
            )
        self._model = model
        self._parameter_names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self._frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
        # the parameters and BatchNorm layers the hooks were planned for (``_check_structure``)
        self._planned_members = planned_members(model)
        self._remember_structure()
        self._layers, computed = _plan_layers(model)
        for layer in self._layers:
            layer.fusable = fuse_weight_grads and isinstance(layer.module, fused.FUSABLE_TYPES) and not layer.shares_parameters
        self._grad_source: GradSource = grad_source
        self._batch_norms = [(path, m) for path, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._strategy: SequenceStrategy = sequence_strategy
        self._check: Check = check
        self._expected_batch_size = batch_size
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._parameter_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._reading = False  # this measurement reads .grad at the end of the backward pass (no parameter hooks)
        self._constant_columns: dict[Any, Tensor] = {}
        self._paused = False
        self._idle = False  # attached between measurements (hold()): hooks ignore everything
        self._probe_run: dict[str, list[tuple[list[Any], list[Any]]]] | None = None
        # hooks are bound once here, not in attach(): attach runs on every measured training step
        self._layer_hooks: list[tuple[nn.Module, Any, bool]] = [
            (layer.module, partial(self._record_fallback_call, layer), True) if layer.rule is None
            else (layer.module, partial(self._record_rule_call, layer), True)  # kwargs: a call layer(input=x)
            for layer in self._layers
        ]
        self._batch_norm_hooks = [(module, partial(self._refuse_batch_statistics, path)) for path, module in self._batch_norms]
        self._computed_weight_hooks = [(module, partial(self._refuse_computed_weight, path, names)) for path, module, names in computed]
        # a fallback layer whose forward updates its buffers before using them (spectral_norm's power iteration)
        # is recomputed from the buffers it started with, not from the updated ones
        self._buffer_snapshot_hooks = [(layer.module, partial(self._snapshot_buffers, layer))
                                       for layer in self._layers if layer.rule is None and next(layer.module.buffers(), None) is not None]
        # a fallback layer that draws random numbers (dropout inside it in training mode) cannot be recomputed
        self._rng_snapshot_hooks = [(layer.module, partial(self._snapshot_rng, layer)) for layer in self._layers if layer.rule is None]
        self._enclosing_hooks = [(layer.module, self._enter_enclosing) for layer in self._layers if layer.encloses_layers]
        self._enclosing_depth = 0  # fallback layers enclosing other layers whose forward is running
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
        self._sq_norm_parts: list[Tensor | int] = []  # an int: row of _factor_parts
        self._factor_parts: list[tuple[Tensor, Tensor, float]] = []
        self._sq_norms_cache: tuple[tuple[int, int, int], Tensor] | None = None
        self._per_sample_grads: dict[int, Tensor] = {}
        self._grad_sq_norms: list[Tensor] = []  # ‖∇_p L‖² per parameter (``_squared_norm``)
        self._grad_counts: Counter[int] = Counter()
        self._root: _RootCall | None = None
        self._signature: Any = None
        self._verify = self._check != "off"
        self._verified = False
        self._complete = False
        self._grad_sums: dict[int, Tensor] = {}
        self._spreads: dict[int, Tensor] = {}
        self._actual_grads: dict[int, Tensor] = {}
        self._low_precision = False
        self._callback_queued = False
        self._backward_passes = 0
        self._extra_passes = False
        for layer in self._layers:
            layer.calls = 0
            layer.covered = False

    def attach(self) -> PerSampleNormEngine:
        """Register the hooks (idempotent)."""
        if not self._handles:
            handles = [self._model.register_forward_pre_hook(self._on_root_call, with_kwargs=True)]
            # prepended: a layer's hook sees the layer's own output, before a user's forward hook replaces it
            # (out * 2 + 0.5 would otherwise get the gradient at its result, not at the layer's output)
            handles += [module.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=True) for module, hook, with_kwargs in self._layer_hooks]
            handles.append(self._model.register_forward_hook(self._after_root_call, with_kwargs=True))
            handles += [module.register_forward_pre_hook(hook) for module, hook in self._batch_norm_hooks]
            handles += [module.register_forward_hook(hook) for module, hook in self._computed_weight_hooks]
            # first: before a pre-hook that updates buffers too (the legacy spectral_norm's power iteration)
            handles += [module.register_forward_pre_hook(hook, prepend=True) for module, hook in self._buffer_snapshot_hooks]
            handles += [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in self._rng_snapshot_hooks]
            handles += [module.register_forward_pre_hook(hook) for module, hook in self._enclosing_hooks]
            self._handles = handles
        if not self._reading and not self._parameter_handles:
            self._parameter_handles = [p.register_hook(hook) for p, hook in self._parameter_hooks]
        return self

    def detach(self) -> None:
        """Remove the hooks; recorded results stay readable."""
        self._detach_parameter_hooks()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _detach_parameter_hooks(self) -> None:
        for handle in self._parameter_handles:
            handle.remove()
        self._parameter_handles = []

    def _remember_structure(self) -> None:
        # every module with the ids of its children and parameters; the objects are held, so an id in the
        # snapshot cannot be reused by a module or parameter created later
        self._structure = [(m, tuple(m._modules.values()), tuple(m._parameters.values())) for m in self._model.modules()]
        self._structure_ids = [(tuple(map(id, children)), tuple(map(id, params))) for _, children, params in self._structure]
        # which modules, of which types: a parameter-free module swapped for one that mixes samples needs a new probe
        self._structure_token = tuple((id(m), type(m)) for m, _, _ in self._structure)
        self._modules = [m for m, _, _ in self._structure]

    def _check_structure(self) -> None:
        """Raise if a parameter or a BatchNorm layer was added, replaced, renamed or removed since the hooks
        were planned (a new layer has no hooks: its gradients would be left out of Δ silently). One identity
        comparison per module and step; a change of parameter-free modules only (ReLU for GELU) is accepted."""
        for (module, _, _), (children, params) in zip(self._structure, self._structure_ids):
            if tuple(map(id, module._modules.values())) != children or tuple(map(id, module._parameters.values())) != params:
                break
        else:
            return
        now = planned_members(self._model)
        if now == self._planned_members:  # the same parameters and norm layers under the same names
            self._remember_structure()
            return
        # a parameter under a new name counts as removed and added: torch.nn.utils.prune renames weight to
        # weight_orig and computes weight in a forward pre-hook, which the planned rule would not see
        (planned_params, planned_norms), (params, norms) = self._planned_members, now
        added = [name for pid, name in params.items() if planned_params.get(pid) != name]
        added += [f"{path} (BatchNorm)" for mid, path in norms.items() if planned_norms.get(mid) != path]
        removed = [name for pid, name in planned_params.items() if params.get(pid) != name]
        removed += [f"{path} (BatchNorm)" for mid, path in planned_norms.items() if norms.get(mid) != path]
        raise ValueError(
            f"the model changed after this meter was built: {'added ' + str(added) if added else ''}"
            f"{'; ' if added and removed else ''}{'removed ' + str(removed) if removed else ''} (a layer replaced or added, "
            "a parameter reassigned, or pruned with torch.nn.utils.prune). The meter plans its hooks for the model as it was built and would leave "
            "new parameters out; build a new meter after changing the model."
        )

    def __enter__(self) -> PerSampleNormEngine:
        self._check_structure()
        if self._frozen and any(p.requires_grad for p in self._frozen.values()):
            thawed = [name for name, p in self._frozen.items() if p.requires_grad]
            raise ValueError(
                f"parameters {thawed} were frozen (requires_grad=False) when this meter was built and are trainable "
                "now; the meter plans its hooks for the parameters trainable at construction, so it would leave "
                "their gradients out. Build a new meter after unfreezing parameters."
            )
        self.reset()
        self._idle = False
        self._open = True
        # grad_source="backward": when every .grad is empty, the gradient of this backward pass is what
        # .grad holds when the pass ends (read by one callback, instead of one hook per parameter); a
        # gradient accumulated onto an earlier one, or a hook that acts on .grad after accumulation,
        # needs the parameter hooks
        self._reading = self._grad_source == "backward" and all(
            p.grad is None and p._post_accumulate_grad_hooks is None for p in self._parameters
        )
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self._open = False
        self._detach_parameter_hooks()
        if self._held:
            self._idle = True
        else:
            self.detach()

    _held = False
    _open = False  # between __enter__ and __exit__

    def _note_extra_pass(self) -> None:
        """A second backward pass through a layer's retained graph: inside the measurement, _check_complete
        refuses it (.grad holds both passes); after ``with`` ended, the measurement was complete, so it is
        none of the measurement's business (``loss.backward(retain_graph=True)`` inside, another pass outside)."""
        if self._open:
            self._extra_passes = True

    def hold(self) -> None:
        """Keep the hooks registered between measurements until :meth:`release` (for a training loop
        that owns the model: registering and removing a dozen hooks per step is a visible share of a
        small step). Between ``with`` blocks the hooks ignore every forward and backward pass. The
        parameter hooks (only needed when ``.grad`` already holds a gradient, see ``grad_source``) are
        registered per measurement."""
        self._held = True
        self._idle = True
        self._reading, reading = True, self._reading
        try:
            self.attach()
        finally:
            self._reading = reading

    def release(self) -> None:
        """End :meth:`hold`: remove the hooks (idempotent)."""
        self._held = False
        self._idle = False
        self.detach()

    # --- forward ---------------------------------------------------------------------------------

    def _recording(self) -> bool:
        return not self._paused and not self._idle and self._probe_run is None and torch.is_grad_enabled()

    def _on_root_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._enclosing_depth = 0  # (a forward that raised inside an enclosing layer left it raised)
        if not self._recording():
            return
        plain_call = not kwargs and all(type(a) is Tensor or type(a) is nn.Parameter for a in args)
        leaves = args if plain_call else tree_flatten((args, kwargs))[0]
        if self._batch_size is None:
            first = next((leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0), None)
            if first is not None:
                self._batch_size = int(first.shape[0])
        # where each layer's calls start in this root call (nothing ran yet: the common, first root call)
        self._root = _RootCall({layer.path: layer.calls for layer in self._layers} if self._layer_calls_seen() else {})
        if len(leaves) > 1:  # several tensor arguments: their first dimensions are named if a layer is refused
            sizes = tuple(int(leaf.shape[0]) for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0)
            if len(sizes) > 1:
                self._root.leading_sizes = sizes
        if self._check == "off":
            return
        # the module tree and every module's mode are part of it: a cached layout (and its passed gradient check)
        # is for the tree and the modes it saw (one submodule put in training mode may mix samples then)
        modes = tuple(map(_TRAINING, self._modules))
        self._signature = (self._structure_token, modes, self._call_signature(module, args, kwargs, plain_call))
        if self._check == "first_call":
            self._root.layout = batch_axes._LAYOUTS.get(module, {}).get(self._signature)
            if self._root.layout is not None and self._root.layout.grads_verified:
                self._verify = False

    def _layer_calls_seen(self) -> bool:
        return any(layer.calls for layer in self._layers)

    @staticmethod
    def _call_signature(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], plain_call: bool) -> Any:
        """``batch_axes.signature`` (what a cached layout depends on), with a fast path for the usual
        call ``model(x, ...)`` on tensors only: the same information without flattening a pytree."""
        if not plain_call:
            return batch_axes.signature(module, args, kwargs)
        autocast = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else None
        return ("tensors", module.training, autocast, tuple((a.shape[1:], a.dtype, a.device) for a in args))

    def _after_root_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        root = self._root
        if not self._recording() or root is None or self._check == "off":
            return
        if root.layout is None and self._batch_size is not None and self._batch_size > 1:
            root.layout = self._probe(args, kwargs)
            if self._check == "first_call":
                batch_axes._LAYOUTS.setdefault(module, {})[self._signature] = root.layout
        if root.layout is not None and root.layout.first_mixed is not None:  # on every call, cached layouts too
            self._refuse_mixed(module, root.layout)

    def _refuse_mixed(self, module: nn.Module, layout: Layout) -> None:
        """Raise where the probe first saw mixed samples: a layer's input or output, else the model's output
        (mixing after the last layer with parameters, or around layers whose parameters are frozen)."""
        path, what, leaf = layout.first_mixed
        layer = next((layer for layer in self._layers if layer.path == path), None) if path is not None else None
        note = _TRAINING_ONLY_NOTE if layout.mixed_in_training_only else ""
        if layer is not None:
            self._refuse_axis(layer, what if layer.rule is not None else f"{what} {leaf}", MIXED, note)
        raise ValueError(
            f"the output of {type(module).__qualname__} (leaf {leaf} of its flattened output) does not treat the "
            "samples independently: replacing one sample changes the other samples' outputs, so it mixes samples "
            "(e.g. x - x.mean(0), a softmax or a sum across the batch, after the last layer with parameters) and "
            "per-sample gradients are undefined. Keep every operation per sample, or pass check='off' if the "
            f"output draws noise in eval mode.{note}{self._arguments_note()}"
        )

    def _probe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Layout:
        """Run the model on the batch, on the batch rolled by one sample and on the batch with one sample
        replaced (``batch_axes.py``)."""

        def set_run(run: dict[str, list[tuple[list[Any], list[Any]]]] | None) -> None:
            self._probe_run = run

        return batch_axes.probe(self._model, args, kwargs, self._batch_size, set_run)

    def _probe_record(self, layer: _Layer, inputs: list[Any], outputs: list[Any]) -> None:
        prints = [batch_axes.fingerprint(t, self._batch_size) for t in inputs], [batch_axes.fingerprint(t, self._batch_size) for t in outputs]
        self._probe_run.setdefault(layer.path, []).append(prints)

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

    def _refuse_computed_weight(self, path: str, names: tuple[str, ...], module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """After the forward of a rule-type module without a ``weight`` or ``bias`` parameter: refuse if that
        attribute is a tensor that requires grad (computed from parameters elsewhere; on every call, whatever
        ``check`` says: without the gradient-sum check the result would be wrong silently)."""
        if not self._recording():
            return
        for name in names:
            value = module.__dict__.get(name)
            if isinstance(value, Tensor) and value.requires_grad:
                raise ValueError(
                    f"layer '{path or '<model>'}' ({type(module).__qualname__}) uses a {name} that is not one of its "
                    f"parameters but a tensor computed from others ('{name}' requires grad and is not in its "
                    "_parameters: a forward pre-hook or the parent module set it). Its gradient reaches the parameters "
                    "it was computed from outside every hook, so their per-sample gradients would be wrong. Register "
                    "the computation with torch.nn.utils.parametrize.register_parametrization (measured by the "
                    f"torch.func fallback), or assign the Parameter itself (layer.{name} = other.{name}: shared "
                    "parameters are handled)."
                )

    def _check_batch(self, layer: _Layer, tensor: Tensor) -> None:
        if tensor.dim() == 0:
            raise ValueError(f"layer {layer.name} received a 0-d tensor; per-sample norms need a batch dimension")
        if self._batch_size is None:
            self._batch_size = int(tensor.shape[0])
        elif self._batch_size not in tensor.shape:
            raise ValueError(
                f"layer {layer.name} received a tensor of shape {tuple(tensor.shape)} with no axis of size "
                f"{self._batch_size}, but the batch has {self._batch_size} samples; per-sample norms need every "
                "layer call to see all samples along one axis: the batch cannot be flattened into another axis "
                "(x.reshape(B * T, d): keep (B, T, d), Linear, LayerNorm and Embedding act on the last axes) "
                f"nor split over several calls (x.split(k): call the layer once on the whole batch).{self._arguments_note()}"
            )

    def _arguments_note(self) -> str:
        """For a refusal: the model has several tensor arguments, and the meter reads the samples along dimension 0
        of each. Where they disagree on it, an argument that is not batched (a scale vector passed first) set a
        wrong B; where they agree, one that is not batched but has B rows (a shared B x B matrix) was probed as
        batched, which looks like mixing."""
        sizes = self._root.leading_sizes if self._root is not None else ()
        if not sizes:
            return ""
        shared = (
            "Pass a tensor that is not batched (a scale, a mask or a table shared by all samples) as an attribute or "
            "buffer of the model, or expand it along the batch."
        )
        if len(set(sizes)) > 1:
            return (
                f" The model's tensor arguments have first dimensions {list(sizes)}: the meter reads the samples along "
                f"dimension 0 of every tensor argument, and took B = {self._batch_size} from the first. {shared}"
            )
        return (
            f" The model's {'two' if len(sizes) == 2 else len(sizes)} tensor arguments {'both' if len(sizes) == 2 else 'all'} have {sizes[0]} rows, and the meter took each as one row "
            f"per sample (the probe permuted them together); if one is not batched and only has B = {sizes[0]} rows "
            f"by coincidence, that alone looks like mixing. {shared}"
        )

    def _call_index(self, layer: _Layer) -> int:
        index = layer.calls - (self._root.base.get(layer.path, 0) if self._root is not None else 0)
        layer.calls += 1
        return index

    def _enter_enclosing(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Before the forward of a fallback layer that encloses other layers: their calls inside it are not
        recorded (its recomputation differentiates them; recording them too counted those uses twice)."""
        self._enclosing_depth += 1

    def _record_rule_call(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
        # every rule layer's forward takes one tensor, ``input``: layer(x) or layer(input=x)
        if self._enclosing_depth:  # called inside a fallback layer, which covers this call
            return
        if self._probe_run is not None:
            self._probe_record(layer, [args[0] if args else kwargs["input"]], [output])
            return
        # output.requires_grad is False under no_grad / inference mode (evaluation passes are skipped)
        if self._paused or self._idle or not output.requires_grad:
            return
        activation = args[0] if args else kwargs["input"]
        if activation.dim() < layer.rule.batched_input_dim:
            raise ValueError(
                f"layer {layer.name} was called on an unbatched input of shape {tuple(activation.shape)}; "
                f"it needs at least {layer.rule.batched_input_dim} dimensions with the batch first"
            )
        if self._batch_size is None or activation.shape[0] != self._batch_size:
            self._check_batch(layer, activation)
        index = self._call_index(layer)
        method = fused.fusable(module, activation, output, self._strategy) if layer.fusable and not self._verify else None
        if method is not None and self._fused_layout(layer, index):
            return fused.fused_output(module, activation, output, _FusedReport(self, layer, self._batch_size), method)
        target = _hook_target(output)
        hook = _OutputGradHook(self, layer, self._root, index, layer.rule.save(module, activation, output), None if target is output else output.shape)
        target.register_hook(hook)
        return None

    def _fused_layout(self, layer: _Layer, index: int) -> bool:
        """Whether the checked layout puts this call's samples on axis 0 of input and output (a fused
        layer is only used on calls the first-call check has seen)."""
        entry = self._layout_entry(layer, self._root, index)
        return entry is not None and entry[0][0] == 0 and entry[1][0] == 0

    def _snapshot_buffers(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Before a fallback layer's forward: its buffers (object, version, copy), for the recomputation."""
        layer.buffers_before = [(name, b, b._version, b.clone()) for name, b in module.named_buffers()] if self._recording() else None

    def _snapshot_rng(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before a fallback layer's forward (after the pre-hooks registered before the meter's): the states of
        the CPU generator and of the CUDA generators of its inputs' devices."""
        layer.rng_before = _rng_states(args, kwargs) if self._recording() else None

    def _random_draws(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> rules_attention.Replay | None:
        """After a fallback layer's forward: ``None`` if it drew no random numbers; for attention whose dropout
        mask the batched rule can draw again, what that needs; otherwise raise (on every call, whatever ``check``
        says: the recomputation would draw others and give wrong norms silently)."""
        before, layer.rng_before = layer.rng_before, None
        if before is None:
            return None
        devices, before = before
        after = rules_attention.rng_states(devices)
        if all(np.array_equal(a, b) for a, b in zip(before, after)):
            return None
        if rules_attention.supports(module, args, kwargs) and rules_attention.dropout_p(module) > 0.0:
            return rules_attention.Replay(before, after, devices, output.detach().clone())
        raise self._random_draws_error(layer)

    @staticmethod
    def _random_draws_error(layer: _Layer, note: str = "") -> ValueError:
        return ValueError(
            f"layer {layer.name} draws random numbers in its forward (dropout inside it while training, e.g. "
            "nn.LSTM(dropout>0), or nn.MultiheadAttention(dropout>0) with a 3-D attn_mask or in half precision); it has no "
            "per-sample rule that draws them again, and the torch.func fallback recomputes its per-sample gradients "
            f"with other random draws, so its norms would be wrong.{note} Measure with that layer in eval mode "
            "(layer.eval(): dropout off inside it), or set its dropout to 0, or move the dropout out of the layer "
            "(dropout on its inputs or outputs is fine)."
        )

    @staticmethod
    def _changed_buffers(layer: _Layer) -> dict[str, Tensor]:
        """The buffers the layer's last forward replaced or changed in place, as they were before it ran."""
        snapshot, layer.buffers_before = layer.buffers_before, None
        if not snapshot:
            return {}
        now = dict(layer.module.named_buffers())
        return {name: before for name, b, version, before in snapshot if now.get(name) is not b or b._version != version}

    def _record_fallback_call(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if layer.encloses_layers:
            self._enclosing_depth -= 1
        if self._enclosing_depth:  # called inside a fallback layer, which covers this call
            layer.buffers_before = layer.rng_before = None
            return None
        buffers_before = self._changed_buffers(layer) if layer.buffers_before is not None else {}
        if self._probe_run is not None:
            self._probe_record(layer, tree_flatten((args, kwargs))[0], tree_flatten(output)[0])
            return None
        if not self._recording():
            return None
        leaves, spec = tree_flatten(output)
        indices = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]
        if not indices:
            return None
        replay = self._random_draws(layer, module, args, kwargs, leaves[0])
        if any(isinstance(arg, nn.utils.rnn.PackedSequence) for arg in (*args, *kwargs.values())):  # a namedtuple: tree_flatten would open it
            raise ValueError(
                f"layer {layer.name} was called on a PackedSequence, which puts the time steps of all samples "
                "on one axis, so its per-sample gradients cannot be separated. Call it on the padded batch "
                "(B, T, ·) with batch_first=True instead; for a one-directional RNN, output[i, lengths[i] - 1] "
                "is the packed run's last hidden state of sample i (padding after it does not change it)"
            )
        for index in indices:
            self._check_batch(layer, leaves[index])
        call = self._call_index(layer)
        if not rules_attention.supports(module, args, kwargs):
            warn_fallback_once(module, layer.path)
        saved = _SavedOnce((*tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, (args, kwargs)), buffers_before, replay))
        hook = partial(self._on_fallback_output_grads, layer, self._root, call, saved, indices, len(leaves))
        replaced = None
        if len(indices) > 1:
            # one output may be computed from another inside the layer (LSTMCell: h = o·tanh(c)); the gradient
            # reaching c would then include the path through h, which the recomputation ⟨f(x_i; θ), δ_i⟩
            # differentiates again. Fresh copies handed to the caller receive the outside uses' gradients only.
            leaves = list(leaves)
            for i in indices:
                leaves[i] = leaves[i].clone()
            replaced = tree_unflatten(leaves, spec)
        torch.autograd.graph.register_multi_grad_hook([leaves[i] for i in indices], hook, mode="all")
        return replaced

    # --- batch axes --------------------------------------------------------------------------------

    def _axis_from_shape(self, layer: _Layer, tensor: Any, what: str) -> int | None:
        """Without a probe: the unique axis of size B (any size-1 axis when B == 1)."""
        if not isinstance(tensor, Tensor) or tensor.dim() == 0:
            return None
        axes = [axis for axis, size in enumerate(tensor.shape) if size == self._batch_size]
        if len(axes) <= 1 or self._batch_size == 1:
            return axes[0] if axes else None
        raise ValueError(
            f"layer {layer.name}: its {what} has shape {tuple(tensor.shape)}, with several axes of size B = "
            f"{self._batch_size}, and no probe has resolved which one holds the samples (the model itself was "
            f"not called inside the measurement, or check='off'). Call the model (not a submodule) inside the "
            f"measurement with check='first_call' or 'every_call', or use a batch size that no other axis has.{self._arguments_note()}"
        )

    def _layout_entry(self, layer: _Layer, root: _RootCall | None, index: int) -> tuple[tuple[int | None, ...], tuple[int | None, ...]] | None:
        if root is None or root.layout is None:
            return None
        return root.layout.axes.get((layer.path, index))

    def _refuse_axis(self, layer: _Layer, what: str, axis: int | None, note: str = "") -> None:
        """Raise for a layer whose ``what`` (input, output) has no batch axis: ``axis`` is ``MIXED`` (samples
        mixed) or ``None`` (one value broadcast across the batch); ``note`` is appended to the message."""
        if axis == MIXED:
            raise ValueError(
                f"layer {layer.name}: its {what} changes when the samples of the batch are permuted in a way no "
                "axis explains, or changes for other samples when one sample is replaced, so it mixes samples "
                "(batch statistics such as x - x.mean(0), a softmax, sum or reshape across the batch, or random "
                "numbers drawn in eval mode); per-sample gradients are undefined. Make the model treat samples "
                f"independently, or pass check='off' if its forward draws noise in eval mode.{note}{self._arguments_note()}"
            )
        raise ValueError(
            f"layer {layer.name}: its {what} is the same for every sample (it is computed once and broadcast "
            "across the batch), so the gradient reaching the layer is already summed over samples and per-sample "
            f"gradients cannot be recovered. Expand the input along the batch first (e.g. positions.expand(B, -1)).{self._arguments_note()}"
        )

    def _rule_axis(self, layer: _Layer, root: _RootCall | None, index: int, grad_output: Tensor) -> int:
        entry = self._layout_entry(layer, root, index)
        if entry is None:
            axis = self._axis_from_shape(layer, grad_output, "output")
            if axis is None:
                self._refuse_axis(layer, "output", None)
        else:
            (axis,), (out_axis,) = entry
            if axis is None or axis == MIXED:
                self._refuse_axis(layer, "input", axis)
            if out_axis != axis:
                self._refuse_axis(layer, "output", out_axis if out_axis in (None, MIXED) else MIXED)
        if axis != 0:
            limit = layer.rule.leading_dims(layer.module, grad_output) if layer.rule.leading_dims is not None else 1
            if axis >= limit:
                raise ValueError(
                    f"layer {layer.name} sees the samples along axis {axis} of its input (shape "
                    f"{tuple(grad_output.shape)} at the output); its per-sample rule needs them along one of the "
                    f"first {limit} axes. Give the layer a batch-first input (transpose before it).{self._arguments_note()}"
                )
        return axis

    def _fallback_axes(self, layer: _Layer, root: _RootCall | None, index: int, in_leaves: list[Any], out_leaves: dict[int, Tensor], n_out: int) -> tuple[list[int | None], list[int | None]]:
        entry = self._layout_entry(layer, root, index)
        if entry is None:
            in_axes = [self._axis_from_shape(layer, leaf, f"input {i}") for i, leaf in enumerate(in_leaves)]
            out_axes = [self._axis_from_shape(layer, out_leaves[i], f"output {i}") if i in out_leaves else None for i in range(n_out)]
        else:
            in_axes, out_axes = list(entry[0]), list(entry[1])
        for i, axis in enumerate(in_axes):
            if axis == MIXED:
                self._refuse_axis(layer, f"input {i}", axis)
        for i in out_leaves:
            if out_axes[i] is None or out_axes[i] == MIXED:
                self._refuse_axis(layer, f"output {i}", out_axes[i])
        return in_axes, out_axes

    # --- backward --------------------------------------------------------------------------------

    def _on_backward(self) -> None:
        """First hook of a backward pass in reading mode: read .grad once the pass has finished."""
        if self._reading and not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._read_grads)

    def _read_grads(self) -> None:
        """End of a backward pass (``grad_source="backward"``, every .grad empty before it): the gradient
        this pass produced is what .grad holds now."""
        self._callback_queued = False
        self._backward_passes += 1
        if self._backward_passes > 1:
            return  # _check_complete refuses the measurement
        grads = []
        for p in self._parameters:
            g = p.grad
            if g is None:
                continue
            grads.append(g)
            self._grad_counts[id(p)] += 1
            if self._verify:  # a copy: .grad may be clipped in place before the check runs
                self._actual_grads[id(p)] = g.detach().clone()
        if self._measure_sum and grads:
            self._grad_sq_norms.extend(_squared_norms(grads, multi_tensor=grads[0].device.type != "cpu"))
        self._complete = False

    def _materializes(self, layer: _Layer) -> bool:
        return layer.shares_parameters or layer.calls > 1

    def _on_rule_output_grad(self, layer: _Layer, root: _RootCall | None, index: int, saved: Any, grad_output: Tensor) -> None:
        axis = self._rule_axis(layer, root, index, grad_output)
        if axis != 0:
            saved, grad_output = saved.movedim(axis, 0), grad_output.movedim(axis, 0)
        if grad_output.dtype in _HALF:
            self._low_precision = True
        rule, module = layer.rule, layer.module
        # hooks run with grad mode off unless backward(create_graph=True); only then is no_grad needed
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            if self._materializes(layer):
                self._add_per_sample_grads(layer, rule.per_sample_grads(module, saved, grad_output))
            else:
                factors = rule.sq_norm_factors(module, saved, grad_output) if rule.sq_norm_factors is not None and not self._verify else None
                if factors is not None:  # combined with the other layers' factors in sq_norms()
                    self._sq_norm_parts.append(len(self._factor_parts))  # its place in the sum order
                    self._factor_parts.append(factors)
                else:
                    sq_norms = rule.sq_norms(module, saved, grad_output, self._strategy)
                    self._sq_norm_parts.append(sq_norms)
                    if self._verify:
                        self._add_grad_sums(layer, summed_grads(rule, module, saved, grad_output), sq_norms)
                        if layer.fusable:  # time fusing against this path, once per shape (fused.decide)
                            fused.decide(module, saved, grad_output, self._strategy)
        layer.covered = True

    def _on_fallback_output_grads(
        self, layer: _Layer, root: _RootCall | None, index: int, saved_once: _SavedOnce, indices: list[int], n_out: int, grads: list[Tensor | None]
    ) -> None:
        saved = saved_once.take()
        if saved is None:  # a second backward pass through a retained graph
            self._note_extra_pass()
            return
        self._on_backward()
        args, kwargs, buffers_before, replay = saved
        in_leaves, _ = tree_flatten((args, kwargs))
        out_grads = {i: g for i, g in zip(indices, grads) if g is not None}
        in_axes, out_axes = self._fallback_axes(layer, root, index, in_leaves, out_grads, n_out)
        self._low_precision |= any(g.dtype in _HALF for g in out_grads.values())
        call_masks = self._attention_masks(layer, args, kwargs, in_leaves, in_axes) if set(out_grads) == {0} else None
        if call_masks is not None:
            if replay is not None:
                replay.output = replay.output.movedim(out_axes[0], 0)
            self._attention_rule(layer, args[:3], in_axes[:3], out_grads[0].movedim(out_axes[0], 0), replay, call_masks,
                                 bool(kwargs.get("need_weights", True)))
            return
        if replay is not None:  # (the attention weights reached the loss, or the module left training mode)
            raise self._random_draws_error(layer, " Here the attention weights it returns are used too, which only the fallback covers.")
        self._paused = True
        try:
            per_sample = fallback_per_sample_grads(
                layer.module, layer.path, layer.params, args, kwargs, in_axes, out_grads, out_axes, self._batch_size,
                buffers=buffers_before,
            )
        finally:
            self._paused = False
        with torch.no_grad():
            if self._materializes(layer):
                self._add_per_sample_grads(layer, per_sample)
            else:
                sq_norms = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in per_sample.values())
                self._sq_norm_parts.append(sq_norms)
                if self._verify:
                    self._add_grad_sums(layer, {name: g.sum(0) for name, g in per_sample.items()}, sq_norms)
        layer.covered = True

    @staticmethod
    def _attention_masks(layer: _Layer, args: tuple[Any, ...], kwargs: dict[str, Any], leaves: list[Any], axes: list[int | None]) -> tuple[Any, Any, bool] | None:
        """For a call of nn.MultiheadAttention the batched rule covers (``rules_attention.supports``, q, k and v per
        sample): its masks, the padding mask batch first; ``None`` for any other call (the fallback's)."""
        if None in axes[:3] or MIXED in axes[:3] or not rules_attention.supports(layer.module, args, kwargs):
            return None
        padding, attn_mask, is_causal = rules_attention.masks(args, kwargs)
        axis_of = {id(leaf): axis for leaf, axis in zip(leaves, axes)}
        if padding is not None:
            if axis_of.get(id(padding)) not in (0, 1):  # one row per sample, on either axis
                return None
            padding = padding.movedim(axis_of[id(padding)], 0)
        if attn_mask is not None and axis_of.get(id(attn_mask)) is not None:  # one mask for all samples only
            return None
        return padding, attn_mask, is_causal

    def _attention_rule(
        self, layer: _Layer, inputs: tuple[Tensor, ...], axes: list[int], delta: Tensor, replay: rules_attention.Replay | None,
        call_masks: tuple[Any, Any, bool], need_weights: bool,
    ) -> None:
        """nn.MultiheadAttention by one batched recomputation (``rules_attention.py``; ``replay``: to draw its
        dropout mask again)."""
        materialize = self._materializes(layer)
        batch_first = tuple(t.movedim(axis, 0) for t, axis in zip(inputs, axes))
        sq_norms, per_sample, sums = rules_attention.attention_grads(
            layer.module, set(layer.params), batch_first, delta, self._strategy, materialize, self._verify and not materialize, replay,
            call_masks, need_weights,
        )
        with torch.no_grad():
            if materialize:
                self._add_per_sample_grads(layer, per_sample)
            else:
                self._sq_norm_parts.append(sq_norms)
                self._add_grad_sums(layer, sums, sq_norms)
        layer.covered = True

    def _add_per_sample_grads(self, layer: _Layer, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            pid = id(layer.params[name])
            previous = self._per_sample_grads.get(pid)
            self._per_sample_grads[pid] = g if previous is None else previous + g

    def _add_grad_sums(self, layer: _Layer, sums: dict[str, Tensor], sq_norms: Tensor) -> None:
        """Record Σ_i g_i per parameter, and Σ_i ‖g_i‖² of its layer (the scale rounding works on)."""
        spread = sq_norms.double().sum()
        for name, total in sums.items():
            pid = id(layer.params[name])
            previous = self._grad_sums.get(pid)
            self._grad_sums[pid] = total if previous is None else previous + total
            self._spreads[pid] = spread if pid not in self._spreads else self._spreads[pid] + spread

    def _record_parameter_grad(self, pid: int, grad: Tensor) -> None:
        if self._idle:
            return
        # the norm is taken here, while the gradient is hot in cache, and no reference to it is kept:
        # holding it would stop AccumulateGrad from moving it into .grad and force a copy of every
        # gradient (measured: +13 % of an MLP step when the norms were deferred to the end of backward)
        self._complete = False
        self._grad_counts[pid] += 1
        if self._measure_sum:  # hooks run with grad mode off unless backward(create_graph=True); only then is detach needed
            self._grad_sq_norms.append(_squared_norm(grad.detach() if torch.is_grad_enabled() else grad))
        if self._verify:
            self._actual_grads[pid] = grad.detach()

    # --- results ---------------------------------------------------------------------------------

    def _check_grad_sums(self) -> None:
        """Σ_i (per-sample gradients the hooks imply) must equal the gradient autograd produced, to a
        tolerance relative to ‖∇L‖ + (Σ_i ‖g_i‖²)^½ of the layer: near a minimum ∇L is small while the
        rounding of both sums scales with the per-sample gradients."""
        sums = dict(self._grad_sums)
        spreads = dict(self._spreads)
        for pid, g in self._per_sample_grads.items():
            sums[pid] = g.sum(0)
            spreads[pid] = g.double().square().sum()
        for pid, actual in self._actual_grads.items():
            implied = sums.get(pid)
            if implied is None:
                continue
            actual = (actual.to_dense() if actual.is_sparse else actual).double()
            norm = float(torch.linalg.vector_norm(actual))
            scale = norm + float(spreads[pid]) ** 0.5
            error = float(torch.linalg.vector_norm(implied.double().reshape(actual.shape) - actual))
            low = self._low_precision or actual.dtype in _HALF
            tolerance = 5e-2 if low else GRAD_SUM_TOLERANCE.get(self._parameters_dtype(pid), 1e-3)
            if error > tolerance * scale + 1e-30:
                name = self._parameter_names[pid]
                raise ValueError(
                    f"parameter '{name}' received a gradient that the per-sample hooks do not explain: the sum over "
                    f"samples of the per-sample gradients differs from the autograd gradient by {error / max(norm, 1e-300):.3g} "
                    f"of its norm (tolerance {tolerance:g} of the gradient's and per-sample gradients' scale). It is used outside its module's forward (e.g. x @ {name}.T "
                    f"or F.linear(x, {name})), or its layer mixes samples. Use it only through modules (tying it to an "
                    "nn.Linear / nn.Embedding weight is fine: shared parameters are handled), or move the code that "
                    "uses it into a small custom module so the torch.func fallback sees every use; check='off' skips "
                    "this check."
                )

    def _parameters_dtype(self, pid: int) -> torch.dtype:
        return next(p.dtype for p in self._parameters if id(p) == pid)

    def _check_complete(self) -> None:
        if self._complete:  # checked already for this measurement (sq_norms and grad_sum_sq_norm both ask)
            return
        passes = max(max(self._grad_counts.values(), default=1), self._backward_passes, 2 if self._extra_passes else 1)
        if passes > 1:
            raise RuntimeError(
                f"{passes} backward passes reached the parameters during one measurement; a measurement covers "
                "exactly one backward pass (start a new one per micro-batch; a torch.autograd.grad call before "
                "loss.backward(), as in a gradient penalty, is a pass too)"
            )
        if not self._grad_counts:
            if self._reading and not self._backward_passes:  # no hook ran, yet .grad (empty before) was filled
                reached = [self._parameter_names[id(p)] for p in self._parameters if p.grad is not None]
                if reached:
                    self._refuse_uncovered(reached)
            raise RuntimeError(
                "no gradient reached the model's trainable parameters while the hooks were attached; "
                "run the forward pass and the backward pass inside the measurement"
                + (
                    " (this engine reads the gradient from .grad, which loss.backward() fills and "
                    "torch.autograd.grad does not: use gradient_diversity / per_sample_sq_norms for the latter)"
                    if self._reading and self._backward_passes else ""
                )
            )
        covered = {pid for layer in self._layers if layer.covered for pid in layer.param_ids}
        unreached = [self._parameter_names[id(p)] for layer in self._layers if layer.covered and layer.rule is not None
                     for p in layer.params.values() if id(p) not in self._grad_counts and p.requires_grad]
        if unreached:
            raise ValueError(
                f"parameters {unreached} belong to layers whose per-sample gradients were measured, but the backward "
                "pass gave them no gradient (backward(inputs=...) restricted to other tensors?), so the gradient "
                "diversity would mix different parameter sets; back-propagate to every trainable parameter, or freeze "
                "the others (requires_grad=False) before building the meter"
            )
        missing = [self._parameter_names[pid] for pid in self._grad_counts if pid not in covered]
        if missing:
            self._refuse_uncovered(missing)
        if self._verify and not self._verified:
            self._check_grad_sums()
            self._verified = True
            self._actual_grads, self._grad_sums, self._spreads = {}, {}, {}
            if self._root is not None and self._root.layout is not None and self._check == "first_call":
                self._root.layout.grads_verified = True
        self._complete = True

    def _refuse_uncovered(self, missing: list[str]) -> None:
        """Raise for parameters that received gradients without their module's hooks seeing a use."""
        silent = [layer.name for layer in self._layers if layer.calls and not layer.covered]
        raise ValueError(
            f"parameters {missing} received gradients, but no per-sample rule saw their module run: they are used "
            "outside their own module's forward (for example F.linear(x, layer.weight), or an nn.ParameterList / "
            "nn.ParameterDict, which is never called, used by its parent's forward); call the module instead, or "
            "keep the parameters in a small custom module that uses them in its own forward (as direct attributes), "
            "so the torch.func fallback handles them"
            + (
                f". Layer(s) {', '.join(silent)} ran in the forward pass but their output gradient never reached the hook: an "
                "in-place operation on an output that is a view of another tensor (x.relu_() or x += ... after a "
                "reshape) re-bases it and drops its hooks; use the out-of-place form there"
                if silent else ""
            )
        )

    def sq_norms(self) -> Tensor:
        """Per-sample squared gradient norms, shape ``[B]``, in the scale of the back-propagated loss."""
        self._check_complete()
        seen = (len(self._sq_norm_parts), len(self._factor_parts), len(self._per_sample_grads))
        if self._sq_norms_cache is None or self._sq_norms_cache[0] != seen:  # read twice per step (sq_norms and result)
            self._sq_norms_cache = seen, self._sum_over_layers()
        return self._sq_norms_cache[1]

    def _sum_over_layers(self) -> Tensor:
        """Σ over layers of the per-sample squared norms recorded in this measurement, shape ``[B]``."""
        matrix = self._factor_matrix()
        if matrix is not None and len(self._factor_parts) == len(self._sq_norm_parts) and not self._per_sample_grads:
            return matrix.sum(0)  # every layer gave factors (an MLP): its rows, in hook order, are already stacked
        rows = self._combined_factor_rows(matrix)
        # every layer in the order its hook ran, as on a first (checked) call: the same float sum
        parts = [rows[part] if isinstance(part, int) else part for part in self._sq_norm_parts]
        parts += [g.reshape(g.shape[0], -1).square().sum(1) for g in self._per_sample_grads.values()]
        if len(parts) == 1:
            return parts[0]
        if all(part.dtype == parts[0].dtype for part in parts):
            return torch.stack(parts).sum(0)  # one reduction for all layers
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def _combined_factor_rows(self, matrix: Tensor | None) -> list[Tensor]:
        """(u_l² + c_l) v_l² for the layers whose rule gave factors (``LayerRule.sq_norm_factors``), one
        row per layer: the rows of ``_factor_matrix()``, or four operations per layer where it has none."""
        if matrix is not None:
            return list(matrix.unbind(0))
        return [u.square().add_(c).mul_(v.square()) for u, v, c in self._factor_parts]

    def _factor_matrix(self) -> Tensor | None:
        """The rows (u_l² + c_l) v_l² of all layers whose rule gave factors, stacked ``[layers, B]`` in a
        handful of operations for all of them together instead of four per layer (``None`` for fewer than
        two such layers, or factors of different dtypes, devices or batch sizes)."""
        factors = self._factor_parts
        if len(factors) < 2:
            return None
        first = factors[0][0]
        if any(u.dtype != first.dtype or u.device != first.device or u.shape != first.shape for u, _, _ in factors):
            return None
        u = torch.stack([f[0] for f in factors]).square_()
        constants = tuple(f[2] for f in factors)
        if any(constants):
            key = (constants, u.dtype, u.device)
            column = self._constant_columns.get(key)
            if column is None:
                column = self._constant_columns[key] = torch.tensor(constants, dtype=u.dtype, device=u.device).unsqueeze(1)
            u.add_(column)
        return u.mul_(torch.stack([f[1] for f in factors]).square_())

    def grad_sum_sq_norm(self) -> Tensor:
        """Squared norm of the gradient this backward pass produced (a 0-d float64 tensor)."""
        if not self._measure_sum:
            raise RuntimeError("this engine was built with measure_sum=False: it records per-sample norms only")
        self._check_complete()
        parts = self._grad_sq_norms
        if len(parts) == 1:
            return parts[0].double()
        if all(part.dtype == parts[0].dtype for part in parts):
            return torch.stack(parts).sum(dtype=torch.float64)
        return torch.stack([part.double() for part in parts]).sum()
