"""In-memory data: :class:`InMemoryData`, mini-batches by indexing a random permutation on one device."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------
# In-memory data
# --------------------------------------------------------------------------------------------


class InMemoryData:
    """Inputs ``x`` and targets ``y`` held as tensors on one device.

    Parameters
    ----------
    x : Tensor
        Inputs, first dimension indexes samples (``(N, d)`` or ``(N, C, H, W)``, ...).
    y : Tensor
        Targets with the same first dimension: class indices (``long``) or regression targets.
    info : dict, optional
        Facts about how the data was made (class names, the teacher weights of a synthetic
        problem, ...). Carried along by :meth:`to`, :meth:`subset` and :meth:`split`.

    Examples
    --------
    >>> data = InMemoryData(torch.randn(10, 3), torch.arange(10) % 2)
    >>> [len(xb) for xb, yb in data.batches(4, shuffle=False)]
    [4, 4, 2]
    """

    def __init__(self, x: Tensor, y: Tensor, info: dict[str, Any] | None = None) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"x and y must be torch.Tensor, got x: {type(x).__name__}, y: {type(y).__name__}"
            )
        if x.dim() == 0 or y.dim() == 0:
            raise ValueError(
                f"x and y need a sample dimension; got x.shape={tuple(x.shape)}, "
                f"y.shape={tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same number of samples; got x.shape[0]={x.shape[0]}, "
                f"y.shape[0]={y.shape[0]}"
            )
        if x.device != y.device:
            raise ValueError(f"x and y must be on one device; got {x.device} and {y.device}")
        self.x = x
        self.y = y
        self.info: dict[str, Any] = dict(info or {})

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (
            f"InMemoryData(n={len(self)}, x={tuple(self.x.shape[1:])} {self.x.dtype}, "
            f"y={tuple(self.y.shape[1:])} {self.y.dtype}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        """The device both tensors live on."""
        return self.x.device

    @property
    def num_classes(self) -> int:
        """Number of classes, ``max(y) + 1`` (classification targets only)."""
        if self.y.dtype.is_floating_point or self.y.dtype == torch.bool:
            raise ValueError(f"num_classes needs integer class labels, y has dtype {self.y.dtype}")
        return int(self.y.max().item()) + 1 if len(self) else 0

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> InMemoryData:
        """Copy to ``device``; ``dtype`` converts floating-point tensors only (labels stay long)."""
        x = self.x.to(device=device)
        if dtype is not None and x.dtype.is_floating_point:
            x = x.to(dtype)
        y = self.y.to(device=device)
        if dtype is not None and y.dtype.is_floating_point:
            y = y.to(dtype)
        return InMemoryData(x, y, self.info)

    def subset(self, indices: Tensor | Sequence[int]) -> InMemoryData:
        """The samples at ``indices`` (a copy), e.g. one client's part of a partition."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        return InMemoryData(self.x[index], self.y[index], self.info)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Number of mini-batches :meth:`batches` yields per epoch."""
        self._check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate over one epoch of mini-batches ``(x_b, y_b)``.

        Every sample appears exactly once per epoch; the last batch holds the
        ``N mod batch_size`` remaining samples unless ``drop_last``. With ``shuffle`` the order is
        a fresh random permutation drawn from ``generator`` (a CPU generator works for data on
        any device). Without ``shuffle`` the batches are views of the stored tensors.

        Parameters
        ----------
        batch_size : int
            Samples per batch, in ``[1, N]``. May differ from one call (epoch) to the next.
        shuffle : bool
            Draw a random order.
        generator : torch.Generator, optional
            Source of randomness for the permutation (global RNG if ``None``).
        drop_last : bool
            Skip the last, smaller batch.
        """
        self._check_batch_size(batch_size)
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, stop, batch_size):
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        perm_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=perm_device).to(self.device)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield self.x[index], self.y[index]

    def split(
        self, test_fraction: float, seed: int = 0, stratify: bool = False
    ) -> tuple[InMemoryData, InMemoryData]:
        """Random train/test split, reproducible from ``seed``.

        The test part holds ``ceil(test_fraction * N)`` samples (scikit-learn's convention).
        With ``stratify`` each class is split in the same proportion (integer labels only).
        """
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n = len(self)
        n_test = math.ceil(test_fraction * n)
        if n_test >= n:
            raise ValueError(
                f"test_fraction={test_fraction} leaves no training samples out of N={n}"
            )
        generator = torch.Generator().manual_seed(seed)
        if stratify:
            labels = _as_labels(self.y.cpu(), "y")
            test_parts = []
            for cls in torch.unique(labels):
                members = torch.nonzero(labels == cls).flatten()
                members = members[torch.randperm(len(members), generator=generator)]
                test_parts.append(members[: round(test_fraction * len(members))])
            test_index = torch.cat(test_parts)
            mask = torch.ones(n, dtype=torch.bool)
            mask[test_index] = False
            train_index = torch.nonzero(mask).flatten()
            train_index = train_index[torch.randperm(len(train_index), generator=generator)]
        else:
            perm = torch.randperm(n, generator=generator)
            test_index, train_index = perm[:n_test], perm[n_test:]
        return self.subset(train_index), self.subset(test_index)

    def _check_batch_size(self, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if not 1 <= batch_size <= len(self):
            raise ValueError(f"batch_size must be in [1, N] = [1, {len(self)}], got {batch_size}")


def _as_data(data: InMemoryData | tuple[Tensor, Tensor], name: str = "data") -> InMemoryData:
    """Accept an :class:`InMemoryData` or a user's own ``(x, y)`` pair of tensors."""
    if isinstance(data, InMemoryData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return InMemoryData(data[0], data[1])
    raise TypeError(f"{name} must be InMemoryData or an (x, y) pair of tensors, got {type(data)}")


def _as_labels(labels: Tensor | Sequence[int] | np.ndarray, name: str = "labels") -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D tensor of integer class labels, got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, found {int(labels.min())}")
    return labels.long().cpu()


def _check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


