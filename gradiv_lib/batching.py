"""Batch-size schedules: fixed, AdaBatch, DiveBatch and a noise-scale rule, with learning-rate rescaling.

Derived in chapter 4 of the book (``book/ch04_divebatch``).

Every schedule has one interface, so a training loop (:func:`gradiv_lib.training.train` or your own)
swaps adaptive batch sizes in by changing one line:

* :attr:`~BatchSchedule.batch_size` — the batch size of the coming epoch;
* :attr:`~BatchSchedule.lr_scale` — the cumulative learning-rate multiplier relative to the start;
* :meth:`~BatchSchedule.begin_epoch` — call at the start of every epoch; afterwards
  :attr:`~BatchSchedule.needs_diversity` says whether this epoch needs per-sample gradient norms
  (so the loop pays for them only then) and :attr:`~BatchSchedule.needs_grad` whether it needs the
  batch gradient;
* :meth:`~BatchSchedule.observe` — once per batch, after ``loss.backward()`` and before
  ``optimizer.step()``;
* :meth:`~BatchSchedule.end_epoch` — returns a :class:`Resize` (new batch size, learning-rate
  factor to apply to the optimizer) or ``None``;
* :meth:`~BatchSchedule.state_dict` / :meth:`~BatchSchedule.load_state_dict` — plain numbers, for
  checkpoints loaded with ``torch.load(..., weights_only=True)``.

**DiveBatch** (Chen, Wang & Sundaram 2025; the rule of the authors' code). Every ``resize_every``
epochs, during the epoch that ends the period, gradient diversity is accumulated over all batches,

.. math:: \\hat\\Delta = \\frac{\\sum_b\\sum_{i\\in b}\\|\\nabla\\ell_i(w_b)\\|^2}
          {\\|\\sum_b\\sum_{i\\in b}\\nabla\\ell_i(w_b)\\|^2},

(:class:`gradiv_lib.diversity.EpochDiversityAccumulator`; :math:`w_b` are the weights when batch
:math:`b` was processed) and then

.. math:: B \\leftarrow \\operatorname{clamp}\\big(\\max(\\lfloor\\delta N\\hat\\Delta\\rfloor, B),\\,
          B_{\\min},\\, B_{\\max}\\big),

a fraction :math:`\\delta` of Yin et al.'s batch-size bound :math:`B_S = N\\Delta`, never shrinking
(``rule="cifar10"``, the default: the rule of the authors' CIFAR-10 script and of their final CIFAR-100
script, which uses :math:`\\delta = 0.01`). Their early CIFAR-100 script grew the batch by the ratio
:math:`\\max(\\hat\\Delta, 1)` instead (``rule="cifar100_ratio"``, with its own learning-rate rescale
``lr_rule="ratio"``); :func:`cifar100_code_lr` and :func:`cifar100_code_lr_scheduler` give the learning
rate of their final CIFAR-100 script. A non-finite :math:`\\hat\\Delta` (gradients that cancel) sends
:math:`B` to :math:`B_{\\max}` as in the authors' code; once :math:`B = B_{\\max}` nothing is measured
any more.

**AdaBatch** (Devarakonda, Naumov & Garland 2017): multiply :math:`B` by ``factor`` (2) every
``resize_every`` epochs up to :math:`B_{\\max}`; the learning rate follows ``lr_rule`` or is multiplied
by a fixed ``lr_factor`` at each resize (the paper: 0.75 with every doubling, on top of its decay).

**Noise scale** (McCandlish et al. 2018): :class:`gradiv_lib.diversity.TwoBatchNoiseScale` estimates
:math:`\\mathcal B_{\\text{simple}}` from batch gradients only (``window`` consecutive batches of size
:math:`B` form one batch of size ``window``·:math:`B`), and every ``resize_every`` epochs
:math:`B \\leftarrow \\operatorname{clamp}(\\max(\\lfloor\\delta\\hat{\\mathcal B}_{\\text{simple}}\\rfloor, B), B_{\\min}, B_{\\max})`.

**Learning-rate rules** at a resize from :math:`B` to :math:`B'`: ``"none"`` keeps it,
``"linear"`` multiplies by :math:`B'/B`, ``"sqrt"`` by :math:`\\sqrt{B'/B}`; ``lr_cap`` bounds the
cumulative multiplier :attr:`~BatchSchedule.lr_scale` from above.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .diversity import DiversityResult, EpochDiversityAccumulator, TwoBatchNoiseScale

__all__ = [
    "DIVEBATCH_LR_RULES",
    "DIVEBATCH_RULES",
    "LR_RULES",
    "AdaBatch",
    "BatchSchedule",
    "DiveBatch",
    "FixedBatch",
    "NoiseScaleBatch",
    "Resize",
    "cifar100_code_lr",
    "cifar100_code_lr_scheduler",
    "lr_multiplier",
]

#: Learning-rate rescale rules at a batch-size change.
LR_RULES: tuple[str, ...] = ("none", "linear", "sqrt")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_batch(value: Any, name: str, n_samples: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    upper = "N" if n_samples is None else f"N = {n_samples}"
    if value < 1 or (n_samples is not None and value > n_samples):
        raise ValueError(f"{name} must be in [1, {upper}], got {value}")
    return value


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_lr_rule(rule: Any) -> str:
    if rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {', '.join(map(repr, LR_RULES))}; got {rule!r}")
    return rule


def lr_multiplier(rule: str, old_batch_size: int, new_batch_size: int) -> float:
    """Learning-rate factor of ``rule`` for a batch change ``old → new``: 1, ``new/old`` or ``sqrt(new/old)``."""
    _check_lr_rule(rule)
    _check_positive_int(old_batch_size, "old_batch_size")
    _check_positive_int(new_batch_size, "new_batch_size")
    ratio = new_batch_size / old_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


@dataclass(frozen=True)
class Resize:
    """A batch-size change decided at the end of an epoch; it takes effect from the next epoch.

    Attributes
    ----------
    epoch : int
        The epoch (0-based) at whose end the change was decided.
    old_batch_size, new_batch_size : int
        Batch size before and after.
    old_lr_scale, new_lr_scale : float
        Cumulative learning-rate multiplier before and after (see :attr:`BatchSchedule.lr_scale`).
    estimate : float or None
        The signal behind the decision: :math:`N\\hat\\Delta` for DiveBatch,
        :math:`\\hat{\\mathcal B}_{\\text{simple}}` for the noise-scale rule, ``None`` for AdaBatch.
    """

    epoch: int
    old_batch_size: int
    new_batch_size: int
    old_lr_scale: float
    new_lr_scale: float
    estimate: float | None = None

    @property
    def lr_factor(self) -> float:
        """Multiply the optimizer's learning rates by this (``new_lr_scale / old_lr_scale``)."""
        return self.new_lr_scale / self.old_lr_scale

    def to_dict(self) -> dict[str, Any]:
        """Plain-number dictionary (for checkpoints and JSON)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class BatchSchedule:
    """Common interface of all batch-size schedules (see the module docstring).

    Subclasses set the batch size through :meth:`_resize`, which applies the clamps, the
    learning-rate rule and the cap, and returns the :class:`Resize` (or ``None`` when nothing
    changes).
    """

    #: Short name used in histories and figures (``gl.plotting.method_color``).
    name: str = "schedule"

    def __init__(self, batch_size: int, *, max_batch_size: int | None = None, min_batch_size: int | None = None,
                 lr_rule: str = "none", lr_cap: float | None = None) -> None:
        self.initial_batch_size = _check_batch(batch_size, "batch_size")
        self.max_batch_size = batch_size if max_batch_size is None else _check_batch(max_batch_size, "max_batch_size")
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch_size must be <= max_batch_size = {self.max_batch_size}, got {batch_size}")
        self.min_batch_size = batch_size if min_batch_size is None else _check_batch(min_batch_size, "min_batch_size")
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size must be <= max_batch_size = {self.max_batch_size}, got {self.min_batch_size}"
            )
        self.lr_rule = _check_lr_rule(lr_rule)
        self.lr_cap = None if lr_cap is None else _check_positive(lr_cap, "lr_cap")
        if self.lr_cap is not None and self.lr_cap < 1:
            raise ValueError(f"lr_cap bounds the cumulative learning-rate multiplier and must be >= 1, got {lr_cap}")
        self.n_samples: int | None = None
        self.batch_size = batch_size
        self.lr_scale = 1.0
        self.epoch = -1
        self.resizes: list[Resize] = []

    # --- interface --------------------------------------------------------------------------

    def bind(self, n_samples: int) -> BatchSchedule:
        """Attach the training-set size N; checks that every batch size the schedule may use is in [1, N]."""
        n = _check_positive_int(n_samples, "n_samples")
        for name in ("batch_size", "min_batch_size", "max_batch_size"):
            _check_batch(getattr(self, name), name, n)
        self.n_samples = n
        return self

    def begin_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (0-based); sets :attr:`needs_diversity` / :attr:`needs_grad` for it."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    @property
    def needs_diversity(self) -> bool:
        """Whether :meth:`observe` needs per-sample squared gradient norms in the current epoch."""
        return False

    @property
    def needs_grad(self) -> bool:
        """Whether :meth:`observe` needs the batch gradient in the current epoch."""
        return self.needs_diversity

    def observe(self, *, n: int, grad: Sequence[Tensor | None] | Tensor | None = None, sq_norms: Tensor | float | None = None,
                grad_reduction: str = "mean") -> None:
        """Report one batch of ``n`` samples, after ``loss.backward()`` and before ``optimizer.step()``.

        Parameters
        ----------
        n : int
            Samples in the batch.
        grad : list of tensors or tensor, optional
            The batch gradient, e.g. ``[p.grad for p in params]`` (``None`` entries count as zeros,
            but then pass ``params`` order consistently). Needed when :attr:`needs_grad`.
        sq_norms : tensor ``[n]`` or float, optional
            Per-sample squared norms :math:`\\|\\nabla\\ell_i\\|^2` (sum scale, as
            :mod:`gradiv_lib.norms` returns them), or their sum. Needed when :attr:`needs_diversity`.
        grad_reduction : str
            ``"mean"`` if ``grad`` is the gradient of the batch-mean loss, ``"sum"`` of the summed loss.
        """
        _check_positive_int(n, "n")

    def end_epoch(self, epoch: int) -> Resize | None:
        """Finish epoch ``epoch``; returns the batch-size change for the next epoch, if any."""
        if epoch != self.epoch:
            raise ValueError(f"end_epoch({epoch}) does not match begin_epoch({self.epoch}); call begin_epoch first")
        return None

    # --- helpers ----------------------------------------------------------------------------

    def _clamp(self, value: int) -> int:
        return max(self.min_batch_size, min(value, self.max_batch_size))

    def _resize(self, epoch: int, new_batch_size: int, estimate: float | None = None,
                lr_factor: float | None = None) -> Resize | None:
        new = self._clamp(int(new_batch_size))
        if self.n_samples is not None:
            new = min(new, self.n_samples)
        old = self.batch_size
        if new == old:
            return None
        factor = lr_multiplier(self.lr_rule, old, new) if lr_factor is None else lr_factor
        new_scale = self.lr_scale * factor
        if self.lr_cap is not None:
            new_scale = min(new_scale, self.lr_cap)
        resize = Resize(epoch, old, new, self.lr_scale, new_scale, estimate)
        self.batch_size, self.lr_scale = new, new_scale
        self.resizes.append(resize)
        return resize

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state as plain numbers (safe for ``torch.load(weights_only=True)``)."""
        return {
            "name": self.name,
            "batch_size": self.batch_size,
            "lr_scale": self.lr_scale,
            "epoch": self.epoch,
            "resizes": [r.to_dict() for r in self.resizes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the schedule must have been built with the same arguments."""
        if state.get("name") != self.name:
            raise ValueError(f"state is of a {state.get('name')!r} schedule, not {self.name!r}")
        self.batch_size = int(state["batch_size"])
        self.lr_scale = float(state["lr_scale"])
        self.epoch = int(state["epoch"])
        self.resizes = [Resize(**r) for r in state["resizes"]]

    def _repr_args(self) -> str:
        return f"batch_size={self.batch_size}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"


# --------------------------------------------------------------------------------------------
# Fixed batch size
# --------------------------------------------------------------------------------------------


class FixedBatch(BatchSchedule):
    """The same batch size every epoch (plain mini-batch SGD).

    Parameters
    ----------
    batch_size : int
        Samples per batch, in [1, N].
    """

    name = "fixed"

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size)


# --------------------------------------------------------------------------------------------
# AdaBatch
# --------------------------------------------------------------------------------------------


class AdaBatch(BatchSchedule):
    """Grow the batch by ``factor`` every ``resize_every`` epochs up to ``max_batch_size``.

    The resize happens after epoch ``e`` when ``(e + 1) % resize_every == 0`` (the ``--resize-freq``
    of ``NVlabs/AdaBatch`` and of the DiveBatch code), so with ``resize_every=20`` the batch doubles
    before epochs 20, 40, 60, ...

    Parameters
    ----------
    batch_size : int
        Initial batch size.
    max_batch_size : int
        Upper bound (the last step may grow by less than ``factor`` to land on it).
    factor : int
        Batch multiplier per resize (>= 2).
    resize_every : int
        Epochs between resizes.
    lr_rule : str
        ``"none"``, ``"linear"`` (×``factor`` per doubling: the DiveBatch code's AdaBatch with
        ``--adaptive_lr``) or ``"sqrt"``.
    lr_factor : float, optional
        A fixed learning-rate multiplier at every resize instead of a rule (the AdaBatch paper
        uses 0.75 with each doubling); only with ``lr_rule="none"``.
    lr_cap : float, optional
        Upper bound on the cumulative learning-rate multiplier.
    """

    name = "adabatch"

    def __init__(self, batch_size: int, max_batch_size: int, *, factor: int = 2, resize_every: int = 20,
                 lr_rule: str = "none", lr_factor: float | None = None, lr_cap: float | None = None) -> None:
        super().__init__(batch_size, max_batch_size=max_batch_size, lr_rule=lr_rule, lr_cap=lr_cap)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
        self.factor = factor
        self.resize_every = _check_positive_int(resize_every, "resize_every")
        if lr_factor is not None:
            if lr_rule != "none":
                raise ValueError(f"give either lr_factor ({lr_factor}) or lr_rule ({lr_rule!r}), not both")
            lr_factor = _check_positive(lr_factor, "lr_factor")
        self.lr_factor = lr_factor

    def end_epoch(self, epoch: int) -> Resize | None:
        super().end_epoch(epoch)
        if (epoch + 1) % self.resize_every or self.batch_size >= self.max_batch_size:
            return None
        return self._resize(epoch, self.batch_size * self.factor, lr_factor=self.lr_factor)

    def _repr_args(self) -> str:
        return (f"batch_size={self.batch_size}, max_batch_size={self.max_batch_size}, factor={self.factor}, "
                f"resize_every={self.resize_every}, lr_rule={self.lr_rule!r}")


# --------------------------------------------------------------------------------------------
# DiveBatch
# --------------------------------------------------------------------------------------------


def _grad_tensors(grad: Sequence[Tensor | None] | Tensor) -> list[Tensor]:
    """The batch gradient as a list of detached tensors (None entries refused with the way out)."""
    if isinstance(grad, Tensor):
        return [grad.detach()]
    if isinstance(grad, (str, bytes)) or not isinstance(grad, Sequence) or not grad:
        raise TypeError("grad must be a tensor or a non-empty sequence of tensors such as [p.grad for p in params]")
    if any(g is None for g in grad):
        raise ValueError(
            "grad holds None entries (parameters that got no gradient); pass zeros for them, e.g. "
            "[p.grad if p.grad is not None else torch.zeros_like(p) for p in params]"
        )
    return [g.detach() for g in grad]


def _flat(grad: Sequence[Tensor | None] | Tensor) -> Tensor:
    return torch.cat([g.reshape(-1) for g in _grad_tensors(grad)])


#: DiveBatch's batch-size rules (see :class:`DiveBatch`).
DIVEBATCH_RULES: tuple[str, ...] = ("cifar10", "cifar100_ratio")

#: Learning-rate rules of :class:`DiveBatch`: the common ones and, with ``rule="cifar100_ratio"`` only,
#: ``"ratio"`` (multiply by the growth ratio :math:`\\max(\\hat\\Delta, 1)`).
DIVEBATCH_LR_RULES: tuple[str, ...] = LR_RULES + ("ratio",)


class DiveBatch(BatchSchedule):
    """Diversity-driven batch size, with the two rules of the authors' code.

    Measures :math:`\\hat\\Delta` over the whole epoch that ends each period of ``resize_every``
    epochs (epochs ``e`` with ``(e + 1) % resize_every == 0``) while :math:`B < B_{\\max}`, then
    resizes. ``N`` is the number of samples observed in the measurement epoch (the training-set
    size), so :math:`N\\hat\\Delta` is the epoch estimate of :math:`B_S`.

    **rule="cifar10"** (default) — ``chenyuen0103/pytorch-cifar``, ``src/main_cifar10.py``, and the
    final ``train.py`` of ``chenyuen0103/pytorch-cifar100`` (from commit f7d98c0, 16 Jan 2025, with
    :math:`\\delta = 0.01` in its ``exp_config_divebatch.json``):

    .. math:: B' = \\operatorname{clamp}\\big(\\max(\\lfloor\\delta N\\hat\\Delta\\rfloor, B),\\,
              B_{\\min},\\, B_{\\max}\\big),

    a fraction :math:`\\delta` of Yin et al.'s bound :math:`B_S = N\\Delta`, never shrinking. With
    ``lr_rule="linear"`` (the code's ``--adaptive_lr``) :math:`\\eta \\leftarrow \\eta\\,B'/B`.

    **rule="cifar100_ratio"** — the first CIFAR-100 ``train.py`` (commits 7605f00 to 59eae1f,
    28 Dec 2024 to 1 Jan 2025, the version that wrote the logs kept in that history):

    .. math:: B' = \\operatorname{clamp}\\big(\\lfloor B\\,\\max(\\hat\\Delta, 1)\\rfloor,\\,
              B_{\\min},\\, B_{\\max}\\big).

    The code writes the factor as :math:`\\max(\\hat\\Delta/\\hat\\Delta_{\\text{old}}, 1)` but never
    updates :math:`\\hat\\Delta_{\\text{old}}` from its initial value 1, so the factor is
    :math:`\\max(\\hat\\Delta, 1)`: its logs go 128 → 635 → 2048 with :math:`\\hat\\Delta` = 4.9654 and
    3.5506 (:math:`\\lfloor 128\\cdot 4.9654\\rfloor = 635`, :math:`635\\cdot 3.5506 > 2048`); a true
    ratio would have kept 635. :math:`N` and :math:`\\delta` play no part (``delta`` must be left out).
    Its ``--adaptive_lr`` multiplies the rate by the same factor, ``lr_rule="ratio"``:
    :math:`\\eta \\leftarrow \\eta\\max(\\hat\\Delta, 1)` (not :math:`B'/B`: the factor is neither
    truncated nor capped at :math:`B_{\\max}`; after a non-finite :math:`\\hat\\Delta`, where the code fails,
    the factor is :math:`B_{\\max}/B`). In that script the next epoch's closed-form
    ``MultiStepLR.step(epoch)`` overwrote the rescaled rate, so it never lasted more than one epoch;
    here it persists, as the code evidently intended. When :math:`B' = B` nothing changes here, the
    learning rate included (the code would still multiply it by :math:`\\hat\\Delta \\in (1, 1 + 1/B)`).

    The final CIFAR-100 script's ``--adaptive_lr`` differs from the CIFAR-10 one: see
    :func:`cifar100_code_lr`.

    Parameters
    ----------
    batch_size : int
        Initial batch size :math:`B_0` (128 in the CIFAR configs).
    max_batch_size : int
        :math:`B_{\\max}` (2048).
    rule : str
        ``"cifar10"`` or ``"cifar100_ratio"`` (above).
    delta : float, optional
        :math:`\\delta > 0`, the fraction of :math:`B_S` to use with ``rule="cifar10"`` (default 0.1, as
        on CIFAR-10; 0.01 in the CIFAR-100 and Tiny-ImageNet configs). Not used by ``"cifar100_ratio"``.
    resize_every : int
        Epochs per measurement and resize (20 in the configs).
    min_batch_size : int, optional
        :math:`B_{\\min}`, default :math:`B_0`. The batch never shrinks; a :math:`B_{\\min} > B_0`
        lifts the batch to at least :math:`B_{\\min}` at the first resize (the ``min_batch_size``
        clamp of the authors' trainer class).
    lr_rule : str
        ``"none"``, ``"linear"`` (:math:`\\eta \\leftarrow \\eta B'/B`), ``"sqrt"``, or with
        ``rule="cifar100_ratio"`` also ``"ratio"`` (:math:`\\eta \\leftarrow \\eta\\max(\\hat\\Delta, 1)`).
    lr_cap : float, optional
        Upper bound on the cumulative learning-rate multiplier (guards against the large linear
        jumps that destabilise momentum SGD when :math:`B` leaps to :math:`B_{\\max}`).

    Attributes
    ----------
    measurements : list of (epoch, DiversityResult)
        Every epoch estimate, in order.
    """

    name = "divebatch"

    def __init__(self, batch_size: int, max_batch_size: int, *, rule: str = "cifar10", delta: float | None = None,
                 resize_every: int = 20, min_batch_size: int | None = None, lr_rule: str = "none",
                 lr_cap: float | None = None) -> None:
        if rule not in DIVEBATCH_RULES:
            raise ValueError(f"rule must be one of {', '.join(map(repr, DIVEBATCH_RULES))}; got {rule!r}")
        if lr_rule == "ratio" and rule != "cifar100_ratio":
            raise ValueError(f"lr_rule='ratio' (multiply by max(Δ̂, 1)) belongs to rule='cifar100_ratio', not rule={rule!r}")
        if lr_rule not in DIVEBATCH_LR_RULES:
            raise ValueError(f"lr_rule must be one of {', '.join(map(repr, LR_RULES))} (or 'ratio' with "
                             f"rule='cifar100_ratio'); got {lr_rule!r}")
        super().__init__(batch_size, max_batch_size=max_batch_size, min_batch_size=min_batch_size,
                         lr_rule="none" if lr_rule == "ratio" else lr_rule, lr_cap=lr_cap)
        self.lr_rule = lr_rule
        self.rule = rule
        if rule == "cifar100_ratio":
            if delta is not None:
                raise ValueError(f"delta is not used by rule='cifar100_ratio' (B grows by the factor max(Δ̂, 1)); "
                                 f"leave it out, got delta={delta!r}")
            self.delta = None
        else:
            self.delta = 0.1 if delta is None else _check_positive(delta, "delta")
        self.resize_every = _check_positive_int(resize_every, "resize_every")
        self._accumulator = EpochDiversityAccumulator()
        self.measurements: list[tuple[int, DiversityResult]] = []

    def measures(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` is a measurement epoch at the current batch size."""
        return (epoch + 1) % self.resize_every == 0 and self.batch_size < self.max_batch_size

    @property
    def needs_diversity(self) -> bool:
        return self.epoch >= 0 and self.measures(self.epoch)

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self._accumulator.reset()

    def observe(self, *, n: int, grad=None, sq_norms=None, grad_reduction: str = "mean") -> None:
        super().observe(n=n)
        if not self.needs_diversity:
            return
        if grad is None or sq_norms is None:
            raise ValueError(
                f"DiveBatch measures in epoch {self.epoch}: observe() needs grad= (the batch gradient) and "
                "sq_norms= (per-sample squared norms, e.g. DiversityMeter(model).sq_norms)"
            )
        # per parameter into the accumulator's flat buffer (no concatenated copy per step) and without a
        # host synchronisation: a non-finite batch makes end_epoch raise (EpochDiversityAccumulator.update)
        self._accumulator.update(sq_norms, _grad_tensors(grad), n, grad_reduction=grad_reduction, validate=False)

    @property
    def last_measurement(self) -> DiversityResult | None:
        """The most recent epoch estimate (``None`` before the first)."""
        return self.measurements[-1][1] if self.measurements else None

    def target_batch_size(self, result: DiversityResult) -> float:
        """The rule's unclamped, untruncated target for an epoch estimate (``inf`` when :math:`\\hat\\Delta` is not finite).

        :math:`\\delta N\\hat\\Delta` with ``rule="cifar10"``, :math:`B\\max(\\hat\\Delta, 1)` with ``"cifar100_ratio"``.
        """
        if self.rule == "cifar100_ratio":
            diversity = result.diversity
            return self.batch_size * max(diversity, 1.0) if math.isfinite(diversity) else math.inf
        bound = result.batch_size_bound
        return self.delta * bound if math.isfinite(bound) else math.inf

    def end_epoch(self, epoch: int) -> Resize | None:
        super().end_epoch(epoch)
        if not self.measures(epoch):
            return None
        if self._accumulator.n == 0:
            raise RuntimeError(f"DiveBatch: epoch {epoch} was a measurement epoch but observe() received no batch")
        result = self._accumulator.result
        self._accumulator.reset()
        self.measurements.append((epoch, result))
        target = self.target_batch_size(result)
        proposal = self.max_batch_size if not math.isfinite(target) else max(math.floor(target), self.batch_size)
        lr_factor = None
        if self.lr_rule == "ratio":
            lr_factor = max(result.diversity, 1.0) if math.isfinite(result.diversity) else self.max_batch_size / self.batch_size
        return self._resize(epoch, proposal, estimate=result.batch_size_bound, lr_factor=lr_factor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["measurements"] = [
            {"epoch": e, "sum_sq_norms": r.sum_sq_norms, "sq_norm_of_sum": r.sq_norm_of_sum, "n": r.n}
            for e, r in self.measurements
        ]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.measurements = [(int(m["epoch"]), DiversityResult(m["sum_sq_norms"], m["sq_norm_of_sum"], int(m["n"])))
                             for m in state["measurements"]]
        self._accumulator.reset()

    def _repr_args(self) -> str:
        return (f"batch_size={self.batch_size}, max_batch_size={self.max_batch_size}, rule={self.rule!r}, "
                f"delta={self.delta}, resize_every={self.resize_every}, lr_rule={self.lr_rule!r}, lr_cap={self.lr_cap}")


def cifar100_code_lr(base_lr: float, batch_size: int, initial_batch_size: int, step_factor: float) -> float:
    """Learning rate of the DiveBatch authors' final CIFAR-100 script with ``--adaptive_lr``.

    After every epoch, ``chenyuen0103/pytorch-cifar100/train.py`` (from commit 5ec0851, 1 Jan 2025) calls
    ``MultiStepLR.step(epoch)``, which with an explicit epoch sets the closed-form rate
    :math:`\\eta_0 s` (:math:`s = \\gamma^{k}`, :math:`k` milestones passed), reads
    :math:`s = \\eta/\\eta_0` back, and then multiplies the rate by :math:`B/B_0` and by :math:`s`
    again, every epoch, relative to the *initial* batch:

    .. math:: \\eta = \\eta_0\\,\\frac{B}{B_0}\\,s^2 .

    Because the step resets the rate each epoch the rescale does not compound; but the step factor
    counts twice, so after the milestones [60, 120, 160] with :math:`\\gamma = 0.2` the rate falls by
    :math:`0.04` per milestone, not 0.2 (the CIFAR-10 script's chainable cosine schedule applies its
    factor once). Before the first milestone the rate equals the ``lr_rule="linear"`` one. (That script
    also trains its first epoch at rate 0: a warm-up scheduler is built, which sets the rate to 0, and
    never stepped by its DiveBatch trainer. Not reproduced here.)

    Parameters
    ----------
    base_lr : float
        :math:`\\eta_0` (0.1).
    batch_size, initial_batch_size : int
        :math:`B` (of the coming epoch) and :math:`B_0`.
    step_factor : float
        :math:`s`, the scheduler's factor :math:`\\gamma^k` after the epoch just finished, in (0, 1].
    """
    base_lr = _check_positive(base_lr, "base_lr")
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(initial_batch_size, "initial_batch_size")
    step_factor = _check_positive(step_factor, "step_factor")
    return base_lr * (batch_size / initial_batch_size) * step_factor ** 2


def cifar100_code_lr_scheduler(milestones: Sequence[int] = (60, 120, 160), gamma: float = 0.2) -> Any:
    """Factory ``optimizer -> MultiStepLR`` that, with ``DiveBatch(..., lr_rule="linear")`` in
    :func:`gradiv_lib.training.train`, gives :func:`cifar100_code_lr`'s rates.

    :math:`\\eta_0 (B/B_0) s^2 = \\eta_0 (B/B_0)(\\gamma^2)^k`: a ``MultiStepLR`` with factor
    :math:`\\gamma^2` (0.04) under the linear rescale, which the training loop carries through a
    chainable schedule. Pass it as ``lr_scheduler=`` to reproduce the authors' final CIFAR-100 runs;
    the runs without ``--adaptive_lr`` use the plain factor :math:`\\gamma`.
    """
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence) or not milestones:
        raise ValueError(f"milestones must be a non-empty sequence of epochs, got {milestones!r}")
    steps = [_check_positive_int(m, "milestones") for m in milestones]
    if steps != sorted(set(steps)):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)!r}")
    gamma = _check_positive(gamma, "gamma")
    if gamma > 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma ** 2)

    return factory


# --------------------------------------------------------------------------------------------
# Noise-scale rule
# --------------------------------------------------------------------------------------------


class NoiseScaleBatch(BatchSchedule):
    """Batch size from McCandlish's two-batch noise-scale estimate, no per-sample gradients needed.

    Every batch gradient :math:`G_B` is observed; each run of ``window`` consecutive batches of the
    full size :math:`B` gives one update of :class:`~gradiv_lib.diversity.TwoBatchNoiseScale` with
    :math:`\\|G_{B}\\|^2` averaged over the run (small batch) and the squared norm of the run's mean
    gradient (big batch, :math:`kB` samples), corrected for sampling without replacement from the N
    training samples (both batches are parts of one shuffled epoch). A ragged last batch is skipped, and the run restarts at
    every epoch. Every ``resize_every`` epochs

    .. math:: B \\leftarrow \\operatorname{clamp}\\big(\\max(\\lfloor\\delta\\hat{\\mathcal B}_{\\text{simple}}\\rfloor, B), B_{\\min}, B_{\\max}\\big).

    Because :math:`B_S = 1 + \\mathcal B_{\\text{simple}}`, this is DiveBatch's rule with a different
    estimator (and a difference of :math:`\\delta` samples). Like gpt-neox, the big batch is built from
    gradients at consecutive (slightly different) weights.

    Parameters
    ----------
    batch_size, max_batch_size, delta, resize_every, min_batch_size, lr_rule, lr_cap
        As in :class:`DiveBatch`.
    window : int
        Batches per big-batch estimate, :math:`k \\ge 2`.
    beta : float
        EMA decay of the estimator, in [0, 1).

    Attributes
    ----------
    estimates : list of (epoch, float)
        :math:`\\hat{\\mathcal B}_{\\text{simple}}` at every resize decision.
    """

    name = "noise_scale"

    def __init__(self, batch_size: int, max_batch_size: int, *, delta: float = 0.1, resize_every: int = 1,
                 window: int = 10, beta: float = 0.9, min_batch_size: int | None = None, lr_rule: str = "none",
                 lr_cap: float | None = None) -> None:
        super().__init__(batch_size, max_batch_size=max_batch_size, min_batch_size=min_batch_size,
                         lr_rule=lr_rule, lr_cap=lr_cap)
        self.delta = _check_positive(delta, "delta")
        self.resize_every = _check_positive_int(resize_every, "resize_every")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2 (batches per big batch), got {window!r}")
        self.window = window
        self.estimator = TwoBatchNoiseScale(beta=beta)
        self.estimates: list[tuple[int, float]] = []
        self._reset_window()

    def bind(self, n_samples: int) -> NoiseScaleBatch:
        """Attach N; the estimator then corrects for batches drawn without replacement from the N samples
        (:class:`~gradiv_lib.diversity.TwoBatchNoiseScale` with ``population_size=N``)."""
        super().bind(n_samples)
        self.estimator.population_size = self.n_samples
        return self

    def _reset_window(self) -> None:
        self._sum: Tensor | None = None
        self._sum_sq = 0.0
        self._count = 0

    @property
    def needs_grad(self) -> bool:
        return self.batch_size < self.max_batch_size

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self._reset_window()

    def observe(self, *, n: int, grad=None, sq_norms=None, grad_reduction: str = "mean") -> None:
        super().observe(n=n)
        if not self.needs_grad or n != self.batch_size:
            return
        if grad is None:
            raise ValueError("NoiseScaleBatch.observe() needs grad= (the batch gradient, e.g. [p.grad for p in params])")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
        vector = _flat(grad).double()
        if grad_reduction == "sum":
            vector = vector / n
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("grad contains inf or nan")
        self._sum = vector.clone() if self._sum is None else self._sum.add_(vector)
        self._sum_sq += float(vector.square().sum())
        self._count += 1
        if self._count == self.window:
            small = self._sum_sq / self._count
            big = float((self._sum / self._count).square().sum())
            self.estimator.update(small, big, self.batch_size, self.batch_size * self._count)
            self._reset_window()

    def end_epoch(self, epoch: int) -> Resize | None:
        super().end_epoch(epoch)
        self._reset_window()
        if (epoch + 1) % self.resize_every or self.batch_size >= self.max_batch_size or self.estimator.updates == 0:
            return None
        b_simple = self.estimator.b_simple
        self.estimates.append((epoch, b_simple))
        target = self.delta * b_simple
        proposal = self.max_batch_size if not math.isfinite(target) else max(math.floor(target), self.batch_size)
        return self._resize(epoch, proposal, estimate=b_simple)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["estimator"] = self.estimator.state_dict()
        state["estimates"] = [list(e) for e in self.estimates]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.estimator.load_state_dict(state["estimator"])
        self.estimates = [(int(e), float(v)) for e, v in state["estimates"]]
        self._reset_window()

    def _repr_args(self) -> str:
        return (f"batch_size={self.batch_size}, max_batch_size={self.max_batch_size}, delta={self.delta}, "
                f"resize_every={self.resize_every}, window={self.window}, lr_rule={self.lr_rule!r}")
