"""Data for every chapter: in-memory data sets, synthetic problems, image readers, client
partitions and continual-learning task streams.

Chapters that use it:

* ch. 1 and 4 — :func:`synthetic_regression` (with data duplication, Yin et al.'s example of a
  diversity-*reducing* mechanism), :func:`load_digits`, :func:`load_mnist1d` (the harder problem);
* ch. 3 — :func:`synthetic_classification` and the teacher problems of the width experiments;
* ch. 4 — :func:`load_cifar10`, :func:`load_cifar100`, :func:`load_tiny_imagenet` and
  :func:`augment_batch` for the DiveBatch runs from the command line;
* ch. 5–7 — :func:`partition_iid`, :func:`partition_dirichlet`, :func:`partition_shards`
  (workers and federated clients);
* ch. 8 — :func:`permuted_tasks`, :func:`random_label_tasks`, :func:`label_permutation_tasks`,
  :func:`class_incremental_tasks` (loss of plasticity).

Everything lives in tensors on one device: :class:`InMemoryData` iterates mini-batches by
indexing a random permutation, with no ``DataLoader`` and no worker processes, so the batch size
can change from one epoch to the next (adaptive batch sizes) at no cost. Real data sets are read
from a local folder; nothing is downloaded unless ``download=True`` is passed.

Modules, one idea each: :mod:`.core` (:class:`InMemoryData`), :mod:`.synthetic` (generated problems
and digits), :mod:`.mnist1d`, :mod:`.image_files` (CIFAR, Tiny-ImageNet), :mod:`.augment`,
:mod:`.partition` (clients and workers), :mod:`.continual` (task streams).
"""

from __future__ import annotations

from .augment import augment_batch
from .continual import Task, class_incremental_tasks, label_permutation_tasks, permuted_tasks, random_label_tasks
from .core import InMemoryData
from .image_files import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_STD_KUANGLIU,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_cifar10,
    load_cifar100,
    load_tiny_imagenet,
)
from .mnist1d import load_mnist1d
from .partition import partition_dirichlet, partition_iid, partition_shards
from .synthetic import load_digits, synthetic_classification, synthetic_regression

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_STD_KUANGLIU",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InMemoryData",
    "Task",
    "augment_batch",
    "class_incremental_tasks",
    "label_permutation_tasks",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_mnist1d",
    "load_tiny_imagenet",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "permuted_tasks",
    "random_label_tasks",
    "synthetic_classification",
    "synthetic_regression",
]
