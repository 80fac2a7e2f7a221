"""Federated learning: the min-norm solver against an independent QP, server optimizers against their formulas,
stacked client training against a loop over model copies, runs, checkpoints and input validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from gradiv_lib import federated as fed
from gradiv_lib.data import InMemoryData, partition_dirichlet, partition_iid, partition_shards
from gradiv_lib.models import mlp
from gradiv_lib.workers import diversity_variants

torch.set_num_threads(1)


def _qp(G: np.ndarray) -> float:
    n = len(G)
    res = minimize(lambda l: l @ G @ l, np.full(n, 1.0 / n), jac=lambda l: 2 * G @ l, bounds=[(0, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda l: l.sum() - 1, "jac": lambda l: np.ones(n)}],
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
    return float(res.fun)


def _unit_rows(n: int, p: int, seed: int) -> np.ndarray:
    U = np.random.default_rng(seed).standard_normal((n, p))
    return U / np.linalg.norm(U, axis=1, keepdims=True)


def _data(n: int = 240, d: int = 6, classes: int = 3, seed: int = 0) -> InMemoryData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()) % classes
    return InMemoryData(x, y)


def _federation(local=None, n_clients=8, seed=0, model=None) -> fed.Federation:
    data = _data()
    part = partition_iid(len(data), n_clients, seed=seed)
    model = model if model is not None else mlp(6, 8, 2, 3, seed=0).double()
    return fed.Federation(model, data, part, local or fed.LocalWork(lr=0.1, batch_size=(3, 12), steps=(1, 5)), seed=seed)


# ------------------------------------------------------------------------------------------ min-norm solver


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(2, 5), (7, 3), (12, 40), (25, 8)])
def test_min_norm_matches_independent_qp(seed, shape):
    U = _unit_rows(*shape, seed)
    G = U @ U.T
    ref = _qp(G)
    for method in ("wolfe", "away"):
        lam, info = fed.min_norm_solve(G, method=method, tol=1e-9, max_iter=50000)
        assert lam.min() >= 0 and abs(lam.sum() - 1) < 1e-12
        assert info["objective"] <= ref + 1e-8, (method, info, ref)
        assert info["objective"] >= ref - 1e-8 * max(ref, 1) - 1e-10  # the QP is a lower bound up to its tolerance
    lam, info = fed.min_norm_solve(G, method="fw", max_iter=20000, tol=0.0)
    assert info["objective"] - ref <= 2e-3 * max(ref, 1e-2)  # plain FW is O(1/k)


def test_min_norm_known_answers():
    e = np.eye(4)
    lam, info = fed.min_norm_solve(e @ e.T)
    np.testing.assert_allclose(lam, 0.25, atol=1e-9)
    assert info["objective"] == pytest.approx(0.25)
    u = np.array([[1.0, 0.0], [-1.0, 0.0]])
    lam, info = fed.min_norm_solve(u @ u.T)
    np.testing.assert_allclose(lam, 0.5, atol=1e-9)
    assert info["objective"] == pytest.approx(0.0, abs=1e-12)
    # a point of the hull closer to the origin than both ends: (1, 1) and (1, -1) -> (1, 0)
    v = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    lam = fed.min_norm_weights(v)
    torch.testing.assert_close(lam, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # one vertex is the answer: (1, 0) and (2, 1) -> (1, 0)
    lam = fed.min_norm_weights(torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    torch.testing.assert_close(lam, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert fed.min_norm_weights(torch.ones(1, 3)).tolist() == [1.0]
    # identical unit vectors: any weights, objective 1
    lam, info = fed.min_norm_solve(np.ones((3, 3)))
    assert info["objective"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_kkt_common_descent_and_norm_bound(seed):
    U = torch.from_numpy(_unit_rows(15, 6, seed))
    lam = fed.min_norm_weights(U)
    d = lam @ U
    inner = U @ d
    assert float(inner.min()) >= float(d @ d) - 1e-9  # <u_i, d> >= ||d||^2: a common descent direction
    support = lam > 1e-8
    torch.testing.assert_close(inner[support], torch.full_like(inner[support], float(d @ d)), atol=1e-8, rtol=0)
    assert float(d.norm()) <= 1 + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_min_norm_weights_maximise_weighted_diversity(seed):
    """Lemma: for unit vectors, sum_i l_i ||u_i||^2 / ||sum_i l_i u_i||^2 = 1 / ||d(l)||^2, maximised by l*."""
    V = torch.from_numpy(np.random.default_rng(seed).standard_normal((9, 30)) + 0.7)
    lam = fed.min_norm_weights(V, normalize=True)
    U = V / V.norm(dim=1, keepdim=True)
    best = diversity_variants(U, lam)["weighted"]
    assert best == pytest.approx(1 / float((lam @ U).square().sum()), rel=1e-10)
    rng = np.random.default_rng(100 + seed)
    for q in [np.full(9, 1 / 9)] + [rng.dirichlet(np.full(9, a)) for a in (0.1, 1.0, 10.0) for _ in range(20)]:
        assert diversity_variants(U, torch.from_numpy(q))["weighted"] <= best * (1 + 1e-9)


def test_zero_vector_pitfall_collapses_direction():
    U = torch.from_numpy(_unit_rows(10, 20, 0))
    U[3] = 0.0
    lam = fed.min_norm_weights(U, normalize=True)
    assert float(lam[3]) > 0.99
    assert float((lam @ U).norm()) < 1e-6


def test_min_norm_validation():
    with pytest.raises(ValueError, match="square"):
        fed.min_norm_solve(np.ones((2, 3)))
    with pytest.raises(ValueError, match="inf or nan"):
        fed.min_norm_solve(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="method must be one of"):
        fed.min_norm_solve(np.eye(2), method="newton")
    with pytest.raises(ValueError, match="exactly one"):
        fed.min_norm_weights()
    with pytest.raises(ValueError, match="init must be"):
        fed.min_norm_solve(np.eye(2), method="away", init=[0.7, 0.7])


def test_min_norm_refuses_a_matrix_that_is_not_a_gram_matrix():
    """λᵀGλ over the simplex is convex only for a positive semi-definite G, and only then does the solvers'
    stop certify f(λ) - f* ≤ 2·gap; a non-Gram matrix was accepted without a word. A float32 Gram of equal
    vectors is accepted."""
    with pytest.raises(ValueError, match=r"not positive semi-definite\): \|G\[0, 1\]\| = 2 exceeds sqrt\(G\[0, 0\] G\[1, 1\]\) = 1"):
        fed.min_norm_solve(np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match=r"G\[1, 1\] = -1 < 0"):
        fed.min_norm_solve(np.array([[1.0, 0.0], [0.0, -1.0]]))
    v = torch.randn(1, 10_000)
    equal = v.repeat(3, 1)  # float32: |G_ij| exceeds √(G_ii G_jj) by rounding
    lam, _ = fed.min_norm_solve(equal @ equal.T)
    assert lam.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ servers


def _updates(m=3, p=5, seed=0):
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fedavg_and_fedprox_are_weighted_means():
    x = torch.zeros(5, dtype=torch.float64)
    up = _updates()
    for cls in (fed.FedAvg, fed.FedProx):
        s = cls(x, 6, lr=0.5)
        new = s.aggregate(0, [1, 4, 5], up, [1.0, 2.0, 1.0])
        torch.testing.assert_close(new, -0.5 * (0.25 * up[0] + 0.5 * up[1] + 0.25 * up[2]))
        torch.testing.assert_close(s.last_weights, torch.tensor([0, .25, 0, 0, .5, .25], dtype=torch.float64))
    assert fed.FedProx(x, 6, mu=0.3).prox_mu == 0.3 and fed.FedAvg(x, 6).prox_mu == 0.0


def test_fedavgm_and_adaptive_servers_follow_their_formulas():
    x = torch.zeros(5, dtype=torch.float64)
    u1, u2 = _updates(2, seed=1), _updates(2, seed=2)
    s = fed.FedAvgM(x, 2, lr=1.0, beta=0.7)
    s.aggregate(0, [0, 1], u1, [1, 1])
    s.aggregate(1, [0, 1], u2, [1, 1])
    torch.testing.assert_close(s.params, -(u1.mean(0) * 1.7 + u2.mean(0)))
    for cls in (fed.FedAdam, fed.FedYogi):
        s = cls(x, 2, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        m, v, p = torch.zeros(5, dtype=torch.float64), torch.full((5,), 1e-6, dtype=torch.float64), x.clone()
        for u in (u1, u2):
            g = u.mean(0)
            m = 0.9 * m + 0.1 * g
            v = 0.99 * v + 0.01 * g * g if cls is fed.FedAdam else v - 0.01 * g * g * torch.sign(v - g * g)
            p = p - 0.1 * m / (v.sqrt() + 1e-3)
            s.aggregate(0, [0, 1], u, [1, 1])
        torch.testing.assert_close(s.params, p)


def test_fedaware_exact_rule():
    N, P, alpha = 4, 6, 0.3
    x = torch.randn(P, dtype=torch.float64)
    s = fed.FedAWARE(x, N, lr=1.0, alpha=alpha)
    u0 = _updates(2, P, seed=3)
    # before every client was seen: FedAvg over the sampled clients (weights renormalised), memories updated
    new = s.aggregate(0, [0, 2], u0, [3.0, 1.0])
    torch.testing.assert_close(new, x - (0.75 * u0[0] + 0.25 * u0[1]))
    assert not s.explored
    torch.testing.assert_close(s.memory[[0, 2]], alpha * u0)
    assert float(s.memory[[1, 3]].abs().sum()) == 0.0
    u1 = _updates(3, P, seed=4)
    before = s.params.clone()
    stale = s.memory[2].clone()
    s.aggregate(1, [0, 1, 3], u1, [1.0, 1.0, 1.0])
    assert s.explored
    mem = torch.stack([(1 - alpha) * alpha * u0[0] + alpha * u1[0], alpha * u1[1], stale, alpha * u1[2]])
    torch.testing.assert_close(s.memory, mem)  # client 2 was not sampled: its memory is stale, not decayed
    U = mem / mem.norm(dim=1, keepdim=True)
    G = (U @ U.T).numpy()
    ref = _qp(G)
    d = s.last_weights @ U
    assert float(d @ d) == pytest.approx(ref, abs=1e-9)
    torch.testing.assert_close(s.params, before - d)
    assert s.last_direction_norm == pytest.approx(float(d.norm()))


def test_fedaware_include_unseen_is_the_pitfall():
    x = torch.zeros(6, dtype=torch.float64)
    s = fed.FedAWARE(x, 5, unseen="include")
    s.aggregate(0, [0, 1, 2], _updates(3, 6, seed=5), [1, 1, 1])
    assert float(s.last_weights[3:].sum()) > 0.99 and s.last_direction_norm < 1e-8


@pytest.mark.parametrize("name", fed.SERVERS)
def test_server_state_dict_roundtrip(name, tmp_path):
    x = torch.zeros(5, dtype=torch.float64)
    a = fed.make_server(name, x, 3)
    b = fed.make_server(name, x, 3)
    for r in range(3):
        a.aggregate(r, [0, 1, 2][: 1 + r], _updates(1 + r, seed=r), [1.0] * (1 + r))
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    u = _updates(2, seed=9)
    torch.testing.assert_close(a.aggregate(3, [0, 2], u, [1, 2]), b.aggregate(3, [0, 2], u, [1, 2]))
    with pytest.raises(ValueError, match="not a"):
        fed.make_server("fedavg" if name != "fedavg" else "fedavgm", x, 3).load_state_dict(a.state_dict())


def test_server_validation():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="server must be one of"):
        fed.make_server("fedsgd", x, 3)
    with pytest.raises(ValueError, match="alpha must be a number in \\(0.0, 1.0\\]"):
        fed.FedAWARE(x, 3, alpha=0.0)
    with pytest.raises(ValueError, match="beta must be"):
        fed.FedAvgM(x, 3, beta=1.0)
    with pytest.raises(ValueError, match="lr must be"):
        fed.FedAvg(x, 3, lr=-1)
    with pytest.raises(ValueError, match="n_clients must be"):
        fed.FedAvg(x, 0)
    s = fed.FedAvg(x, 3)
    with pytest.raises(ValueError, match=r"client_ids must lie in \[0, 2\]"):
        s.aggregate(0, [0, 3], torch.zeros(2, 4), [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        s.aggregate(0, [1, 1], torch.zeros(2, 4), [1, 1])
    with pytest.raises(ValueError, match="client_updates must be a tensor \\(2, 4\\)"):
        s.aggregate(0, [0, 1], torch.zeros(2, 5), [1, 1])
    with pytest.raises(ValueError, match="client_weights must be"):
        s.aggregate(0, [0, 1], torch.zeros(2, 4), [1, -1])
    with pytest.raises(ValueError, match="inf or nan"):
        s.aggregate(0, [0, 1], torch.full((2, 4), float("nan")), [1, 1])


# ------------------------------------------------------------------------------------------ clients


@pytest.mark.parametrize("local", [
    fed.LocalWork(lr=0.1, batch_size=8, steps=3),
    fed.LocalWork(lr=0.1, batch_size=(3, 12), steps=(1, 6)),
    fed.LocalWork(lr=0.1, batch_size=(10, None), epochs=(1, 3)),
])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_stacked_clients_match_a_loop_over_model_copies(local, mu):
    f = _federation(local)
    x0 = f.initial_params()
    clients = [0, 3, 5, 6]
    a, ia = f.local_updates(x0, clients, 2, prox_mu=mu)
    b, ib = f.local_updates(x0, clients, 2, prox_mu=mu, backend="loop")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert ia["steps"] == ib["steps"] and np.allclose(ia["loss"], ib["loss"])


def test_a_model_that_mixes_the_samples_of_a_batch_is_refused_by_the_stacked_backend():
    """BatchNorm without running statistics normalises over the batch, and the stacked backend pads the clients'
    batches to one size: its updates differed from the loop's, silently (2.8 % in the first round's loss in one check)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(), nn.Linear(8, 3)).double()
    f = _federation(model=model)
    with pytest.raises(ValueError, match=r"depends on the other samples of its batch .* backend='loop'"):
        f.local_updates(f.initial_params(), [0, 1], 0)
    f.local_updates(f.initial_params(), [0, 1], 0, backend="loop")  # the reference runs it
    f = _federation(model=model.eval())  # no running statistics: eval mode normalises over the batch too
    assert f._mixes_samples
    with_stats = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    assert not _federation(model=with_stats)._mixes_samples  # running statistics in eval mode: per sample


def test_a_model_the_stacked_backend_cannot_batch_names_the_loop_backend():
    class LastLSTMState(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(1, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            out, _ = self.lstm(x.unsqueeze(-1))
            return self.head(out[:, -1])

    f = _federation(model=LastLSTMState().double())
    with pytest.raises(ValueError, match=r"the stacked backend cannot run LastLSTMState .* use backend='loop'"):
        f.local_updates(f.initial_params(), [0, 1], 0)
    f.local_updates(f.initial_params(), [0, 1], 0, backend="loop")


def test_stacked_clients_of_an_mlp_with_a_users_output_hook_match_the_loop():
    """The stacked clients' bmm forward skipped the hook (0.09 off the loop's updates, silently); such a model now
    takes the vmap forward."""
    model = mlp(6, 8, 2, 3, seed=0).double()
    next(m for m in model if isinstance(m, nn.Linear)).register_forward_hook(lambda module, args, out: 3 * out)
    f = _federation(model=model)
    assert f._bmm is None
    a, _ = f.local_updates(f.initial_params(), [1, 2], 0)
    b, _ = f.local_updates(f.initial_params(), [1, 2], 0, backend="loop")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_vmap_forward_for_non_mlp_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) + 0.1 * x[..., :5])

    torch.manual_seed(0)
    f = _federation(model=Net().double())
    assert f._bmm is None
    a, _ = f.local_updates(f.initial_params(), [1, 2], 0)
    b, _ = f.local_updates(f.initial_params(), [1, 2], 0, backend="loop")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_plans_follow_the_drawn_local_work():
    f = _federation(fed.LocalWork(lr=0.1, batch_size=(4, None), epochs=(2, 5)))
    for c in range(f.n_clients):
        rows, info = f.plan(c, 7)
        n = f.shard_sizes[c]
        assert 4 <= info["batch_size"] <= n - 1 and 2 <= info["epochs"] <= 5
        assert rows.shape == (info["epochs"] * -(-n // info["batch_size"]), info["batch_size"])
        valid = rows[rows >= 0]
        assert len(valid) == info["epochs"] * n and set(valid.tolist()) == set(f.shards[c].tolist())
        again, _ = f.plan(c, 7)
        assert (again == rows).all()
    draws = {f.plan(0, r)[1]["batch_size"] for r in range(30)}
    assert len(draws) > 3  # heterogeneous across rounds


def test_federation_validation():
    data = _data(20)
    model = mlp(6, 4, 2, 3, seed=0).double()
    with pytest.raises(ValueError, match="at most 20 clients"):
        fed.Federation(model, data, [torch.tensor([0])] * 21)
    with pytest.raises(ValueError, match="partition\\[1\\] is empty"):
        fed.Federation(model, data, [torch.arange(10), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="outside"):
        fed.Federation(model, data, [torch.arange(10), torch.arange(15, 25)])
    with pytest.raises(ValueError, match="BatchNorm"):
        fed.Federation(nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)), data, partition_iid(20, 2))
    with pytest.raises(ValueError, match="lr must be"):
        fed.LocalWork(lr=0)
    with pytest.raises(ValueError, match="batch_size range must satisfy"):
        fed.LocalWork(batch_size=(5, 2))
    with pytest.raises(ValueError, match="epochs must be"):
        fed.LocalWork(epochs=(1, None))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        fed.LocalWork(steps=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        partition_dirichlet(data.y, 2, alpha=0.0)
    f = fed.Federation(model, data, partition_iid(20, 2))
    with pytest.raises(ValueError, match=r"clients must lie in \[0, 1\]"):
        f.local_updates(f.initial_params(), [2], 0)
    with pytest.raises(ValueError, match="backend must be"):
        f.local_updates(f.initial_params(), [0], 0, backend="threads")


# ------------------------------------------------------------------------------------------ runs


def test_sample_clients_is_seeded_and_validated():
    a = fed.sample_clients(20, 5, 3, seed=1)
    assert (a == fed.sample_clients(20, 5, 3, seed=1)).all() and len(set(a.tolist())) == 5
    assert not (a == fed.sample_clients(20, 5, 4, seed=1)).all()
    for bad in (0, 21, 2.5):
        with pytest.raises(ValueError, match=r"per_round .* in \[1, 20\]"):
            fed.sample_clients(20, bad, 0)


@pytest.mark.parametrize("name", ["fedavg", "fedaware"])
def test_run_federated_history(name):
    f = _federation()
    test = _data(60, seed=1)
    h = fed.run_federated(f, name, 6, per_round=3, test=test, seed=0)
    assert h["round"].tolist() == [1, 2, 3, 4, 5, 6]
    for key in ("test_accuracy", "test_loss", "train_loss", "diversity", "rms_ratio", "weighted_diversity", "direction_norm"):
        assert h[key].shape == (6,) and np.isfinite(h[key]).all(), key
    assert h["weights"].shape == (6, 8)
    np.testing.assert_allclose(h["weights"].sum(1), 1.0, atol=1e-5)
    assert (h["weights"] >= 0).all()
    if name == "fedaware":
        assert h["participants"][0].sum() == 8  # startup: every client in round 0
        assert (h["weights"][1:] > 0).sum() > 3  # after startup the weights cover more than the sampled clients
    else:
        assert (h["participants"].sum(1) == 3).all()
        assert ((h["weights"] > 0) <= (h["participants"] > 0)).all()
    np.testing.assert_allclose(h["rms_ratio"] ** 2, h["participants"].sum(1) * h["diversity"], rtol=1e-9)


def test_diversity_metric_is_of_the_client_updates():
    f = _federation()
    h = fed.run_federated(f, "fedavg", 1, per_round=4, seed=3)
    clients = fed.sample_clients(8, 4, 0, seed=3)
    up, _ = f.local_updates(f.initial_params(), clients, 0)
    assert h["diversity"][0] == pytest.approx(diversity_variants(up)["yin"])


def test_training_makes_progress_on_an_easy_split():
    f = _federation(fed.LocalWork(lr=0.2, batch_size=16, steps=5))
    for name in ("fedavg", "fedaware", "fedavgm"):
        h = fed.run_federated(f, name, 25, per_round=4, seed=0)
        assert h["train_loss"][-1] < 0.8 * h["train_loss"][0], name


@pytest.mark.parametrize("name", ["fedaware", "fedadam"])
def test_checkpoint_resume_is_exact(name, tmp_path):
    f = _federation()
    full = fed.run_federated(f, name, 8, per_round=3, seed=2)
    ckpt = tmp_path / "run.pt"
    part = fed.run_federated(f, name, 5, per_round=3, seed=2, checkpoint=ckpt, checkpoint_every=2)
    assert part["round"].tolist() == [1, 2, 3, 4, 5]
    resumed = fed.run_federated(f, name, 8, per_round=3, seed=2, checkpoint=ckpt, checkpoint_every=2)
    np.testing.assert_allclose(resumed["params"], full["params"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(resumed["train_loss"], full["train_loss"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="holds a"):
        fed.run_federated(f, "fedavg", 9, per_round=3, seed=2, checkpoint=ckpt)


def test_run_federated_validation():
    f = _federation()
    with pytest.raises(ValueError, match=r"per_round .* in \[1, 8\]"):
        fed.run_federated(f, "fedavg", 2, per_round=9)
    with pytest.raises(ValueError, match=r"per_round .* in \[1, 8\]"):
        fed.run_federated(f, "fedavg", 2, per_round=0)
    with pytest.raises(ValueError, match="rounds must be"):
        fed.run_federated(f, "fedavg", 0, per_round=2)
    with pytest.raises(ValueError, match="server must be one of"):
        fed.run_federated(f, "scaffold", 2, per_round=2)
    with pytest.raises(ValueError, match="server is for"):
        fed.run_federated(f, fed.FedAvg(f.initial_params(), 3), 2, per_round=2)


def test_partitions_plug_in():
    data = _data(300)
    for part in (partition_shards(data.y, 10, 2, seed=0), partition_dirichlet(data.y, 10, 0.3, seed=0, min_size=5)):
        f = fed.Federation(mlp(6, 8, 2, 3, seed=0).double(), data, part,
                           fed.LocalWork(lr=0.1, batch_size=(2, None), epochs=(1, 2)))
        h = fed.run_federated(f, "fedaware", 3, per_round=4)
        assert np.isfinite(h["train_loss"]).all()


def test_one_client_federation_of_its_own_shard_draws_what_the_full_one_draws():
    full = _federation()
    data = _data()
    for i in (2, 5):
        shard = torch.from_numpy(full.shards[i])
        alone = fed.Federation(mlp(6, 8, 2, 3, seed=0).double(), (data.x[shard], data.y[shard]),
                               [torch.arange(len(shard))], full.local, seed=0, client_ids=[i])
        rows, info = alone.plan(0, 3)
        ref_rows, ref_info = full.plan(i, 3)
        assert info == ref_info
        local = rows >= 0
        np.testing.assert_array_equal(local, ref_rows >= 0)
        np.testing.assert_array_equal(full.shards[i][rows[local]], ref_rows[local])  # the same samples, same order
        x = full.initial_params()
        np.testing.assert_allclose(alone.local_updates(x, [0], 3)[0].numpy(), full.local_updates(x, [i], 3)[0].numpy(),
                                   rtol=0, atol=1e-14)
        wrong = fed.Federation(mlp(6, 8, 2, 3, seed=0).double(), (data.x[shard], data.y[shard]),
                               [torch.arange(len(shard))], full.local, seed=0)  # seeded as client 0
        assert not np.array_equal(full.shards[i][wrong.plan(0, 3)[0].clip(0)], ref_rows.clip(0))
    with pytest.raises(ValueError, match=r"client_ids must be 8 distinct non-negative integers .* got \[0, 0"):
        fed.Federation(mlp(6, 8, 2, 3, seed=0).double(), data, full.shards, full.local, client_ids=[0, 0, 1, 2, 3, 4, 5, 6])


def test_federation_refuses_regression_targets_that_would_broadcast():
    x, y = torch.randn(32, 4), torch.randn(32)
    with pytest.raises(ValueError, match=r"F.mse_loss got outputs of shape \(2, 1\) and targets of shape \(2,\)"):
        fed.Federation(nn.Linear(4, 1), (x, y), partition_iid(32, 4), loss_fn=F.mse_loss)
    fed.Federation(nn.Linear(4, 1), (x, y[:, None]), partition_iid(32, 4), loss_fn=F.mse_loss)  # same shapes: accepted

