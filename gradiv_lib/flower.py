"""Flower deployment of the federated server optimizers (chapter 7.4): :mod:`gradiv_lib.federated.flower`.

Kept so that ``gradiv_lib.flower`` and ``from gradiv_lib import flower`` keep working; everything lives in
:mod:`gradiv_lib.federated.flower` (and the Flower App's components in :mod:`gradiv_lib.federated.flower_app`).
Importing it does not import Flower.
"""
from __future__ import annotations

from typing import Any

from .federated import flower as _impl
from .federated.flower import (APP_COMPONENTS, MAX_LOCAL_CLIENTS, __all__, deployment_commands,  # noqa: F401
                               fedavg_strategy, fedaware_strategy, load_client, make_strategy, require_flwr,
                               run_in_process, run_local_federation, write_deployment)


def __getattr__(name: str) -> Any:
    return getattr(_impl, name)  # GradivStrategy, LocalGrid: built when Flower is first needed
