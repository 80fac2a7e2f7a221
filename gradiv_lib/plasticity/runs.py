"""The chapter's run protocols (the book's settings behind ``gradiv plasticity NAME``): one run of a method on a
task stream, and the compact history that is shipped.

Chapter 8: sections 8.2 and 8.3 load what :mod:`gradiv_lib.experiments.continual` makes with these.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .continual import ContinualHistory, make_tasks, train_continual
from .regularizers import make_regularizer

__all__ = ["EXPERIMENTS", "compact_history", "run_experiment", "run_one"]


#: Settings of the chapter's experiments (``python -m gradiv_lib.plasticity NAME``).
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "random_labels": dict(stream="random_labels", n_samples=600, n_tasks=12, epochs_per_task=60, width=128, depth=3,
                          lr=1e-3, batch_size=32, seeds=[0, 1, 2],
                          methods={"none": {}, "l2": {"strength": 1e-4}, "l2_init": {"strength": 1e-3},
                                   "wasserstein": {"strength": 1e-3}, "spectral": {"strength": 1e-3, "k": 2},
                                   "shrink_perturb": {"shrink": 0.8, "noise": 0.1}}),
    "permuted": dict(stream="permuted", n_samples=None, n_tasks=12, epochs_per_task=4, width=128, depth=3, lr=1e-3,
                     batch_size=32, seeds=[0, 1, 2],
                     methods={"none": {}, "l2": {"strength": 1e-4}, "l2_init": {"strength": 1e-3},
                              "wasserstein": {"strength": 1e-3}, "spectral": {"strength": 1e-3, "k": 2},
                              "shrink_perturb": {"shrink": 0.8, "noise": 0.1}}),
    "sensitivity": dict(stream="random_labels", n_samples=600, n_tasks=12, epochs_per_task=60, widths=[64, 128], depth=3,
                        lr=1e-3, batch_size=32, seeds=[0, 1], strengths=[1e-4, 1e-3, 1e-2],
                        methods=["none", "l2", "l2_init", "spectral"]),
}


def run_one(stream: str, method: str, params: dict[str, Any], *, seed: int, n_samples: int | None, n_tasks: int,
            epochs_per_task: int, width: int, depth: int, lr: float, batch_size: int, **_: Any) -> ContinualHistory:
    """One run of the chapter's protocol on digits: an MLP 64-width-…-10 (``depth`` linear layers,
    PyTorch default init, seed ``seed``), task stream ``stream`` (seed ``seed``), Adam."""
    from .. import data as gdata, models

    train, test = gdata.load_digits()
    tasks = make_tasks(stream, train, n_tasks, seed=seed, n_samples=n_samples, test=None if stream == "random_labels" else test)
    model = models.mlp(64, width, depth, 10, seed=seed)
    reg = make_regularizer(method, **params)
    return train_continual(model, tasks, regularizer=reg, epochs_per_task=epochs_per_task, lr=lr, batch_size=batch_size,
                           seed=seed)


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
    :func:`run_experiment` saves."""
    return _compact({k: v for k, v in history.items() if k != "epoch_accuracy"}, digits)


def run_experiment(name: str, *, seeds: Sequence[int] | None = None, save: bool = True,
                   root: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run one of :data:`EXPERIMENTS` and (with ``save``) write ``ch08/<name>`` with
    :func:`gradiv_lib.results.save`; returns the data dictionary: per method (or ``"method|strength|width"`` for
    the sensitivity sweep) one :func:`compact_history` per seed."""
    from .. import results

    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    cfg = {**copy.deepcopy(EXPERIMENTS[name]), **overrides}
    if seeds is not None:
        cfg["seeds"] = list(seeds)
    tic = time.perf_counter()
    out: dict[str, Any] = {}
    if name == "sensitivity":
        for width in cfg["widths"]:
            for method in cfg["methods"]:
                for strength in ([None] if method == "none" else cfg["strengths"]):
                    key = f"{method}|{strength}|{width}"
                    out[key] = [run_one(cfg["stream"], method, {} if strength is None else {"strength": strength},
                                        seed=s, width=width, **{k: v for k, v in cfg.items() if k not in ("width", "stream")}).to_dict()
                                for s in cfg["seeds"]]
                    print(key, [round(h["end_accuracy"][-1], 3) for h in out[key]], flush=True)
    else:
        for method, params in cfg["methods"].items():
            out[method] = [run_one(cfg["stream"], method, params, seed=s, **{k: v for k, v in cfg.items() if k != "stream"}).to_dict()
                           for s in cfg["seeds"]]
            print(method, [round(h["end_accuracy"][-1], 3) for h in out[method]], flush=True)
    seconds = time.perf_counter() - tic
    out = {key: [compact_history(h) for h in runs] for key, runs in out.items()}
    if save:
        path = results.save(f"ch08/{name}", out, config=cfg, seconds=seconds, device="cpu", root=root)
        print(path)
    return out
