"""Tests of gradiv_lib.plasticity: regularizers, metrics, the continual loop and its checkpoints."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradiv_lib import data, models
from gradiv_lib import plasticity as pl

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")


def _net(seed: int = 0, width: int = 16) -> nn.Sequential:
    return models.mlp(8, width, 3, 4, seed=seed)


def _tasks(n_tasks: int = 3, n: int = 48, seed: int = 0) -> list[data.Task]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(4, (n,), generator=g)
    return data.random_label_tasks((x, y), n_tasks, seed=seed)


PENALTIES = [pl.L2(1e-2), pl.L2Init(1e-2), pl.WassersteinInit(1e-2), pl.Spectral(1e-2)]


# ---------------------------------------------------------------------------- regularizers


def test_wasserstein_zero_for_any_permutation_of_init_but_l2_init_not() -> None:
    net = _net()
    wass = pl.WassersteinInit(1.0).bind(net)
    l2i = pl.L2Init(1.0).bind(net)
    assert float(wass(net)) == 0.0 and float(l2i(net)) == 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            flat = p.flatten()
            p.copy_(flat[torch.randperm(flat.numel(), generator=g)].reshape(p.shape))
    assert float(wass(net)) == pytest.approx(0.0, abs=1e-10)
    assert float(l2i(net)) > 1e-2


def test_wasserstein_equals_n_times_w2_squared() -> None:
    net = nn.Linear(5, 1, bias=False)
    reg = pl.WassersteinInit(1.0).bind(net)
    w0 = net.weight.detach().flatten().sort().values
    with torch.no_grad():
        net.weight.mul_(2.0)
    expected = float(((2 * w0) - w0).square().sum())  # scaling keeps the order
    assert float(reg(net)) == pytest.approx(expected, rel=1e-6)


def test_l2_init_zero_at_init_and_l2_value() -> None:
    net = _net()
    assert float(pl.L2Init(0.5).bind(net)(net)) == 0.0
    expected = 0.5 * sum(float(p.square().sum()) for p in net.parameters())
    assert float(pl.L2(0.5).bind(net)(net)) == pytest.approx(expected, rel=1e-6)


def test_power_iteration_within_one_percent_after_20_steps() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(30, 20), (10, 50), (64, 64), (8, 3, 3, 3)]:
        W = torch.randn(*shape, generator=g)
        sigma, u, v = pl.power_iteration(W, steps=20, generator=g)
        exact = float(torch.linalg.matrix_norm(W.reshape(shape[0], -1), 2))
        assert abs(float(sigma) - exact) / exact < 0.01, shape
        assert not u.requires_grad and not v.requires_grad


def test_spectral_estimate_tracks_sigma_max_of_model() -> None:
    net = _net()
    reg = pl.Spectral(1e-2).bind(net)
    exact = pl.sigma_max(net)
    for name, est in reg.sigmas(net).items():
        assert abs(est - exact[name]) / exact[name] < 0.01


@pytest.mark.parametrize("reg", PENALTIES, ids=lambda r: r.name)
def test_every_penalty_has_nonzero_gradient_where_it_should(reg: pl.Regularizer) -> None:
    net = _net()
    reg = type(reg)(**{k: v for k, v in reg.config().items() if k not in ("name",)}).bind(net)
    with torch.no_grad():  # move off the init so the init-anchored penalties are active
        for p in net.parameters():
            p.add_(0.1 * torch.ones_like(p)).mul_(1.5)
    penalty = reg(net)
    assert penalty.requires_grad and float(penalty) > 0
    grads = torch.autograd.grad(penalty, list(net.parameters()), allow_unused=True)
    for (name, p), gr in zip(net.named_parameters(), grads):
        assert gr is not None and float(gr.abs().sum()) > 0, f"{reg.name}: no gradient on {name}"


def test_spectral_gradient_flows_through_sigma() -> None:
    """The third-party bug (σ computed under no_grad) cannot happen: d penalty / dW = 2λ(σ^k-1)kσ^(k-1) u v^T."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        lin.weight.mul_(5.0)
    net = nn.Sequential(lin)
    lam, k = 0.3, 2
    reg = pl.Spectral(lam, k=k, warmup_steps=200).bind(net)
    penalty = reg(net)
    (grad,) = torch.autograd.grad(penalty, [lin.weight])
    U, S, Vh = torch.linalg.svd(lin.weight.detach())
    s, u, v = S[0], U[:, 0], Vh[0]
    expected = 2 * lam * (s ** k - 1) * k * s ** (k - 1) * torch.outer(u, v)
    assert torch.allclose(grad, expected, rtol=1e-3, atol=1e-5)
    assert float(penalty) == pytest.approx(lam * float((s ** k - 1) ** 2), rel=1e-4)


def test_spectral_penalty_zero_when_sigma_is_one_and_biases_zero() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4)); net[0].bias.zero_()
        net[2].weight.copy_(torch.eye(4)[:2]); net[2].bias.zero_()
    assert float(pl.Spectral(1.0).bind(net)(net)) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        net[2].bias.fill_(1.0)  # ||b||^(2k) with k=2: (2)^2 = 4
    assert float(pl.Spectral(1.0, k=2).bind(net)(net)) == pytest.approx(4.0, rel=1e-6)


def test_spectral_regularization_lowers_sigma_in_training() -> None:
    net = _net(width=32)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    reg = pl.Spectral(1.0).bind(net)
    before = max(pl.sigma_max(net).values())
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(300):  # the penalty acts on the top direction only: the next one surfaces, and so on
        opt.zero_grad(); reg(net).backward(); opt.step()
    after = pl.sigma_max(net)
    assert max(after.values()) < 0.5 * before
    assert all(0.8 < s < 1.5 for s in after.values()), after


def test_shrink_perturb_math() -> None:
    net = _net()
    sp = pl.ShrinkPerturb(shrink=0.5, noise=0.2).bind(net)
    before = [p.detach().clone() for p in net.parameters()]
    scales = [float(p.std()) for p in before]
    sp.apply(net, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for p0, p, s in zip(before, net.parameters(), scales):
        eps = torch.randn(p0.shape, generator=g)
        assert torch.allclose(p.detach(), 0.5 * p0 + 0.2 * s * eps, atol=1e-6)
    net2 = _net()
    pl.ShrinkPerturb(shrink=0.3, noise=0.0).bind(net2).apply(net2)
    for p0, p in zip(_net().parameters(), net2.parameters()):
        assert torch.allclose(p.detach(), 0.3 * p0.detach())
    assert float(sp(net)) == 0.0


def test_regularizer_validation_messages() -> None:
    with pytest.raises(ValueError, match="strength must be >= 0.0, got -1"):
        pl.L2(-1)
    with pytest.raises(ValueError, match="shrink must be >= 0.0 and <= 1.0, got 1.5"):
        pl.ShrinkPerturb(shrink=1.5)
    with pytest.raises(ValueError, match="k must be > 0"):
        pl.Spectral(k=0)
    with pytest.raises(RuntimeError, match="not bound"):
        pl.L2Init(1.0)(_net())
    with pytest.raises(ValueError, match="do not match"):
        pl.L2Init(1.0).bind(_net())(_net(width=8))
    with pytest.raises(ValueError, match="regularizer must be one of"):
        pl.make_regularizer("dropout")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        pl.power_iteration(torch.ones(3))
    assert isinstance(pl.make_regularizer("spectral", 1e-2), pl.Spectral)


# ---------------------------------------------------------------------------- metrics


def test_effective_rank_known_answers() -> None:
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(0)))
    for r in (1, 3, 7):
        feats = q[:, :r] @ torch.eye(r, 20)  # r equal singular values
        assert pl.effective_rank(feats) == pytest.approx(r, rel=1e-6)
        assert pl.effective_rank(feats, "srank") == r
    feats = q[:, :2] @ torch.diag(torch.tensor([1.0, 0.0]))  # one zero direction
    assert pl.effective_rank(feats) == pytest.approx(1.0)
    # s = (3, 1): entropy of p = (3/4, 1/4)
    feats = q[:, :2] @ torch.diag(torch.tensor([3.0, 1.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert pl.effective_rank(feats) == pytest.approx(math.exp(h), rel=1e-6)
    assert pl.effective_rank(feats, "srank", delta=0.3) == 1 and pl.effective_rank(feats, "srank", delta=0.01) == 2
    assert pl.effective_rank(torch.zeros(4, 3)) == 0.0
    with pytest.raises(ValueError, match="features must be a non-empty 2-D tensor"):
        pl.effective_rank(torch.ones(3))
    with pytest.raises(ValueError, match="method must be 'entropy' or 'srank'"):
        pl.effective_rank(torch.ones(3, 3), "stable")


def test_effective_rank_is_scale_invariant_and_checks_delta() -> None:
    """Both definitions read only the shares p_i = s_i / sum_j s_j: features scaled by 1e-3 (singular values
    summing to less than 1) have the same effective rank."""
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(0)))
    feats = q[:, :3] @ torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    for method in ("entropy", "srank"):
        assert pl.effective_rank(1e-3 * feats, method) == pytest.approx(pl.effective_rank(feats, method), rel=1e-6)
    assert pl.effective_rank(1e-3 * feats, "srank") == 3
    with pytest.raises(ValueError, match="delta must be >= 0.0 and <= 1.0, got 1.5"):
        pl.effective_rank(feats, "srank", delta=1.5)


def test_dormant_fraction_input_checks() -> None:
    with pytest.raises(ValueError, match=r"activations must be a non-empty 2-D tensor \(samples, units\), got \(4,\)"):
        pl.dormant_fraction(torch.ones(4))
    assert pl.dormant_fraction(torch.full((1, 1), 2.0)) == 0.0  # one sample, one live unit


def test_task_accuracy_reads_the_split_it_is_asked_for() -> None:
    from gradiv_lib.data import InMemoryData
    from gradiv_lib.data.continual import Task

    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    right, wrong = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0])
    task = Task("t", InMemoryData(x, right), InMemoryData(x, wrong))
    assert pl.task_accuracy(model, task) == 1.0 and pl.task_accuracy(model, task, split="train") == 1.0
    assert pl.task_accuracy(model, task, split="test") == 0.0
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        pl.task_accuracy(model, task, split="val")
    with pytest.raises(ValueError, match=r"the task has no test set; use split='train'"):
        pl.task_accuracy(model, Task("t", InMemoryData(x, right)), split="test")


def test_train_continual_records_each_quantity_by_its_definition() -> None:
    """Each per-task entry against its definition, on the model as it was at the task's end (on_task_end)."""
    g = torch.Generator().manual_seed(3)
    tasks = [data.Task(f"t{i}", data.InMemoryData(torch.randn(40, 8, generator=g), torch.randint(4, (40,), generator=g)),
                       data.InMemoryData(torch.randn(24, 8, generator=g), torch.randint(4, (24,), generator=g)))
             for i in range(2)]
    ends: list[nn.Module] = []
    history = pl.train_continual(_net(), tasks, epochs_per_task=3, lr=1e-2, batch_size=8, probe_size=16,
                                 on_task_end=lambda t, model, h: ends.append(copy.deepcopy(model)))
    for t, (task, model) in enumerate(zip(tasks, ends)):
        assert history.end_accuracy[t] == pl.task_accuracy(model, task, split="train")
        assert history.test_accuracy[t] == pl.task_accuracy(model, task, split="test")
        assert len(history.epoch_accuracy[t]) == 3
        assert history.online_accuracy[t] == pytest.approx(sum(history.epoch_accuracy[t]) / 3, abs=1e-15)
        feats = pl.hidden_features(model, task.train.x[:16])  # the probe: the task's first probe_size samples
        assert history.effective_rank[t] == pytest.approx(pl.effective_rank(feats[-1]), rel=1e-12)
        assert history.dormant[t] == pl.dormant_fraction(torch.cat(feats, 1))
        assert history.weight_norm[t] == pytest.approx(math.sqrt(sum(float(p.double().square().sum()) for p in model.parameters())), rel=1e-12)
    assert 0 < history.seconds[0] < history.seconds[1]


def test_train_continual_keeps_one_optimizer_unless_reset() -> None:
    """Adam's moments carry over between tasks by default (the same run as reset_optimizer=False); with
    reset_optimizer=True the second task starts from fresh moments, so it ends elsewhere."""
    tasks = _tasks(2)
    default, kept, reset = _net(), _net(), _net()
    options = dict(epochs_per_task=2, lr=1e-2, batch_size=8, measure=False)
    pl.train_continual(default, tasks, **options)
    pl.train_continual(kept, tasks, reset_optimizer=False, **options)
    pl.train_continual(reset, tasks, reset_optimizer=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), kept.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(kept.parameters(), reset.parameters()))


def test_dormant_fraction_known_answers() -> None:
    acts = torch.rand(20, 10) + 0.5
    acts[:, [1, 4, 7]] = 0.0
    assert pl.dormant_fraction(acts) == pytest.approx(0.3)
    acts[:, 2] = 1e-4  # tiny but alive: dormant only for tau > 0
    assert pl.dormant_fraction(acts) == pytest.approx(0.3)
    assert pl.dormant_fraction(acts, tau=0.01) == pytest.approx(0.4)
    assert pl.dormant_fraction(torch.zeros(3, 4)) == 1.0
    with pytest.raises(ValueError, match="tau must be >= 0.0"):
        pl.dormant_fraction(acts, tau=-1)


def test_hidden_features_and_sigma_max() -> None:
    net = _net(width=16)
    feats = pl.hidden_features(net, torch.randn(5, 8))
    assert [tuple(f.shape) for f in feats] == [(5, 16), (5, 16)]
    assert all(float(f.min()) >= 0 for f in feats)
    sig = pl.sigma_max(net)
    assert list(sig) == ["0.weight", "2.weight", "4.weight"] or len(sig) == 3
    with pytest.raises(ValueError, match="no activation module"):
        pl.hidden_features(nn.Linear(2, 2), torch.randn(1, 2))


def test_plasticity_probe_leaves_model_unchanged() -> None:
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    task = _tasks(1)[0]
    acc = pl.plasticity(net, task, epochs=30, lr=1e-2)
    assert 0.5 < acc <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


# ---------------------------------------------------------------------------- tasks and the loop


def test_make_tasks_and_own_data() -> None:
    train, test = data.load_digits()
    tasks = pl.make_tasks("random_labels", train, 3, n_samples=100)
    assert len(tasks) == 3 and all(len(t.train) == 100 for t in tasks)
    tasks = pl.make_tasks("permuted", train, 2, test=test)
    assert tasks[0].test is not None
    assert len(pl.make_tasks("class_incremental", train, 5, classes_per_task=2)) == 5
    own = pl.as_tasks([(torch.randn(10, 3), torch.arange(10) % 2), data.InMemoryData(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)),
                       ((torch.randn(6, 3), torch.zeros(6, dtype=torch.long)), (torch.randn(2, 3), torch.zeros(2, dtype=torch.long)))])
    assert [len(t.train) for t in own] == [10, 4, 6] and own[2].test is not None
    with pytest.raises(ValueError, match="stream must be one of"):
        pl.make_tasks("rotated", train, 2)
    with pytest.raises(TypeError, match="task 0 must be a Task"):
        pl.as_tasks([torch.randn(3)])
    with pytest.raises(ValueError, match="empty"):
        pl.as_tasks([])


def test_train_continual_records_every_task() -> None:
    tasks = _tasks(3)
    h = pl.train_continual(_net(), tasks, regularizer=pl.Spectral(1e-3), epochs_per_task=3, lr=1e-2, batch_size=16)
    assert len(h) == 3 and h.regularizer["name"] == "spectral"
    for key in pl.ContinualHistory.PER_TASK:
        assert len(getattr(h, key)) == 3, key
    assert all(0 <= a <= 1 for a in h.end_accuracy)
    assert all(d > 0 for d in h.diversity_start + h.diversity_end)
    assert len(h.sigma_max[0]) == 3 and len(h.layers) == 3
    assert pl.ContinualHistory.from_dict(h.to_dict()).to_dict() == h.to_dict()


def test_train_continual_validation() -> None:
    with pytest.raises(ValueError, match="epochs_per_task must be an integer >= 1, got 0"):
        pl.train_continual(_net(), _tasks(1), epochs_per_task=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        pl.train_continual(_net(), _tasks(1), lr=0.0)
    with pytest.raises(TypeError, match="regularizer must be"):
        pl.train_continual(_net(), _tasks(1), regularizer=0.1)
    with pytest.raises(ValueError, match="integer class labels"):
        pl.train_continual(_net(), [(torch.randn(4, 8), torch.randn(4))])


@pytest.mark.parametrize("method", ["spectral", "shrink_perturb", "wasserstein"])
def test_resume_gives_identical_history(tmp_path, method: str) -> None:
    def reg():
        return pl.make_regularizer(method, **({} if method == "shrink_perturb" else {"strength": 1e-2}))

    kwargs = dict(epochs_per_task=2, lr=1e-2, batch_size=16, seed=3)
    full_net = _net()
    full = pl.train_continual(full_net, _tasks(4), regularizer=reg(), **kwargs)

    class Stop(Exception):
        pass

    def interrupt(t, model, history):
        if t == 1:
            raise Stop

    path = tmp_path / "run.pt"
    with pytest.raises(Stop):
        pl.train_continual(_net(), _tasks(4), regularizer=reg(), checkpoint_path=path, on_task_end=interrupt, **kwargs)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    resumed_net = _net(seed=5)  # different weights: everything must come from the checkpoint
    resumed = pl.train_continual(resumed_net, _tasks(4), regularizer=reg(), checkpoint_path=path, **kwargs)
    a, b = full.to_dict(), resumed.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert repr(a) == repr(b)  # exact floats (and nan == nan)
    assert all(torch.equal(p, q) for p, q in zip(full_net.parameters(), resumed_net.parameters()))
    with pytest.raises(ValueError, match="different run"):
        pl.train_continual(_net(), _tasks(4), regularizer=reg(), checkpoint_path=path, **{**kwargs, "seed": 4})
