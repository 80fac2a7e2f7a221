r"""The same algorithms on ``torch.distributed``: one process per worker (chapter 6, "simulated and real").

:class:`DistributedWorker` is the one-row counterpart of :class:`~gradiv_lib.workers.Simulator`: the process of rank
:math:`j` holds worker :math:`j`'s flat parameters, draws worker :math:`j`'s batches (the same
:class:`~gradiv_lib.workers.ShardSampler`, a function of ``(seed, j, step)``), and runs the same update
(:func:`~gradiv_lib.workers.algorithms.sgd_update`) with collectives in place of tensor operations over rows:

* gradient averaging (C-SGD) and parameter averaging (local SGD): ``all_reduce``;
* gossip (D-SGD, networked local SGD): point-to-point ``batch_isend_irecv`` with the in- and out-neighbours of
  :math:`W_t` only, then :math:`w_j \leftarrow W_{jj}w_j + \sum_{k\ne j}W_{jk}w_k`.

Backends: ``gloo`` on CPU, ``nccl`` on GPU (device ``cuda:LOCAL_RANK``). Launch::

    torchrun --standalone --nproc-per-node 4 -m gradiv_lib.workers --algorithm dsgd --topology ring --steps 200

(``python -m gradiv_lib.workers --help`` lists the options), or from Python with :func:`spawn`, which starts the
processes on 127.0.0.1 with a free port and a time limit. For the same seed, split and float64 arithmetic the
processes reach the simulator's parameters to rounding error; ``--compare`` checks it at the end of a run.

On a 2-core machine this is a check of semantics, not a speed-up: give each process one thread (the default).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import InMemoryData, partition_iid
from ..norms.loss_scale import check_loss_shapes_on
from ._engines import FlatSpec, LoopEngine
from .algorithms import DSGD, SGD, LocalSGD, MinibatchSGD, ShardSampler, check_algorithm, sgd_update
from .simulator import _as_data, _as_optimizer, _check_model, _check_run_arguments
from .topology import TOPOLOGIES, Topology, make_topology

__all__ = ["DistributedWorker", "spawn", "spawn_cli", "free_port", "main", "run_cli", "build_parser", "build_run"]


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group(...) first, "
                           "launch with `torchrun --nproc-per-node K -m gradiv_lib.workers ...`, or use "
                           "gradiv_lib.workers.spawn(fn, K)")


class _DistComm:
    """Collectives of one process (one row)."""

    def __init__(self, rank: int, world: int, group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group

    def mean(self, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y.div_(self.world)

    def weighted_mean(self, x: Tensor, q: Tensor) -> Tensor:
        y = x * float(q[self.rank])
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y

    def mix(self, x: Tensor, step: int, topology: Topology) -> Tensor:
        W = topology.matrix(step)
        j = self.rank
        ins = [k for k in torch.nonzero(W[j] > 0).flatten().tolist() if k != j]
        outs = [i for i in torch.nonzero(W[:, j] > 0).flatten().tolist() if i != j]
        send = x[0].contiguous()
        bufs = {k: torch.empty_like(send) for k in ins}
        ops = [dist.P2POp(dist.isend, send, self._global(i), group=self.group) for i in outs]
        ops += [dist.P2POp(dist.irecv, bufs[k], self._global(k), group=self.group) for k in ins]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        out = send * float(W[j, j])
        for k in ins:
            out.add_(bufs[k], alpha=float(W[j, k]))
        return out.unsqueeze(0)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


class DistributedWorker:
    """Worker ``rank`` of a ``torch.distributed`` run of ``algorithm`` (one process per worker).

    Same arguments as :class:`~gradiv_lib.workers.Simulator` (every process gets the whole ``data`` and the same
    ``partition``), plus the process ``group`` (default: the world). The number of workers is the group's size.
    Every process must make the same calls in the same order (they are collective).
    """

    def __init__(
        self,
        model: nn.Module,
        data: InMemoryData | tuple[Tensor, Tensor],
        algorithm: MinibatchSGD | LocalSGD | DSGD,
        optimizer: SGD | float,
        *,
        partition: Sequence[Tensor] | None = None,
        batch_size: int = 32,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        sampling: str = "epoch",
        seed: int = 0,
        device: str | torch.device | None = None,
        group: Any = None,
    ) -> None:
        _require_initialized()
        _check_model(model)
        self.algorithm = check_algorithm(algorithm)
        self.optimizer = _as_optimizer(optimizer)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        data = _as_data(data)
        self.group = group
        self.rank = dist.get_rank(group)
        self.n_workers = dist.get_world_size(group)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                      else next(model.parameters()).device)
        self.device = torch.device(device)
        if partition is None:
            partition = partition_iid(len(data), self.n_workers, seed=seed)
        if len(partition) != self.n_workers:
            raise ValueError(f"partition has {len(partition)} shards but the process group has {self.n_workers} processes; "
                             f"launch one process per worker (torchrun --nproc-per-node {len(partition)})")
        self.sampler = ShardSampler(list(partition), batch_size, seed=seed, sampling=sampling)
        self.algorithm.check(self.n_workers, self.sampler.shard_sizes)
        self.module = copy.deepcopy(model).to(self.device)
        self.spec = FlatSpec(self.module)
        self.loss_fn = loss_fn
        self.x = data.x.to(self.device, dtype=self.spec.dtype) if data.x.dtype.is_floating_point else data.x.to(self.device)
        self.y = data.y.to(self.device, dtype=self.spec.dtype) if data.y.dtype.is_floating_point else data.y.to(self.device)
        check_loss_shapes_on(loss_fn, self.module, self.x[:2], self.y[:2])  # (B, 1) outputs against (B,) targets
        flat = self.spec.flatten(self.module).to(self.device)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("model parameters contain inf or nan")
        self.params = flat.unsqueeze(0).clone()
        self.momentum = torch.zeros_like(self.params) if self.optimizer.momentum > 0 else None
        self.step_count = 0
        self._engine = LoopEngine(self.module, loss_fn, self.spec)
        self._comm = _DistComm(self.rank, self.n_workers, group)
        self._workers = torch.tensor([self.rank])
        self._chunk_start, self._chunk = -1, None
        self.chunk_steps = 256

    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self._chunk is None or not self._chunk_start <= step < self._chunk_start + self._chunk.shape[0]:
            self._chunk_start = step
            self._chunk = self.sampler.worker_indices(self.rank, step, step + self.chunk_steps).to(self.device)
        idx = self._chunk[step - self._chunk_start]
        return self.x[idx].unsqueeze(0), self.y[idx].unsqueeze(0)

    def step(self) -> Tensor:
        """One step of this worker (collective); returns its batch loss (a 0-d tensor, before the update)."""
        x, y = self._batch(self.step_count)
        grads, losses = self._engine(self.params, x, y)
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(f"non-finite loss at step {self.step_count} on worker {self.rank}: lower the "
                                     f"learning rate (lr = {self.optimizer.lr})")
        sgd_update(self.algorithm, self.optimizer, self.params, grads, self.momentum, self.step_count, self._workers,
                   self.sampler.shard_sizes, self._comm)
        self.step_count += 1
        return losses[0]

    def run(self, steps: int, *, record_every: int = 1) -> dict[str, np.ndarray]:
        """``steps`` steps (collective); records the workers' mean batch loss and the consensus distance every
        ``record_every`` steps, like :meth:`Simulator.run`."""
        _check_run_arguments(steps, record_every)
        history: dict[str, list[float]] = {"step": [], "loss": [], "consensus": []}
        for _ in range(int(steps)):
            loss = self.step()
            if record_every and self.step_count % record_every == 0:
                history["step"].append(self.step_count)
                history["loss"].append(float(self._comm.mean(loss.reshape(1, 1))))
                history["consensus"].append(self.consensus_distance())
        return {k: np.asarray(v) for k, v in history.items()}

    def average_params(self) -> Tensor:
        """:math:`\\bar w` ``(P,)`` on every process (collective)."""
        return self._comm.mean(self.params)[0]

    def consensus_distance(self) -> float:
        """:math:`\\frac1K\\sum_j\\lVert w_j-\\bar w\\rVert^2` (collective)."""
        dev = (self.params - self.average_params()).double().square().sum().reshape(1, 1)
        return float(self._comm.mean(dev))

    def gather_params(self) -> Tensor:
        """All workers' parameters ``(K, P)`` on every process (collective ``all_gather``)."""
        rows = [torch.empty_like(self.params[0]) for _ in range(self.n_workers)]
        dist.all_gather(rows, self.params[0].contiguous(), group=self.group)
        return torch.stack(rows)

    def model(self, average: bool = True) -> nn.Module:
        """A copy of the model with the average parameters (collective) or this worker's own."""
        flat = self.average_params() if average else self.params[0]
        return self.spec.load_into(copy.deepcopy(self.module), flat)


# --------------------------------------------------------------------------------------------
# Launching from Python
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, threads: int,
                 timeout: float, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=_dt.timedelta(seconds=timeout))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), *, backend: str = "gloo", timeout: float = 120.0,
          threads: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by ``torch.distributed`` on
    127.0.0.1 (a free port), each with ``threads`` torch threads; wait at most ``timeout`` seconds.

    ``fn`` must be importable (a module-level function): the processes are started with the ``spawn`` method.
    Raises ``TimeoutError`` (after terminating the processes) when they do not finish in time, and the worker's
    exception when one fails.
    """
    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    context = mp.start_processes(_spawn_entry, args=(fn, world_size, free_port(), backend, threads, timeout, tuple(args)),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} processes did not finish within {timeout:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


# --------------------------------------------------------------------------------------------
# Command line (torchrun entry point)
# --------------------------------------------------------------------------------------------

_ALGORITHMS = {"minibatch_sgd": "minibatch_sgd", "csgd": "minibatch_sgd", "local_sgd": "local_sgd", "local": "local_sgd",
               "dsgd": "dsgd"}


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m gradiv_lib.workers``."""
    p = argparse.ArgumentParser(
        prog="python -m gradiv_lib.workers",
        description="Train K workers with local SGD, D-SGD or mini-batch SGD on torch.distributed, one process per "
                    "worker. Launch with: torchrun --standalone --nproc-per-node K -m gradiv_lib.workers [options]")
    p.add_argument("--algorithm", default="dsgd", choices=sorted(_ALGORITHMS), help="what the workers do (default dsgd)")
    p.add_argument("--topology", default="ring", choices=sorted(TOPOLOGIES), help="gossip graph for dsgd (and local_sgd with --gossip)")
    p.add_argument("--gossip", action="store_true", help="local_sgd: one gossip step instead of exact averaging")
    p.add_argument("--local-steps", type=int, default=4, help="local_sgd: local steps per round H")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--batch-size", type=int, default=16, help="samples per worker per step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="model init, data split and batch order")
    p.add_argument("--dataset", default="digits", choices=["digits", "synthetic"])
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards"])
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")
    p.add_argument("--shards-per-client", type=int, default=2)
    p.add_argument("--sampling", default="epoch", choices=["epoch", "replacement"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"], help="auto: nccl if CUDA is available, else gloo")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--record-every", type=int, default=50)
    p.add_argument("--compare", action="store_true", help="rank 0 also runs the simulator and reports the largest difference")
    p.add_argument("--out", type=Path, help="rank 0 writes a JSON summary here")
    p.add_argument("--save-params", type=Path, help="rank 0 saves all workers' final parameters (K, P) here (torch.save)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait")
    return p


def build_run(args: argparse.Namespace, n_workers: int) -> dict[str, Any]:
    """Model, data, partition, algorithm and optimizer described by the command-line ``args`` (the same on every
    process and in the simulator)."""
    from .. import data as gdata
    from .. import models

    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    if args.dataset == "digits":
        train, test = gdata.load_digits(seed=0, flat=args.model == "mlp")
    else:
        if args.model == "cnn":
            raise ValueError("--dataset synthetic has vector inputs; use --model mlp")
        train, test = gdata.synthetic_classification(1200, 32, 10, seed=0).split(0.2, seed=0)
    in_features = train.x[0].numel()
    classes = int(train.y.max()) + 1
    if args.model == "mlp":
        model = models.mlp(in_features, args.width, args.depth, classes, seed=args.seed)
    else:
        model = models.cnn(1, args.width, args.depth, classes, image_size=8, seed=args.seed)
    model = model.to(dtype)
    if args.partition == "iid":
        partition = gdata.partition_iid(len(train), n_workers, seed=args.seed)
    elif args.partition == "dirichlet":
        partition = gdata.partition_dirichlet(train.y, n_workers, args.alpha, seed=args.seed, min_size=args.batch_size)
    else:
        partition = gdata.partition_shards(train.y, n_workers, args.shards_per_client, seed=args.seed)
    algorithm_name = _ALGORITHMS[args.algorithm]
    if algorithm_name == "dsgd":
        algorithm = DSGD(make_topology(args.topology, n_workers))
    elif algorithm_name == "local_sgd":
        algorithm = LocalSGD(args.local_steps, topology=make_topology(args.topology, n_workers) if args.gossip else None)
    else:
        algorithm = MinibatchSGD()
    optimizer = SGD(args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov)
    return {"model": model, "train": train.to(dtype=dtype), "test": test.to(dtype=dtype), "partition": partition,
            "algorithm": algorithm, "optimizer": optimizer, "batch_size": args.batch_size, "sampling": args.sampling,
            "seed": args.seed}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_cli(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the configuration ``args`` (from :func:`build_parser`) in an initialized process group; rank 0 prints a
    summary, writes ``--out``/``--save-params`` and returns the summary (other ranks return ``None``)."""
    _require_initialized()
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    run = build_run(args, world)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    worker = DistributedWorker(run["model"], run["train"], run["algorithm"], run["optimizer"], partition=run["partition"],
                               batch_size=run["batch_size"], sampling=run["sampling"], seed=run["seed"], device=device)
    start = time.perf_counter()
    history = worker.run(args.steps, record_every=args.record_every)
    seconds = time.perf_counter() - start
    params = worker.gather_params().cpu()
    model = worker.model(average=True)
    summary: dict[str, Any] | None = None
    if rank == 0:
        from ..results import machine_info
        from .simulator import Simulator

        test = run["test"].to(device)
        with torch.no_grad():
            out = model(test.x)
            test_loss = float(F.cross_entropy(out, test.y))
            test_acc = float((out.argmax(1) == test.y).float().mean())
        summary = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "n_workers": world, "backend": backend, "seconds": round(seconds, 3),
            "history": {k: v.tolist() for k, v in history.items()},
            "test_loss": test_loss, "test_accuracy": test_acc,
            "consensus_distance": float(((params.double() - params.double().mean(0)) ** 2).sum(1).mean()),
            "machine": machine_info(device),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if args.compare:
            sim = Simulator(run["model"], run["train"], run["algorithm"], run["optimizer"], partition=run["partition"],
                            batch_size=run["batch_size"], sampling=run["sampling"], seed=run["seed"], device=device,
                            backend="loop")
            sim.run(args.steps, record_every=0)
            summary["max_abs_diff_vs_simulator"] = (sim.params.cpu() - params).abs().max().item()
            summary["max_abs_param"] = params.abs().max().item()
        what = args.algorithm + (f" on a {args.topology}" if _ALGORITHMS[args.algorithm] == "dsgd" or args.gossip else "")
        print(f"gradiv_lib.workers: {world} workers ({backend}), {what}, {args.steps} steps in {seconds:.2f} s; "
              f"test accuracy {test_acc:.4f}"
              + (f"; max |params - simulator| = {summary['max_abs_diff_vs_simulator']:.3g}" if args.compare else ""),
              flush=True)
        if args.out:
            _write_json(args.out, summary)
        if args.save_params:
            args.save_params.parent.mkdir(parents=True, exist_ok=True)
            torch.save(params, args.save_params)
    dist.barrier()
    return summary


def spawn_cli(rank: int, world_size: int, argv: Sequence[str]) -> None:
    """:func:`spawn` target: ``spawn(spawn_cli, K, args=(argv,))`` runs the command line without ``torchrun``."""
    run_cli(build_parser().parse_args(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchrun ... -m gradiv_lib.workers``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("gradiv_lib.workers: RANK/WORLD_SIZE are not set. Launch one process per worker with\n"
              "  torchrun --standalone --nproc-per-node K -m gradiv_lib.workers [options]", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=_dt.timedelta(seconds=args.timeout))
    try:
        run_cli(args)
    finally:
        dist.destroy_process_group()
    return 0
