"""Continual-learning task streams (ch. 8): permuted inputs, random labels, permuted labels, class-incremental."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .core import InMemoryData, _as_data, _check_positive_int


# --------------------------------------------------------------------------------------------
# Continual-learning task streams
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One task of a continual-learning stream.

    Attributes
    ----------
    name : str
        E.g. ``"permuted-3"``.
    train : InMemoryData
        Training data of the task.
    test : InMemoryData or None
        Held-out data transformed the same way, when a test set was given and is meaningful.
    info : dict
        How the task was made (the pixel permutation, the label map, the classes, ...).
    """

    name: str
    train: InMemoryData
    test: InMemoryData | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _stream_inputs(
    data: InMemoryData | tuple[Tensor, Tensor],
    test: InMemoryData | tuple[Tensor, Tensor] | None,
    n_tasks: int,
) -> tuple[InMemoryData, InMemoryData | None]:
    _check_positive_int(n_tasks, "n_tasks")
    train = _as_data(data, "data")
    return train, (None if test is None else _as_data(test, "test"))


def _num_classes(*datasets: InMemoryData | None) -> int:
    return max(d.num_classes for d in datasets if d is not None)


def permuted_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    n_tasks: int,
    seed: int = 0,
    test: InMemoryData | tuple[Tensor, Tensor] | None = None,
    identity_first: bool = False,
) -> list[Task]:
    """Permuted-input tasks ("permuted MNIST"): one fixed random permutation of the input
    features per task, applied to every sample (train and test alike); labels unchanged.

    By default every task, task 0 included, uses a random permutation, so all tasks are equally
    hard (the plasticity benchmarks of Dohare et al. and Kumar et al.); ``identity_first=True``
    keeps the original inputs as task 0 (the convention of Kirkpatrick et al.'s EWC paper).
    Works for any input shape: the features of each sample are flattened, permuted and
    reshaped. ``info["permutation"]`` holds the permutation.
    """
    train, test = _stream_inputs(data, test, n_tasks)

    def permute(d: InMemoryData, perm: Tensor) -> InMemoryData:
        flat = d.x.reshape(len(d), -1)[:, perm.to(d.device)]
        return InMemoryData(flat.reshape(d.x.shape), d.y, d.info)

    return _permutation_stream("permuted", "permutation", train, test, n_tasks, train.x[0].numel(), permute,
                               seed, identity_first)


def random_label_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    n_tasks: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> list[Task]:
    """Random-label tasks (memorisation; Lyle et al. 2023, Kumar et al.): the same inputs with
    fresh labels drawn uniformly from ``num_classes`` classes for every task.

    There is nothing to generalise, so the tasks have no test set; the metric is training
    accuracy at the end of each task. ``num_classes`` defaults to ``max(y) + 1`` of ``data``.
    """
    train, _ = _stream_inputs(data, None, n_tasks)
    classes = train.num_classes if num_classes is None else num_classes
    _check_positive_int(classes, "num_classes", minimum=2)
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        labels = torch.randint(classes, (len(train),), generator=generator).to(train.device)
        tasks.append(Task(f"random-labels-{t}", InMemoryData(train.x, labels, train.info)))
    return tasks


def label_permutation_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    n_tasks: int,
    seed: int = 0,
    test: InMemoryData | tuple[Tensor, Tensor] | None = None,
    identity_first: bool = False,
) -> list[Task]:
    """Label-permutation ("label flip") tasks: the same inputs, classes renamed by a fresh random
    permutation :math:`\\pi_t` per task (``y -> pi_t[y]``, train and test alike).

    Task 0 is permuted too unless ``identity_first``. ``info["label_map"]`` holds
    :math:`\\pi_t`.
    """
    train, test = _stream_inputs(data, test, n_tasks)

    def relabel(d: InMemoryData, label_map: Tensor) -> InMemoryData:
        return InMemoryData(d.x, label_map.to(d.device)[d.y], d.info)

    return _permutation_stream("label-permutation", "label_map", train, test, n_tasks, _num_classes(train, test),
                               relabel, seed, identity_first)


def _permutation_stream(name: str, info_key: str, train: InMemoryData, test: InMemoryData | None, n_tasks: int,
                        size: int, transform, seed: int, identity_first: bool) -> list[Task]:
    """Tasks ``transform(data, pi_t)`` with a fresh random permutation ``pi_t`` of ``range(size)`` per task
    (the identity for task 0 when ``identity_first``), applied to train and test alike."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(size) if t == 0 and identity_first else torch.randperm(size, generator=generator)
        tasks.append(Task(f"{name}-{t}", transform(train, perm), None if test is None else transform(test, perm),
                          {info_key: perm}))
    return tasks


def class_incremental_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    classes_per_task: int,
    test: InMemoryData | tuple[Tensor, Tensor] | None = None,
    seed: int | None = None,
) -> list[Task]:
    """Class-incremental tasks: task ``t`` holds only the samples of its ``classes_per_task``
    classes (disjoint groups covering all classes).

    Classes are grouped in increasing order, or in a random order drawn from ``seed`` when it is
    given. Labels keep their original values (one shared output head over all classes).
    The number of classes must be a multiple of ``classes_per_task``. ``info["classes"]`` lists
    the task's classes.
    """
    train, test = _stream_inputs(data, test, 1)
    classes = _num_classes(train, test)
    _check_positive_int(classes_per_task, "classes_per_task")
    if classes % classes_per_task:
        raise ValueError(
            f"classes_per_task={classes_per_task} does not divide the {classes} classes; use a "
            f"divisor of {classes}"
        )
    order = (
        torch.arange(classes)
        if seed is None
        else torch.randperm(classes, generator=torch.Generator().manual_seed(seed))
    )
    tasks = []
    for group in order.reshape(-1, classes_per_task):

        def select(d: InMemoryData, group: Tensor = group) -> InMemoryData:
            return d.subset(torch.nonzero(torch.isin(d.y, group.to(d.device))).flatten())

        tasks.append(
            Task(
                f"classes-{'-'.join(str(c) for c in group.tolist())}",
                select(train),
                None if test is None else select(test),
                {"classes": group.tolist()},
            )
        )
    return tasks
