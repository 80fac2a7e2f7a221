"""Definitions of the regularizers and plasticity metrics, pinned by hand computation.

Cases are chosen so that a plausible wrong variant (a missing square or 1/2, one global sort instead of one per
tensor, (sigma - 1)^2 instead of (sigma^k - 1)^2, ||b||^k instead of ||b||^{2k}, the biased std, < instead of <=,
reshaping a kernel the other way) gives a different number.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradiv_lib import plasticity as pl

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


def _linear(weight, bias):
    m = nn.Linear(len(weight[0]), len(weight)).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        m.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return m


def _set(m, weight, bias):
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        m.bias.copy_(torch.tensor(bias, dtype=torch.float64))


def test_l2_and_l2_init_by_hand():
    m = _linear([[1.0, 2.0]], [3.0])
    assert float(pl.L2(0.5).bind(m)(m)) == 0.5 * (1 + 4 + 9)
    reg = pl.L2Init(0.5).bind(m)
    _set(m, [[2.0, 0.0]], [1.0])  # differences (1, -2), (-2): squares 1 + 4 + 4
    assert float(reg(m)) == 0.5 * 9.0


def test_wasserstein_sorts_each_tensor_separately():
    """Init weight (3, 1, 2) -> sorted (1, 2, 3); now (0, 5, 1) -> (0, 1, 5): 1 + 1 + 4 = 6. Bias 7 -> 4: 9.
    A single sort over all parameters would pair other values."""
    m = _linear([[3.0, 1.0, 2.0]], [7.0])
    reg = pl.WassersteinInit(2.0).bind(m)
    assert float(reg(m)) == 0.0
    _set(m, [[0.0, 5.0, 1.0]], [4.0])
    assert float(reg(m)) == 2.0 * (6.0 + 9.0)
    _set(m, [[2.0, 3.0, 1.0]], [7.0])  # a permutation of the initial weights
    assert float(reg(m)) == 0.0


@pytest.mark.parametrize("k, target, expected", [(2, 1.0, (9 - 1) ** 2 + 2.0 ** 2),
                                                 (3, 1.0, (27 - 1) ** 2 + 2.0 ** 3),
                                                 (2, 2.0, (9 - 4) ** 2 + 2.0 ** 2),
                                                 (1.5, 1.0, (27 ** 0.5 - 1) ** 2 + 2.0 ** 1.5)])
def test_spectral_penalty_by_hand(k, target, expected):
    """W = diag(3, 1): sigma = 3; b = (1, 1): ||b||^2 = 2; penalty (sigma^k - target^k)^2 + (||b||^2)^k."""
    m = _linear([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0])
    reg = pl.Spectral(0.1, k=k, target=target).bind(m)
    assert float(reg(m)) == pytest.approx(0.1 * expected, rel=1e-12)


def test_spectral_gradient_by_hand():
    """d/dW = lam 2 (sigma^2 - 1) 2 sigma u v^T = 0.1 * 2 * 8 * 6 at (0, 0); d/db = lam 2 (||b||^2) 2 b = 0.8 b."""
    m = _linear([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0])
    reg = pl.Spectral(0.1, k=2).bind(m)
    reg(m).backward()
    expected_w = torch.zeros(2, 2, dtype=torch.float64)
    expected_w[0, 0] = 0.1 * 2 * 8 * 2 * 3
    torch.testing.assert_close(m.weight.grad, expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.bias.grad, torch.tensor([0.8, 0.8], dtype=torch.float64), rtol=1e-12, atol=0)


def test_spectral_leaves_other_vectors_alone():
    """A 1-D parameter not named bias (a normalisation scale) is not penalised; its bias is."""
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2, dtype=torch.float64))  # sigma 1: no weight penalty
        net[0].bias.zero_()
        net[1].weight.fill_(5.0)
        net[1].bias.fill_(1.0)
    reg = pl.Spectral(1.0, k=2).bind(net)
    assert float(reg(net)) == pytest.approx(2.0 ** 2, rel=1e-12)  # only the LayerNorm bias: (1 + 1)^2


def test_shrink_perturb_uses_the_unbiased_std_of_the_initial_tensor():
    """Weight (1, 2, 3, 4): std (unbiased) sqrt(5/3) (the biased one is sqrt(5/4)); a 1-element bias gets no noise."""
    m = _linear([[1.0, 2.0, 3.0, 4.0]], [2.0])
    sp = pl.ShrinkPerturb(shrink=0.5, noise=0.1).bind(m)
    before = m.weight.detach().clone()
    sp.apply(m, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((1, 4), generator=g, dtype=torch.float32).double()
    torch.testing.assert_close(m.weight.detach(), 0.5 * before + 0.1 * math.sqrt(5 / 3) * eps, rtol=0, atol=1e-15)
    assert m.bias.item() == 1.0  # 0.5 * 2, no noise


def test_effective_rank_srank_threshold_and_entropy_by_hand():
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    feats = q[:, :3] @ torch.diag(torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64))  # p = (0.6, 0.3, 0.1)
    assert pl.effective_rank(feats, "srank", delta=0.1) == 2  # cumulative 0.9 reaches 1 - delta exactly
    assert pl.effective_rank(feats, "srank", delta=0.05) == 3
    assert pl.effective_rank(feats, "srank", delta=0.5) == 1
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert pl.effective_rank(feats) == pytest.approx(math.exp(h), rel=1e-12)


def test_dormant_fraction_threshold_is_inclusive():
    """Mean |h| per unit (0, 1, 2, 5), layer average 2: scores (0, 0.5, 1, 2.5). tau = 0.5 -> 2 of 4 dormant."""
    acts = torch.tensor([[0.0, 1.0, -2.0, 5.0], [0.0, -1.0, 2.0, 5.0]])
    assert pl.dormant_fraction(acts, tau=0.5) == 0.5
    assert pl.dormant_fraction(acts, tau=0.49) == 0.25
    assert pl.dormant_fraction(acts, tau=1.0) == 0.75
    assert pl.dormant_fraction(acts) == 0.25


def test_sigma_max_views_kernels_as_out_by_rest():
    """Kernel (1, 2, 2, 1) with entries 1..4 is the row (1, 2, 3, 4): sigma = sqrt(30) (as 2 x 2 it would be 5.465)."""
    conv = nn.Conv2d(2, 1, (2, 1), bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 5.0, dtype=torch.float64).reshape(1, 2, 2, 1))
    assert pl.sigma_max(conv) == {"weight": pytest.approx(math.sqrt(30), rel=1e-14)}
    sigma, u, v = pl.power_iteration(conv.weight, steps=3)
    assert float(sigma) == pytest.approx(math.sqrt(30), rel=1e-12)


def test_shrink_perturb_init_adds_a_fresh_initialisation_draw():
    """theta <- s theta + p theta_new, theta_new = the layers' reset_parameters() under a seed from the generator."""
    import copy

    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    reference = copy.deepcopy(m)
    before = [p.detach().clone() for p in m.parameters()]
    sp = pl.make_regularizer("shrink_perturb", shrink=0.5, noise=0.3, perturbation="init").bind(m)
    assert sp.config() == {"name": "shrink_perturb", "shrink": 0.5, "noise": 0.3, "perturbation": "init"}
    state = torch.get_rng_state()
    sp.apply(m, torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(seed)
    reference[0].reset_parameters()
    reference[2].reset_parameters()
    for p0, p, q in zip(before, m.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), 0.5 * p0 + 0.3 * q.detach(), rtol=0, atol=1e-15)
    assert pl.ShrinkPerturb().config() == {"name": "shrink_perturb", "shrink": 0.8, "noise": 0.1}


def test_shrink_perturb_init_needs_reset_parameters():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    sp = pl.ShrinkPerturb(perturbation="init").bind(Bare())
    with pytest.raises(ValueError, match=r"reset_parameters\(\); \['w'\]"):
        sp.apply(Bare())
    with pytest.raises(ValueError, match="perturbation must be 'gaussian' or 'init'"):
        pl.ShrinkPerturb(perturbation="fresh")


def test_train_continual_applies_the_penalty_and_the_task_boundaries():
    """The penalty enters every training step; task_boundary runs before every task but the first; metrics are
    recorded (dormant fraction and diversity are numbers, not nan)."""
    from gradiv_lib import data, models

    class Recording(pl.L2):
        def __init__(self):
            super().__init__(1e-3)
            self.penalties, self.boundaries = 0, []

        def penalty(self, model):
            self.penalties += 1
            return super().penalty(model)

        def task_boundary(self, model, task, generator=None):
            self.boundaries.append(task)

    g = torch.Generator().manual_seed(0)
    tasks = data.random_label_tasks((torch.randn(24, 8, generator=g), torch.randint(4, (24,), generator=g)), 3, seed=0)
    reg = Recording()
    h = pl.train_continual(models.mlp(8, 8, 2, 4, seed=0), tasks, regularizer=reg, epochs_per_task=2, lr=1e-2,
                           batch_size=8)
    assert reg.boundaries == [1, 2]
    assert reg.penalties == 3 * 2 * 3  # tasks x epochs x batches of 8 out of 24
    assert all(math.isfinite(v) for v in h.dormant + h.diversity_start + h.diversity_end)


def test_running_training_accuracy_by_hand():
    """With a frozen model (SGD, lr 0) the running accuracy of an epoch is the accuracy on the task."""
    from gradiv_lib import data, models

    g = torch.Generator().manual_seed(1)
    d = data.InMemoryData(torch.randn(20, 8, generator=g), torch.randint(4, (20,), generator=g))
    model = models.mlp(8, 8, 2, 4, seed=0)
    with torch.no_grad():
        expected = float((model(d.x).argmax(1) == d.y).double().mean())
    accs = pl._train_steps(model, torch.optim.SGD(model.parameters(), lr=0.0), d, epochs=2, batch_size=6,
                           loss_fn=nn.CrossEntropyLoss(), regularizer=None, generator=torch.Generator().manual_seed(0))
    assert accs == [expected, expected] and pl.task_accuracy(model, d) == pytest.approx(expected, abs=1e-12)


def test_history_round_trip_is_a_deep_copy_and_rejects_unknown_fields():
    h = pl.ContinualHistory()
    h.end_accuracy.append(0.5)
    d = h.to_dict()
    d["end_accuracy"].append(1.0)
    assert h.end_accuracy == [0.5]
    with pytest.raises(ValueError, match=r"unknown ContinualHistory fields \['bogus'\]"):
        pl.ContinualHistory.from_dict({**h.to_dict(), "bogus": 1})


def test_measure_false_records_nan_diversity():
    from gradiv_lib import data, models

    g = torch.Generator().manual_seed(0)
    tasks = data.random_label_tasks((torch.randn(16, 8, generator=g), torch.randint(4, (16,), generator=g)), 2, seed=0)
    h = pl.train_continual(models.mlp(8, 8, 2, 4, seed=0), tasks, epochs_per_task=1, batch_size=8, measure=False)
    assert all(math.isnan(v) for v in h.diversity_start + h.diversity_end)
