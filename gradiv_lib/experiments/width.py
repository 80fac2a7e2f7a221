"""Width vs depth at a fixed parameter budget: diversity and the large-batch knee (chapter 3).

Chen, Wang, Zhao, Papailiopoulos & Koutris (NeurIPS 2018) argue that, for a fixed number of
parameters, wider networks have more diverse gradients and so can be trained with larger batches
without slowing down per step. This module measures both halves of that claim for a family of
networks of equal size (:func:`gradiv_lib.models.fixed_budget_family`):

* :func:`batch_size_bounds` — Yin's :math:`B_S = n\\Delta` at initialisation for every member;
* :func:`steps_to_target` — the fewest SGD steps (best of a learning-rate grid) to reach a target,
  for one batch size; all learning rates run side by side (``torch.func.vmap`` over stacked copies
  of the parameters), indices drawn with replacement, the target checked on the full training set
  every ``check_every`` steps;
* :func:`sweep` — both, over depths, batch sizes and seeds, with the knee
  :math:`S(B) = S_{\\min}(1 + B_\\text{noise}/B)` fitted by :func:`gradiv_lib.scaling.fit_critical_batch`.

Presets (:data:`PRESETS`): ``synthetic`` (the default, seconds on a CPU) is the deep *linear* teacher
problem of the book's chapter 3; ``digits`` the same sweep for ReLU MLPs on scikit-learn's digits
(a few minutes on a CPU); ``mnist1d`` ReLU MLPs on MNIST-1D (generated offline by the ``mnist1d``
package), with learning-rate grids that scale as :math:`\\sqrt{B}` and, for every depth and seed,
:math:`B_S` measured along a training run (:func:`diversity_along_training`); ``cifar10``
(``--full``, a GPU) ReLU MLPs on CIFAR-10 trained to a training-accuracy target.
From the command line: ``gradiv width [--dataset digits|mnist1d] [--book]``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .. import data as gdata
from .. import models, results, scaling
from ..diversity import gradient_diversity
from ..stateless import functional_call
from . import with_overrides

__all__ = ["PRESETS", "batch_size_bounds", "build_family", "check_schedule", "diversity_along_training", "half_squared_error",
           "learning_rates", "load_problem", "run", "steps_to_target", "summarize", "sweep"]


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """:math:`\\tfrac1n\\sum_i \\tfrac12\\|f(x_i) - y_i\\|^2` (the loss of the width experiments)."""
    return 0.5 * (outputs - targets).square().reshape(outputs.shape[0], -1).sum(1).mean()


#: Settings of each preset; every key can be overridden in :func:`run`.
PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": dict(
        dataset="synthetic", kind="deep_linear", n=1024, in_features=32, out_features=8, budget=2560,
        depths=[2, 3, 4, 6], batch_sizes=[1, 4, 16, 64, 256, 1024], lrs=[0.01, 0.03, 0.1, 0.3, 0.6],
        target="loss_fraction", target_value=0.05, max_steps=3000, check_every=1, seeds=[0, 1, 2, 3],
        bound_seeds=list(range(10)), activation=None,
    ),
    "digits": dict(
        dataset="digits", kind="mlp", in_features=64, out_features=10, budget=15000,
        depths=[2, 3, 4, 6], batch_sizes=[1, 4, 16, 64, 256, 1024], lrs=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
        target="accuracy", target_value=0.95, max_steps=4000, check_every=1, seeds=[0, 1, 2],
        bound_seeds=list(range(10)), activation="relu",
    ),
    # MNIST-1D (4000 training sequences of length 40, 10 classes): ReLU MLPs of about 25 000 parameters trained to
    # 60 % training accuracy. ``lrs`` is the grid at ``lr_reference_batch``; at batch size B every rate is multiplied
    # by sqrt(B / lr_reference_batch) (``lr_scaling``), the same rule for every depth. The target is checked on the
    # full training set at geometrically spaced steps (``check_ratio``: a resolution of 5 %). For every depth and
    # seed, one more run at ``diversity_batch`` (with that run's best rate) records B_S when the training accuracy
    # first reaches each of ``diversity_levels``.
    "mnist1d": dict(
        dataset="mnist1d", kind="mlp", num_samples=5000, in_features=40, out_features=10, budget=25000,
        depths=[2, 3, 4, 6], batch_sizes=[16, 64, 256, 1024], lrs=[0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2],
        lr_scaling="sqrt", lr_reference_batch=64,
        target="accuracy", target_value=0.6, max_steps=8000, check_every=1, check_ratio=1.05, seeds=[0, 1, 2],
        bound_seeds=list(range(10)), activation="relu",
        diversity_batch=64, diversity_levels=[0.2, 0.3, 0.4, 0.5, 0.6],
    ),
    "cifar10": dict(
        dataset="cifar10", kind="mlp", in_features=3072, out_features=10, budget=1_600_000,
        depths=[2, 3, 4, 6, 8], batch_sizes=[16, 64, 256, 1024, 4096], lrs=[0.003, 0.01, 0.03, 0.1, 0.3],
        target="accuracy", target_value=0.6, max_steps=60_000, check_every=50, seeds=[0, 1],
        bound_seeds=list(range(5)), activation="relu",
    ),
}


def load_problem(config: dict[str, Any], seed: int = 0, root: str | Path | None = None,
                 device: torch.device | str = "cpu") -> tuple[gdata.InMemoryData, Callable[[Tensor, Tensor], Tensor]]:
    """The training set and loss of a preset: a linear teacher, digits, MNIST-1D or CIFAR-10 (flattened)."""
    dataset = config["dataset"]
    if dataset == "synthetic":
        data = gdata.synthetic_regression(config["n"], config["in_features"], outputs=config["out_features"], seed=seed,
                                          device=device)
        return data, half_squared_error
    if dataset == "digits":
        train, _ = gdata.load_digits(seed=0, device=device)
        return train, nn.CrossEntropyLoss()
    if dataset == "mnist1d":
        train, _ = gdata.load_mnist1d(config.get("num_samples", 5000), channels=False, device=device)
        return train, nn.CrossEntropyLoss()
    if dataset == "cifar10":
        if root is None:
            raise ValueError("dataset 'cifar10' needs root=... (the folder holding cifar-10-batches-py)")
        train = gdata.load_cifar10(root, train=True, device=device)
        return gdata.InMemoryData(train.x.reshape(len(train), -1), train.y, train.info), nn.CrossEntropyLoss()
    raise ValueError(f"dataset must be one of 'synthetic', 'digits', 'mnist1d', 'cifar10'; got {dataset!r}")


def build_family(config: dict[str, Any], seed: int, device: torch.device | str = "cpu") -> list[models.FamilyMember]:
    """The fixed-budget family of a preset, initialised with ``seed``, on ``device``."""
    kwargs = {} if config["kind"] == "deep_linear" else {"activation": config["activation"], "init": "he"}
    family = models.fixed_budget_family(config["depths"], config["budget"], config["in_features"],
                                        config["out_features"], kind=config["kind"], seed=seed, **kwargs)
    return [member._replace(model=member.model.to(device)) for member in family]


def batch_size_bounds(family: Sequence[models.FamilyMember], data: gdata.InMemoryData,
                      loss_fn: Callable[[Tensor, Tensor], Tensor], max_samples: int | None = None) -> list[float]:
    """:math:`B_S = n\\Delta` of every member on (the first ``max_samples`` of) ``data``."""
    x, y = (data.x, data.y) if max_samples is None else (data.x[:max_samples], data.y[:max_samples])
    return [gradient_diversity(member.model, loss_fn, x, y).batch_size_bound for member in family]


def learning_rates(config: dict[str, Any], batch_size: int) -> list[float]:
    """The learning-rate grid of a preset at ``batch_size``.

    Without ``lr_scaling`` (or with ``None``) the grid is ``config["lrs"]`` at every batch size. With
    ``"sqrt"`` or ``"linear"`` it is ``lrs`` multiplied by :math:`\\sqrt{B/B_0}` or :math:`B/B_0`, with
    :math:`B_0` = ``config["lr_reference_batch"]``: one rule for every member of the family.
    """
    rule = config.get("lr_scaling")
    lrs = [float(lr) for lr in config["lrs"]]
    if rule is None:
        return lrs
    if rule not in ("sqrt", "linear"):
        raise ValueError(f"lr_scaling must be None, 'sqrt' or 'linear', got {rule!r}")
    reference = config.get("lr_reference_batch")
    if isinstance(reference, bool) or not isinstance(reference, int) or reference < 1:
        raise ValueError(f"lr_scaling={rule!r} needs lr_reference_batch, an integer >= 1; got {reference!r}")
    ratio = batch_size / reference
    factor = math.sqrt(ratio) if rule == "sqrt" else ratio
    return [lr * factor for lr in lrs]


def check_schedule(max_steps: int, check_every: int = 1, check_ratio: float | None = None) -> list[int]:
    """The steps at which :func:`steps_to_target` checks its target.

    Every ``check_every`` steps; with ``check_ratio`` = r > 1 instead geometrically: after a check at step
    s the next is at :math:`\\max(s + \\text{check\\_every}, \\lceil r s\\rceil)`, so a count is known to a
    relative resolution of r − 1 at a cost of about :math:`\\log(\\text{max\\_steps})/\\log r` checks.
    The last check is at ``max_steps`` when the schedule would skip it.
    """
    for value, name in ((max_steps, "max_steps"), (check_every, "check_every")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if check_ratio is None:
        return list(range(check_every, max_steps + 1, check_every))
    if isinstance(check_ratio, bool) or not isinstance(check_ratio, (int, float)) or not (
            math.isfinite(check_ratio) and check_ratio > 1):
        raise ValueError(f"check_ratio must be a finite number > 1 (or None), got {check_ratio!r}")
    steps, s = [], check_every
    while s <= max_steps:
        steps.append(s)
        s = max(s + check_every, math.ceil(s * check_ratio - 1e-9))
    if steps[-1] != max_steps:
        steps.append(max_steps)
    return steps


def steps_to_target(model: nn.Module, data: gdata.InMemoryData, batch_size: int, lrs: Sequence[float], *,
                    loss_fn: Callable[[Tensor, Tensor], Tensor], target: str = "loss_fraction", target_value: float = 0.05,
                    max_steps: int = 3000, check_every: int = 1, check_ratio: float | None = None, seed: int = 0,
                    eval_batch_size: int = 8192) -> tuple[int, float]:
    """Fewest plain-SGD steps from ``model``'s weights to a target, best of the learning rates ``lrs``.

    All learning rates run at once on stacked copies of the parameters and share the mini-batches
    (``batch_size`` indices drawn uniformly with replacement each step, from a generator seeded with
    ``seed``); ``model`` itself is not changed. Runs whose loss becomes non-finite or grows 10⁶-fold
    are dropped.

    Parameters
    ----------
    target : str
        ``"loss_fraction"`` (training loss ≤ ``target_value`` × its initial value) or
        ``"accuracy"`` (training accuracy ≥ ``target_value``), on the full training set.
    check_every : int
        Steps between checks; the count is then a multiple of it.
    check_ratio : float, optional
        Check at geometrically spaced steps instead (:func:`check_schedule`): a count is then the first
        checked step at which the target holds, within a factor ``check_ratio`` of the first step at
        which it held.

    Returns
    -------
    (steps, lr)
        Steps of the first learning rate to reach the target and that rate, or
        ``(max_steps + 1, nan)`` when none does.
    """
    n = len(data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, N] = [1, {n}], got {batch_size!r}")
    lr = torch.as_tensor(list(lrs), dtype=torch.float64)
    if lr.numel() == 0 or bool((lr <= 0).any()) or not bool(torch.isfinite(lr).all()):
        raise ValueError(f"lrs must be a non-empty list of finite learning rates > 0, got {list(lrs)}")
    if target not in ("loss_fraction", "accuracy"):
        raise ValueError(f"target must be 'loss_fraction' or 'accuracy', got {target!r}")
    if target == "accuracy" and (data.y.dtype.is_floating_point or not 0 < target_value <= 1):
        raise ValueError("target='accuracy' needs integer class labels and target_value in (0, 1]")
    if target == "loss_fraction" and not 0 < target_value < 1:
        raise ValueError(f"target_value must be in (0, 1) for target='loss_fraction', got {target_value}")
    checks = set(check_schedule(max_steps, check_every, check_ratio))
    runs = lr.numel()
    buffers = dict(model.named_buffers())
    stacked = {k: v.detach().unsqueeze(0).repeat(runs, *([1] * v.dim())).clone()
               for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    lr = lr.to(device=data.device, dtype=data.x.dtype if data.x.is_floating_point() else torch.float32)

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (params, frozen, buffers), (x,))

    def batch_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(forward(params, x), y)

    step_grads = vmap(grad(batch_loss), in_dims=(0, None, None))
    all_outputs = vmap(forward, in_dims=(0, None))

    def metric(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses = torch.zeros(runs, dtype=torch.float64, device=data.device)
        correct = torch.zeros(runs, dtype=torch.float64, device=data.device)
        with torch.no_grad():
            for start in range(0, n, eval_batch_size):
                xb, yb = data.x[start:start + eval_batch_size], data.y[start:start + eval_batch_size]
                out = all_outputs(params, xb)
                losses += torch.stack([loss_fn(o, yb) for o in out]).double() * len(xb)
                if target == "accuracy":
                    correct += (out.argmax(-1) == yb).sum(1).double()
        return losses / n, correct / n

    initial_loss, _ = metric(stacked)
    goal = target_value * initial_loss
    model_was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(seed)
    alive = torch.ones(runs, dtype=torch.bool, device=data.device)
    try:
        for step in range(1, max_steps + 1):
            index = torch.randint(n, (batch_size,), generator=generator).to(data.device)
            grads = step_grads(stacked, data.x[index], data.y[index])
            for key, value in stacked.items():
                stacked[key] = value - lr.view(-1, *([1] * (value.dim() - 1))) * grads[key]
            if step not in checks:
                continue
            loss, accuracy = metric(stacked)
            reached = (accuracy >= target_value) if target == "accuracy" else (loss <= goal)
            reached &= alive
            if bool(reached.any()):
                return step, float(lr[int(torch.nonzero(reached)[0])])
            alive &= torch.isfinite(loss) & (loss < 1e6 * initial_loss)
            if not bool(alive.any()):
                break
    finally:
        model.train(model_was_training)
    return max_steps + 1, math.nan


def diversity_along_training(model: nn.Module, data: gdata.InMemoryData, batch_size: int, lr: float,
                             levels: Sequence[float], *, loss_fn: Callable[[Tensor, Tensor], Tensor],
                             max_steps: int = 8000, check_every: int = 1, check_ratio: float | None = 1.05,
                             seed: int = 0, max_samples: int | None = 4096) -> list[dict[str, float]]:
    """:math:`B_S = n\\Delta` along one plain-SGD run, when the training accuracy first reaches each level.

    Trains a copy of ``model`` (``model`` is not changed) with plain SGD at ``batch_size`` and ``lr``, indices
    drawn uniformly with replacement from a generator seeded with ``seed`` (the same stream as
    :func:`steps_to_target` with that seed). At the steps of :func:`check_schedule` it measures the training
    accuracy on the full training set; the first time it is at least a level of ``levels``, it records
    :math:`B_S` on (the first ``max_samples`` of) the training set. A level that is never reached within
    ``max_steps`` is left out.

    Returns
    -------
    list of dict
        One row per reached level, in increasing order: ``level``, ``step``, ``accuracy``, ``loss`` and
        ``bound`` (:math:`B_S`); a first row with ``level`` = 0 is the initialisation.
    """
    import copy

    n = len(data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, N] = [1, {n}], got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    levels = sorted(float(v) for v in levels)
    if not levels or not all(0 < v <= 1 for v in levels):
        raise ValueError(f"levels must be a non-empty list of accuracies in (0, 1], got {levels}")
    if data.y.dtype.is_floating_point:
        raise ValueError("diversity_along_training needs integer class labels (it tracks the training accuracy)")
    checks = set(check_schedule(max_steps, check_every, check_ratio))
    net = copy.deepcopy(model)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    x_div, y_div = (data.x, data.y) if max_samples is None else (data.x[:max_samples], data.y[:max_samples])

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            out = net(data.x)
            return float(loss_fn(out, data.y)), float((out.argmax(-1) == data.y).double().mean())

    def row(level: float, step: int, loss: float, accuracy: float) -> dict[str, float]:
        bound = gradient_diversity(net, loss_fn, x_div, y_div).batch_size_bound
        return {"level": level, "step": step, "accuracy": accuracy, "loss": loss, "bound": float(bound)}

    loss, accuracy = evaluate()
    rows = [row(0.0, 0, loss, accuracy)]
    pending = list(levels)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, max_steps + 1):
        index = torch.randint(n, (batch_size,), generator=generator).to(data.device)
        grads = torch.autograd.grad(loss_fn(net(data.x[index]), data.y[index]), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        if step not in checks:
            continue
        loss, accuracy = evaluate()
        if not math.isfinite(loss):
            break
        while pending and accuracy >= pending[0]:
            rows.append(row(pending.pop(0), step, loss, accuracy))
        if not pending:
            break
    return rows


def sweep(config: dict[str, Any], *, seeds: Sequence[int] | None = None, bound_seeds: Sequence[int] | None = None,
          root: str | Path | None = None, device: torch.device | str = "cpu", progress: bool = False,
          checkpoint_path: str | Path | None = None) -> dict[str, Any]:
    """B_S at initialisation and steps to target vs batch size for every depth of a preset.

    Returns a JSON-ready dictionary: ``depths``, ``widths``, ``n_params``, ``batch_sizes``,
    ``bounds[depth][seed]`` (B_S at init, over ``bound_seeds``), ``steps[depth][seed]`` (one count per
    batch size, ``max_steps + 1`` when not reached), ``best_lr[depth][seed]`` and ``fits[depth][seed]``
    (``s_min``, ``b_noise``) for runs that reached the target at every batch size. The learning rates tried
    at each batch size are :func:`learning_rates` (``lrs_by_batch``, one list per batch size). With
    ``diversity_batch`` in the configuration, also ``along[depth][seed]``: the rows of
    :func:`diversity_along_training` at that batch size with the best rate found there (``diversity_batch``
    must be one of ``batch_sizes``).

    With ``checkpoint_path`` the partial result is written (atomically, as JSON) after every
    (seed, depth) and a rerun with the same ``config`` skips what is already there.
    """
    from tqdm.auto import tqdm

    seeds = list(config["seeds"] if seeds is None else seeds)
    bound_seeds = list(config["bound_seeds"] if bound_seeds is None else bound_seeds)
    out: dict[str, Any] = {"depths": list(config["depths"]), "batch_sizes": list(config["batch_sizes"]),
                           "bounds": {}, "steps": {}, "best_lr": {}, "fits": {}}
    along_batch = config.get("diversity_batch")
    if along_batch is not None and along_batch not in config["batch_sizes"]:
        raise ValueError(f"diversity_batch must be one of batch_sizes {list(config['batch_sizes'])}, got {along_batch!r}")
    if "lr_scaling" in config:
        out["lrs_by_batch"] = [learning_rates(config, b) for b in config["batch_sizes"]]
    if along_batch is not None:
        out["along"] = {}
    ckpt = None if checkpoint_path is None else Path(checkpoint_path)
    if ckpt is not None and ckpt.exists():
        saved = json.loads(ckpt.read_text())
        if saved.get("config") != json.loads(json.dumps(config)):
            raise ValueError(f"checkpoint {ckpt} is from a different configuration; delete it or pass another path")
        out = saved["result"]
    data_cache: dict[int, tuple[gdata.InMemoryData, Any]] = {}

    def problem(seed: int) -> tuple[gdata.InMemoryData, Any]:
        key = seed if config["dataset"] == "synthetic" else 0
        if key not in data_cache:
            data_cache[key] = load_problem(config, seed=key, root=root, device=device)
        return data_cache[key]

    for seed in bound_seeds:
        data, loss_fn = problem(seed)
        family = build_family(config, seed, device)
        out["widths"] = [m.width for m in family]
        out["n_params"] = [m.n_params for m in family]
        for member, bound in zip(family, batch_size_bounds(family, data, loss_fn, max_samples=4096)):
            out["bounds"].setdefault(str(member.depth), {})[str(seed)] = bound
    total = len(seeds) * len(config["depths"]) * len(config["batch_sizes"])
    bar = tqdm(total=total, disable=not progress, desc="steps to target", unit="run")
    for seed in seeds:
        data, loss_fn = problem(seed)
        for member in build_family(config, seed, device):
            if str(seed) in out["steps"].get(str(member.depth), {}):
                bar.update(len(config["batch_sizes"]))
                continue
            model = member.model
            counts, best = [], []
            for b in config["batch_sizes"]:
                steps, lr = steps_to_target(model, data, min(b, len(data)), learning_rates(config, b), loss_fn=loss_fn,
                                            target=config["target"], target_value=config["target_value"],
                                            max_steps=config["max_steps"], check_every=config["check_every"],
                                            check_ratio=config.get("check_ratio"), seed=1000 + seed)
                counts.append(steps)
                best.append(lr)
                bar.update(1)
            d, s = str(member.depth), str(seed)
            out["steps"].setdefault(d, {})[s] = counts
            out["best_lr"].setdefault(d, {})[s] = best
            if all(c <= config["max_steps"] for c in counts):
                fit = scaling.fit_critical_batch(config["batch_sizes"], counts)
                out["fits"].setdefault(d, {})[s] = {"s_min": fit.s_min, "b_noise": fit.b_noise,
                                                    "rms_log_error": fit.rms_log_error}
            if along_batch is not None:
                lr_along = best[config["batch_sizes"].index(along_batch)]
                out["along"].setdefault(d, {})[s] = [] if math.isnan(lr_along) else diversity_along_training(
                    model, data, min(along_batch, len(data)), lr_along, config["diversity_levels"], loss_fn=loss_fn,
                    max_steps=config["max_steps"], check_every=config["check_every"],
                    check_ratio=config.get("check_ratio"), seed=1000 + seed)
            if ckpt is not None:
                _write_json_atomic(ckpt, {"config": config, "result": out})
    bar.close()
    return out


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def summarize(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Median B_S at init and median fitted B_noise per depth."""
    summary = {}
    for depth in map(str, result["depths"]):
        bounds = list(result["bounds"].get(depth, {}).values())
        fits = [f["b_noise"] for f in result["fits"].get(depth, {}).values()]
        summary[depth] = {"median_bound": float(np.median(bounds)) if bounds else math.nan,
                          "median_b_noise": float(np.median(fits)) if fits else math.nan}
        if "along" in result:                       # median B_S at each accuracy level reached by every seed
            runs = list(result["along"].get(depth, {}).values())
            levels = sorted({r["level"] for rows in runs for r in rows if r["level"] > 0})
            summary[depth]["median_bound_at_accuracy"] = {
                f"{level:g}": float(np.median([next(r["bound"] for r in rows if r["level"] == level) for rows in runs]))
                for level in levels if runs and all(any(r["level"] == level for r in rows) for rows in runs)}
    return summary


def run(dataset: str = "synthetic", *, full: bool = False, root: str | Path | None = None,
        seeds: Sequence[int] | None = None, device: str | torch.device | None = None, out: str | Path | None = None,
        name: str | None = None, checkpoint_dir: str | Path | None = None, progress: bool = True,
        **overrides: Any) -> tuple[Path, dict[str, Any]]:
    """Run the width sweep of a preset and save it with :func:`gradiv_lib.results.save`.

    Parameters
    ----------
    dataset : str
        ``"synthetic"`` (deep linear, seconds), ``"digits"`` or ``"mnist1d"`` (ReLU MLPs, minutes on a CPU) or
        ``"cifar10"`` (ReLU MLPs, needs ``full=True``, ``root`` and preferably a GPU).
    full : bool
        The large protocol; required for ``cifar10``.
    seeds : list of int, optional
        Seeds of the steps-to-target runs (default: the preset's).
    out : path, optional
        Root folder of the result (default: ``./gradiv-results`` under the current directory); the file is
        ``<out>/ch03/<name>.json`` with ``name`` = ``width_<dataset>`` by default.
    checkpoint_dir : path, optional
        Folder of the partial-result checkpoint (default ``./gradiv_checkpoints`` with ``full=True``,
        none otherwise); rerunning the same command resumes.
    **overrides
        Any key of the preset (``depths``, ``batch_sizes``, ``lrs``, ``max_steps``, ``budget``, ...).

    Returns
    -------
    (path, payload)
    """
    from ..runtime import pick_device

    if dataset not in PRESETS:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, PRESETS))}; got {dataset!r}")
    if dataset == "cifar10" and not full:
        raise ValueError("dataset 'cifar10' is the full protocol: pass full=True (--full) and root=... (--root)")
    if full and dataset != "cifar10":
        raise ValueError(f"full=True (--full) is the CIFAR-10 protocol; use dataset='cifar10', not {dataset!r}")
    config = dict(PRESETS[dataset])
    with_overrides(config, overrides, seeds)
    device = pick_device(None if device is None else str(device))
    start = time.perf_counter()
    if checkpoint_dir is None and full:
        checkpoint_dir = Path("gradiv_checkpoints")
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name or 'width_' + dataset}.json"
    result = sweep(config, root=root, device=device, progress=progress, checkpoint_path=ckpt)
    result["summary"] = summarize(result)
    seconds = time.perf_counter() - start
    path = results.save(f"ch03/{name or 'width_' + dataset}", result, config=config, seconds=seconds, device=device,
                        root=out)
    return path, json.loads(path.read_text())
