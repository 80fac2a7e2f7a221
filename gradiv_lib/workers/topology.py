r"""Communication topologies and their mixing matrices (chapter 6; used by chapter 5's gossip variant).

A topology on :math:`K` workers is a graph plus a **mixing matrix** :math:`W\in\mathbb R^{K\times K}`:
one gossip step replaces the workers' parameters :math:`w_1,\dots,w_K` by :math:`w_j\leftarrow\sum_k W_{jk}w_k`.
Decentralized SGD needs :math:`W` **doubly stochastic** (non-negative, every row and every column sums to one), so
that gossip keeps the average :math:`\bar w = \frac1K\sum_j w_j` unchanged while it contracts the deviations
:math:`w_j-\bar w`. How fast it contracts them is measured by

.. math::

    \rho(W) = \lVert W - \tfrac1K\mathbf 1\mathbf 1^\top\rVert_2, \qquad \text{spectral gap} = 1 - \rho(W),

which for symmetric :math:`W` is one minus the second-largest eigenvalue in absolute value. A gap near one
(complete graph) averages in one step; a gap near zero (long ring) needs many. Time-varying topologies
(one-peer exponential graphs, random relabelling) are described by the same quantity for the product of the
matrices over a period (over a fixed horizon of actual steps for random relabelling), taken to the power
:math:`1/\text{steps}` (:func:`spectral_gap`).

Weights. :func:`metropolis_hastings_weights` gives :math:`W_{ij} = 1/(1+\max(d_i, d_j))` on every edge and the rest
of the row on the diagonal; it is doubly stochastic for every undirected graph (ring: 1/3 each; the
construction of Zhu et al.'s code for rings and grids). :func:`uniform_weights` gives every neighbour and the
worker itself :math:`1/(d_i+1)`; it is doubly stochastic only for regular graphs, and
:func:`check_doubly_stochastic` says which column fails otherwise. The static exponential graph uses
:math:`1/(\text{number of offsets})` on offsets :math:`0, 1, 2, 4, \dots` (1/5 for :math:`K=16`, as in the
official code); it is doubly stochastic but not symmetric.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Topology",
    "TOPOLOGIES",
    "check_doubly_stochastic",
    "complete",
    "consensus_factor",
    "exponential",
    "grid",
    "make_topology",
    "metropolis_hastings_weights",
    "one_peer_exponential",
    "random_graph",
    "ring",
    "shuffled",
    "spectral_gap",
    "star",
    "torus",
    "uniform_weights",
]

#: Tolerance of :func:`check_doubly_stochastic` on row and column sums.
ATOL = 1e-9


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_workers(n_workers: int, name: str = "n_workers", minimum: int = 1) -> int:
    if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n_workers!r}")
    return int(n_workers)


def check_doubly_stochastic(matrix: Tensor | np.ndarray, name: str = "W", atol: float = ATOL) -> Tensor:
    """Validate a mixing matrix and return it as a float64 tensor.

    Checks, in order: a square 2-D matrix, finite entries, non-negative entries, rows summing to one,
    columns summing to one (each within ``atol``). The error names the first property that fails and
    where, e.g. ``"W is not doubly stochastic: column 0 sums to 2.5 (want 1 within 1e-09)"``.
    """
    W = torch.as_tensor(matrix).detach()
    if W.dim() != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"{name} must be a square K x K mixing matrix with K >= 1, got shape {tuple(W.shape)}")
    if W.dtype.is_complex or not (W.dtype.is_floating_point or W.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {W.dtype}")
    W = W.to(torch.float64).cpu()
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} is not a valid mixing matrix: it has inf or nan entries")
    if bool((W < -atol).any()):
        i, j = (int(v) for v in torch.nonzero(W < -atol)[0])
        raise ValueError(f"{name} is not doubly stochastic: entry ({i}, {j}) = {W[i, j].item():.6g} is negative "
                         "(mixing weights must be >= 0)")
    rows, cols = W.sum(1), W.sum(0)
    bad_rows = torch.nonzero((rows - 1).abs() > atol).flatten()
    if len(bad_rows):
        i = int(bad_rows[0])
        raise ValueError(f"{name} is not doubly stochastic: row {i} sums to {rows[i].item():.6g} "
                         f"(want 1 within {atol:g}); {len(bad_rows)} of {len(rows)} rows fail")
    bad_cols = torch.nonzero((cols - 1).abs() > atol).flatten()
    if len(bad_cols):
        j = int(bad_cols[0])
        raise ValueError(f"{name} is not doubly stochastic: column {j} sums to {cols[j].item():.6g} "
                         f"(want 1 within {atol:g}); {len(bad_cols)} of {len(cols)} columns fail. Rows sum to "
                         "one but columns do not: gossip would move the workers' average. Use "
                         "metropolis_hastings_weights for irregular graphs")
    return W.clamp_min(0.0)


def _check_adjacency(adjacency: Tensor | np.ndarray, name: str = "adjacency") -> Tensor:
    A = torch.as_tensor(adjacency).detach().cpu()
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"{name} must be a square K x K 0/1 matrix with K >= 1, got shape {tuple(A.shape)}")
    A = A != 0
    A.fill_diagonal_(False)
    if not bool((A == A.T).all()):
        raise ValueError(f"{name} must be symmetric (an undirected graph); use a directed construction such as "
                         "exponential() for directed graphs")
    return A


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def metropolis_hastings_weights(adjacency: Tensor | np.ndarray) -> Tensor:
    r"""Metropolis–Hastings mixing matrix of an undirected graph (float64).

    :math:`W_{ij} = 1/(1 + \max(d_i, d_j))` for every edge :math:`\{i, j\}` (:math:`d` = number of neighbours,
    self excluded), :math:`W_{ii} = 1 - \sum_{j\ne i} W_{ij}`. Symmetric and doubly stochastic for every graph.
    """
    A = _check_adjacency(adjacency)
    deg = A.sum(1).to(torch.float64)
    W = torch.where(A, 1.0 / (1.0 + torch.maximum(deg[:, None], deg[None, :])), torch.zeros((), dtype=torch.float64))
    W += torch.diag(1.0 - W.sum(1))
    return check_doubly_stochastic(W, "metropolis_hastings_weights")


def uniform_weights(adjacency: Tensor | np.ndarray, validate: bool = True) -> Tensor:
    r"""Uniform mixing matrix :math:`W_{ij} = 1/(d_i+1)` on the neighbours of :math:`i` and :math:`i` itself.

    Doubly stochastic only for regular graphs (every degree equal); with ``validate`` (default) any other
    graph raises the error of :func:`check_doubly_stochastic`, which names the column that fails.
    """
    A = _check_adjacency(adjacency)
    A = A | torch.eye(len(A), dtype=torch.bool)
    W = A.to(torch.float64) / A.sum(1, keepdim=True)
    return check_doubly_stochastic(W, "uniform_weights(adjacency)") if validate else W


#: Steps over which :func:`spectral_gap` measures the contraction of a relabelled (shuffled) topology.
SHUFFLED_HORIZON = 64


def spectral_gap(topology: Topology | Tensor | np.ndarray, horizon: int | None = None) -> float:
    r""":math:`1 - \lVert W - \tfrac1K\mathbf 1\mathbf 1^\top\rVert_2` of a mixing matrix or a topology.

    One definition covers every topology: the contraction of the deviations from the average per gossip step,
    measured over :math:`T` steps,

    .. math:: \text{gap} = 1 - \Big\lVert \prod_{t<T} (W_t - J) \Big\rVert_2^{1/T}
              = 1 - \Big\lVert \prod_{t<T} W_t - J \Big\rVert_2^{1/T}, \qquad J = \tfrac1K\mathbf 1\mathbf 1^\top,

    with :math:`T = 1` for a static topology, :math:`T` = the period for a periodic one (one-peer exponential
    graphs), and, for a topology relabelled by a fresh random permutation every step (:func:`shuffled`), the
    actual (seeded) matrices of its first ``horizon`` steps (default :data:`SHUFFLED_HORIZON` = 64, rounded up to a
    multiple of the period). Relabelling leaves each :math:`W_t`'s spectrum unchanged but not the product's: a
    shuffled ring of 16 workers contracts by about 0.55 per step (gap about 0.45), not by the base ring's 0.95
    (gap 0.051); the value is a seeded estimate that settles as ``horizon`` grows. Zero means gossip never reaches
    consensus (a disconnected graph); one means exact averaging.
    """
    if isinstance(topology, Topology):
        K = topology.n_workers
        J = torch.full((K, K), 1.0 / K, dtype=torch.float64)
        if topology.permute_seed is None:
            steps = topology.period
            if steps == 1:
                rho = torch.linalg.matrix_norm(topology.matrices[0] - J, ord=2).item()
                return float(1.0 - rho)
            M = torch.eye(K, dtype=torch.float64)
            for W in topology.matrices:
                M = W @ M
            rho = torch.linalg.matrix_norm(M - J, ord=2).item()
        else:
            horizon = SHUFFLED_HORIZON if horizon is None else _check_workers(horizon, "horizon")
            steps = -(-horizon // topology.period) * topology.period
            M = torch.eye(K, dtype=torch.float64) - J
            for t in range(steps):  # products of W_t - J: no cancellation however small the product gets
                M = (topology.matrix(t) - J) @ M
            rho = torch.linalg.matrix_norm(M, ord=2).item()
        return float(1.0 - max(rho, 0.0) ** (1.0 / steps))
    W = check_doubly_stochastic(topology)
    rho = torch.linalg.matrix_norm(W - 1.0 / W.shape[0], ord=2).item()
    return float(1.0 - rho)


def consensus_factor(topology: Topology, tol: float = 1e-10, max_steps: int = 200_000) -> float:
    r"""How much a topology amplifies independent gradient noise into disagreement between workers.

    In decentralized SGD the deviations :math:`D = (I - J)X` (:math:`J = \tfrac1K\mathbf 1\mathbf 1^\top`, rows
    :math:`w_j - \bar w`) follow :math:`D(t{+}1) = A_t D(t) - \eta(I-J)G(t)` with :math:`A_t = W_t - J`. If the rows of
    :math:`G` were independent with covariance :math:`\Sigma_g`, the stationary consensus distance would be

    .. math::

        \mathbb E\operatorname{tr}\Xi = \eta^2\operatorname{tr}\Sigma_g\,\frac{K-1}{K}\,c(W),\qquad
        c(W) = \frac{1}{K-1}\operatorname{tr}\sum_{k\ge 0}A^k(I-J)(A^k)^\top ,

    and this function returns :math:`c(W)` (averaged over the phases of a time-varying schedule). :math:`c = 1` for
    the complete graph; for a symmetric static :math:`W` it is :math:`\frac1{K-1}\sum_{i\ge2}1/(1-\lambda_i^2)`.
    Unlike the spectral gap, which only bounds the slowest mode, :math:`c` weighs every eigenvalue. ``inf`` when
    the topology never reaches consensus. Relabelled topologies (:func:`shuffled`) are estimated by iterating the
    recursion with their actual matrices.
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a Topology, got {type(topology).__name__}")
    K = topology.n_workers
    if K == 1:
        return 1.0
    if topology.spectral_gap <= 1e-12:
        return math.inf
    J = torch.full((K, K), 1.0 / K, dtype=torch.float64)
    Q = torch.eye(K, dtype=torch.float64) - J
    if topology.permute_seed is not None:
        S, total, count = Q.clone(), 0.0, 0
        steps = int(min(max_steps, max(4000, 40 / topology.spectral_gap)))
        for t in range(steps):
            A = topology.matrix(t) - J
            S = A @ S @ A.T + Q
            if t >= steps // 2:
                total += torch.trace(S).item()
                count += 1
        return total / count / (K - 1)
    # one period as a unit: S -> P S P^T + Q_period, P = A_{tau-1} ... A_0, solved by doubling
    P, Qp = torch.eye(K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.float64)
    for W in topology.matrices:
        A = W - J
        P, Qp = A @ P, A @ Qp @ A.T + Q
    S, Pk = Qp.clone(), P.clone()
    for _ in range(64):
        new = S + Pk @ S @ Pk.T
        Pk = Pk @ Pk
        done = torch.linalg.matrix_norm(new - S) <= tol * torch.linalg.matrix_norm(new)
        S = new
        if done:
            break
    traces = []
    for W in topology.matrices:  # S is the covariance at phase 0 (after a full period); walk through the phases
        A = W - J
        S = A @ S @ A.T + Q
        traces.append(torch.trace(S).item())
    return float(sum(traces) / len(traces) / (K - 1))


# --------------------------------------------------------------------------------------------
# The topology object
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Topology:
    """A (possibly time-varying) communication topology on ``n_workers`` workers.

    Attributes
    ----------
    name : str
        Human-readable name, e.g. ``"ring"``.
    matrices : tuple of Tensor
        One float64 doubly stochastic ``(K, K)`` matrix per step of a period; a static topology has one.
        Step ``t`` uses ``matrices[t % period]``.
    permute_seed : int or None
        If set, every step ``t`` relabels the workers by a fresh random permutation :math:`\\Pi_t` drawn from
        ``(permute_seed, t)``: :math:`W_t = \\Pi_t^\\top W \\Pi_t` (Zhu et al.'s ``--shuffle random``).
        Deterministic, so every process of a distributed run draws the same :math:`\\Pi_t`.
    """

    name: str
    matrices: tuple[Tensor, ...]
    permute_seed: int | None = None
    _support: tuple[tuple[Tensor, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.matrices:
            raise ValueError("matrices must hold at least one mixing matrix")
        checked = tuple(check_doubly_stochastic(W, f"{self.name} mixing matrix {t}") for t, W in enumerate(self.matrices))
        sizes = {W.shape[0] for W in checked}
        if len(sizes) != 1:
            raise ValueError(f"all mixing matrices of {self.name} must have the same size, got sizes {sorted(sizes)}")
        if self.permute_seed is not None and (isinstance(self.permute_seed, bool) or not isinstance(self.permute_seed, int)):
            raise ValueError(f"permute_seed must be an int or None, got {self.permute_seed!r}")
        object.__setattr__(self, "matrices", checked)

    @property
    def n_workers(self) -> int:
        """Number of workers :math:`K`."""
        return self.matrices[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct matrices before the schedule repeats (1 for a static topology)."""
        return len(self.matrices)

    @property
    def is_static(self) -> bool:
        """``True`` when every step uses the same matrix."""
        return self.period == 1 and self.permute_seed is None

    @property
    def is_symmetric(self) -> bool:
        """``True`` when every matrix equals its transpose."""
        return all(bool(torch.allclose(W, W.T, atol=ATOL)) for W in self.matrices)

    @property
    def spectral_gap(self) -> float:
        """See :func:`spectral_gap`."""
        return spectral_gap(self)

    def matrix(self, step: int = 0) -> Tensor:
        """The float64 mixing matrix :math:`W_t` of step ``step`` (a copy; safe to modify)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        W = self.matrices[int(step) % self.period]
        if self.permute_seed is None:
            return W.clone()
        perm = _permutation(self.permute_seed, int(step), self.n_workers)
        return W[perm][:, perm].clone()

    def neighbors(self, worker: int, step: int = 0) -> tuple[list[int], list[int]]:
        """``(in_neighbors, out_neighbors)`` of ``worker`` at ``step``, self excluded.

        In-neighbours are the ``k`` with :math:`W_{jk} > 0` (whose parameters ``worker`` receives);
        out-neighbours the ``i`` with :math:`W_{ij} > 0` (who receive from ``worker``).
        """
        K = self.n_workers
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) or not 0 <= worker < K:
            raise ValueError(f"worker must be an integer in [0, {K - 1}], got {worker!r}")
        W = self.matrix(step)
        ins = [k for k in torch.nonzero(W[worker] > 0).flatten().tolist() if k != worker]
        outs = [i for i in torch.nonzero(W[:, worker] > 0).flatten().tolist() if i != worker]
        return ins, outs

    def max_degree(self) -> int:
        """Largest number of in-neighbours of any worker at any step of a period."""
        return max(int((W > 0).sum(1).max()) - 1 for W in self.matrices)

    def __repr__(self) -> str:
        kind = "static" if self.is_static else (f"period {self.period}" + (", relabelled every step" if self.permute_seed is not None else ""))
        return f"Topology({self.name!r}, K={self.n_workers}, {kind}, spectral gap {self.spectral_gap:.4f})"


def _permutation(seed: int, step: int, n: int) -> Tensor:
    rng = np.random.default_rng([int(seed), int(step)])
    return torch.from_numpy(rng.permutation(n))


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------


def _adjacency_from_edges(n: int, edges: Sequence[tuple[int, int]]) -> Tensor:
    A = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        if i != j:
            A[i, j] = A[j, i] = True
    return A


def _weights(adjacency: Tensor, weights: str) -> Tensor:
    if weights == "metropolis_hastings":
        return metropolis_hastings_weights(adjacency)
    if weights == "uniform":
        return uniform_weights(adjacency)
    raise ValueError(f"weights must be 'metropolis_hastings' or 'uniform', got {weights!r}")


def ring(n_workers: int, weights: str = "metropolis_hastings") -> Topology:
    """Cycle :math:`0-1-\\dots-(K-1)-0`: each worker averages with its two neighbours (1/3 each for :math:`K\\ge 3`).

    ``K = 2`` is a single edge (1/2 each), ``K = 1`` a lone worker.
    """
    K = _check_workers(n_workers)
    A = _adjacency_from_edges(K, [(i, (i + 1) % K) for i in range(K)])
    return Topology("ring", (_weights(A, weights),))


def _grid_shape(K: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is None:
        rows = max(r for r in range(1, math.isqrt(K) + 1) if K % r == 0)
        return rows, K // rows
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"shape must be a pair (rows, cols) of positive integers, got {shape!r}")
    if shape[0] * shape[1] != K:
        raise ValueError(f"shape {tuple(shape)} holds {shape[0] * shape[1]} workers, but n_workers = {K}")
    return int(shape[0]), int(shape[1])


def grid(n_workers: int, shape: tuple[int, int] | None = None, weights: str = "metropolis_hastings",
         wrap: bool = False) -> Topology:
    """2-D grid, each worker linked to its 4 neighbours; without wrap-around unless ``wrap``.

    ``shape`` defaults to the most square factorisation ``rows x cols`` of ``n_workers`` (4 x 4 for 16; a prime
    ``K`` gives a 1 x K path). Metropolis–Hastings weights by default, as in Zhu et al.'s ``meshgrid``.
    """
    K = _check_workers(n_workers)
    rows, cols = _grid_shape(K, shape)
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if c + 1 < cols or (wrap and cols > 1):
                edges.append((i, r * cols + (c + 1) % cols))
            if r + 1 < rows or (wrap and rows > 1):
                edges.append((i, ((r + 1) % rows) * cols + c))
    name = "torus" if wrap else "grid"
    return Topology(name, (_weights(_adjacency_from_edges(K, edges), weights),))


def torus(n_workers: int, shape: tuple[int, int] | None = None, weights: str = "metropolis_hastings") -> Topology:
    """2-D grid with wrap-around (every worker has 4 neighbours when both sides are >= 3)."""
    return grid(n_workers, shape, weights, wrap=True)


def _exponential_offsets(K: int) -> list[int]:
    offsets, step = [0], 1
    while step < K:
        offsets.append(step)
        step *= 2
    return offsets


def exponential(n_workers: int) -> Topology:
    """Static exponential graph: worker :math:`i` averages the workers :math:`i + 2^k \\bmod K`, :math:`2^k < K`, and itself.

    Circulant, every weight :math:`1/(1 + \\lceil\\log_2 K\\rceil)` (1/5 for :math:`K = 16`), doubly stochastic
    and **not symmetric** (a directed graph), as in Zhu et al.'s code.
    """
    K = _check_workers(n_workers)
    offsets = _exponential_offsets(K)
    W = torch.zeros(K, K, dtype=torch.float64)
    for i in range(K):
        for o in offsets:
            W[i, (i + o) % K] += 1.0 / len(offsets)
    return Topology("exponential", (W,))


def one_peer_exponential(n_workers: int) -> Topology:
    r"""Time-varying one-peer exponential graph (Ying et al., 2021).

    At step :math:`t` worker :math:`i` averages with worker :math:`i + 2^{t \bmod \tau} \bmod K`,
    :math:`\tau = \lceil\log_2 K\rceil`: :math:`W_t = \tfrac12(I + S^{2^{t\bmod\tau}})` with :math:`S` the cyclic
    shift. One message per worker per step; when :math:`K` is a power of two, :math:`\tau` consecutive steps
    average exactly.
    """
    K = _check_workers(n_workers)
    if K == 1:
        return Topology("one_peer_exponential", (torch.ones(1, 1, dtype=torch.float64),))
    mats = []
    for o in _exponential_offsets(K)[1:]:
        W = 0.5 * torch.eye(K, dtype=torch.float64)
        W += 0.5 * torch.roll(torch.eye(K, dtype=torch.float64), shifts=o, dims=1)
        mats.append(W)
    return Topology("one_peer_exponential", tuple(mats))


def complete(n_workers: int) -> Topology:
    """Everyone averages with everyone: :math:`W = \\tfrac1K\\mathbf 1\\mathbf 1^\\top` (spectral gap 1)."""
    K = _check_workers(n_workers)
    return Topology("complete", (torch.full((K, K), 1.0 / K, dtype=torch.float64),))


def star(n_workers: int, weights: str = "metropolis_hastings") -> Topology:
    """Worker 0 linked to every other worker. Irregular, so only Metropolis–Hastings weights are doubly stochastic."""
    K = _check_workers(n_workers)
    return Topology("star", (_weights(_adjacency_from_edges(K, [(0, j) for j in range(1, K)]), weights),))


def random_graph(n_workers: int, p: float = 0.3, seed: int = 0, weights: str = "metropolis_hastings",
                 max_tries: int = 1000) -> Topology:
    """Connected Erdős–Rényi graph G(K, p): every edge present with probability ``p``, re-drawn until connected."""
    K = _check_workers(n_workers)
    if not isinstance(p, (int, float, np.floating)) or isinstance(p, bool) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"p must be an edge probability in (0, 1], got {p!r}")
    _check_workers(max_tries, "max_tries")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        upper = np.triu(rng.random((K, K)) < p, k=1)
        A = torch.from_numpy(upper | upper.T)
        if _connected(A):
            return Topology(f"random(p={float(p):g})", (_weights(A, weights),))
    raise RuntimeError(f"no connected G(K={K}, p={p}) graph in max_tries={max_tries} draws; raise p (connectivity "
                       f"needs p well above log(K)/K = {math.log(max(K, 2)) / K:.3f})")


def _connected(A: Tensor) -> bool:
    K = A.shape[0]
    seen = {0}
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j in torch.nonzero(A[i]).flatten().tolist():
            if j not in seen:
                seen.add(j)
                frontier.append(j)
    return len(seen) == K


def shuffled(topology: Topology, seed: int = 0) -> Topology:
    """Relabel the workers of ``topology`` by a fresh random permutation every step (Zhu et al.'s ``--shuffle random``)."""
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a Topology, got {type(topology).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return Topology(f"shuffled {topology.name}", topology.matrices, permute_seed=seed)


#: Constructors by name, for :func:`make_topology` and the command line.
TOPOLOGIES: dict[str, Callable[..., Topology]] = {
    "ring": ring,
    "grid": grid,
    "torus": torus,
    "exponential": exponential,
    "one_peer_exponential": one_peer_exponential,
    "complete": complete,
    "star": star,
    "random": random_graph,
}


def make_topology(name: str, n_workers: int, **kwargs) -> Topology:
    """Build a topology by name (one of :data:`TOPOLOGIES`), e.g. ``make_topology("ring", 16)``."""
    if name not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {sorted(TOPOLOGIES)}, got {name!r}")
    return TOPOLOGIES[name](n_workers, **kwargs)
