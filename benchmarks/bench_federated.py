"""Federated rounds per second: all sampled clients' local SGD as stacked tensors against a loop over model copies.

Setup: scikit-learn digits (1 437 training samples), 100 clients (Dirichlet α = 0.3 label skew), 10 sampled per
round (every client >= 5 samples), MLP 64-32-10, FedAvg on the server. ``stacked`` is ``Federation.local_updates(backend="stacked")``: one
batched forward/backward per local step for all 10 clients (heterogeneous batch sizes as per-sample weights,
heterogeneous step counts as a mask). ``loop`` is the reference way of FedLab's serial trainer and FedAWARE's code:
for each client a ``deepcopy`` of the model, a ``torch.optim.SGD`` and its own forward/backward/step loop
(``backend="loop"``). ``stacked+fedaware`` adds FedAWARE's server (100 memories, Gram matrix, min-norm solve).

Local-work settings: ``hetero+`` is FedAWARE's "+" system heterogeneity (epochs ~ U{2..5}, batch ~ U{5..n_i-1}, the lower bound 10 of the paper lowered to 5 because digits clients are small
per client per round); ``steps10`` is 10 local steps of batch 10 for everyone.

Fairness: same model, same partition, same batches (both backends read the same per-client plans; a correctness
gate checks that they return the same updates), float32, ``torch.set_num_threads(T)``, one warm-up, methods
interleaved (A B C A B C ...) over ``--reps`` repetitions of ``--rounds`` rounds, medians and minima.

Run: ``.venv/bin/python benchmarks/bench_federated.py [--reps 7] [--rounds 5] [--threads 1]``. Results go to
``./gradiv-results/benchmarks/federated_cpu.json`` or ``--out DIR`` (``gradiv_lib.results.save``); the copy
the book shows ships as ``gradiv_lib/_results/benchmarks/federated_cpu.json``, remade by ``gradiv regenerate``. Also
``gradiv bench federated``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradiv_lib import data as gdata, models, results  # noqa: E402
from gradiv_lib import federated as fed  # noqa: E402

N_CLIENTS, PER_ROUND = 100, 10
LOCAL = {"hetero+": fed.LocalWork(lr=0.05, batch_size=(5, None), epochs=(2, 5)),
         "steps10": fed.LocalWork(lr=0.05, batch_size=10, steps=10)}


def make(local: fed.LocalWork) -> fed.Federation:
    train, _ = gdata.load_digits(seed=0)
    part = gdata.partition_dirichlet(train.y, N_CLIENTS, 0.3, seed=0, min_size=5)
    return fed.Federation(models.mlp(64, 32, 2, 10, seed=0), train, part, local, seed=0)


_STARTUP: dict[int, dict] = {}


def startup_state(f: fed.Federation) -> dict:
    if id(f) not in _STARTUP:
        s = fed.FedAWARE(f.initial_params(), f.n_clients)
        everyone = list(range(f.n_clients))
        up, _ = f.local_updates(s.params, everyone, -1 % 1_000_000)
        s.aggregate(0, everyone, up, f.shard_sizes)
        _STARTUP[id(f)] = s.state_dict()
    return _STARTUP[id(f)]


def rounds_runner(f: fed.Federation, server: str, backend: str, n_rounds: int):
    state = {"r": 0}

    def run():
        s = fed.make_server(server, f.initial_params(), f.n_clients)
        if server == "fedaware":  # FedAWARE's startup round (all clients once) is not timed
            s.load_state_dict(startup_state(f))
        for _ in range(n_rounds):
            t = state["r"]
            clients = fed.sample_clients(f.n_clients, PER_ROUND, t, seed=0)
            up, _ = f.local_updates(s.params, clients, t, backend=backend)
            s.aggregate(t, clients, up, [f.shard_sizes[c] for c in clients])
            state["r"] += 1
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-save", action="store_true", help="print the table only")
    ap.add_argument("--out", type=Path, metavar="DIR", help="folder for the result (default: ./gradiv-results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for name, local in LOCAL.items():
        f = make(local)
        clients = fed.sample_clients(N_CLIENTS, PER_ROUND, 0, seed=0)
        a, info = f.local_updates(f.initial_params(), clients, 0)
        b, _ = f.local_updates(f.initial_params(), clients, 0, backend="loop")
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 1e-4, f"stacked and loop disagree ({err:.2e})"
        methods = {"loop": rounds_runner(f, "fedavg", "loop", args.rounds),
                   "stacked": rounds_runner(f, "fedavg", "stacked", args.rounds),
                   "stacked+fedaware": rounds_runner(f, "fedaware", "stacked", args.rounds)}
        for m in methods.values():
            m()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(args.reps):
            for k, m in methods.items():
                t0 = time.perf_counter()
                m()
                times[k].append((time.perf_counter() - t0) / args.rounds)
        row = {"local_work": name, "mean_local_steps_round0": statistics.mean(info["steps"]), "max_rel_err": err,
               **{f"{k}_median_ms_per_round": 1e3 * statistics.median(v) for k, v in times.items()},
               **{f"{k}_min_ms_per_round": 1e3 * min(v) for k, v in times.items()}}
        for k in methods:
            row[f"{k}_rounds_per_s"] = 1e3 / row[f"{k}_median_ms_per_round"]
        row["speedup_stacked_vs_loop"] = row["loop_median_ms_per_round"] / row["stacked_median_ms_per_round"]
        row["speedup_stacked_fedaware_vs_loop"] = row["loop_median_ms_per_round"] / row["stacked+fedaware_median_ms_per_round"]
        rows.append(row)
    print(f"load average after:  {os.getloadavg()}")
    print(f"\n{N_CLIENTS} clients, {PER_ROUND} per round, digits MLP 64-32-10, threads={args.threads}; rounds/s (median)")
    print(f"{'local work':10} {'loop':>8} {'stacked':>8} {'+fedaware':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['local_work']:10} {r['loop_rounds_per_s']:8.1f} {r['stacked_rounds_per_s']:8.1f} "
              f"{r['stacked+fedaware_rounds_per_s']:10.1f} {r['speedup_stacked_vs_loop']:8.2f}x")
    if not args.no_save:
        path = results.save("benchmarks/federated_cpu", {"rows": rows},
                            config={"n_clients": N_CLIENTS, "per_round": PER_ROUND, "model": "mlp 64-32-10",
                                    "data": "digits, Dirichlet 0.3", "reps": args.reps, "rounds": args.rounds,
                                    "threads": args.threads,
                                    "local_work": {k: str(v) for k, v in LOCAL.items()}},
                            seconds=time.perf_counter() - t_start, root=args.out)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
