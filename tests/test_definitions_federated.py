"""Definitions of the min-norm solvers and the server optimizers, pinned by hand computation.

Cases are chosen so that a plausible wrong variant (a wrong curvature term in the exact line search, unclipped
instead of the official 0.999/0.001 clipping, (1-β) damping in FedAvgM, bias correction in FedAdam, α and 1-α
swapped in FedAWARE's memory, the wrong sign of the proximal term) gives a different number.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradiv_lib import federated as fed
from gradiv_lib.data import InMemoryData, partition_iid
from gradiv_lib.models import mlp

torch.set_num_threads(1)

# a PSD Gram matrix (leading minors 4, 8, 5) with a non-zero b = (G lam)_t at the first step
G3 = np.array([[4.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 2.0]])


# ------------------------------------------------------------------------------------------ Frank-Wolfe


def test_fw_exact_line_search_one_step_by_hand():
    """From e_0: G lam = (4, 2, 1), t = 2, f = 4, b = 1, c = 2; gamma = (f - b)/(f - 2b + c) = 3/4.
    (f - b + c gives 3/5, f - 2b - c gives 3/0, unclipped 2-point rules the same 3/4 only by accident of form.)"""
    lam, info = fed.min_norm_solve(G3, method="fw", init=[1.0, 0.0, 0.0], max_iter=1, tol=0.0)
    np.testing.assert_allclose(lam, [0.25, 0.0, 0.75], rtol=0, atol=1e-15)
    assert info["iterations"] == 1
    f = lam @ G3 @ lam  # 0.0625*4 + 2*0.25*0.75*1 + 0.5625*2 = 1.75
    assert info["objective"] == pytest.approx(1.75, abs=1e-15) and f == pytest.approx(1.75, abs=1e-15)
    # gap at lam: f - min(G lam) = 1.75 - min(1.75, 2.0, 1.75) = 0
    assert info["gap"] == pytest.approx(0.0, abs=1e-15)


def test_fw_best_pair_initialisation_by_hand():
    """Pairs of G3: (0,1) cost 2.8? no: closed form gamma_ij = (G_jj - G_ij)/(G_ii + G_jj - 2G_ij).
    (0,2): gamma = (2-1)/(4+2-2) = 1/4, value = 1/16*4 + 9/16*2 + 2*(3/16)*1 = 1.75 (the best pair);
    (1,2): gamma = 0, value 2; (0,1): gamma = 1/3, value 8/3. So the start is (1/4, 0, 3/4) and it is optimal."""
    lam, info = fed.min_norm_solve(G3, method="fw", max_iter=0)
    np.testing.assert_allclose(lam, [0.25, 0.0, 0.75], rtol=0, atol=1e-15)
    assert info["iterations"] == 0
    lam_w, _ = fed.min_norm_solve(G3, method="wolfe")
    np.testing.assert_allclose(lam_w, [0.25, 0.0, 0.75], rtol=0, atol=1e-12)


def test_wolfe_interior_optimum_by_hand():
    """G = I_3 + 1: f(lam) = |lam|^2 + 1, minimised at the centre (1/3 each), f* = 4/3."""
    G = np.eye(3) + 1.0
    lam, info = fed.min_norm_solve(G, method="wolfe")
    np.testing.assert_allclose(lam, [1 / 3] * 3, rtol=0, atol=1e-12)
    assert info["objective"] == pytest.approx(4 / 3, abs=1e-12)
    lam, info = fed.min_norm_solve(G, method="away", tol=1e-12, max_iter=100000)
    np.testing.assert_allclose(lam, [1 / 3] * 3, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ the official solver


def _official_transcription(vecs: np.ndarray, max_iter: int = 1000, stop: float = 1e-5) -> np.ndarray:
    """FedAWARE's ``MinNormSolver.find_min_norm_element_FW`` transcribed step by step (dps dictionary, pair loop)."""
    def from2(v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            return 0.999, v1v1
        if v1v2 >= v2v2:
            return 0.001, v2v2
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        return gamma, v2v2 + gamma * (v1v2 - v2v2)

    n = len(vecs)
    M = vecs @ vecs.T
    dps = {(i, j): M[i, j] for i in range(n) for j in range(n)}
    dmin = 1e8
    for i in range(n):
        for j in range(i + 1, n):
            c, d = from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
            if d < dmin:
                dmin = d
                sol = [(i, j), c, d]
    sol_vec = np.zeros(n)
    sol_vec[sol[0][0]] = sol[1]
    sol_vec[sol[0][1]] = 1 - sol[1]
    if n < 3:
        return sol_vec
    grad_mat = np.array([[dps[(i, j)] for j in range(n)] for i in range(n)])
    for _ in range(max_iter):
        t_iter = np.argmin(np.dot(grad_mat, sol_vec))
        v1v1 = np.dot(sol_vec, np.dot(grad_mat, sol_vec))
        v1v2 = np.dot(sol_vec, grad_mat[:, t_iter])
        v2v2 = grad_mat[t_iter, t_iter]
        nc, nd = from2(v1v1, v1v2, v2v2)
        new_sol_vec = nc * sol_vec
        new_sol_vec[t_iter] += 1 - nc
        change = new_sol_vec - sol_vec
        if np.sum(np.abs(change)) < stop:
            return sol_vec
        sol_vec = new_sol_vec
    return sol_vec


def test_official_two_vectors_clip_to_0999():
    """(1, 0) and (2, 1): <x1, x2> = 2 >= <x1, x1> = 1, so the official rule gives 0.999 / 0.001, not 1 / 0."""
    V = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    lam = fed.min_norm_weights(V, method="official")
    assert lam.tolist() == [0.999, pytest.approx(0.001, abs=1e-15)]
    assert fed.min_norm_weights(V, method="fw").tolist() == [1.0, 0.0]
    # the mirror case: the second vector is the answer -> 0.001 / 0.999
    lam = fed.min_norm_weights(V.flip(0), method="official")
    assert lam.tolist() == [pytest.approx(0.001, abs=1e-15), 0.999]


def test_official_first_steps_by_hand():
    """G = [[2,0,1],[0,2,1],[1,1,2]]. Pairs: (0,1) gamma 1/2 cost 1; (0,2) and (1,2) cost 3/2: start (1/2, 1/2, 0),
    already optimal, G lam = (1, 1, 1). Step 1: t = 0 (first of the ties), b = a = 1, so the clipped rule keeps
    0.999 and still moves 0.001 towards e_0 -> (0.5005, 0.4995, 0) (plain FW stops: the gap is 0). Step 2:
    G lam = (1.001, 0.999, 1), t = 1, the exact two-point step returns to (1/2, 1/2, 0)."""
    G = np.array([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    lam, info = fed.min_norm_solve(G, method="official", max_iter=0)
    np.testing.assert_allclose(lam, [0.5, 0.5, 0.0], rtol=0, atol=1e-16)
    lam, info = fed.min_norm_solve(G, method="official", max_iter=1)
    np.testing.assert_allclose(lam, [0.999 * 0.5 + 0.001, 0.999 * 0.5, 0.0], rtol=0, atol=1e-15)
    assert info["iterations"] == 1
    lam, info = fed.min_norm_solve(G, method="official", max_iter=2)
    np.testing.assert_allclose(lam, [0.5, 0.5, 0.0], rtol=0, atol=1e-12)
    lam, info = fed.min_norm_solve(G, method="fw")
    np.testing.assert_allclose(lam, [0.5, 0.5, 0.0], rtol=0, atol=1e-16)
    assert info["iterations"] == 0


def test_official_pair_step_on_the_identity():
    """G = I_3: best pair (0, 1) (ties: the first pair wins), then t = 2, a = 1/2, b = 0, c = 1,
    nc = (1 - 0)/(1/2 + 1) = 2/3 -> (1/3, 1/3, 1/3)."""
    lam, _ = fed.min_norm_solve(np.eye(3), method="official", max_iter=0)
    np.testing.assert_allclose(lam, [0.5, 0.5, 0.0], rtol=0, atol=1e-16)
    lam, _ = fed.min_norm_solve(np.eye(3), method="official", max_iter=1)
    np.testing.assert_allclose(lam, [1 / 3] * 3, rtol=0, atol=1e-16)


def test_official_stop_rule_returns_the_point_before_the_small_step():
    G = np.eye(3)
    # |change|_1 of step 1 is 2/3 < 0.7: stop, return the best pair (iterations 0)
    lam, info = fed.min_norm_solve(G, method="official", tol=0.7)
    np.testing.assert_allclose(lam, [0.5, 0.5, 0.0], rtol=0, atol=1e-16)
    assert info["iterations"] == 0
    # 2/3 >= 0.6: step 1 is taken; step 2 changes 0.001 * 4/3 < 0.6: return the centre
    lam, info = fed.min_norm_solve(G, method="official", tol=0.6)
    np.testing.assert_allclose(lam, [1 / 3] * 3, rtol=0, atol=1e-16)
    assert info["iterations"] == 1


@pytest.mark.parametrize("seed, shape", [(0, (5, 7)), (1, (10, 4)), (2, (12, 30)), (3, (3, 2))])
def test_official_matches_a_transcription_of_the_official_code(seed, shape):
    rng = np.random.default_rng(seed)
    V = rng.standard_normal(shape)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    lam = fed.min_norm_weights(torch.from_numpy(V), method="official").numpy()
    np.testing.assert_allclose(lam, _official_transcription(V), rtol=0, atol=1e-12)


def test_official_defaults_are_1000_steps_and_1e5():
    rng = np.random.default_rng(0)
    V = rng.standard_normal((12, 30))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    lam, info = fed.min_norm_solve(V @ V.T, method="official")
    assert info["iterations"] == 1000  # this problem never meets the stop rule: the cap decides
    np.testing.assert_allclose(lam, _official_transcription(V, max_iter=1000, stop=1e-5), rtol=0, atol=1e-12)
    assert np.abs(lam - _official_transcription(V, max_iter=250)).sum() > 1e-6  # the 2023 cap gives another answer
    V = np.random.default_rng(1).standard_normal((10, 4))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    lam, info = fed.min_norm_solve(V @ V.T, method="official")
    assert info["iterations"] == 17  # stopped by |change|_1 < 1e-5
    np.testing.assert_allclose(lam, _official_transcription(V), rtol=0, atol=1e-12)
    assert np.abs(lam - _official_transcription(V, stop=1e-4)).sum() > 1e-5  # the stop threshold matters here
    assert np.abs(lam - _official_transcription(V, stop=1e-6)).sum() > 1e-6
    with pytest.raises(ValueError, match="no warm start"):
        fed.min_norm_solve(np.eye(3), method="official", init=[1.0, 0.0, 0.0])


def test_fedaware_server_with_the_official_solver_never_warm_starts():
    """Six clients whose official and exact weights differ by 0.028 (l1): the server must use the official solver,
    from the best pair every round (a warm start from last round's weights would change the answer)."""
    V = np.random.default_rng(0).standard_normal((6, 5))
    x = torch.zeros(5, dtype=torch.float64)
    s = fed.FedAWARE(x, 6, alpha=0.5, method="official")
    U = torch.from_numpy(V)
    assert s.aggregate(0, list(range(6)), U, [1] * 6) is s.params
    s.aggregate(1, list(range(6)), U, [1] * 6)
    expected = _official_transcription(V / np.linalg.norm(V, axis=1, keepdims=True))
    torch.testing.assert_close(s.last_weights, torch.from_numpy(expected), rtol=0, atol=1e-12)
    exact = fed.min_norm_weights(U, normalize=True).numpy()
    assert np.abs(expected - exact).sum() > 0.02


def test_min_norm_weights_passes_the_solver_options():
    V = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(fed.min_norm_weights(V, method="official", tol=0.7),
                               torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(fed.min_norm_weights(V, method="official", max_iter=0),
                               torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), rtol=0, atol=0)


def test_stopping_rules_of_fw_and_wolfe():
    # relative gap: at e_0 of I_3 the gap is 1 = tol * f, so FW stops at once
    lam, info = fed.min_norm_solve(np.eye(3), method="fw", init=[1.0, 0.0, 0.0], tol=1.0)
    assert lam.tolist() == [1.0, 0.0, 0.0] and info["iterations"] == 0
    # Wolfe starts at the vertex of smallest norm (G3: index 2) and respects max_iter
    lam, info = fed.min_norm_solve(G3, method="wolfe", max_iter=0)
    assert lam.tolist() == [0.0, 0.0, 1.0] and info["iterations"] == 0
    lam, info = fed.min_norm_solve(G3, method="wolfe", max_iter=1)
    assert info["iterations"] == 1


# ------------------------------------------------------------------------------------------ servers


UPD = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
W13 = [1.0, 3.0]  # p = (1/4, 3/4): weighted mean (2.5, 3.5); the plain mean (2, 3) differs


def test_fedavg_and_fedprox_server_by_hand():
    for cls in (fed.FedAvg, fed.FedProx):
        s = cls(torch.tensor([10.0, 20.0], dtype=torch.float64), 4, lr=0.5)
        out = s.aggregate(0, [3, 1], UPD, W13)
        assert out.tolist() == [10.0 - 0.5 * 2.5, 20.0 - 0.5 * 3.5]
        assert s.last_weights.tolist() == [0.0, 0.75, 0.0, 0.25]


def test_fedavgm_by_hand():
    """v1 = mean = (2.5, 3.5); v2 = 0.5 v1 + mean = (3.75, 5.25) (damped (1-β) variants differ)."""
    s = fed.FedAvgM(torch.zeros(2, dtype=torch.float64), 2, lr=0.5, beta=0.5)
    s.aggregate(0, [0, 1], UPD, W13)
    out = s.aggregate(1, [0, 1], UPD, W13)
    assert s.velocity.tolist() == [3.75, 5.25]
    assert out.tolist() == [-0.5 * (2.5 + 3.75), -0.5 * (3.5 + 5.25)]


def _adam_by_hand(gs, yogi, lr=0.01, b1=0.9, b2=0.99, tau=1e-3):
    x, m, v = [0.0, 0.0], [0.0, 0.0], [tau * tau] * 2
    for g in gs:
        for k in range(2):
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            g2 = g[k] * g[k]
            if yogi:
                v[k] = v[k] - (1 - b2) * g2 * math.copysign(1.0, v[k] - g2) if v[k] != g2 else v[k]
            else:
                v[k] = b2 * v[k] + (1 - b2) * g2
            x[k] = x[k] - lr * m[k] / (math.sqrt(v[k]) + tau)
    return x, m, v


@pytest.mark.parametrize("yogi", [False, True])
def test_fedadam_fedyogi_by_hand(yogi):
    # round 1: mean (2.5, 3.5); round 2: a small update (0.01, 0.1), so v > g^2 and Yogi's sign flips
    rounds = [(UPD, W13), (torch.tensor([[0.01, 0.1]], dtype=torch.float64), [1.0])]
    cls = fed.FedYogi if yogi else fed.FedAdam
    s = cls(torch.zeros(2, dtype=torch.float64), 2, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    for r, (u, w) in enumerate(rounds):
        s.aggregate(r, list(range(len(u))), u, w)
    x, m, v = _adam_by_hand([[2.5, 3.5], [0.01, 0.1]], yogi)
    torch.testing.assert_close(s.params, torch.tensor(x, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.m, torch.tensor(m, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.v, torch.tensor(v, dtype=torch.float64), rtol=1e-14, atol=0)


def test_fedyogi_and_fedadam_differ_when_v_exceeds_g2():
    a = fed.FedAdam(torch.zeros(1, dtype=torch.float64), 1, beta2=0.5, tau=1e-3)
    y = fed.FedYogi(torch.zeros(1, dtype=torch.float64), 1, beta2=0.5, tau=1e-3)
    for s in (a, y):
        s.aggregate(0, [0], torch.tensor([[2.0]], dtype=torch.float64), [1])
        s.aggregate(1, [0], torch.tensor([[1.0]], dtype=torch.float64), [1])
    # Adam: v1 = 0.5e-6 + 2 = 2.0000005, v2 = 0.5 v1 + 0.5 = 1.50000025
    # Yogi: v1 = 1e-6 + 0.5*4 = 2.000001, v2 = v1 - 0.5*1*sign(v1 - 1) = 1.500001
    assert float(a.v) == pytest.approx(1.50000025, abs=1e-15)
    assert float(y.v) == pytest.approx(1.500001, abs=1e-15)


def test_fedaware_round_by_hand():
    """Updates (2, 0), (0, 5), (3, 3), all sampled in round 0: u = (1, 0), (0, 1), (1, 1)/sqrt2; min-norm point
    (1/2, 1/2) with lam = (1/2, 1/2, 0) (KKT: <u_3, d> = 0.707 >= |d|^2 = 1/2). Round 1, client 1 alone with (0, -2):
    memory 0.75 * 0.25 * 5 + 0.25 * (-2) = +0.4375 > 0 (swapping alpha and 1 - alpha gives -0.5625)."""
    s = fed.FedAWARE(torch.tensor([1.0, 1.0], dtype=torch.float64), 3, lr=2.0, alpha=0.25)
    U = torch.tensor([[2.0, 0.0], [0.0, 5.0], [3.0, 3.0]], dtype=torch.float64)
    out = s.aggregate(0, [0, 1, 2], U, [1, 5, 9])
    torch.testing.assert_close(s.last_weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.memory, 0.25 * U, rtol=0, atol=0)
    assert s.last_direction_norm == pytest.approx(math.sqrt(0.5), abs=1e-12)
    s.aggregate(1, [1], torch.tensor([[0.0, -2.0]], dtype=torch.float64), [1])
    assert s.memory[1].tolist() == [0.0, 0.4375]
    torch.testing.assert_close(s.memory[[0, 2]], 0.25 * U[[0, 2]], rtol=0, atol=0)  # stale
    torch.testing.assert_close(s.last_weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.params, torch.tensor([-1.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_fedaware_is_fedavg_until_every_client_was_seen():
    s = fed.FedAWARE(torch.zeros(2, dtype=torch.float64), 3, lr=1.0, alpha=0.5)
    out = s.aggregate(0, [0, 1], UPD, W13)
    assert not s.explored
    assert out.tolist() == [-2.5, -3.5] and s.last_weights.tolist() == [0.25, 0.75, 0.0]
    s.aggregate(1, [2], torch.tensor([[-3.0, -4.0]], dtype=torch.float64), [1])
    assert s.explored
    # u = (1, 2)/sqrt5, (3, 4)/5, (-3, -4)/5: the min-norm point is 0 (u_2 and u_3 cancel), lam = (0, 1/2, 1/2)
    torch.testing.assert_close(s.last_weights, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    assert s.last_direction_norm == pytest.approx(0.0, abs=1e-12)


def test_fedprox_client_step_adds_mu_times_distance():
    """Full-batch local GD, 2 steps: step 1 is at x (prox term 0), step 2 adds mu (v1 - x) = -mu * lr * g0, so
    Delta_prox = Delta_plain - lr * mu * Delta_1step (the wrong sign or a 2 mu would differ)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    part = partition_iid(24, 2, seed=0)
    model = mlp(3, 4, 2, 2, seed=0).double()
    lr, mu = 0.3, 0.7

    def deltas(steps, prox):
        f = fed.Federation(model, InMemoryData(x, y), part, fed.LocalWork(lr=lr, batch_size=12, steps=steps), seed=0)
        return f.local_updates(f.initial_params(), [0, 1], 0, prox_mu=prox)[0]

    one, plain, prox = deltas(1, 0.0), deltas(2, 0.0), deltas(2, mu)
    torch.testing.assert_close(prox, plain - lr * mu * one, rtol=1e-12, atol=1e-14)


def test_away_step_by_hand():
    """G = diag(1, 1, 100) at lam = (0.45, 0.45, 0.1): G lam = (0.45, 0.45, 10), f = 1.405, FW slope -0.955, away
    slope (from the support's worst vertex s = 2) 10 - 1.405 = 8.595 is larger: away step lam + g (lam - e_2),
    g = min((b - f)/(f - 2b + c), lam_s/(1 - lam_s)) with b = 10, c = 100."""
    G = np.diag([1.0, 1.0, 100.0])
    lam0 = np.array([0.45, 0.45, 0.1])
    lam, info = fed.min_norm_solve(G, method="away", init=lam0, max_iter=1, tol=0.0)
    f, b, c = 1.405, 10.0, 100.0
    g = min((b - f) / (f - 2 * b + c), 0.1 / 0.9)
    expected = (1 + g) * lam0
    expected[2] -= g
    np.testing.assert_allclose(lam, expected, rtol=0, atol=1e-14)
    assert g == pytest.approx(8.595 / 81.405, abs=1e-15)


def test_min_norm_weights_of_scalars():
    """1-D input: n scalars. The hull of {2, -1} contains 0 at lam = (1/3, 2/3)."""
    lam = fed.min_norm_weights(torch.tensor([2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64), rtol=0, atol=1e-12)


def test_as_many_clients_as_samples_is_allowed():
    x = torch.arange(4.0, dtype=torch.float64).reshape(4, 1)
    y = torch.tensor([0, 1, 0, 1])
    part = [torch.tensor([i]) for i in range(4)]
    f = fed.Federation(mlp(1, 2, 2, 2, seed=0).double(), InMemoryData(x, y), part, fed.LocalWork(lr=0.1, batch_size=1))
    assert f.n_clients == 4


def test_fedaware_state_and_exploration_bookkeeping():
    s = fed.FedAWARE(torch.zeros(2, dtype=torch.float64), 3, alpha=0.5)
    s.aggregate(0, [0, 1], UPD, W13)
    assert s.last_solver == {} and s.lam is None
    t = fed.FedAWARE(torch.zeros(2, dtype=torch.float64), 3, alpha=0.5)
    t.load_state_dict(s.state_dict())
    assert t.lam is None and t.seen.tolist() == [True, True, False]
    torch.testing.assert_close(t.memory, s.memory, rtol=0, atol=0)


def test_stacked_clients_use_each_samples_own_label():
    """Stacked and loop backends agree when sample 0's label differs from sample 1's (index padding must not
    shift real indices)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    f = fed.Federation(mlp(2, 3, 2, 2, seed=0).double(), InMemoryData(x, y), [torch.tensor([0, 2]), torch.tensor([1, 3])],
                       fed.LocalWork(lr=0.5, batch_size=2, steps=2), seed=0)
    a, _ = f.local_updates(f.initial_params(), [0, 1], 0)
    b, _ = f.local_updates(f.initial_params(), [0, 1], 0, backend="loop")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_local_batch_size_upper_none_is_shard_minus_one():
    work = fed.LocalWork(batch_size=(8, None))
    rng = np.random.default_rng(0)
    sizes = {work.draw(rng, 10)[0] for _ in range(60)}
    assert sizes == {8, 9}


def test_fedaware_alpha_one_keeps_only_the_last_update_and_state_sizes_are_checked():
    s = fed.FedAWARE(torch.zeros(2, dtype=torch.float64), 2, alpha=1.0)  # alpha in (0, 1]: 1 is allowed
    s.aggregate(0, [0, 1], UPD, W13)
    s.aggregate(1, [0], torch.tensor([[7.0, 8.0]], dtype=torch.float64), [1])
    assert s.memory[0].tolist() == [7.0, 8.0] and s.memory[1].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="state holds 2 clients x \\(2,\\) parameters, this server 3 x \\(2,\\)"):
        fed.FedAWARE(torch.zeros(2, dtype=torch.float64), 3).load_state_dict(s.state_dict())


def test_fedyogi_official_v0_zero_by_hand():
    """FedAWARE's official FedOpt starts v at 0 (not tau^2): one round with g = 2, beta = (0.9, 0.99), tau = 1e-4:
    m = 0.2, v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04, step = lr * 0.2 / (0.2 + 1e-4) = 0.0099950...;
    with the paper's v0 = tau^2 = 1e-8 the step is lr * 0.2 / (sqrt(0.04000001) + 1e-4), a different number."""
    s = fed.FedYogi(torch.zeros(1, dtype=torch.float64), 1, lr=0.01, tau=1e-4, v0=0.0)
    assert float(s.v) == 0.0
    s.aggregate(0, [0], torch.tensor([[2.0]], dtype=torch.float64), [1])
    assert float(s.v) == pytest.approx(0.04, abs=1e-15)
    assert float(s.params) == pytest.approx(-0.01 * 0.2 / (0.2 + 1e-4), rel=1e-14)
    paper = fed.FedYogi(torch.zeros(1, dtype=torch.float64), 1, lr=0.01, tau=1e-4)
    assert float(paper.v) == pytest.approx(1e-8, rel=1e-14)          # default v0 = tau^2 (Reddi et al.)
    paper.aggregate(0, [0], torch.tensor([[2.0]], dtype=torch.float64), [1])
    assert float(paper.v) == pytest.approx(1e-8 + 0.04, rel=1e-14)
    assert abs(float(paper.params) - float(s.params)) > 1e-12
    with pytest.raises(ValueError, match="v0"):
        fed.FedAdam(torch.zeros(1), 1, v0=-1.0)
