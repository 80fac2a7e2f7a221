"""Models with width and depth knobs, families at a fixed parameter budget, and a CIFAR ResNet-18.

Chapters that use it:

* ch. 1, 2, 4, 5–8 — :func:`mlp` and :func:`cnn` as the small models of the experiments;
* ch. 3 (width vs large-batch training, Chen et al., NeurIPS 2018) — :func:`deep_linear`,
  :func:`width_for_budget` and :func:`fixed_budget_family`, which trade width for depth at an
  (almost) equal number of parameters;
* ch. 4 (DiveBatch) — :func:`resnet18_cifar`, the network of the CIFAR and Tiny-ImageNet runs, and
  :func:`cnn1d`, the network of the MNIST-1D comparison.

Every model is built from layers the per-sample norm engine supports (``Linear``, ``Conv2d``,
``GroupNorm``, ``BatchNorm2d`` in eval mode) plus parameter-free layers, and activations are never
in-place, so hooks see clean tensors. Conventions: ``depth`` counts the weight layers (``Linear``
or ``Conv2d`` in the trunk), so ``depth=2`` is one hidden layer; ``width`` is the number of hidden
units or channels of every hidden layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "FamilyMember",
    "ResNetCIFAR",
    "cnn",
    "cnn1d",
    "count_parameters",
    "deep_linear",
    "fixed_budget_family",
    "mlp",
    "parameters_for_width",
    "resnet18_cifar",
    "width_for_budget",
]

#: Activation names accepted by :func:`mlp` and :func:`cnn`.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}
_INITS = ("default", "lecun", "he")
_CNN_NORMS = ("group", "batch", "none")
_RESNET_NORMS = ("batch", "group")
_KINDS = ("mlp", "deep_linear", "cnn")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_int(value: Any, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Build under ``torch.manual_seed(seed)`` without touching the caller's CPU RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _group_count(channels: int) -> int:
    """Groups for ``GroupNorm``: the largest divisor of ``channels`` that is at most 32."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(_group_count(channels), channels)


def _initialize(linears: list[nn.Linear], init: str) -> None:
    r"""``"lecun"``: :math:`W_{ij}\sim\mathcal N(0, 1/\text{fan\_in})`; ``"he"``:
    :math:`\mathcal N(0, 2/\text{fan\_in})`; biases zero. ``"default"`` keeps PyTorch's
    :math:`U(\pm 1/\sqrt{\text{fan\_in}})`."""
    if init == "default":
        return
    gain = 1.0 if init == "lecun" else 2.0
    with torch.no_grad():
        for layer in linears:
            layer.weight.normal_(0.0, math.sqrt(gain / layer.in_features))
            if layer.bias is not None:
                layer.bias.zero_()


# --------------------------------------------------------------------------------------------
# Fully connected and convolutional networks
# --------------------------------------------------------------------------------------------


def _fully_connected(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    activation: str | None,
    bias: bool,
    init: str,
    seed: int | None,
) -> nn.Sequential:
    _check_int(in_features, "in_features")
    _check_int(width, "width")
    _check_int(depth, "depth")
    _check_int(out_features, "out_features")
    _check_choice(init, "init", _INITS)
    if activation is not None:
        _check_choice(activation, "activation", tuple(ACTIVATIONS))
    sizes = [in_features] + [width] * (depth - 1) + [out_features]
    with _seeded(seed):
        layers: list[nn.Module] = [nn.Flatten()]
        linears = []
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            linears.append(nn.Linear(fan_in, fan_out, bias=bias))
            layers.append(linears[-1])
            if activation is not None and i < depth - 1:
                layers.append(ACTIVATIONS[activation]())
        _initialize(linears, init)
    return nn.Sequential(*layers)


def mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    activation: str = "relu",
    bias: bool = True,
    init: str = "default",
    seed: int | None = None,
) -> nn.Sequential:
    """Fully connected network ``in_features → width → … → width → out_features``.

    ``depth`` is the number of ``Linear`` layers (``depth=1`` is a linear model, ``depth=2`` has
    one hidden layer); the activation follows every layer but the last. Inputs are flattened
    first, so images ``(N, C, H, W)`` work with ``in_features = C·H·W``.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATIONS` (``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``gelu``,
        ``silu``, ``elu``).
    init : str
        ``"default"`` (PyTorch), ``"lecun"`` (:math:`\\mathcal N(0, 1/\\text{fan\\_in})`) or
        ``"he"`` (:math:`\\mathcal N(0, 2/\\text{fan\\_in})`), biases zero for the latter two.
    seed : int, optional
        Seed of the initialisation; the caller's global RNG state is left as it was.
    """
    return _fully_connected(in_features, width, depth, out_features, activation, bias, init, seed)


def deep_linear(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    bias: bool = False,
    init: str = "lecun",
    seed: int | None = None,
) -> nn.Sequential:
    r"""Deep linear network :math:`f(x) = W_L\cdots W_2 W_1 x` (no activations).

    The model class of the width theory (Chen et al. 2018): the function is linear but the
    optimisation is not. Defaults follow the chapter's experiment: no biases,
    :math:`(W_l)_{ij}\sim\mathcal N(0, 1/\text{fan\_in})`. ``depth`` counts the matrices.
    """
    return _fully_connected(in_features, width, depth, out_features, None, bias, init, seed)


def cnn(
    in_channels: int,
    width: int,
    depth: int,
    num_classes: int,
    image_size: int,
    norm: str = "group",
    activation: str = "relu",
    seed: int | None = None,
) -> nn.Sequential:
    """Plain convolutional network: ``depth`` 3×3 conv blocks of ``width`` channels, global
    average pooling and a linear classifier.

    Each block is ``Conv2d(3×3, padding 1) → norm → activation``. The spatial size is halved
    (stride 2) :math:`m = \\min(\\text{depth}-1, \\lfloor\\log_2(\\text{image\\_size}/4)\\rfloor)`
    times, at blocks spread evenly over the depth (never the first), so the last feature map is
    about 4×4 (8×8 digits: one halving; 32×32 CIFAR: three).

    Parameters
    ----------
    norm : str
        ``"group"`` (GroupNorm with the largest divisor of ``width`` up to 32 groups; works with
        per-sample gradient norms in training mode), ``"batch"`` (BatchNorm2d; per-sample norms
        need eval mode) or ``"none"`` (convolutions then carry biases).
    image_size : int
        Side length of the (square) input images; sets the number of halvings.
    """
    _check_int(in_channels, "in_channels")
    _check_int(width, "width")
    _check_int(depth, "depth")
    _check_int(num_classes, "num_classes")
    _check_int(image_size, "image_size")
    _check_choice(norm, "norm", _CNN_NORMS)
    _check_choice(activation, "activation", tuple(ACTIVATIONS))
    halvings = min(depth - 1, max(0, math.floor(math.log2(image_size / 4))))
    strided = {math.ceil((j + 1) * depth / (halvings + 1)) for j in range(halvings)}
    with _seeded(seed):
        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(depth):
            stride = 2 if block in strided else 1
            layers.append(nn.Conv2d(channels, width, 3, stride, 1, bias=norm == "none"))
            if norm != "none":
                layers.append(_norm2d(norm, width))
            layers.append(ACTIVATIONS[activation]())
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def cnn1d(
    in_channels: int,
    width: int,
    depth: int,
    num_classes: int,
    length: int,
    kernel_size: int = 5,
    activation: str = "relu",
    seed: int | None = None,
) -> nn.Sequential:
    r"""Small 1-D convolutional network for sequences such as MNIST-1D (input ``(N, in_channels, length)``).

    ``depth`` blocks ``Conv1d(kernel_size, stride 2, padding kernel_size // 2) → activation`` of ``width``
    channels (with biases, no normalisation), each halving the length (rounding up), then ``Flatten`` and a
    linear classifier on the ``width × L_out`` features, :math:`L_{\text{out}} = \lceil \text{length} /
    2^{\text{depth}} \rceil`. Flattening keeps the position information that global pooling would discard
    (the MNIST-1D reference CNN of Greydanus, 2020, is of this kind: three stride-2 convolutions of 25
    channels). Every layer is supported by the per-sample norm engine.
    """
    _check_int(in_channels, "in_channels")
    _check_int(width, "width")
    _check_int(depth, "depth")
    _check_int(num_classes, "num_classes")
    _check_int(length, "length")
    _check_int(kernel_size, "kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (same padding on both sides), got {kernel_size}")
    _check_choice(activation, "activation", tuple(ACTIVATIONS))
    with _seeded(seed):
        layers: list[nn.Module] = []
        channels, size = in_channels, length
        for _ in range(depth):
            layers += [nn.Conv1d(channels, width, kernel_size, stride=2, padding=kernel_size // 2),
                       ACTIVATIONS[activation]()]
            channels, size = width, (size - 1) // 2 + 1
        layers += [nn.Flatten(), nn.Linear(width * size, num_classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Fixed-parameter-budget families
# --------------------------------------------------------------------------------------------


def parameters_for_width(
    kind: str,
    in_features: int,
    out_features: int,
    depth: int,
    width: int,
    bias: bool | None = None,
    norm: str = "group",
) -> int:
    r"""Exact parameter count of :func:`mlp`, :func:`deep_linear` or :func:`cnn`, without a model.

    With :math:`d` = ``in_features``, :math:`k` = ``out_features``, :math:`L` = ``depth`` ≥ 2 and
    :math:`w` = ``width``:

    .. math::
        P_{\text{mlp}}(w) = d w + (L-2) w^2 + w k + \beta\,[(L-1) w + k],\qquad
        P_{\text{cnn}}(w) = 9 d w + 9 (L-1) w^2 + 2 L w\,[\text{norm}] + L w\,[\text{no norm}]
        + w k + k,

    :math:`\beta = 1` with biases. For ``cnn``, :math:`d` is the number of input channels and
    :math:`k` the number of classes. ``bias=None`` takes the builder's default (``mlp``: True,
    ``deep_linear``: False).
    """
    _check_choice(kind, "kind", _KINDS)
    for value, name in ((in_features, "in_features"), (out_features, "out_features")):
        _check_int(value, name)
    _check_int(depth, "depth")
    _check_int(width, "width")
    d, k, L, w = in_features, out_features, depth, width
    if kind == "cnn":
        _check_choice(norm, "norm", _CNN_NORMS)
        per_channel = L * w if norm == "none" else 2 * L * w
        return 9 * d * w + 9 * (L - 1) * w * w + per_channel + w * k + k
    beta = int(kind == "mlp") if bias is None else int(bias)
    if L == 1:
        return d * k + beta * k
    return d * w + (L - 2) * w * w + w * k + beta * ((L - 1) * w + k)


def width_for_budget(
    kind: str,
    in_features: int,
    out_features: int,
    depth: int,
    budget: int,
    bias: bool | None = None,
    norm: str = "group",
) -> int:
    """The width whose parameter count (:func:`parameters_for_width`) is closest to ``budget``.

    :math:`P(w)` increases with :math:`w` (quadratically for ``depth`` ≥ 3), so a bisection
    finds the first width with :math:`P(w) \\ge` budget and the closer of it and its
    predecessor is returned.

    Raises
    ------
    ValueError
        If ``depth`` is 1 for ``mlp``/``deep_linear`` (there is no width to choose) or the budget
        is below the count at width 1.
    """
    _check_choice(kind, "kind", _KINDS)
    _check_int(depth, "depth")
    _check_int(budget, "budget")
    if depth == 1 and kind != "cnn":
        raise ValueError("depth=1 has no hidden layer, so no width meets a budget; use depth >= 2")

    def count(width: int) -> int:
        return parameters_for_width(kind, in_features, out_features, depth, width, bias, norm)

    if count(1) > budget:
        raise ValueError(
            f"budget={budget} is below the {count(1)} parameters of a {kind} of depth {depth} at "
            f"width 1; use budget >= {count(1)} or a smaller depth"
        )
    low, high = 1, 2
    while count(high) < budget:
        high *= 2
    while low < high:  # first width with count >= budget
        mid = (low + high) // 2
        if count(mid) >= budget:
            high = mid
        else:
            low = mid + 1
    if low > 1 and budget - count(low - 1) <= count(low) - budget:
        return low - 1
    return low


class FamilyMember(NamedTuple):
    """One network of a fixed-budget family; unpacks as ``(depth, width, model, n_params)``."""

    depth: int
    width: int
    model: nn.Module
    n_params: int


def fixed_budget_family(
    depths: Sequence[int],
    budget: int,
    in_features: int,
    out_features: int,
    kind: str = "mlp",
    tolerance: float = 0.05,
    seed: int | None = None,
    **model_kwargs: Any,
) -> list[FamilyMember]:
    """Networks of several depths, each as wide as the parameter budget allows.

    For each depth :math:`L`, :func:`width_for_budget` picks the width, and the model is built
    by ``kind`` (``"mlp"``, ``"deep_linear"`` or ``"cnn"``; for ``cnn`` pass ``image_size``).
    Deep members are narrow and shallow ones wide, at the same number of parameters — the
    comparison of Chen et al. (NeurIPS 2018), "wider networks are more amenable to large-batch
    training at a fixed number of parameters".

    Parameters
    ----------
    depths : sequence of int
        Depths to build (each ≥ 2 for ``mlp``/``deep_linear``).
    budget : int
        Target number of parameters.
    in_features, out_features : int
        Input size (channels for ``cnn``) and output size (classes).
    tolerance : float
        Largest allowed relative gap :math:`|P - \\text{budget}|/\\text{budget}`.
    seed : int, optional
        Seed of every member's initialisation.
    **model_kwargs
        Passed to the builder (``activation``, ``bias``, ``init``, ``norm``, ``image_size``).

    Raises
    ------
    ValueError
        If a member misses the budget by more than ``tolerance`` (too small a budget for that
        depth: width rounding dominates).
    """
    _check_choice(kind, "kind", _KINDS)
    if not depths:
        raise ValueError("depths must name at least one depth, got an empty sequence")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if kind == "cnn" and "image_size" not in model_kwargs:
        raise ValueError("kind='cnn' needs image_size=... (the side of the input images)")
    counting = {key: model_kwargs[key] for key in ("bias", "norm") if key in model_kwargs}
    builders = {"mlp": mlp, "deep_linear": deep_linear, "cnn": cnn}
    family = []
    for depth in depths:
        width = width_for_budget(kind, in_features, out_features, depth, budget, **counting)
        model = builders[kind](in_features, width, depth, out_features, seed=seed, **model_kwargs)
        n_params = count_parameters(model)
        if abs(n_params - budget) > tolerance * budget:
            raise ValueError(
                f"depth={depth}: the closest width ({width}) gives {n_params} parameters, more "
                f"than tolerance={tolerance} away from budget={budget}; raise the budget or drop "
                f"this depth"
            )
        family.append(FamilyMember(depth, width, model, n_params))
    return family


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-18
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with normalisation and a shortcut
    (1×1 convolution + normalisation when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.norm1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.norm2 = _norm2d(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), _norm2d(norm, planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet for small images: 3×3 stem without max-pooling, four stages of basic blocks with
    widths ``widths`` (strides 1, 2, 2, 2), global average pooling, linear classifier."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_channels: int,
        norm: str,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_norm = _norm2d(norm, widths[0])
        stages = []
        in_planes = widths[0]
        for stage, (blocks, planes) in enumerate(zip(blocks_per_stage, widths)):
            strides = [1 if stage == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(BasicBlock(in_planes, planes, stride, norm))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.stem_norm(self.stem(x)))
        out = self.pool(self.stages(out))
        return self.classifier(torch.flatten(out, 1))


def resnet18_cifar(
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    norm: str = "batch",
    in_channels: int = 3,
    seed: int | None = None,
) -> ResNetCIFAR:
    """The standard CIFAR ResNet-18 (kuangliu/pytorch-cifar, used by the DiveBatch code).

    3×3 stem with stride 1 and no max-pooling, four stages of two basic blocks with
    ``round(64·m)·(1, 2, 4, 8)`` channels (``m`` = ``width_multiplier``) and strides 1, 2, 2, 2,
    global average pooling, linear classifier. With ``m = 1`` and 10 classes it has
    11 173 962 parameters. Adaptive pooling lets it take 64×64 Tiny-ImageNet images too.

    Parameters
    ----------
    norm : str
        ``"batch"`` (BatchNorm, the standard) or ``"group"`` (GroupNorm, the largest divisor of
        the channels up to 32 groups). **Why it matters for gradient diversity:** in training
        mode BatchNorm normalises with the statistics of the mini-batch, so sample *i*'s output
        and loss depend on every other sample of the batch and a per-sample gradient
        :math:`\\nabla\\ell_i` is not defined. Per-sample norms therefore need BatchNorm in eval
        mode (running statistics; the DiveBatch code switches BN to eval for the measuring
        backward, an approximation) or GroupNorm, which normalises each sample on its own and
        gives exact per-sample gradients in training mode.
    seed : int, optional
        Seed of the initialisation; the caller's global RNG state is left as it was.
    """
    _check_int(num_classes, "num_classes")
    _check_int(in_channels, "in_channels")
    _check_choice(norm, "norm", _RESNET_NORMS)
    if not (isinstance(width_multiplier, (int, float)) and 0 < width_multiplier < math.inf):
        raise ValueError(f"width_multiplier must be a finite number > 0, got {width_multiplier}")
    base = round(64 * width_multiplier)
    if base < 1:
        raise ValueError(
            f"width_multiplier={width_multiplier} gives {64 * width_multiplier:.3g} < 1 channel "
            f"in the first stage; use width_multiplier >= {1 / 128}"
        )
    with _seeded(seed):
        return ResNetCIFAR(
            [2, 2, 2, 2], [base, 2 * base, 4 * base, 8 * base], num_classes, in_channels, norm
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once); with ``trainable_only`` only those
    with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
