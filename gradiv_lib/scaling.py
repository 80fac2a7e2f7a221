"""How the number of SGD steps scales with the batch size, and the batch size that diversity allows.

Derived in chapter 1 of the book (``book/ch01_gradient_diversity``). With per-sample gradients of
diversity :math:`\\Delta` over :math:`n` samples, :math:`B_S = n\\Delta`, the best one-step progress of
mini-batch SGD (sampling with replacement) on an :math:`L`-smooth loss is proportional to
:math:`B / (1 + (B-1)/B_S)`, so the steps to a target follow

.. math:: S(B) = S_{\\min}\\Bigl(1 + \\frac{B_\\text{noise}}{B}\\Bigr),
   \\qquad B_\\text{noise} = B_S - 1 = B_\\text{simple},

the form McCandlish et al. (2018) fit to real training runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def safe_batch_size(batch_size_bound: float, delta: float = 1.0) -> int:
    """Yin et al.'s largest batch with at most a ``(1 + delta)`` loss in per-sample progress: ``floor(delta * B_S) + 1``."""
    if not math.isfinite(batch_size_bound) or batch_size_bound < 1:
        raise ValueError(f"batch_size_bound must be a finite number >= 1 (B_S = n*Delta >= 1), got {batch_size_bound}")
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    return int(math.floor(delta * batch_size_bound)) + 1


def steps_model(batch_sizes, s_min: float, b_noise: float) -> np.ndarray:
    """McCandlish's steps-to-target model ``S(B) = s_min * (1 + b_noise / B)``."""
    b = np.asarray(batch_sizes, dtype=float)
    return s_min * (1 + b_noise / b)


@dataclass(frozen=True)
class CriticalBatchFit:
    """A fit of ``S(B) = s_min (1 + b_noise / B)`` to measured steps; ``b_noise`` is the critical batch size."""

    s_min: float
    b_noise: float
    rms_log_error: float

    def predict(self, batch_sizes) -> np.ndarray:
        return steps_model(batch_sizes, self.s_min, self.b_noise)


def fit_critical_batch(batch_sizes, steps, *, b_noise_grid=None) -> CriticalBatchFit:
    """Least-squares fit, in log space, of ``S(B) = s_min (1 + b_noise / B)`` to measured steps.

    For every ``b_noise`` on a log grid the best ``s_min`` is closed-form (a mean of logs); the grid point
    with the smallest squared log-error wins.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.ndim != 1 or b.shape != s.shape or len(b) < 2:
        raise ValueError(f"batch_sizes and steps must be 1-D of the same length >= 2, got shapes {b.shape} and {s.shape}")
    if np.any(b < 1) or np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("batch_sizes must be >= 1 and steps finite and > 0 (drop runs that never reached the target)")
    grid = np.geomspace(0.05, 64 * b.max(), 2000) if b_noise_grid is None else np.asarray(b_noise_grid, float)
    log_model = np.log1p(grid[:, None] / b[None, :])              # (grid, B)
    log_s_min = (np.log(s)[None, :] - log_model).mean(axis=1)      # best s_min for each b_noise
    residual = np.log(s)[None, :] - log_model - log_s_min[:, None]
    err = (residual ** 2).mean(axis=1)
    k = int(np.argmin(err))
    return CriticalBatchFit(s_min=float(np.exp(log_s_min[k])), b_noise=float(grid[k]), rms_log_error=float(err[k] ** 0.5))


def least_squares_steps_to_target(features: torch.Tensor, targets: torch.Tensor, batch_size: int, lrs,
                                  *, target_fraction: float = 1e-3, max_steps: int = 20_000,
                                  generator: torch.Generator | None = None) -> tuple[int, float]:
    """Fewest mini-batch SGD steps to bring the least-squares loss below ``target_fraction`` of its start.

    Runs SGD on :math:`F(w) = \\frac{1}{2n}\\lVert Xw - y\\rVert^2` from :math:`w = 0`, one run per learning
    rate in ``lrs``, all runs vectorised and sharing the batches (indices drawn with replacement). Returns
    ``(steps, lr)`` of the best learning rate, or ``(max_steps + 1, nan)`` when none reaches the target.
    """
    n, d = features.shape
    if not 1 <= batch_size:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lr = torch.as_tensor(lrs, dtype=features.dtype, device=features.device).flatten()
    if lr.numel() == 0 or torch.any(lr <= 0):
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs}")
    w = torch.zeros(len(lr), d, dtype=features.dtype, device=features.device)
    loss0 = 0.5 * (targets ** 2).mean()
    target = target_fraction * loss0
    alive = torch.ones(len(lr), dtype=torch.bool, device=features.device)
    for step in range(1, max_steps + 1):
        idx = torch.randint(n, (batch_size,), generator=generator, device=features.device)
        xb, yb = features[idx], targets[idx]
        residual = w @ xb.T - yb                                    # (runs, B)
        w = w - lr[:, None] * (residual @ xb) / batch_size
        loss = 0.5 * ((w @ features.T - targets) ** 2).mean(dim=1)
        reached = (loss <= target) & alive
        if reached.any():
            best = int(torch.nonzero(reached)[0])
            return step, float(lr[best])
        alive &= torch.isfinite(loss) & (loss < 1e6 * loss0)
        if not alive.any():
            break
    return max_steps + 1, float("nan")
