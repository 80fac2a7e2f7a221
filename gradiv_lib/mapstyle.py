"""Any map-style ``torch.utils.data.Dataset`` as a source of batches whose size changes between epochs.

:func:`gradiv_lib.train` asks its data for one epoch of batches of size :math:`B_e` at a time, and the
batch-size schedules pick a new :math:`B_e` between epochs. :class:`~gradiv_lib.data.InMemoryData`
(tensors on one device) does that by indexing; :class:`MapStyleData` does the same for any dataset with
``__len__`` and ``__getitem__`` (torchvision's, your own), reading samples through a
``torch.utils.data.DataLoader`` with worker processes, so nothing has to fit in memory. With the same
generator both draw the same permutation, so a run on ``MapStyleData(TensorDataset(x, y))`` equals a
run on ``InMemoryData(x, y)``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = ["MapStyleData"]


class MapStyleData:
    """A map-style dataset seen through the batch interface :func:`gradiv_lib.train` uses.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Has ``__len__`` and ``__getitem__``; item ``i`` is an ``(input, target)`` pair.
    num_workers : int
        DataLoader worker processes (0: read in the main process).
    collate_fn : callable, optional
        Joins a list of samples into ``(x_batch, y_batch)``; default ``torch.utils.data.default_collate``.
    device : str or torch.device
        Where batches are moved (``"cpu"`` by default; :func:`gradiv_lib.train` moves them to its device).
    pin_memory : bool
        Page-locked host memory, for faster copies to a GPU.
    """

    def __init__(self, dataset: Dataset, *, num_workers: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None,
                 device: str | torch.device = "cpu", pin_memory: bool = False) -> None:
        if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"dataset must be a map-style torch Dataset (with __len__ and __getitem__), got "
                            f"{type(dataset).__name__}: batch-size schedules need the number of samples and whole epochs")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        self.dataset = dataset
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.device = torch.device(device)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"MapStyleData({type(self.dataset).__name__}, n={len(self)}, device={self.device})"

    def to(self, device: str | torch.device) -> MapStyleData:
        """The same data, with batches delivered on ``device``."""
        return MapStyleData(self.dataset, num_workers=self.num_workers, collate_fn=self.collate_fn, device=device,
                            pin_memory=self.pin_memory)

    def _load(self, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=self.collate_fn, pin_memory=self.pin_memory)
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"each batch must be an (inputs, targets) pair; the dataset's items collate to "
                                f"{type(batch).__name__}: give items as (x, y) or pass a collate_fn")
            x, y = batch
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``min(n, N)`` samples as one batch."""
        return next(self._load([list(range(min(n, len(self))))]))

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of ``(x_b, y_b)``, as :meth:`gradiv_lib.data.InMemoryData.batches` (the same permutation
        for the same generator): every sample once, the last batch smaller unless ``drop_last``."""
        n = len(self)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be an integer in [1, {n}] (the number of samples), got {batch_size!r}")
        stop = n - n % batch_size if drop_last else n
        if shuffle:
            perm_device = generator.device if generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=generator, device=perm_device).tolist()
        else:
            order = list(range(n))
        yield from self._load([order[start:start + batch_size] for start in range(0, stop, batch_size)])
