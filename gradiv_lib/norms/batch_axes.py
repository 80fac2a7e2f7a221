"""Which axis of each layer's tensors holds the samples: a one-time permutation probe.

Derived in chapter 2 of the book (book/ch02_computing_fast).

A per-sample rule must know which axis of a layer's input and output gradient indexes the samples.
Shapes cannot tell: a batch-first model that runs ``nn.MultiheadAttention(batch_first=False)`` on a
``(T, B, E)`` tensor looks exactly like a batch-first layer when ``T == B``, and reading axis 0 as the
batch then gives norms that are wrong by several percent with no error.

The probe uses what defines the batch axis instead of its size. A model that treats samples
independently is *equivariant* to a permutation :math:`\\pi` of its input samples: every
intermediate tensor :math:`a` satisfies :math:`a(x_{\\pi}) = \\pi_k\\, a(x)` where :math:`\\pi_k`
permutes axis :math:`k`, the batch axis of :math:`a`, and leaves the other axes alone. So the engine
runs the model under ``no_grad`` in eval mode on the batch and on the batch rolled by one sample, and
for every tensor a hooked layer sees it keeps, per axis :math:`j` of size :math:`B`, the
fingerprint :math:`f_j(a) = (\\sum_{\\neg j} |a|,\\ \\sum_{\\neg j} a^2) \\in \\mathbb R^{2\\times B}`
(sums over all the other axes). Axis :math:`k` is the batch axis when :math:`f_k` rolls with the
samples and every other size-:math:`B` fingerprint is unchanged (sums over :math:`k` do not see the
permutation). A tensor whose fingerprints are all unchanged does not depend on the sample (shared);
one that changes in any other way mixes samples.

Equivariance is not independence: ``h - h.mean(0)``, a softmax over the batch axis or a roll along it
are equivariant to the roll and still mix samples. So a third run replaces one sample by another
(:func:`replaced_inputs`): in a model that treats samples independently only that sample's slice
changes, so every other sample's fingerprint along the batch axis, and every shared tensor, must stay
the same to rounding; otherwise the tensor is marked as mixing samples, and so is the model's own
output (:attr:`Layout.outputs`). Cost: three forward passes without autograd (five when some module is training), once
per model and input signature (shapes after the batch axis, dtypes, devices, every module's mode), cached
in :data:`_LAYOUTS`; every later call only looks its layout up.

Why not the alternatives: a declared layout (``batch_dim=``) is only as right as the declaration,
and a first-call comparison of a few samples against ``torch.func`` needs the loss, which the
:class:`~gradiv_lib.norms.DiversityMeter` never sees. The probe can be fooled only by a tensor whose
fingerprints are symmetric along two size-:math:`B` axes at once (e.g. identical samples) and by
forward passes that draw fresh random numbers in eval mode (all runs reuse one RNG state, so
noise that is not tied to a sample makes the probe report sample mixing — loud, not silent). Mixing
is not seen when every sample of the probed batch is the same, when the forward pass takes other
branches on the replaced batch, or when it happens after the model's output (in the loss).

The three runs are in eval mode, where dropout draws nothing: in training mode the rolled run would
give each sample the mask of another batch position and look like mixing. A module that mixes samples
only while training (a batch-centring layer of the user's, mixup inside the model) is the identity in
eval mode, so when some module of the model is training two more runs follow in the modules' own modes
(:func:`_training_pair`): the batch and the batch with one sample replaced, from one RNG state, so both
draw the same masks and every other sample's slice must stay the same. This pair only adds refusals: a
failing training-mode pass, or calls that take other branches in it, leave the eval-mode layout as it is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

MIXED = -1
"""Axis value of a tensor that changes under the sample permutation in a way no axis explains."""

Fingerprint = dict[int, Tensor] | None
"""Per size-B axis, the [2, B] float64 fingerprint of one tensor (``None`` for a non-tensor)."""


@dataclass
class Layout:
    """Batch axes of every hooked layer call for one model and input signature.

    ``axes[(path, call)] = (input axes, output axes)``, one entry per flattened leaf: an axis, ``None``
    (shared, not per sample) or :data:`MIXED`, in the order the layers first ran; ``outputs``: the same
    for the leaves of the model's own output; ``first_mixed``: where mixed samples are first seen,
    ``(layer path, "input" | "output", leaf index)`` (the path ``None`` for the model's output), or
    ``None``; ``mixed_in_training_only``: the eval-mode runs found no mixing, the training-mode pair did.
    ``grads_verified`` is set once the gradient-sum check (``engine.py``) has passed for this signature.
    """

    axes: dict[tuple[str, int], tuple[tuple[int | None, ...], tuple[int | None, ...]]] = field(default_factory=dict)
    outputs: tuple[int | None, ...] = ()
    first_mixed: tuple[str | None, str, int] | None = None
    mixed_in_training_only: bool = False
    grads_verified: bool = False

    def find_mixed(self) -> tuple[str | None, str, int] | None:
        """The first layer tensor (in forward order), else model output leaf, that mixes samples."""
        for (path, _), (inputs, outputs) in self.axes.items():
            for what, axes in (("input", inputs), ("output", outputs)):
                if MIXED in axes:
                    return path, what, axes.index(MIXED)
        return (None, "output", self.outputs.index(MIXED)) if MIXED in self.outputs else None


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Layout]] = weakref.WeakKeyDictionary()
"""Probed layouts per model (dropped with the model) and input signature."""


def _noise_floor(dtype: torch.dtype) -> float:
    """Relative difference between two runs that counts as rounding, by the tensor's precision."""
    if dtype == torch.float64:
        return 1e-10
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    return 1e-5


def fingerprint(tensor: Any, batch_size: int) -> Fingerprint:
    """:math:`f_j` for every axis :math:`j` of size ``batch_size`` (see the module docstring)."""
    if not isinstance(tensor, Tensor) or tensor.dim() == 0 or tensor.is_sparse:
        return None
    value = tensor.detach().double()
    absolute, square = value.abs(), value.square()
    prints = {}
    for axis, size in enumerate(tensor.shape):
        if size == batch_size:
            others = [d for d in range(tensor.dim()) if d != axis]
            prints[axis] = torch.stack([absolute.sum(others), square.sum(others)]) if others else torch.stack([absolute, square])
    prints[-1] = torch.tensor(_noise_floor(tensor.dtype))  # the floor travels with the fingerprint
    return prints


def _close(a: Tensor, b: Tensor, floor: float) -> bool:
    """Equal up to rounding: within 1 % of the spread across samples, or within the noise floor."""
    difference = float((a - b).abs().max())
    spread = float((a - a.mean(1, keepdim=True)).abs().max())
    return difference <= max(0.01 * spread, floor * float(a.abs().max()) + 1e-300)


def _same(a: Tensor, b: Tensor, floor: float) -> bool:
    """Equal up to rounding only (the independence check: no allowance for a share of the spread)."""
    return float((a - b).abs().max()) <= floor * float(a.abs().max()) + 1e-300


def _finite(*prints: Fingerprint) -> bool:
    """Whether fingerprints can be compared (non-finite activations, e.g. from a NaN input, cannot: such
    calls stay unresolved, and the engine's checks of the loss and the gradients report them)."""
    return all(p is None or all(bool(torch.isfinite(v).all()) for v in p.values()) for p in prints)


def resolve(first: Fingerprint, rolled: Fingerprint, replaced: Fingerprint = None) -> int | None:
    """The batch axis of one tensor from its fingerprints on the batch, on the rolled batch and (when
    given) on the batch with sample 0 replaced: :data:`MIXED` if the replacement changes another
    sample's slice or a tensor that the roll showed to be shared."""
    if first is None or rolled is None:
        return None
    floor = float(first[-1])
    axes = [axis for axis in first if axis >= 0]
    if not axes or set(axes) != {axis for axis in rolled if axis >= 0}:
        return None if not axes else MIXED
    unchanged = {axis: _close(first[axis], rolled[axis], floor) for axis in axes}
    found: int | None = MIXED
    for axis in axes:  # axis 0 first: a tensor constant across samples is read batch-first
        if _close(first[axis].roll(1, 1), rolled[axis], floor) and all(unchanged[j] for j in axes if j != axis):
            found = axis
            break
    else:
        if all(unchanged.values()):
            found = None
    if replaced is None or found == MIXED:
        return found
    if set(axes) != {axis for axis in replaced if axis >= 0}:
        return MIXED
    if found is None:  # shared: no sample may change it
        return None if all(_same(first[axis], replaced[axis], floor) for axis in axes) else MIXED
    return found if _same(first[found][:, 1:], replaced[found][:, 1:], floor) else MIXED


def signature(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """What a layout depends on: the inputs' shapes after the batch axis, dtypes, devices, and modes."""
    leaves, spec = tree_flatten((args, kwargs))
    parts: list[Hashable] = [str(spec), model.training, torch.is_autocast_enabled("cpu")]
    if torch.cuda.is_available():
        parts.append(torch.is_autocast_enabled("cuda"))
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            parts.append((tuple(leaf.shape[1:]), leaf.dtype, leaf.device))
        elif isinstance(leaf, (int, float, str, bool, type(None))):
            parts.append(leaf)
        else:
            parts.append(type(leaf).__qualname__)
    return tuple(parts)


def _batch_first(leaf: Any, batch_size: int) -> bool:
    """Whether an input leaf is a tensor with the samples on axis 0 (the ones the probe changes)."""
    return isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch_size


def rolled_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's inputs with every batch-first tensor rolled by one sample along axis 0."""
    leaves, spec = tree_flatten((args, kwargs))
    rolled = [leaf.roll(1, 0) if _batch_first(leaf, batch_size) else leaf for leaf in leaves]
    return tree_unflatten(rolled, spec)


def replaced_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call's inputs with sample 0 of every batch-first tensor replaced by the first sample that
    differs from it in some input (``None`` when every sample is the same)."""
    leaves, spec = tree_flatten((args, kwargs))
    batched = [i for i, leaf in enumerate(leaves) if _batch_first(leaf, batch_size)]
    source = next((j for j in range(1, batch_size) if any(not torch.equal(leaves[i][0], leaves[i][j]) for i in batched)), None)
    if source is None:
        return None
    replaced = list(leaves)
    for i in batched:
        replaced[i] = leaves[i].clone()
        replaced[i][0] = leaves[i][source]
    return tree_unflatten(replaced, spec)


def cuda_devices(args: Sequence[Any]) -> list[int]:
    """CUDA device indices among the tensors of a call (for ``fork_rng``)."""
    leaves, _ = tree_flatten(args)
    return sorted({leaf.device.index or 0 for leaf in leaves if isinstance(leaf, Tensor) and leaf.device.type == "cuda"})


class _ModelState:
    """What a forward pass may change besides its output, saved before the probe's passes and put back after
    them: every buffer (in place, and the module's entry if the pass replaced it) and the weights of
    embeddings with ``max_norm`` (renormalised in place by the lookup). Other parameters changed in place
    cannot be put back: :func:`probe` refuses them."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [(m, name, b, b._version, b.detach().clone())
                        for m in model.modules() for name, b in m._buffers.items() if b is not None]
        self.weights = [(m.weight, m.weight._version, m.weight.detach().clone()) for m in model.modules()
                        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
        restored = {id(w) for w, _, _ in self.weights}
        self.versions = [(name, p, p._version) for name, p in model.named_parameters() if id(p) not in restored]

    def restore(self) -> None:
        """Put back what changed, and only that: a tensor autograd saved (BatchNorm's running statistics in
        eval mode) must keep its version."""
        with torch.no_grad():
            for module, name, buffer, version, value in self.buffers:
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                if buffer._version != version:
                    buffer.copy_(value)
            for weight, version, value in self.weights:
                if weight._version != version:
                    weight.copy_(value)

    def changed_parameters(self) -> list[str]:
        """Parameters the forward passes changed in place since the state was saved."""
        return [name for name, p, version in self.versions if p._version != version]


Run = dict[str, list[tuple[list[Fingerprint], list[Fingerprint]]]]
"""Fingerprints of one probe forward pass: per layer path, per call, (inputs, outputs)."""


def probe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int, set_run: Callable[[Run | None], None]) -> Layout:
    """Run ``model`` on the batch, on the batch rolled by one sample and on the batch with one sample
    replaced, under ``no_grad`` in eval mode with one RNG state for all runs, and resolve the batch axis
    of every tensor the hooked layers saw and of the model's output; when some module is training, check
    with a training-mode pair that its samples stay independent there too (:func:`_training_pair`).

    ``set_run(run)`` hands the engine's forward hooks the dict to record fingerprints into (``None``
    when done). Modes, the RNG streams, the fused-attention switch and the buffers (``_ModelState``) are
    restored afterwards.

    Raises
    ------
    ValueError
        If a probe forward pass fails, or changes a parameter in place (the way out, ``check='off'``, is named).
    """
    rolled_args, rolled_kwargs = rolled_inputs(args, kwargs, batch_size)
    calls = [(args, kwargs), (rolled_args, rolled_kwargs)]
    replaced = replaced_inputs(args, kwargs, batch_size)
    if replaced is not None:
        calls.append(replaced)
    modes = [(m, m.training) for m in model.modules()]
    state = _ModelState(model)  # forward passes may update buffers (a step counter, an EMA, a queue of features)
    devices = cuda_devices((args, kwargs))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    runs: list[Run] = []
    outputs: list[list[Fingerprint]] = []
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused eval path skips the submodules' hooks
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            rng = _rng_states(devices)
            for call in calls:
                run, output = _run_from(rng, model, call, set_run, batch_size)
                runs.append(run)
                outputs.append(output)
    except Exception as error:
        raise ValueError(
            f"the batch-axis probe (forward passes of {type(model).__qualname__} in eval mode without autograd, "
            f"on the batch, on the batch rolled by one sample and with one sample replaced) failed: {error}. Pass check='off' to skip it "
            "(batch axes are then read from shapes, and ambiguous shapes are refused)."
        ) from error
    else:
        training_runs = _training_pair(model, calls[0], replaced, modes, state, devices, set_run, batch_size)
    finally:
        set_run(None)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes:
            m.training = mode
        state.restore()
    changed = state.changed_parameters()
    if changed:  # each probe pass saw other weights, so its comparisons mean nothing (and the change stays)
        raise ValueError(
            f"the model's forward pass changes parameters {changed} in place, so the batch-axis probe's extra forward "
            "passes (on the batch, rolled and with one sample replaced) changed them again, which cannot be undone. "
            "Pass check='off' to skip the probe (the forward pass then runs once per step), or move the update out "
            "of forward"
        )
    layout = Layout()
    first, rolled = runs[0], runs[1]
    third = runs[2] if len(runs) > 2 else None
    for path, calls_seen in first.items():
        other = rolled.get(path, [])
        if len(other) != len(calls_seen):  # control flow depends on the data: such calls stay unresolved
            continue
        replaced_calls = third.get(path, []) if third is not None else []
        for index, ((in1, out1), (in2, out2)) in enumerate(zip(calls_seen, other)):
            if len(in1) == len(in2) and len(out1) == len(out2):
                in3, out3 = replaced_calls[index] if len(replaced_calls) == len(calls_seen) else ((), ())
                if len(in3) != len(in1) or len(out3) != len(out1):  # no replaced run, or other branches in it
                    in3, out3 = [None] * len(in1), [None] * len(out1)
                if not _finite(*in1, *out1, *in2, *out2, *in3, *out3):
                    continue
                layout.axes[(path, index)] = (
                    tuple(resolve(a, b, c) for a, b, c in zip(in1, in2, in3)),
                    tuple(resolve(a, b, c) for a, b, c in zip(out1, out2, out3)),
                )
    if len(outputs[0]) == len(outputs[1]):
        replaced_outputs = outputs[2] if len(outputs) > 2 and len(outputs[2]) == len(outputs[0]) else [None] * len(outputs[0])
        layout.outputs = tuple(
            resolve(a, b, c) if _finite(a, b, c) else None for a, b, c in zip(outputs[0], outputs[1], replaced_outputs)
        )
    layout.first_mixed = layout.find_mixed()
    if training_runs is not None and layout.first_mixed is None:
        _mark_mixed_in_training(layout, *training_runs)
    return layout


_RngStates = tuple[Tensor, list[tuple[int, Tensor]]]


def _rng_states(devices: list[int]) -> _RngStates:
    """The CPU generator's state and those of the given CUDA devices."""
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def _run_from(rng: _RngStates, model: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]],
              set_run: Callable[[Run | None], None], batch_size: int) -> tuple[Run, list[Fingerprint]]:
    """One probe pass from the generator states ``rng``: the layers' fingerprints and the output's."""
    torch.set_rng_state(rng[0])
    for device, device_state in rng[1]:
        torch.cuda.set_rng_state(device_state, device)
    run: Run = {}
    set_run(run)
    output = model(*call[0], **call[1])
    return run, [fingerprint(leaf, batch_size) for leaf in tree_flatten(output)[0]]


def _training_pair(
    model: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]], replaced: tuple[tuple[Any, ...], dict[str, Any]] | None,
    modes: list[tuple[nn.Module, bool]], state: _ModelState, devices: list[int], set_run: Callable[[Run | None], None],
    batch_size: int,
) -> tuple[list[Run], list[list[Fingerprint]]] | None:
    """The batch and the batch with one sample replaced, run in the modules' own modes when some module is
    training (``None`` otherwise, or when a pass fails: this check only adds refusals). The eval-mode runs
    cannot see a module that mixes samples only while training (a batch-centring layer of the user's, mixup
    inside the model), and a rolled run in training mode would mistake a dropout mask, which is tied to batch
    positions, for mixing; the replaced run with the same RNG state draws the same masks, so every other
    sample's slice must stay the same. Both passes start from the same state, on copies of the buffers."""
    if replaced is None or not any(mode for _, mode in modes):
        return None
    runs: list[Run] = []
    outputs: list[list[Fingerprint]] = []
    # training-mode passes may update buffers in place (a step counter, running averages) that the measured
    # forward's autograd graph saved: each pass works on fresh copies, and the buffers themselves stay untouched
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            rng = _rng_states(devices)
            for one in (call, replaced):
                state.restore()
                for m, name, b in buffers:
                    m._buffers[name] = b.clone()
                run, output = _run_from(rng, model, one, set_run, batch_size)
                runs.append(run)
                outputs.append(output)
    except Exception:
        return None
    finally:
        for m, name, b in buffers:
            m._buffers[name] = b
        set_run(None)
        model.eval()
    return runs, outputs


def _independent(first: Fingerprint, replaced: Fingerprint, axis: int | None) -> bool:
    """Whether replacing sample 0 left every other sample's slice along ``axis`` (every slice of a shared
    tensor, ``axis`` None) the same to rounding."""
    if first is None or replaced is None or set(first) != set(replaced) or not _finite(first, replaced):
        return True  # nothing comparable (the eval-mode layout stands)
    floor = float(first[-1])
    if axis is None:
        return all(_same(first[a], replaced[a], floor) for a in first if a >= 0)
    return axis not in first or _same(first[axis][:, 1:], replaced[axis][:, 1:], floor)


def _mark_mixed_in_training(layout: Layout, runs: list[Run], outputs: list[list[Fingerprint]]) -> None:
    """Mark as :data:`MIXED` every tensor whose samples the training-mode pair (:func:`_training_pair`) shows
    to depend on another sample, along the axis the eval-mode runs found."""
    first, replaced = runs
    for (path, index), (in_axes, out_axes) in list(layout.axes.items()):
        calls, other = first.get(path, []), replaced.get(path, [])
        if len(calls) != len(other) or index >= len(calls):  # other branches in training mode: not comparable
            continue
        (in1, out1), (in2, out2) = calls[index], other[index]
        if len(in1) != len(in_axes) or len(in2) != len(in_axes) or len(out1) != len(out_axes) or len(out2) != len(out_axes):
            continue
        layout.axes[(path, index)] = (
            tuple(axis if axis == MIXED or _independent(a, b, axis) else MIXED for a, b, axis in zip(in1, in2, in_axes)),
            tuple(axis if axis == MIXED or _independent(a, b, axis) else MIXED for a, b, axis in zip(out1, out2, out_axes)),
        )
    if len(outputs[0]) == len(outputs[1]) == len(layout.outputs):
        layout.outputs = tuple(
            axis if axis == MIXED or _independent(a, b, axis) else MIXED for a, b, axis in zip(outputs[0], outputs[1], layout.outputs)
        )
    layout.first_mixed = layout.find_mixed()
    layout.mixed_in_training_only = layout.first_mixed is not None
