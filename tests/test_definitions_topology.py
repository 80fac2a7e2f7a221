"""Definitions of the topologies, their mixing matrices and spectral gaps, pinned by hand computation, for worker
counts that are and are not powers of two.

Closed forms used: a circulant matrix is normal, so :math:`\\lVert W - J\\rVert_2` is the largest modulus of its
eigenvalues :math:`\\sum_o w_o\\,\\omega^{ko}` over :math:`k \\ne 0`, :math:`\\omega = e^{2\\pi i/K}`; a product of
circulants is the circulant of the products of the eigenvalues.
"""
from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

from gradiv_lib.workers.topology import (
    SHUFFLED_HORIZON,
    check_doubly_stochastic,
    complete,
    consensus_factor,
    exponential,
    grid,
    metropolis_hastings_weights,
    one_peer_exponential,
    ring,
    shuffled,
    spectral_gap,
    star,
    torus,
    uniform_weights,
)


def _circulant_rho(weights_by_offset: dict[int, float], K: int) -> float:
    return max(abs(sum(w * cmath.exp(2j * math.pi * k * o / K) for o, w in weights_by_offset.items())) for k in range(1, K))


@pytest.mark.parametrize("K", [3, 5, 6, 7, 10, 16])
def test_ring_metropolis_hastings_and_gap(K):
    W = ring(K).matrix()
    expected = torch.zeros(K, K, dtype=torch.float64)
    for i in range(K):
        for o in (-1, 0, 1):
            expected[i, (i + o) % K] = 1 / 3
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-15)
    # symmetric circulant: eigenvalues 1/3 + 2/3 cos(2 pi k / K); the gap is one minus the largest |.| over k != 0
    rho = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / K)) for k in range(1, K))
    assert ring(K).spectral_gap == pytest.approx(1 - rho, abs=1e-12)


def test_ring_of_two_is_one_edge():
    torch.testing.assert_close(ring(2).matrix(), torch.full((2, 2), 0.5, dtype=torch.float64), rtol=0, atol=0)
    assert ring(2).spectral_gap == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("K, offsets", [(2, [0, 1]), (3, [0, 1, 2]), (5, [0, 1, 2, 4]), (6, [0, 1, 2, 4]),
                                        (12, [0, 1, 2, 4, 8]), (16, [0, 1, 2, 4, 8]), (17, [0, 1, 2, 4, 8, 16])])
def test_exponential_graph_offsets_and_gap_for_any_worker_count(K, offsets):
    """Offsets 2^k < K (and 0), weight 1/(number of offsets): 1/4 for K = 5, 6; 1/5 for 12 and 16; 1/6 for 17."""
    W = exponential(K).matrix()
    expected = torch.zeros(K, K, dtype=torch.float64)
    for i in range(K):
        for o in offsets:
            expected[i, (i + o) % K] += 1 / len(offsets)
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-15)
    rho = _circulant_rho({o: 1 / len(offsets) for o in offsets}, K)
    assert exponential(K).spectral_gap == pytest.approx(1 - rho, abs=1e-12)


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6, 8, 12, 16])  # K = 4: the one period of length 2 whose gap is not K = 3's coincidence
def test_one_peer_exponential_matrices_and_product_gap(K):
    """W_t = (I + S^{o_t})/2, o_t = 2^t for 2^t < K: worker i averages with i + o_t. The gap is
    1 - rho(prod)^(1/tau) with the product's eigenvalues prod_t (1 + omega^{k o_t})/2."""
    topo = one_peer_exponential(K)
    offsets = [2 ** t for t in range(math.ceil(math.log2(K)))]
    assert topo.period == len(offsets)
    for t, o in enumerate(offsets):
        W = topo.matrix(t)
        for i in range(K):
            assert W[i, i] == 0.5 and W[i, (i + o) % K] == 0.5
    rho = max(abs(math.prod((1 + cmath.exp(2j * math.pi * k * o / K)) / 2 for o in offsets)) for k in range(1, K))
    gap = topo.spectral_gap
    if K & (K - 1) == 0:
        assert rho < 1e-14 and gap == 1.0  # a power of two averages exactly over one period
    else:
        assert gap == pytest.approx(1 - rho ** (1 / len(offsets)), abs=1e-12) and gap < 1.0


def test_grid_and_torus_metropolis_hastings_by_hand():
    """2 x 3 grid: corners have 2 neighbours, the middle column 3: W_ij = 1/(1 + max(d_i, d_j))."""
    W = grid(6).matrix()  # rows 0 1 2 / 3 4 5
    deg = [2, 3, 2, 2, 3, 2]
    edges = {(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)}
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for i, j in edges:
        expected[i, j] = expected[j, i] = 1 / (1 + max(deg[i], deg[j]))
    expected += torch.diag(1 - expected.sum(1))
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-15)
    assert float(expected[0, 0]) == pytest.approx(1 - 1 / 4 - 1 / 3, abs=1e-15)  # corner: 1/4 to its grid neighbour, 1/3 to the middle column
    # a 3 x 3 torus is 4-regular: 1/5 on each neighbour and on itself
    T = torus(9).matrix()
    assert torch.all(((T - 0.2).abs() < 1e-15) | (T == 0)) and torch.all((T > 0).sum(1) == 5)


def test_star_metropolis_hastings_by_hand():
    W = star(4).matrix()  # centre degree 3, leaves degree 1: W_0j = 1/4, W_00 = 1/4, W_jj = 3/4
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]],
                            dtype=torch.float64)
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-15)
    assert star(4).spectral_gap == pytest.approx(0.25, abs=1e-12)  # eigenvalues 1, 3/4, 3/4, 0


def test_uniform_weights_and_metropolis_on_a_path():
    A = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(metropolis_hastings_weights(A), torch.tensor(
        [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]], dtype=torch.float64), rtol=0, atol=1e-15)
    W = uniform_weights(A, validate=False)  # 1/(d_i + 1) per row: rows sum to one, columns do not
    torch.testing.assert_close(W, torch.tensor([[0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5]],
                                               dtype=torch.float64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="column 0 sums to 0.833333"):
        uniform_weights(A)


def test_complete_graph_and_matrix_gap():
    assert complete(5).spectral_gap == pytest.approx(1.0, abs=1e-15)
    W = np.array([[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]])
    assert spectral_gap(W) == pytest.approx(1 - np.linalg.norm(W - 1 / 3, 2), abs=1e-15)
    # symmetric: the second-largest |eigenvalue|
    assert spectral_gap(W) == pytest.approx(1 - sorted(abs(np.linalg.eigvalsh(W)))[-2], abs=1e-12)


@pytest.mark.parametrize("K", [5, 16])
def test_shuffled_gap_is_the_product_definition(K):
    """A relabelled topology: 1 - ||prod_{t<T} W_t - J||^(1/T) over its actual first T = 64 steps, computed as
    ||prod (W_t - J)|| (the same matrix: W_t J = J W_t = J), which does not cancel to rounding noise."""
    topo = shuffled(ring(K), seed=3)
    J = torch.full((K, K), 1.0 / K, dtype=torch.float64)
    P = torch.eye(K, dtype=torch.float64)
    for t in range(SHUFFLED_HORIZON):
        P = (topo.matrix(t) - J) @ P
    expected = 1 - torch.linalg.matrix_norm(P, ord=2).item() ** (1 / SHUFFLED_HORIZON)
    assert topo.spectral_gap == pytest.approx(expected, rel=1e-6)
    P8 = torch.eye(K, dtype=torch.float64)
    for t in range(8):
        P8 = topo.matrix(t) @ P8
    assert spectral_gap(topo, horizon=8) == pytest.approx(
        1 - torch.linalg.matrix_norm(P8 - J, ord=2).item() ** (1 / 8), rel=1e-12)


def test_shuffled_gap_matches_the_empirical_contraction():
    """Gossip on a shuffled ring of 16: the deviations shrink by about (1 - gap) per step, nothing like the base
    ring's 0.949."""
    topo = shuffled(ring(16), seed=0)
    gap = topo.spectral_gap
    assert 0.35 < gap < 0.55 and ring(16).spectral_gap == pytest.approx(0.0507, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    D0 = (X - X.mean(0)).norm()
    T = 40
    for t in range(T):
        X = topo.matrix(t) @ X
    per_step = ((X - X.mean(0)).norm() / D0).item() ** (1 / T)
    assert per_step == pytest.approx(1 - gap, abs=0.08)


def test_shuffled_one_peer_rounds_the_horizon_to_whole_periods():
    topo = shuffled(one_peer_exponential(6), seed=0)  # period 3: 64 -> 66 steps
    K = 6
    J = torch.full((K, K), 1.0 / K, dtype=torch.float64)
    P = torch.eye(K, dtype=torch.float64)
    for t in range(66):
        P = (topo.matrix(t) - J) @ P
    rho = torch.linalg.matrix_norm(P, ord=2).item()
    assert topo.spectral_gap == pytest.approx(1 - rho ** (1 / 66), rel=1e-6)


def test_consensus_factor_of_a_symmetric_ring_by_hand():
    K = 6
    lams = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / K) for k in range(1, K)]
    assert consensus_factor(ring(K)) == pytest.approx(sum(1 / (1 - l * l) for l in lams) / (K - 1), rel=1e-9)
    assert consensus_factor(complete(K)) == pytest.approx(1.0, rel=1e-12)


def test_check_doubly_stochastic_tolerance():
    W = np.full((2, 2), 0.5)
    W[0, 0] += 5e-10  # within 1e-9
    check_doubly_stochastic(W)
    W[0, 0] += 1e-9
    with pytest.raises(ValueError, match="row 0 sums to"):
        check_doubly_stochastic(W)


def test_names_repr_and_messages():
    assert [t.name for t in (ring(4), exponential(4), one_peer_exponential(4), complete(4), star(4), grid(4), torus(4))] == [
        "ring", "exponential", "one_peer_exponential", "complete", "star", "grid", "torus"]
    assert repr(ring(4)).startswith("Topology('ring', K=4, static,")
    assert "period 2, relabelled every step" in repr(shuffled(one_peer_exponential(4)))
    assert "period 2," in repr(one_peer_exponential(4)) and "relabelled" not in repr(one_peer_exponential(4))
    from gradiv_lib.workers.topology import random_graph
    torch.testing.assert_close(random_graph(5, p=1.0).matrix(), complete(5).matrix(), rtol=0, atol=1e-15)  # p = 1: complete
    assert random_graph(5, p=1.0).name == "random(p=1)"
    with pytest.raises(ValueError, match=r"entry \(1, 0\) = -0.1 is negative"):
        check_doubly_stochastic(np.array([[1.0, 0.0, 0.0], [-0.1, 1.1, 0.0], [0.1, -0.1, 1.0]]))
    with pytest.raises(ValueError, match="n_workers must be an integer >= 1, got True"):
        ring(True)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) holds 6 workers, but n_workers = 4"):
        grid(4, shape=(2, 3))


def test_topology_stores_validated_float64_matrices_and_degrees():
    from gradiv_lib.workers.topology import Topology, random_graph
    t = Topology("x", (torch.full((2, 2), 0.5, dtype=torch.float32),))
    assert t.matrices[0].dtype == torch.float64 and t.matrix(0).dtype == torch.float64
    assert ring(5).max_degree() == 2 and star(5).max_degree() == 4 and exponential(6).max_degree() == 3
    assert one_peer_exponential(8).max_degree() == 1
    with pytest.raises(ValueError, match="p must be an edge probability in"):
        random_graph(4, p=True)
