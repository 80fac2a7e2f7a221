r"""Algorithms on many workers, written once for the simulator and the ``torch.distributed`` runner.

Chapters 5 (local SGD) and 6 (decentralized SGD). :math:`K` workers hold parameters :math:`w_1,\dots,w_K`; worker
:math:`j` draws its mini-batches from its own shard and computes :math:`g_j = \nabla L^{\mu_j(t)}(w_j(t))`.

* :class:`MinibatchSGD` (centralized, C-SGD): every step averages the gradients,
  :math:`w(t{+}1) = w(t) - \eta\,\frac1K\sum_j g_j`; all workers hold the same :math:`w`.
* :class:`LocalSGD` (periodic averaging, Haddadpour & Mahdavi 2019): each worker takes :math:`H` local steps
  :math:`w_j \leftarrow w_j - \eta g_j`, then the workers average, :math:`w_j \leftarrow \sum_k q_k w_k` with
  :math:`q_k = n_k/n` (``scheme="average"``). ``scheme="scaled_gradients"`` is the other reading of the paper's
  "sampling schema" (*unverified*): a uniform average, with local gradients scaled by :math:`K q_j` so the
  averaged step is unbiased for :math:`\nabla f = \sum_j q_j\nabla f_j`. With a ``topology`` the average is replaced
  by one gossip step :math:`w_j\leftarrow\sum_k W_{jk}w_k` (the networked variant). ``local_steps`` may differ per
  worker (heterogeneous local work): a round lasts :math:`\max_j H_j` steps and worker :math:`j` is idle (masked)
  after its :math:`H_j` steps.
* :class:`DSGD` (decentralized SGD, Zhu et al. 2023): gossip every step, the gradient taken at the pre-mixing
  iterate, :math:`w_j(t{+}1) = \sum_k W_{jk}w_k(t) - \eta\,g_j(w_j(t))`. Weight decay is part of :math:`g_j` and
  so is also taken at the pre-mixing iterate (Zhu et al.'s code applies it after mixing; they train with 0).

Optimizer: :class:`SGD` with heavy-ball momentum, Nesterov and weight decay, the update of ``torch.optim.SGD``
applied to each worker's own buffer (:math:`b_j\leftarrow\mu b_j + g_j`, :math:`w_j\leftarrow w_j-\eta b_j`;
Nesterov: :math:`w_j\leftarrow w_j-\eta(g_j+\mu b_j)`), weight decay added to :math:`g_j` first. Momentum buffers
stay local: they are never averaged.

Data: :class:`ShardSampler` draws each worker's batch indices as a pure function of
``(seed, worker, step)``, so the simulator and every process of a distributed run see the same batches.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .topology import Topology

__all__ = ["SGD", "MinibatchSGD", "LocalSGD", "DSGD", "Algorithm", "ShardSampler", "SAMPLING"]

#: Ways a worker samples its batches: ``"epoch"`` (a fresh permutation of the shard per epoch, batches are
#: consecutive slices, the last incomplete batch of an epoch is dropped) or ``"replacement"`` (uniform with
#: replacement).
SAMPLING: tuple[str, ...] = ("epoch", "replacement")

_REPLACEMENT_BLOCK = 1024


class _PermutationMemo:
    """The shard permutations of ``"epoch"`` sampling, memoised (least recently used first out, ``limit`` indices
    in all, 16 MiB). Seeding a generator costs ~20 µs, more than permuting a small shard; a sweep of simulations
    that share a seed and a partition (one run per setting) draws each permutation once instead of once per run.
    Only shards of at most ``limit // 64`` samples are kept; the arrays are read-only."""

    def __init__(self, limit: int = 1 << 21) -> None:
        self.limit, self.size = limit, 0
        self._arrays: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # simulators in several threads share it

    def __call__(self, seed: int, worker: int, epoch: int, n: int) -> np.ndarray:
        """``np.random.default_rng([seed, worker, epoch]).permutation(n)``."""
        key = (seed, worker, epoch, n)
        with self._lock:
            perm = self._arrays.get(key)
            if perm is not None:
                self._arrays.move_to_end(key)
                return perm
        perm = np.random.default_rng([seed, worker, epoch]).permutation(n)
        if n <= self.limit // 64:
            perm.setflags(write=False)
            with self._lock:
                if key not in self._arrays:
                    self._arrays[key] = perm
                    self.size += n
                while self.size > self.limit:
                    self.size -= len(self._arrays.popitem(last=False)[1])
        return perm


_epoch_permutation = _PermutationMemo()


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SGD:
    """SGD hyper-parameters of every worker (each worker keeps its own momentum buffer).

    Parameters
    ----------
    lr : float
        Learning rate :math:`\\eta > 0`.
    momentum : float
        Heavy-ball coefficient :math:`\\mu\\in[0, 1)`.
    weight_decay : float
        L2 coefficient :math:`\\ge 0`, added to the gradient.
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0``).
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not _is_real(self.lr) or not 0 < float(self.lr) < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not _is_real(self.momentum) or not 0 <= float(self.momentum) < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_real(self.weight_decay) or not 0 <= float(self.weight_decay) < float("inf"):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")


# --------------------------------------------------------------------------------------------
# Algorithms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MinibatchSGD:
    """Centralized mini-batch SGD (C-SGD): the workers' gradients are averaged every step."""

    name = "minibatch_sgd"

    def check(self, n_workers: int, shard_sizes: Sequence[int]) -> None:  # noqa: D102 - nothing to check
        return None


@dataclass(frozen=True)
class LocalSGD:
    """Local SGD with periodic averaging (see the module docstring).

    Parameters
    ----------
    local_steps : int or sequence of int
        :math:`H`, local steps per round (>= 1); a sequence gives every worker its own :math:`H_j`.
    weights : ``"size"``, ``"uniform"`` or sequence of float
        Averaging weights :math:`q_j`: shard sizes :math:`n_j/n` (default), :math:`1/K`, or given (non-negative,
        summing to one).
    scheme : ``"average"`` or ``"scaled_gradients"``
        Weighted average of the parameters, or uniform average with gradients scaled by :math:`Kq_j`.
    topology : Topology, optional
        Replace the exact average by one gossip step with this topology (uniform weights only).
    """

    local_steps: int | tuple[int, ...] = 1
    weights: str | tuple[float, ...] = "size"
    scheme: str = "average"
    topology: Topology | None = None
    name = "local_sgd"

    def __post_init__(self) -> None:
        steps = self.local_steps
        if _is_int(steps):
            if steps < 1:
                raise ValueError(f"local_steps must be >= 1, got {steps}")
            object.__setattr__(self, "local_steps", int(steps))
        elif isinstance(steps, (Sequence, np.ndarray, Tensor)) and not isinstance(steps, str):
            steps = tuple(int(s) if _is_int(s) else s for s in (steps.tolist() if hasattr(steps, "tolist") else steps))
            if not steps or not all(_is_int(s) and s >= 1 for s in steps):
                raise ValueError(f"local_steps must be an int >= 1 or a non-empty sequence of ints >= 1, got {self.local_steps!r}")
            object.__setattr__(self, "local_steps", steps)
        else:
            raise ValueError(f"local_steps must be an int >= 1 or a sequence of ints >= 1, got {self.local_steps!r}")
        if isinstance(self.weights, str):
            if self.weights not in ("size", "uniform"):
                raise ValueError(f"weights must be 'size', 'uniform' or a sequence of floats, got {self.weights!r}")
        else:
            w = tuple(float(x) for x in self.weights)
            if not w or any(not np.isfinite(x) or x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
                raise ValueError(f"weights must be non-negative and sum to 1, got {self.weights!r} (sum {sum(w):.6g})")
            object.__setattr__(self, "weights", w)
        if self.scheme not in ("average", "scaled_gradients"):
            raise ValueError(f"scheme must be 'average' or 'scaled_gradients', got {self.scheme!r}")
        if self.topology is not None:
            if not isinstance(self.topology, Topology):
                raise TypeError(f"topology must be a Topology or None, got {type(self.topology).__name__}")
            if self.weights not in ("size", "uniform") or self.scheme != "average":
                raise ValueError("a gossip topology averages with its mixing matrix: leave weights and scheme at their "
                                 "defaults when topology is given")

    @property
    def round_length(self) -> int:
        """Steps per communication round, :math:`\\max_j H_j`."""
        return self.local_steps if isinstance(self.local_steps, int) else max(self.local_steps)

    def steps_of(self, n_workers: int) -> Tensor:
        """:math:`H_j` of every worker as a LongTensor ``(K,)``."""
        if isinstance(self.local_steps, int):
            return torch.full((n_workers,), self.local_steps, dtype=torch.long)
        return torch.tensor(self.local_steps, dtype=torch.long)

    def q(self, shard_sizes: Sequence[int]) -> Tensor:
        """The averaging weights :math:`q_j` (float64, sum one)."""
        K = len(shard_sizes)
        if self.weights == "uniform" or self.topology is not None:
            return torch.full((K,), 1.0 / K, dtype=torch.float64)
        if self.weights == "size":
            n = torch.tensor([float(s) for s in shard_sizes], dtype=torch.float64)
            return n / n.sum()
        return torch.tensor(self.weights, dtype=torch.float64)

    def check(self, n_workers: int, shard_sizes: Sequence[int]) -> None:
        """Raise if the configuration does not fit ``n_workers`` workers."""
        if not isinstance(self.local_steps, int) and len(self.local_steps) != n_workers:
            raise ValueError(f"local_steps gives {len(self.local_steps)} values but there are {n_workers} workers")
        if isinstance(self.weights, tuple) and len(self.weights) != n_workers:
            raise ValueError(f"weights gives {len(self.weights)} values but there are {n_workers} workers")
        if self.topology is not None and self.topology.n_workers != n_workers:
            raise ValueError(f"topology {self.topology.name!r} has {self.topology.n_workers} workers but there are {n_workers}")


@dataclass(frozen=True)
class DSGD:
    """Decentralized SGD: gossip with ``topology`` every step, gradient at the pre-mixing iterate."""

    topology: Topology
    name = "dsgd"

    def __post_init__(self) -> None:
        if not isinstance(self.topology, Topology):
            raise TypeError(f"topology must be a Topology (e.g. gradiv_lib.workers.ring(16)), got {type(self.topology).__name__}")

    def check(self, n_workers: int, shard_sizes: Sequence[int]) -> None:
        """Raise if the topology does not have ``n_workers`` workers."""
        if self.topology.n_workers != n_workers:
            raise ValueError(f"topology {self.topology.name!r} has {self.topology.n_workers} workers but there are {n_workers}")


Algorithm = MinibatchSGD | LocalSGD | DSGD


def check_algorithm(algorithm) -> Algorithm:
    if not isinstance(algorithm, (MinibatchSGD, LocalSGD, DSGD)):
        raise TypeError(f"algorithm must be MinibatchSGD(), LocalSGD(...) or DSGD(topology), got {algorithm!r}")
    return algorithm


# --------------------------------------------------------------------------------------------
# The update, shared by the simulator and the distributed runner
# --------------------------------------------------------------------------------------------


class Communicator(Protocol):
    """What an algorithm needs from the backend: the simulator does it with tensor ops over the stacked
    rows, the distributed runner with collectives."""

    def mean(self, x: Tensor) -> Tensor: ...  # uniform average over all workers, broadcast
    def weighted_mean(self, x: Tensor, q: Tensor) -> Tensor: ...  # sum_k q_k x_k, broadcast
    def mix(self, x: Tensor, step: int, topology: Topology) -> Tensor: ...  # x_j <- sum_k W_jk x_k


def sgd_update(
    algorithm: Algorithm,
    opt: SGD,
    params: Tensor,
    grads: Tensor,
    momentum: Tensor | None,
    step: int,
    workers: Tensor,
    shard_sizes: Sequence[int],
    comm: Communicator,
) -> None:
    """One step of ``algorithm`` in place on the rows ``workers`` of ``params`` (``(M, P)``; ``M = K`` in the
    simulator, ``M = 1`` on one process). ``grads`` are the workers' batch gradients at ``params``."""
    K = len(shard_sizes)
    g = grads
    if opt.weight_decay:
        g = g + opt.weight_decay * params
    active = None
    if isinstance(algorithm, MinibatchSGD):
        g = comm.mean(g)
    elif isinstance(algorithm, LocalSGD):
        if algorithm.scheme == "scaled_gradients":
            scale = (K * algorithm.q(shard_sizes))[workers].to(g)
            g = g * scale[:, None]
        if not isinstance(algorithm.local_steps, int):
            H = algorithm.steps_of(K)[workers]
            active = (step % algorithm.round_length) < H
            if bool(active.all()):
                active = None
    if momentum is not None:
        if active is None:
            momentum.mul_(opt.momentum).add_(g)
        else:
            momentum.copy_(torch.where(active[:, None].to(momentum.device), momentum * opt.momentum + g, momentum))
        direction = g + opt.momentum * momentum if opt.nesterov else momentum
    else:
        direction = g
    if isinstance(algorithm, DSGD):
        params.copy_(comm.mix(params, step, algorithm.topology))
    if active is None:
        params.sub_(opt.lr * direction)
    else:
        params.sub_(opt.lr * direction * active[:, None].to(params))
    if isinstance(algorithm, LocalSGD) and (step + 1) % algorithm.round_length == 0:
        if algorithm.topology is not None:
            params.copy_(comm.mix(params, (step + 1) // algorithm.round_length - 1, algorithm.topology))
        elif algorithm.scheme == "scaled_gradients":
            params.copy_(comm.mean(params))
        else:
            params.copy_(comm.weighted_mean(params, algorithm.q(shard_sizes)))


# --------------------------------------------------------------------------------------------
# Per-worker sampling
# --------------------------------------------------------------------------------------------


class ShardSampler:
    """Batch indices of every worker, a pure function of ``(seed, worker, step)``.

    Parameters
    ----------
    partition : sequence of LongTensor
        Global sample indices of each worker's shard (e.g. from :func:`gradiv_lib.data.partition_iid`).
    batch_size : int
        Samples per worker per step, at most the smallest shard.
    seed : int
        Seed; worker ``j`` draws from ``numpy.random.default_rng([seed, j, epoch])``.
    sampling : ``"epoch"`` or ``"replacement"``
        See :data:`SAMPLING`.
    """

    def __init__(self, partition: Sequence[Tensor], batch_size: int, seed: int = 0, sampling: str = "epoch") -> None:
        if not isinstance(partition, (list, tuple)) or not partition:
            raise ValueError(f"partition must be a non-empty list of index tensors, one per worker, got {type(partition).__name__}")
        shards = []
        for j, part in enumerate(partition):
            idx = torch.as_tensor(part)
            if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise ValueError(f"partition[{j}] must be a 1-D tensor of integer sample indices, got shape {tuple(idx.shape)} dtype {idx.dtype}")
            if idx.numel() == 0:
                raise ValueError(f"partition[{j}] is empty: every worker needs at least one sample")
            shards.append(idx.long().cpu())
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        smallest = min(len(s) for s in shards)
        if batch_size > smallest:
            j = min(range(len(shards)), key=lambda i: len(shards[i]))
            raise ValueError(f"batch_size={batch_size} is larger than worker {j}'s shard ({smallest} samples); "
                             f"use batch_size <= {smallest}")
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.shards = shards
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sampling = sampling

    @property
    def n_workers(self) -> int:
        """Number of workers."""
        return len(self.shards)

    @property
    def shard_sizes(self) -> list[int]:
        """Samples in each worker's shard."""
        return [len(s) for s in self.shards]

    def batches_per_epoch(self, worker: int) -> int:
        """Steps per epoch of ``worker`` (``"epoch"`` sampling)."""
        return len(self.shards[worker]) // self.batch_size

    def worker_indices(self, worker: int, start: int, stop: int) -> Tensor:
        """Global indices ``(stop - start, batch_size)`` of ``worker``'s batches at steps ``start..stop-1``."""
        shard, B = self.shards[worker], self.batch_size
        if self.sampling == "epoch":
            nb = len(shard) // B
            rows = []
            for epoch in range(start // nb, (stop - 1) // nb + 1):
                perm = _epoch_permutation(self.seed, worker, epoch, len(shard))[: nb * B]
                rows.append(perm.reshape(nb, B))
            local = np.concatenate(rows)[start - (start // nb) * nb: stop - (start // nb) * nb]
        else:
            rows = []
            for block in range(start // _REPLACEMENT_BLOCK, (stop - 1) // _REPLACEMENT_BLOCK + 1):
                rng = np.random.default_rng([self.seed, worker, block, 1])
                rows.append(rng.integers(0, len(shard), size=(_REPLACEMENT_BLOCK, B)))
            first = (start // _REPLACEMENT_BLOCK) * _REPLACEMENT_BLOCK
            local = np.concatenate(rows)[start - first: stop - first]
        return shard[torch.from_numpy(np.ascontiguousarray(local))]

    def indices(self, start: int, stop: int, workers: Sequence[int] | None = None) -> Tensor:
        """Global indices ``(stop - start, len(workers), batch_size)`` for steps ``start..stop-1``."""
        if not (_is_int(start) and _is_int(stop) and 0 <= start < stop):
            raise ValueError(f"need integers 0 <= start < stop, got start={start!r}, stop={stop!r}")
        workers = range(self.n_workers) if workers is None else workers
        return torch.stack([self.worker_indices(j, start, stop) for j in workers], dim=1)
