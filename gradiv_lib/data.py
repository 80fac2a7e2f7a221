"""Data for every chapter: in-memory data sets, synthetic problems, image readers, client
partitions and continual-learning task streams.

Chapters that use it:

* ch. 1 and 4 — :func:`synthetic_regression` (with data duplication, Yin et al.'s example of a
  diversity-*reducing* mechanism), :func:`load_digits`;
* ch. 3 — :func:`synthetic_classification` and the teacher problems of the width experiments;
* ch. 4 — :func:`load_cifar10`, :func:`load_cifar100`, :func:`load_tiny_imagenet` and
  :func:`augment_batch` for the DiveBatch runs from the command line;
* ch. 5–7 — :func:`partition_iid`, :func:`partition_dirichlet`, :func:`partition_shards`
  (workers and federated clients);
* ch. 8 — :func:`permuted_tasks`, :func:`random_label_tasks`, :func:`label_permutation_tasks`,
  :func:`class_incremental_tasks` (loss of plasticity).

Everything lives in tensors on one device: :class:`InMemoryData` iterates mini-batches by
indexing a random permutation, with no ``DataLoader`` and no worker processes, so the batch size
can change from one epoch to the next (adaptive batch sizes) at no cost. Real data sets are read
from a local folder; nothing is downloaded unless ``download=True`` is passed.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_STD_KUANGLIU",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InMemoryData",
    "Task",
    "augment_batch",
    "class_incremental_tasks",
    "label_permutation_tasks",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_tiny_imagenet",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "permuted_tasks",
    "random_label_tasks",
    "synthetic_classification",
    "synthetic_regression",
]

#: Per-channel mean of the CIFAR-10 training images (pixels in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
#: Per-channel standard deviation over all CIFAR-10 training pixels.
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: The "std" used by kuangliu/pytorch-cifar and hence by the DiveBatch code (the mean of per-image
#: standard deviations, smaller than the pixel std). Pass it as ``std=`` to match that code exactly.
CIFAR10_STD_KUANGLIU: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
#: Per-channel mean of the CIFAR-100 training images.
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
#: Per-channel standard deviation over all CIFAR-100 training pixels.
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
#: ImageNet statistics, the usual choice for Tiny-ImageNet (torchvision's ResNet recipes).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet per-channel standard deviation.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


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


# --------------------------------------------------------------------------------------------
# Synthetic problems
# --------------------------------------------------------------------------------------------


def synthetic_regression(
    n: int,
    d: int,
    noise: float = 0.0,
    seed: int = 0,
    duplicates: int = 1,
    condition_number: float = 1.0,
    outputs: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    r"""Linear regression with Gaussian features, optionally with every sample duplicated.

    .. math::
        x_i \sim \mathcal N(0, \Sigma),\quad
        y_i = W_\star x_i + \sigma\,\varepsilon_i,\quad
        \varepsilon_i \sim \mathcal N(0, I),\quad
        W_\star \in \mathbb R^{\text{outputs}\times d},\ (W_\star)_{jk} \sim \mathcal N(0, 1/d).

    :math:`\Sigma` is diagonal with eigenvalues spaced geometrically from 1 down to
    ``1 / condition_number`` (isotropic when it is 1).

    **Duplication.** ``n // duplicates`` distinct samples are drawn and each is repeated
    ``duplicates`` times (noise included), so the data set always has ``n`` samples; the copies
    are stacked in blocks (rows ``i, i + n/r, i + 2n/r, ...`` are equal). With
    :math:`r` copies of every sample, :math:`\sum_i\|\nabla f_i\|^2` grows by :math:`r` and
    :math:`\|\sum_i\nabla f_i\|^2` by :math:`r^2`: gradient diversity :math:`\Delta` falls by a
    factor :math:`r` at any :math:`w`, while :math:`B_S = N\Delta` stays that of the distinct set.

    Parameters
    ----------
    n : int
        Total number of samples (a multiple of ``duplicates``).
    d : int
        Input dimension.
    noise : float
        Label-noise standard deviation :math:`\sigma \ge 0`.
    seed : int
        Seed; the same seed gives the same data.
    duplicates : int
        Copies of each distinct sample, :math:`r \ge 1`.
    condition_number : float
        Ratio of the largest to the smallest feature variance, :math:`\ge 1`.
    outputs : int
        Number of regression targets; ``y`` has shape ``(n, outputs)``.
    device, dtype
        Where and in which floating type the tensors are made.

    Returns
    -------
    InMemoryData
        ``info`` holds ``w_star`` (outputs × d), ``feature_variances`` (d,), ``noise`` and
        ``duplicates``.
    """
    _check_positive_int(n, "n")
    _check_positive_int(d, "d")
    _check_positive_int(duplicates, "duplicates")
    _check_positive_int(outputs, "outputs")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    if not (condition_number >= 1 and math.isfinite(condition_number)):
        raise ValueError(f"condition_number must be a finite number >= 1, got {condition_number}")
    if n % duplicates:
        raise ValueError(
            f"n must be a multiple of duplicates so that every sample has the same number of "
            f"copies; got n={n}, duplicates={duplicates}"
        )
    generator = torch.Generator().manual_seed(seed)
    distinct = n // duplicates
    variances = torch.logspace(0.0, -math.log10(condition_number), d, dtype=torch.float64)
    x = torch.randn(distinct, d, generator=generator, dtype=torch.float64) * variances.sqrt()
    w_star = torch.randn(outputs, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    y = x @ w_star.T + noise * torch.randn(
        distinct, outputs, generator=generator, dtype=torch.float64
    )
    x, y = x.repeat(duplicates, 1), y.repeat(duplicates, 1)
    info = {
        "w_star": w_star.to(device=device, dtype=dtype),
        "feature_variances": variances.to(device=device, dtype=dtype),
        "noise": noise,
        "duplicates": duplicates,
    }
    return InMemoryData(x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), info)


def synthetic_classification(
    n: int,
    d: int,
    classes: int,
    seed: int = 0,
    separation: float = 3.0,
    kind: str = "blobs",
    teacher_width: int = 32,
    label_noise: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    r"""Synthetic classification: Gaussian blobs or the labels of a random teacher network.

    * ``kind="blobs"``: balanced classes, :math:`x_i = \mu_{y_i} + \varepsilon_i`,
      :math:`\varepsilon_i\sim\mathcal N(0, I_d)`, class means
      :math:`\mu_c = s\,u_c/\sqrt 2` with random unit vectors :math:`u_c`, so two means are about
      ``separation`` :math:`= s` noise standard deviations apart.
    * ``kind="teacher"``: :math:`x_i\sim\mathcal N(0, I_d)` and
      :math:`y_i = \arg\max_c\,[V\tanh(Ux_i)]_c` for a random one-hidden-layer teacher with
      ``teacher_width`` units (the planted-model set-up of the width chapter). Classes need not be
      balanced; ``separation`` scales the teacher's logits and has no effect on the argmax.

    ``label_noise`` replaces that fraction of the labels (chosen at random) by uniform random
    classes.

    Returns
    -------
    InMemoryData
        ``y`` is ``long`` of shape ``(n,)``; ``info`` holds ``kind`` and the class means or the
        teacher weights.
    """
    _check_positive_int(n, "n")
    _check_positive_int(d, "d")
    _check_positive_int(classes, "classes", minimum=2)
    _check_positive_int(teacher_width, "teacher_width")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if not (separation >= 0 and math.isfinite(separation)):
        raise ValueError(f"separation must be a finite number >= 0, got {separation}")
    generator = torch.Generator().manual_seed(seed)
    info: dict[str, Any] = {"kind": kind}
    if kind == "blobs":
        directions = torch.randn(classes, d, generator=generator, dtype=torch.float64)
        means = separation / math.sqrt(2.0) * directions / directions.norm(dim=1, keepdim=True)
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=generator)]
        x = means[y] + torch.randn(n, d, generator=generator, dtype=torch.float64)
        info["means"] = means.to(device=device, dtype=dtype)
    elif kind == "teacher":
        u = torch.randn(teacher_width, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
        v = torch.randn(classes, teacher_width, generator=generator, dtype=torch.float64)
        v = v / math.sqrt(teacher_width)
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = (separation * torch.tanh(x @ u.T) @ v.T).argmax(dim=1)
        info["teacher"] = {
            "U": u.to(device=device, dtype=dtype),
            "V": v.to(device=device, dtype=dtype),
        }
    else:
        raise ValueError(f"kind must be one of 'blobs', 'teacher'; got {kind!r}")
    if label_noise > 0:
        flip = torch.rand(n, generator=generator) < label_noise
        y = torch.where(flip, torch.randint(classes, (n,), generator=generator), y)
    return InMemoryData(x.to(device=device, dtype=dtype), y.to(device), info)


def load_digits(
    seed: int = 0,
    test_fraction: float = 0.2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    flat: bool = True,
    stratify: bool = False,
) -> tuple[InMemoryData, InMemoryData]:
    """scikit-learn's bundled handwritten digits (1 797 images of 8×8 pixels, 10 classes).

    Works offline (the data ships with scikit-learn). Pixel values 0–16 are divided by 16, so
    features lie in [0, 1]. The split is :meth:`InMemoryData.split` with ``seed``: the same seed
    gives the same split on every machine.

    Parameters
    ----------
    seed : int
        Seed of the train/test split.
    test_fraction : float
        Fraction of samples in the test part (``ceil(test_fraction * 1797)`` samples).
    device, dtype
        Where the tensors live and the floating type of the inputs.
    flat : bool
        Inputs as ``(N, 64)`` vectors if ``True``, else as ``(N, 1, 8, 8)`` images.
    stratify : bool
        Keep the class proportions in both parts.

    Returns
    -------
    (train, test) : tuple of InMemoryData
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError('load_digits reads the digits data set that ships with scikit-learn, which is not '
                          'installed: pip install "gradiv_lib[book]" (or scikit-learn)') from error

    bunch = sklearn_load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64) / 16.0
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    data = InMemoryData(x.to(dtype), y, {"classes": [str(c) for c in range(10)]})
    train, test = data.split(test_fraction, seed=seed, stratify=stratify)
    return train.to(device), test.to(device)


# --------------------------------------------------------------------------------------------
# Image readers (local folder; download only when asked)
# --------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds NumPy arrays and builtin containers (CIFAR batches are pickles).

    Refusing every other global means a tampered file cannot run code, in the spirit of
    ``torch.load(weights_only=True)``.
    """

    _NUMPY_CORE = frozenset({"numpy.core.multiarray", "numpy._core.multiarray"})
    _NUMPY_NAMES = frozenset({"_reconstruct", "scalar"})

    def find_class(self, module: str, name: str) -> Any:
        if module in self._NUMPY_CORE and name in self._NUMPY_NAMES:
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # NumPy < 2
                multiarray = importlib.import_module("numpy.core.multiarray")
            return getattr(multiarray, name)
        if module == "numpy" and name in {"ndarray", "dtype"}:
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a data pickle: only NumPy arrays are expected"
        )


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return _ArrayUnpickler(handle, encoding="bytes").load()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_and_extract(url: str, md5: str, root: Path, dataset: str) -> None:
    """Download ``url`` into ``root`` (atomically) and extract it there."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[-1]
    if not archive.exists():
        handle, partial = tempfile.mkstemp(dir=root, suffix=".part")
        try:
            with (
                os.fdopen(handle, "wb") as out,
                urllib.request.urlopen(url, timeout=60) as response,
            ):
                shutil.copyfileobj(response, out)
            os.replace(partial, archive)
        except (urllib.error.URLError, OSError) as error:
            raise ConnectionError(
                f"could not download {dataset} from {url} ({error}). The network may be "
                f"unavailable: download the archive on a machine with internet access, extract "
                f"it into {root} and call again with download=False."
            ) from error
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    if _md5(archive) != md5:
        raise OSError(
            f"{archive} has the wrong MD5 checksum (expected {md5}); the download is incomplete "
            f"or corrupt. Delete it and try again."
        )
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(root)
    else:
        with tarfile.open(archive, "r:gz") as tarred:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse unsafe members
                tarred.extractall(root, filter="data")
            else:
                tarred.extractall(root)


def _missing(path: Path, dataset: str, url: str, function: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{dataset} not found: expected {path}. Either call {function}(root, download=True) on "
        f"a machine with internet access, or download {url}, extract it into the root folder "
        f"and pass that folder as root."
    )


def _normalize_images(
    images: np.ndarray | Tensor,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dtype: torch.dtype,
) -> Tensor:
    """uint8 (N, C, H, W) → float in [0, 1], then ``(x - mean) / std`` per channel if given."""
    x = torch.as_tensor(images).to(dtype).div_(255.0)  # one float copy, then in place
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("pass both mean and std, or neither")
        channels = x.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}); got {len(mean)} and "
                f"{len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        x.sub_(torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1))
        x.div_(torch.tensor(std, dtype=dtype).view(1, -1, 1, 1))
    return x


def _read_cifar_batches(files: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in files:
        batch = _read_pickle(path)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(
                f"{path} is not a CIFAR batch: it lacks the key {label_key!r} or b'data' "
                f"(found {sorted(batch)})"
            )
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _decode_names(names: Sequence[bytes | str]) -> list[str]:
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def load_cifar10(
    root: str | os.PathLike,
    train: bool = True,
    download: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    """CIFAR-10 from the official Python pickles under ``root/cifar-10-batches-py/``.

    Reads ``data_batch_1`` … ``data_batch_5`` (``train=True``, 50 000 images) or ``test_batch``
    (10 000), and the class names from ``batches.meta``. Pixels are scaled to [0, 1] and, with
    ``normalize``, standardised per channel, :math:`x \\leftarrow (x - \\mu_c)/\\sigma_c`, with
    :data:`CIFAR10_MEAN` and :data:`CIFAR10_STD` (the pixel statistics of the training set);
    pass ``std=CIFAR10_STD_KUANGLIU`` to match the DiveBatch code.

    Parameters
    ----------
    root : path
        Folder that contains (or will contain) ``cifar-10-batches-py``.
    train : bool
        Training or test set.
    download : bool
        Fetch and extract the official archive into ``root`` if the files are missing
        (raises ``ConnectionError`` without network).
    normalize : bool
        Standardise with ``mean`` and ``std``; otherwise return pixels in [0, 1].
    device, dtype
        Where the tensors go and the floating type of the images.

    Returns
    -------
    InMemoryData
        ``x`` of shape ``(N, 3, 32, 32)``, ``y`` long in ``0..9``, ``info["classes"]``.

    Raises
    ------
    FileNotFoundError
        When a file is missing and ``download`` is false; the message names the expected path.
    """
    folder = Path(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    files = [folder / name for name in names]
    if download and not all(path.exists() for path in files):
        _download_and_extract(_CIFAR10_URL, _CIFAR10_MD5, Path(root), "CIFAR-10")
    for path in files:
        if not path.exists():
            raise _missing(path, "CIFAR-10", _CIFAR10_URL, "load_cifar10")
    images, labels = _read_cifar_batches(files, b"labels")
    info: dict[str, Any] = {"dataset": "cifar10", "mean": tuple(mean), "std": tuple(std)}
    if (folder / "batches.meta").exists():
        info["classes"] = _decode_names(_read_pickle(folder / "batches.meta")[b"label_names"])
    x = _normalize_images(images, mean if normalize else None, std if normalize else None, dtype)
    return InMemoryData(x, torch.as_tensor(labels), info).to(device)


def load_cifar100(
    root: str | os.PathLike,
    train: bool = True,
    download: bool = False,
    labels: str = "fine",
    normalize: bool = True,
    mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    """CIFAR-100 from the official Python pickles under ``root/cifar-100-python/``.

    Reads ``train`` (50 000 images) or ``test`` (10 000) and the class names from ``meta``.
    ``labels="fine"`` gives the 100 classes, ``"coarse"`` the 20 superclasses. Normalisation as
    in :func:`load_cifar10`, with :data:`CIFAR100_MEAN` and :data:`CIFAR100_STD`.

    Returns
    -------
    InMemoryData
        ``x`` of shape ``(N, 3, 32, 32)``, ``y`` long, ``info["classes"]``.
    """
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    folder = Path(root) / "cifar-100-python"
    path = folder / ("train" if train else "test")
    if download and not path.exists():
        _download_and_extract(_CIFAR100_URL, _CIFAR100_MD5, Path(root), "CIFAR-100")
    if not path.exists():
        raise _missing(path, "CIFAR-100", _CIFAR100_URL, "load_cifar100")
    images, targets = _read_cifar_batches([path], f"{labels}_labels".encode())
    info: dict[str, Any] = {
        "dataset": "cifar100",
        "labels": labels,
        "mean": tuple(mean),
        "std": tuple(std),
    }
    if (folder / "meta").exists():
        meta = _read_pickle(folder / "meta")
        info["classes"] = _decode_names(meta[f"{labels}_label_names".encode()])
    x = _normalize_images(images, mean if normalize else None, std if normalize else None, dtype)
    return InMemoryData(x, torch.as_tensor(targets), info).to(device)


def load_tiny_imagenet(
    root: str | os.PathLike,
    split: str = "train",
    download: bool = False,
    normalize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cache: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    """Tiny-ImageNet (200 classes, 64×64 images) from the standard folder layout.

    Layout under ``root/tiny-imagenet-200/``: ``wnids.txt`` (one WordNet id per class),
    ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG`` with labels in
    ``val/val_annotations.txt`` (tab-separated: file name, wnid, box). Class index ``k`` is the
    position of the wnid in the *sorted* list of wnids (what ``torchvision.datasets.ImageFolder``
    assigns). Grayscale JPEGs are converted to RGB. The test split has no public labels and is
    not offered.

    Decoding 100 000 JPEGs with PIL takes minutes, so with ``cache`` the decoded uint8 array is
    saved once as ``tiny-imagenet-200/gradiv_cache_<split>.pt`` (atomically) and reloaded with
    ``torch.load(weights_only=True)`` on later calls.

    Returns
    -------
    InMemoryData
        ``x`` of shape ``(N, 3, 64, 64)``, ``y`` long in ``0..199``, ``info["classes"]``
        (wnids).
    """
    if split not in ("train", "val"):
        raise ValueError(
            f"split must be 'train' or 'val', got {split!r} (the test split has no labels)"
        )
    folder = Path(root) / "tiny-imagenet-200"
    wnids_path = folder / "wnids.txt"
    if download and not wnids_path.exists():
        _download_and_extract(_TINY_IMAGENET_URL, _TINY_IMAGENET_MD5, Path(root), "Tiny-ImageNet")
    if not wnids_path.exists():
        raise _missing(wnids_path, "Tiny-ImageNet", _TINY_IMAGENET_URL, "load_tiny_imagenet")
    wnids = sorted(line.strip() for line in wnids_path.read_text().splitlines() if line.strip())
    cache_path = folder / f"gradiv_cache_{split}.pt"
    if cache and cache_path.exists():
        stored = torch.load(cache_path, weights_only=True)
        images, targets = stored["images"], stored["labels"]
    else:
        images, targets = _decode_tiny_imagenet(folder, split, wnids)
        if cache:
            handle, partial = tempfile.mkstemp(dir=folder, suffix=".part")
            os.close(handle)
            try:
                torch.save({"images": images, "labels": targets}, partial)
                os.replace(partial, cache_path)
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
    info = {"dataset": "tiny-imagenet", "classes": wnids, "mean": tuple(mean), "std": tuple(std)}
    x = _normalize_images(images, mean if normalize else None, std if normalize else None, dtype)
    return InMemoryData(x, targets, info).to(device)


def _decode_tiny_imagenet(folder: Path, split: str, wnids: list[str]) -> tuple[Tensor, Tensor]:
    try:
        from PIL import Image
    except ImportError as error:  # pillow comes with matplotlib; say so if it is missing
        raise ImportError("load_tiny_imagenet needs Pillow: pip install pillow") from error
    class_index = {wnid: k for k, wnid in enumerate(wnids)}
    entries: list[tuple[Path, int]] = []
    if split == "train":
        for wnid in wnids:
            image_dir = folder / "train" / wnid / "images"
            if not image_dir.is_dir():
                raise FileNotFoundError(f"Tiny-ImageNet class folder missing: expected {image_dir}")
            entries += [(path, class_index[wnid]) for path in sorted(image_dir.glob("*.JPEG"))]
    else:
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.exists():
            raise FileNotFoundError(
                f"Tiny-ImageNet validation labels missing: expected {annotations}"
            )
        for line in annotations.read_text().splitlines():
            if line.strip():
                name, wnid = line.split("\t")[:2]
                entries.append((folder / "val" / "images" / name, class_index[wnid]))
    if not entries:
        raise FileNotFoundError(f"no Tiny-ImageNet {split} images found under {folder}")
    images = np.empty((len(entries), 3, 64, 64), dtype=np.uint8)
    for i, (path, _) in enumerate(entries):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape != (64, 64, 3):
            raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected 64x64")
        images[i] = pixels.transpose(2, 0, 1)
    labels = torch.tensor([label for _, label in entries], dtype=torch.long)
    return torch.from_numpy(images), labels


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def augment_batch(
    x: Tensor,
    generator: torch.Generator | None = None,
    padding: int = 4,
    flip: bool = True,
    fill: float | Sequence[float] = 0.0,
) -> Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch on its device.

    Each image of ``x`` (``(B, C, H, W)``) is padded by ``padding`` pixels on every side, cut back
    to ``H × W`` at a uniformly random offset in ``[0, 2·padding]²`` and, with ``flip``, mirrored
    left–right with probability ½ — the CIFAR recipe (``RandomCrop(32, padding=4)`` +
    ``RandomHorizontalFlip``). One gather does both, so it costs about one copy of the batch.

    ``fill`` is the value of the padded border in the units of ``x`` (per channel if a
    sequence). On standardised images 0 is the mean colour; torchvision pads the raw image with
    black, i.e. ``fill = -mean / std`` per channel.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    _check_positive_int(padding, "padding", minimum=0)
    b, c, h, w = x.shape
    fill_values = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if fill_values.numel() not in (1, c):
        raise ValueError(f"fill needs 1 or {c} values (one per channel), got {fill_values.numel()}")
    padded = F.pad(x, (padding,) * 4) if padding else x
    if padding and bool((fill_values != 0).any()):
        border = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        border = F.pad(border, (padding,) * 4) == 0
        padded = torch.where(border, fill_values.view(1, -1, 1, 1).expand(1, c, 1, 1), padded)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=draw_device)
    mirrored = (
        torch.rand(b, generator=generator, device=draw_device) < 0.5
        if flip
        else torch.zeros(b, dtype=torch.bool, device=draw_device)
    )
    offsets, mirrored = offsets.to(x.device), mirrored.to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols_forward = torch.arange(w, device=x.device)
    cols = offsets[1, :, None] + torch.where(
        mirrored[:, None], (w - 1) - cols_forward, cols_forward
    )  # (B, W)
    batch_index = torch.arange(b, device=x.device)[:, None, None, None]
    channel_index = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------------
# Client partitions
# --------------------------------------------------------------------------------------------


def _check_clients(n_samples: int, n_clients: int) -> None:
    _check_positive_int(n_clients, "n_clients")
    if n_clients > n_samples:
        raise ValueError(
            f"n_clients={n_clients} is more than the number of samples ({n_samples}); every "
            f"client needs at least one sample, so use n_clients <= {n_samples}"
        )


def partition_iid(n_samples: int, n_clients: int, seed: int = 0) -> list[Tensor]:
    """Split ``range(n_samples)`` uniformly at random into ``n_clients`` parts.

    Part sizes differ by at most one. Returns a list of sorted ``LongTensor`` index arrays whose
    union is exactly ``range(n_samples)``.
    """
    _check_positive_int(n_samples, "n_samples")
    _check_clients(n_samples, n_clients)
    perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in torch.tensor_split(perm, n_clients)]


def partition_dirichlet(
    labels: Tensor | Sequence[int] | np.ndarray,
    n_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[Tensor]:
    r"""Label-skewed partition by per-class Dirichlet proportions.

    For every class :math:`k`, draw :math:`p_k\sim\mathrm{Dir}_J(\alpha\mathbf 1)` over the
    :math:`J` clients and deal the (shuffled) samples of class :math:`k` out in those
    proportions. Small :math:`\alpha` gives each client few classes; :math:`\alpha\to\infty`
    tends to IID. This is the "hetero-dir" / "noniid-labeldir" split of Yurochkin et al. (2019),
    Hsu et al. (2019) and NIID-Bench / FedLab, including their balancing step: a client that
    already holds more than :math:`N/J` samples gets no share of later classes. The whole draw
    is repeated until every client has at least ``min_size`` samples, at most ``max_tries``
    times.

    Parameters
    ----------
    labels : 1-D integer tensor or sequence
        Class label of every sample.
    n_clients : int
        Number of clients :math:`J`.
    alpha : float
        Concentration :math:`\alpha > 0`.
    seed : int
        Seed (NumPy generator): the same seed gives the same partition.
    min_size : int
        Smallest allowed client, ``0 <= min_size <= N / n_clients`` (0 accepts empty clients
        and never re-draws).
    max_tries : int
        Bound on the number of re-draws.

    Returns
    -------
    list of LongTensor
        Sorted sample indices of each client; together exactly ``range(N)``.

    Raises
    ------
    RuntimeError
        When no draw in ``max_tries`` gives every client ``min_size`` samples.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_clients(n, n_clients)
    if not (isinstance(alpha, (int, float, np.number)) and 0 < float(alpha) < math.inf):
        raise ValueError(
            f"alpha must be a finite number > 0 (Dirichlet concentration), got {alpha}"
        )
    _check_positive_int(min_size, "min_size", minimum=0)
    _check_positive_int(max_tries, "max_tries")
    if min_size * n_clients > n:
        raise ValueError(
            f"min_size={min_size} is impossible for {n_clients} clients and {n} samples; use "
            f"min_size <= {n // n_clients}"
        )
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    classes = np.unique(labels_np)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for k in classes:
            members = rng.permutation(np.flatnonzero(labels_np == k))
            proportions = rng.dirichlet(np.full(n_clients, float(alpha)))
            proportions = proportions * (sizes < n / n_clients)
            total = proportions.sum()
            proportions = proportions / total if total > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(proportions) * len(members)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(chunks))).long() for chunks in parts]
    raise RuntimeError(
        f"no Dirichlet draw in max_tries={max_tries} gave every one of {n_clients} clients at "
        f"least min_size={min_size} samples (alpha={alpha}); lower min_size or n_clients, raise "
        f"alpha or max_tries"
    )


def partition_shards(
    labels: Tensor | Sequence[int] | np.ndarray,
    n_clients: int,
    shards_per_client: int,
    seed: int = 0,
) -> list[Tensor]:
    """Pathological non-IID split of McMahan et al. (2017): label-sorted shards.

    Sort the samples by label (random order within a class), cut the sorted list into
    ``n_clients * shards_per_client`` contiguous shards of equal size (sizes differ by at most
    one when it does not divide), and give each client ``shards_per_client`` shards chosen at
    random. A client then sees at most ``shards_per_client`` labels when every class size is a
    multiple of the shard size (MNIST: 200 shards of 300); otherwise a shard can straddle two
    classes and a client may see up to ``2 * shards_per_client`` labels.

    Returns
    -------
    list of LongTensor
        Sorted sample indices of each client; together exactly ``range(N)``.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_clients(n, n_clients)
    _check_positive_int(shards_per_client, "shards_per_client")
    n_shards = n_clients * shards_per_client
    if n_shards > n:
        raise ValueError(
            f"n_clients * shards_per_client = {n_clients} * {shards_per_client} = {n_shards} "
            f"shards is more than the {n} samples; every shard needs at least one sample"
        )
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n, generator=generator)
    by_label = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    shards = torch.tensor_split(by_label, n_shards)
    assignment = torch.randperm(n_shards, generator=generator).reshape(n_clients, shards_per_client)
    return [torch.cat([shards[s] for s in row.tolist()]).sort().values for row in assignment]


# --------------------------------------------------------------------------------------------
# Continual-learning task streams
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One task of a continual-learning stream.

    Attributes
    ----------
    name : str
        E.g. ``"permuted-3"``.
    train : InMemoryData
        Training data of the task.
    test : InMemoryData or None
        Held-out data transformed the same way, when a test set was given and is meaningful.
    info : dict
        How the task was made (the pixel permutation, the label map, the classes, ...).
    """

    name: str
    train: InMemoryData
    test: InMemoryData | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _stream_inputs(
    data: InMemoryData | tuple[Tensor, Tensor],
    test: InMemoryData | tuple[Tensor, Tensor] | None,
    n_tasks: int,
) -> tuple[InMemoryData, InMemoryData | None]:
    _check_positive_int(n_tasks, "n_tasks")
    train = _as_data(data, "data")
    return train, (None if test is None else _as_data(test, "test"))


def _num_classes(*datasets: InMemoryData | None) -> int:
    return max(d.num_classes for d in datasets if d is not None)


def permuted_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    n_tasks: int,
    seed: int = 0,
    test: InMemoryData | tuple[Tensor, Tensor] | None = None,
    identity_first: bool = False,
) -> list[Task]:
    """Permuted-input tasks ("permuted MNIST"): one fixed random permutation of the input
    features per task, applied to every sample (train and test alike); labels unchanged.

    By default every task, task 0 included, uses a random permutation, so all tasks are equally
    hard (the plasticity benchmarks of Dohare et al. and Kumar et al.); ``identity_first=True``
    keeps the original inputs as task 0 (the convention of Kirkpatrick et al.'s EWC paper).
    Works for any input shape: the features of each sample are flattened, permuted and
    reshaped. ``info["permutation"]`` holds the permutation.
    """
    train, test = _stream_inputs(data, test, n_tasks)

    def permute(d: InMemoryData, perm: Tensor) -> InMemoryData:
        flat = d.x.reshape(len(d), -1)[:, perm.to(d.device)]
        return InMemoryData(flat.reshape(d.x.shape), d.y, d.info)

    return _permutation_stream("permuted", "permutation", train, test, n_tasks, train.x[0].numel(), permute,
                               seed, identity_first)


def random_label_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    n_tasks: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> list[Task]:
    """Random-label tasks (memorisation; Lyle et al. 2023, Kumar et al.): the same inputs with
    fresh labels drawn uniformly from ``num_classes`` classes for every task.

    There is nothing to generalise, so the tasks have no test set; the metric is training
    accuracy at the end of each task. ``num_classes`` defaults to ``max(y) + 1`` of ``data``.
    """
    train, _ = _stream_inputs(data, None, n_tasks)
    classes = train.num_classes if num_classes is None else num_classes
    _check_positive_int(classes, "num_classes", minimum=2)
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        labels = torch.randint(classes, (len(train),), generator=generator).to(train.device)
        tasks.append(Task(f"random-labels-{t}", InMemoryData(train.x, labels, train.info)))
    return tasks


def label_permutation_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    n_tasks: int,
    seed: int = 0,
    test: InMemoryData | tuple[Tensor, Tensor] | None = None,
    identity_first: bool = False,
) -> list[Task]:
    """Label-permutation ("label flip") tasks: the same inputs, classes renamed by a fresh random
    permutation :math:`\\pi_t` per task (``y -> pi_t[y]``, train and test alike).

    Task 0 is permuted too unless ``identity_first``. ``info["label_map"]`` holds
    :math:`\\pi_t`.
    """
    train, test = _stream_inputs(data, test, n_tasks)

    def relabel(d: InMemoryData, label_map: Tensor) -> InMemoryData:
        return InMemoryData(d.x, label_map.to(d.device)[d.y], d.info)

    return _permutation_stream("label-permutation", "label_map", train, test, n_tasks, _num_classes(train, test),
                               relabel, seed, identity_first)


def _permutation_stream(name: str, info_key: str, train: InMemoryData, test: InMemoryData | None, n_tasks: int,
                        size: int, transform, seed: int, identity_first: bool) -> list[Task]:
    """Tasks ``transform(data, pi_t)`` with a fresh random permutation ``pi_t`` of ``range(size)`` per task
    (the identity for task 0 when ``identity_first``), applied to train and test alike."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(size) if t == 0 and identity_first else torch.randperm(size, generator=generator)
        tasks.append(Task(f"{name}-{t}", transform(train, perm), None if test is None else transform(test, perm),
                          {info_key: perm}))
    return tasks


def class_incremental_tasks(
    data: InMemoryData | tuple[Tensor, Tensor],
    classes_per_task: int,
    test: InMemoryData | tuple[Tensor, Tensor] | None = None,
    seed: int | None = None,
) -> list[Task]:
    """Class-incremental tasks: task ``t`` holds only the samples of its ``classes_per_task``
    classes (disjoint groups covering all classes).

    Classes are grouped in increasing order, or in a random order drawn from ``seed`` when it is
    given. Labels keep their original values (one shared output head over all classes).
    The number of classes must be a multiple of ``classes_per_task``. ``info["classes"]`` lists
    the task's classes.
    """
    train, test = _stream_inputs(data, test, 1)
    classes = _num_classes(train, test)
    _check_positive_int(classes_per_task, "classes_per_task")
    if classes % classes_per_task:
        raise ValueError(
            f"classes_per_task={classes_per_task} does not divide the {classes} classes; use a "
            f"divisor of {classes}"
        )
    order = (
        torch.arange(classes)
        if seed is None
        else torch.randperm(classes, generator=torch.Generator().manual_seed(seed))
    )
    tasks = []
    for group in order.reshape(-1, classes_per_task):

        def select(d: InMemoryData, group: Tensor = group) -> InMemoryData:
            return d.subset(torch.nonzero(torch.isin(d.y, group.to(d.device))).flatten())

        tasks.append(
            Task(
                f"classes-{'-'.join(str(c) for c in group.tolist())}",
                select(train),
                None if test is None else select(test),
                {"classes": group.tolist()},
            )
        )
    return tasks
