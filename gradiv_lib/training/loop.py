"""One training loop for every chapter: adaptive batch sizes, a metrics history, targets, checkpoints.

Derived in chapter 4 of the book (``book/ch04_divebatch``), where every run goes through it.

:func:`train` runs mini-batch training on an :class:`~gradiv_lib.data.InMemoryData` (tensors on one
device, so the batch size can change between epochs at no cost) or any map-style torch ``Dataset``
(:class:`~gradiv_lib.mapstyle.MapStyleData`) with any
:class:`~gradiv_lib.batching.BatchSchedule`:

* the optimizer and the learning-rate scheduler are built once and kept across batch-size changes
  (momentum buffers survive a resize); a resize's learning-rate factor multiplies every param group's
  ``lr`` (and the scheduler's ``base_lrs``), so chainable schedules such as cosine annealing carry the
  rescale on, as in the DiveBatch code;
* per-sample gradient norms (:class:`gradiv_lib.norms.DiversityMeter`) are computed only in the epochs
  where the schedule needs them (or every epoch with ``measure_diversity=True``), during the ordinary
  backward pass, with ``exact_grad=True``: a run that measures updates the weights bit for bit as the
  same run without the measurement would;
* :class:`History` records per epoch the loss, train/test accuracy, batch size, learning rate,
  :math:`\\hat\\Delta`, cumulative optimizer steps, samples and seconds, and the steps, samples and seconds
  to a target accuracy; with ``eval_every=k`` it also records the test accuracy every ``k`` optimizer steps,
  and the target is found at that granularity;
* with ``checkpoint_path`` the full state (model, optimizer, scheduler, schedule, random-number
  generators, history) is written atomically after every epoch and a later call with the same arguments
  resumes from it; a resumed run gives the same history as an uninterrupted one (except wall-clock
  seconds).
* on several processes (``torch.distributed`` initialised, e.g. by ``torchrun``) every process takes its
  slice of each global batch and the gradients, the loss and the per-sample squared norms are all-reduced, so
  the run is the one-process run of the same global batches (:mod:`gradiv_lib.training.distributed`).

Randomness: the batch order (and ``transform``'s draws) come from a private generator seeded with
``seed``; the global torch RNG (dropout, ...) is forked and seeded with ``seed`` too, so the caller's
RNG state is left untouched. Epoch ``e`` with batch size ``B`` iterates
``data.batches(B, shuffle=True, generator=g, drop_last=drop_last)``.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..batching import BatchSchedule, FixedBatch, Resize
from ..norms.engine import planned_members
from ..norms.loss_scale import check_loss_shapes_on
from ..results import check_writable_folder
from ..results import save_checkpoint as write_checkpoint
from ..data import InMemoryData
from ..diversity import DiversityResult, EpochDiversityAccumulator
from .distributed import DataParallel
from .evaluation import _as_data, _default_loss, _head, _is_classification, evaluate
from .history import History
from .options import _apply_lr_factor, _build_lr_scheduler, _build_optimizer

__all__ = ["CHECKPOINT_FORMAT", "train"]

#: Version of the checkpoint layout written by :func:`train`.
CHECKPOINT_FORMAT = 1
_NONFINITE = ("raise", "stop")
_TARGET_ON = ("test", "train")


# --------------------------------------------------------------------------------------------
# Helpers of the loop
# --------------------------------------------------------------------------------------------


def _loss_reduction(loss_fn: Any, model: nn.Module, xb: Tensor, yb: Tensor) -> str:
    """'mean' or 'sum': how ``loss_fn`` reduces the per-sample losses.

    Read from a ``torch.nn`` loss's ``reduction``; for other callables checked numerically on a few
    samples (model in eval mode, so BatchNorm statistics and the RNG are untouched).
    """
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.modules.loss._Loss):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"loss_fn must reduce to a scalar with reduction 'mean' or 'sum', got reduction={reduction!r}")
        check_loss_shapes_on(loss_fn, model, xb, yb)  # a (B, 1) output against (B,) targets: refused before training
        return reduction
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
    if len(xb) == 1:
        return "mean"
    from ..norms import batch_loss_factor

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(xb)
            loss = loss_fn(out, yb)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor (a mean or a sum over the batch)")
            factor = batch_loss_factor(loss_fn, out, yb, loss)
    finally:
        model.train(was_training)
    return "sum" if factor == 1.0 else "mean"


def _train_batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]


def _measure_separately(model: nn.Module, loss_fn: Any, xb: Tensor, yb: Tensor, params: list[nn.Parameter],
                        reduction: str, chunk: int, batch_norms: list[nn.Module]) -> tuple[Tensor, list[Tensor]]:
    """Per-sample squared norms and the batch gradient (in the loss's own scale) from an extra pass.

    BatchNorm layers run in eval mode (running statistics: per-sample gradients are defined), and the
    batch is processed in chunks of at most ``chunk`` samples to bound memory; ``.grad`` is untouched.
    """
    from ..norms import PerSampleNormEngine

    n = len(xb)
    if n == 0:  # an empty slice of a global batch (several processes)
        return torch.zeros(0, device=xb.device), [torch.zeros_like(p) for p in params]
    for m in batch_norms:
        m.eval()
    try:
        norms, total = [], [torch.zeros_like(p) for p in params]
        for start in range(0, n, chunk):
            xc, yc = xb[start:start + chunk], yb[start:start + chunk]
            # the engine itself (gradient hooks): the gradient is taken with torch.autograd.grad, .grad untouched
            with PerSampleNormEngine(model) as engine:
                grads = torch.autograd.grad(loss_fn(model(xc), yc), params, allow_unused=True)
            norms.append(engine.sq_norms() * (len(xc) if reduction == "mean" else 1) ** 2)
            weight = len(xc) / n if reduction == "mean" else 1.0
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g, alpha=weight)
    finally:
        for m in batch_norms:
            m.train()
    return torch.cat(norms), total


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _evaluate_between_steps(model: nn.Module, test: Any, loss_fn: Any, eval_batch_size: int, history: History,
                            epoch: int, steps: int, samples: int, seconds_before: float, start: float,
                            eval_time: float, device: torch.device, target: float | None) -> float:
    """One step-granular evaluation (``train(eval_every=...)``): record it in ``history`` (and the target if this
    is the first evaluation to reach it); returns the seconds it took, which do not count as training time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    loss, accuracy = evaluate(model, test, loss_fn, eval_batch_size)
    history.eval_epoch.append(epoch)
    history.eval_steps.append(steps)
    history.eval_samples.append(samples)
    history.eval_seconds.append(seconds_before + (now - start - eval_time))
    history.eval_test_loss.append(loss)
    history.eval_test_accuracy.append(accuracy)
    if target is not None and history.epoch_to_target is None and accuracy >= target:
        history.epoch_to_target = epoch
        history.steps_to_target, history.samples_to_target = steps, samples
        history.seconds_to_target = history.eval_seconds[-1]
    return time.perf_counter() - now


def train(
    model: nn.Module,
    data: InMemoryData | tuple[Tensor, Tensor],
    *,
    schedule: BatchSchedule | int,
    epochs: int,
    lr: float | None = None,
    optimizer: str | torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_scheduler: str | Callable[[torch.optim.Optimizer], Any] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    test_data: InMemoryData | tuple[Tensor, Tensor] | None = None,
    target_accuracy: float | None = None,
    target_on: str = "test",
    stop_at_target: bool = False,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    drop_last: bool = False,
    measure_diversity: bool = False,
    measure_batch_size: int | None = None,
    eval_batch_size: int = 1024,
    eval_every: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    on_nonfinite: str = "raise",
    on_epoch_end: Callable[[int, nn.Module, History], None] | None = None,
    progress: bool = True,
) -> History:
    """Train ``model`` on ``data`` for ``epochs`` epochs with the batch sizes of ``schedule``.

    Parameters
    ----------
    model : nn.Module
        Trained in place (moved to ``device``).
    data : InMemoryData, (x, y) or a map-style torch Dataset
        Training set. Tensors are moved once to ``device`` (keep them there: GPU-resident data); a
        ``torch.utils.data.Dataset`` (items ``(x, y)``) is read batch by batch through a DataLoader
        (:class:`~gradiv_lib.mapstyle.MapStyleData`; wrap it yourself for worker processes).
    schedule : BatchSchedule or int
        A :mod:`gradiv_lib.batching` schedule, or an int for :class:`~gradiv_lib.batching.FixedBatch`.
        It is bound to ``len(data)`` (batch sizes must lie in [1, N]) and its state is checkpointed. A
        schedule carries its state (current batch size, learning-rate multiplier): pass a fresh one to
        every run that should start from the beginning.
    epochs : int
        Number of epochs (>= 1).
    lr : float
        Initial learning rate for a named ``optimizer``; the schedule's ``lr_scale`` multiplies it.
    optimizer : str, Optimizer or callable
        ``"sgd"`` (default), ``"adam"``, ``"adamw"``; or a ready ``torch.optim.Optimizer`` over the
        model's parameters; or a factory ``params -> Optimizer``. With the latter two leave ``lr``,
        ``momentum`` and ``weight_decay`` unset.
    momentum, weight_decay : float
        For a named optimizer (``momentum`` for SGD only).
    lr_scheduler : None, "constant", "cosine" or callable
        Stepped once per epoch: ``"cosine"`` is ``CosineAnnealingLR(T_max=epochs)``; a factory
        ``optimizer -> scheduler`` gives any torch scheduler (state is checkpointed).
    loss_fn : callable, optional
        ``(outputs, targets) -> scalar`` with mean or sum reduction; default cross-entropy for integer
        labels, mean squared error otherwise. A class-weighted (or ``ignore_index``) cross-entropy
        divides by :math:`\\sum_j w_{y_j}`, not the batch size: Δ then measures the terms
        :math:`B w_{y_i}\\ell_i/\\sum_j w_{y_j}` whose mean is that loss (:mod:`gradiv_lib.norms.meter`).
    test_data : InMemoryData or (x, y), optional
        Evaluated at the end of every epoch.
    target_accuracy : float, optional
        In (0, 1]; the first epoch whose ``target_on`` accuracy reaches it sets the ``*_to_target``
        fields of the history. ``target_on="train"`` uses the running training accuracy of the epoch.
    stop_at_target : bool
        End the run at the first epoch that reaches the target.
    transform : callable, optional
        ``transform(x_batch, generator) -> x_batch`` applied to every training batch, e.g.
        :func:`gradiv_lib.data.augment_batch` (the generator is the run's, so augmentation is
        reproducible and resumable).
    drop_last : bool
        Skip the last, smaller batch of every epoch.
    measure_diversity : bool
        Measure :math:`\\hat\\Delta` in every epoch (otherwise only when the schedule needs it).
    measure_batch_size : int, optional
        In measurement epochs, batches larger than this are measured in a separate pass in chunks of
        this size (bounds the memory of per-sample norms on large batches; costs one extra forward and
        backward pass per batch). BatchNorm networks in training mode are always measured in such a
        separate pass, with BatchNorm in eval mode, because batch statistics mix the samples: that pass
        measures the per-sample gradients of the eval-mode network (running statistics), a different
        function from the one the training step differentiates. (The DiveBatch authors' BackPACK pass runs
        the forward in training mode, with batch statistics, and switches BatchNorm to eval mode only
        before the backward, so its "per-sample" terms fold in the batch-statistics coupling and are not
        the gradients of per-sample losses either.)
    eval_batch_size : int
        Batch size of evaluation passes.
    eval_every : int, optional
        Also evaluate ``test_data`` after every ``eval_every``-th optimizer step (counted over the
        whole run, across epochs and batch-size changes) and record it in the history's ``eval_*``
        lists; the target is then found at this granularity (see :class:`History`). Evaluation time is
        excluded from the recorded seconds, and evaluation touches neither the weights nor any random
        number generator, so the training itself is the same as without it.
    device : str or torch.device, optional
        Default: the device of ``data``.
    seed : int
        Seed of the batch order, of ``transform`` and of the (forked) global torch RNG.
    checkpoint_path : path, optional
        Where to write the checkpoint (atomically, every ``checkpoint_every`` epochs and at the end).
        If the file exists, training resumes from it; it must come from a run with the same
        schedule, epochs, seed and data size. Loaded with ``torch.load(weights_only=True)``.
    on_nonfinite : str
        ``"raise"`` (default): a non-finite epoch loss raises ``FloatingPointError``; ``"stop"``: the
        epoch is recorded, ``history.diverged`` is set and the run ends.
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch, model, history)`` after each epoch (after the checkpoint is written).
    progress : bool
        Show a ``tqdm.auto`` progress bar over epochs.

    Returns
    -------
    History

    Examples
    --------
    >>> from gradiv_lib import batching, data, models                       # doctest: +SKIP
    >>> tr, te = data.load_digits()                                          # doctest: +SKIP
    >>> net = models.mlp(64, 64, 2, 10, seed=0)                              # doctest: +SKIP
    >>> sched = batching.DiveBatch(16, 512, delta=0.1, resize_every=4)       # doctest: +SKIP
    >>> h = train(net, tr, schedule=sched, epochs=20, lr=0.05, momentum=0.9, test_data=te)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..norms import DiversityMeter

    # ---- validation ------------------------------------------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    train_data = _as_data(data, "data")
    if len(train_data) == 0:
        raise ValueError("data is empty; training needs at least one sample")
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        schedule = FixedBatch(schedule)
    if not isinstance(schedule, BatchSchedule):
        raise TypeError(f"schedule must be a gradiv_lib.batching schedule or an int batch size, got {type(schedule).__name__}")
    _check_int(epochs, "epochs", 1)
    _check_int(seed, "seed", 0)
    _check_int(eval_batch_size, "eval_batch_size", 1)
    if eval_every is not None:
        _check_int(eval_every, "eval_every", 1)
        if test_data is None:
            raise ValueError(f"eval_every={eval_every} evaluates test_data between steps; pass test_data or eval_every=None")
    if measure_batch_size is not None:
        _check_int(measure_batch_size, "measure_batch_size", 1)
    _check_int(checkpoint_every, "checkpoint_every", 1)
    if on_nonfinite not in _NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {_NONFINITE}, got {on_nonfinite!r}")
    if target_on not in _TARGET_ON:
        raise ValueError(f"target_on must be one of {_TARGET_ON}, got {target_on!r}")
    if target_accuracy is not None:
        if isinstance(target_accuracy, bool) or not isinstance(target_accuracy, (int, float)) or not 0 < target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy!r}")
        if target_on == "test" and test_data is None:
            raise ValueError("target_accuracy with target_on='test' needs test_data (or use target_on='train')")
        if not _is_classification(train_data):
            raise ValueError("target_accuracy needs integer class labels; the training targets are not class indices")
    elif stop_at_target:
        raise ValueError("stop_at_target=True needs target_accuracy")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (x, generator) -> x, got {type(transform).__name__}")
    device = torch.device(device) if device is not None else train_data.device
    parallel = DataParallel.from_environment(device)  # None in one process; several: see distributed.py
    progress = progress and (parallel is None or parallel.rank == 0)
    schedule.bind(len(train_data))
    train_data = train_data.to(device)
    test = None if test_data is None else _as_data(test_data, "test_data").to(device)
    loss_fn = loss_fn or _default_loss(train_data)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    opt = _build_optimizer(optimizer, params, lr, momentum, weight_decay)
    sched = _build_lr_scheduler(lr_scheduler, opt, epochs)
    classify = _is_classification(train_data)
    n_train = len(train_data)
    reduction = _loss_reduction(loss_fn, model, *_head(train_data, 8))

    config = {"schedule": schedule.name, "initial_batch_size": schedule.initial_batch_size, "epochs": epochs,
              "seed": seed, "n_samples": n_train, "n_params": sum(p.numel() for p in params), "eval_every": eval_every}
    history = History(schedule=schedule.name, target_accuracy=target_accuracy, target_on=target_on,
                      eval_every=eval_every)
    generator = torch.Generator().manual_seed(seed)
    path = None if checkpoint_path is None else Path(checkpoint_path).expanduser()
    if path is not None:  # checked now, not at the end of the first epoch
        if path.is_dir():
            raise ValueError(f"checkpoint_path {path} is a folder; give a file in it, e.g. {path / 'run.pt'}")
        check_writable_folder(path.parent, "checkpoint_path's folder")  # an OutputError is a ValueError
    fork_devices = [device.index or 0] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        start_epoch, finished = 0, False
        if path is not None and path.exists():
            state = torch.load(path, map_location=device, weights_only=True)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"checkpoint {path} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
            for key, value in config.items():
                if state["config"].get(key) != value:
                    raise ValueError(
                        f"checkpoint {path} is from a different run ({key} = {state['config'].get(key)!r} there, "
                        f"{value!r} here); delete it or pass another checkpoint_path"
                    )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["lr_scheduler"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            history = History.from_dict(state["history"])
            start_epoch, finished = int(state["epoch"]), bool(state["finished"])
        if parallel is not None:  # same settings everywhere, process 0's model, a dropout stream per process
            parallel.start(model, {**config, "epochs": epochs, "start_epoch": start_epoch, "finished": finished,
                                   "drop_last": drop_last, "measure_diversity": measure_diversity,
                                   "measure_batch_size": measure_batch_size, "loss_reduction": reduction,
                                   "n_test": None if test is None else len(test)}, seed, start_epoch)

        def save_checkpoint(completed: int, done: bool) -> None:
            if parallel is not None and parallel.rank != 0:  # process 0 writes; the others wait until it is there
                return parallel.barrier()
            write_checkpoint({
                "format": CHECKPOINT_FORMAT, "config": config, "epoch": completed, "finished": done,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "lr_scheduler": None if sched is None else sched.state_dict(),
                "schedule": schedule.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history.to_dict(),
            }, path)
            if parallel is not None:
                parallel.barrier()

        meter = kept_meter = kept_for = None
        bar = tqdm(total=epochs, initial=start_epoch, disable=not progress or finished, desc=schedule.name, unit="epoch")
        try:
            for epoch in range(start_epoch, epochs):
                if finished:
                    break
                schedule.begin_epoch(epoch)
                batch_size = schedule.batch_size
                measure = measure_diversity or schedule.needs_diversity
                schedule_observes = schedule.needs_grad  # (needs_diversity implies needs_grad)
                want_grad = measure or schedule_observes
                nonfinite_step = False  # a step with an inf/nan loss: the schedule sees no later step this epoch
                # the schedule's own epoch estimate is recorded when it has one; otherwise the loop accumulates
                schedule_measures = schedule.needs_diversity and hasattr(schedule, "measurements")
                accumulator = EpochDiversityAccumulator() if measure and not schedule_measures else None
                epoch_lr, epoch_lr_scale = float(opt.param_groups[0]["lr"]), schedule.lr_scale
                model.train()
                # one BatchNorm scan per epoch, not per step; one meter (hooks planned once) for as long as the
                # parameters and norm layers stay the same (on_epoch_end may change them)
                batch_norms = _train_batch_norms(model) if measure else []
                # the parameters trainable in this epoch: the measurement (and the gradient exchange between
                # processes) covers exactly these, even if on_epoch_end froze or unfroze some
                params = [p for p in model.parameters() if p.requires_grad]
                if not params:
                    raise ValueError(f"epoch {epoch}: the model has no trainable parameters left (on_epoch_end froze them all)")
                meter = None
                if measure and not batch_norms:
                    # the meter's plan holds while the parameters (trainable or not, by name) and BatchNorm layers
                    # are the same and none is frozen or unfrozen: on_epoch_end may prune, replace or add layers
                    plan_key = (planned_members(model), tuple(p.requires_grad for p in model.parameters()))
                    if kept_meter is None or kept_for != plan_key:
                        # exact_grad: autograd's own weight gradients, so a run that measures is bit for bit
                        # the run that does not (and the same on every rerun: the meter's fused layers
                        # are chosen by timing and equal autograd's only to rounding, which training amplifies)
                        # sq_norm_of_sum=False: the loop sums the gradients itself (the epoch accumulator)
                        kept_meter = DiversityMeter(model, loss_reduction=reduction, exact_grad=True, sq_norm_of_sum=False)
                        kept_for = plan_key
                    meter = kept_meter.hold()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                eval_time = 0.0            # seconds spent in step-granular evaluations, not counted as training
                steps_before = history.steps[-1] if history.steps else 0
                samples_before = history.samples[-1] if history.samples else 0
                seconds_before = history.seconds[-1] if history.seconds else 0.0
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                correct = torch.zeros((), dtype=torch.long, device=device)
                steps = samples = 0
                for xb, yb in train_data.batches(batch_size, shuffle=True, generator=generator, drop_last=drop_last):
                    if transform is not None:
                        xb = transform(xb, generator)
                    if parallel is not None:  # this process's slice of the global batch
                        xb, yb = parallel.local(xb, yb)
                    n = len(xb)
                    opt.zero_grad(set_to_none=True)
                    sq_norms = grads = None
                    if measure:
                        if meter is None or (measure_batch_size is not None and n > measure_batch_size):
                            sq_norms, grads = _measure_separately(model, loss_fn, xb, yb, params, reduction,
                                                                  measure_batch_size or n, batch_norms)
                            out = model(xb)
                            loss = loss_fn(out, yb)
                            loss.backward()
                        else:  # measured during the training step's own backward pass
                            with meter:
                                out = model(xb)
                                loss = loss_fn(out, yb)
                                loss.backward()
                            sq_norms = meter.sq_norms
                    else:
                        out = model(xb)
                        loss = loss_fn(out, yb)
                        loss.backward()
                    if parallel is not None:  # the global batch's gradient, loss, n and sum of per-sample norms
                        loss, sq_norms, grads, n = parallel.reduce_step(params, loss, n, sq_norms, grads, reduction)
                    if want_grad:
                        if grads is None:
                            grads = [p.grad for p in params]
                        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
                        if accumulator is not None:
                            # no per-step host synchronisation: checked once, when the epoch's result is read
                            accumulator.update(sq_norms, grads, n, grad_reduction=reduction, validate=False)
                    if schedule_observes and not nonfinite_step:
                        # one scalar read per step, in the epochs where the schedule measures only: a diverged
                        # step's gradient is not handed to it, so on_nonfinite decides what happens at the
                        # epoch's end instead of the schedule's own refusal of a non-finite value
                        nonfinite_step = not bool(torch.isfinite(loss.detach()))
                    if not nonfinite_step:
                        schedule.observe(n=n, grad=grads, sq_norms=sq_norms, grad_reduction=reduction)
                    opt.step()
                    loss_sum += loss.detach().double() * (n if reduction == "mean" else 1)
                    if classify:
                        correct += (out.detach().argmax(1) == yb).sum()
                    steps += 1
                    samples += n
                    if eval_every is not None and (steps_before + steps) % eval_every == 0:
                        eval_time += _evaluate_between_steps(model, test, loss_fn, eval_batch_size, history, epoch,
                                                             steps_before + steps, samples_before + samples,
                                                             seconds_before, start, eval_time, device,
                                                             target_accuracy if target_on == "test" else None)
                if meter is not None:
                    meter.release()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start - eval_time
                train_loss = float(loss_sum) / samples
                if parallel is not None:  # the global count of correct predictions; process 0's buffers everywhere
                    correct = parallel.end_epoch(model, correct)
                train_accuracy = int(correct) / samples if classify else math.nan
                diverged = not math.isfinite(train_loss)  # (a non-finite step's loss is in the sum)
                # a diverged epoch has no diversity (its sums are not finite): on_nonfinite decides what follows
                result: DiversityResult | None = (
                    accumulator.result if accumulator is not None and accumulator.n and not diverged else None
                )
                if diverged and on_nonfinite == "raise":
                    raise FloatingPointError(
                        f"the training loss became non-finite ({train_loss}) in epoch {epoch} (batch size {batch_size}, "
                        f"learning rate {epoch_lr:.4g}); lower the learning rate, cap its rescale (lr_cap=...) or pass "
                        "on_nonfinite='stop' to record the divergence"
                    )
                if test is not None and not diverged:
                    test_loss, test_accuracy = evaluate(model, test, loss_fn, eval_batch_size)
                else:
                    test_loss = test_accuracy = math.nan
                resize: Resize | None = schedule.end_epoch(epoch) if not diverged else None
                if schedule_measures and schedule.measurements and schedule.measurements[-1][0] == epoch:
                    result = schedule.measurements[-1][1]
                history._append(
                    epoch=epoch, train_loss=train_loss, train_accuracy=train_accuracy, test_loss=test_loss,
                    test_accuracy=test_accuracy, batch_size=batch_size, lr=epoch_lr, lr_scale=epoch_lr_scale,
                    diversity=result.diversity if result else math.nan,
                    batch_size_bound=result.batch_size_bound if result else math.nan,
                    steps=steps_before + steps, samples=samples_before + samples, seconds=seconds_before + elapsed,
                )
                if target_accuracy is not None and history.epoch_to_target is None:
                    reached = test_accuracy if target_on == "test" else train_accuracy
                    if reached >= target_accuracy:
                        history.epoch_to_target = epoch
                        history.steps_to_target = history.steps[-1]
                        history.samples_to_target = history.samples[-1]
                        history.seconds_to_target = history.seconds[-1]
                if sched is not None:
                    sched.step()
                if resize is not None:
                    _apply_lr_factor(opt, sched, resize.lr_factor)
                    history.resizes.append(resize.to_dict())
                history.diverged = diverged
                finished = diverged or epoch + 1 == epochs or (stop_at_target and history.reached_target)
                if parallel is not None:
                    finished = parallel.agree(schedule, finished)
                if path is not None and (finished or (epoch + 1) % checkpoint_every == 0):
                    save_checkpoint(epoch + 1, finished)
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3g}", acc=f"{test_accuracy if test is not None else train_accuracy:.3f}",
                                B=batch_size)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, model, history)
        finally:
            if meter is not None:  # hooks kept for the epoch (DiversityMeter.hold)
                meter.release()
            bar.close()
    return history
