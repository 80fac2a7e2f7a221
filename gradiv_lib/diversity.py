"""Gradient diversity (Yin et al. 2018) and the gradient noise scale (McCandlish et al. 2018).

Derived in chapter 2 of the book (book/ch02_computing_fast); chapter 1 introduces Δ.

For per-sample gradients :math:`g_i = \\nabla_w \\ell_i`, :math:`i = 1..n` (sum scale: :math:`\\ell_i` is
the loss of sample :math:`i` alone),

.. math::

    \\Delta = \\frac{\\sum_i \\|g_i\\|^2}{\\|\\sum_i g_i\\|^2}, \\qquad B_S = n\\Delta, \\qquad
    \\mathcal B_{\\text{simple}} = \\frac{\\operatorname{tr}\\Sigma_n}{\\|\\bar G\\|^2} = B_S - 1,

with :math:`\\bar G = \\tfrac1n\\sum_i g_i` and the population covariance
:math:`\\Sigma_n = \\tfrac1n\\sum_i (g_i - \\bar G)(g_i - \\bar G)^\\top`; the identity follows from
:math:`\\tfrac1n\\sum_i\\|g_i\\|^2 = \\operatorname{tr}\\Sigma_n + \\|\\bar G\\|^2`. A mini-batch mean
gradient :math:`\\hat g_B` of :math:`B` indices drawn uniformly *with replacement* has
:math:`\\mathbb E\\|\\hat g_B\\|^2 = \\|\\bar G\\|^2 (1 + \\mathcal B_{\\text{simple}}/B)` exactly
(:func:`expected_minibatch_sq_norm`). McCandlish's two-batch estimator (:class:`TwoBatchNoiseScale`)
estimates :math:`\\mathcal B_{\\text{simple}}` from gradients at two batch sizes without per-sample work;
:class:`EpochDiversityAccumulator` sums over an epoch of batches (DiveBatch's measurement).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Reduction = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def _as_float(value: float | Tensor, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__qualname__}") from None


def _finite_non_negative(value: float | Tensor, name: str) -> float:
    number = _as_float(value, name)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {number}")
    return number


def _positive_int(value: int, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name} must be one of {REDUCTIONS}, got {reduction!r}")


def finite_population_factor(batch_size: int, population_size: int | None) -> float:
    r""":math:`c_B` in :math:`\mathbb E\|G_B\|^2 = |G|^2 + \operatorname{tr}\Sigma\, c_B` for the mean gradient of B
    samples: :math:`1/B` with replacement (``population_size=None``), :math:`\frac{P-B}{B(P-1)}` without
    replacement from :math:`P` samples (every batch of a shuffled epoch), 0 when the batch is all of them."""
    batch = _positive_int(batch_size, "batch_size")
    if population_size is None:
        return 1.0 / batch
    population = _positive_int(population_size, "population_size")
    if batch > population:
        raise ValueError(f"batch_size must be in [1, population_size={population}] without replacement, got {batch}")
    return 0.0 if population == 1 else (population - batch) / (batch * (population - 1))


@dataclass(frozen=True)
class DiversityResult:
    """Gradient diversity of n per-sample gradients (sum scale).

    Attributes
    ----------
    sum_sq_norms
        :math:`Q = \\sum_i \\|g_i\\|^2`.
    sq_norm_of_sum
        :math:`N = \\|\\sum_i g_i\\|^2`.
    n
        Number of samples.
    """

    sum_sq_norms: float
    sq_norm_of_sum: float
    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive_int(self.n, "n"))
        object.__setattr__(self, "sum_sq_norms", _finite_non_negative(self.sum_sq_norms, "sum_sq_norms"))
        object.__setattr__(self, "sq_norm_of_sum", _finite_non_negative(self.sq_norm_of_sum, "sq_norm_of_sum"))

    @property
    def diversity(self) -> float:
        """:math:`\\Delta = Q / N` (``inf`` when the gradients cancel exactly, ``nan`` when all are zero)."""
        if self.sq_norm_of_sum == 0:
            return math.inf if self.sum_sq_norms > 0 else math.nan
        return self.sum_sq_norms / self.sq_norm_of_sum

    @property
    def batch_size_bound(self) -> float:
        """Yin's batch-size bound :math:`B_S = n\\Delta` (:math:`\\ge 1`)."""
        return self.n * self.diversity

    @property
    def noise_scale(self) -> float:
        """:math:`\\mathcal B_{\\text{simple}} = \\operatorname{tr}\\Sigma_n / \\|\\bar G\\|^2 = B_S - 1`.

        The n samples are the whole population: :math:`\\bar G` is their mean gradient and
        :math:`\\Sigma_n` their covariance with the :math:`1/n` convention (the mean convention of
        McCandlish et al. applied to the empirical distribution).
        """
        return self.batch_size_bound - 1.0

    @property
    def noise_scale_unbiased(self) -> float:
        r""":math:`(nQ - N)/(N - Q)`: :meth:`noise_scale_estimate` for a batch drawn **with replacement** (or
        from an infinite population). For a batch of a shuffled epoch of a finite training set use
        ``noise_scale_estimate(population_size=len(train))``. Negative denominators give ``inf``."""
        return self.noise_scale_estimate()

    def noise_scale_estimate(self, population_size: int | None = None) -> float:
        r""":math:`\mathcal B_{\text{simple}}` of the population the n samples were drawn from: the two-batch
        estimator with :math:`B_{\text{small}} = 1` (each sample) and :math:`B_{\text{big}} = n` (their mean).

        Drawn without replacement from ``population_size`` = :math:`P` samples (a batch of a shuffled epoch),
        :math:`\mathbb E\|G_B\|^2 = |G|^2 + \operatorname{tr}\Sigma\,c_B` with
        :math:`c_B = \frac{P-B}{B(P-1)}` (:math:`c_1 = 1`), and the unbiased estimates of
        :math:`\operatorname{tr}\Sigma` and :math:`|G|^2` give

        .. math:: \hat{\mathcal B}_{\text{simple}} = \frac{nQ - N}{N - n\,c_n\,Q},

        which is :math:`(nQ-N)/(N-Q)` with replacement (:math:`c_n = 1/n`, ``population_size=None``) and the
        exact :math:`nQ/N - 1 = B_S - 1` when the batch is the whole population (:math:`c_n = 0`).
        ``inf`` when the denominator is not positive (a noise-dominated batch).
        """
        if self.n < 2:
            raise ValueError(f"a noise-scale estimate needs n >= 2 samples, got n = {self.n}")
        c_n = 1.0 / self.n if population_size is None else finite_population_factor(self.n, population_size)
        signal = self.sq_norm_of_sum - self.n * c_n * self.sum_sq_norms
        noise = self.n * self.sum_sq_norms - self.sq_norm_of_sum
        return noise / signal if signal > 0 else math.inf

    @property
    def mean_grad_sq_norm(self) -> float:
        """:math:`\\|\\bar G\\|^2 = N / n^2`."""
        return self.sq_norm_of_sum / self.n**2

    @property
    def trace_covariance(self) -> float:
        """:math:`\\operatorname{tr}\\Sigma_n = Q/n - N/n^2` (population convention)."""
        return max(self.sum_sq_norms / self.n - self.mean_grad_sq_norm, 0.0)

    def __str__(self) -> str:
        return (
            f"gradient diversity Δ = {self.diversity:.4g} over n = {self.n} samples "
            f"(B_S = nΔ = {self.batch_size_bound:.4g}, B_simple = {self.noise_scale:.4g})"
        )


def _sum_of_sq_norms(sq_norms: Tensor) -> float:
    """Σ_i of a validated non-empty 1-D tensor of squared norms, in float64."""
    if not isinstance(sq_norms, Tensor) or sq_norms.dim() != 1 or sq_norms.numel() == 0:
        shape = tuple(sq_norms.shape) if isinstance(sq_norms, Tensor) else type(sq_norms).__qualname__
        raise ValueError(f"sq_norms must be a non-empty 1-D tensor [n], got {shape}")
    # two reductions and two scalar reads: a float64 sum of finite float32/float64 entries is finite, and
    # an inf or nan entry makes it inf or nan, so the sum tells finiteness and the minimum the sign
    total = float(sq_norms.sum(dtype=torch.float64))
    if not math.isfinite(total) or float(sq_norms.min()) < 0:
        raise ValueError("sq_norms must be finite and >= 0 (got inf, nan or negative entries)")
    return total


def diversity_from_sq_norms(sq_norms: Tensor, sq_norm_of_sum: float | Tensor) -> DiversityResult:
    """:class:`DiversityResult` from per-sample squared norms :math:`\\|g_i\\|^2` (shape ``[n]``) and
    :math:`\\|\\sum_i g_i\\|^2`, both in the sum scale."""
    return DiversityResult(_sum_of_sq_norms(sq_norms), _as_float(sq_norm_of_sum, "sq_norm_of_sum"), int(sq_norms.numel()))


def diversity_from_grads(per_sample_grads: Tensor) -> DiversityResult:
    """:class:`DiversityResult` from materialised per-sample gradients ``[n, ...]`` (dims after the
    first are flattened); computed in float64."""
    if not isinstance(per_sample_grads, Tensor) or per_sample_grads.dim() < 1 or per_sample_grads.shape[0] == 0:
        shape = tuple(per_sample_grads.shape) if isinstance(per_sample_grads, Tensor) else type(per_sample_grads).__qualname__
        raise ValueError(f"per_sample_grads must be a tensor [n, ...] with n >= 1, got {shape}")
    grads = per_sample_grads.reshape(per_sample_grads.shape[0], -1).double()
    if not bool(torch.isfinite(grads).all()):
        raise ValueError("per_sample_grads contains inf or nan")
    return DiversityResult(float(grads.square().sum()), float(grads.sum(0).square().sum()), int(grads.shape[0]))


def gradient_diversity(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor) -> DiversityResult:
    """Δ of a batch from one forward and one backward pass (per-sample hooks, ``.grad`` untouched).

    See :func:`gradiv_lib.norms.per_sample_sq_norms_and_grad_sum` for the conventions and errors.
    """
    from gradiv_lib.norms import per_sample_sq_norms_and_grad_sum  # the norms package imports this module

    sq_norms, sq_norm_of_sum, _ = per_sample_sq_norms_and_grad_sum(model, loss_fn, inputs, targets)
    return diversity_from_sq_norms(sq_norms, sq_norm_of_sum)


def expected_minibatch_sq_norm(mean_grad_sq_norm: float, b_simple: float, batch_size: int, *, population_size: int | None = None) -> float:
    """Expected squared norm of a mini-batch mean gradient :math:`\\hat g_B = \\tfrac1B\\sum_j g_{i_j}`.

    With replacement (``population_size=None``; indices i.i.d. uniform over the n samples), exactly

    .. math:: \\mathbb E\\|\\hat g_B\\|^2 = \\|\\bar G\\|^2 + \\frac{\\operatorname{tr}\\Sigma_n}{B}
              = \\|\\bar G\\|^2\\Big(1 + \\frac{\\mathcal B_{\\text{simple}}}{B}\\Big),

    because the :math:`g_{i_j}` are independent with mean :math:`\\bar G` and covariance
    :math:`\\Sigma_n`. Without replacement from ``population_size`` = n samples the variance term
    shrinks by the finite-population factor: :math:`\\|\\bar G\\|^2(1 + \\tfrac{\\mathcal B_{\\text{simple}}}{B}\\tfrac{n-B}{n-1})`.

    Parameters
    ----------
    mean_grad_sq_norm
        :math:`\\|\\bar G\\|^2` (``DiversityResult.mean_grad_sq_norm``).
    b_simple
        :math:`\\mathcal B_{\\text{simple}} = \\operatorname{tr}\\Sigma_n/\\|\\bar G\\|^2` (``DiversityResult.noise_scale``).
    batch_size
        B >= 1 (at most ``population_size`` without replacement).
    population_size
        n, to sample without replacement; ``None`` for sampling with replacement.
    """
    mean_sq = _finite_non_negative(mean_grad_sq_norm, "mean_grad_sq_norm")
    noise = _finite_non_negative(b_simple, "b_simple")
    return mean_sq * (1.0 + noise * finite_population_factor(batch_size, population_size))


def _grad_list(grad: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(grad, Tensor):
        return [grad]
    if isinstance(grad, Sequence) and grad and all(isinstance(g, Tensor) for g in grad):
        return list(grad)
    raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors (e.g. [p.grad for p in params])")


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite, in one fused reduction and one scalar read: an L1 norm is finite
    unless an entry is inf or nan, or (rarely, e.g. float16) the norm overflows; then each tensor is
    checked exactly."""
    norms = torch._foreach_norm(tensors, 1)
    if bool(torch.stack(norms).isfinite().all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _flat_vector(grad: Tensor | Sequence[Tensor], name: str) -> Tensor:
    if isinstance(grad, Tensor):
        return grad.reshape(-1)
    if isinstance(grad, Sequence) and grad and all(isinstance(g, Tensor) for g in grad):
        return torch.cat([g.reshape(-1) for g in grad])
    raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors (e.g. [p.grad for p in params])")


class TwoBatchNoiseScale:
    r"""McCandlish's two-batch estimator of :math:`\mathcal B_{\text{simple}}`, smoothed, for the sampling the
    training loop actually does.

    From the squared norms of batch-*mean* gradients at two batch sizes :math:`B_s < B_b`, using
    :math:`\mathbb E\|G_B\|^2 = |G|^2 + \operatorname{tr}\Sigma\,c_B` with :math:`c_B` of
    :func:`finite_population_factor` (:math:`1/B` with replacement; :math:`\frac{P-B}{B(P-1)}` for batches of a
    shuffled epoch of :math:`P` samples):

    .. math::

        \widehat{|G|^2} = \frac{c_s\|G_{B_b}\|^2 - c_b\|G_{B_s}\|^2}{c_s - c_b}, \qquad
        \widehat{\operatorname{tr}\Sigma} = \frac{\|G_{B_s}\|^2 - \|G_{B_b}\|^2}{c_s - c_b},

    both unbiased (with :math:`c_B = 1/B` these are McCandlish's formulas). Without the correction, batches of a
    finite training set make :math:`\widehat{|G|^2}` too small and the estimate of :math:`\mathcal B_{\text{simple}}`
    too large, without bound as :math:`\mathcal B_{\text{simple}}` approaches :math:`P` and negative beyond. The two
    are smoothed by *separate* exponential moving averages (with bias correction) and only then divided,
    :math:`\mathcal B_{\text{simple}} = \overline{\operatorname{tr}\Sigma} / \overline{|G|^2}` (a ratio of averages:
    biased but stable, unlike an average of ratios).

    Parameters
    ----------
    beta
        EMA decay in [0, 1); 0 keeps only the last update.
    population_size
        :math:`P`, the number of training samples when batches are disjoint parts of shuffled epochs (what
        :func:`gradiv_lib.train` does); ``None`` for batches drawn with replacement.
    """

    def __init__(self, beta: float = 0.99, *, population_size: int | None = None) -> None:
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if population_size is not None:
            population_size = _positive_int(population_size, "population_size")
        self.beta = float(beta)
        self.population_size = population_size
        self._ema_grad_sq_norm = 0.0
        self._ema_trace_covariance = 0.0
        self.updates = 0

    def update(self, small_grad_sq_norm: float | Tensor, big_grad_sq_norm: float | Tensor, b_small: float, b_big: float) -> tuple[float, float]:
        r"""Add one pair of measurements; returns this update's unbiased :math:`(\widehat{|G|^2}, \widehat{\operatorname{tr}\Sigma})`.

        Parameters
        ----------
        small_grad_sq_norm, big_grad_sq_norm
            :math:`\|G_{B_s}\|^2` and :math:`\|G_{B_b}\|^2` of batch-mean gradients (an average of
            several small-batch values is also unbiased).
        b_small, b_big
            The batch sizes, :math:`0 < B_s < B_b` (integers, at most ``population_size``).
        """
        small = _finite_non_negative(small_grad_sq_norm, "small_grad_sq_norm")
        big = _finite_non_negative(big_grad_sq_norm, "big_grad_sq_norm")
        b_s, b_b = _as_float(b_small, "b_small"), _as_float(b_big, "b_big")
        if not (0 < b_s < b_b and math.isfinite(b_b)):
            raise ValueError(f"need 0 < b_small < b_big, got b_small = {b_small!r}, b_big = {b_big!r}")
        if self.population_size is None:
            c_s, c_b = 1.0 / b_s, 1.0 / b_b
        else:
            if b_s != int(b_s) or b_b != int(b_b):
                raise ValueError(f"b_small and b_big must be whole numbers of samples with population_size set, "
                                 f"got {b_small!r} and {b_big!r}")
            c_s = finite_population_factor(int(b_s), self.population_size)
            c_b = finite_population_factor(int(b_b), self.population_size)
        grad_sq_norm = (c_s * big - c_b * small) / (c_s - c_b)
        trace_covariance = (small - big) / (c_s - c_b)
        self._ema_grad_sq_norm = self.beta * self._ema_grad_sq_norm + (1.0 - self.beta) * grad_sq_norm
        self._ema_trace_covariance = self.beta * self._ema_trace_covariance + (1.0 - self.beta) * trace_covariance
        self.updates += 1
        return grad_sq_norm, trace_covariance

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the EMAs, the update count and the settings."""
        return {"beta": self.beta, "population_size": self.population_size, "updates": self.updates,
                "ema_grad_sq_norm": self._ema_grad_sq_norm, "ema_trace_covariance": self._ema_trace_covariance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also the attribute dict older checkpoints stored)."""
        state = {key.lstrip("_"): value for key, value in state.items()}
        self.beta, self.updates = float(state["beta"]), int(state["updates"])
        self.population_size = state.get("population_size", self.population_size)
        self._ema_grad_sq_norm = float(state["ema_grad_sq_norm"])
        self._ema_trace_covariance = float(state["ema_trace_covariance"])

    def update_from_grads(self, microbatch_grads: Sequence[Tensor | Sequence[Tensor]], microbatch_size: int, *, reduction: Reduction = "mean") -> tuple[float, float]:
        """Update from k >= 2 gradients of equal-size micro-batches (or workers) of the same step.

        Uses :math:`B_s` = ``microbatch_size`` with :math:`\\|G_{B_s}\\|^2` averaged over the k
        micro-batches, and :math:`B_b = k B_s` with :math:`G_{B_b}` their mean.

        Parameters
        ----------
        microbatch_grads
            One gradient per micro-batch: a tensor, or a sequence of tensors (e.g. per parameter).
        microbatch_size
            Samples per micro-batch.
        reduction
            ``"mean"`` if each gradient is of the micro-batch mean loss, ``"sum"`` if of its summed loss.
        """
        _check_reduction(reduction, "reduction")
        size = _positive_int(microbatch_size, "microbatch_size")
        if isinstance(microbatch_grads, Tensor) or len(microbatch_grads) < 2:
            raise ValueError("microbatch_grads must be a sequence of at least 2 micro-batch gradients")
        vectors = [_flat_vector(g, "each micro-batch gradient").double() for g in microbatch_grads]
        if len({v.shape for v in vectors}) != 1:
            raise ValueError(f"micro-batch gradients differ in size: {sorted({v.numel() for v in vectors})}")
        stacked = torch.stack(vectors) / (size if reduction == "sum" else 1)
        small = float(stacked.square().sum(1).mean())
        big = float(stacked.mean(0).square().sum())
        return self.update(small, big, size, size * len(vectors))

    def _corrected(self, ema: float) -> float:
        if self.updates == 0:
            raise RuntimeError("TwoBatchNoiseScale has no updates yet; call update() first")
        return ema / (1.0 - self.beta**self.updates)

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed estimate of :math:`|G|^2` (may be negative when the batch is noise-dominated)."""
        return self._corrected(self._ema_grad_sq_norm)

    @property
    def trace_covariance(self) -> float:
        """Smoothed estimate of :math:`\\operatorname{tr}\\Sigma` (per-sample covariance, mean convention)."""
        return self._corrected(self._ema_trace_covariance)

    @property
    def b_simple(self) -> float:
        """:math:`\\overline{\\operatorname{tr}\\Sigma} / \\overline{|G|^2}`; ``inf`` while :math:`\\overline{|G|^2} \\le 0`."""
        signal = self.grad_sq_norm
        return self.trace_covariance / signal if signal > 0 else math.inf


class EpochDiversityAccumulator:
    """Δ over an epoch of batches taken at moving weights (DiveBatch's measurement epoch).

    Accumulates :math:`Q = \\sum_b\\sum_{i\\in b}\\|\\nabla\\ell_i(w_b)\\|^2` and the vector
    :math:`S = \\sum_b\\sum_{i\\in b}\\nabla\\ell_i(w_b)`, with :math:`w_b` the weights when batch b was
    processed; :attr:`result` is :math:`\\Delta = Q/\\|S\\|^2` over all :math:`n = \\sum_b n_b` samples.
    Unlike DiveBatch's code (which adds batch-mean gradients and norms scaled by :math:`1/B^2`, and so
    mis-weights a ragged last batch) every batch is rescaled to the sum scale by its own sample
    count, so for fixed weights the result equals the full-batch Δ for any partition.

    Parameters
    ----------
    dtype
        Accumulation dtype of :math:`S` (float64 by default).
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self._sum_sq_norms = 0.0
        self._unchecked_sq_norms: Tensor | None = None  # update(validate=False): a device-side float64 sum
        self._grad_sum: Tensor | None = None
        self._layout: tuple[torch.Size, ...] | None = None
        self._layout_views: list[Tensor] = []
        self.n = 0

    def update(
        self,
        sq_norms: Tensor | float,
        grad: Tensor | Sequence[Tensor],
        n: int,
        *,
        grad_reduction: Reduction = "sum",
        sq_norms_reduction: Reduction = "sum",
        validate: bool = True,
    ) -> None:
        """Add one batch of ``n`` samples.

        Parameters
        ----------
        sq_norms
            Per-sample squared gradient norms (tensor ``[n]``), or their sum (a number or 0-d tensor).
        grad
            The batch gradient, a tensor or a sequence of tensors such as ``[p.grad for p in params]``.
        n
            Number of samples in the batch.
        grad_reduction
            ``"sum"`` if ``grad`` is the gradient of :math:`\\sum_i\\ell_i`, ``"mean"`` if of
            :math:`\\tfrac1n\\sum_i\\ell_i` (then it is multiplied by n).
        sq_norms_reduction
            ``"sum"`` if ``sq_norms`` are :math:`\\|\\nabla\\ell_i\\|^2` (what :mod:`gradiv_lib.norms`
            returns), ``"mean"`` if they are :math:`\\|\\nabla\\ell_i/n\\|^2` (BackPACK's ``BatchL2Grad`` for a
            mean loss; then multiplied by :math:`n^2`).
        validate
            ``True``: check every batch (finite, non-negative, matching sizes), which reads three scalars
            from the device. ``False`` (for a training loop that adds every step): sizes are still
            checked, but the values are added on the device without a host synchronisation; a non-finite
            value then makes :attr:`result` raise at the end of the epoch instead.
        """
        size = _positive_int(n, "n")
        _check_reduction(grad_reduction, "grad_reduction")
        _check_reduction(sq_norms_reduction, "sq_norms_reduction")
        if isinstance(sq_norms, Tensor) and sq_norms.dim() == 1:
            if sq_norms.numel() != size:
                raise ValueError(f"sq_norms has {sq_norms.numel()} entries but n = {size}")
            # validate=False: a device-side float64 sum, checked when the result is read
            total = _sum_of_sq_norms(sq_norms) if validate else sq_norms.sum(dtype=torch.float64)
        else:
            total = _finite_non_negative(sq_norms, "sq_norms")
        grads = _grad_list(grad, "grad")
        entries = sum(g.numel() for g in grads)
        if self._grad_sum is not None and entries != self._grad_sum.numel():
            raise ValueError(f"grad has {entries} entries, earlier batches had {self._grad_sum.numel()}")
        if validate and not _all_finite(grads):
            raise ValueError("grad contains inf or nan")
        if self._grad_sum is None:
            self._grad_sum = torch.zeros(entries, dtype=self.dtype, device=grads[0].device)
        # added in place, parameter by parameter, into views of one flat buffer: no concatenated copy and
        # no float64 temporary per batch (the float32 entries are promoted inside the addition)
        torch._foreach_add_(self._views(grads), grads, alpha=size if grad_reduction == "mean" else 1)
        if sq_norms_reduction == "mean":
            total = total * size**2
        if isinstance(total, Tensor):
            self._unchecked_sq_norms = total if self._unchecked_sq_norms is None else self._unchecked_sq_norms.add_(total)
        else:
            self._sum_sq_norms += total
        self.n += size

    def _views(self, grads: list[Tensor]) -> list[Tensor]:
        """Views of the flat sum buffer shaped like ``grads`` (cached for the last layout seen)."""
        shapes = tuple(g.shape for g in grads)
        if self._layout != shapes:
            views, start = [], 0
            for g in grads:
                views.append(self._grad_sum[start : start + g.numel()].view(g.shape))
                start += g.numel()
            self._layout, self._layout_views = shapes, views
        return self._layout_views

    @property
    def result(self) -> DiversityResult:
        """:class:`DiversityResult` over all samples added since the last :meth:`reset`."""
        if self._grad_sum is None:
            raise RuntimeError("EpochDiversityAccumulator is empty; call update() with at least one batch")
        sum_sq_norms = self._sum_sq_norms
        if self._unchecked_sq_norms is not None:  # batches added with validate=False are checked here
            sum_sq_norms += float(self._unchecked_sq_norms)
            if not math.isfinite(sum_sq_norms):
                raise ValueError(
                    f"the per-sample squared norms added since the last reset() sum to {sum_sq_norms}: a batch "
                    "added with validate=False had an inf or nan loss or gradient (update(..., validate=True) "
                    "names the batch)"
                )
        # DiversityResult refuses a non-finite or negative sum and a non-finite ‖S‖² (inf or nan gradients)
        return DiversityResult(sum_sq_norms, float(self._grad_sum.square().sum()), self.n)
