r"""Sharpness: Hessian top eigenvalue, Hutchinson trace, average-direction sharpness, SAM and average-direction SAM.

Chapter 6 derives why decentralized SGD (D-SGD) behaves like **average-direction SAM** (Zhu et al., ICML 2023).
With the workers' covariance :math:`\Xi = \frac1K\sum_j (w_j-\bar w)(w_j-\bar w)^\top`,

.. math::

    S_\Xi(w) = \mathbb E_{\epsilon\sim\mathcal N(0,\Xi)}\bigl[L(w+\epsilon)\bigr] - L(w)
    \approx \tfrac12\operatorname{tr}\bigl(\nabla^2 L(w)\,\Xi\bigr),

the average-direction sharpness (:func:`average_direction_sharpness`; the second-order value is
:func:`second_order_sharpness`). Worst-case SAM (Foret et al., 2021) minimises
:math:`\max_{\lVert\epsilon\rVert\le\rho}L(w+\epsilon)`, approximated by one ascent step (:class:`SAM`); the
average-direction variant descends along :math:`\mathbb E_\epsilon\nabla L(w+\epsilon)`, the gradient of the
Gaussian-smoothed loss (:class:`AverageDirectionSAM`, :func:`smoothed_gradient`).

Perturbations :math:`\epsilon` are given either as an isotropic standard deviation ``sigma``
(:math:`\epsilon\sim\mathcal N(0,\sigma^2 I)`) or as ``deviations`` :math:`D` ``(K, P)``, the rows
:math:`w_j - \bar w` (:meth:`gradiv_lib.workers.Simulator.deviations`): then
:math:`\epsilon = \frac1{\sqrt K}D^\top z`, :math:`z\sim\mathcal N(0, I_K)`, has covariance exactly :math:`\Xi`.
Monte-Carlo estimates use antithetic pairs :math:`\pm\epsilon` by default, which cancels the first-order term
:math:`\nabla L^\top\epsilon` exactly and leaves only the curvature.

Curvature: :func:`hessian_top_eigenvalue` runs power iteration on Hessian-vector products (double backward);
:func:`hutchinson_trace` estimates :math:`\operatorname{tr}\nabla^2L = \mathbb E[v^\top\nabla^2L\,v]` with
Rademacher :math:`v`. Flat vectors follow the order of the model's trainable ``named_parameters()``, the order of
:class:`gradiv_lib.workers.Simulator`'s rows. ``loss_fn`` must average over the samples (``reduction="mean"``);
``batch_size`` splits the data into chunks whose losses are averaged with their sizes as weights (exact for a
mean only: a summed or class-weighted loss is refused when ``batch_size`` splits the data).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from .norms.loss_scale import batch_loss_factor_on, check_loss_shapes_on
from .stateless import functional_call
from .workers._engines import FlatSpec

__all__ = [
    "AverageDirectionSAM",
    "EigenResult",
    "SAM",
    "SharpnessResult",
    "TraceResult",
    "average_direction_sharpness",
    "flat_gradient",
    "hessian_top_eigenvalue",
    "hessian_vector_product",
    "hutchinson_trace",
    "second_order_sharpness",
    "smoothed_gradient",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_inputs(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, batch_size: int | None) -> FlatSpec:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must hold at least one sample, got shape {tuple(inputs.shape)}")
    if targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(f"inputs and targets must have the same number of samples, got {inputs.shape[0]} and "
                         f"{targets.shape[0] if targets.dim() else 'a scalar'}")
    if batch_size is not None:
        _check_positive_int(batch_size, "batch_size")
    check_loss_shapes_on(loss_fn, model, inputs[:2], targets[:2])  # (B, 1) outputs against (B,) targets
    if batch_size is not None and batch_size < inputs.shape[0]:
        _check_mean_loss(model, loss_fn, inputs[:8], targets[:8])
    return FlatSpec(model)


def _check_mean_loss(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> None:
    """Chunks of the data are weighted by their share of the samples, which is exact for a mean over samples only."""
    try:
        factor = batch_loss_factor_on(loss_fn, model, inputs, targets)
    except ValueError as error:
        raise ValueError(f"batch_size splits the data into chunks weighted by their share of the samples, which "
                         f"needs a loss_fn that is the mean over the samples: {error}") from error
    if factor != inputs.shape[0]:
        raise ValueError("loss_fn sums over the samples, but batch_size splits the data into chunks weighted by their "
                         "share of the samples, which needs the mean (reduction='mean'); with a sum the result would "
                         "depend on batch_size")


def _chunks(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    size = n if batch_size is None else min(batch_size, n)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _perturbation_sampler(size: int, sigma: float | None, deviations: Tensor | None, like: Tensor):
    if (sigma is None) == (deviations is None):
        raise ValueError("give exactly one of sigma (isotropic N(0, sigma^2 I)) or deviations (rows w_j - w_bar, "
                         "covariance Xi)")
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= float(sigma) < math.inf:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        sigma = float(sigma)

        def draw(n: int, gen: torch.Generator) -> Tensor:
            return sigma * torch.randn(n, size, generator=gen, dtype=torch.float64).to(like)
        return draw
    D = torch.as_tensor(deviations)
    if D.dim() != 2 or D.shape[1] != size or D.shape[0] < 1:
        raise ValueError(f"deviations must be a (K, P) tensor with P = {size} parameters, got shape {tuple(D.shape)}")
    if not bool(torch.isfinite(D).all()):
        raise ValueError("deviations contains inf or nan")
    D = D.to(like)
    K = D.shape[0]

    def draw(n: int, gen: torch.Generator) -> Tensor:
        z = torch.randn(n, K, generator=gen, dtype=torch.float64).to(like)
        return (z @ D) / math.sqrt(K)
    return draw


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# Gradients and Hessian-vector products
# --------------------------------------------------------------------------------------------


def _losses_at(model: nn.Module, spec: FlatSpec, loss_fn: LossFn, flats: Tensor, inputs: Tensor, targets: Tensor,
               batch_size: int | None, chunk: int = 32) -> Tensor:
    """Loss at each of ``flats`` ``(S, P)`` on the whole data, without gradients: ``(S,)``."""

    def one(p, xb, yb):
        return loss_fn(functional_call(model, p, (xb,)), yb)

    fn = vmap(one, in_dims=(0, None, None))
    n = inputs.shape[0]
    out = torch.zeros(flats.shape[0], dtype=torch.float64, device=flats.device)
    with torch.no_grad():
        for s in range(0, flats.shape[0], chunk):
            params = spec.as_dict(flats[s:s + chunk])
            for a, b in _chunks(n, batch_size):
                out[s:s + chunk] += fn(params, inputs[a:b], targets[a:b]).double() * ((b - a) / n)
    return out


def flat_gradient(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *, at: Tensor | None = None,
                  batch_size: int | None = None) -> Tensor:
    """:math:`\\nabla L` as a flat vector ``(P,)`` at the model's parameters (or at the flat vector ``at``)."""
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    flat = spec.flatten(model) if at is None else torch.as_tensor(at)
    if flat.shape != (spec.size,):
        raise ValueError(f"at must be a vector of the {spec.size} parameters, got shape {tuple(flat.shape)}")
    leaves = [v.requires_grad_() for v in spec.views(flat.detach().clone())]
    params = dict(zip(spec.names, leaves))
    n = inputs.shape[0]
    total = None
    for a, b in _chunks(n, batch_size):
        loss = loss_fn(functional_call(model, params, (inputs[a:b],)), targets[a:b]) * ((b - a) / n)
        gs = torch.autograd.grad(loss, leaves)
        g = torch.cat([t.reshape(-1) for t in gs])
        total = g if total is None else total + g
    return total


class _HVP:
    """Hessian-vector products of the loss at the model's parameters, reusing one graph when the data is one chunk."""

    def __init__(self, model: nn.Module, spec: FlatSpec, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                 batch_size: int | None) -> None:
        self.model, self.spec, self.loss_fn = model, spec, loss_fn
        self.inputs, self.targets = inputs, targets
        self.chunks = _chunks(inputs.shape[0], batch_size)
        self.leaves = [v.requires_grad_() for v in spec.views(spec.flatten(model).clone())]
        self._graph = self._grads(*self.chunks[0]) if len(self.chunks) == 1 else None

    def _grads(self, a: int, b: int) -> tuple[Tensor, ...]:
        params = dict(zip(self.spec.names, self.leaves))
        n = self.inputs.shape[0]
        loss = self.loss_fn(functional_call(self.model, params, (self.inputs[a:b],)), self.targets[a:b]) * ((b - a) / n)
        return torch.autograd.grad(loss, self.leaves, create_graph=True)

    def __call__(self, v: Tensor) -> Tensor:
        vs = self.spec.views(v)
        total = None
        for a, b in self.chunks:
            grads = self._graph if self._graph is not None else self._grads(a, b)
            hv = torch.autograd.grad(grads, self.leaves, grad_outputs=vs, retain_graph=self._graph is not None)
            flat = torch.cat([t.reshape(-1) for t in hv]).detach()
            total = flat if total is None else total + flat
        return total


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, vector: Tensor, *,
                           batch_size: int | None = None) -> Tensor:
    """:math:`\\nabla^2 L\\,v` ``(P,)`` at the model's parameters, by double backward."""
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    v = torch.as_tensor(vector)
    if v.shape != (spec.size,):
        raise ValueError(f"vector must have the {spec.size} entries of the flat parameters, got shape {tuple(v.shape)}")
    return _HVP(model, spec, loss_fn, inputs, targets, batch_size)(v.to(spec.flatten(model)))


@dataclass(frozen=True)
class EigenResult:
    """Result of :func:`hessian_top_eigenvalue`: the eigenvalue, its unit eigenvector ``(P,)``, the iterations
    run and whether the relative change fell below the tolerance."""

    eigenvalue: float
    eigenvector: Tensor
    iterations: int
    converged: bool


def hessian_top_eigenvalue(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *, iters: int = 100,
                           tol: float = 1e-4, seed: int = 0, batch_size: int | None = None) -> EigenResult:
    r"""Largest-magnitude eigenvalue :math:`\lambda_{\max}` of :math:`\nabla^2 L` at the model's parameters, by power
    iteration on Hessian-vector products (stops when :math:`|\lambda_t-\lambda_{t-1}|\le\text{tol}\,|\lambda_t|`).

    Near a minimum the Hessian is almost positive semi-definite and this is the top eigenvalue, the usual
    sharpness measure; far from one, a large negative eigenvalue can dominate (check ``eigenvalue`` > 0).
    """
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    _check_positive_int(iters, "iters")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    hvp = _HVP(model, spec, loss_fn, inputs, targets, batch_size)
    like = spec.flatten(model)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(spec.size, generator=gen, dtype=torch.float64).to(like)
    v /= v.norm()
    lam, converged, it = 0.0, False, 0
    for it in range(1, iters + 1):
        hv = hvp(v)
        new = float(torch.dot(hv.double(), v.double()))
        norm = hv.norm()
        if not math.isfinite(new) or norm == 0:
            if norm == 0:
                return EigenResult(0.0, v, it, True)
            raise FloatingPointError("Hessian-vector product is not finite; is the loss finite at these parameters?")
        v = hv / norm
        if it > 1 and abs(new - lam) <= tol * abs(new):
            lam, converged = new, True
            break
        lam = new
    return EigenResult(lam, v.detach(), it, converged)


@dataclass(frozen=True)
class TraceResult:
    """Result of :func:`hutchinson_trace`: the estimate, its standard error and the number of probes."""

    trace: float
    std_error: float
    samples: int


def hutchinson_trace(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *, samples: int = 100,
                     seed: int = 0, batch_size: int | None = None) -> TraceResult:
    r""":math:`\operatorname{tr}\nabla^2L\approx\frac1S\sum_s v_s^\top\nabla^2L\,v_s` with Rademacher :math:`v_s`."""
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    _check_positive_int(samples, "samples")
    hvp = _HVP(model, spec, loss_fn, inputs, targets, batch_size)
    like = spec.flatten(model)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (spec.size,), generator=gen) * 2 - 1).to(like)
        values.append(float(torch.dot(hvp(v).double(), v.double())))
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / math.sqrt(samples)) if samples > 1 else math.inf
    return TraceResult(float(t.mean()), se, samples)


# --------------------------------------------------------------------------------------------
# Average-direction sharpness and the smoothed gradient
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharpnessResult:
    r"""Result of :func:`average_direction_sharpness`: :math:`S = \mathbb E L(w+\epsilon) - L(w)`, its Monte-Carlo
    standard error, :math:`L(w)`, and the number of perturbations evaluated."""

    sharpness: float
    std_error: float
    loss: float
    samples: int


def _draw_perturbations(size: int, sigma, deviations, w: Tensor, samples: int, antithetic: bool, seed: int) -> Tensor:
    """``samples`` perturbations (rows) from :func:`_perturbation_sampler`, in ``±`` pairs when ``antithetic``
    (then ``samples`` is rounded up to even), reproducible from ``seed``."""
    draw = _perturbation_sampler(size, sigma, deviations, w)
    eps = draw(math.ceil(samples / 2) if antithetic else samples, torch.Generator().manual_seed(seed))
    return torch.cat([eps, -eps]) if antithetic else eps


def average_direction_sharpness(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *,
                                sigma: float | None = None, deviations: Tensor | None = None, samples: int = 256,
                                antithetic: bool = True, seed: int = 0, batch_size: int | None = None) -> SharpnessResult:
    r""":math:`\mathbb E_{\epsilon}[L(w+\epsilon)] - L(w)` at the model's parameters, by Monte Carlo.

    :math:`\epsilon\sim\mathcal N(0,\sigma^2 I)` (``sigma``) or :math:`\mathcal N(0,\Xi)` with :math:`\Xi` the
    covariance of the rows of ``deviations``. With ``antithetic`` the ``samples`` perturbations come in pairs
    :math:`\pm\epsilon` (``samples`` rounded up to even) and the standard error is over pairs. All losses are
    evaluated in batches with ``torch.func.vmap``.
    """
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    _check_positive_int(samples, "samples")
    w = spec.flatten(model)
    eps = _draw_perturbations(spec.size, sigma, deviations, w, samples, antithetic, seed)
    base = float(_losses_at(model, spec, loss_fn, w.unsqueeze(0), inputs, targets, batch_size)[0])
    losses = _losses_at(model, spec, loss_fn, w.unsqueeze(0) + eps, inputs, targets, batch_size)
    if not bool(torch.isfinite(losses).all()):
        raise FloatingPointError("the loss is not finite at some perturbed parameters; use a smaller sigma/deviations")
    half = eps.shape[0] // 2
    per = (losses[:half] + losses[half:]) / 2 - base if antithetic else losses - base
    se = float(per.std() / math.sqrt(len(per))) if len(per) > 1 else math.inf
    return SharpnessResult(float(per.mean()), se, base, int(eps.shape[0]))


def second_order_sharpness(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *,
                           sigma: float | None = None, deviations: Tensor | None = None, samples: int = 100,
                           seed: int = 0, batch_size: int | None = None) -> float:
    r""":math:`\tfrac12\operatorname{tr}(\nabla^2L\,\Xi)`, the second-order value of the average-direction sharpness.

    With ``deviations`` :math:`D` it is exact: :math:`\frac1{2K}\sum_j d_j^\top\nabla^2L\,d_j` (``K``
    Hessian-vector products). With ``sigma`` it is :math:`\tfrac12\sigma^2\operatorname{tr}\nabla^2L` by
    :func:`hutchinson_trace` with ``samples`` probes.
    """
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    w = spec.flatten(model)
    _perturbation_sampler(spec.size, sigma, deviations, w)  # validates
    if sigma is not None:
        return 0.5 * float(sigma) ** 2 * hutchinson_trace(model, loss_fn, inputs, targets, samples=samples, seed=seed,
                                                          batch_size=batch_size).trace
    D = torch.as_tensor(deviations).to(w)
    hvp = _HVP(model, spec, loss_fn, inputs, targets, batch_size)
    return 0.5 * sum(float(torch.dot(hvp(d).double(), d.double())) for d in D) / D.shape[0]


def smoothed_gradient(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *,
                      sigma: float | None = None, deviations: Tensor | None = None, samples: int = 1024,
                      antithetic: bool = True, seed: int = 0, batch_size: int | None = None,
                      chunk: int = 64) -> Tensor:
    r"""Monte-Carlo :math:`\mathbb E_\epsilon\nabla L(w+\epsilon)` ``(P,)``: the gradient of the Gaussian-smoothed
    loss that average-direction SAM (and, to second order, D-SGD's average iterate) descends along."""
    spec = _check_inputs(model, loss_fn, inputs, targets, batch_size)
    _check_positive_int(samples, "samples")
    _check_positive_int(chunk, "chunk")
    w = spec.flatten(model)
    eps = _draw_perturbations(spec.size, sigma, deviations, w, samples, antithetic, seed)
    n = inputs.shape[0]
    total = torch.zeros(spec.size, dtype=torch.float64, device=w.device)
    for s in range(0, eps.shape[0], chunk):
        flats = (w.unsqueeze(0) + eps[s:s + chunk]).detach()
        leaves = [v.requires_grad_() for v in spec.views(flats)]
        params = dict(zip(spec.names, leaves))
        fn = vmap(lambda p, xb, yb: loss_fn(functional_call(model, p, (xb,)), yb), in_dims=(0, None, None))
        for a, b in _chunks(n, batch_size):
            losses = fn(params, inputs[a:b], targets[a:b]) * ((b - a) / n)
            gs = torch.autograd.grad(losses.sum(), leaves)
            total += torch.cat([g.reshape(g.shape[0], -1) for g in gs], dim=1).double().sum(0)
    return (total / eps.shape[0]).to(w)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def _make_base(base_optimizer, param_groups, kwargs) -> torch.optim.Optimizer:
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return base_optimizer(param_groups, **kwargs)
    raise TypeError(f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}")


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation (Foret et al., 2021): descend along :math:`\nabla L(w+\hat\epsilon)`,
    :math:`\hat\epsilon = \rho\,\nabla L(w)/\lVert\nabla L(w)\rVert` (``adaptive``: ASAM's
    :math:`\hat\epsilon_i = \rho\,w_i^2 g_i/\lVert w\odot g\rVert`).

    ``SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)`` builds the base optimizer on the
    same parameter groups. Use :meth:`step` with a closure that zeroes nothing and returns
    ``loss_fn(model(x), y)`` after calling ``backward()`` on it; or call :meth:`first_step` and :meth:`second_step`
    around your own second forward/backward.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], base_optimizer: type[torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, **kwargs) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= float(rho) < math.inf:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        super().__init__(params, dict(rho=float(rho), adaptive=bool(adaptive), **kwargs))
        self.base_optimizer = _make_base(base_optimizer, self.param_groups, kwargs)
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        norms = [((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(2)
                 for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not norms:
            raise RuntimeError("SAM.first_step found no gradients: call loss.backward() first")
        return torch.stack(norms).norm(2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move to :math:`w + \\hat\\epsilon` (the gradients at :math:`w` must be in ``.grad``)."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = (p.square() if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Return to :math:`w` and take the base optimizer's step with the gradients at :math:`w+\\hat\\epsilon`."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """``closure`` computes the loss and calls ``backward`` (it is run twice: at :math:`w` and at
        :math:`w+\\hat\\epsilon`). Returns the loss at :math:`w`."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that computes the loss and calls backward()")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step(zero_grad=False)
        return loss


class AverageDirectionSAM(torch.optim.Optimizer):
    r"""Average-direction SAM: descend along :math:`\frac1S\sum_{s=1}^S\nabla L(w+\epsilon_s)`, an unbiased
    estimate of the gradient of the smoothed loss :math:`\mathbb E_\epsilon L(w+\epsilon)`.

    :math:`\epsilon\sim\mathcal N(0,\sigma^2 I)` (``sigma``) or :math:`\mathcal N(0,\Xi)` with :math:`\Xi` the
    covariance of the rows of ``deviations`` ``(K, P)`` (flat order of the parameters passed in). ``samples`` draws
    per step, antithetic pairs when ``samples`` is even and ``antithetic``. ``sigma=0`` is the base optimizer.

    ``step(closure)``: ``closure`` computes the loss and calls ``backward``; the optimizer zeroes the gradients
    before each call. Returns the loss of the first perturbed evaluation.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], base_optimizer: type[torch.optim.Optimizer], *,
                 sigma: float | None = None, deviations: Tensor | None = None, samples: int = 1,
                 antithetic: bool = True, seed: int = 0, **kwargs) -> None:
        _check_positive_int(samples, "samples")
        super().__init__(params, dict(**kwargs))
        self.base_optimizer = _make_base(base_optimizer, self.param_groups, kwargs)
        self.defaults.update(self.base_optimizer.defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._size = sum(p.numel() for p in self._params)
        self._draw = _perturbation_sampler(self._size, sigma, deviations, self._params[0].detach())
        self.samples, self.antithetic = samples, antithetic
        self._gen = torch.Generator().manual_seed(seed)

    def set_deviations(self, deviations: Tensor) -> None:
        """Replace :math:`\\Xi` by the covariance of new ``deviations`` (e.g. the workers' current ones)."""
        self._draw = _perturbation_sampler(self._size, None, deviations, self._params[0].detach())

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One step (see the class docstring)."""
        if closure is None:
            raise ValueError("AverageDirectionSAM.step needs a closure that computes the loss and calls backward()")
        S = self.samples
        if self.antithetic and S % 2 == 0:
            half = self._draw(S // 2, self._gen)
            eps = torch.cat([half, -half])
        else:
            eps = self._draw(S, self._gen)
        sizes = [p.numel() for p in self._params]
        acc = [torch.zeros_like(p) for p in self._params]
        saved = [p.detach().clone() for p in self._params]
        first_loss = None
        for s in range(S):
            parts = eps[s].split(sizes)
            with torch.no_grad():
                for p, e in zip(self._params, parts):
                    p.add_(e.view_as(p).to(p))
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
            if first_loss is None:
                first_loss = loss
            with torch.no_grad():
                for p, w, a in zip(self._params, saved, acc):
                    p.copy_(w)
                    if p.grad is not None:
                        a.add_(p.grad)
        with torch.no_grad():
            for p, a in zip(self._params, acc):
                p.grad = a / S
        self.base_optimizer.step()
        return first_loss
