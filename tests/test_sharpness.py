"""Sharpness measures and SAM optimizers, checked on a quadratic where everything is known in closed form."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradiv_lib.models import mlp
from gradiv_lib.sharpness import (
    SAM,
    AverageDirectionSAM,
    average_direction_sharpness,
    flat_gradient,
    hessian_top_eigenvalue,
    hessian_vector_product,
    hutchinson_trace,
    second_order_sharpness,
    smoothed_gradient,
)

torch.set_num_threads(1)


def _mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


@pytest.fixture()
def quadratic():
    """Least squares L(w) = mean((x_i^T w - y_i)^2): Hessian 2 X^T X / n, exactly."""
    g = torch.Generator().manual_seed(0)
    n, d = 40, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    H = 2 * X.T @ X / n
    return model, X, y, H


def test_gradient_and_hvp_are_exact(quadratic) -> None:
    model, X, y, H = quadratic
    w = model.weight.detach().flatten()
    torch.testing.assert_close(flat_gradient(model, _mse, X, y), 2 * X.T @ (X @ w - y) / len(y))
    torch.testing.assert_close(flat_gradient(model, _mse, X, y, batch_size=7), flat_gradient(model, _mse, X, y))
    v = torch.arange(5, dtype=torch.float64)
    torch.testing.assert_close(hessian_vector_product(model, _mse, X, y, v), H @ v)
    torch.testing.assert_close(hessian_vector_product(model, _mse, X, y, v, batch_size=9), H @ v)


def test_top_eigenvalue_and_trace(quadratic) -> None:
    model, X, y, H = quadratic
    result = hessian_top_eigenvalue(model, _mse, X, y, iters=500, tol=1e-12)
    top = torch.linalg.eigvalsh(H)[-1].item()
    assert result.eigenvalue == pytest.approx(top, rel=1e-8) and result.converged
    assert abs(abs(float(result.eigenvector @ torch.linalg.eigh(H).eigenvectors[:, -1])) - 1) < 1e-4
    trace = hutchinson_trace(model, _mse, X, y, samples=400, seed=1)
    assert abs(trace.trace - torch.trace(H).item()) < 4 * trace.std_error
    assert trace.std_error < 0.1 * torch.trace(H).item()


def test_average_direction_sharpness_of_a_quadratic(quadratic) -> None:
    model, X, y, H = quadratic
    sigma = 0.1
    iso = average_direction_sharpness(model, _mse, X, y, sigma=sigma, samples=2000, seed=2)
    exact = 0.5 * sigma**2 * torch.trace(H).item()
    assert abs(iso.sharpness - exact) < 4 * iso.std_error and iso.samples == 2000
    D = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    D = D - D.mean(0)
    Xi = D.T @ D / 6
    exact = 0.5 * torch.trace(H @ Xi).item()
    assert second_order_sharpness(model, _mse, X, y, deviations=D) == pytest.approx(exact, rel=1e-10)
    mc = average_direction_sharpness(model, _mse, X, y, deviations=D, samples=2000, seed=4)
    assert abs(mc.sharpness - exact) < 4 * mc.std_error
    assert mc.loss == pytest.approx(float(_mse(model(X), y).detach()))
    so_iso = second_order_sharpness(model, _mse, X, y, sigma=sigma, samples=300)
    assert so_iso == pytest.approx(0.5 * sigma**2 * torch.trace(H).item(), rel=0.15)


def test_antithetic_smoothed_gradient_of_a_quadratic_is_the_gradient(quadratic) -> None:
    model, X, y, H = quadratic
    D = torch.randn(4, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = smoothed_gradient(model, _mse, X, y, deviations=D, samples=10, chunk=3)
    torch.testing.assert_close(g, flat_gradient(model, _mse, X, y), rtol=1e-10, atol=1e-12)


def test_sharpness_of_an_mlp_is_second_order_for_small_perturbations() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    model = mlp(4, 16, 2, 2, seed=0, activation="tanh").double()
    D = 0.02 * torch.randn(8, sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    mc = average_direction_sharpness(model, F.cross_entropy, X, y, deviations=D, samples=512)
    so = second_order_sharpness(model, F.cross_entropy, X, y, deviations=D)
    assert mc.sharpness == pytest.approx(so, rel=0.2)


def test_sam_step_matches_the_formula(quadratic) -> None:
    model, X, y, H = quadratic
    w = model.weight.detach().flatten().clone()
    grad = lambda v: 2 * X.T @ (X @ v - y) / len(y)  # noqa: E731
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        loss = _mse(model(X), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(float(((X @ w - y) ** 2).mean()))
    g0 = grad(w)
    expected = w - 0.1 * grad(w + 0.05 * g0 / g0.norm())
    torch.testing.assert_close(model.weight.detach().flatten(), expected)
    plain = copy.deepcopy(model)
    base = torch.optim.SGD(plain.parameters(), lr=0.1)
    zero = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    zero.step(closure)
    base.zero_grad()
    _mse(plain(X), y).backward()
    base.step()
    torch.testing.assert_close(model.weight, plain.weight)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM(model.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer must be an optimizer class"):
        SAM(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_adaptive_sam_runs(quadratic) -> None:
    model, X, y, _ = quadratic
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.05, momentum=0.9)
    before = _mse(model(X), y).item()
    for _ in range(20):
        opt.step(lambda: (_mse(model(X), y).backward(), _mse(model(X), y))[1])
    assert _mse(model(X), y).item() < before


def test_average_direction_sam(quadratic) -> None:
    model, X, y, _ = quadratic
    reference = copy.deepcopy(model)

    def closure_for(m):
        def closure():
            loss = _mse(m(X), y)
            loss.backward()
            return loss
        return closure

    # on a quadratic the antithetic average of the two perturbed gradients is the gradient itself
    D = torch.randn(3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    opt = AverageDirectionSAM(model.parameters(), torch.optim.SGD, deviations=D, samples=2, lr=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt.step(closure_for(model))
    sgd.zero_grad()
    closure_for(reference)()
    sgd.step()
    torch.testing.assert_close(model.weight, reference.weight)
    zero = AverageDirectionSAM(model.parameters(), torch.optim.SGD, sigma=0.0, lr=0.1)
    zero.step(closure_for(model))
    sgd.zero_grad()
    closure_for(reference)()
    sgd.step()
    torch.testing.assert_close(model.weight, reference.weight)
    noisy = AverageDirectionSAM(model.parameters(), torch.optim.SGD, sigma=0.1, samples=3, lr=0.01)
    noisy.step(closure_for(model))
    assert torch.isfinite(model.weight).all()
    opt.set_deviations(D * 2)
    with pytest.raises(ValueError, match=r"deviations must be a \(K, P\) tensor with P = 5"):
        opt.set_deviations(torch.zeros(3, 4))


def test_validation(quadratic) -> None:
    model, X, y, _ = quadratic
    with pytest.raises(ValueError, match="exactly one of sigma"):
        average_direction_sharpness(model, _mse, X, y)
    with pytest.raises(ValueError, match="exactly one of sigma"):
        average_direction_sharpness(model, _mse, X, y, sigma=0.1, deviations=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        average_direction_sharpness(model, _mse, X, y, sigma=-1.0)
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        hutchinson_trace(model, _mse, X, y, samples=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        flat_gradient(model, _mse, X, y, batch_size=0)
    with pytest.raises(ValueError, match="same number of samples"):
        flat_gradient(model, _mse, X, y[:3])
    with pytest.raises(ValueError, match="at least one sample"):
        flat_gradient(model, _mse, X[:0], y[:0])
    with pytest.raises(ValueError, match="vector must have the 5 entries"):
        hessian_vector_product(model, _mse, X, y, torch.zeros(4))
    with pytest.raises(ValueError, match="tol must be a number > 0"):
        hessian_top_eigenvalue(model, _mse, X, y, tol=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        flat_gradient(lambda x: x, _mse, X, y)
    with pytest.raises(ValueError, match="inf or nan"):
        average_direction_sharpness(model, _mse, X, y, deviations=torch.full((2, 5), math.nan))
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        AverageDirectionSAM(model.parameters(), torch.optim.SGD, sigma=0.1, samples=0, lr=0.1)


def test_regression_targets_that_would_broadcast_are_refused():
    x, y = torch.randn(16, 4), torch.randn(16)
    with pytest.raises(ValueError, match=r"MSELoss got outputs of shape \(2, 1\) and targets of shape \(2,\)"):
        hessian_top_eigenvalue(nn.Linear(4, 1), nn.MSELoss(), x, y, iters=3)
    assert hessian_top_eigenvalue(nn.Linear(4, 1), nn.MSELoss(), x, y[:, None], iters=3).eigenvalue > 0



@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(reduction="sum"),
                                     nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))],
                         ids=["sum", "class_weighted"])
def test_chunking_refuses_a_loss_that_is_not_a_mean_over_samples(loss_fn) -> None:
    """Chunks are weighted by their share of the samples: a summed loss gave a gradient 0.66 off and a top
    eigenvalue of 4.0 instead of 11.5 with batch_size=4, silently. Unchunked, any loss is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match=r"batch_size splits the data .* mean"):
        flat_gradient(model, loss_fn, x, y, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size splits the data .* mean"):
        hessian_top_eigenvalue(model, loss_fn, x, y, batch_size=4)
    flat_gradient(model, loss_fn, x, y)
    flat_gradient(model, loss_fn, x, y, batch_size=10)  # one chunk: no weighting
    mean = nn.CrossEntropyLoss()
    torch.testing.assert_close(flat_gradient(model, mean, x, y, batch_size=4), flat_gradient(model, mean, x, y))


def test_the_chunking_check_leaves_batchnorm_statistics_alone() -> None:
    """The mean-loss check runs the model on a few samples in eval mode: it used training mode and moved the
    running statistics once per call (the function's own passes are another matter: those are the user's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    from gradiv_lib.sharpness import _check_inputs

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _check_inputs(model, nn.CrossEntropyLoss(), x, y, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
