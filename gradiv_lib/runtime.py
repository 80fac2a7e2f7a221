"""Set-up helpers: seeds, threads, device, and the book's one-line notebook set-up.

``gl.setup(seed)`` seeds everything and returns the device; it changes torch's thread count only when
asked (``threads=`` or ``$GRADIV_THREADS``) and says what it set. ``gl.setup_book(seed)`` is the first
line of every chapter: the same, plus the book's figure style and one CPU thread, so the same call works
in Colab, Binder, a local Jupyter and the book's build. ``gl.glue`` records a number for the book's text
(through ``myst_nb`` when the book toolchain is installed, and harmlessly without it).
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

__all__ = ["GLUED", "default_threads", "glue", "pick_device", "seed_everything", "setup", "setup_book"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64) (torch's range), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_DEVICE_HELP = "use 'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'"


def pick_device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` or ``$GRADIV_DEVICE`` if given, else CUDA when present, else CPU."""
    source = "device" if prefer else "GRADIV_DEVICE"
    prefer = prefer or os.environ.get("GRADIV_DEVICE") or "auto"
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{source} {prefer!r} is not a device; {_DEVICE_HELP}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source} {prefer!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{source} {prefer!r} was asked for but MPS is not available; use 'cpu' or 'auto'")
    return device


def _threads_from_env() -> int | None:
    env = os.environ.get("GRADIV_THREADS")
    if env is None:
        return None
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"GRADIV_THREADS must be a positive integer, got {env!r}")
    return int(env)


def default_threads() -> int:
    """Threads for the book's CPU work: ``$GRADIV_THREADS`` if set, else 1.

    The book's notebooks train small models, for which one thread is as fast as several, and
    oversubscribed OpenMP threads (two notebooks, or a notebook beside a build, on two cores) are many
    times slower. Set ``GRADIV_THREADS`` for bigger CPU work.
    """
    env = _threads_from_env()
    return 1 if env is None else env


def setup(seed: int = 0, *, threads: int | None = None, device: str | None = None,
          style: bool = False, verbose: bool = True) -> torch.device:
    """Seed everything and pick the device; change global settings only when asked. Returns the device.

    Parameters
    ----------
    seed : int
        Seed for ``random``, NumPy and torch.
    threads : int, optional
        Calls ``torch.set_num_threads(threads)``. Default: ``$GRADIV_THREADS`` if set, else torch's
        thread count is left as it is.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"``; default :func:`pick_device`.
    style : bool
        Apply the book's matplotlib style globally (:func:`gradiv_lib.plotting.use_book_style`). To use it
        for a few figures only: ``with plt.style.context(gl.plotting.STYLE): ...``.
    verbose : bool
        Print one line saying what was set.
    """
    seed_everything(seed)
    chosen = pick_device(device)
    said = [f"seed {seed}", f"device {chosen}"]
    if threads is None:
        threads = _threads_from_env()
        origin = " (from GRADIV_THREADS)"
    else:
        origin = ""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
        said.append(f"torch threads {threads}{origin}")
    if style:
        from .plotting import use_book_style

        use_book_style()
        said.append("the book's figure style")
    if verbose:
        print("gradiv_lib.setup: " + ", ".join(said))
    return chosen


def setup_book(seed: int = 0, *, device: str | None = None, verbose: bool = True) -> torch.device:
    """The first line of every chapter: :func:`setup` with the book's figure style and
    :func:`default_threads` CPU threads (one, unless ``$GRADIV_THREADS`` says otherwise)."""
    return setup(seed, threads=default_threads(), device=device, style=True, verbose=verbose)


#: Every value glued in this process, by name (what ``myst_nb`` would put in the page).
GLUED: dict[str, Any] = {}


def glue(name: str, value: object, display: bool = False) -> None:
    """Record ``value`` under ``name`` for the book's text (``{glue:text}`name```).

    NumPy and torch scalars become Python numbers (the book formats glued numbers from their text form,
    which NumPy 2 writes as ``np.float64(...)``). With the book toolchain (``myst_nb``) installed this is
    ``myst_nb.glue``; without it (Colab, Binder, your own Jupyter) the value is kept in :data:`GLUED`
    and shown only if ``display`` is true.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    GLUED[name] = value
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            try:
                from IPython.display import display as show
            except ImportError:
                print(f"{name} = {value!r}")
            else:
                show(value)
        return
    myst_glue(name, value, display=display)
