"""Pick the fastest of several exact ways to compute the same quantity, by timing them once.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Which per-sample norm method wins (Gram form, im2col + batched GEMM, grouped convolution) depends on
the shapes *and* on the machine (GEMM efficiency for small matrices, memory bandwidth, cuDNN), so
the engine times the candidates that the FLOP model leaves in the race on the first call for a
given shape and reuses the winner for every later call with that shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

_winners: dict[Hashable, str] = {}
"""Fastest candidate name per problem key, for this process."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fastest(key: Hashable, candidates: dict[str, Callable[[], Tensor]], device: torch.device) -> Tensor:
    """Return the result of the fastest candidate for ``key``.

    On the first call for ``key`` every candidate runs twice and is timed (best of two, with device
    synchronisation); the first candidate's result is returned and the winner is remembered. All
    candidates must compute the same value (up to rounding).
    """
    if len(candidates) == 1:
        return next(iter(candidates.values()))()
    winner = _winners.get(key)
    if winner is not None:
        return candidates[winner]()
    timings: dict[str, float] = {}
    result: Tensor | None = None
    for name, candidate in candidates.items():
        timings[name] = math.inf
        for _ in range(2):
            _synchronize(device)
            start = time.perf_counter()
            value = candidate()
            _synchronize(device)
            timings[name] = min(timings[name], time.perf_counter() - start)
        result = value if result is None else result
    _winners[key] = min(timings, key=timings.__getitem__)
    return result


def within_factor(costs: dict[str, float], factor: float = 4.0) -> set[str]:
    """Names whose modelled cost is at most ``factor`` times the cheapest (the ones worth timing)."""
    cheapest = min(costs.values())
    return {name for name, cost in costs.items() if cost <= factor * cheapest}
