"""The noise-scale estimators under the sampling the training loop does: disjoint batches of shuffled epochs.

A finite problem whose exact B_simple = tr Sigma_P / |G|^2 we set, below and above the number of samples P.
Epochs of a random permutation cut into batches are drawn many times; the corrected estimates of |G|^2 and
tr Sigma must be unbiased (within Monte-Carlo error), and the uncorrected 1/B formulas must not be.
"""
import math

import pytest
import torch

import gradiv_lib as gl
from gradiv_lib.diversity import DiversityResult, TwoBatchNoiseScale, finite_population_factor

P, D = 120, 6


def population(b_simple, seed=0):
    """P per-sample gradients with mean G (|G| = 1) and exactly tr Sigma_P = b_simple."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(P, D, generator=g, dtype=torch.float64)
    noise -= noise.mean(0)
    noise *= math.sqrt(b_simple / noise.square().sum(1).mean())
    mean = torch.zeros(D, dtype=torch.float64)
    mean[0] = 1.0
    grads = mean + noise
    exact_trace = float((grads - grads.mean(0)).square().sum(1).mean())
    assert exact_trace == pytest.approx(b_simple) and float(grads.mean(0).square().sum()) == pytest.approx(1.0)
    return grads


def epoch_estimates(grads, b_small, k, estimator, draws, seed=0):
    """One two-batch update per (window of k consecutive batches of b_small) in each shuffled epoch."""
    g = torch.Generator().manual_seed(seed)
    signal, noise = [], []
    for _ in range(draws):
        order = torch.randperm(P, generator=g)
        for start in range(0, P - P % (b_small * k), b_small * k):
            batches = grads[order[start:start + b_small * k]].reshape(k, b_small, D).mean(1)
            small = float(batches.square().sum(1).mean())
            big = float(batches.mean(0).square().sum())
            s, n = estimator.update(small, big, b_small, b_small * k)
            signal.append(s)
            noise.append(n)
    return torch.tensor(signal), torch.tensor(noise)


@pytest.mark.parametrize("b_simple", [30.0, 600.0])        # below and above the P = 120 samples
def test_corrected_two_batch_estimates_are_unbiased_and_the_old_ones_are_not(b_simple):
    grads = population(b_simple)
    corrected = TwoBatchNoiseScale(beta=0.0, population_size=P)
    signal, noise = epoch_estimates(grads, 10, 6, corrected, draws=1500)
    se_signal, se_noise = signal.std() / len(signal) ** 0.5, noise.std() / len(noise) ** 0.5
    assert abs(float(signal.mean()) - 1.0) < 4 * se_signal
    assert abs(float(noise.mean()) - b_simple) < 4 * se_noise
    naive = TwoBatchNoiseScale(beta=0.0)                       # McCandlish's 1/B formulas on the same batches
    n_signal, n_noise = epoch_estimates(grads, 10, 6, naive, draws=1500)
    # exact expectations of the naive estimates: E|G_B|^2 = |G|^2 + tr Sigma c_B with the finite-population c_B
    c_s, c_b = finite_population_factor(10, P), finite_population_factor(60, P)
    expect_small, expect_big = 1.0 + b_simple * c_s, 1.0 + b_simple * c_b
    naive_signal = (60 * expect_big - 10 * expect_small) / 50
    assert abs(float(n_signal.mean()) - naive_signal) < 4 * n_signal.std() / len(n_signal) ** 0.5
    assert naive_signal < 1.0 - 0.05 * b_simple / 30            # biased low, and more so for larger B_simple
    # the smoothed ratio of the corrected estimator lands near the truth; the naive one is far off or negative
    smoothed = TwoBatchNoiseScale(beta=0.999, population_size=P)
    epoch_estimates(grads, 10, 6, smoothed, draws=1500, seed=1)
    assert smoothed.b_simple == pytest.approx(b_simple, rel=0.15)


def test_single_batch_estimate_with_the_population_correction():
    grads = population(200.0, seed=3)
    g = torch.Generator().manual_seed(0)
    estimates_signal, estimates_noise = [], []
    for _ in range(4000):
        batch = grads[torch.randperm(P, generator=g)[:40]]
        r = gl.diversity.diversity_from_grads(batch)
        c_n = finite_population_factor(40, P)
        # the numerator and denominator of noise_scale_estimate are unbiased for n^2 tr Sigma (1 - c_n) and n^2 |G|^2 (1 - c_n)
        estimates_noise.append(r.n * r.sum_sq_norms - r.sq_norm_of_sum)
        estimates_signal.append(r.sq_norm_of_sum - r.n * c_n * r.sum_sq_norms)
    scale = 40**2 * (1 - finite_population_factor(40, P))
    noise, signal = torch.tensor(estimates_noise) / scale, torch.tensor(estimates_signal) / scale
    assert abs(float(noise.mean()) - 200.0) < 4 * float(noise.std()) / 4000**0.5
    assert abs(float(signal.mean()) - 1.0) < 4 * float(signal.std()) / 4000**0.5


def test_single_batch_estimate_limits():
    r = DiversityResult(sum_sq_norms=30.0, sq_norm_of_sum=100.0, n=10)
    assert r.noise_scale_estimate() == r.noise_scale_unbiased == pytest.approx((10 * 30 - 100) / (100 - 30))
    assert r.noise_scale_estimate(population_size=10) == pytest.approx(r.noise_scale)      # the whole population
    assert r.noise_scale_estimate(population_size=1000) == pytest.approx(
        (300 - 100) / (100 - 10 * (990 / (10 * 999)) * 30))
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, population_size=5\]"):
        r.noise_scale_estimate(population_size=5)
    assert finite_population_factor(1, 50) == 1.0 and finite_population_factor(50, 50) == 0.0
    assert finite_population_factor(4, None) == 0.25


def test_noise_scale_batch_binds_the_population_and_checkpoints():
    sched = gl.NoiseScaleBatch(8, 64, window=2).bind(200)
    assert sched.estimator.population_size == 200
    sched.estimator.update(2.0, 1.5, 8, 16)
    state = sched.state_dict()
    fresh = gl.NoiseScaleBatch(8, 64, window=2).bind(200)
    fresh.load_state_dict(state)
    assert fresh.estimator.state_dict() == sched.estimator.state_dict()
    legacy = {"beta": 0.9, "_ema_grad_sq_norm": 0.1, "_ema_trace_covariance": 2.0, "updates": 1}
    old = TwoBatchNoiseScale(population_size=200)
    old.load_state_dict(legacy)
    assert old.trace_covariance == pytest.approx(2.0 / 0.1) and old.population_size == 200
    with pytest.raises(ValueError, match="whole numbers of samples"):
        TwoBatchNoiseScale(population_size=100).update(1.0, 0.5, 2.5, 10)
