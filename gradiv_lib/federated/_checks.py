"""Argument checks shared by the modules of :mod:`gradiv_lib.federated` (chapter 7)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_real(value: Any, name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = True) -> float:
    v = float(value) if _is_real(value) else float("nan")
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v
