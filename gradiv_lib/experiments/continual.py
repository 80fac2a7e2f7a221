"""Chapter 8's continual-learning runs from the command line: ``gradiv plasticity NAME``.

Each run trains an MLP on a stream of tasks built from scikit-learn's digits with one regularizer of
:mod:`gradiv_lib.plasticity` (:func:`gradiv_lib.plasticity.run_one`) and keeps, per method and seed, the compact
history (:func:`gradiv_lib.plasticity.compact_history`). The settings of the book are
:data:`gradiv_lib.plasticity.EXPERIMENTS`; ``book=False`` (the command line's default) runs a quick subset of them.

* ``random_labels``: 600 images with fresh random labels per task (memorisation), 12 tasks of 60 epochs;
* ``permuted``: all training digits, a fresh pixel permutation per task, 12 tasks of 4 epochs;
* ``sensitivity``: random labels, each regularizer at three strengths and two widths.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["NAMES", "QUICK", "config_for", "run"]

NAMES = ("random_labels", "permuted", "sensitivity")

#: What the quick mode changes in the book's settings: one seed, four tasks, three methods (seconds, not minutes).
QUICK: dict[str, dict[str, Any]] = {
    "random_labels": dict(n_tasks=4, seeds=[0], methods=["none", "l2_init", "spectral"]),
    "permuted": dict(n_tasks=4, seeds=[0], methods=["none", "l2_init", "spectral"]),
    "sensitivity": dict(n_tasks=4, seeds=[0], widths=[64], strengths=[1e-3], methods=["none", "l2_init", "spectral"]),
}


def config_for(name: str, *, book: bool = False, seeds: Sequence[int] | None = None,
               methods: Sequence[str] | None = None, n_tasks: int | None = None,
               epochs_per_task: int | None = None) -> dict[str, Any]:
    """The full configuration of a run: the book's settings, the quick subset unless ``book``, then overrides."""
    from .. import plasticity as pl

    if name not in pl.EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(sorted(pl.EXPERIMENTS))}, got {name!r}")
    cfg = copy.deepcopy(pl.EXPERIMENTS[name])
    quick = {} if book else dict(QUICK[name])
    chosen = list(methods) if methods is not None else quick.pop("methods", None)
    quick.pop("methods", None)
    cfg.update(quick)
    if chosen is not None:
        known = list(cfg["methods"])
        bad = [m for m in chosen if m not in known]
        if bad:
            raise ValueError(f"unknown methods {bad}; valid: {', '.join(known)}")
        cfg["methods"] = ({m: cfg["methods"][m] for m in chosen} if isinstance(cfg["methods"], dict) else list(chosen))
    if seeds is not None:
        cfg["seeds"] = [int(s) for s in seeds]
    if n_tasks is not None:
        cfg["n_tasks"] = int(n_tasks)
    if epochs_per_task is not None:
        cfg["epochs_per_task"] = int(epochs_per_task)
    if not cfg["seeds"]:
        raise ValueError("seeds must name at least one seed")
    return cfg


def _jobs(name: str, cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], int, int]]:
    """(key, method, params, width, seed) of every run, in the order of the book's runner."""
    jobs = []
    if name == "sensitivity":
        for width in cfg["widths"]:
            for method in cfg["methods"]:
                for strength in ([None] if method == "none" else cfg["strengths"]):
                    for seed in cfg["seeds"]:
                        jobs.append((f"{method}|{strength}|{width}", method,
                                     {} if strength is None else {"strength": strength}, width, seed))
    else:
        for method, params in cfg["methods"].items():
            for seed in cfg["seeds"]:
                jobs.append((method, method, params, cfg["width"], seed))
    return jobs


def run(name: str, *, book: bool = False, seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None,
        n_tasks: int | None = None, epochs_per_task: int | None = None, out: str | Path | None = None,
        result_name: str | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run ``name`` and save ``ch08/<result_name>`` (default ``name``, ``name + "_quick"`` in quick mode) with
    :func:`gradiv_lib.results.save`; returns the path and the saved payload. The data is, per method (or
    ``"method|strength|width"`` for the sensitivity sweep), one compact history per seed."""
    from tqdm.auto import tqdm

    from .. import plasticity as pl
    from .. import results

    cfg = config_for(name, book=book, seeds=seeds, methods=methods, n_tasks=n_tasks, epochs_per_task=epochs_per_task)
    root = results.check_out(out)
    jobs = _jobs(name, cfg)
    tic = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(jobs, desc=f"plasticity {name}", unit="run", disable=not progress)
    for key, method, params, width, seed in bar:
        bar.set_postfix_str(f"{key} seed {seed}")
        settings = {k: v for k, v in cfg.items() if k not in ("width", "stream", "seeds", "methods")}
        history = pl.run_one(cfg["stream"], method, params, seed=seed, width=width, **settings).to_dict()
        runs.setdefault(key, []).append(pl.compact_history(history))
    bar.close()
    seconds = time.perf_counter() - tic
    default = name if book else f"{name}_quick"
    path = results.save(f"ch08/{result_name or default}", runs, config=cfg, seconds=seconds, device="cpu", root=root)
    return path, json.loads(path.read_text())


def summarize(payload: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean over seeds of the last task's end-of-task accuracy, per key."""
    return {key: {"final_task_accuracy": sum(h["end_accuracy"][-1] for h in hs) / len(hs)}
            for key, hs in payload["data"].items()}
