"""The optimizer and learning-rate scheduler :func:`~gradiv_lib.training.train` builds from its arguments, and how a
batch-size change rescales their learning rates."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIMIZERS"]

#: Optimizers :func:`~gradiv_lib.training.train` builds from a name.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
_LR_SCHEDULERS = ("constant", "cosine")


def _build_optimizer(optimizer: Any, params: list[nn.Parameter], lr: float | None, momentum: float,
                     weight_decay: float) -> torch.optim.Optimizer:
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, an Optimizer or a factory; got {optimizer!r}")
        if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
            raise ValueError(f"lr must be a finite number > 0 with optimizer={optimizer!r}, got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if momentum:
            raise ValueError(f"momentum={momentum} applies to optimizer='sgd' only; Adam's betas are fixed at (0.9, 0.999)")
        cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=weight_decay)
    if lr is not None or momentum or weight_decay:
        raise ValueError(
            "lr, momentum and weight_decay apply to a named optimizer ('sgd', 'adam', 'adamw'); with an "
            "Optimizer instance or factory set them in the optimizer itself"
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in owned for p in params):
            raise ValueError("optimizer does not hold any parameter of model; build it from model.parameters()")
        return optimizer
    if callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(built).__name__}")
        return built
    raise TypeError(f"optimizer must be a name, a torch.optim.Optimizer or a factory params -> Optimizer, got {type(optimizer).__name__}")


def _build_lr_scheduler(lr_scheduler: Any, optimizer: torch.optim.Optimizer, epochs: int) -> Any:
    if lr_scheduler is None or lr_scheduler == "constant":
        return None
    if lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if isinstance(lr_scheduler, str):
        raise ValueError(f"lr_scheduler must be one of {_LR_SCHEDULERS}, a factory optimizer -> LRScheduler or None; got {lr_scheduler!r}")
    if callable(lr_scheduler):
        built = lr_scheduler(optimizer)
        if not hasattr(built, "step") or not hasattr(built, "state_dict"):
            raise TypeError(f"the lr_scheduler factory must return a torch LR scheduler, got {type(built).__name__}")
        return built
    raise TypeError(f"lr_scheduler must be a name, a factory optimizer -> LRScheduler or None, got {type(lr_scheduler).__name__}")


def _apply_lr_factor(optimizer: torch.optim.Optimizer, lr_scheduler: Any, factor: float) -> None:
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = [b * factor for b in lr_scheduler.base_lrs]

