"""One simulated step of K workers: the stacked simulator against a Python loop over K model copies.

The loop is how reference code simulates workers (Zhu et al.'s D-SGD code, FedLab's serial trainer): K ``nn.Module``
copies, K ``torch.optim.SGD`` optimizers, a forward/backward/step per worker and, for D-SGD, a Python loop over
each worker's neighbours to mix parameters. The simulator does the same arithmetic on stacked ``(K, P)`` tensors
(``gradiv_lib.workers.Simulator``).

``simulator`` is ``backend="auto"``, which times every engine on all workers at once and on chunks of 16, 8 and 4
workers on the first batch and keeps the fastest (reported as ``engine/chunk``); the ``sim_*`` columns are the
engines on all workers at once.

Fairness (research notes, performance_anchors §8.1): the same model weights and the same batches for both, fp32,
``torch.set_num_threads(T)``, >= 3 warm-up steps, methods interleaved (A B C A B C ...), medians and minima over
the repetitions, the machine's load printed before and after. A correctness gate checks that both reach the same
parameters after two steps before anything is timed. Inputs are random tensors of the digits shapes (64 features
for the MLP 64-64-10, 1x8x8 images for the CNN) so that every K gets a per-worker batch of 32.

Run: ``.venv/bin/python benchmarks/bench_workers.py [--reps 30] [--threads 1]``. Results go to
``./gradiv-results/benchmarks/workers_cpu.json`` or ``--out DIR`` (``gradiv_lib.results.save``); the copy
the book shows ships as ``gradiv_lib/_results/benchmarks/workers_cpu.json``, remade by ``gradiv regenerate``. Also
``gradiv bench workers``; chapter 6 shows the table.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradiv_lib import models, results  # noqa: E402
from gradiv_lib.data import InMemoryData, partition_iid  # noqa: E402
from gradiv_lib.workers import DSGD, SGD, LocalSGD, Simulator, ring  # noqa: E402
from gradiv_lib.workers._engines import eligible_engines  # noqa: E402
from gradiv_lib.workers.simulator import _StackedComm  # noqa: E402

BATCH = 32
LR, MOMENTUM = 0.05, 0.9


def make_model(name: str):
    if name == "mlp":
        return models.mlp(64, 64, 2, 10, seed=0), (64,)
    return models.cnn(1, 16, 2, 10, image_size=8, seed=0), (1, 8, 8)


class LoopWorkers:
    """The reference way: K modules, K optimizers, Python loops."""

    def __init__(self, model, data, partition, sampler, algorithm):
        self.models = [copy.deepcopy(model) for _ in partition]
        self.optims = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in self.models]
        self.data, self.sampler, self.algorithm = data, sampler, algorithm
        self.step_count = 0
        if isinstance(algorithm, DSGD):
            W = algorithm.topology.matrix()
            self.neighbours = [[(k, float(W[j, k])) for k in torch.nonzero(W[j]).flatten().tolist()] for j in range(len(partition))]

    def step(self):
        idx = self.sampler.indices(self.step_count, self.step_count + 1)[0]
        for j, (m, opt) in enumerate(zip(self.models, self.optims)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(self.data.x[idx[j]]), self.data.y[idx[j]]).backward()
        if isinstance(self.algorithm, DSGD):  # mix the pre-step snapshots, neighbours only (sparse-aware)
            with torch.no_grad():
                snaps = [[p.detach().clone() for p in m.parameters()] for m in self.models]
                for j, m in enumerate(self.models):
                    for i, p in enumerate(m.parameters()):
                        p.copy_(sum(w * snaps[k][i] for k, w in self.neighbours[j]))
        for opt in self.optims:
            opt.step()
        self.step_count += 1

    def flat(self):
        return torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in self.models])


def time_interleaved(methods: dict, reps: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)} for name, t in times.items()}


def bench_step(model_name: str, K: int, algorithm_name: str, reps: int) -> dict:
    model, shape = make_model(model_name)
    g = torch.Generator().manual_seed(0)
    n = K * BATCH * 4
    data = InMemoryData(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    partition = partition_iid(n, K, seed=0)
    algorithm = DSGD(ring(K)) if algorithm_name == "dsgd_ring" else LocalSGD(10**9)
    opt = SGD(LR, momentum=MOMENTUM)

    def simulator(backend):
        return Simulator(model, data, algorithm, opt, partition=partition, batch_size=BATCH, backend=backend)

    # correctness gate: two steps of the loop and of the simulator (auto) agree
    loop = LoopWorkers(model, data, partition, simulator("loop").sampler, algorithm)
    auto = simulator("auto")
    for _ in range(2):
        loop.step()
        auto.step()
    scale = loop.flat().abs().max().item()
    gate = (loop.flat() - auto.params).abs().max().item()
    if gate > 1e-4 * scale:
        raise AssertionError(f"simulator and loop disagree by {gate:.3g} for {model_name} K={K} {algorithm_name}")
    methods = {"loop": loop.step, "simulator": auto.step}
    fixed = {}
    for backend in eligible_engines(model):
        fixed[backend] = simulator(backend)
        methods[f"sim_{backend}"] = fixed[backend].step
    timings = time_interleaved(methods, reps)
    row = {"model": model_name, "K": K, "algorithm": algorithm_name, "params_per_worker": auto.spec.size,
           "backend_chosen": auto.backend + (f"/{auto.worker_chunk}" if auto.worker_chunk else ""),
           "gate_max_abs_diff": gate, "timings": timings}
    row["speedup_vs_loop"] = timings["loop"]["median_ms"] / timings["simulator"]["median_ms"]
    row["best_backend_speedup_vs_loop"] = max(timings["loop"]["median_ms"] / timings[f"sim_{b}"]["median_ms"] for b in fixed)
    return row


def bench_gossip(K: int, P: int, reps: int) -> dict:
    X = torch.randn(K, P)
    topo = ring(K)
    dense, sparse = _StackedComm("dense"), _StackedComm("sparse")
    W = topo.matrix()
    neighbours = [[(k, float(W[j, k])) for k in torch.nonzero(W[j]).flatten().tolist()] for j in range(K)]
    rows = list(X)

    def python_loop():
        return [sum(w * rows[k] for k, w in neighbours[j]) for j in range(K)]

    torch.testing.assert_close(dense.mix(X, 0, topo), sparse.mix(X, 0, topo))
    t = time_interleaved({"python_loop": python_loop, "dense": lambda: dense.mix(X, 0, topo),
                          "sparse": lambda: sparse.mix(X, 0, topo)}, reps)
    return {"K": K, "P": P, "timings": t}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder for the result (default: ./gradiv-results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_before = load_average()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, load average {load_before}")
    rows = []
    header = f"{'model':5} {'K':>3} {'algorithm':10} {'P':>6} {'loop ms':>9} {'sim ms':>9} {'ratio':>6}  backend    per-backend ms"
    print(header)
    for model_name in ("mlp", "cnn"):
        for K in args.workers:
            for algorithm_name in ("local_step", "dsgd_ring"):
                row = bench_step(model_name, K, algorithm_name, args.reps)
                rows.append(row)
                t = row["timings"]
                others = ", ".join(f"{k[4:]} {v['median_ms']:.2f}" for k, v in t.items() if k.startswith("sim_"))
                print(f"{model_name:5} {K:>3} {algorithm_name:10} {row['params_per_worker']:>6} {t['loop']['median_ms']:>9.2f} "
                      f"{t['simulator']['median_ms']:>9.2f} {row['speedup_vs_loop']:>5.2f}x  {row['backend_chosen']:10} {others}",
                      flush=True)
    gossip = [bench_gossip(K, 4810, args.reps) for K in args.workers]
    print("\ngossip only (ring, P = 4810): median ms")
    for g in gossip:
        print(f"  K={g['K']:>3}: " + ", ".join(f"{k} {v['median_ms']:.3f}" for k, v in g["timings"].items()))
    load_after = load_average()
    seconds = time.perf_counter() - start
    print(f"load average before {load_before}, after {load_after}; {seconds:.1f} s")
    if not args.no_save:
        path = results.save("benchmarks/workers_cpu", {"steps": rows, "gossip": gossip,
                                                       "load_average": [load_before, load_after]},
                            config={"reps": args.reps, "threads": args.threads, "workers": args.workers,
                                    "batch_per_worker": BATCH, "optimizer": f"SGD lr {LR} momentum {MOMENTUM}",
                                    "fp": "float32"}, seconds=seconds, root=args.out)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
