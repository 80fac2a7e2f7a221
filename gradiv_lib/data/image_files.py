"""Readers of the real image data sets (CIFAR-10/100, Tiny-ImageNet) from a local folder; download only when asked."""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import InMemoryData

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


