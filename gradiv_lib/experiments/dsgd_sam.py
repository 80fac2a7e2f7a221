r"""D-SGD vs C-SGD vs SAM vs average-direction SAM at a large total batch: generalisation, best against best (chapter 6).

Zhu et al. (ICML 2023) show that decentralized SGD (D-SGD) follows average-direction SAM to second order and report
that it generalises better than centralized SGD (C-SGD) at large total batch sizes. This module measures that claim
on MNIST-1D (:func:`gradiv_lib.data.load_mnist1d`, harder than digits: a small MLP overfits it), with every method
tuned on its own grid:

* ``csgd`` — mini-batch SGD, one model (:class:`gradiv_lib.workers.MinibatchSGD` in the stacked simulator);
* ``dsgd_ring`` / ``dsgd_exponential`` — D-SGD with :math:`K` workers on a ring / an exponential graph
  (:class:`gradiv_lib.workers.DSGD`); the evaluated model is the workers' average;
* ``sam`` — SAM (:class:`gradiv_lib.sharpness.SAM`, radius :math:`\rho`) on one model;
* ``adsam`` — average-direction SAM (:class:`gradiv_lib.sharpness.AverageDirectionSAM`, isotropic
  :math:`\sigma`, ``adsam_samples`` perturbations per step, antithetic) on one model.

All methods see the same batches: seed ``s`` fixes the initialisation, the i.i.d. split of the training set into
:math:`K` shards and every shard's batch order (:class:`gradiv_lib.workers.ShardSampler`); the single-model methods
take the union of the :math:`K` workers' batches (the same total batch) at every step, so ``sam`` with
:math:`\rho = 0` *is* ``csgd``. The same number of steps for all; no momentum, no weight decay, a constant learning
rate (as in Zhu et al.'s SGD runs, without their decay).

Tuning: each method's grid (learning rate, and :math:`\rho` or :math:`\sigma`) is run for every seed; the
configuration with the best mean *validation* accuracy (a held-out part of the training set) wins; when the winner
sits on an edge of its grid the grid is extended one step beyond that edge (up to ``max_extensions`` times per
method), so every grid ends centred on its own best unless the extension limit is hit (``at_edge`` says so).
Test accuracy is reported for the winner, with min, max and standard deviation over the seeds, together with its
final training loss and the top Hessian eigenvalue of the training loss (:func:`gradiv_lib.sharpness.hessian_top_eigenvalue`
on a fixed subset of the training set). Sensitivity: for every method, the contiguous range of its key
hyper-parameter (at the tuned learning rate) and of its learning rate (at the tuned key value) whose mean test
accuracy beats tuned C-SGD's.

From the command line: ``gradiv dsgd-sam`` (quick, seconds) or ``gradiv dsgd-sam --book`` (the book's run, about
13 minutes on a shared 2-core CPU).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models, results, sharpness, workers
from ..data import InMemoryData, load_mnist1d, partition_iid
from . import with_overrides

__all__ = ["CONFIGS", "KEY", "METHODS", "check_config", "load_data", "run", "run_one", "sensitivity", "summarize", "sweep"]

#: The methods and the name of each one's key hyper-parameter (besides the learning rate; ``None``: none).
KEY: dict[str, str | None] = {"csgd": None, "dsgd_ring": None, "dsgd_exponential": None, "sam": "rho", "adsam": "sigma"}
METHODS: tuple[str, ...] = tuple(KEY)


def _geometric(start: float, factor: float, n: int) -> list[float]:
    return [float(f"{start * factor ** i:.4g}") for i in range(n)]


#: Settings per mode; :func:`run` accepts overrides of any key.
CONFIGS: dict[str, dict[str, Any]] = {
    "book": dict(
        num_samples=6000, data_seed=42, val_size=800, width=64, depth=3, n_workers=16, local_batch=32, steps=800,
        seeds=[0, 1, 2], adsam_samples=2, max_extensions=3, sharpness_samples=1000, sharpness_iters=20,
        methods=list(METHODS),
        # Placed after a first sweep (grids an octave lower) whose C-SGD and ADSAM winners sat on the top edge after
        # two extensions. Learning rates in steps of sqrt 2 for C-SGD and D-SGD, of 2 for the two-dimensional grids.
        grids={
            "csgd": {"lr": _geometric(0.8, 2 ** 0.5, 7)},
            "dsgd_ring": {"lr": _geometric(0.4, 2 ** 0.5, 5)},
            "dsgd_exponential": {"lr": _geometric(0.4, 2 ** 0.5, 5)},
            "sam": {"lr": _geometric(0.8, 2.0, 3), "rho": _geometric(0.1, 2.0, 4)},
            "adsam": {"lr": _geometric(1.6, 2.0, 3), "sigma": _geometric(0.02, 2.0, 4)},
        },
    ),
    "quick": dict(
        num_samples=1000, data_seed=42, val_size=200, width=32, depth=3, n_workers=8, local_batch=16, steps=60,
        seeds=[0], adsam_samples=2, max_extensions=0, sharpness_samples=200, sharpness_iters=5,
        methods=list(METHODS),
        grids={
            "csgd": {"lr": [0.2, 0.4]},
            "dsgd_ring": {"lr": [0.4]},
            "dsgd_exponential": {"lr": [0.4]},
            "sam": {"lr": [0.4], "rho": [0.05, 0.1]},
            "adsam": {"lr": [0.4], "sigma": [0.01, 0.02]},
        },
    ),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive_list(values: Any, name: str) -> None:
    if (not isinstance(values, (list, tuple)) or not values
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf for v in values)):
        raise ValueError(f"{name} must be a non-empty list of finite numbers > 0, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat values, got {values!r}")


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a configuration (all keys of :data:`CONFIGS`); returns it with grids sorted. Raises ``ValueError``
    naming the setting, its value and what is valid."""
    missing = set(CONFIGS["book"]) - set(config)
    if missing:
        raise ValueError(f"configuration lacks {sorted(missing)}")
    unknown = set(config) - set(CONFIGS["book"])
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; valid: {sorted(CONFIGS['book'])}")
    for key, low in (("num_samples", 20), ("val_size", 1), ("width", 1), ("depth", 2), ("n_workers", 1),
                     ("local_batch", 1), ("steps", 1), ("adsam_samples", 1), ("sharpness_samples", 1),
                     ("sharpness_iters", 1), ("max_extensions", 0), ("data_seed", 0)):
        if not _is_int(config[key]) or config[key] < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {config[key]!r}")
    if config["num_samples"] % 10:
        raise ValueError(f"num_samples must be a multiple of 10 (MNIST-1D has equal classes), got {config['num_samples']}")
    n_train = int(config["num_samples"] * 0.8) - config["val_size"]
    if n_train < config["n_workers"] * config["local_batch"]:
        raise ValueError(f"val_size={config['val_size']} leaves {n_train} training samples, fewer than n_workers x "
                         f"local_batch = {config['n_workers'] * config['local_batch']}; lower val_size or the batch")
    seeds = config["seeds"]
    if not isinstance(seeds, (list, tuple)) or not seeds or any(not _is_int(s) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    methods = config["methods"]
    if not isinstance(methods, (list, tuple)) or not methods or any(m not in KEY for m in methods) \
            or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list of distinct names from {list(METHODS)}, got {methods!r}")
    if "csgd" not in methods:
        raise ValueError(f"methods must include 'csgd' (the baseline the others are compared with), got {methods!r}")
    grids = config["grids"]
    if not isinstance(grids, dict):
        raise ValueError(f"grids must be a dict method -> {{'lr': [...], key: [...]}}, got {type(grids).__name__}")
    out = dict(config, grids={})
    for m in methods:
        if m not in grids:
            raise ValueError(f"grids has no entry for method {m!r}")
        want = {"lr"} | ({KEY[m]} if KEY[m] else set())
        if set(grids[m]) != want:
            raise ValueError(f"grids[{m!r}] must have exactly the keys {sorted(want)}, got {sorted(grids[m])}")
        for k in sorted(want):
            _positive_list(grids[m][k], f"grids[{m!r}][{k!r}]")
        out["grids"][m] = {k: sorted(float(v) for v in grids[m][k]) for k in sorted(want)}
    return out


def load_data(config: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, InMemoryData]:
    """MNIST-1D (flat, for MLPs): ``train``, ``val`` (the last ``val_size`` samples of the generated training split)
    and ``test``."""
    train, test = load_mnist1d(config["num_samples"], seed=config["data_seed"], channels=False, device=device)
    n = len(train) - config["val_size"]
    return {"train": InMemoryData(train.x[:n], train.y[:n], train.info),
            "val": InMemoryData(train.x[n:], train.y[n:], train.info), "test": test}


@torch.no_grad()
def _evaluate(model: nn.Module, data: InMemoryData) -> tuple[float, float]:
    out = model(data.x)
    return float(F.cross_entropy(out, data.y)), float((out.argmax(1) == data.y).float().mean())


def _train_single(model: nn.Module, method: str, lr: float, key: float | None, seed: int, train: InMemoryData,
                  partition: list[torch.Tensor], config: dict[str, Any]) -> nn.Module | None:
    """SAM or average-direction SAM on one model, on the union of the K workers' batches; ``None`` if diverged."""
    if method == "sam":
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=key, lr=lr)
    else:
        opt = sharpness.AverageDirectionSAM(model.parameters(), torch.optim.SGD, sigma=key, samples=config["adsam_samples"],
                                            seed=seed, lr=lr)
    sampler = workers.ShardSampler(partition, config["local_batch"], seed=seed)
    steps, chunk = config["steps"], 256
    for start in range(0, steps, chunk):
        index = sampler.indices(start, min(start + chunk, steps)).to(train.x.device)   # (T, K, B)
        for t in range(index.shape[0]):
            i = index[t].reshape(-1)
            xb, yb = train.x[i], train.y[i]

            def closure() -> torch.Tensor:
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            loss = opt.step(closure)
            if not math.isfinite(float(loss.detach())):
                return None
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return None
    return model


def run_one(method: str, lr: float, key: float | None, seed: int, data: dict[str, InMemoryData],
            config: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration and measure it: validation/test accuracy and loss, final full training loss and
    accuracy, top Hessian eigenvalue on the first ``sharpness_samples`` training samples, and (D-SGD) the final
    consensus distance. A run whose loss becomes non-finite is reported with ``diverged: True`` and NaNs."""
    if method not in KEY:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    train = data["train"]
    model = models.mlp(train.x.shape[1], config["width"], config["depth"], 10, init="he", seed=seed)
    K = config["n_workers"]
    partition = partition_iid(len(train), K, seed=seed)
    row: dict[str, Any] = {"method": method, "lr": lr, "key": key, "seed": seed, "diverged": False, "consensus": None}
    final: nn.Module | None
    if method in ("csgd", "dsgd_ring", "dsgd_exponential"):
        algorithm = (workers.MinibatchSGD() if method == "csgd" else
                     workers.DSGD(workers.ring(K) if method == "dsgd_ring" else workers.exponential(K)))
        sim = workers.Simulator(model, train, algorithm, workers.SGD(lr), n_workers=K, partition=partition,
                                batch_size=config["local_batch"], seed=seed, backend="bmm")
        try:
            sim.run(config["steps"], record_every=0)
            final = sim.model() if bool(torch.isfinite(sim.params).all()) else None
        except FloatingPointError:
            final = None
        if final is not None and method != "csgd":
            row["consensus"] = sim.consensus_distance()
    else:
        final = _train_single(copy.deepcopy(model), method, lr, key, seed, train, partition, config)
    nan = float("nan")
    if final is None:
        row.update(diverged=True, val_accuracy=nan, test_accuracy=nan, test_loss=nan, train_loss=nan,
                   train_accuracy=nan, lambda_max=nan)
        return row
    final.eval()
    _, row["val_accuracy"] = _evaluate(final, data["val"])
    row["test_loss"], row["test_accuracy"] = _evaluate(final, data["test"])
    row["train_loss"], row["train_accuracy"] = _evaluate(final, train)
    if not math.isfinite(row["train_loss"]):
        row.update(diverged=True, val_accuracy=nan, test_accuracy=nan, lambda_max=nan)
        return row
    n = config["sharpness_samples"]
    eig = sharpness.hessian_top_eigenvalue(final, F.cross_entropy, train.x[:n], train.y[:n],
                                           iters=config["sharpness_iters"], tol=1e-3, seed=0)
    row["lambda_max"] = eig.eigenvalue
    return row


def _table(rows: list[dict[str, Any]], method: str) -> dict[tuple[float, float | None], list[dict[str, Any]]]:
    table: dict[tuple[float, float | None], list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] == method:
            table.setdefault((r["lr"], r["key"]), []).append(r)
    return table


def _mean(rows: list[dict[str, Any]], field: str) -> float:
    """Mean over seeds; a diverged run counts as accuracy 0 (so diverging configurations never win)."""
    values = [0.0 if (r["diverged"] and field.endswith("accuracy")) else r[field] for r in rows]
    return float(np.mean(values))


def _best(rows: list[dict[str, Any]], method: str) -> tuple[float, float | None]:
    table = _table(rows, method)
    return max(table, key=lambda c: (_mean(table[c], "val_accuracy"), -c[0]))


def _extend(grid: list[float], value: float) -> float | None:
    """The next grid point beyond the edge ``value`` sits on (same ratio as the two nearest points), else None."""
    if len(grid) < 2:
        return None
    if value == grid[-1]:
        return float(f"{grid[-1] * grid[-1] / grid[-2]:.4g}")
    if value == grid[0]:
        return float(f"{grid[0] * grid[0] / grid[1]:.4g}")
    return None


def sweep(config: dict[str, Any], data: dict[str, InMemoryData], *, progress: bool = False,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every method's grid over every seed, with edge extensions; returns ``{"runs": [...], "grids": {...},
    "extensions": {...}}`` (the final grids)."""
    from tqdm.auto import tqdm

    config = check_config(config)
    rows: list[dict[str, Any]] = []
    grids = {m: {k: list(v) for k, v in config["grids"][m].items()} for m in config["methods"]}
    extensions = {m: 0 for m in config["methods"]}
    bar = tqdm(disable=not progress, desc="dsgd-sam runs", unit="run")

    def run_points(method: str, points: list[tuple[float, float | None]]) -> None:
        for seed in config["seeds"]:
            for lr, key in points:
                start = time.perf_counter()
                row = run_one(method, lr, key, seed, data, config)
                row["seconds"] = round(time.perf_counter() - start, 3)
                rows.append(row)
                bar.update(1)
                if log is not None:
                    log(f"{method} lr={lr:g} {KEY[method] or ''}={key} seed={seed}: val {row['val_accuracy']:.3f} "
                        f"test {row['test_accuracy']:.3f} ({row['seconds']:.1f} s)")

    for method in config["methods"]:
        key_name = KEY[method]
        keys = grids[method][key_name] if key_name else [None]
        run_points(method, [(lr, k) for lr in grids[method]["lr"] for k in keys])
        while extensions[method] < config["max_extensions"]:
            lr, key = _best(rows, method)
            new_lr = _extend(grids[method]["lr"], lr)
            new_key = _extend(grids[method][key_name], key) if key_name else None
            if new_lr is None and new_key is None:
                break
            points = []
            if new_lr is not None:
                grids[method]["lr"] = sorted(grids[method]["lr"] + [new_lr])
                points += [(new_lr, k) for k in (grids[method][key_name] if key_name else [None])]
            if new_key is not None:
                grids[method][key_name] = sorted(grids[method][key_name] + [new_key])
                points += [(lr_, new_key) for lr_ in grids[method]["lr"]]
            run_points(method, points)
            extensions[method] += 1
    bar.close()
    return {"runs": rows, "grids": grids, "extensions": extensions}


def _contiguous_range(values: list[float], good: list[bool], centre: float) -> dict[str, Any]:
    """The contiguous run of ``good`` grid values around ``centre``: lo, hi, hi/lo and the number of points."""
    i = values.index(centre)
    if not good[i]:
        return {"lo": None, "hi": None, "ratio": 0.0, "points": 0}
    a = b = i
    while a > 0 and good[a - 1]:
        a -= 1
    while b < len(values) - 1 and good[b + 1]:
        b += 1
    return {"lo": values[a], "hi": values[b], "ratio": values[b] / values[a], "points": b - a + 1,
            "touches_edge": a == 0 or b == len(values) - 1}


def sensitivity(rows: list[dict[str, Any]], grids: dict[str, dict[str, list[float]]], tuned: dict[str, dict[str, Any]],
                baseline: float) -> dict[str, dict[str, Any]]:
    """For each method, the contiguous range of its key hyper-parameter (at the tuned learning rate) and of its
    learning rate (at the tuned key) around the tuned values whose mean test accuracy beats ``baseline``."""
    out: dict[str, dict[str, Any]] = {}
    for method, t in tuned.items():
        table = _table(rows, method)
        lrs = grids[method]["lr"]
        beats_lr = [(lr, t["key"]) in table and _mean(table[(lr, t["key"])], "test_accuracy") > baseline for lr in lrs]
        entry = {"lr": _contiguous_range(lrs, beats_lr, t["lr"])}
        key_name = KEY[method]
        if key_name:
            keys = grids[method][key_name]
            beats = [(t["lr"], k) in table and _mean(table[(t["lr"], k)], "test_accuracy") > baseline for k in keys]
            entry[key_name] = _contiguous_range(keys, beats, t["key"])
        out[method] = entry
    return out


def summarize(sweep_result: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Tuned configuration per method (best mean validation accuracy) and its test accuracy, losses, sharpness
    and consensus distance over the seeds (mean, min, max, std); the sensitivity widths against tuned C-SGD."""
    rows, grids = sweep_result["runs"], sweep_result["grids"]
    tuned: dict[str, dict[str, Any]] = {}
    for method in methods:
        lr, key = _best(rows, method)
        runs = _table(rows, method)[(lr, key)]
        key_name = KEY[method]
        at_edge = lr in (grids[method]["lr"][0], grids[method]["lr"][-1]) or (
            key_name is not None and key in (grids[method][key_name][0], grids[method][key_name][-1]))
        t: dict[str, Any] = {"lr": lr, "key": key, "key_name": key_name, "at_edge": bool(at_edge),
                             "seeds": [r["seed"] for r in runs], "diverged": sum(r["diverged"] for r in runs)}
        for field in ("val_accuracy", "test_accuracy", "test_loss", "train_loss", "train_accuracy", "lambda_max",
                      "consensus"):
            values = [r[field] for r in runs if r[field] is not None and not r["diverged"]]
            if values:
                t[field] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
                            "std": float(np.std(values)), "values": [float(v) for v in values]}
            else:
                t[field] = None
        tuned[method] = t
    baseline = tuned["csgd"]["test_accuracy"]["mean"]
    return {"tuned": tuned, "baseline_test_accuracy": baseline,
            "sensitivity": sensitivity(rows, grids, {m: tuned[m] for m in methods if m != "csgd"}, baseline)}


def run(mode: str = "quick", *, seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None,
        out: str | Path | None = None, name: str | None = None, device: str | torch.device = "cpu",
        progress: bool = True, log: Callable[[str], None] | None = None, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    """Run the comparison of a mode (``"quick"`` or ``"book"``) and save it with :func:`gradiv_lib.results.save` as
    ``ch06/<name>`` (default ``dsgd_sam_mnist1d`` for the book's run, ``dsgd_sam_mnist1d_quick`` otherwise).

    ``overrides`` replace any key of the mode's configuration (``steps``, ``grids``, ...). Returns the path and the
    saved payload (``data``: ``runs``, ``grids``, ``extensions``, ``summary``)."""
    import json

    if mode not in CONFIGS:
        raise ValueError(f"mode must be one of {list(CONFIGS)}, got {mode!r}")
    config = copy.deepcopy(CONFIGS[mode])
    with_overrides(config, overrides, seeds)
    if methods is not None:
        config["methods"] = list(methods)
    config = check_config(config)
    start = time.perf_counter()
    data = load_data(config, device=device)
    result = sweep(config, data, progress=progress, log=log)
    result["summary"] = summarize(result, config["methods"])
    seconds = time.perf_counter() - start
    default = "dsgd_sam_mnist1d" + ("" if mode == "book" else f"_{mode}")
    path = results.save(f"ch06/{name or default}", result, config=config, seconds=seconds, device=device, root=out)
    return path, json.loads(path.read_text())
