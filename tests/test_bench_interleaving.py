"""The benchmark's interleaving: every method once per round, neighbours that change from round to round."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_norms  # noqa: E402


def _orders(rounds: int) -> list[list[str]]:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("plain", "gradiv_meter", "backpack", "vmap_grad")}
    wall, cpu = bench_norms.time_interleaved(steps, rounds, expensive_rounds=rounds)
    assert all(len(wall[name]) == len(cpu[name]) == rounds for name in steps)
    return [calls[r * len(steps) : (r + 1) * len(steps)] for r in range(rounds)]


def test_every_method_runs_once_per_round_with_changing_predecessors():
    orders = _orders(40)
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    predecessors = {order[order.index("gradiv_meter") - 1] for order in orders if order[0] != "gradiv_meter"}
    assert len(predecessors) == 3  # a rotating order would give the meter one fixed predecessor
    assert len({tuple(order) for order in orders}) > 10


def test_the_order_is_reproducible():
    assert _orders(12) == _orders(12)
