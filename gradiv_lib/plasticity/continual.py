"""The continual-learning loop: task streams (:func:`make_tasks`, :func:`as_tasks`), :func:`train_continual`
with a regularizer, its per-task :class:`ContinualHistory` and resumable checkpoints, and the plasticity probe
:func:`plasticity`.

Chapter 8: every run of the chapter goes through :func:`train_continual` (section 8.1 live, 8.2 and 8.3 through
the command line ``gradiv plasticity``, :mod:`gradiv_lib.experiments.continual`).
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import (InMemoryData, Task, class_incremental_tasks, label_permutation_tasks, permuted_tasks,
                    random_label_tasks)
from ..results import save_checkpoint
from ._checks import _check_int, _check_model, _check_number
from .metrics import dormant_fraction, effective_rank, hidden_features, sigma_max, task_accuracy
from .regularizers import REGULARIZERS, NoRegularizer, Regularizer, make_regularizer

__all__ = ["CHECKPOINT_FORMAT", "STREAMS", "ContinualHistory", "as_tasks", "make_tasks", "plasticity",
           "train_continual"]

#: Version of the checkpoint layout written by :func:`train_continual`.
CHECKPOINT_FORMAT = 1



#: Task streams of :func:`make_tasks`.
STREAMS = ("random_labels", "permuted", "label_permutation", "class_incremental")


def make_tasks(stream: str, data: InMemoryData | tuple[Tensor, Tensor], n_tasks: int = 10, *, seed: int = 0,
               test: InMemoryData | tuple[Tensor, Tensor] | None = None, n_samples: int | None = None,
               classes_per_task: int = 2) -> list[Task]:
    """A task stream from any data set (``(x, y)`` tensors or :class:`~gradiv_lib.data.InMemoryData`).

    ``stream`` is one of :data:`STREAMS` (:func:`gradiv_lib.data.random_label_tasks`,
    :func:`~gradiv_lib.data.permuted_tasks`, :func:`~gradiv_lib.data.label_permutation_tasks`,
    :func:`~gradiv_lib.data.class_incremental_tasks`). ``n_samples`` keeps the first ``n_samples``
    training samples (random-label memorisation uses a few hundred).
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    _check_int(n_tasks, "n_tasks")
    data = as_tasks([data])[0].train
    if n_samples is not None:
        _check_int(n_samples, "n_samples")
        if n_samples > len(data):
            raise ValueError(f"n_samples must be <= the {len(data)} training samples, got {n_samples}")
        data = data.subset(torch.arange(n_samples))
    if stream == "random_labels":
        return random_label_tasks(data, n_tasks, seed=seed)
    if stream == "permuted":
        return permuted_tasks(data, n_tasks, seed=seed, test=test)
    if stream == "label_permutation":
        return label_permutation_tasks(data, n_tasks, seed=seed, test=test)
    return class_incremental_tasks(data, classes_per_task, test=test, seed=seed)[:n_tasks]


def as_tasks(items: Iterable[Task | InMemoryData | tuple[Tensor, Tensor]]) -> list[Task]:
    """Your own task stream: a list of :class:`~gradiv_lib.data.Task`, ``InMemoryData`` or ``(x, y)``
    pairs (or ``((x, y), (x_test, y_test))`` pairs) becomes a list of tasks."""
    tasks = []
    for i, item in enumerate(items):
        if isinstance(item, Task):
            tasks.append(item)
        elif isinstance(item, InMemoryData):
            tasks.append(Task(f"task-{i}", item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
            tasks.append(Task(f"task-{i}", InMemoryData(item[0], item[1])))
        elif (isinstance(item, (tuple, list)) and len(item) == 2
              and all(isinstance(d, (tuple, list, InMemoryData)) for d in item)):
            train, test = (d if isinstance(d, InMemoryData) else InMemoryData(*d) for d in item)
            tasks.append(Task(f"task-{i}", train, test))
        else:
            raise TypeError(f"task {i} must be a Task, InMemoryData, an (x, y) pair of tensors or a (train, test) pair; "
                            f"got {type(item).__name__}")
        if len(tasks[-1].train) == 0:
            raise ValueError(f"task {i} ({tasks[-1].name}) has no training samples")
    if not tasks:
        raise ValueError("the task stream is empty; give at least one task")
    return tasks


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, data: InMemoryData, *, epochs: int, batch_size: int,
                 loss_fn: Callable, regularizer: Regularizer | None, generator: torch.Generator) -> list[float]:
    """``epochs`` epochs of mini-batch training; returns the running training accuracy of each epoch."""
    accs = []
    bs = min(batch_size, len(data))
    for _ in range(epochs):
        correct = 0
        for xb, yb in data.batches(bs, shuffle=True, generator=generator):
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            if regularizer is not None:
                loss = loss + regularizer(model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became non-finite ({float(loss)}); lower lr or the regularization strength")
            loss.backward()
            opt.step()
            correct += int((out.detach().argmax(1) == yb).sum())
        accs.append(correct / len(data))
    return accs


def plasticity(model: nn.Module, task: Task | InMemoryData | tuple[Tensor, Tensor], *, epochs: int = 20, lr: float = 1e-3,
               batch_size: int = 32, optimizer: str = "adam", seed: int = 0) -> float:
    """Plasticity probe: training accuracy reached on ``task`` after ``epochs`` epochs of fresh
    ``optimizer`` training from a **copy** of the current weights (``model`` is not changed)."""
    _check_model(model)
    task = as_tasks([task])[0]
    _check_int(epochs, "epochs")
    _check_int(batch_size, "batch_size")
    _check_number(lr, "lr", strict=True)
    probe = copy.deepcopy(model)
    opt = _make_optimizer(optimizer, probe.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _train_steps(probe, opt, task.train, epochs=epochs, batch_size=batch_size, loss_fn=nn.CrossEntropyLoss(),
                     regularizer=None, generator=g)
    return task_accuracy(probe, task.train)


def _make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


@dataclass
class ContinualHistory:
    """What :func:`train_continual` measured, one entry per finished task.

    Attributes
    ----------
    task : list of str
        Task names.
    end_accuracy : list of float
        Training accuracy on the task at its end (trainability; the plasticity benchmarks' metric).
    test_accuracy : list of float
        Test accuracy on the task at its end (``nan`` without a test set).
    online_accuracy : list of float
        Mean over the task's epochs of the running training accuracy (Kumar et al.'s "average online
        task accuracy", per task).
    epoch_accuracy : list of list of float
        Running training accuracy of every epoch of every task.
    diversity_start, diversity_end : list of float
        Gradient diversity :math:`\\Delta` of the task's loss on its probe samples, at the weights the
        task starts from and at its end (per-sample gradients of the unregularized loss).
    sigma_max : list of list of float
        Exact top singular value of every weight matrix at the end of the task.
    effective_rank : list of float
        Entropy effective rank of the last hidden layer's features on the probe samples.
    dormant : list of float
        Fraction of dead units (zero on every probe sample), over all hidden layers.
    weight_norm : list of float
        :math:`\\lVert\\theta\\rVert_2` at the end of the task.
    seconds : list of float
        Cumulative training seconds.
    regularizer : dict
        The regularizer's configuration.
    layers : list of str
        Names of the weights in ``sigma_max``.
    """

    task: list[str] = field(default_factory=list)
    end_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    online_accuracy: list[float] = field(default_factory=list)
    epoch_accuracy: list[list[float]] = field(default_factory=list)
    diversity_start: list[float] = field(default_factory=list)
    diversity_end: list[float] = field(default_factory=list)
    sigma_max: list[list[float]] = field(default_factory=list)
    effective_rank: list[float] = field(default_factory=list)
    dormant: list[float] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    regularizer: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    PER_TASK = ("task", "end_accuracy", "test_accuracy", "online_accuracy", "epoch_accuracy", "diversity_start",
                "diversity_end", "sigma_max", "effective_rank", "dormant", "weight_norm", "seconds")

    def __len__(self) -> int:
        return len(self.task)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON and ``weights_only`` safe)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ContinualHistory:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"unknown ContinualHistory fields {sorted(unknown)}")
        return cls(**copy.deepcopy(dict(state)))

    def __repr__(self) -> str:
        if not self.task:
            return "ContinualHistory(empty)"
        return (f"ContinualHistory({self.regularizer.get('name', '?')}: {len(self)} tasks, end accuracy "
                f"{self.end_accuracy[0]:.3f} → {self.end_accuracy[-1]:.3f})")


def _probe(task: Task, probe_size: int) -> InMemoryData:
    n = min(probe_size, len(task.train))
    return task.train.subset(torch.arange(n, device=task.train.device))


def _diversity(model: nn.Module, probe: InMemoryData, loss_fn: Callable) -> float:
    from ..diversity import gradient_diversity

    was_training = model.training
    model.eval()
    try:
        return float(gradient_diversity(model, loss_fn, probe.x, probe.y).diversity)
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return math.nan
    finally:
        model.train(was_training)


def train_continual(
    model: nn.Module,
    tasks: Sequence[Task | InMemoryData | tuple[Tensor, Tensor]],
    *,
    regularizer: Regularizer | str | None = None,
    epochs_per_task: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    optimizer: str = "adam",
    reset_optimizer: bool = False,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    probe_size: int = 256,
    measure: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    on_task_end: Callable[[int, nn.Module, ContinualHistory], None] | None = None,
    progress: bool = False,
) -> ContinualHistory:
    """Train ``model`` on ``tasks`` one after the other, with a regularizer, measuring plasticity.

    Parameters
    ----------
    model : nn.Module
        A classifier, trained in place. Its weights when the regularizer is bound (here, unless it is
        already bound) are the :math:`\\theta_0` of the init-anchored regularizers.
    tasks : sequence
        :class:`~gradiv_lib.data.Task` objects (e.g. :func:`make_tasks`), or anything :func:`as_tasks`
        takes (your own data sets).
    regularizer : Regularizer, str or None
        An instance, a name of :data:`REGULARIZERS` with its default settings, or ``None`` (no penalty).
    epochs_per_task, lr, batch_size : int, float, int
        Training budget per task; ``optimizer`` is ``"adam"`` (default) or ``"sgd"``.
    reset_optimizer : bool
        Build a fresh optimizer at every task (default: one optimizer for the whole stream, as in the
        plasticity benchmarks).
    loss_fn : callable, optional
        Default cross-entropy.
    probe_size : int
        Number of a task's first training samples on which diversity, effective rank and dormant units
        are measured.
    measure : bool
        Record diversity, σ_max, effective rank and dormant units (accuracy is always recorded).
    seed : int
        Seed of the batch order, of shrink-and-perturb's noise and of the (forked) global RNG.
    checkpoint_path : path, optional
        Written atomically after every task; if it exists, the run resumes from it (it must come from a
        run with the same tasks count, budget, seed and regularizer). Loaded with ``weights_only=True``.
    on_task_end : callable, optional
        ``on_task_end(task_index, model, history)`` after each task (after the checkpoint).

    Returns
    -------
    ContinualHistory
    """
    from tqdm.auto import tqdm

    _check_model(model)
    tasks = as_tasks(tasks)
    _check_int(epochs_per_task, "epochs_per_task")
    _check_int(batch_size, "batch_size")
    _check_int(probe_size, "probe_size")
    _check_int(seed, "seed", 0)
    _check_number(lr, "lr", strict=True)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if regularizer is None:
        regularizer = NoRegularizer()
    elif isinstance(regularizer, str):
        regularizer = make_regularizer(regularizer)
    elif not isinstance(regularizer, Regularizer):
        raise TypeError(f"regularizer must be a gradiv_lib.plasticity.Regularizer, a name in {sorted(REGULARIZERS)} or None, "
                        f"got {type(regularizer).__name__}")
    for i, t in enumerate(tasks):
        if t.train.y.dtype.is_floating_point or t.train.y.dim() != 1:
            raise ValueError(f"task {i} ({t.name}) needs integer class labels of shape (N,), got {t.train.y.dtype} "
                             f"{tuple(t.train.y.shape)}")
    device = torch.device(device) if device is not None else tasks[0].train.device
    model.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    if not regularizer.bound:
        regularizer.bind(model)
    fingerprint = {"format": CHECKPOINT_FORMAT, "n_tasks": len(tasks), "sizes": [len(t.train) for t in tasks],
                   "epochs_per_task": epochs_per_task, "lr": float(lr), "batch_size": batch_size, "optimizer": optimizer,
                   "reset_optimizer": bool(reset_optimizer), "seed": seed, "regularizer": regularizer.config()}
    opt = _make_optimizer(optimizer, model.parameters(), lr)
    generator = torch.Generator().manual_seed(seed)
    history = ContinualHistory(regularizer=regularizer.config())
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    start = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if path is not None and path.exists():
            state = torch.load(path, map_location=device, weights_only=True)
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint {path} comes from a different run ({state.get('fingerprint')}); "
                                 f"expected {fingerprint}. Delete it or pass another checkpoint_path")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            regularizer.load_state_dict(state["regularizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = ContinualHistory.from_dict(state["history"])
            start = len(history)
        layers = [n for n, p in model.named_parameters() if p.dim() >= 2]
        history.layers = layers
        bar = tqdm(range(start, len(tasks)), desc=regularizer.name, disable=not progress, leave=False)
        for t in bar:
            task = tasks[t]
            train_data = task.train.to(device)
            if t > 0:
                regularizer.task_boundary(model, t, generator)
                if reset_optimizer:
                    opt = _make_optimizer(optimizer, model.parameters(), lr)
            probe = _probe(Task(task.name, train_data), probe_size)
            div_start = _diversity(model, probe, loss_fn) if measure else math.nan
            tic = time.perf_counter()
            model.train()
            accs = _train_steps(model, opt, train_data, epochs=epochs_per_task, batch_size=batch_size, loss_fn=loss_fn,
                                regularizer=regularizer, generator=generator)
            elapsed = time.perf_counter() - tic
            history.task.append(task.name)
            history.end_accuracy.append(task_accuracy(model, train_data))
            history.test_accuracy.append(task_accuracy(model, task.test.to(device)) if task.test is not None else math.nan)
            history.epoch_accuracy.append(accs)
            history.online_accuracy.append(sum(accs) / len(accs))
            if measure:
                history.diversity_start.append(div_start)
                history.diversity_end.append(_diversity(model, probe, loss_fn))
                history.sigma_max.append(list(sigma_max(model).values()))
                try:
                    feats = hidden_features(model, probe.x)
                except ValueError:
                    feats = []
                history.effective_rank.append(effective_rank(feats[-1]) if feats else math.nan)
                history.dormant.append(dormant_fraction(torch.cat(feats, 1)) if feats else math.nan)
            else:
                for key in ("diversity_start", "diversity_end", "effective_rank", "dormant"):
                    getattr(history, key).append(math.nan)
                history.sigma_max.append([])
            with torch.no_grad():
                history.weight_norm.append(float(torch.sqrt(sum(p.double().square().sum() for p in model.parameters()))))
            history.seconds.append((history.seconds[-1] if history.seconds else 0.0) + elapsed)
            bar.set_postfix(acc=f"{history.end_accuracy[-1]:.3f}")
            if path is not None:
                save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "regularizer": regularizer.state_dict(), "generator": generator.get_state(),
                              "torch_rng": torch.get_rng_state(), "history": history.to_dict()}, path)
            if on_task_end is not None:
                on_task_end(t, model, history)
        bar.close()
    return history
