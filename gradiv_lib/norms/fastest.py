"""Pick the fastest of several exact ways to compute the same quantity, by timing them once.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Which per-sample norm method wins (Gram form, im2col + batched GEMM, grouped convolution) depends on
the shapes *and* on the machine (GEMM efficiency for small matrices, memory bandwidth, cuDNN), so
the engine times the candidates that the FLOP model leaves in the race on the first call for a
given shape and reuses the winner for every later call with that shape.

Timing only ever chooses among candidates that compute the same number: every time a winner is
chosen, all candidates' results are compared (to :data:`AGREEMENT_TOLERANCE` for their dtype) and a
disagreement raises instead of letting the clock pick a wrong method; the call that chooses returns
the winner's own result, so the first and the later calls use the same method.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

_winners: dict[Hashable, str] = {}
"""Fastest candidate name per problem key, for this process."""

AGREEMENT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}
"""Relative tolerance (to the largest value) within which candidates must agree; 1e-2 for half
precision, and 5e-3 for float32 on CUDA while TF32 is allowed (cuDNN allows it by default: its
convolutions then round inputs to 10 mantissa bits, the im2col GEMMs may not)."""


def _tolerance(value: Tensor) -> float:
    if value.dtype == torch.float32 and value.device.type == "cuda":
        if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
            return 5e-3
    return AGREEMENT_TOLERANCE.get(value.dtype, 1e-2)


def check_agreement(key: Hashable, results: dict[str, Tensor], scale: Tensor | None = None) -> None:
    """Raise ``RuntimeError`` if the candidates' results differ by more than rounding.

    The tolerance is relative to the largest result, or to ``scale`` when given: a bound on the size of
    the terms the results are sums of. A per-sample norm :math:`\\|\\sum_t \\delta_t a_t^\\top\\|^2` can
    cancel far below its terms, and then float32 rounding of the terms is a large share of it (a single
    sample of a 1x1 convolution over two positions: 5e-4); judged against the terms it is rounding."""
    names = list(results)
    reference = results[names[0]].double()
    size = reference.abs().max() if scale is None else torch.maximum(reference.abs().max(), scale.double().abs().max())
    size = float(size) + 1e-300
    tolerance = _tolerance(results[names[0]])
    for name in names[1:]:
        difference = float((results[name].double() - reference).abs().max())
        if not difference <= tolerance * size:
            raise RuntimeError(
                f"gradiv_lib.norms: per-sample norm methods {names[0]!r} and {name!r} disagree by "
                f"{difference / size:.3g} (relative, tolerance {tolerance:g}) for {key}; this is a bug in one of "
                "them. Force one method with sequence_strategy='gram' or 'materialize' and report the layer."
            )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_ROUNDS = 3
"""Interleaved timing rounds per candidate on the first call for a key (the best of them counts)."""


def _clock(device: torch.device) -> Callable[[], float]:
    """CPU time of this thread for single-threaded CPU work (other jobs on a shared machine then cannot
    tilt the choice: measured, wall-clock best-of-two picked the slower conv method in one run of three
    under load), wall clock otherwise (several threads, or a GPU)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def time_interleaved(candidates: dict[str, Callable[[], Any]], device: torch.device, rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Best time of each candidate over ``rounds`` interleaved rounds (a burst of other work hits every
    candidate alike), with device synchronisation and :func:`_clock`; and each one's last result.

    The order is shuffled afresh every round (seeded, so the same candidates run in the same orders):
    in a fixed order each candidate always follows the same one, and what ran just before a step
    changes its time (the benchmark measured ~2 % for a step right after a plain training step)."""
    timings: dict[str, float] = {name: math.inf for name in candidates}
    results: dict[str, Any] = {}
    clock = _clock(device)
    names = list(candidates)
    shuffler = random.Random(0)
    for _ in range(rounds):
        for name in shuffler.sample(names, len(names)):
            _synchronize(device)
            start = clock()
            results[name] = candidates[name]()
            _synchronize(device)
            timings[name] = min(timings[name], clock() - start)
    return timings, {name: results[name] for name in names}  # in the candidates' order


def run_fastest(
    key: Hashable, candidates: dict[str, Callable[[], Tensor]], device: torch.device, scale: Callable[[], Tensor] | None = None
) -> Tensor:
    """Return the result of the fastest candidate for ``key``.

    On the first call for ``key`` every candidate runs :data:`_ROUNDS` times, interleaved, and is timed
    (best of the rounds, with device synchronisation; thread CPU time for single-threaded CPU work),
    their results are checked to agree (:func:`check_agreement`, against ``scale()`` when given: the size
    of the terms), and the winner's result is returned and the winner remembered.
    """
    if len(candidates) == 1:
        return next(iter(candidates.values()))()
    winner = _winners.get(key)
    if winner is not None:
        return candidates[winner]()
    timings, results = time_interleaved(candidates, device, _ROUNDS)
    check_agreement(key, results, scale() if scale is not None else None)
    winner = min(timings, key=timings.__getitem__)
    _winners[key] = winner
    return results[winner]


def winner_of(key: Hashable) -> str | None:
    """The candidate :func:`run_fastest` chose for ``key`` (``None`` before it has chosen)."""
    return _winners.get(key)


def within_factor(costs: dict[str, float], factor: float = 4.0) -> set[str]:
    """Names whose modelled cost is at most ``factor`` times the cheapest (the ones worth timing)."""
    cheapest = min(costs.values())
    return {name for name, cost in costs.items() if cost <= factor * cheapest}
