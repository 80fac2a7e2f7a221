"""Definitions of the sharpness measures and SAM variants, pinned by hand computation.

Two small models make every quantity closed-form: a quadratic 1/2 w^T H w (any H, indefinite too) and a quartic
sum(w^4)/4, whose gradient (w+e)^3 is *not* linear, so an antithetic pair ±e averages to w^3 + 3 w e^2 and
average-direction SAM differs from plain SGD (on a quadratic it cannot). Perturbations are re-drawn here from
the documented generator calls, so a wrong normalisation (D^T z / K instead of / sqrt K), a lost antithetic
sign or an absolute value in the eigenvalue gives a different number.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradiv_lib.sharpness import (
    SAM,
    AverageDirectionSAM,
    average_direction_sharpness,
    hessian_top_eigenvalue,
    hutchinson_trace,
    second_order_sharpness,
    smoothed_gradient,
)

torch.set_num_threads(1)


class Quadratic(nn.Module):
    def __init__(self, H, w):
        super().__init__()
        self.register_buffer("H", torch.as_tensor(H, dtype=torch.float64))
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())

    def forward(self, x):
        return (0.5 * self.w @ self.H @ self.w).expand(x.shape[0])


class Quartic(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())

    def forward(self, x):
        return (self.w ** 4).sum().div(4).expand(x.shape[0])


def _mean(out, y):
    return out.mean()


X = torch.zeros(3, 1, dtype=torch.float64)
Y = torch.zeros(3, dtype=torch.float64)


def _closure(model, opt=None):
    def closure():
        loss = _mean(model(X), Y)
        loss.backward()
        return loss
    return closure


# ------------------------------------------------------------------------------------------ curvature


def test_top_eigenvalue_is_the_largest_in_magnitude_with_its_sign():
    model = Quadratic(torch.diag(torch.tensor([1.0, -3.0, 0.5])), [0.3, -0.2, 0.1])
    r = hessian_top_eigenvalue(model, _mean, X, Y, iters=500, tol=1e-12)
    assert r.eigenvalue == pytest.approx(-3.0, rel=1e-9) and r.converged
    assert abs(float(r.eigenvector[1])) == pytest.approx(1.0, abs=1e-6)


def test_top_eigenvalue_of_a_psd_matrix():
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # eigenvalues 3 and 1
    r = hessian_top_eigenvalue(Quadratic(H, [1.0, 0.0]), _mean, X, Y, iters=500, tol=1e-13)
    assert r.eigenvalue == pytest.approx(3.0, rel=1e-10)


def test_hutchinson_is_exact_on_a_diagonal_hessian():
    """Rademacher probes: v_i^2 = 1, so v^T H v = tr H for every probe when H is diagonal (Gaussian probes would
    scatter): trace 1 - 3 + 5 = 3 with zero standard error."""
    model = Quadratic(torch.diag(torch.tensor([1.0, -3.0, 5.0])), [0.0, 0.0, 0.0])
    t = hutchinson_trace(model, _mean, X, Y, samples=7, seed=3)
    assert t.trace == 3.0 and t.std_error == 0.0 and t.samples == 7
    assert second_order_sharpness(model, _mean, X, Y, sigma=0.2, samples=5) == pytest.approx(0.5 * 0.04 * 3.0, abs=1e-15)


def test_hutchinson_probes_by_hand():
    """H = [[2, 1], [1, 3]]: v^T H v = 5 + 2 v_1 v_2, i.e. 7 or 3 per probe; mean and standard error of the mean
    (unbiased std / sqrt S) from the same Rademacher draws."""
    model = Quadratic(torch.tensor([[2.0, 1.0], [1.0, 3.0]]), [0.0, 0.0])
    gen = torch.Generator().manual_seed(5)
    vals = []
    for _ in range(6):
        v = (torch.randint(0, 2, (2,), generator=gen) * 2 - 1).double()
        vals.append(5.0 + 2.0 * float(v[0] * v[1]))
    t = hutchinson_trace(model, _mean, X, Y, samples=6, seed=5)
    mean = sum(vals) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 5)
    assert t.trace == pytest.approx(mean, abs=1e-14)
    assert t.std_error == pytest.approx(std / math.sqrt(6), abs=1e-14)


# ------------------------------------------------------------------------------------------ average direction


H2 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
D = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # K = 3 deviations


def _eps_deviations(n, seed, D=D):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D.shape[0], generator=gen, dtype=torch.float64)
    return z @ D / math.sqrt(D.shape[0])


def test_average_direction_sharpness_antithetic_by_hand():
    """Quadratic: (L(w+e) + L(w-e))/2 - L(w) = e^T H e / 2 for each pair, e = D^T z / sqrt K."""
    w = torch.tensor([0.7, -0.4], dtype=torch.float64)
    model = Quadratic(H2, w)
    r = average_direction_sharpness(model, _mean, X, Y, deviations=D, samples=8, seed=11)
    eps = _eps_deviations(4, 11)
    per = torch.stack([0.5 * e @ H2 @ e for e in eps])
    assert r.samples == 8
    assert r.sharpness == pytest.approx(float(per.mean()), abs=1e-13)
    assert r.std_error == pytest.approx(float(per.std() / 2), abs=1e-13)
    assert r.loss == pytest.approx(float(0.5 * w @ H2 @ w), abs=1e-15)
    # the second-order value is exact: tr(H Xi)/2 with Xi = D^T D / K
    assert second_order_sharpness(model, _mean, X, Y, deviations=D) == pytest.approx(
        float(0.5 * torch.trace(H2 @ D.T @ D / 3)), abs=1e-14)


def test_average_direction_sharpness_plain_monte_carlo_by_hand():
    """Without antithetic pairs each sample is g^T e + e^T H e / 2 (the first-order term stays)."""
    w = torch.tensor([0.7, -0.4], dtype=torch.float64)
    model = Quadratic(H2, w)
    r = average_direction_sharpness(model, _mean, X, Y, sigma=0.3, samples=5, antithetic=False, seed=2)
    gen = torch.Generator().manual_seed(2)
    eps = 0.3 * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    g = H2 @ w
    per = torch.stack([g @ e + 0.5 * e @ H2 @ e for e in eps])
    assert r.sharpness == pytest.approx(float(per.mean()), abs=1e-13) and r.samples == 5


def test_smoothed_gradient_of_a_quartic_by_hand():
    """E over ± pairs of (w + e)^3 = w^3 + 3 w e^2 (componentwise); the quadratic's would equal the gradient."""
    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    g = smoothed_gradient(Quartic(w), _mean, X, Y, deviations=D, samples=6, seed=4, chunk=4)
    eps = _eps_deviations(3, 4)
    expected = (w ** 3 + 3 * w * eps ** 2).mean(0)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-13)
    assert not torch.allclose(g, w ** 3)


# ------------------------------------------------------------------------------------------ optimizers


def test_adaptive_sam_step_by_hand():
    """ASAM: e = rho w^2 g / ||w g||, then w <- w - lr grad L(w + e) (quadratic: H (w + e))."""
    H = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([2.0, -0.5], dtype=torch.float64)
    model = Quadratic(H, w)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, lr=0.2)
    loss = opt.step(_closure(model))
    g = H @ w  # (6, -0.5)
    e = 0.1 * w ** 2 * g / (w.abs() * g).norm()
    expected = w - 0.2 * H @ (w + e)
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-13)
    assert float(loss.detach()) == pytest.approx(float(0.5 * w @ H @ w), abs=1e-14)
    # plain SAM from the same point moves elsewhere (e = rho g / ||g||)
    plain = Quadratic(H, w)
    SAM(plain.parameters(), torch.optim.SGD, rho=0.1, lr=0.2).step(_closure(plain))
    torch.testing.assert_close(plain.w.detach(), w - 0.2 * H @ (w + 0.1 * g / g.norm()), rtol=0, atol=1e-13)
    assert not torch.allclose(plain.w, model.w)


def test_average_direction_sam_on_a_quartic_by_hand():
    """Antithetic pair (samples=2): w <- w - lr (w^3 + 3 w e^2), e = sigma z; plain SGD would use w^3."""
    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    model = Quartic(w)
    opt = AverageDirectionSAM(model.parameters(), torch.optim.SGD, sigma=0.3, samples=2, seed=7, lr=0.1)
    first = opt.step(_closure(model))
    e = 0.3 * torch.randn(1, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)[0]
    torch.testing.assert_close(model.w.detach(), w - 0.1 * (w ** 3 + 3 * w * e ** 2), rtol=0, atol=1e-14)
    assert float(first.detach()) == pytest.approx(float(((w + e) ** 4).sum() / 4), abs=1e-14)  # loss at the first draw


def test_average_direction_sam_odd_samples_and_deviations_by_hand():
    """samples=3 (odd: no pairs), deviations D: e_s = D^T z_s / sqrt K; w <- w - lr mean_s (w + e_s)^3."""
    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    model = Quartic(w)
    opt = AverageDirectionSAM(model.parameters(), torch.optim.SGD, deviations=D, samples=3, seed=1, lr=0.1)
    opt.step(_closure(model))
    eps = _eps_deviations(3, 1)
    expected = w - 0.1 * ((w + eps) ** 3).mean(0)
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-14)
    # the second step continues the same generator
    w1 = model.w.detach().clone()
    opt.step(_closure(model))
    gen = torch.Generator().manual_seed(1)
    torch.randn(3, 3, generator=gen, dtype=torch.float64)
    eps2 = torch.randn(3, 3, generator=gen, dtype=torch.float64) @ D / math.sqrt(3)
    torch.testing.assert_close(model.w.detach(), w1 - 0.1 * ((w1 + eps2) ** 3).mean(0), rtol=0, atol=1e-14)


def test_top_eigenvalue_of_a_zero_hessian():
    r = hessian_top_eigenvalue(Quadratic(torch.zeros(3, 3), [1.0, 2.0, 3.0]), _mean, X, Y, iters=10)
    assert r.eigenvalue == 0.0 and r.converged is True and r.iterations == 1
    assert float(r.eigenvector.norm()) == pytest.approx(1.0, abs=1e-15)


def test_top_eigenvalue_start_vector_comes_from_the_seed_not_the_global_rng():
    model = Quadratic(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), [1.0, 0.0])
    torch.manual_seed(1)
    a = hessian_top_eigenvalue(model, _mean, X, Y, iters=3, tol=1e-15, seed=5)
    torch.manual_seed(2)
    b = hessian_top_eigenvalue(model, _mean, X, Y, iters=3, tol=1e-15, seed=5)
    assert a.eigenvalue == b.eigenvalue and torch.equal(a.eigenvector, b.eigenvector)
    v = torch.randn(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    v = v / v.norm()
    for _ in range(2):  # the Rayleigh quotient of the third iterate is the third estimate
        v = H @ v / (H @ v).norm()
    assert a.eigenvalue == pytest.approx(float(v @ H @ v), abs=1e-14)
