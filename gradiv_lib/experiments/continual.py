"""Chapter 8's continual-learning runs from the command line: ``gradiv plasticity NAME``.

Each run trains an MLP on a stream of tasks with one regularizer of :mod:`gradiv_lib.plasticity`
(:func:`gradiv_lib.plasticity.run_one`) and keeps, per method and seed, the compact history
(:func:`gradiv_lib.plasticity.compact_history`). The settings of the book are :data:`gradiv_lib.plasticity.EXPERIMENTS`;
``book=False`` (the command line's default) runs a quick subset of them.

* ``mnist1d`` (sections 8.2 and 8.3): random labels on MNIST-1D (600 signals, a fresh random labelling per task,
  10 tasks of 30 epochs, Adam at learning rate 3e-3, batch 64). Every method is tuned the same way (:mod:`gradiv_lib.plasticity.tuning`): its strength
  scale :math:`\\lambda_c` is measured on an unregularised first task, a coarse grid :math:`\\lambda_c 10^{k}`,
  :math:`k\\in\\{-4,\\dots,0\\}` runs on the tuning seeds, then the half-decade neighbours of the best; the best
  setting (highest mean online accuracy over the tuning seeds) runs on fresh evaluation seeds, with the metrics.
  Shrink-and-perturb is tuned on the same grid of its step :math:`\\alpha` toward a fresh initialisation.
* ``random_labels``, ``permuted``: digits streams with hand-picked strengths (the settings of section 8.1's run).
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["NAMES", "QUICK", "config_for", "run", "summarize"]

NAMES = ("mnist1d", "random_labels", "permuted")

#: What the quick mode changes in the book's settings (seconds, not minutes).
QUICK: dict[str, dict[str, Any]] = {
    "random_labels": dict(n_tasks=4, seeds=[0], methods=["none", "l2_init", "spectral"]),
    "permuted": dict(n_tasks=4, seeds=[0], methods=["none", "l2_init", "spectral"]),
    "mnist1d": dict(n_samples=200, n_tasks=3, epochs_per_task=4, tune_seeds=[0], eval_seeds=[1],
                    methods=["l2_init", "spectral", "shrink_perturb"], coarse_decades=[-2.0, 0.0]),
}


def config_for(name: str, *, book: bool = False, seeds: Sequence[int] | None = None,
               methods: Sequence[str] | None = None, n_tasks: int | None = None,
               epochs_per_task: int | None = None) -> dict[str, Any]:
    """The full configuration of a run: the book's settings, the quick subset unless ``book``, then overrides
    (for ``mnist1d``, ``seeds`` are the evaluation seeds)."""
    from .. import plasticity as pl

    if name not in pl.EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(sorted(pl.EXPERIMENTS))}, got {name!r}")
    cfg = copy.deepcopy(pl.EXPERIMENTS[name])
    quick = {} if book else copy.deepcopy(QUICK[name])
    chosen = list(methods) if methods is not None else quick.pop("methods", None)
    quick.pop("methods", None)
    cfg.update(quick)
    if chosen is not None:
        known = list(cfg["methods"]) if name != "mnist1d" else list(pl.EXPERIMENTS[name]["methods"])
        bad = [m for m in chosen if m not in known]
        if bad:
            raise ValueError(f"unknown methods {bad}; valid: {', '.join(known)}")
        cfg["methods"] = ({m: cfg["methods"][m] for m in chosen} if isinstance(cfg["methods"], dict) else list(chosen))
    seed_key = "eval_seeds" if name == "mnist1d" else "seeds"
    if seeds is not None:
        cfg[seed_key] = [int(s) for s in seeds]
    if n_tasks is not None:
        cfg["n_tasks"] = int(n_tasks)
    if epochs_per_task is not None:
        cfg["epochs_per_task"] = int(epochs_per_task)
    if not cfg[seed_key]:
        raise ValueError("seeds must name at least one seed")
    return cfg


def _jobs(cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], int, int]]:
    """(key, method, params, width, seed) of every run of a fixed-settings experiment."""
    return [(method, method, params, cfg["width"], seed) for method, params in cfg["methods"].items()
            for seed in cfg["seeds"]]


_RUN_KEYS = ("stream", "dataset", "n_samples", "n_tasks", "epochs_per_task", "width", "depth", "lr", "batch_size")


def _lean(history: dict[str, Any]) -> dict[str, Any]:
    """What a tuning run keeps: the per-task accuracies and the regularizer."""
    from .. import plasticity as pl

    return pl.compact_history({k: history[k] for k in ("end_accuracy", "online_accuracy", "regularizer")})


def _score(histories: list[dict[str, Any]], metric: str) -> float:
    """Mean over seeds of the mean over tasks of ``metric``."""
    return sum(sum(h[metric]) / len(h[metric]) for h in histories) / len(histories)


def _decade_key(k: float) -> str:
    return f"{k:+.2f}"


def _tuned(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The tuned comparison: scales, coarse then fine sweep on the tuning seeds, best on the evaluation seeds."""
    from tqdm.auto import tqdm

    from .. import models
    from .. import plasticity as pl

    settings = {k: cfg[k] for k in _RUN_KEYS if k != "stream"}
    metric = cfg["metric"]
    spectral = {"k": cfg["spectral_k"]}

    def fixed(method: str) -> dict[str, Any]:
        return dict(spectral) if method == "spectral" else {}

    # 1. each penalty's scale: lambda_c = ln 10 / R(theta_1), theta_1 after one unregularised task (first tuning seed)
    train, _, features = pl.load_dataset(cfg["dataset"])
    seed0 = cfg["tune_seeds"][0]
    first = pl.make_tasks(cfg["stream"], train, 1, seed=seed0, n_samples=cfg["n_samples"])
    init = models.mlp(features, cfg["width"], cfg["depth"], 10, seed=seed0)
    trained = copy.deepcopy(init)
    pl.train_continual(trained, first, epochs_per_task=cfg["epochs_per_task"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                       seed=seed0, measure=False)
    scales = {m: (pl.strength_scale(m, init, trained, **fixed(m)) if m in pl.tuning.PENALTIES else 1.0)
              for m in cfg["methods"]}

    bar = tqdm(desc="plasticity mnist1d", unit="run", disable=not progress)

    def one(method: str, params: dict[str, Any], seed: int, measure: bool) -> dict[str, Any]:
        bar.set_postfix_str(f"{method} {params} seed {seed}")
        h = pl.run_one(cfg["stream"], method, params, seed=seed, measure=measure, **settings).to_dict()
        bar.update()
        return pl.compact_history(h) if measure else _lean(h)

    def params_at(method: str, k: float) -> dict[str, Any]:
        return pl.method_params(method, scales[method] * 10.0 ** k, **fixed(method))

    # 2. the sweep on the tuning seeds: the baseline, the coarse grid, then the half-decade neighbours of the best
    baseline = [one("none", {}, s, False) for s in cfg["tune_seeds"]]
    sweep: dict[str, dict[str, Any]] = {}
    best: dict[str, dict[str, Any]] = {}
    for method in cfg["methods"]:
        runs: dict[str, list[dict[str, Any]]] = {}
        for k in cfg["coarse_decades"]:
            runs[_decade_key(k)] = [one(method, params_at(method, k), s, False) for s in cfg["tune_seeds"]]
        decades = [float(k) for k in runs]
        fine = pl.refine_decades(decades, [_score(runs[_decade_key(k)], metric) for k in decades], cfg["fine_step"])
        if method == "shrink_perturb":                       # alpha = 10**k is at most 1 (a full reset)
            fine = [k for k in fine if k <= 1e-9]
        for k in fine:
            runs[_decade_key(k)] = [one(method, params_at(method, k), s, False) for s in cfg["tune_seeds"]]
        runs = dict(sorted(runs.items(), key=lambda kv: float(kv[0])))
        sweep[method] = runs
        k_best = max(runs, key=lambda key: _score(runs[key], metric))
        best[method] = {"decade": float(k_best), "strength": scales[method] * 10.0 ** float(k_best),
                        "params": params_at(method, float(k_best)), "score": _score(runs[k_best], metric)}

    # 3. every method at its best setting on fresh seeds, with the plasticity metrics
    evaluation = {"none": [one("none", {}, s, True) for s in cfg["eval_seeds"]]}
    for method in cfg["methods"]:
        evaluation[method] = [one(method, best[method]["params"], s, True) for s in cfg["eval_seeds"]]
    bar.close()
    return {"scales": scales, "baseline": baseline, "sweep": sweep, "best": best, "eval": evaluation}


def run(name: str, *, book: bool = False, seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None,
        n_tasks: int | None = None, epochs_per_task: int | None = None, out: str | Path | None = None,
        result_name: str | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run ``name`` and save ``ch08/<result_name>`` (default ``name``, ``name + "_quick"`` in quick mode) with
    :func:`gradiv_lib.results.save`; returns the path and the saved payload.

    For ``random_labels`` and ``permuted`` the data is, per method, one compact history per seed. For ``mnist1d``
    it is ``scales`` (each method's :math:`\\lambda_c`), ``baseline`` (unregularised runs on the tuning seeds),
    ``sweep`` (per method, per exponent ``k`` of :math:`\\lambda_c 10^k`, the tuning seeds' per-task accuracies),
    ``best`` (the chosen exponent, strength and parameters) and ``eval`` (per method, the best setting's full
    histories on the evaluation seeds)."""
    from tqdm.auto import tqdm

    from .. import plasticity as pl
    from .. import results

    cfg = config_for(name, book=book, seeds=seeds, methods=methods, n_tasks=n_tasks, epochs_per_task=epochs_per_task)
    root = results.check_out(out)
    tic = time.perf_counter()
    if name == "mnist1d":
        data: dict[str, Any] = _tuned(cfg, progress)
    else:
        data = {}
        jobs = _jobs(cfg)
        bar = tqdm(jobs, desc=f"plasticity {name}", unit="run", disable=not progress)
        for key, method, params, width, seed in bar:
            bar.set_postfix_str(f"{key} seed {seed}")
            settings = {k: v for k, v in cfg.items() if k not in ("width", "stream", "seeds", "methods")}
            history = pl.run_one(cfg["stream"], method, params, seed=seed, width=width, **settings).to_dict()
            data.setdefault(key, []).append(pl.compact_history(history))
        bar.close()
    seconds = time.perf_counter() - tic
    default = name if book else f"{name}_quick"
    path = results.save(f"ch08/{result_name or default}", data, config=cfg, seconds=seconds, device="cpu", root=root)
    return path, json.loads(path.read_text())


def summarize(payload: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean over seeds of the last task's end-of-task accuracy, per method (for ``mnist1d``: of the evaluation
    runs at each method's tuned setting)."""
    data = payload["data"]
    runs = data["eval"] if "eval" in data else data
    return {key: {"final_task_accuracy": sum(h["end_accuracy"][-1] for h in hs) / len(hs),
                  "mean_online_accuracy": sum(sum(h["online_accuracy"]) / len(h["online_accuracy"]) for h in hs) / len(hs)
                  if all(h.get("online_accuracy") for h in hs) else math.nan}
            for key, hs in runs.items()}
