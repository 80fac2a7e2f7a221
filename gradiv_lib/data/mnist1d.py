"""MNIST-1D (Greydanus & Steinbach, 2024): a harder classification problem that still trains on a CPU.

Ten 1-D digit templates of 12 points are padded, scaled, sheared, translated, blurred by correlated
noise and sampled at 40 points. A linear model reaches about 32 % test accuracy, an MLP about 68 %
and a small CNN about 94 % (the package's reported figures), so unlike scikit-learn's digits there
is room between methods. The data are *generated* here by the ``mnist1d`` package's procedural
generator (``mnist1d.data.make_dataset``) from its built-in templates; its download path
(``get_dataset``) is never used, so nothing touches the network.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from .core import InMemoryData, _check_positive_int

__all__ = ["load_mnist1d"]

#: Length of every MNIST-1D signal.
MNIST1D_LENGTH = 40


@functools.lru_cache(maxsize=8)
def _generate(num_samples: int, seed: int, train_split: float, shuffle_seq: bool) -> tuple[np.ndarray, ...]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_mnist1d needs the 'mnist1d' package: pip install 'gradiv_lib[book]' (or pip install mnist1d)"
        ) from exc
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split, args.shuffle_seq = num_samples, seed, train_split, shuffle_seq
    # make_dataset reseeds the global ``random`` and ``numpy`` generators; give the caller's back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def load_mnist1d(
    num_samples: int = 5000,
    *,
    seed: int = 42,
    train_split: float = 0.8,
    shuffle_seq: bool = False,
    channels: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[InMemoryData, InMemoryData]:
    """Generate MNIST-1D offline and return ``(train, test)``.

    Parameters
    ----------
    num_samples : int
        Total samples, split ``train_split`` / ``1 - train_split``; the package default is 5000
        (4000 train, 1000 test). Must be a multiple of 10 (samples per class are equal) and >= 20.
    seed : int
        Seed of the generator (the package's default data set is ``seed=42``). The caller's global
        ``random`` / ``numpy`` generator states are restored afterwards.
    shuffle_seq : bool
        Permute the 40 positions with one fixed permutation (the "shuffled" variant: local structure
        gone, so convolutions lose their advantage over MLPs).
    channels : bool
        Shape ``x`` as ``(N, 1, 40)`` for ``Conv1d`` networks (default) or ``(N, 40)`` for MLPs.
    """
    _check_positive_int(num_samples, "num_samples", minimum=20)
    if num_samples % 10:
        raise ValueError(f"num_samples must be a multiple of 10 (equal samples per class), got {num_samples}")
    if not (isinstance(train_split, float) and 0.0 < train_split < 1.0):
        raise ValueError(f"train_split must be a float in (0, 1), got {train_split!r}")
    x, y, xt, yt = _generate(int(num_samples), int(seed), float(train_split), bool(shuffle_seq))
    if len(xt) == 0 or len(x) == 0:
        raise ValueError(f"train_split={train_split} leaves an empty split of {num_samples} samples")

    def make(xs: np.ndarray, ys: np.ndarray, split: str) -> InMemoryData:
        t = torch.as_tensor(xs, dtype=dtype)
        if channels:
            t = t.unsqueeze(1)
        return InMemoryData(t.to(device), torch.as_tensor(ys, dtype=torch.long).to(device),
                            {"classes": [str(c) for c in range(10)], "name": "mnist1d", "split": split,
                             "seed": seed, "num_samples": num_samples, "shuffle_seq": shuffle_seq})

    return make(x, y, "train"), make(xt, yt, "test")
