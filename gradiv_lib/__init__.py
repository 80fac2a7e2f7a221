"""gradiv_lib: gradient diversity for PyTorch, and the library behind the book *Gradient Diversity*.

Gradient diversity (Yin et al., 2018) of per-sample gradients :math:`g_1, \\dots, g_n` is

.. math:: \\Delta = \\frac{\\sum_i \\lVert g_i \\rVert^2}{\\lVert \\sum_i g_i \\rVert^2},

and :math:`B_S = n\\Delta` bounds the batch size up to which mini-batch SGD keeps its speed-up.

The main verbs are here at the top level; each lives in the module of its idea (``gl.norms``,
``gl.diversity``, ``gl.batching``, ``gl.training``, ...). ``import gradiv_lib`` itself imports nothing
heavy: submodules and the top-level names load on first use (the core ones need only torch, NumPy and
tqdm), and plotting, widgets, scikit-learn and Flower are imported only by the code that uses them
(install them with the ``[book]`` and ``[flower]`` extras).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Submodules, imported on first attribute access (``gl.plotting`` imports matplotlib only then).
_SUBMODULES = ("batching", "data", "diversity", "federated", "flower", "models", "norms", "plasticity", "plotting",
               "results", "runtime", "scaling", "sharpness", "training", "widgets", "workers")

#: Top-level names and the module each comes from.
_EXPORTS: dict[str, str] = {
    # per-sample gradient norms and diversity (chapters 1-2)
    "per_sample_sq_norms": "norms",
    "per_sample_sq_norms_and_grad_sum": "norms",
    "DiversityMeter": "norms",
    "gradient_diversity": "diversity",
    "DiversityResult": "diversity",
    "TwoBatchNoiseScale": "diversity",
    "EpochDiversityAccumulator": "diversity",
    # batch-size schedules (chapter 4)
    "FixedBatch": "batching",
    "AdaBatch": "batching",
    "DiveBatch": "batching",
    "NoiseScaleBatch": "batching",
    # the training loop
    "train": "training",
    "evaluate": "training",
    "History": "training",
    # set-up
    "setup": "runtime",
    "setup_book": "runtime",
    "seed_everything": "runtime",
    "pick_device": "runtime",
    "glue": "runtime",
}

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value   # cached: the next access skips __getattr__
        return value
    raise AttributeError(f"module 'gradiv_lib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from . import (batching, data, diversity, federated, flower, models, norms, plasticity, plotting,  # noqa: F401
                   results, runtime, scaling, sharpness, training, widgets, workers)
    from .batching import AdaBatch, DiveBatch, FixedBatch, NoiseScaleBatch  # noqa: F401
    from .diversity import DiversityResult, EpochDiversityAccumulator, TwoBatchNoiseScale, gradient_diversity  # noqa: F401
    from .norms import DiversityMeter, per_sample_sq_norms, per_sample_sq_norms_and_grad_sum  # noqa: F401
    from .runtime import glue, pick_device, seed_everything, setup, setup_book  # noqa: F401
    from .training import History, evaluate, train  # noqa: F401
