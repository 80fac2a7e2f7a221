"""The chapter's run protocols (the book's settings behind ``gradiv plasticity NAME``): one run of a method on a
task stream, and the compact history that is shipped.

Chapter 8: sections 8.2 and 8.3 load what :mod:`gradiv_lib.experiments.continual` makes with these.
"""
from __future__ import annotations

import math
from typing import Any

from .continual import ContinualHistory, make_tasks, train_continual
from .regularizers import make_regularizer

__all__ = ["DATASETS", "EXPERIMENTS", "compact_history", "load_dataset", "run_one"]


#: Settings of the chapter's experiments (``gradiv plasticity NAME --book``). ``random_labels`` and ``permuted`` are
#: digits streams with hand-picked (untuned) strengths, the settings of section 8.1's single run; the book's
#: comparison and sensitivity (8.2, 8.3) are ``mnist1d``: random labels on MNIST-1D, every method tuned on its own
#: grid (:mod:`gradiv_lib.plasticity.tuning`) with seeds ``tune_seeds``, then its best run on fresh ``eval_seeds``.
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "random_labels": dict(stream="random_labels", dataset="digits", n_samples=600, n_tasks=12, epochs_per_task=30,
                          width=128, depth=3, lr=2e-3, batch_size=32, seeds=[0, 1, 2],
                          methods={"none": {}, "l2": {"strength": 1e-4}, "l2_init": {"strength": 1e-3},
                                   "wasserstein": {"strength": 1e-3}, "spectral": {"strength": 1e-3, "k": 2},
                                   "shrink_perturb": {"shrink": 0.8, "noise": 0.1}}),
    "permuted": dict(stream="permuted", dataset="digits", n_samples=None, n_tasks=12, epochs_per_task=4, width=128,
                     depth=3, lr=1e-3, batch_size=32, seeds=[0, 1, 2],
                     methods={"none": {}, "l2": {"strength": 1e-4}, "l2_init": {"strength": 1e-3},
                              "wasserstein": {"strength": 1e-3}, "spectral": {"strength": 1e-3, "k": 2},
                              "shrink_perturb": {"shrink": 0.8, "noise": 0.1}}),
    "mnist1d": dict(stream="random_labels", dataset="mnist1d", n_samples=600, n_tasks=10, epochs_per_task=30,
                    width=128, depth=3, lr=3e-3, batch_size=64, tune_seeds=[0, 1], eval_seeds=[2, 3, 4],
                    methods=["l2", "l2_init", "wasserstein", "spectral", "shrink_perturb"], spectral_k=2,
                    coarse_decades=[-4.0, -3.0, -2.0, -1.0, 0.0], fine_step=0.5, metric="online_accuracy"),
}

#: Data sets of :func:`run_one`: loader and number of input features.
DATASETS = ("digits", "mnist1d")


def load_dataset(name: str) -> tuple[Any, Any, int]:
    """``(train, test, in_features)`` of a data set of :data:`DATASETS` (flat inputs for an MLP; MNIST-1D is
    generated offline, 5000 samples, the package's default seed 42)."""
    from .. import data as gdata

    if name == "digits":
        train, test = gdata.load_digits()
        return train, test, 64
    if name == "mnist1d":
        train, test = gdata.load_mnist1d(5000, channels=False)
        return train, test, 40
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def run_one(stream: str, method: str, params: dict[str, Any], *, seed: int, n_samples: int | None, n_tasks: int,
            epochs_per_task: int, width: int, depth: int, lr: float, batch_size: int, dataset: str = "digits",
            measure: bool = True, **_: Any) -> ContinualHistory:
    """One run of the chapter's protocol: an MLP in-width-…-10 (``depth`` linear layers, PyTorch default init,
    seed ``seed``) on task stream ``stream`` of ``dataset`` (stream seed ``seed``), Adam, one optimizer for the
    whole stream."""
    from .. import models

    train, test, features = load_dataset(dataset)
    tasks = make_tasks(stream, train, n_tasks, seed=seed, n_samples=n_samples, test=None if stream == "random_labels" else test)
    model = models.mlp(features, width, depth, 10, seed=seed)
    reg = make_regularizer(method, **params)
    return train_continual(model, tasks, regularizer=reg, epochs_per_task=epochs_per_task, lr=lr, batch_size=batch_size,
                           seed=seed, measure=measure)


def _compact(value: Any, digits: int = 5) -> Any:
    """Floats rounded to ``digits`` decimals, recursively (keeps the shipped JSON small)."""
    if isinstance(value, float):
        return value if not math.isfinite(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: _compact(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v, digits) for v in value]
    return value


def compact_history(history: dict[str, Any], digits: int = 5) -> dict[str, Any]:
    """A :meth:`ContinualHistory.to_dict` without the per-epoch accuracies, floats rounded: what
    :mod:`gradiv_lib.experiments.continual` saves."""
    return _compact({k: v for k, v in history.items() if k != "epoch_accuracy"}, digits)
