"""gradiv_lib: gradient diversity for PyTorch, and the library behind the book *Gradient Diversity*.

Gradient diversity (Yin et al., 2018) of per-sample gradients :math:`g_1, \\dots, g_n` is

.. math:: \\Delta = \\frac{\\sum_i \\lVert g_i \\rVert^2}{\\lVert \\sum_i g_i \\rVert^2},

and :math:`B_S = n\\Delta` bounds the batch size up to which mini-batch SGD keeps its speed-up.
"""
from . import (batching, data, diversity, federated, models, norms, plasticity, plotting, results, runtime, scaling,
               sharpness, train, widgets, workers)
from .runtime import glue, pick_device, seed_everything, setup

__version__ = "0.1.0"

__all__ = ["batching", "data", "diversity", "federated", "models", "norms", "plasticity", "plotting", "results", "runtime", "scaling",
           "sharpness", "train", "widgets", "workers", "glue", "pick_device", "seed_everything", "setup", "__version__"]
