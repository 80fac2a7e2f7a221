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
runs the model twice under ``no_grad`` in eval mode, on the batch and on the batch rolled by one
sample, and for every tensor a hooked layer sees it keeps, per axis :math:`j` of size :math:`B`, the
fingerprint :math:`f_j(a) = (\\sum_{\\neg j} |a|,\\ \\sum_{\\neg j} a^2) \\in \\mathbb R^{2\\times B}`
(sums over all the other axes). Axis :math:`k` is the batch axis when :math:`f_k` rolls with the
samples and every other size-:math:`B` fingerprint is unchanged (sums over :math:`k` do not see the
permutation). A tensor whose fingerprints are all unchanged does not depend on the sample (shared);
one that changes in any other way mixes samples. Cost: two forward passes without autograd, once
per model and input signature (shapes after the batch axis, dtypes, devices, train/eval), cached
in :data:`_LAYOUTS`; every later call only looks its layout up.

Why not the alternatives: a declared layout (``batch_dim=``) is only as right as the declaration,
and a first-call comparison of a few samples against ``torch.func`` needs the loss, which the
:class:`~gradiv_lib.norms.DiversityMeter` never sees. The probe can be fooled only by a tensor whose
fingerprints are symmetric along two size-:math:`B` axes at once (e.g. identical samples) and by
forward passes that draw fresh random numbers in eval mode (both runs reuse one RNG state, so
noise that is not tied to a sample makes the probe report sample mixing — loud, not silent).
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
    (shared, not per sample) or :data:`MIXED`. ``grads_verified`` is set once the gradient-sum check
    (``engine.py``) has passed for this signature.
    """

    axes: dict[tuple[str, int], tuple[tuple[int | None, ...], tuple[int | None, ...]]] = field(default_factory=dict)
    grads_verified: bool = False


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


def resolve(first: Fingerprint, rolled: Fingerprint) -> int | None:
    """The batch axis of one tensor from its fingerprints on the batch and on the rolled batch."""
    if first is None or rolled is None:
        return None
    floor = float(first[-1])
    axes = [axis for axis in first if axis >= 0]
    if not axes or set(axes) != {axis for axis in rolled if axis >= 0}:
        return None if not axes else MIXED
    unchanged = {axis: _close(first[axis], rolled[axis], floor) for axis in axes}
    for axis in axes:  # axis 0 first: a tensor constant across samples is read batch-first
        if _close(first[axis].roll(1, 1), rolled[axis], floor) and all(unchanged[j] for j in axes if j != axis):
            return axis
    return None if all(unchanged.values()) else MIXED


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


def rolled_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's inputs with every batch-first tensor rolled by one sample along axis 0."""
    leaves, spec = tree_flatten((args, kwargs))
    rolled = [leaf.roll(1, 0) if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch_size else leaf for leaf in leaves]
    return tree_unflatten(rolled, spec)


def cuda_devices(args: Sequence[Any]) -> list[int]:
    """CUDA device indices among the tensors of a call (for ``fork_rng``)."""
    leaves, _ = tree_flatten(args)
    return sorted({leaf.device.index or 0 for leaf in leaves if isinstance(leaf, Tensor) and leaf.device.type == "cuda"})


Run = dict[str, list[tuple[list[Fingerprint], list[Fingerprint]]]]
"""Fingerprints of one probe forward pass: per layer path, per call, (inputs, outputs)."""


def probe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int, set_run: Callable[[Run | None], None]) -> Layout:
    """Run ``model`` on the batch and on the batch rolled by one sample, under ``no_grad`` in eval mode
    with one RNG state for both runs, and resolve the batch axis of every tensor the hooked layers saw.

    ``set_run(run)`` hands the engine's forward hooks the dict to record fingerprints into (``None``
    when done). Modes, the RNG streams and the fused-attention switch are restored afterwards.

    Raises
    ------
    ValueError
        If a probe forward pass fails (the way out, ``check='off'``, is named).
    """
    rolled_args, rolled_kwargs = rolled_inputs(args, kwargs, batch_size)
    modes = [(m, m.training) for m in model.modules()]
    devices = cuda_devices((args, kwargs))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    runs: list[Run] = []
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused eval path skips the submodules' hooks
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            for call_args, call_kwargs in ((args, kwargs), (rolled_args, rolled_kwargs)):
                torch.set_rng_state(states[0])
                for d, state in zip(devices, states[1]):
                    torch.cuda.set_rng_state(state, d)
                run: Run = {}
                set_run(run)
                model(*call_args, **call_kwargs)
                runs.append(run)
    except Exception as error:
        raise ValueError(
            f"the batch-axis probe (two forward passes of {type(model).__qualname__} in eval mode without autograd, "
            f"on the batch and on the batch rolled by one sample) failed: {error}. Pass check='off' to skip it "
            "(batch axes are then read from shapes, and ambiguous shapes are refused)."
        ) from error
    finally:
        set_run(None)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes:
            m.training = mode
    layout = Layout()
    first, rolled = runs
    for path, calls in first.items():
        other = rolled.get(path, [])
        if len(other) != len(calls):  # control flow depends on the data: such calls stay unresolved
            continue
        for index, ((in1, out1), (in2, out2)) in enumerate(zip(calls, other)):
            if len(in1) == len(in2) and len(out1) == len(out2):
                layout.axes[(path, index)] = (
                    tuple(resolve(a, b) for a, b in zip(in1, in2)),
                    tuple(resolve(a, b) for a, b in zip(out1, out2)),
                )
    return layout
