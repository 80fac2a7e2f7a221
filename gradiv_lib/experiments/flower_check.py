"""The simulator against a real Flower deployment (``gradiv federated --flower``, chapter 7.4).

One federation (digits in float64, an MLP 64-32-10, ``n_clients`` clients with a Dirichlet(``alpha``) label skew,
every client at least 5 samples, the local work of :data:`gradiv_lib.experiments.federated_runs.LOCAL_WORK`) runs
``rounds`` rounds of each server twice: in :func:`gradiv_lib.federated.run_federated` and as a Flower deployment on
this machine (:func:`gradiv_lib.federated.flower.run_local_federation`: ``flower-superlink``, one
``flower-supernode`` per client with its ``partition-id`` and ``flwr run``, separate processes on 127.0.0.1; every
ClientApp loads only its own shard). Records the largest parameter difference, how far the run moved the
parameters, the clients and aggregation weights of every round in both, the test accuracy of both, how many
separate processes trained, and the commands (with placeholder folder and ports).
"""
from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run", "MAX_CLIENTS"]

#: Most clients of a deployment on one machine (each is a SuperNode process).
MAX_CLIENTS = 16


def run(*, servers: Sequence[str] | None = ("fedaware",), rounds: int = 3, n_clients: int = 3, per_round: int = 2,
        alpha: float = 0.3, local_work: str = "hetero+", lr: float = 0.05, seeds: Sequence[int] | None = None,
        out: str | Path | None = None, name: str | None = None, timeout: float = 600.0,
        progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run every server (default FedAWARE) in the simulator and on Flower; save ``federated/<name>``; return the path
    and payload."""
    import json

    import numpy as np
    import torch

    from .. import data as gdata
    from .. import federated as fed
    from .. import models, results
    from ..federated import flower as fl
    from .federated_runs import LOCAL_WORK

    fl.require_flwr()
    if local_work not in LOCAL_WORK:
        raise ValueError(f"local_work must be one of {', '.join(LOCAL_WORK)}, got {local_work!r}")
    if not 1 <= n_clients <= MAX_CLIENTS:
        raise ValueError(f"n_clients must be in [1, {MAX_CLIENTS}] (one SuperNode process each), got {n_clients!r}")
    servers = ["fedaware"] if servers is None else list(servers)
    seeds = [1] if seeds is None else [int(s) for s in seeds]
    server_kwargs = {"fedaware": {"alpha": 0.5}, "fedprox": {"mu": 0.1}}
    config = dict(data="digits float64", model="mlp 64-32-10", servers=list(servers), rounds=int(rounds),
                  n_clients=n_clients, per_round=per_round, alpha=alpha, min_size=5, local_work=local_work, lr=lr,
                  seeds=seeds, server_kwargs={s: server_kwargs.get(s, {}) for s in servers}, flwr=fl.require_flwr().__version__)
    root = results.check_out(out)
    train, test = gdata.load_digits(seed=0, dtype=torch.float64)
    start = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for server in servers:
        for seed in seeds:
            part = gdata.partition_dirichlet(train.y, n_clients, alpha, seed=seed, min_size=5)
            work = fed.LocalWork(lr=lr, **LOCAL_WORK[local_work])

            def federation():
                return fed.Federation(models.mlp(64, 32, 2, 10, seed=seed).double(), train, part, work, seed=seed)

            kwargs = server_kwargs.get(server, {})
            if progress:
                print(f"flower check: {server}, seed {seed}: simulator ...", flush=True)
            t0 = time.perf_counter()
            sim = fed.run_federated(federation(), server, rounds, per_round=per_round, seed=seed, test=test,
                                    server_kwargs=kwargs)
            sim_seconds = time.perf_counter() - t0
            if progress:
                print(f"flower check: {server}, seed {seed}: a SuperLink, {n_clients} SuperNodes and flwr run ...",
                      flush=True)
            strategy = fl.make_strategy(server, federation(), per_round=per_round, seed=seed, **kwargs)
            params, info = fl.run_local_federation(federation(), strategy, rounds, timeout=timeout)
            x0 = federation().initial_params().numpy()
            pids = [pid for _, by_client in info["clients"] for pid, _ in by_client.values()]
            flower_acc = federation().evaluate(params, test)["accuracy"]
            runs.setdefault(server, {})[str(seed)] = {
                "max_abs_diff": float(np.abs(params.numpy() - sim["params"]).max()),
                "moved": float(np.abs(sim["params"] - x0).max()),
                "clients": [ids for _, ids, _ in strategy.rounds],
                "simulator_clients": [np.flatnonzero(p).tolist() for p in sim["participants"]],
                "weights": [np.round(w, 6).tolist() for _, _, w in strategy.rounds],
                "simulator_weights": np.round(sim["weights"], 6).tolist(),
                "max_weight_diff": float(max(np.abs(w - s).max() for (_, _, w), s in zip(strategy.rounds, sim["weights"]))),
                "test_accuracy": {"simulator": float(sim["test_accuracy"][-1]), "flower": float(flower_acc)},
                "client_processes": len(set(pids)), "client_messages": len(pids),
                "server_process_separate": bool(info["server_pid"] != os.getpid() and info["server_pid"] not in pids),
                "timing": {"simulator": {"seconds": round(sim_seconds, 3)},
                           "flower": {"seconds": round(info["seconds"], 3)},
                           "flower_rounds": {"seconds": round(info["server_seconds"], 3)}},
            }
    commands = [shlex.join([Path(c[0]).name, *c[1:]]) for c in fl.deployment_commands("<folder>", n_clients, port=9092)]
    seconds = time.perf_counter() - start
    summary = {s: {"max_abs_diff": max(r["max_abs_diff"] for r in by_seed.values())} for s, by_seed in runs.items()}
    path = results.save(f"federated/{name or 'flower_check'}", {"runs": runs, "summary": summary,
                                                                "commands": commands},
                        config=config, seconds=seconds, device="cpu", root=root)
    return path, json.loads(path.read_text())
