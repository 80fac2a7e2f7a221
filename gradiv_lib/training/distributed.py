r"""Data parallelism for :func:`~gradiv_lib.training.train`: one global batch split over several processes.

When ``torch.distributed`` is initialised with more than one process (``torchrun``, or
:func:`gradiv_lib.workers.spawn`), :func:`~gradiv_lib.training.train` runs the *single-process run of the same global
batches* on every process, with the work of each batch split between them:

* **batches** — every process draws the same permutation (the run's generator, seeded with ``seed``) and so the same
  global batch of :math:`B` samples; ``transform`` is applied to the global batch (the same draws as in one process);
  process :math:`r` of :math:`W` keeps the contiguous slice ``[r·b // W, (r+1)·b // W)`` of a batch of :math:`b`
  samples. Slices differ by at most one sample, so :math:`B` need not be divisible by :math:`W`; a batch smaller than
  :math:`W` (a ragged last batch) leaves some processes an empty slice, which contributes nothing.
* **gradients** — after each process's backward pass, one ``all_reduce`` sums the gradients weighted by each slice's
  share :math:`b_r/b` (mean-reduced losses; weight 1 for summed losses), so every process holds the gradient of the
  global batch's loss, exactly as one process would, and takes the same optimizer step. The same collective carries
  the loss and, in measurement epochs, each slice's :math:`\sum_i\|\nabla\ell_i\|^2`, so the diversity accumulators and
  the schedule see the *global* batch (:math:`n = b`, :math:`\sum_i\|g_i\|^2` and :math:`\sum_i g_i` over all
  processes) and every process computes the same :math:`\hat\Delta` and the same batch-size decision from identical
  numbers (checked at the end of every epoch against process 0's).
* **per-sample norms** — the :class:`~gradiv_lib.norms.DiversityMeter` hooks run during each process's own backward
  pass and see that process's per-sample gradients; nothing in the norms engine knows about the other processes.
* **state** — parameters and buffers are broadcast from process 0 at the start (the same initial model everywhere);
  buffers (BatchNorm running statistics) again after every epoch. Every process evaluates the full test set with the
  same parameters, so every process returns the same :class:`~gradiv_lib.training.History` (wall-clock seconds aside);
  only process 0 writes checkpoints (the others wait for it, and a resumed run reads that file everywhere) and shows a
  progress bar; ``on_epoch_end`` runs on every process. Before the first epoch the processes check that they were
  called with the same settings (seed, epochs, data size, schedule, ...) and raise a ``ValueError`` naming the first
  difference; that the data themselves are the same is the caller's promise.

**Why not** ``torch.nn.parallel.DistributedDataParallel``: DDP averages the processes' gradients with equal weights
(wrong when slices differ in size, and off by :math:`W` for a summed loss), wraps the model (checkpoints gain a
``module.`` prefix) and its reducer expects every forward pass to be followed by ``backward()`` through it (the
separate measurement pass of BatchNorm networks uses ``torch.autograd.grad``). The explicit ``all_reduce`` is exact for
every slice size and loss reduction and leaves the model alone; what it gives up is DDP's overlap of communication
with the backward pass (buckets reduced while later layers still differentiate), which matters for large models on
many GPUs, not for the correctness this module promises.

Randomness: dropout and other draws of the global torch RNG use a different stream on each process (seeded from
``seed`` and the rank; process 0's is the single-process one), so masks are not repeated across slices; after a resume
the other processes' streams are reseeded from (``seed``, rank, epoch), so with dropout a resumed run differs from an
uninterrupted one on those slices. BatchNorm in training mode normalises with each process's slice statistics (as
under DDP), so BatchNorm networks are not the single-process run of the global batch
(``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` shares the statistics on GPUs; not tested here).
Backends: ``gloo`` on CPU, ``nccl`` on GPU (data and model on ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DataParallel"]


class DataParallel:
    """The collectives :func:`~gradiv_lib.training.train` needs on ``world`` processes (see the module docstring).

    Built by :meth:`from_environment`; every method is collective (all processes call it in the same order).
    """

    def __init__(self, device: torch.device, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        if self.backend == "nccl" and device.type != "cuda":
            raise ValueError(
                f"train() on {self.world} processes with the nccl backend needs CUDA tensors, but device is {device}; "
                "pass device=f'cuda:{LOCAL_RANK}' (after torch.cuda.set_device(LOCAL_RANK)) or use the gloo backend on CPU"
            )
        self.device = device
        self._n_local = self._n_global = 0

    @classmethod
    def from_environment(cls, device: torch.device) -> DataParallel | None:
        """A :class:`DataParallel` when ``torch.distributed`` is initialised with more than one process, else ``None``."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return cls(device)

    # ---- start ------------------------------------------------------------------------------

    def start(self, model: nn.Module, settings: dict[str, Any], seed: int, start_epoch: int) -> None:
        """Check that every process has the same ``settings``; give all process 0's parameters and buffers; seed this
        process's stream of the global torch RNG."""
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, settings, group=self.group)
        for rank, other in enumerate(gathered):
            for key in settings:
                if other.get(key) != gathered[0].get(key):
                    raise ValueError(
                        f"train() on {self.world} processes: {key} differs between processes (process 0: "
                        f"{gathered[0].get(key)!r}, process {rank}: {other.get(key)!r}); every process must call train() "
                        "with the same arguments, data and schedule"
                    )
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=self._global(0), group=self.group)
        if self.rank:
            # a stream of its own per process (dropout masks not repeated across slices), reproducible from seed
            torch.manual_seed(hash((seed, self.rank, start_epoch)) % 2**63)

    # ---- every step -------------------------------------------------------------------------

    def local(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This process's slice of a global batch ``(x, y)`` (contiguous, sizes differ by at most one)."""
        n = len(x)
        start, stop = self.rank * n // self.world, (self.rank + 1) * n // self.world
        self._n_global, self._n_local = n, stop - start
        return x[start:stop], y[start:stop]

    def reduce_step(self, params: Sequence[nn.Parameter], loss: Tensor, n: int, sq_norms: Tensor | None,
                    grads: Sequence[Tensor | None] | None, reduction: str) -> tuple[Tensor, Tensor | None, list[Tensor] | None, int]:
        """Turn this slice's loss, ``.grad``, per-sample squared norms (and separately measured ``grads``) into the
        global batch's, on every process.

        Returns ``(loss, sq_norms, grads, n)``: the global batch's loss (its mean or sum, as ``reduction``), the sum of
        its per-sample squared norms (a 0-d float64 tensor, ``None`` when ``sq_norms`` is), the global ``grads``
        (``None`` when ``grads`` is) and the global batch size. Every ``p.grad`` is replaced by the global gradient
        (``None`` where no process had one).
        """
        if n != self._n_local:
            raise RuntimeError(f"reduce_step got a slice of {n} samples, local() gave {self._n_local}")
        total = self._n_global
        empty = n == 0
        weight = (n / total if reduction == "mean" else 1.0) if not empty else 0.0
        vectors = [p.grad for p in params] + (list(grads) if grads is not None else [])
        shapes = [p for p in params] + [p for p in params] * (grads is not None)
        dtype = params[0].dtype
        flat = torch.cat([torch.zeros(p.numel(), dtype=dtype, device=self.device) if g is None or empty
                          else g.detach().reshape(-1).to(dtype) * weight for g, p in zip(vectors, shapes)])
        # [loss, Σ‖g_i‖², then per parameter 1 if this process has a gradient for it]
        scalars = torch.ones(2 + len(params), dtype=torch.float64, device=self.device)
        scalars[:2] = 0.0
        if not empty:
            scalars[0] = loss.detach().double() * weight
            if sq_norms is not None:
                scalars[1] = sq_norms.detach().double().sum() if isinstance(sq_norms, Tensor) else float(sq_norms)
        missing = [i for i, p in enumerate(params) if p.grad is None or empty]   # an empty slice has no gradient
        for i in missing:
            scalars[2 + i] = 0.0
        work = [dist.all_reduce(flat, group=self.group, async_op=True),
                dist.all_reduce(scalars, group=self.group, async_op=True)]
        for w in work:
            w.wait()
        offset, out = 0, []
        for p in shapes:
            out.append(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        # a parameter keeps no gradient only if no process has one (read back only then: no device sync otherwise)
        anyone = scalars[2:].tolist() if missing else [1.0] * len(params)
        for p, g, has in zip(params, out, anyone):
            p.grad = g if has else None
        reduced = [g for g in out[len(params):]] if grads is not None else None
        return scalars[0], (scalars[1] if sq_norms is not None else None), reduced, total

    # ---- every epoch ------------------------------------------------------------------------

    def end_epoch(self, model: nn.Module, correct: Tensor) -> Tensor:
        """The global count of correct training predictions; process 0's buffers (BatchNorm statistics) everywhere."""
        correct = correct.clone()
        dist.all_reduce(correct, group=self.group)
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=self._global(0), group=self.group)
        return correct

    def agree(self, schedule: Any, finished: bool) -> bool:
        """Check that the schedule's batch size and learning-rate multiplier are process 0's; return process 0's
        ``finished`` (a run ends on every process at the same epoch)."""
        state = torch.tensor([float(schedule.batch_size), float(schedule.lr_scale), float(finished)], dtype=torch.float64,
                             device=self.device)
        mine = state.clone()
        dist.broadcast(state, src=self._global(0), group=self.group)
        if not (state[0] == mine[0] and math.isclose(float(state[1]), float(mine[1]), rel_tol=1e-12)):
            raise RuntimeError(
                f"process {self.rank} decided batch size {int(mine[0])} with learning-rate multiplier {float(mine[1]):.6g}, "
                f"process 0 {int(state[0])} with {float(state[1]):.6g}; the schedules must see the same all-reduced numbers"
            )
        return bool(state[2])

    def barrier(self) -> None:
        """Wait for every process (process 0 has written a checkpoint the others may read)."""
        dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)
