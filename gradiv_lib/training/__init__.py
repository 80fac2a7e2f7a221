"""One training loop for every chapter (chapter 4, ``book/ch04_divebatch``), in parts a reader can find:

* :mod:`~gradiv_lib.training.loop` — :func:`train`: adaptive batch sizes, per-sample norms in measurement epochs,
  targets, checkpoints and resume;
* :mod:`~gradiv_lib.training.history` — :class:`History`, what a run records per epoch;
* :mod:`~gradiv_lib.training.evaluation` — :func:`evaluate`, and the data types ``train`` accepts;
* :mod:`~gradiv_lib.training.options` — the optimizer and learning-rate scheduler built from ``train``'s arguments,
  and how a batch-size change rescales their learning rates;
* :mod:`~gradiv_lib.training.distributed` — the same run on several processes (``torchrun``; gloo on CPU, nccl on
  GPU): each takes a slice of every global batch, and gradients and per-sample norms are all-reduced.
"""
from __future__ import annotations

from .distributed import DataParallel  # noqa: F401 (documented in its module)
from .evaluation import evaluate
from .history import History
from .loop import CHECKPOINT_FORMAT, _measure_separately, _train_batch_norms, train  # noqa: F401 (private: tests)
from .options import OPTIMIZERS

__all__ = ["CHECKPOINT_FORMAT", "OPTIMIZERS", "History", "evaluate", "train"]
