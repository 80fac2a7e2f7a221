"""Argument validation shared by the plasticity modules (right or loud: name, value, what is valid)."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

def _check_number(value: Any, name: str, *, minimum: float = 0.0, strict: bool = False, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= minimum if strict else value < minimum) or value > maximum:
        lo = f"> {minimum}" if strict else f">= {minimum}"
        hi = "" if maximum == math.inf else f" and <= {maximum}"
        raise ValueError(f"{name} must be {lo}{hi}, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
