"""Long runs behind the book, from the command line: ``gradiv NAME`` (or ``python -m gradiv_lib NAME``).

* ``divebatch`` (chapter 4, :mod:`gradiv_lib.experiments.divebatch`): DiveBatch vs SGD small/large batch vs
  AdaBatch; the quick digits run (seconds) or, with ``--full``, the DiveBatch paper's ResNet-18 protocol (a GPU).
* ``width`` (chapter 3, :mod:`gradiv_lib.experiments.width`): gradient diversity and the large-batch knee across a
  fixed-parameter-budget family of depths and widths.
* ``plasticity`` (chapter 8, :mod:`gradiv_lib.experiments.continual`): regularizers against loss of plasticity.
* ``federated`` (chapter 7, :mod:`gradiv_lib.experiments.federated_runs`): server optimizers on skewed clients;
  with ``--flower`` (:mod:`gradiv_lib.experiments.flower_check`) the simulator against a Flower deployment.

Each writes a small JSON (configuration, command, versions, commit, device, seconds, results) with
:func:`gradiv_lib.results.save` under ``./gradiv-results`` (or ``--out DIR``) and prints its path. The results
the book's pages load ship with the library; :mod:`gradiv_lib.experiments.registry` lists them and
:mod:`gradiv_lib.experiments.regenerate` remakes them. The sub-modules are imported on first use, so the command
line starts without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULES = ("continual", "divebatch", "federated_runs", "flower_check", "regenerate", "registry", "width")

#: Experiment name → module with a ``run(...)`` function.
EXPERIMENT_MODULES = {"divebatch": "divebatch", "width": "width", "plasticity": "continual",
                      "federated": "federated_runs"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "EXPERIMENTS":
        return {key: importlib.import_module(f"{__name__}.{module}") for key, module in EXPERIMENT_MODULES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EXPERIMENTS", "EXPERIMENT_MODULES", *_MODULES]
