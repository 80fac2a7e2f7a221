"""What :func:`~gradiv_lib.training.train` records: the :class:`History` of a run, one entry per epoch."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["History"]


@dataclass
class History:
    """What :func:`train` measured, one entry per finished epoch (lists of equal length).

    Attributes
    ----------
    epoch : list of int
        0-based epoch index.
    train_loss, train_accuracy : list of float
        Mean loss and accuracy over the epoch's batches, at the weights current for each batch
        (accuracy ``nan`` for regression).
    test_loss, test_accuracy : list of float
        On ``test_data`` at the end of the epoch (``nan`` without test data).
    batch_size : list of int
        Batch size used in the epoch.
    lr : list of float
        Learning rate of the first param group during the epoch.
    lr_scale : list of float
        The schedule's cumulative learning-rate multiplier during the epoch.
    diversity, batch_size_bound : list of float
        :math:`\\hat\\Delta` accumulated over the epoch and :math:`N\\hat\\Delta` (``nan`` when not measured).
    steps, samples : list of int
        Cumulative optimizer steps and training samples processed at the end of the epoch.
    seconds : list of float
        Cumulative wall-clock seconds of training (evaluation and checkpoints excluded).
    resizes : list of dict
        Every :class:`~gradiv_lib.batching.Resize`, as a dictionary.
    schedule : str
        Name of the batch-size schedule.
    target_accuracy : float or None
        The target, and ``target_on`` (``"test"`` or ``"train"``) the accuracy it is checked on.
    epoch_to_target, steps_to_target, samples_to_target, seconds_to_target
        Cumulative values at the first evaluation that reached the target (``None`` if never): the end
        of an epoch, or with ``eval_every`` also an evaluation between the steps of an epoch
        (``epoch_to_target`` is then the epoch in which it happened).
    eval_every : int or None
        With ``train(eval_every=k)``: ``test_data`` is also evaluated after every ``k``-th optimizer
        step (counted over the whole run), and ``eval_epoch``, ``eval_steps``, ``eval_samples``,
        ``eval_seconds``, ``eval_test_loss``, ``eval_test_accuracy`` hold one entry per such evaluation:
        the epoch, the cumulative steps and samples, the cumulative training seconds (evaluations
        excluded) and the test loss and accuracy at that moment.
    diverged : bool
        The loss became non-finite and the run stopped (``on_nonfinite="stop"``).
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    lr_scale: list[float] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)
    batch_size_bound: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resizes: list[dict[str, Any]] = field(default_factory=list)
    schedule: str = ""
    target_accuracy: float | None = None
    target_on: str = "test"
    epoch_to_target: int | None = None
    steps_to_target: int | None = None
    samples_to_target: int | None = None
    seconds_to_target: float | None = None
    diverged: bool = False
    eval_every: int | None = None
    eval_epoch: list[int] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_samples: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    eval_test_loss: list[float] = field(default_factory=list)
    eval_test_accuracy: list[float] = field(default_factory=list)

    #: Names of the per-epoch lists.
    PER_EPOCH = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "batch_size", "lr",
                 "lr_scale", "diversity", "batch_size_bound", "steps", "samples", "seconds")

    def __len__(self) -> int:
        return len(self.epoch)

    @property
    def reached_target(self) -> bool:
        """Whether the target accuracy was reached."""
        return self.epoch_to_target is not None

    def final(self, key: str) -> Any:
        """Last value of a per-epoch list, e.g. ``history.final("test_accuracy")``."""
        if key not in self.PER_EPOCH:
            raise KeyError(f"key must be one of {self.PER_EPOCH}, got {key!r}")
        values = getattr(self, key)
        if not values:
            raise ValueError("the history is empty (no finished epoch)")
        return values[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON and ``torch.load(weights_only=True)`` safe)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> History:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"unknown History fields {sorted(unknown)}")
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in state.items()})

    def _append(self, **row: Any) -> None:
        for key in self.PER_EPOCH:
            getattr(self, key).append(row[key])

    def __repr__(self) -> str:
        if not self.epoch:
            return "History(empty)"
        target = f", steps_to_target={self.steps_to_target}" if self.target_accuracy is not None else ""
        return (f"History({self.schedule}: {len(self)} epochs, batch {self.batch_size[0]}→{self.batch_size[-1]}, "
                f"steps={self.steps[-1]}, test_accuracy={self.test_accuracy[-1]:.4f}{target})")

