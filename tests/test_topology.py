"""Topologies and mixing matrices: doubly stochastic, the official constructions, spectral gaps, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradiv_lib.workers import (
    TOPOLOGIES,
    Topology,
    check_doubly_stochastic,
    complete,
    exponential,
    grid,
    make_topology,
    metropolis_hastings_weights,
    one_peer_exponential,
    random_graph,
    ring,
    shuffled,
    spectral_gap,
    star,
    torus,
    uniform_weights,
)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize("K", [1, 2, 3, 5, 16])
def test_every_topology_is_doubly_stochastic(name: str, K: int) -> None:
    topo = make_topology(name, K, **({"p": 0.6} if name == "random" else {}))
    assert topo.n_workers == K
    for t in range(topo.period):
        W = topo.matrix(t)
        assert W.dtype == torch.float64 and W.shape == (K, K)
        assert (W >= 0).all()
        torch.testing.assert_close(W.sum(0), torch.ones(K, dtype=torch.float64))
        torch.testing.assert_close(W.sum(1), torch.ones(K, dtype=torch.float64))
    assert 0.0 <= topo.spectral_gap <= 1.0 + 1e-12
    if K > 1 and name != "one_peer_exponential":
        assert topo.spectral_gap > 0, f"{name} with K={K} must be connected"


def test_ring_and_exponential_match_the_official_construction() -> None:
    W = ring(16).matrix()
    for i in range(16):
        nz = sorted(torch.nonzero(W[i]).flatten().tolist())
        assert nz == sorted({(i - 1) % 16, i, (i + 1) % 16})
        assert torch.allclose(W[i, nz], torch.full((3,), 1 / 3, dtype=torch.float64))
    E = exponential(16)
    W = E.matrix()
    for i in range(16):
        assert sorted(torch.nonzero(W[i]).flatten().tolist()) == sorted((i + o) % 16 for o in (0, 1, 2, 4, 8))
    assert torch.allclose(W[W > 0], torch.full((80,), 0.2, dtype=torch.float64))
    assert not E.is_symmetric and ring(16).is_symmetric


def test_grid_is_metropolis_hastings_without_wraparound() -> None:
    topo = grid(16)
    W = topo.matrix()
    # corner 0 has 2 neighbours (1 and 4), each with 3 neighbours: weight 1 / (1 + 3)
    assert W[0, 1] == pytest.approx(0.25) and W[0, 4] == pytest.approx(0.25) and W[0, 0] == pytest.approx(0.5)
    assert W[0, 3] == 0 and W[0, 12] == 0  # no wrap-around
    # the official formula: 1 / max(deg_i, deg_j) with self counted in the degree
    A = (W > 0) & ~torch.eye(16, dtype=torch.bool)
    deg = A.sum(1) + 1
    for i, j in torch.nonzero(A).tolist():
        assert W[i, j] == pytest.approx(1 / max(int(deg[i]), int(deg[j])))
    T = torus(16).matrix()
    assert T[0, 3] > 0 and T[0, 12] > 0
    assert grid(6, shape=(2, 3)).n_workers == 6


def test_ring_spectral_gap_matches_the_closed_form() -> None:
    for K in (5, 8, 16):
        lams = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / K) for k in range(1, K)]
        assert ring(K).spectral_gap == pytest.approx(1 - max(abs(x) for x in lams), abs=1e-10)
    assert complete(7).spectral_gap == pytest.approx(1.0)


def test_spectral_gap_orders_the_topologies() -> None:
    gaps = {name: make_topology(name, 16).spectral_gap for name in ("ring", "grid", "torus", "exponential", "complete")}
    assert gaps["ring"] < gaps["grid"] < gaps["torus"] <= gaps["exponential"] + 1e-12 < gaps["complete"] + 1e-12
    assert spectral_gap(ring(16).matrix()) == pytest.approx(gaps["ring"])


def test_one_peer_exponential_averages_exactly_over_a_period() -> None:
    topo = one_peer_exponential(16)
    assert topo.period == 4 and not topo.is_static
    product = torch.eye(16, dtype=torch.float64)
    for t in range(topo.period):
        W = topo.matrix(t)
        assert int((W[0] > 0).sum()) == 2  # one peer per step
        product = W @ product
    torch.testing.assert_close(product, torch.full((16, 16), 1 / 16, dtype=torch.float64))
    assert topo.spectral_gap == pytest.approx(1.0)
    assert 0 < one_peer_exponential(6).spectral_gap < 1
    torch.testing.assert_close(topo.matrix(5), topo.matrix(1))


def test_star_needs_metropolis_hastings() -> None:
    W = star(5).matrix()
    assert W[0, 1] == pytest.approx(1 / 5) and W[1, 1] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="column 0 sums to"):
        star(5, weights="uniform")
    with pytest.raises(ValueError, match="'metropolis_hastings' or 'uniform'"):
        ring(5, weights="nope")
    torch.testing.assert_close(ring(6, weights="uniform").matrix(), ring(6).matrix())  # regular: the same


def test_check_doubly_stochastic_names_the_property() -> None:
    with pytest.raises(ValueError, match="square"):
        check_doubly_stochastic(torch.ones(2, 3))
    with pytest.raises(ValueError, match="inf or nan"):
        check_doubly_stochastic(torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"entry \(0, 1\) = -0.5 is negative"):
        check_doubly_stochastic(torch.tensor([[1.5, -0.5], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match="row 0 sums to 0.9"):
        check_doubly_stochastic(torch.tensor([[0.4, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="column 0 sums to 0.5"):
        check_doubly_stochastic(torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="complex|real"):
        check_doubly_stochastic(torch.eye(2, dtype=torch.complex64))
    assert check_doubly_stochastic(np.eye(3)).dtype == torch.float64
    with pytest.raises(ValueError, match="symmetric"):
        metropolis_hastings_weights(torch.tensor([[0, 1], [0, 0]]))
    with pytest.raises(ValueError, match="not doubly stochastic"):
        Topology("bad", (torch.tensor([[1.0, 0.0], [1.0, 0.0]]),))


def test_uniform_weights_on_a_regular_graph() -> None:
    A = torch.ones(4, 4) - torch.eye(4)
    torch.testing.assert_close(uniform_weights(A), torch.full((4, 4), 0.25, dtype=torch.float64))


def test_random_graph_is_connected_reproducible_and_validated() -> None:
    a, b = random_graph(12, 0.3, seed=3), random_graph(12, 0.3, seed=3)
    torch.testing.assert_close(a.matrix(), b.matrix())
    assert a.spectral_gap > 0
    with pytest.raises(ValueError, match=r"p must be an edge probability in \(0, 1\]"):
        random_graph(5, 0.0)
    with pytest.raises(RuntimeError, match="no connected G"):
        random_graph(40, 0.01, max_tries=3)


def test_shuffled_relabels_every_step_deterministically() -> None:
    base = ring(8)
    topo = shuffled(base, seed=1)
    W0, W1 = topo.matrix(0), topo.matrix(1)
    assert not torch.equal(W0, W1)
    torch.testing.assert_close(W0, shuffled(base, seed=1).matrix(0))
    check_doubly_stochastic(W0)
    assert sorted(torch.linalg.eigvalsh(W0).tolist()) == pytest.approx(sorted(torch.linalg.eigvalsh(base.matrix()).tolist()))
    # each W_t has the base spectrum, but the relabelled products contract much faster (see spectral_gap)
    assert topo.spectral_gap > 2 * base.spectral_gap
    with pytest.raises(TypeError, match="Topology"):
        shuffled(np.eye(3))


def test_neighbors_in_and_out() -> None:
    assert ring(5).neighbors(0) == ([1, 4], [1, 4])
    ins, outs = exponential(8).neighbors(0)
    assert ins == [1, 2, 4] and outs == [4, 6, 7]
    assert complete(1).neighbors(0) == ([], [])
    with pytest.raises(ValueError, match=r"worker must be an integer in \[0, 4\]"):
        ring(5).neighbors(5)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        ring(5).matrix(-1)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="n_workers must be an integer >= 1"):
        ring(0)
    with pytest.raises(ValueError, match="topology must be one of"):
        make_topology("hypercube", 8)
    with pytest.raises(ValueError, match=r"shape \(3, 3\) holds 9 workers, but n_workers = 8"):
        grid(8, shape=(3, 3))
    assert "spectral gap" in repr(ring(4))


def test_consensus_factor_closed_form_and_noise_simulation() -> None:
    from gradiv_lib.workers import consensus_factor

    assert consensus_factor(complete(8)) == pytest.approx(1.0)
    lam = torch.linalg.eigvalsh(ring(8).matrix())[:-1]
    assert consensus_factor(ring(8)) == pytest.approx(float((1 / (1 - lam**2)).sum() / 7), rel=1e-8)
    assert consensus_factor(ring(1)) == 1.0
    assert consensus_factor(Topology("islands", (torch.eye(2, dtype=torch.float64),))) == math.inf
    # the recursion D <- (W - J) D + (I - J) G with unit Gaussian noise, simulated
    g = torch.Generator().manual_seed(0)
    for topo in (ring(8), one_peer_exponential(8), exponential(8), shuffled(ring(8), seed=0)):
        K = topo.n_workers
        J = torch.full((K, K), 1 / K, dtype=torch.float64)
        D = torch.zeros(K, 200, dtype=torch.float64)
        total = 0.0
        for t in range(600):
            D = (topo.matrix(t) - J) @ D + (torch.eye(K, dtype=torch.float64) - J) @ torch.randn(K, 200, generator=g, dtype=torch.float64)
            if t >= 100:
                total += D.square().sum().item() / 200
        assert total / 500 / (K - 1) == pytest.approx(consensus_factor(topo), rel=0.05), topo.name
    assert 1.0 < consensus_factor(shuffled(ring(8), seed=0)) < consensus_factor(ring(8))
    # the relabelled estimate on a case with an exact value: W_t = J for the complete graph, so S_t = I - J
    assert consensus_factor(shuffled(complete(6), seed=1)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(TypeError, match="Topology"):
        consensus_factor(ring(4).matrix())
