"""Steps-vs-batch-size model, its fit, Yin's safe batch size, and the least-squares SGD runner."""
import math

import numpy as np
import pytest
import torch

from gradiv_lib import scaling


def test_fit_recovers_known_parameters():
    batch_sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    steps = scaling.steps_model(batch_sizes, s_min=20.0, b_noise=37.0)
    fit = scaling.fit_critical_batch(batch_sizes, steps)
    assert fit.b_noise == pytest.approx(37.0, rel=0.01)
    assert fit.s_min == pytest.approx(20.0, rel=0.01)
    assert fit.rms_log_error < 0.01
    np.testing.assert_allclose(fit.predict(batch_sizes), steps, rtol=0.02)


def test_fit_is_robust_to_multiplicative_noise():
    rng = np.random.default_rng(0)
    batch_sizes = 2 ** np.arange(11)
    steps = scaling.steps_model(batch_sizes, 15.0, 100.0) * np.exp(rng.normal(0, 0.1, len(batch_sizes)))
    assert 60 < scaling.fit_critical_batch(batch_sizes, steps).b_noise < 160


@pytest.mark.parametrize("bad", [dict(batch_sizes=[1], steps=[3]), dict(batch_sizes=[1, 2], steps=[3, 0]),
                                 dict(batch_sizes=[1, 2], steps=[3, math.inf]), dict(batch_sizes=[0, 2], steps=[3, 2])])
def test_fit_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        scaling.fit_critical_batch(**bad)


def test_safe_batch_size():
    assert scaling.safe_batch_size(36.0, delta=1.0) == 37
    assert scaling.safe_batch_size(36.0, delta=0.5) == 19
    assert scaling.safe_batch_size(1.0, delta=0.1) == 1
    with pytest.raises(ValueError, match="batch_size_bound must be a finite number >= 1"):
        scaling.safe_batch_size(0.5)
    with pytest.raises(ValueError, match="delta must be > 0"):
        scaling.safe_batch_size(10, delta=0)


def test_least_squares_steps_fall_with_batch_size_then_plateau():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 32, generator=g, dtype=torch.float64)
    y = X @ torch.randn(32, generator=g, dtype=torch.float64)
    lrs = np.geomspace(0.05, 2.0, 8)
    steps = [scaling.least_squares_steps_to_target(X, y, B, lrs, generator=torch.Generator().manual_seed(1))[0]
             for B in (1, 8, 512)]
    assert steps[0] > 3 * steps[1]           # well below B_S (about d), batching pays
    assert steps[2] < steps[1]               # and it keeps paying a little past it


def test_least_squares_reports_failure_and_validates():
    X = torch.randn(64, 4, dtype=torch.float64)
    y = X @ torch.ones(4, dtype=torch.float64)
    steps, lr = scaling.least_squares_steps_to_target(X, y, 4, [1e-6], max_steps=10)
    assert steps == 11 and math.isnan(lr)
    with pytest.raises(ValueError, match="lrs must be a non-empty list of positive"):
        scaling.least_squares_steps_to_target(X, y, 4, [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        scaling.least_squares_steps_to_target(X, y, 0, [0.1])
