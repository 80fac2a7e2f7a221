"""Continual learning and loss of plasticity: regularizers, plasticity metrics and a continual loop.

Derived in chapter 8 of the book (``book/ch08_plasticity``), after Lewandowski et al., *Learning
Continually by Spectral Regularization* (ICLR 2025, arXiv 2406.06811).

Regularizers share one interface: build one, :meth:`Regularizer.bind` it to the model (this records
the initial weights the init-anchored ones need), and add ``reg(model)`` (a scalar tensor) to the loss
in any training loop; :meth:`Regularizer.task_boundary` is called between tasks (only
:class:`ShrinkPerturb` acts there). With :math:`\\theta_0` the weights at :meth:`~Regularizer.bind`:

* :class:`L2`: :math:`\\lambda\\lVert\\theta\\rVert_2^2`;
* :class:`L2Init` (Kumar et al.): :math:`\\lambda\\lVert\\theta-\\theta_0\\rVert_2^2`;
* :class:`WassersteinInit`: :math:`\\lambda\\sum_l\\sum_i(\\theta_{l,(i)}-\\theta^0_{l,(i)})^2`, with
  :math:`\\theta_{l,(i)}` the :math:`i`-th smallest entry of tensor :math:`l`; this is :math:`n_l W_2^2`
  between the empirical distributions of the current and initial entries, so it is zero for any
  permutation of the initial weights;
* :class:`Spectral`: :math:`\\lambda\\sum_l[(\\sigma_{\\max}(W_l)^k-1)^2+\\lVert b_l\\rVert_2^{2k}]`, with
  :math:`\\sigma_{\\max}` from one power-iteration step per call on a persistent vector and the
  *differentiable* :math:`\\sigma=u^\\top W v` (:math:`u, v` detached, so
  :math:`\\partial\\sigma/\\partial W = uv^\\top`);
* :class:`ShrinkPerturb` (Ash & Adams): no penalty; at every task boundary
  :math:`\\theta\\leftarrow s\\,\\theta + p\\,\\mathrm{std}(\\theta_0)\\,\\varepsilon`,
  :math:`\\varepsilon\\sim\\mathcal N(0, I)`.

Metrics: :func:`task_accuracy`, :func:`plasticity` (accuracy reachable on a new task in a fixed budget
from the current weights), :func:`effective_rank`, :func:`dormant_fraction`, :func:`hidden_features`,
:func:`sigma_max` and the gradient diversity of :func:`gradiv_lib.diversity.gradient_diversity`.

:func:`train_continual` trains on a stream of tasks (:mod:`gradiv_lib.data`'s task streams, or any
list of ``(x, y)`` pairs / :class:`~gradiv_lib.data.InMemoryData`, see :func:`as_tasks`), records the
metrics at every task boundary, and checkpoints atomically after every task; a run started again with
the same arguments resumes and gives the same history.

Command line: ``python -m gradiv_lib.plasticity {random_labels,permuted,sensitivity}`` writes the
chapter's precomputed results (``gradiv_lib/_results/ch08/``).
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .results import save_checkpoint
from .data import InMemoryData, Task, label_permutation_tasks, permuted_tasks, random_label_tasks, class_incremental_tasks

__all__ = [
    "CHECKPOINT_FORMAT", "REGULARIZERS", "STREAMS", "ContinualHistory", "L2", "L2Init", "NoRegularizer", "Regularizer",
    "ShrinkPerturb", "Spectral", "WassersteinInit", "as_tasks", "dormant_fraction", "effective_rank", "fresh_init",
    "hidden_features",
    "compact_history", "make_regularizer", "make_tasks", "run_experiment", "plasticity", "power_iteration", "sigma_max", "task_accuracy", "train_continual",
]

#: Version of the checkpoint layout written by :func:`train_continual`.
CHECKPOINT_FORMAT = 1


def _check_number(value: Any, name: str, *, minimum: float = 0.0, strict: bool = False, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= minimum if strict else value < minimum) or value > maximum:
        lo = f"> {minimum}" if strict else f">= {minimum}"
        hi = "" if maximum == math.inf else f" and <= {maximum}"
        raise ValueError(f"{name} must be {lo}{hi}, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# Regularizers
# --------------------------------------------------------------------------------------------


class Regularizer:
    """Base class: a penalty ``reg(model) -> Tensor`` added to the loss, plus a task-boundary hook.

    Use ``reg = L2Init(1e-3).bind(model)`` before training, then ``loss = task_loss + reg(model)``.
    The state (initial weights, power-iteration vectors) is in :meth:`state_dict` for checkpoints.

    Parameters
    ----------
    strength : float
        :math:`\\lambda \\ge 0`, multiplies the penalty.
    """

    name = "base"

    def __init__(self, strength: float = 0.0) -> None:
        self.strength = _check_number(strength, "strength")
        self._names: list[str] | None = None
        self._shapes: list[tuple[int, ...]] = []

    # -- binding -----------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> Regularizer:
        """Record what the penalty needs from the model at its initial weights; returns ``self``."""
        _check_model(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters to regularize")
        self._names = [n for n, _ in named]
        self._shapes = [tuple(p.shape) for _, p in named]
        self._bind(named)
        return self

    def _bind(self, named: list[tuple[str, nn.Parameter]]) -> None:
        pass

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` was called."""
        return self._names is not None

    def _params(self, model: nn.Module) -> list[tuple[str, Tensor]]:
        _check_model(model)
        if self._names is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a model: call reg.bind(model) at the initial weights first")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if [n for n, _ in named] != self._names or [tuple(p.shape) for _, p in named] != self._shapes:
            raise ValueError(f"model's trainable parameters do not match the ones {type(self).__name__} was bound to; "
                             "bind the regularizer to this model")
        return named

    # -- interface ---------------------------------------------------------------------------
    def penalty(self, model: nn.Module) -> Tensor:
        """:math:`\\lambda\\,R(\\theta)` as a differentiable scalar tensor."""
        named = self._params(model)
        if self.strength == 0.0:
            return named[0][1].new_zeros(())
        return self.strength * self._raw(named)

    def _raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        return named[0][1].new_zeros(())

    def __call__(self, model: nn.Module) -> Tensor:
        return self.penalty(model)

    def task_boundary(self, model: nn.Module, task: int, generator: torch.Generator | None = None) -> None:
        """Called by :func:`train_continual` before task ``task`` (``task >= 1``); no-op by default."""

    def config(self) -> dict[str, Any]:
        """Name and hyperparameters (JSON-safe)."""
        return {"name": self.name, "strength": self.strength}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers to checkpoint (``torch.load(weights_only=True)`` safe)."""
        return {"config": self.config(), "names": list(self._names or []), "shapes": [list(s) for s in self._shapes],
                "tensors": self._state_tensors()}

    def _state_tensors(self) -> list[Tensor]:
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the configuration must match)."""
        if state["config"] != self.config():
            raise ValueError(f"checkpoint regularizer {state['config']} differs from {self.config()}")
        self._names = list(state["names"]) or None
        self._shapes = [tuple(s) for s in state["shapes"]]
        self._load_tensors(list(state["tensors"]))

    def _load_tensors(self, tensors: list[Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class NoRegularizer(Regularizer):
    """No penalty (the unregularised baseline)."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(0.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class L2(Regularizer):
    """:math:`\\lambda\\lVert\\theta\\rVert_2^2` over all trainable parameters (weight decay as a penalty)."""

    name = "l2"

    def _raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        return sum(p.square().sum() for _, p in named)


class _InitAnchored(Regularizer):
    def _bind(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self._init = [p.detach().clone() for _, p in named]

    def _state_tensors(self) -> list[Tensor]:
        return list(getattr(self, "_init", []))

    def _load_tensors(self, tensors: list[Tensor]) -> None:
        self._init = tensors

    def _to(self, ref: Tensor, i: int) -> Tensor:
        t = self._init[i]
        if t.device != ref.device or t.dtype != ref.dtype:
            t = self._init[i] = t.to(device=ref.device, dtype=ref.dtype)
        return t


class L2Init(_InitAnchored):
    """:math:`\\lambda\\lVert\\theta-\\theta_0\\rVert_2^2`, toward the weights at :meth:`bind` (Kumar et al.)."""

    name = "l2_init"

    def _raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        return sum((p - self._to(p, i)).square().sum() for i, (_, p) in enumerate(named))


class WassersteinInit(_InitAnchored):
    """:math:`\\lambda\\sum_l\\sum_i(\\theta_{l,(i)}-\\theta^0_{l,(i)})^2`: each tensor's sorted entries
    toward its sorted initial entries.

    For two samples of equal size :math:`n`, :math:`W_2^2` between their empirical distributions is the
    mean squared difference of their order statistics, so the penalty is :math:`\\sum_l n_l W_2^2` per
    tensor: it constrains the distribution of each tensor's weights, not which unit holds which value.
    It is zero at any permutation of the initial entries. Cost: one sort per tensor per call.
    """

    name = "wasserstein"

    def _bind(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self._init = [p.detach().flatten().sort().values for _, p in named]

    def _raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        return sum((p.flatten().sort().values - self._to(p, i)).square().sum() for i, (_, p) in enumerate(named))


def power_iteration(weight: Tensor, u: Tensor | None = None, steps: int = 1,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular value of ``weight`` by power iteration: ``(sigma, u, v)``.

    ``weight`` is viewed as ``(out, -1)`` (a convolution kernel becomes out × in·kh·kw). The
    ``steps`` iterations :math:`v\\leftarrow W^\\top u/\\lVert\\cdot\\rVert`,
    :math:`u\\leftarrow Wv/\\lVert\\cdot\\rVert` run without gradient from ``u`` (a random unit vector
    if ``None``); ``sigma = u^T W v`` is then computed **with** autograd, so
    :math:`\\partial\\sigma/\\partial W = uv^\\top` flows to ``weight``. ``u`` and ``v`` are returned
    detached.
    """
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise ValueError(f"weight must be a tensor with at least 2 dimensions, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    _check_int(steps, "steps", 1)
    W = weight.reshape(weight.shape[0], -1)
    if u is None:
        u = torch.randn(W.shape[0], generator=generator, dtype=torch.float64).to(device=W.device, dtype=W.dtype)
        u = F.normalize(u, dim=0)
    elif u.shape != (W.shape[0],):
        raise ValueError(f"u must have shape ({W.shape[0]},) for a weight of shape {tuple(weight.shape)}, got {tuple(u.shape)}")
    with torch.no_grad():
        Wd = W.detach()
        u = u.to(device=W.device, dtype=W.dtype)
        for _ in range(steps):
            v = F.normalize(Wd.t() @ u, dim=0)
            u = F.normalize(Wd @ v, dim=0)
    sigma = u @ W @ v
    return sigma, u, v


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


class Spectral(Regularizer):
    """Spectral regularizer: every weight matrix's top singular value kept near ``target`` (1), biases
    toward 0 (Lewandowski et al., ICLR 2025).

    .. math:: \\lambda\\sum_l\\Big[\\big(\\sigma_{\\max}(W_l)^k-1\\big)^2+\\lVert b_l\\rVert_2^{2k}\\Big]

    Parameters
    ----------
    strength : float
        :math:`\\lambda`.
    k : int or float
        The exponent. **Unverified**: the paper's exact exponent and its default could not be read;
        the default ``k=2`` is the one our prototype used (a third-party snippet uses 3).
    power_steps : int
        Power-iteration steps per call, each on a vector kept between calls (one step per update is
        enough once it has converged); :meth:`bind` runs ``warmup_steps`` steps first.
    target : float
        The value :math:`\\sigma_{\\max}` is pulled to (1 in the paper).
    warmup_steps : int
        Power-iteration steps run by :meth:`bind` from a random start.
    seed : int
        Seed of that random start.

    Notes
    -----
    Weights are parameters with two or more dimensions (reshaped to ``(out, -1)``); biases are
    parameters whose name ends in ``bias``; other 1-D parameters (normalisation scales) are not penalised.
    :math:`\\sigma=u^\\top Wv` is differentiable (:func:`power_iteration`), so the penalty's gradient
    :math:`2\\lambda(\\sigma^k-1)k\\sigma^{k-1}uv^\\top` reaches the weights.
    """

    name = "spectral"

    def __init__(self, strength: float = 1e-3, k: float = 2, power_steps: int = 1, target: float = 1.0,
                 warmup_steps: int = 100, seed: int = 0) -> None:
        super().__init__(strength)
        self.k = _check_number(k, "k", minimum=0.0, strict=True)
        self.power_steps = _check_int(power_steps, "power_steps", 1)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 1)
        self.target = _check_number(target, "target", minimum=0.0, strict=True)
        self.seed = _check_int(seed, "seed", 0)
        self._u: list[Tensor | None] = []

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "strength": self.strength, "k": self.k, "power_steps": self.power_steps,
                "target": self.target, "warmup_steps": self.warmup_steps, "seed": self.seed}

    def _bind(self, named: list[tuple[str, nn.Parameter]]) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self._u = []
        for _, p in named:
            if p.dim() >= 2:
                u = F.normalize(torch.randn(p.shape[0], generator=g, dtype=torch.float64), dim=0)
                _, u, _ = power_iteration(p.detach().to(torch.float64), u.to(p.device), steps=self.warmup_steps)
                self._u.append(u.to(dtype=p.dtype))
            else:
                self._u.append(None)

    def _state_tensors(self) -> list[Tensor]:
        return [u if u is not None else torch.empty(0) for u in self._u]

    def _load_tensors(self, tensors: list[Tensor]) -> None:
        self._u = [t if t.numel() else None for t in tensors]

    def sigmas(self, model: nn.Module) -> dict[str, float]:
        """The current power-iteration estimates of each weight's :math:`\\sigma_{\\max}` (no update)."""
        out = {}
        for (n, p), u in zip(self._params(model), self._u):
            if u is not None:
                with torch.no_grad():
                    W = p.reshape(p.shape[0], -1)
                    out[n] = float(u @ W @ F.normalize(W.t() @ u, dim=0))
        return out

    def _raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        total = named[0][1].new_zeros(())
        for i, (n, p) in enumerate(named):
            u = self._u[i]
            if u is not None:
                sigma, u, _ = power_iteration(p, u, steps=self.power_steps)
                self._u[i] = u
                total = total + (sigma ** self.k - self.target ** self.k) ** 2
            elif _is_bias(n):
                total = total + p.square().sum() ** self.k
        return total


@torch.no_grad()
def fresh_init(model: nn.Module, generator: torch.Generator | None = None) -> list[Tensor]:
    """A fresh initialisation draw of ``model``'s trainable parameters (in ``named_parameters`` order): a copy of
    the model whose modules run their own ``reset_parameters()`` under a seed drawn from ``generator`` (the
    global RNG is left as it was). Raises if a trainable parameter belongs to a module without one."""
    _check_model(model)
    fresh = copy.deepcopy(model)
    owners = {}
    for module in fresh.modules():
        for name, p in module.named_parameters(recurse=False):
            owners[id(p)] = module
    missing = [n for n, p in fresh.named_parameters() if p.requires_grad and not hasattr(owners[id(p)], "reset_parameters")]
    if missing:
        raise ValueError(f"perturbation='init' needs every trainable parameter in a module with reset_parameters(); "
                         f"{missing} are not")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if any(True for _ in module.parameters(recurse=False)) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return [p.detach() for p in fresh.parameters() if p.requires_grad]


class ShrinkPerturb(Regularizer):
    """Shrink and perturb (Ash & Adams, 2020) at task boundaries, as a baseline; no penalty.

    Before every task but the first:
    :math:`\\theta\\leftarrow s\\,\\theta + p\\,\\mathrm{std}(\\theta^0_l)\\,\\varepsilon`,
    :math:`\\varepsilon\\sim\\mathcal N(0, I)` drawn from the run's generator, with
    :math:`\\mathrm{std}(\\theta^0_l)` the standard deviation of tensor :math:`l`'s initial entries (so
    the noise is on the initialisation's scale; zero-initialised tensors get no noise).

    With ``perturbation="init"`` the noise is instead a fresh initialisation draw, as in Ash & Adams:
    :math:`\\theta\\leftarrow s\\,\\theta + p\\,\\theta^{\\text{new}}`, where :math:`\\theta^{\\text{new}}` is a copy of
    the model whose modules were re-initialised by their own ``reset_parameters()`` (PyTorch's default init of
    each layer, seeded from the run's generator; every trainable parameter must belong to a module that has one).

    Parameters
    ----------
    shrink : float
        :math:`s \\in [0, 1]`.
    noise : float
        :math:`p \\ge 0`.
    perturbation : ``"gaussian"`` or ``"init"``
        Scaled Gaussian noise (default) or a fresh initialisation draw.
    """

    name = "shrink_perturb"

    def __init__(self, shrink: float = 0.8, noise: float = 0.1, perturbation: str = "gaussian") -> None:
        super().__init__(0.0)
        self.shrink = _check_number(shrink, "shrink", maximum=1.0)
        self.noise = _check_number(noise, "noise")
        if perturbation not in ("gaussian", "init"):
            raise ValueError(f"perturbation must be 'gaussian' or 'init', got {perturbation!r}")
        self.perturbation = perturbation
        self._scale: list[float] = []

    def config(self) -> dict[str, Any]:
        cfg = {"name": self.name, "shrink": self.shrink, "noise": self.noise}
        if self.perturbation != "gaussian":  # older checkpoints and histories keep their configuration
            cfg["perturbation"] = self.perturbation
        return cfg

    def _bind(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self._scale = [float(p.detach().std()) if p.numel() > 1 else 0.0 for _, p in named]

    def _state_tensors(self) -> list[Tensor]:
        return [torch.tensor(self._scale, dtype=torch.float64)]

    def _load_tensors(self, tensors: list[Tensor]) -> None:
        self._scale = tensors[0].tolist()

    @torch.no_grad()
    def apply(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        """One shrink-and-perturb step on ``model``'s weights, in place."""
        named = self._params(model)
        if self.perturbation == "init":
            fresh = fresh_init(model, generator)
            for (_, p), q in zip(named, fresh):
                p.mul_(self.shrink).add_(q.to(p), alpha=self.noise)
            return
        for (_, p), scale in zip(named, self._scale):
            eps = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
            p.mul_(self.shrink).add_(eps, alpha=self.noise * scale)

    def task_boundary(self, model: nn.Module, task: int, generator: torch.Generator | None = None) -> None:
        self.apply(model, generator)


#: Names accepted by :func:`make_regularizer`.
REGULARIZERS: dict[str, type[Regularizer]] = {
    "none": NoRegularizer, "l2": L2, "l2_init": L2Init, "wasserstein": WassersteinInit, "spectral": Spectral,
    "shrink_perturb": ShrinkPerturb,
}


def make_regularizer(name: str, strength: float | None = None, **kwargs: Any) -> Regularizer:
    """A regularizer by name (:data:`REGULARIZERS`); ``strength`` is :math:`\\lambda` (ignored for
    ``"none"``; for ``"shrink_perturb"`` pass ``shrink`` and ``noise``)."""
    if name not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {sorted(REGULARIZERS)}, got {name!r}")
    cls = REGULARIZERS[name]
    if name in ("none", "shrink_perturb"):
        return cls(**kwargs)
    return cls(strength, **kwargs) if strength is not None else cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Task streams
# --------------------------------------------------------------------------------------------

#: Task streams of :func:`make_tasks`.
STREAMS = ("random_labels", "permuted", "label_permutation", "class_incremental")


def make_tasks(stream: str, data: InMemoryData | tuple[Tensor, Tensor], n_tasks: int = 10, *, seed: int = 0,
               test: InMemoryData | tuple[Tensor, Tensor] | None = None, n_samples: int | None = None,
               classes_per_task: int = 2) -> list[Task]:
    """A task stream from any data set (``(x, y)`` tensors or :class:`~gradiv_lib.data.InMemoryData`).

    ``stream`` is one of :data:`STREAMS` (:func:`gradiv_lib.data.random_label_tasks`,
    :func:`~gradiv_lib.data.permuted_tasks`, :func:`~gradiv_lib.data.label_permutation_tasks`,
    :func:`~gradiv_lib.data.class_incremental_tasks`). ``n_samples`` keeps the first ``n_samples``
    training samples (random-label memorisation uses a few hundred).
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    _check_int(n_tasks, "n_tasks")
    data = as_tasks([data])[0].train
    if n_samples is not None:
        _check_int(n_samples, "n_samples")
        if n_samples > len(data):
            raise ValueError(f"n_samples must be <= the {len(data)} training samples, got {n_samples}")
        data = data.subset(torch.arange(n_samples))
    if stream == "random_labels":
        return random_label_tasks(data, n_tasks, seed=seed)
    if stream == "permuted":
        return permuted_tasks(data, n_tasks, seed=seed, test=test)
    if stream == "label_permutation":
        return label_permutation_tasks(data, n_tasks, seed=seed, test=test)
    return class_incremental_tasks(data, classes_per_task, test=test, seed=seed)[:n_tasks]


def as_tasks(items: Iterable[Task | InMemoryData | tuple[Tensor, Tensor]]) -> list[Task]:
    """Your own task stream: a list of :class:`~gradiv_lib.data.Task`, ``InMemoryData`` or ``(x, y)``
    pairs (or ``((x, y), (x_test, y_test))`` pairs) becomes a list of tasks."""
    tasks = []
    for i, item in enumerate(items):
        if isinstance(item, Task):
            tasks.append(item)
        elif isinstance(item, InMemoryData):
            tasks.append(Task(f"task-{i}", item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
            tasks.append(Task(f"task-{i}", InMemoryData(item[0], item[1])))
        elif (isinstance(item, (tuple, list)) and len(item) == 2
              and all(isinstance(d, (tuple, list, InMemoryData)) for d in item)):
            train, test = (d if isinstance(d, InMemoryData) else InMemoryData(*d) for d in item)
            tasks.append(Task(f"task-{i}", train, test))
        else:
            raise TypeError(f"task {i} must be a Task, InMemoryData, an (x, y) pair of tensors or a (train, test) pair; "
                            f"got {type(item).__name__}")
        if len(tasks[-1].train) == 0:
            raise ValueError(f"task {i} ({tasks[-1].name}) has no training samples")
    if not tasks:
        raise ValueError("the task stream is empty; give at least one task")
    return tasks


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def task_accuracy(model: nn.Module, data: Task | InMemoryData | tuple[Tensor, Tensor], *, split: str = "train") -> float:
    """Accuracy of ``model`` on a task's ``split`` (``"train"`` or ``"test"``) or on data, in eval mode."""
    from .training import evaluate

    if isinstance(data, Task):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = data.train if split == "train" else data.test
        if data is None:
            raise ValueError("the task has no test set; use split='train'")
    return evaluate(model, data)[1]


def effective_rank(features: Tensor, method: str = "entropy", delta: float = 0.01) -> float:
    """Effective rank of a feature matrix ``(n_samples, n_features)`` from its singular values
    :math:`s_1\\ge s_2\\ge\\dots`.

    * ``"entropy"`` (Roy & Vetterli): :math:`\\exp(-\\sum_i p_i\\log p_i)`, :math:`p_i=s_i/\\sum_j s_j`;
    * ``"srank"`` (Kumar et al. 2021; Lyle et al.): the smallest :math:`k` with
      :math:`\\sum_{i\\le k}s_i\\ge(1-\\delta)\\sum_i s_i`.

    Both equal :math:`r` for :math:`r` equal non-zero singular values; zero features give 0.
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or features.numel() == 0:
        raise ValueError(f"features must be a non-empty 2-D tensor (samples, features), got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if method not in ("entropy", "srank"):
        raise ValueError(f"method must be 'entropy' or 'srank', got {method!r}")
    _check_number(delta, "delta", maximum=1.0)
    s = torch.linalg.svdvals(features.detach().to(torch.float64))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    if method == "entropy":
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))
    return float(int((torch.cumsum(p, 0) < 1 - delta - 1e-12).sum()) + 1)


def dormant_fraction(activations: Tensor, tau: float = 0.0) -> float:
    """Fraction of :math:`\\tau`-dormant units (Sokar et al., 2023) in ``activations`` ``(n_samples, units)``.

    Unit :math:`i` is dormant when :math:`s_i=\\mathbb E|h_i|\\,/\\,\\tfrac1H\\sum_j\\mathbb E|h_j|\\le\\tau`;
    ``tau=0`` counts dead units (zero on every sample). If every unit is zero, all are dormant.
    """
    if not isinstance(activations, Tensor) or activations.dim() != 2 or activations.numel() == 0:
        raise ValueError(f"activations must be a non-empty 2-D tensor (samples, units), got "
                         f"{tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__}")
    _check_number(tau, "tau")
    mean_abs = activations.detach().abs().to(torch.float64).mean(0)
    avg = mean_abs.mean()
    if avg == 0:
        return 1.0
    return float(((mean_abs / avg) <= tau).double().mean())


_ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU)


@torch.no_grad()
def hidden_features(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Outputs of every activation module (ReLU, tanh, ...) of ``model`` on ``x``, in forward order, in
    eval mode: the hidden features of an :func:`gradiv_lib.models.mlp`."""
    _check_model(model)
    outs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().flatten(1)))
             for m in model.modules() if isinstance(m, _ACTIVATION_TYPES)]
    if not hooks:
        raise ValueError("model has no activation module (nn.ReLU, nn.Tanh, ...) whose outputs could be read")
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return outs


@torch.no_grad()
def sigma_max(model: nn.Module) -> dict[str, float]:
    """Exact top singular value of every weight (parameters with >= 2 dims, viewed ``(out, -1)``)."""
    _check_model(model)
    return {n: float(torch.linalg.matrix_norm(p.detach().reshape(p.shape[0], -1).to(torch.float64), 2))
            for n, p in model.named_parameters() if p.dim() >= 2}


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, data: InMemoryData, *, epochs: int, batch_size: int,
                 loss_fn: Callable, regularizer: Regularizer | None, generator: torch.Generator) -> list[float]:
    """``epochs`` epochs of mini-batch training; returns the running training accuracy of each epoch."""
    accs = []
    bs = min(batch_size, len(data))
    for _ in range(epochs):
        correct = 0
        for xb, yb in data.batches(bs, shuffle=True, generator=generator):
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            if regularizer is not None:
                loss = loss + regularizer(model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became non-finite ({float(loss)}); lower lr or the regularization strength")
            loss.backward()
            opt.step()
            correct += int((out.detach().argmax(1) == yb).sum())
        accs.append(correct / len(data))
    return accs


def plasticity(model: nn.Module, task: Task | InMemoryData | tuple[Tensor, Tensor], *, epochs: int = 20, lr: float = 1e-3,
               batch_size: int = 32, optimizer: str = "adam", seed: int = 0) -> float:
    """Plasticity probe: training accuracy reached on ``task`` after ``epochs`` epochs of fresh
    ``optimizer`` training from a **copy** of the current weights (``model`` is not changed)."""
    _check_model(model)
    task = as_tasks([task])[0]
    _check_int(epochs, "epochs")
    _check_int(batch_size, "batch_size")
    _check_number(lr, "lr", strict=True)
    probe = copy.deepcopy(model)
    opt = _make_optimizer(optimizer, probe.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _train_steps(probe, opt, task.train, epochs=epochs, batch_size=batch_size, loss_fn=nn.CrossEntropyLoss(),
                     regularizer=None, generator=g)
    return task_accuracy(probe, task.train)


def _make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


# --------------------------------------------------------------------------------------------
# Continual training
# --------------------------------------------------------------------------------------------


@dataclass
class ContinualHistory:
    """What :func:`train_continual` measured, one entry per finished task.

    Attributes
    ----------
    task : list of str
        Task names.
    end_accuracy : list of float
        Training accuracy on the task at its end (trainability; the plasticity benchmarks' metric).
    test_accuracy : list of float
        Test accuracy on the task at its end (``nan`` without a test set).
    online_accuracy : list of float
        Mean over the task's epochs of the running training accuracy (Kumar et al.'s "average online
        task accuracy", per task).
    epoch_accuracy : list of list of float
        Running training accuracy of every epoch of every task.
    diversity_start, diversity_end : list of float
        Gradient diversity :math:`\\Delta` of the task's loss on its probe samples, at the weights the
        task starts from and at its end (per-sample gradients of the unregularized loss).
    sigma_max : list of list of float
        Exact top singular value of every weight matrix at the end of the task.
    effective_rank : list of float
        Entropy effective rank of the last hidden layer's features on the probe samples.
    dormant : list of float
        Fraction of dead units (zero on every probe sample), over all hidden layers.
    weight_norm : list of float
        :math:`\\lVert\\theta\\rVert_2` at the end of the task.
    seconds : list of float
        Cumulative training seconds.
    regularizer : dict
        The regularizer's configuration.
    layers : list of str
        Names of the weights in ``sigma_max``.
    """

    task: list[str] = field(default_factory=list)
    end_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    online_accuracy: list[float] = field(default_factory=list)
    epoch_accuracy: list[list[float]] = field(default_factory=list)
    diversity_start: list[float] = field(default_factory=list)
    diversity_end: list[float] = field(default_factory=list)
    sigma_max: list[list[float]] = field(default_factory=list)
    effective_rank: list[float] = field(default_factory=list)
    dormant: list[float] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    regularizer: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    PER_TASK = ("task", "end_accuracy", "test_accuracy", "online_accuracy", "epoch_accuracy", "diversity_start",
                "diversity_end", "sigma_max", "effective_rank", "dormant", "weight_norm", "seconds")

    def __len__(self) -> int:
        return len(self.task)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON and ``weights_only`` safe)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ContinualHistory:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"unknown ContinualHistory fields {sorted(unknown)}")
        return cls(**copy.deepcopy(dict(state)))

    def __repr__(self) -> str:
        if not self.task:
            return "ContinualHistory(empty)"
        return (f"ContinualHistory({self.regularizer.get('name', '?')}: {len(self)} tasks, end accuracy "
                f"{self.end_accuracy[0]:.3f} → {self.end_accuracy[-1]:.3f})")


def _probe(task: Task, probe_size: int) -> InMemoryData:
    n = min(probe_size, len(task.train))
    return task.train.subset(torch.arange(n, device=task.train.device))


def _diversity(model: nn.Module, probe: InMemoryData, loss_fn: Callable) -> float:
    from .diversity import gradient_diversity

    was_training = model.training
    model.eval()
    try:
        return float(gradient_diversity(model, loss_fn, probe.x, probe.y).diversity)
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return math.nan
    finally:
        model.train(was_training)


def train_continual(
    model: nn.Module,
    tasks: Sequence[Task | InMemoryData | tuple[Tensor, Tensor]],
    *,
    regularizer: Regularizer | str | None = None,
    epochs_per_task: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    optimizer: str = "adam",
    reset_optimizer: bool = False,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    probe_size: int = 256,
    measure: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    on_task_end: Callable[[int, nn.Module, ContinualHistory], None] | None = None,
    progress: bool = False,
) -> ContinualHistory:
    """Train ``model`` on ``tasks`` one after the other, with a regularizer, measuring plasticity.

    Parameters
    ----------
    model : nn.Module
        A classifier, trained in place. Its weights when the regularizer is bound (here, unless it is
        already bound) are the :math:`\\theta_0` of the init-anchored regularizers.
    tasks : sequence
        :class:`~gradiv_lib.data.Task` objects (e.g. :func:`make_tasks`), or anything :func:`as_tasks`
        takes (your own data sets).
    regularizer : Regularizer, str or None
        An instance, a name of :data:`REGULARIZERS` with its default settings, or ``None`` (no penalty).
    epochs_per_task, lr, batch_size : int, float, int
        Training budget per task; ``optimizer`` is ``"adam"`` (default) or ``"sgd"``.
    reset_optimizer : bool
        Build a fresh optimizer at every task (default: one optimizer for the whole stream, as in the
        plasticity benchmarks).
    loss_fn : callable, optional
        Default cross-entropy.
    probe_size : int
        Number of a task's first training samples on which diversity, effective rank and dormant units
        are measured.
    measure : bool
        Record diversity, σ_max, effective rank and dormant units (accuracy is always recorded).
    seed : int
        Seed of the batch order, of shrink-and-perturb's noise and of the (forked) global RNG.
    checkpoint_path : path, optional
        Written atomically after every task; if it exists, the run resumes from it (it must come from a
        run with the same tasks count, budget, seed and regularizer). Loaded with ``weights_only=True``.
    on_task_end : callable, optional
        ``on_task_end(task_index, model, history)`` after each task (after the checkpoint).

    Returns
    -------
    ContinualHistory
    """
    from tqdm.auto import tqdm

    _check_model(model)
    tasks = as_tasks(tasks)
    _check_int(epochs_per_task, "epochs_per_task")
    _check_int(batch_size, "batch_size")
    _check_int(probe_size, "probe_size")
    _check_int(seed, "seed", 0)
    _check_number(lr, "lr", strict=True)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if regularizer is None:
        regularizer = NoRegularizer()
    elif isinstance(regularizer, str):
        regularizer = make_regularizer(regularizer)
    elif not isinstance(regularizer, Regularizer):
        raise TypeError(f"regularizer must be a gradiv_lib.plasticity.Regularizer, a name in {sorted(REGULARIZERS)} or None, "
                        f"got {type(regularizer).__name__}")
    for i, t in enumerate(tasks):
        if t.train.y.dtype.is_floating_point or t.train.y.dim() != 1:
            raise ValueError(f"task {i} ({t.name}) needs integer class labels of shape (N,), got {t.train.y.dtype} "
                             f"{tuple(t.train.y.shape)}")
    device = torch.device(device) if device is not None else tasks[0].train.device
    model.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    if not regularizer.bound:
        regularizer.bind(model)
    fingerprint = {"format": CHECKPOINT_FORMAT, "n_tasks": len(tasks), "sizes": [len(t.train) for t in tasks],
                   "epochs_per_task": epochs_per_task, "lr": float(lr), "batch_size": batch_size, "optimizer": optimizer,
                   "reset_optimizer": bool(reset_optimizer), "seed": seed, "regularizer": regularizer.config()}
    opt = _make_optimizer(optimizer, model.parameters(), lr)
    generator = torch.Generator().manual_seed(seed)
    history = ContinualHistory(regularizer=regularizer.config())
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    start = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if path is not None and path.exists():
            state = torch.load(path, map_location=device, weights_only=True)
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint {path} comes from a different run ({state.get('fingerprint')}); "
                                 f"expected {fingerprint}. Delete it or pass another checkpoint_path")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            regularizer.load_state_dict(state["regularizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = ContinualHistory.from_dict(state["history"])
            start = len(history)
        layers = [n for n, p in model.named_parameters() if p.dim() >= 2]
        history.layers = layers
        bar = tqdm(range(start, len(tasks)), desc=regularizer.name, disable=not progress, leave=False)
        for t in bar:
            task = tasks[t]
            train_data = task.train.to(device)
            if t > 0:
                regularizer.task_boundary(model, t, generator)
                if reset_optimizer:
                    opt = _make_optimizer(optimizer, model.parameters(), lr)
            probe = _probe(Task(task.name, train_data), probe_size)
            div_start = _diversity(model, probe, loss_fn) if measure else math.nan
            tic = time.perf_counter()
            model.train()
            accs = _train_steps(model, opt, train_data, epochs=epochs_per_task, batch_size=batch_size, loss_fn=loss_fn,
                                regularizer=regularizer, generator=generator)
            elapsed = time.perf_counter() - tic
            history.task.append(task.name)
            history.end_accuracy.append(task_accuracy(model, train_data))
            history.test_accuracy.append(task_accuracy(model, task.test.to(device)) if task.test is not None else math.nan)
            history.epoch_accuracy.append(accs)
            history.online_accuracy.append(sum(accs) / len(accs))
            if measure:
                history.diversity_start.append(div_start)
                history.diversity_end.append(_diversity(model, probe, loss_fn))
                history.sigma_max.append(list(sigma_max(model).values()))
                try:
                    feats = hidden_features(model, probe.x)
                except ValueError:
                    feats = []
                history.effective_rank.append(effective_rank(feats[-1]) if feats else math.nan)
                history.dormant.append(dormant_fraction(torch.cat(feats, 1)) if feats else math.nan)
            else:
                for key in ("diversity_start", "diversity_end", "effective_rank", "dormant"):
                    getattr(history, key).append(math.nan)
                history.sigma_max.append([])
            with torch.no_grad():
                history.weight_norm.append(float(torch.sqrt(sum(p.double().square().sum() for p in model.parameters()))))
            history.seconds.append((history.seconds[-1] if history.seconds else 0.0) + elapsed)
            bar.set_postfix(acc=f"{history.end_accuracy[-1]:.3f}")
            if path is not None:
                save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "regularizer": regularizer.state_dict(), "generator": generator.get_state(),
                              "torch_rng": torch.get_rng_state(), "history": history.to_dict()}, path)
            if on_task_end is not None:
                on_task_end(t, model, history)
        bar.close()
    return history


# --------------------------------------------------------------------------------------------
# The chapter's experiments (command line)
# --------------------------------------------------------------------------------------------

#: Settings of the chapter's experiments (``python -m gradiv_lib.plasticity NAME``).
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "random_labels": dict(stream="random_labels", n_samples=600, n_tasks=12, epochs_per_task=60, width=128, depth=3,
                          lr=1e-3, batch_size=32, seeds=[0, 1, 2],
                          methods={"none": {}, "l2": {"strength": 1e-4}, "l2_init": {"strength": 1e-3},
                                   "wasserstein": {"strength": 1e-3}, "spectral": {"strength": 1e-3, "k": 2},
                                   "shrink_perturb": {"shrink": 0.8, "noise": 0.1}}),
    "permuted": dict(stream="permuted", n_samples=None, n_tasks=12, epochs_per_task=4, width=128, depth=3, lr=1e-3,
                     batch_size=32, seeds=[0, 1, 2],
                     methods={"none": {}, "l2": {"strength": 1e-4}, "l2_init": {"strength": 1e-3},
                              "wasserstein": {"strength": 1e-3}, "spectral": {"strength": 1e-3, "k": 2},
                              "shrink_perturb": {"shrink": 0.8, "noise": 0.1}}),
    "sensitivity": dict(stream="random_labels", n_samples=600, n_tasks=12, epochs_per_task=60, widths=[64, 128], depth=3,
                        lr=1e-3, batch_size=32, seeds=[0, 1], strengths=[1e-4, 1e-3, 1e-2],
                        methods=["none", "l2", "l2_init", "spectral"]),
}


def run_one(stream: str, method: str, params: dict[str, Any], *, seed: int, n_samples: int | None, n_tasks: int,
            epochs_per_task: int, width: int, depth: int, lr: float, batch_size: int, **_: Any) -> ContinualHistory:
    """One run of the chapter's protocol on digits: an MLP 64-width-…-10 (``depth`` linear layers,
    PyTorch default init, seed ``seed``), task stream ``stream`` (seed ``seed``), Adam."""
    from . import data as gdata, models

    train, test = gdata.load_digits()
    tasks = make_tasks(stream, train, n_tasks, seed=seed, n_samples=n_samples, test=None if stream == "random_labels" else test)
    model = models.mlp(64, width, depth, 10, seed=seed)
    reg = make_regularizer(method, **params)
    return train_continual(model, tasks, regularizer=reg, epochs_per_task=epochs_per_task, lr=lr, batch_size=batch_size,
                           seed=seed)


def _compact(value: Any, digits: int = 5) -> Any:
    """Floats rounded to ``digits`` decimals, recursively (keeps the shipped JSON small)."""
    if isinstance(value, float):
        return value if not math.isfinite(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: _compact(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v, digits) for v in value]
    return value


def compact_history(history: dict[str, Any], digits: int = 5) -> dict[str, Any]:
    """A :meth:`ContinualHistory.to_dict` without the per-epoch accuracies, floats rounded: what
    :func:`run_experiment` saves."""
    return _compact({k: v for k, v in history.items() if k != "epoch_accuracy"}, digits)


def run_experiment(name: str, *, seeds: Sequence[int] | None = None, save: bool = True,
                   root: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run one of :data:`EXPERIMENTS` and (with ``save``) write ``ch08/<name>`` with
    :func:`gradiv_lib.results.save`; returns the data dictionary: per method (or ``"method|strength|width"`` for
    the sensitivity sweep) one :func:`compact_history` per seed."""
    from . import results

    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    cfg = {**copy.deepcopy(EXPERIMENTS[name]), **overrides}
    if seeds is not None:
        cfg["seeds"] = list(seeds)
    tic = time.perf_counter()
    out: dict[str, Any] = {}
    if name == "sensitivity":
        for width in cfg["widths"]:
            for method in cfg["methods"]:
                for strength in ([None] if method == "none" else cfg["strengths"]):
                    key = f"{method}|{strength}|{width}"
                    out[key] = [run_one(cfg["stream"], method, {} if strength is None else {"strength": strength},
                                        seed=s, width=width, **{k: v for k, v in cfg.items() if k not in ("width", "stream")}).to_dict()
                                for s in cfg["seeds"]]
                    print(key, [round(h["end_accuracy"][-1], 3) for h in out[key]], flush=True)
    else:
        for method, params in cfg["methods"].items():
            out[method] = [run_one(cfg["stream"], method, params, seed=s, **{k: v for k, v in cfg.items() if k != "stream"}).to_dict()
                           for s in cfg["seeds"]]
            print(method, [round(h["end_accuracy"][-1], 3) for h in out[method]], flush=True)
    seconds = time.perf_counter() - tic
    out = {key: [compact_history(h) for h in runs] for key, runs in out.items()}
    if save:
        path = results.save(f"ch08/{name}", out, config=cfg, seconds=seconds, device="cpu", root=root)
        print(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradiv_lib.plasticity NAME [options]``: an alias of ``gradiv plasticity NAME`` (:mod:`gradiv_lib.cli`;
    quick by default, ``--book`` for the book's settings)."""
    import sys

    from .cli import main as cli_main

    return cli_main(["plasticity", *(sys.argv[1:] if argv is None else argv)], prog="python -m gradiv_lib.plasticity")


if __name__ == "__main__":
    raise SystemExit(main())
