"""Gradient diversity, the noise-scale identities, the two-batch estimator and the epoch accumulator."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradiv_lib.diversity import (
    DiversityResult,
    EpochDiversityAccumulator,
    TwoBatchNoiseScale,
    diversity_from_grads,
    diversity_from_sq_norms,
    expected_minibatch_sq_norm,
    gradient_diversity,
)
from gradiv_lib.norms import DiversityMeter


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def per_sample_grads(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """[n, P] per-sample gradients of ℓ_i = loss_fn(sample i alone), by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)


def small_problem(n: int = 12) -> tuple[nn.Module, Tensor, Tensor]:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


# --- DiversityResult ---------------------------------------------------------------------------------


def test_result_properties_and_conventions() -> None:
    grads = torch.randn(8, 5, dtype=torch.float64) + 0.3
    result = diversity_from_grads(grads)
    q, big_n, n = float(grads.square().sum()), float(grads.sum(0).square().sum()), 8
    assert (result.sum_sq_norms, result.sq_norm_of_sum, result.n) == (pytest.approx(q), pytest.approx(big_n), n)
    assert result.diversity == pytest.approx(q / big_n)
    assert result.batch_size_bound == pytest.approx(n * q / big_n)
    mean = grads.mean(0)
    population_covariance_trace = float((grads - mean).square().sum(1).mean())
    assert result.mean_grad_sq_norm == pytest.approx(float(mean.square().sum()))
    assert result.trace_covariance == pytest.approx(population_covariance_trace)
    assert result.noise_scale == pytest.approx(population_covariance_trace / float(mean.square().sum()))
    assert result.noise_scale == pytest.approx(result.batch_size_bound - 1)
    assert "Δ = " in str(result) and "n = 8" in str(result) and "B_S" in str(result)
    with pytest.raises(AttributeError):
        result.n = 3  # frozen


def test_result_edge_cases_and_validation() -> None:
    assert DiversityResult(2.0, 0.0, 3).diversity == math.inf
    assert math.isnan(DiversityResult(0.0, 0.0, 3).diversity)
    assert DiversityResult(1.0, 0.5, 4).noise_scale_unbiased == math.inf  # Δ > 1: noise-dominated
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        DiversityResult(1.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"sum_sq_norms must be finite and >= 0, got -1.0"):
        DiversityResult(-1.0, 1.0, 2)
    with pytest.raises(ValueError, match=r"sq_norm_of_sum must be finite and >= 0, got nan"):
        DiversityResult(1.0, float("nan"), 2)
    with pytest.raises(ValueError, match=r"a noise-scale estimate needs n >= 2 samples, got n = 1"):
        DiversityResult(1.0, 1.0, 1).noise_scale_unbiased


def test_from_grads_flattens_and_validates() -> None:
    grads = torch.randn(4, 2, 3)
    assert diversity_from_grads(grads) == diversity_from_grads(grads.reshape(4, 6))
    with pytest.raises(ValueError, match=r"per_sample_grads must be a tensor \[n, \.\.\.\] with n >= 1, got \(0, 3\)"):
        diversity_from_grads(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="per_sample_grads contains inf or nan"):
        diversity_from_grads(torch.tensor([[1.0, float("inf")]]))


def test_from_sq_norms_matches_from_grads_and_validates() -> None:
    grads = torch.randn(6, 4, dtype=torch.float64)
    result = diversity_from_sq_norms(grads.square().sum(1), grads.sum(0).square().sum())
    assert result.diversity == pytest.approx(diversity_from_grads(grads).diversity, rel=1e-12)
    with pytest.raises(ValueError, match=r"sq_norms must be a non-empty 1-D tensor \[n\], got \(2, 2\)"):
        diversity_from_sq_norms(torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match="sq_norms must be finite and >= 0"):
        diversity_from_sq_norms(torch.tensor([1.0, -2.0]), 1.0)
    with pytest.raises(TypeError, match="sq_norm_of_sum must be a real number or a 0-d tensor, got str"):
        diversity_from_sq_norms(torch.ones(2), "big")


def test_gradient_diversity_equals_per_sample_reference() -> None:
    model, x, y = small_problem()
    for loss_fn in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")):
        result = gradient_diversity(model, loss_fn, x, y)
        expected = diversity_from_grads(per_sample_grads(model, loss_fn, x, y))
        assert result.n == expected.n == 12
        assert result.sum_sq_norms == pytest.approx(expected.sum_sq_norms, rel=1e-10)
        assert result.sq_norm_of_sum == pytest.approx(expected.sq_norm_of_sum, rel=1e-10)


# --- invariants -------------------------------------------------------------------------------------


def test_identical_samples_have_diversity_one_over_n() -> None:
    model, x, y = small_problem(1)
    n = 7
    result = gradient_diversity(model, nn.CrossEntropyLoss(), x.expand(n, -1), y.expand(n))
    assert result.diversity == pytest.approx(1 / n, rel=1e-12)
    assert result.batch_size_bound == pytest.approx(1.0, rel=1e-12)
    assert result.noise_scale == pytest.approx(0.0, abs=1e-10)


def test_diversity_is_invariant_to_scaling_the_loss() -> None:
    model, x, y = small_problem()
    base = gradient_diversity(model, nn.CrossEntropyLoss(), x, y)
    scaled = gradient_diversity(model, lambda out, target: 7.5 * nn.functional.cross_entropy(out, target), x, y)
    assert scaled.diversity == pytest.approx(base.diversity, rel=1e-10)
    assert scaled.sum_sq_norms == pytest.approx(7.5**2 * base.sum_sq_norms, rel=1e-10)


def test_duplicating_the_data_set_keeps_the_batch_size_bound() -> None:
    """Every sample twice: Q doubles, N quadruples, n doubles, so Δ halves and B_S = nΔ is unchanged."""
    model, x, y = small_problem()
    once = gradient_diversity(model, nn.CrossEntropyLoss(), x, y)
    twice = gradient_diversity(model, nn.CrossEntropyLoss(), torch.cat([x, x]), torch.cat([y, y]))
    assert twice.batch_size_bound == pytest.approx(once.batch_size_bound, rel=1e-10)
    assert twice.diversity == pytest.approx(once.diversity / 2, rel=1e-10)
    assert twice.noise_scale == pytest.approx(once.noise_scale, rel=1e-10)


def test_orthogonal_per_sample_gradients_have_diversity_one() -> None:
    """Least squares through the origin: g_i = (w·x_i − y_i) x_i, orthogonal for orthogonal inputs."""
    model = nn.Linear(6, 1, bias=False).double()
    x = torch.eye(6, dtype=torch.float64)[:4] * torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=torch.float64)
    result = gradient_diversity(model, nn.MSELoss(reduction="sum"), x, torch.randn(4, 1, dtype=torch.float64))
    assert result.diversity == pytest.approx(1.0, rel=1e-12)
    assert diversity_from_grads(torch.eye(5)).diversity == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_diversity_is_at_least_one_over_n(n: int, dim: int, seed: int) -> None:
    grads = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    result = diversity_from_grads(grads)
    assert result.diversity >= 1 / n * (1 - 1e-12)
    assert result.noise_scale >= -1e-9


# --- the mini-batch identity ----------------------------------------------------------------------------


def test_expected_minibatch_sq_norm_by_exact_enumeration() -> None:
    grads = torch.randn(5, 3, dtype=torch.float64) + torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    result = diversity_from_grads(grads)
    n, batch = 5, 3
    with_replacement = torch.stack([grads[list(idx)].mean(0).square().sum() for idx in itertools.product(range(n), repeat=batch)]).mean()
    without_replacement = torch.stack([grads[list(idx)].mean(0).square().sum() for idx in itertools.combinations(range(n), batch)]).mean()
    predicted_with = expected_minibatch_sq_norm(result.mean_grad_sq_norm, result.noise_scale, batch)
    predicted_without = expected_minibatch_sq_norm(result.mean_grad_sq_norm, result.noise_scale, batch, population_size=n)
    assert float(with_replacement) == pytest.approx(predicted_with, rel=1e-12)
    assert float(without_replacement) == pytest.approx(predicted_without, rel=1e-12)
    assert predicted_with != pytest.approx(predicted_without, rel=1e-3)  # the two sampling schemes differ
    full_batch = expected_minibatch_sq_norm(result.mean_grad_sq_norm, result.noise_scale, n, population_size=n)
    assert full_batch == pytest.approx(result.mean_grad_sq_norm, rel=1e-12)


def test_expected_minibatch_sq_norm_validation() -> None:
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        expected_minibatch_sq_norm(1.0, 2.0, 0)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, population_size=4\] without replacement, got 5"):
        expected_minibatch_sq_norm(1.0, 2.0, 5, population_size=4)
    with pytest.raises(ValueError, match=r"b_simple must be finite and >= 0, got -1.0"):
        expected_minibatch_sq_norm(1.0, -1.0, 2)


# --- the two-batch estimator ----------------------------------------------------------------------------


def test_two_batch_estimates_are_unbiased_on_gaussian_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    dim, draws, b_small, b_big = 20, 4000, 4, 32
    mean = torch.linspace(-0.3, 0.3, dim, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    samples = mean + scales * torch.randn(draws, b_big, dim, generator=generator, dtype=torch.float64)
    small = samples[:, :b_small].mean(1).square().sum(1)
    big = samples.mean(1).square().sum(1)
    estimator = TwoBatchNoiseScale(beta=0.0)
    estimates = torch.tensor([estimator.update(s, b, b_small, b_big) for s, b in zip(small.tolist(), big.tolist())], dtype=torch.float64)
    true_grad_sq_norm, true_trace = float(mean.square().sum()), float(scales.square().sum())
    assert float(estimates[:, 0].mean()) == pytest.approx(true_grad_sq_norm, rel=0.05)
    assert float(estimates[:, 1].mean()) == pytest.approx(true_trace, rel=0.05)


def test_smoothed_noise_scale_converges_to_the_population_value() -> None:
    """Batches drawn with replacement from n fixed per-sample gradients: the ratio of EMAs tends to
    the exact B_simple = B_S − 1 of the population."""
    generator = torch.Generator().manual_seed(2)
    grads = torch.randn(50, 8, generator=generator, dtype=torch.float64) + 0.4
    exact = diversity_from_grads(grads).noise_scale
    estimator = TwoBatchNoiseScale(beta=0.999)
    for _ in range(6000):
        batch = grads[torch.randint(0, 50, (16,), generator=generator)]
        estimator.update(batch[:2].mean(0).square().sum(), batch.mean(0).square().sum(), 2, 16)
    assert estimator.b_simple == pytest.approx(exact, rel=0.1)


def test_per_sample_two_batch_estimate_is_the_unbiased_noise_scale_of_the_batch() -> None:
    model, x, y = small_problem(10)
    grads = per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    estimator = TwoBatchNoiseScale(beta=0.0)
    estimator.update(grads.square().sum(1).mean(), grads.mean(0).square().sum(), 1, 10)
    assert estimator.b_simple == pytest.approx(gradient_diversity(model, nn.CrossEntropyLoss(), x, y).noise_scale_unbiased, rel=1e-10)
    via_microbatches = TwoBatchNoiseScale(beta=0.0)
    via_microbatches.update_from_grads([g * 3 for g in grads], microbatch_size=3, reduction="sum")
    assert via_microbatches.b_simple == pytest.approx(estimator.b_simple * 3, rel=1e-10)  # B_s = 3 counts each row thrice


def test_update_from_grads_with_per_parameter_lists() -> None:
    first = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    second = [torch.tensor([0.0, 1.0]), torch.tensor([[1.5]])]
    estimator, manual = TwoBatchNoiseScale(beta=0.0), TwoBatchNoiseScale(beta=0.0)
    estimator.update_from_grads([first, second], microbatch_size=4)
    small = (5.25 + 3.25) / 2
    big = 0.5**2 + 1.5**2 + 1.0**2
    manual.update(small, big, 4, 8)
    assert (estimator.grad_sq_norm, estimator.trace_covariance) == pytest.approx((manual.grad_sq_norm, manual.trace_covariance))


def test_two_batch_estimator_validation() -> None:
    estimator = TwoBatchNoiseScale()
    with pytest.raises(RuntimeError, match="no updates yet"):
        estimator.b_simple
    with pytest.raises(ValueError, match=r"need 0 < b_small < b_big, got b_small = 8, b_big = 8"):
        estimator.update(1.0, 0.5, 8, 8)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got 1.0"):
        TwoBatchNoiseScale(beta=1.0)
    with pytest.raises(ValueError, match="at least 2 micro-batch gradients"):
        estimator.update_from_grads([torch.ones(3)], microbatch_size=2)
    with pytest.raises(ValueError, match="micro-batch gradients differ in size"):
        estimator.update_from_grads([torch.ones(3), torch.ones(4)], microbatch_size=2)
    with pytest.raises(ValueError, match=r"small_grad_sq_norm must be finite and >= 0, got inf"):
        estimator.update(math.inf, 1.0, 1, 2)


def test_noise_dominated_estimate_reports_infinite_noise_scale() -> None:
    estimator = TwoBatchNoiseScale(beta=0.0)
    estimator.update(1.0, 0.01, 1, 10)  # |G|² estimate < 0
    assert estimator.grad_sq_norm < 0 and estimator.b_simple == math.inf


# --- the epoch accumulator -----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[5, 5, 5, 5, 3], [1, 22], [7, 7, 7, 2], [23]])
def test_epoch_accumulator_reproduces_full_batch_diversity_for_any_partition(sizes: list[int]) -> None:
    model, x, y = small_problem(23)
    full = gradient_diversity(model, nn.CrossEntropyLoss(), x, y)
    params = list(model.parameters())
    from_meter, from_sums, backpack_style = EpochDiversityAccumulator(), EpochDiversityAccumulator(), EpochDiversityAccumulator()
    unchecked, unchecked_mean = EpochDiversityAccumulator(), EpochDiversityAccumulator()  # validate=False (train's path)
    start = 0
    for size in sizes:
        xb, yb = x[start : start + size], y[start : start + size]
        start += size
        model.zero_grad(set_to_none=True)
        with DiversityMeter(model, loss_reduction="mean") as meter:
            nn.CrossEntropyLoss()(model(xb), yb).backward()
        mean_grad = [p.grad.clone() for p in params]
        from_meter.update(meter.sq_norms, mean_grad, size, grad_reduction="mean")
        from_sums.update(float(meter.sq_norms.sum()), [g * size for g in mean_grad], size)
        backpack_style.update(meter.sq_norms / size**2, torch.cat([g.flatten() for g in mean_grad]), size, grad_reduction="mean", sq_norms_reduction="mean")
        unchecked.update(meter.sq_norms, mean_grad, size, grad_reduction="mean", validate=False)
        unchecked_mean.update(meter.sq_norms / size**2, mean_grad, size, grad_reduction="mean", sq_norms_reduction="mean", validate=False)
    for accumulator in (from_meter, from_sums, backpack_style, unchecked, unchecked_mean):
        assert accumulator.n == 23
        assert accumulator.result.sum_sq_norms == pytest.approx(full.sum_sq_norms, rel=1e-10)
        assert accumulator.result.diversity == pytest.approx(full.diversity, rel=1e-10)


def test_epoch_accumulator_validation_and_reset() -> None:
    accumulator = EpochDiversityAccumulator()
    with pytest.raises(RuntimeError, match="EpochDiversityAccumulator is empty"):
        accumulator.result
    with pytest.raises(ValueError, match=r"sq_norms has 3 entries but n = 2"):
        accumulator.update(torch.ones(3), torch.ones(4), 2)
    with pytest.raises(ValueError, match=r"grad_reduction must be one of \('sum', 'mean'\), got 'max'"):
        accumulator.update(1.0, torch.ones(4), 2, grad_reduction="max")
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        accumulator.update(1.0, torch.ones(4), 0)
    with pytest.raises(ValueError, match="grad contains inf or nan"):
        accumulator.update(1.0, torch.tensor([1.0, math.nan]), 1)
    with pytest.raises(TypeError, match="grad must be a tensor or a non-empty sequence of tensors"):
        accumulator.update(1.0, [], 1)
    accumulator.update(2.0, torch.ones(4), 2)
    with pytest.raises(ValueError, match="grad has 3 entries, earlier batches had 4"):
        accumulator.update(1.0, torch.ones(3), 1)
    assert accumulator.result == DiversityResult(2.0, 4.0, 2)
    accumulator.reset()
    assert accumulator.n == 0


def test_unvalidated_updates_are_checked_when_the_result_is_read() -> None:
    """update(validate=False) skips the per-batch host synchronisation, not the checks: sizes are checked at
    once, and a non-finite batch makes the epoch's result raise."""
    accumulator = EpochDiversityAccumulator()
    with pytest.raises(ValueError, match=r"sq_norms has 3 entries but n = 2"):
        accumulator.update(torch.ones(3), torch.ones(4), 2, validate=False)
    accumulator.update(torch.ones(2), torch.ones(4), 2, validate=False)
    with pytest.raises(ValueError, match="grad has 3 entries, earlier batches had 4"):
        accumulator.update(torch.ones(1), torch.ones(3), 1, validate=False)
    assert accumulator.result == DiversityResult(2.0, 4.0, 2)
    accumulator.update(torch.ones(1), torch.tensor([1.0, math.nan, 0.0, 0.0]), 1, validate=False)
    with pytest.raises(ValueError, match="sq_norm_of_sum must be finite"):
        accumulator.result
    accumulator.reset()
    accumulator.update(torch.tensor([1.0, math.inf]), torch.ones(4), 2, validate=False)
    with pytest.raises(ValueError, match=r"sum to inf: a batch added with validate=False had an inf or nan loss or gradient"):
        accumulator.result
