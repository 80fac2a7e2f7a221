"""The standard set-up every notebook runs first: style, seeds, threads and device.

``device = gradiv_lib.setup()`` is the one line a chapter needs; the same call works in Colab,
Binder, a local Jupyter and the book's build.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .plotting import use_book_style


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` or ``$GRADIV_DEVICE`` if given, else CUDA when present, else CPU."""
    prefer = prefer or os.environ.get("GRADIV_DEVICE") or "auto"
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(prefer)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {prefer!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return device


def default_threads() -> int:
    """Threads for torch on the CPU: ``$GRADIV_THREADS`` if set, else 1.

    The book's notebooks train small models, for which one thread is as fast as several and
    oversubscribed OpenMP threads (two notebooks, or a notebook beside a build, on two cores) are many
    times slower. Set ``GRADIV_THREADS`` (or pass ``threads`` to :func:`setup`) for bigger CPU work.
    """
    env = os.environ.get("GRADIV_THREADS")
    if env is None:
        return 1
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"GRADIV_THREADS must be a positive integer, got {env!r}")
    return int(env)


def glue(name: str, value: object, display: bool = False) -> None:
    """``myst_nb.glue`` for the book's numbers, with NumPy and torch scalars turned into Python ones.

    The book formats glued numbers from their text form (``{glue:text}`key:.2f```), which
    NumPy 2 writes as ``np.float64(...)``: that would not parse.
    """
    from myst_nb import glue as myst_glue

    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    myst_glue(name, value, display=display)


def setup(seed: int = 0, *, threads: int | None = None, device: str | None = None) -> torch.device:
    """Book style, seeds, CPU thread count and device in one call; returns the device.

    Parameters
    ----------
    seed : int
        Seed for ``random``, NumPy and torch.
    threads : int, optional
        ``torch.set_num_threads``; default :func:`default_threads`.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``; default :func:`pick_device`.
    """
    use_book_style()
    seed_everything(seed)
    torch.set_num_threads(threads if threads is not None else default_threads())
    return pick_device(device)
