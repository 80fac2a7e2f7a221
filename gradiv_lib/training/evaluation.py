"""Evaluation of a model on a data set, and the data types :func:`~gradiv_lib.training.train` accepts."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..data import InMemoryData
from ..mapstyle import MapStyleData
from ..norms.loss_scale import check_loss_shapes

__all__ = ["evaluate"]


def _as_data(data: Any, name: str) -> InMemoryData | MapStyleData:
    if isinstance(data, (InMemoryData, MapStyleData)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return InMemoryData(data[0], data[1])
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return MapStyleData(data)
    raise TypeError(f"{name} must be InMemoryData, an (x, y) pair of tensors or a map-style torch Dataset "
                    f"(wrap one in gradiv_lib.mapstyle.MapStyleData for DataLoader workers), got {type(data).__name__}")


def _head(data: InMemoryData | MapStyleData, n: int) -> tuple[Tensor, Tensor]:
    return data.head(n) if isinstance(data, MapStyleData) else (data.x[:n], data.y[:n])


def _is_classification(data: InMemoryData | MapStyleData) -> bool:
    y = _head(data, 1)[1]
    return not y.dtype.is_floating_point and y.dim() == 1


def _default_loss(data: InMemoryData) -> nn.Module:
    return nn.CrossEntropyLoss() if _is_classification(data) else nn.MSELoss()


@torch.no_grad()
def evaluate(model: nn.Module, data: InMemoryData | tuple[Tensor, Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``data`` in eval mode (the model's mode is restored).

    The loss is the mean over samples of ``loss_fn`` evaluated in batches of ``batch_size`` (a ``torch.nn``
    loss with ``reduction="sum"`` is divided by the batch size; any other callable is taken to be a mean);
    accuracy is ``nan`` for regression targets. Default loss: cross-entropy for integer labels, mean
    squared error otherwise.
    """
    data = _as_data(data, "data")
    if len(data) == 0:
        raise ValueError("data is empty; evaluation needs at least one sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    loss_fn = loss_fn or _default_loss(data)
    was_training = model.training
    model.eval()
    try:
        total, correct = 0.0, 0
        classify = _is_classification(data)
        for xb, yb in data.batches(min(batch_size, len(data)), shuffle=False):
            out = model(xb)
            check_loss_shapes(loss_fn, out, yb)
            value = float(loss_fn(out, yb))
            total += value if getattr(loss_fn, "reduction", "mean") == "sum" else value * len(xb)
            if classify:
                correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    n = len(data)
    return total / n, (correct / n if classify else math.nan)

