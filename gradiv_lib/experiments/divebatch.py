"""DiveBatch vs SGD (small and large batch) vs AdaBatch: the chapter-4 comparison (quick and full).

* **Quick** (default, ``dataset="digits"``, seconds on a CPU): scikit-learn digits, standardised
  with the training statistics; MLP 64-64-10; SGD with momentum 0.9; :math:`B_0 = 16`,
  :math:`B_{\\max} = 512`, :math:`\\eta_0 = 0.05`, resize every 4 epochs, 20 epochs; steps, samples and
  seconds to 98 % test accuracy, three seeds, the test set evaluated every 5 optimizer steps (every step for
  the large batch). This is what the book runs and the tests check.
* **MNIST-1D** (``dataset="mnist1d"``, about 15 minutes on one CPU thread): a harder problem, each method
  with its own learning rate. MNIST-1D (:func:`gradiv_lib.data.load_mnist1d`, 8000 samples generated
  offline: 4000 for training, 2000 for validation, 2000 for the test); a 1-D CNN
  (:func:`gradiv_lib.models.cnn1d`, 3 stride-2 convolutions of 32 channels); SGD with momentum 0.9, 30 epochs;
  batch 32 → 1024, resize every 5 epochs. For every method a learning-rate grid with ×2 steps centred on its
  own scale, three seeds per rate; the rate with the best median final *validation* accuracy is that
  method's; time to 90 % *test* accuracy is measured with the test set evaluated every 5 steps (every step
  for the large batch). DiveBatch runs with both of the authors' shipped :math:`\\delta` (0.01 for
  CIFAR-100 and Tiny-ImageNet, 0.1 for CIFAR-10).
* **Full** (``full=True``, ``dataset="cifar10"`` or ``"cifar100"``, a GPU, hours): the protocol of
  the DiveBatch authors' code (``chenyuen0103/pytorch-cifar``, ``src/exp_config*.json``): ResNet-18
  (BatchNorm), SGD momentum 0.9, weight decay 5e-4, learning rate 0.1, random crop + flip, 200 epochs;
  CIFAR-10 with cosine annealing (:math:`T_{\\max} = 200`), DiveBatch :math:`\\delta = 0.1`; CIFAR-100 with
  MultiStepLR([60, 120, 160], 0.2), :math:`\\delta = 0.01` (the code's one-epoch warm-up is not
  reproduced: its warm-up scheduler sets the rate to 0 and the DiveBatch trainer never steps it, so the
  authors' first CIFAR-100 epoch trains at learning rate 0). Batch 128 → 2048, resize every 20 epochs; baselines SGD B = 128 (lr 0.1), SGD B = 2048
  (lr 1.6) and AdaBatch (×2 every 20 epochs), AdaBatch and DiveBatch each without and with the linear
  learning-rate rescale (``--adaptive_lr``). Each run checkpoints after every epoch, so an interrupted
  run resumes where it stopped.

Differences from the authors' code, on purpose: per-sample norms come from
:class:`gradiv_lib.norms.DiversityMeter`; for BatchNorm networks they are taken in an extra forward and
backward pass with BatchNorm in eval mode (the code switches BN to eval between its forward and its
BackPACK backward), only in measurement epochs; a ragged last batch is weighted correctly.

From the command line: ``gradiv divebatch`` (quick), ``gradiv divebatch --dataset mnist1d`` (the tuned
comparison) or ``gradiv divebatch --full --dataset cifar10 --root DIR``.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import batching, data as gdata, models, results
from . import with_overrides
from ..training import History, evaluate, train

__all__ = ["CONFIGS", "METHODS", "QUICK", "digits_standardized", "eval_every_for", "load_data", "make_model",
           "make_schedule", "mnist1d_splits", "pick_learning_rates", "run", "run_method", "summarize"]

#: Methods of the comparison: schedule kind, its arguments (filled from the config) and the learning rate.
METHODS: dict[str, dict[str, Any]] = {
    "sgd_small": {"kind": "fixed", "batch": "initial"},
    "sgd_large": {"kind": "fixed", "batch": "max", "lr_rule": "linear"},
    "adabatch": {"kind": "adabatch", "lr_rule": "none"},
    "adabatch_linear": {"kind": "adabatch", "lr_rule": "linear"},
    "divebatch": {"kind": "divebatch", "lr_rule": "none"},
    "divebatch_sqrt": {"kind": "divebatch", "lr_rule": "sqrt"},
    "divebatch_linear": {"kind": "divebatch", "lr_rule": "linear"},
    "divebatch_delta0.1": {"kind": "divebatch", "lr_rule": "none", "delta": 0.1},
}

#: Data sets of the quick (CPU) modes; the others are the full protocol.
QUICK = ("digits", "mnist1d")

#: Settings per mode; ``run`` accepts overrides of any key.
CONFIGS: dict[str, dict[str, Any]] = {
    "digits": dict(
        dataset="digits", num_classes=10, model="mlp 64-64-10", epochs=20, initial_batch_size=16, max_batch_size=512, lr=0.05,
        momentum=0.9, weight_decay=0.0, lr_scheduler="constant", delta=0.1, resize_every=4, lr_cap=None,
        target_accuracy=0.98, seeds=[0, 1, 2], augment=False, eval_every=5,
        methods=["sgd_small", "sgd_large", "adabatch_linear", "divebatch", "divebatch_sqrt", "divebatch_linear"],
    ),
    "mnist1d": dict(
        dataset="mnist1d", num_classes=10, model="cnn1d 32x3 (kernel 5, stride 2)", n_samples=8000, n_train=4000,
        n_validation=2000, n_test=2000, data_seed=42, epochs=30, initial_batch_size=32, max_batch_size=1024,
        momentum=0.9, weight_decay=0.0, lr_scheduler="constant", delta=0.01, resize_every=5, lr_cap=None,
        target_accuracy=0.9, seeds=[0, 1, 2], augment=False, eval_every=5,
        methods=["sgd_small", "sgd_large", "adabatch", "divebatch", "divebatch_delta0.1"],
        lr_grid={"sgd_small": [0.00625, 0.0125, 0.025, 0.05, 0.1], "sgd_large": [0.1, 0.2, 0.4, 0.8, 1.6],
                 # one ×2 step higher for the adaptive methods: a first sweep on 0.00625-0.1 chose its top, 0.1, for all
                 # three (the grown batch tolerates a rate at which B = 32 fails), so their scale is larger
                 "adabatch": [0.0125, 0.025, 0.05, 0.1, 0.2], "divebatch": [0.0125, 0.025, 0.05, 0.1, 0.2],
                 "divebatch_delta0.1": [0.0125, 0.025, 0.05, 0.1, 0.2]},
        select_on="median final validation accuracy",
    ),
    "cifar10": dict(
        dataset="cifar10", num_classes=10, model="resnet18 (BatchNorm)", epochs=200, initial_batch_size=128, max_batch_size=2048,
        lr=0.1, momentum=0.9, weight_decay=5e-4, lr_scheduler="cosine", delta=0.1, resize_every=20, lr_cap=None,
        target_accuracy=0.9, seeds=[0], augment=True,
        methods=["sgd_small", "sgd_large", "adabatch", "adabatch_linear", "divebatch", "divebatch_linear"],
    ),
    "cifar100": dict(
        dataset="cifar100", num_classes=100, model="resnet18 (BatchNorm)", epochs=200, initial_batch_size=128, max_batch_size=2048,
        lr=0.1, momentum=0.9, weight_decay=5e-4, lr_scheduler="multistep 60,120,160 x0.2", delta=0.01,
        # the batch rule of the authors' final CIFAR-100 train.py (floor(δ N Δ̂), δ = 0.01), not their early ratio rule
        # (batching.DiveBatch rule="cifar100_ratio"); its --adaptive_lr runs applied the step factor twice
        # (batching.cifar100_code_lr: 0.04 per milestone), here the linear rescale rides the 0.2 schedule once
        divebatch_rule="cifar10",
        resize_every=20, lr_cap=None, target_accuracy=0.7, seeds=[0], augment=True,
        methods=["sgd_small", "sgd_large", "adabatch", "adabatch_linear", "divebatch", "divebatch_linear"],
    ),
}


def digits_standardized(seed: int = 0, device: torch.device | str = "cpu") -> tuple[gdata.InMemoryData, gdata.InMemoryData]:
    """Digits, stratified 80/20 split, each feature standardised with the training mean and std."""
    train_data, test_data = gdata.load_digits(seed=seed, stratify=True, device=device)
    mean = train_data.x.mean(0)
    std = train_data.x.std(0).clamp_min(1e-3)
    return (gdata.InMemoryData((train_data.x - mean) / std, train_data.y, train_data.info),
            gdata.InMemoryData((test_data.x - mean) / std, test_data.y, test_data.info))


def make_schedule(method: str, config: dict[str, Any], lr: float | None = None) -> tuple[batching.BatchSchedule, float]:
    """The schedule of ``method`` and its initial learning rate under ``config``.

    Without ``lr`` the config's ``lr`` is the small-batch rate (large-batch SGD gets it scaled linearly); a
    given ``lr`` is the method's own rate, used as it is (the tuned comparison).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    spec = METHODS[method]
    b0, bmax = config["initial_batch_size"], config["max_batch_size"]
    if lr is None:
        if "lr" not in config:
            raise ValueError(f"config {config.get('dataset')!r} has no shared lr; pass the method's own lr=...")
        lr = config["lr"]
        if spec["kind"] == "fixed" and spec["batch"] == "max":
            lr = lr * bmax / b0
    if spec["kind"] == "fixed":
        return batching.FixedBatch(bmax if spec["batch"] == "max" else b0), lr
    if spec["kind"] == "adabatch":
        return batching.AdaBatch(b0, bmax, resize_every=config["resize_every"], lr_rule=spec["lr_rule"],
                                 lr_cap=config["lr_cap"]), lr
    return batching.DiveBatch(b0, bmax, rule=config.get("divebatch_rule", "cifar10"),
                              delta=spec.get("delta", config["delta"]), resize_every=config["resize_every"],
                              lr_rule=spec["lr_rule"], lr_cap=config["lr_cap"]), lr


def _lr_scheduler(config: dict[str, Any]) -> Any:
    name = config["lr_scheduler"]
    if name in ("constant", "cosine"):
        return name
    if name.startswith("multistep"):
        _, milestones, gamma = name.split()
        steps = [int(m) for m in milestones.split(",")]
        factor = float(gamma.lstrip("x"))
        return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=factor)
    raise ValueError(f"unknown lr_scheduler {name!r}")


def mnist1d_splits(config: dict[str, Any] | None = None, device: torch.device | str = "cpu"
                   ) -> tuple[gdata.InMemoryData, gdata.InMemoryData, gdata.InMemoryData]:
    """MNIST-1D (generated offline) split into training, validation and test sets as ``config`` says.

    ``load_mnist1d(n_samples, seed=data_seed, train_split=n_train / n_samples)``; its held-out part is cut
    into the first ``n_validation`` samples (learning-rate selection) and the next ``n_test`` (reporting).
    """
    config = CONFIGS["mnist1d"] if config is None else config
    n, n_train, n_val, n_test = config["n_samples"], config["n_train"], config["n_validation"], config["n_test"]
    if n_train + n_val + n_test != n:
        raise ValueError(f"n_train + n_validation + n_test must equal n_samples ({n_train} + {n_val} + {n_test} != {n})")
    train_data, held = gdata.load_mnist1d(n, seed=config["data_seed"], train_split=n_train / n, device=device)
    if len(train_data) != n_train:
        raise ValueError(f"n_train={n_train} of n_samples={n} is not a split load_mnist1d can make exactly")
    val = gdata.InMemoryData(held.x[:n_val], held.y[:n_val], dict(held.info, split="validation"))
    test = gdata.InMemoryData(held.x[n_val:n_val + n_test], held.y[n_val:n_val + n_test], dict(held.info, split="test"))
    return train_data, val, test


def load_data(config: dict[str, Any], root: str | Path | None, device: torch.device, download: bool = False
              ) -> tuple[gdata.InMemoryData, gdata.InMemoryData, Callable[..., Any] | None]:
    """Training data, test data and the augmentation of a config."""
    dataset = config["dataset"]
    if dataset == "digits":
        train_data, test_data = digits_standardized(device=device)
        return train_data, test_data, None
    if dataset == "mnist1d":
        train_data, _, test_data = mnist1d_splits(config, device=device)
        return train_data, test_data, None
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs root=... (--root PATH), the folder that holds the data set")
    if dataset == "cifar10":
        mean, std = gdata.CIFAR10_MEAN, gdata.CIFAR10_STD_KUANGLIU
        load = gdata.load_cifar10
    else:
        mean, std = gdata.CIFAR100_MEAN, gdata.CIFAR100_STD
        load = gdata.load_cifar100
    train_data = load(root, train=True, download=download, std=std, device=device)
    test_data = load(root, train=False, download=download, std=std, device=device)
    fill = [-m / s for m, s in zip(mean, std)]  # torchvision pads the raw image with black

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return gdata.augment_batch(x, generator=generator, padding=4, flip=True, fill=fill)

    return train_data, test_data, augment if config["augment"] else None


def make_model(config: dict[str, Any], seed: int) -> torch.nn.Module:
    """The network of a config, initialised with ``seed``."""
    if config["dataset"] == "digits":
        return models.mlp(64, 64, 2, config["num_classes"], seed=seed)
    if config["dataset"] == "mnist1d":
        return models.cnn1d(1, 32, 3, config["num_classes"], 40, kernel_size=5, seed=seed)
    return models.resnet18_cifar(num_classes=config["num_classes"], norm="batch", seed=seed)


def eval_every_for(method: str, config: dict[str, Any]) -> int | None:
    """Steps between test evaluations for ``method``: the config's ``eval_every`` for the methods that start at
    :math:`B_0`, and ``eval_every * B0 / B_max`` (at least 1) for large-batch SGD, whose steps are that much
    larger; ``None`` (epoch ends only) when the config has no ``eval_every``."""
    every = config.get("eval_every")
    if every is None:
        return None
    spec = METHODS[method]
    if spec["kind"] == "fixed" and spec["batch"] == "max":
        return max(1, every * config["initial_batch_size"] // config["max_batch_size"])
    return every


def run_method(method: str, config: dict[str, Any], seed: int, train_data: gdata.InMemoryData,
               test_data: gdata.InMemoryData, *, lr: float | None = None, transform: Callable[..., Any] | None = None,
               device: torch.device | str = "cpu", checkpoint_path: str | Path | None = None,
               progress: bool = False, on_nonfinite: str = "stop") -> History:
    """Train one method with one seed under ``config`` (with its own ``lr`` if given, see :func:`make_schedule`);
    returns its :class:`~gradiv_lib.training.History`."""
    schedule, lr = make_schedule(method, config, lr)
    model = make_model(config, seed)
    return train(model, train_data, schedule=schedule, epochs=config["epochs"], lr=lr, momentum=config["momentum"],
                 weight_decay=config["weight_decay"], lr_scheduler=_lr_scheduler(config), test_data=test_data,
                 target_accuracy=config["target_accuracy"], transform=transform, device=device, seed=seed,
                 eval_every=eval_every_for(method, config), eval_batch_size=2048,
                 checkpoint_path=checkpoint_path, on_nonfinite=on_nonfinite, progress=progress)


def summarize(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians over seeds per method: final test accuracy, total steps, steps/samples/seconds to target."""
    summary = {}
    for method, by_seed in runs.items():
        histories = [History.from_dict(h) for h in by_seed.values()]

        def med(values: Sequence[float | None]) -> float:
            finite = [math.inf if v is None else float(v) for v in values]
            return float(np.median(finite)) if finite else math.nan

        row = {
            "final_test_accuracy": [h.test_accuracy[-1] for h in histories],
            "total_steps": [h.steps[-1] for h in histories],
            "final_batch_size": [h.batch_size[-1] for h in histories],
            "steps_to_target": [h.steps_to_target for h in histories],
            "samples_to_target": [h.samples_to_target for h in histories],
            "seconds_to_target": [h.seconds_to_target for h in histories],
        }
        summary[method] = {key: med(values) for key, values in row.items()}
        # bands over seeds (inf: a seed never reached the target)
        summary[method].update({f"{key}_min": float(min(math.inf if v is None else v for v in values))
                                for key, values in row.items()})
        summary[method].update({f"{key}_max": float(max(math.inf if v is None else v for v in values))
                                for key, values in row.items()})
        summary[method]["reached_target"] = sum(h.reached_target for h in histories) / len(histories)
    return summary


def _compact(history: History) -> dict[str, Any]:
    """A history as a dictionary with its step-granular lists rounded (accuracy is a multiple of 1/n_test already;
    losses to 5 significant digits, seconds to 0.1 ms): a smaller JSON, the same numbers to the book's precision."""
    d = history.to_dict()
    d["eval_test_loss"] = [float(f"{v:.5g}") for v in d["eval_test_loss"]]
    d["eval_test_accuracy"] = [round(v, 6) for v in d["eval_test_accuracy"]]
    d["eval_seconds"] = [round(v, 4) for v in d["eval_seconds"]]
    return d


def pick_learning_rates(grid: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Per method the learning rate with the highest median over seeds of the final validation accuracy (ties: the
    smaller rate). ``grid[method][lr][seed]`` holds at least ``"final_validation_accuracy"``."""
    chosen = {}
    for method, by_lr in grid.items():
        scores = {float(lr): float(np.median([r["final_validation_accuracy"] for r in by_seed.values()]))
                  for lr, by_seed in by_lr.items()}
        best = max(scores.values())
        chosen[method] = min(lr for lr, score in scores.items() if score == best)
    return chosen


def _run_tuned(config: dict[str, Any], device: torch.device, progress: bool) -> dict[str, Any]:
    """The tuned comparison: every (method, lr, seed) of the grid; full histories for each method's chosen lr."""
    train_data, val_data, test_data = mnist1d_splits(config, device=device)
    grid: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    histories: dict[str, dict[str, dict[str, Any]]] = {}
    for method in config["methods"]:
        for lr in config["lr_grid"][method]:
            for seed in config["seeds"]:
                schedule, _ = make_schedule(method, config, lr)
                model = make_model(config, seed)
                h = train(model, train_data, schedule=schedule, epochs=config["epochs"], lr=lr,
                          momentum=config["momentum"], weight_decay=config["weight_decay"],
                          lr_scheduler=_lr_scheduler(config), test_data=test_data,
                          target_accuracy=config["target_accuracy"], seed=seed, device=device,
                          eval_every=eval_every_for(method, config), eval_batch_size=2048, on_nonfinite="stop",
                          progress=False)
                _, val_accuracy = (math.nan, math.nan) if h.diverged else evaluate(model, val_data, batch_size=2048)
                grid.setdefault(method, {}).setdefault(repr(lr), {})[str(seed)] = {
                    "final_validation_accuracy": val_accuracy, "final_test_accuracy": h.test_accuracy[-1],
                    "steps_to_target": h.steps_to_target, "samples_to_target": h.samples_to_target,
                    "seconds_to_target": h.seconds_to_target, "total_steps": h.steps[-1],
                    "final_batch_size": h.batch_size[-1], "diverged": h.diverged,
                }
                histories.setdefault(method, {}).setdefault(repr(lr), {})[str(seed)] = _compact(h)
                if progress:
                    print(f"{method:20s} lr {lr:<8g} seed {seed}: val {val_accuracy:.4f} test {h.test_accuracy[-1]:.4f} "
                          f"steps to target {h.steps_to_target} ({h.seconds[-1]:.1f} s)", flush=True)
    for by_lr in grid.values():                 # a diverged run counts as chance-level for the selection
        for by_seed in by_lr.values():
            for r in by_seed.values():
                if not math.isfinite(r["final_validation_accuracy"]):
                    r["final_validation_accuracy"] = 0.0
    chosen = pick_learning_rates(grid)
    runs = {m: histories[m][repr(chosen[m])] for m in config["methods"]}
    return {"runs": runs, "summary": summarize(runs), "grid": grid, "chosen_lr": chosen,
            "n_train": len(train_data), "n_validation": len(val_data), "n_test": len(test_data)}


def run(dataset: str = "digits", *, full: bool = False, root: str | Path | None = None,
        seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None, device: str | torch.device | None = None,
        out: str | Path | None = None, name: str | None = None, checkpoint_dir: str | Path | None = None,
        download: bool = False, progress: bool = True, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    """Run the comparison and save it with :func:`gradiv_lib.results.save` as ``ch04/<name>``.

    Parameters
    ----------
    dataset : str
        ``"digits"`` (quick), ``"mnist1d"`` (the tuned comparison, minutes) or, with ``full=True``,
        ``"cifar10"`` / ``"cifar100"``.
    full : bool
        The paper's protocol (needs ``root`` and, in practice, a GPU).
    seeds, methods : lists, optional
        Override the config's seeds and methods (names of :data:`METHODS`).
    out : path, optional
        Root folder of results (default: ``./gradiv-results`` under the current directory).
    name : str, optional
        Result name under ``ch04/`` (default ``divebatch_<dataset>``).
    checkpoint_dir : path, optional
        One checkpoint per (method, seed); default ``./gradiv_checkpoints/divebatch_<dataset>`` in full
        mode, none in quick mode. Rerunning the same command resumes unfinished runs and skips
        finished ones.
    **overrides
        Any key of :data:`CONFIGS` (``epochs``, ``delta``, ``resize_every``, ``lr_cap``, ...).

    Returns
    -------
    (path, payload)
        Where the JSON was written and its content (``data["runs"][method][seed]`` is a
        :meth:`History.to_dict`, ``data["summary"]`` the medians over seeds).
    """
    from ..runtime import pick_device

    if dataset not in CONFIGS:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, CONFIGS))}; got {dataset!r}")
    if full == (dataset in QUICK):
        raise ValueError(
            "the quick modes run on dataset 'digits' or 'mnist1d'; the full protocol (--full) on 'cifar10' or "
            f"'cifar100' (got dataset={dataset!r}, full={full})"
        )
    config = with_overrides(dict(CONFIGS[dataset]), overrides, seeds)
    if methods is not None:
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
        config["methods"] = list(methods)
    if not config["seeds"]:
        raise ValueError("seeds must name at least one seed")
    if "lr_grid" in config:
        missing = [m for m in config["methods"] if m not in config["lr_grid"]]
        if missing:
            raise ValueError(f"methods {missing} have no learning-rate grid in the {dataset!r} config; "
                             f"valid: {', '.join(config['lr_grid'])}")
    device = pick_device(None if device is None else str(device))
    if checkpoint_dir is None and full:
        checkpoint_dir = Path("gradiv_checkpoints") / f"divebatch_{dataset}"
    start = time.perf_counter()
    if dataset == "mnist1d":
        payload = _run_tuned(config, device, progress)
        path = results.save(f"ch04/{name or 'divebatch_' + dataset}", payload, config=config,
                            seconds=time.perf_counter() - start, device=device, root=out)
        return path, json.loads(path.read_text())
    train_data, test_data, transform = load_data(config, root, device, download)
    runs: dict[str, dict[str, Any]] = {}
    for method in config["methods"]:
        for seed in config["seeds"]:
            ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{method}_seed{seed}.pt"
            history = run_method(method, config, seed, train_data, test_data, transform=transform, device=device,
                                 checkpoint_path=ckpt, progress=progress)
            runs.setdefault(method, {})[str(seed)] = history.to_dict()
    seconds = time.perf_counter() - start
    payload = {"runs": runs, "summary": summarize(runs), "n_train": len(train_data), "n_test": len(test_data)}
    result_name = f"ch04/{name or 'divebatch_' + dataset}"
    path = results.save(result_name, payload, config=config, seconds=seconds, device=device,
                        root=out)
    return path, json.loads(path.read_text())
