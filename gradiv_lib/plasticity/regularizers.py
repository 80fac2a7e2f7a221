"""Regularizers against loss of plasticity, one interface: L2, L2 toward the initial weights (L2 Init),
Wasserstein toward the initial weight distribution, the spectral regularizer (top singular value of each layer
near 1) and shrink-and-perturb at task boundaries.

Chapter 8: derived in section 8.1 (``book/ch08_plasticity/01_loss_of_plasticity``, equation
``eq-plasticity-regularizers``, where a from-scratch spectral penalty is checked against :class:`Spectral`),
compared over seeds in 8.2 and swept over their strengths in 8.3.

Build one, :meth:`Regularizer.bind` it to the model (this records the initial weights the init-anchored ones
need), and add ``reg(model)`` (a scalar tensor) to the loss in any training loop; :meth:`Regularizer.task_boundary`
is called between tasks (only :class:`ShrinkPerturb` acts there). :meth:`Regularizer.raw` gives the penalty
without :math:`\\lambda`, which is what a strength grid centred on each penalty's own scale needs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import _check_int, _check_model, _check_number

__all__ = ["REGULARIZERS", "L2", "L2Init", "NoRegularizer", "Regularizer", "ShrinkPerturb", "Spectral",
           "WassersteinInit", "fresh_init", "make_regularizer", "power_iteration"]


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

    @torch.no_grad()
    def raw(self, model: nn.Module) -> float:
        """:math:`R(\\theta)`, the penalty *without* :math:`\\lambda`, at ``model``'s weights, exactly and
        without changing the regularizer's state (:class:`Spectral` uses the exact :math:`\\sigma_{\\max}` here,
        not its power-iteration estimate). It sets the scale a fair strength grid is centred on
        (:func:`gradiv_lib.plasticity.tuning.strength_scale`)."""
        return float(self._exact_raw(self._params(model)))

    def _exact_raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        return self._raw(named)

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

    def _exact_raw(self, named: list[tuple[str, Tensor]]) -> Tensor:
        total = named[0][1].new_zeros((), dtype=torch.float64)
        for i, (n, p) in enumerate(named):
            if self._u[i] is not None:
                sigma = torch.linalg.matrix_norm(p.reshape(p.shape[0], -1).to(torch.float64), 2)
                total = total + (sigma ** self.k - self.target ** self.k) ** 2
            elif _is_bias(n):
                total = total + p.to(torch.float64).square().sum() ** self.k
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
