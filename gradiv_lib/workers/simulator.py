r"""The stacked-replica simulator: :math:`K` workers in one process, one batched step for all of them.

Chapters 5 and 6. All :math:`K` parameter vectors are rows of one tensor ``params`` of shape ``(K, P)`` (the flat
parameters of the model, in ``model.named_parameters()`` order). One step

1. gathers every worker's mini-batch from its own shard (``(K, B, ...)``, by :class:`ShardSampler`),
2. computes all :math:`K` gradients in one batched forward/backward (an engine from
   :mod:`gradiv_lib.workers._engines`: batched matrix products for MLPs and linear models, ``torch.func.vmap`` over
   ``functional_call`` for any other module, or a loop; ``backend="auto"`` times them on the first batch and keeps the
   fastest),
3. applies the algorithm's update to the stacked rows: the optimizer on the ``(K, P)`` momentum buffer, gossip as
   one matrix product :math:`W\,\mathtt{params}` (or a neighbour-indexed sum for large sparse graphs),
   averaging as a weighted row mean, heterogeneous local steps as a 0/1 mask.

Diagnostics: the consensus distance :math:`\operatorname{tr}\Xi = \frac1K\sum_j\lVert w_j-\bar w\rVert^2` (the trace
of the workers' covariance :math:`\Xi`, chapter 6), the workers' deviations :math:`w_j - \bar w` (to sample
:math:`\epsilon\sim\mathcal N(0,\Xi)` in :mod:`gradiv_lib.sharpness`), full-shard gradients and the gradient
diversity across workers and across the samples of each worker's batch (:func:`diversity_variants`).

Models must not mix samples through state: BatchNorm in training mode with running statistics is refused (use
GroupNorm, ``model.eval()`` or ``track_running_stats=False``). Dropout works (independent masks per worker).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state

from ..data import InMemoryData, partition_iid
from ..diversity import DiversityResult, diversity_from_grads
from ..norms.loss_scale import check_loss_shapes_on
from ..stateless import functional_call
from ._engines import (ENGINES, ChunkedEngine, Engine, FlatSpec, eligible_engines, forward_mixes_samples, make_engine, per_sample_grads,
                       pick_engine, sample_mixing_layers)
from .algorithms import DSGD, SGD, LocalSGD, MinibatchSGD, ShardSampler, check_algorithm, sgd_update
from .topology import Topology

__all__ = ["Simulator", "diversity_variants", "BACKENDS", "MIXING"]

#: Gradient backends of :class:`Simulator` (``"auto"`` measures the eligible ones).
BACKENDS: tuple[str, ...] = ("auto", "bmm", "vmap", "vmap_grad", "loop")
#: Gossip implementations: ``"dense"`` (:math:`W\,X`), ``"sparse"`` (sum over each row's non-zeros) or ``"auto"``.
MIXING: tuple[str, ...] = ("auto", "dense", "sparse")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mixing = sample_mixing_layers(model)
    if mixing:
        raise ValueError(
            f"model has BatchNorm layers in training mode that update running statistics ({', '.join(mixing)}); "
            "stacked workers cannot share them. Use GroupNorm (gradiv_lib.models.cnn(norm='group')), call "
            "model.eval(), or build the layers with track_running_stats=False")


def _as_data(data: Any) -> InMemoryData:
    if isinstance(data, InMemoryData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return InMemoryData(data[0], data[1])
    raise TypeError(f"data must be InMemoryData or an (x, y) pair of tensors, got {type(data).__name__}")


def _as_optimizer(optimizer: SGD | float) -> SGD:
    if isinstance(optimizer, SGD):
        return optimizer
    if isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool):
        return SGD(lr=float(optimizer))
    raise TypeError(f"optimizer must be gradiv_lib.workers.SGD(lr=...) or a learning rate, got {optimizer!r}")


def diversity_variants(grads: Tensor, weights: Tensor | Sequence[float] | None = None) -> dict[str, float]:
    r"""Three gradient-diversity variants of :math:`K` gradients ``(K, ...)`` (one per worker or per sample).

    * ``"yin"`` — :math:`\Delta = \sum_j\lVert g_j\rVert^2 / \lVert\sum_j g_j\rVert^2` (Yin et al.), in
      :math:`[1/K, \infty)`;
    * ``"weighted"`` — :math:`\Lambda = \sum_j q_j\lVert g_j\rVert^2 / \lVert\sum_j q_j g_j\rVert^2` (the form
      attributed to Haddadpour & Mahdavi; its exact normalisation there is *unverified*), 1 for identical
      gradients; with uniform :math:`q` it equals :math:`K\Delta = B_S`;
    * ``"rms_ratio"`` — :math:`\sqrt{\tfrac1K\sum_j\lVert g_j\rVert^2}\,/\,\lVert\tfrac1K\sum_j g_j\rVert
      = \sqrt{K\Delta}` (FedAWARE's logged metric).

    ``weights`` are the :math:`q_j` (default uniform). Computed in float64; ``inf`` when the (weighted) mean
    gradient is exactly zero.
    """
    if not isinstance(grads, Tensor) or grads.dim() < 1 or grads.shape[0] == 0:
        raise ValueError(f"grads must be a tensor (K, ...) with K >= 1, got {getattr(grads, 'shape', type(grads).__name__)}")
    g = grads.reshape(grads.shape[0], -1).double()
    if not bool(torch.isfinite(g).all()):
        raise ValueError("grads contains inf or nan")
    K = g.shape[0]
    if weights is None:
        q = torch.full((K,), 1.0 / K, dtype=torch.float64, device=g.device)
    else:
        q = torch.as_tensor(weights, dtype=torch.float64, device=g.device).flatten()
        if q.numel() != K or bool((q < 0).any()) or abs(q.sum().item() - 1) > 1e-6:
            raise ValueError(f"weights must be {K} non-negative numbers summing to 1, got {q.tolist()}")
    yin: DiversityResult = diversity_from_grads(g)
    sq = g.square().sum(1)
    num, den = float((q * sq).sum()), float((q[:, None] * g).sum(0).square().sum())
    weighted = num / den if den > 0 else (math.inf if num > 0 else math.nan)
    uniform = yin.batch_size_bound
    return {"yin": yin.diversity, "weighted": weighted, "rms_ratio": math.sqrt(uniform) if uniform == uniform else uniform}


class _StackedComm:
    """Collectives of the simulator: tensor operations over the ``K`` stacked rows."""

    def __init__(self, mixing: str) -> None:
        self.mixing = mixing
        self._cache: dict[tuple[int, int], tuple[str, Tensor, Tensor | None]] = {}

    def mean(self, x: Tensor) -> Tensor:
        return x.mean(0, keepdim=True).expand_as(x)

    def weighted_mean(self, x: Tensor, q: Tensor) -> Tensor:
        return (q.to(x) @ x).unsqueeze(0).expand_as(x)

    def _plan(self, topology: Topology, step: int, like: Tensor) -> tuple[str, Tensor, Tensor | None]:
        key = (id(topology), step % topology.period)
        if topology.permute_seed is None and key in self._cache:
            return self._cache[key]
        W = topology.matrix(step)
        K = W.shape[0]
        nnz = int((W > 0).sum(1).max())
        sparse = self.mixing == "sparse" or (self.mixing == "auto" and K >= 32 and nnz * 8 <= K)
        if sparse:
            idx = torch.argsort((W > 0).to(torch.int8), dim=1, descending=True, stable=True)[:, :nnz]
            plan = ("sparse", idx.to(like.device), torch.gather(W, 1, idx).to(like))
        else:
            plan = ("dense", W.to(like), None)
        if topology.permute_seed is None:
            self._cache[key] = plan
        return plan

    def mix(self, x: Tensor, step: int, topology: Topology) -> Tensor:
        kind, a, b = self._plan(topology, step, x)
        if kind == "dense":
            return a @ x
        out = b[:, :1] * x[a[:, 0]]
        for s in range(1, a.shape[1]):
            out.addcmul_(b[:, s:s + 1], x[a[:, s]])
        return out


def _check_run_arguments(steps: object, record_every: object) -> None:
    """Validate ``steps`` and ``record_every`` of a run (simulated here, or real in ``distributed``)."""
    for name, value in (("steps", steps), ("record_every", record_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


class Simulator:
    r"""``K`` workers of ``model`` trained by ``algorithm`` on shards of ``data``, all in stacked tensors.

    Parameters
    ----------
    model : nn.Module or sequence of nn.Module
        The network; every worker starts from its parameters (the simulator keeps its own copy). Any module
        whose forward does not mix samples through state works (see the module docstring). A sequence of ``K``
        modules of one architecture gives every worker its own starting point (stacked with
        ``torch.func.stack_module_state``); ``n_workers`` then defaults to its length.
    data : InMemoryData or (x, y)
        The training set; it is moved to ``device`` once.
    algorithm : MinibatchSGD, LocalSGD or DSGD
        What the workers do (:mod:`gradiv_lib.workers.algorithms`).
    optimizer : SGD or float
        Every worker's SGD hyper-parameters (a float is the learning rate, no momentum).
    n_workers : int, optional
        :math:`K`; inferred from ``partition`` or from the algorithm's topology when omitted.
    partition : list of LongTensor, optional
        Sample indices of each worker's shard (:func:`gradiv_lib.data.partition_iid`, ``partition_dirichlet``,
        ``partition_shards``); default an IID split with ``seed``.
    batch_size : int
        Samples per worker per step (at most the smallest shard).
    loss_fn : callable
        ``loss_fn(outputs, targets)``, averaged over the batch (default ``F.cross_entropy``).
    sampling : ``"epoch"`` or ``"replacement"``
        How a worker draws its batches (:data:`gradiv_lib.workers.algorithms.SAMPLING`).
    seed : int
        Seed of the default partition and of every worker's batch order.
    device : str or torch.device, optional
        Where the stacked tensors live (default: the model's device).
    backend : str
        Gradient engine, one of :data:`BACKENDS`; ``"auto"`` times the eligible ones (each on all workers at once
        and on chunks of 16, 8 and 4 workers) on the first batch and keeps the fastest.
    worker_chunk : int, optional
        With an explicit ``backend``: run it on this many workers per call (default: all at once).
    mixing : str
        Gossip implementation, one of :data:`MIXING`.

    Examples
    --------
    >>> train, test = gl.data.load_digits()
    >>> sim = Simulator(gl.models.mlp(64, 64, 2, 10, seed=0), train, DSGD(ring(16)), SGD(lr=0.5), batch_size=16)
    >>> history = sim.run(500, record_every=50)
    >>> sim.consensus_distance(), sim.evaluate(test)["accuracy"]
    """

    def __init__(
        self,
        model: nn.Module,
        data: InMemoryData | tuple[Tensor, Tensor],
        algorithm: MinibatchSGD | LocalSGD | DSGD,
        optimizer: SGD | float,
        *,
        n_workers: int | None = None,
        partition: Sequence[Tensor] | None = None,
        batch_size: int = 32,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        sampling: str = "epoch",
        seed: int = 0,
        device: str | torch.device | None = None,
        backend: str = "auto",
        mixing: str = "auto",
        worker_chunk: int | None = None,
    ) -> None:
        replicas = None
        if isinstance(model, (list, tuple)):
            replicas = list(model)
            if not replicas:
                raise ValueError("model is an empty sequence; give one nn.Module or one per worker")
            for i, m in enumerate(replicas):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"model[{i}] must be a torch.nn.Module, got {type(m).__name__}")
                _check_model(m)
            shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in replicas]
            if any(s != shapes[0] for s in shapes):
                bad = next(i for i, s in enumerate(shapes) if s != shapes[0])
                raise ValueError(f"model[{bad}] does not have the architecture of model[0] (parameter names or shapes differ)")
            if n_workers is not None and n_workers != len(replicas):
                raise ValueError(f"model holds {len(replicas)} modules but n_workers = {n_workers}")
            n_workers = len(replicas)
            model = replicas[0]
        _check_model(model)
        self.algorithm = check_algorithm(algorithm)
        self.optimizer = _as_optimizer(optimizer)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
        data = _as_data(data)
        if len(data) == 0:
            raise ValueError("data is empty: the workers need at least one sample each")
        if device is None:
            device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
        self.device = torch.device(device)
        self.module = copy.deepcopy(model).to(self.device)
        self.spec = FlatSpec(self.module)
        self.loss_fn = loss_fn
        self.x = data.x.to(self.device, dtype=self.spec.dtype) if data.x.dtype.is_floating_point else data.x.to(self.device)
        self.y = data.y.to(self.device, dtype=self.spec.dtype) if data.y.dtype.is_floating_point else data.y.to(self.device)
        check_loss_shapes_on(loss_fn, self.module, self.x[:2], self.y[:2])  # (B, 1) outputs against (B,) targets

        topo = getattr(self.algorithm, "topology", None)
        if n_workers is None:
            n_workers = len(partition) if partition is not None else (topo.n_workers if topo is not None else None)
            if n_workers is None:
                raise ValueError("give n_workers (or a partition, or a topology) to say how many workers there are")
        if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
            raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        if partition is None:
            partition = partition_iid(len(data), int(n_workers), seed=seed)
        elif len(partition) != n_workers:
            raise ValueError(f"partition has {len(partition)} shards but n_workers = {n_workers}")
        for j, part in enumerate(partition):
            part = torch.as_tensor(part)
            if part.numel() and (int(part.min()) < 0 or int(part.max()) >= len(data)):
                raise ValueError(f"partition[{j}] holds indices outside [0, {len(data) - 1}] (the data has {len(data)} samples)")
        self.sampler = ShardSampler(list(partition), batch_size, seed=seed, sampling=sampling)
        self.n_workers = self.sampler.n_workers
        self.algorithm.check(self.n_workers, self.sampler.shard_sizes)

        if replicas is None:
            flat = self.spec.flatten(self.module).to(self.device)
            self.params: Tensor = flat.unsqueeze(0).repeat(self.n_workers, 1).contiguous()
        else:
            stacked, _ = stack_module_state(replicas)
            self.params = torch.cat([stacked[n].detach().reshape(self.n_workers, -1) for n in self.spec.names],
                                    dim=1).to(self.device, self.spec.dtype).contiguous()
        if not bool(torch.isfinite(self.params).all()):
            raise ValueError("model parameters contain inf or nan")
        self.momentum: Tensor | None = torch.zeros_like(self.params) if self.optimizer.momentum > 0 else None
        self.step_count = 0
        if worker_chunk is not None and (isinstance(worker_chunk, bool) or not isinstance(worker_chunk, int) or worker_chunk < 1):
            raise ValueError(f"worker_chunk must be an integer >= 1 or None, got {worker_chunk!r}")
        if worker_chunk is not None and backend == "auto":
            raise ValueError("worker_chunk applies to an explicit backend; backend='auto' chooses the chunk itself")
        self.backend = backend
        self.worker_chunk = worker_chunk
        self.engine_timings: dict[str, float] = {}
        self._engine: Engine | None = None if backend == "auto" else self._make_engine(backend, worker_chunk)
        # an explicit batched backend is checked on its first step ('auto' tries its candidates, 'loop' is plain autograd)
        self._engine_ran = backend in ("auto", "loop")
        self._comm = _StackedComm(mixing)
        self._workers = torch.arange(self.n_workers)
        self._chunk_start, self._chunk = -1, None
        self.chunk_steps = 256
        self.last_losses: Tensor | None = None
        self.last_grads: Tensor | None = None

    # ---------------------------------------------------------------- set-up helpers

    def _make_engine(self, name: str, chunk: int | None = None) -> Engine:
        if name not in eligible_engines(self.module):
            raise ValueError(f"backend {name!r} cannot run {type(self.module).__name__}; eligible: {eligible_engines(self.module)}")
        return make_engine(self.module, self.loss_fn, self.spec, name, chunk)

    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self._chunk is None or not self._chunk_start <= step < self._chunk_start + self._chunk.shape[0]:
            self._chunk_start = step
            self._chunk = self.sampler.indices(step, step + self.chunk_steps).to(self.device)
        idx = self._chunk[step - self._chunk_start]
        return self.x[idx], self.y[idx]

    @property
    def shard_sizes(self) -> list[int]:
        """Samples in each worker's shard."""
        return self.sampler.shard_sizes

    @property
    def batch_size(self) -> int:
        """Samples per worker per step."""
        return self.sampler.batch_size

    # ---------------------------------------------------------------- training

    def step(self) -> Tensor:
        """One step of every worker; returns the workers' batch losses ``(K,)`` (before the update)."""
        x, y = self._batch(self.step_count)
        if self._engine is None:
            self._engine, self.engine_timings = pick_engine(self.module, self.loss_fn, self.spec, self.params, x, y,
                                                            eligible_engines(self.module))
            self.backend = self._engine.name
            self.worker_chunk = self._engine.chunk if isinstance(self._engine, ChunkedEngine) else None
        if self._engine_ran:
            grads, losses = self._engine(self.params, x, y)
        else:
            try:
                grads, losses = self._engine(self.params, x, y)
            except Exception as error:  # an explicit backend that cannot batch this model: name the way out
                others = [name for name in eligible_engines(self.module) if name != self.backend]
                raise ValueError(
                    f"backend {self.backend!r} failed on {type(self.module).__name__} at its first step: "
                    f"{type(error).__name__}: {error}. Choose another backend ({others}), or backend='auto', which "
                    "times the eligible ones and skips those that cannot run the model"
                ) from error
            self._engine_ran = True
        if not bool(torch.isfinite(losses).all()):
            bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
            raise FloatingPointError(f"non-finite loss at step {self.step_count} on workers {bad[:8]}: lower the learning "
                                     f"rate (lr = {self.optimizer.lr})")
        sgd_update(self.algorithm, self.optimizer, self.params, grads, self.momentum, self.step_count, self._workers,
                   self.shard_sizes, self._comm)
        self.last_grads, self.last_losses = grads, losses
        self.step_count += 1
        return losses

    def run(self, steps: int, *, record_every: int = 1,
            callback: Callable[[Simulator], dict[str, float]] | None = None) -> dict[str, np.ndarray]:
        """Run ``steps`` steps; every ``record_every`` steps record the step, the mean batch loss of the workers,
        the consensus distance and whatever ``callback(sim)`` returns (a dict of floats).

        Returns a dict of NumPy arrays keyed ``"step"``, ``"loss"``, ``"consensus"`` and the callback's keys
        (``record_every=0`` records nothing).
        """
        _check_run_arguments(steps, record_every)
        history: dict[str, list[float]] = {"step": [], "loss": [], "consensus": []}
        for _ in range(int(steps)):
            losses = self.step()
            if record_every and self.step_count % record_every == 0:
                history["step"].append(self.step_count)
                history["loss"].append(losses.mean().item())
                history["consensus"].append(self.consensus_distance())
                if callback is not None:
                    extra = callback(self)
                    if not isinstance(extra, dict):
                        raise TypeError(f"callback must return a dict of floats, got {type(extra).__name__}")
                    for key, value in extra.items():
                        history.setdefault(key, []).append(float(value))
        return {k: np.asarray(v) for k, v in history.items()}

    # ---------------------------------------------------------------- diagnostics

    def average_params(self, weights: Tensor | Sequence[float] | None = None) -> Tensor:
        """:math:`\\bar w = \\sum_j q_j w_j` ``(P,)``, uniform ``q`` by default."""
        if weights is None:
            return self.params.mean(0)
        q = torch.as_tensor(weights, dtype=self.params.dtype, device=self.device).flatten()
        if q.numel() != self.n_workers or bool((q < 0).any()) or abs(q.sum().item() - 1) > 1e-6:
            raise ValueError(f"weights must be {self.n_workers} non-negative numbers summing to 1")
        return q @ self.params

    def deviations(self) -> Tensor:
        """:math:`w_j - \\bar w` ``(K, P)``; :math:`\\Xi = \\frac1K D^\\top D`."""
        return self.params - self.params.mean(0, keepdim=True)

    def consensus_distance(self) -> float:
        """:math:`\\operatorname{tr}\\Xi = \\frac1K\\sum_j\\lVert w_j - \\bar w\\rVert^2` (0 for C-SGD)."""
        params = self.params.double()
        return float((params - params.mean(0, keepdim=True)).square().sum(1).mean())

    def _flat_params(self, worker: int | None) -> Tensor:
        """The average flat parameters (``worker=None``) or worker ``worker``'s."""
        if worker is None:
            return self.average_params()
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) or not 0 <= worker < self.n_workers:
            raise ValueError(f"worker must be an integer in [0, {self.n_workers - 1}] or None, got {worker!r}")
        return self.params[int(worker)]

    def model(self, worker: int | None = None) -> nn.Module:
        """A copy of the model holding the average parameters (``worker=None``) or worker ``worker``'s."""
        return self.spec.load_into(copy.deepcopy(self.module), self._flat_params(worker))

    @torch.no_grad()
    def evaluate(self, data: InMemoryData | tuple[Tensor, Tensor] | None = None, worker: int | None = None,
                 batch_size: int = 4096) -> dict[str, float]:
        """Loss (``loss_fn``, averaged over ``data``) and, for class labels, accuracy of the average model
        (or of ``worker``) on ``data`` (default: the training set)."""
        params = self.spec.as_dict(self._flat_params(worker))
        x, y = (self.x, self.y) if data is None else self._to_device(_as_data(data))
        if len(x) == 0:
            raise ValueError("data is empty")
        total, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            out = functional_call(self.module, params, (x[start:start + batch_size],))
            yb = y[start:start + batch_size]
            total += float(self.loss_fn(out, yb)) * len(yb)
            if not yb.dtype.is_floating_point and out.dim() == 2:
                correct += int((out.argmax(1) == yb).sum())
        result = {"loss": total / len(x)}
        if not y.dtype.is_floating_point:
            result["accuracy"] = correct / len(x)
        return result

    def _to_device(self, data: InMemoryData) -> tuple[Tensor, Tensor]:
        x = data.x.to(self.device, dtype=self.spec.dtype) if data.x.dtype.is_floating_point else data.x.to(self.device)
        y = data.y.to(self.device, dtype=self.spec.dtype) if data.y.dtype.is_floating_point else data.y.to(self.device)
        return x, y

    def full_gradients(self, at: str | Tensor = "workers") -> Tensor:
        """Gradients ``(K, P)`` of every worker's whole-shard loss :math:`f_j`, at each worker's own parameters
        (``at="workers"``), at the average (``"average"``) or at a given vector ``(P,)``."""
        if isinstance(at, str):
            if at not in ("workers", "average"):
                raise ValueError(f"at must be 'workers', 'average' or a parameter vector, got {at!r}")
            points = self.params if at == "workers" else self.average_params().expand_as(self.params)
        else:
            point = torch.as_tensor(at, dtype=self.params.dtype, device=self.device)
            if point.shape != (self.spec.size,):
                raise ValueError(f"at must be a vector of the {self.spec.size} parameters, got shape {tuple(point.shape)}")
            points = point.expand_as(self.params)
        engine = self._engine or ENGINES["vmap" if "vmap" in eligible_engines(self.module) else "loop"](self.module, self.loss_fn, self.spec)
        grads = torch.empty_like(self.params)
        shards = self.sampler.shards
        for size in sorted({len(s) for s in shards}):
            members = [j for j, s in enumerate(shards) if len(s) == size]
            idx = torch.stack([shards[j] for j in members]).to(self.device)
            g, _ = engine(points[members].contiguous(), self.x[idx], self.y[idx])
            grads[members] = g
        return grads

    def worker_diversity(self, at: str | Tensor = "average", weights: str = "size") -> dict[str, float]:
        """:func:`diversity_variants` of the workers' full-shard gradients :meth:`full_gradients` (``at``), with
        :math:`q_j = n_j/n` (``weights="size"``) or uniform (``"uniform"``) for the weighted variant."""
        if weights not in ("size", "uniform"):
            raise ValueError(f"weights must be 'size' or 'uniform', got {weights!r}")
        sizes = torch.tensor(self.shard_sizes, dtype=torch.float64)
        q = sizes / sizes.sum() if weights == "size" else None
        return diversity_variants(self.full_gradients(at), q)

    def per_sample_diversity(self) -> list[DiversityResult]:
        """Yin's :math:`\\Delta` of each worker's next mini-batch at its current parameters (no state changes),
        from materialised per-sample gradients (memory :math:`K\\cdot B\\cdot P`)."""
        x, y = self._batch(self.step_count)
        if forward_mixes_samples(self.module, self.spec.as_dict(self.params[0].detach()), x[0]):
            raise ValueError(
                f"{type(self.module).__name__}'s output for a sample depends on the other samples of its batch "
                "(BatchNorm without running statistics, or an operation across the batch), so per-sample gradients "
                "are undefined; worker_diversity() compares whole-batch gradients and needs no per-sample ones"
            )
        grads = per_sample_grads(self.module, self.loss_fn, self.spec, self.params, x, y)
        return [diversity_from_grads(g) for g in grads]

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the step count, the stacked parameters and momentum buffers (batch orders
        and topologies are functions of the step). Save with ``torch.save``; load with ``weights_only=True``."""
        return {"step": self.step_count, "params": self.params.detach().cpu().clone(),
                "momentum": None if self.momentum is None else self.momentum.detach().cpu().clone(),
                "n_workers": self.n_workers, "param_size": self.spec.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` of a simulator built with the same arguments."""
        for key in ("step", "params", "momentum", "n_workers", "param_size"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}; it must come from Simulator.state_dict()")
        if state["n_workers"] != self.n_workers or state["param_size"] != self.spec.size:
            raise ValueError(f"state holds {state['n_workers']} workers x {state['param_size']} parameters, this simulator "
                             f"{self.n_workers} x {self.spec.size}")
        if (state["momentum"] is None) != (self.momentum is None):
            raise ValueError("state and simulator disagree on momentum (one has a momentum buffer, the other not)")
        self.params.copy_(state["params"])
        if self.momentum is not None:
            self.momentum.copy_(state["momentum"])
        self.step_count = int(state["step"])

    def __repr__(self) -> str:
        return (f"Simulator({self.algorithm!r}, K={self.n_workers}, P={self.spec.size}, batch {self.batch_size}/worker, "
                f"lr={self.optimizer.lr}, backend={self.backend!r}"
                + (f" on {self.worker_chunk} workers per call" if self.worker_chunk else "") + f", step {self.step_count})")
