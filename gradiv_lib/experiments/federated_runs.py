"""Federated runs from the command line (``gradiv federated``, chapter 7): digits over Dirichlet-skewed clients.

Each server optimizer of :mod:`gradiv_lib.federated` named in ``servers`` runs
:func:`gradiv_lib.federated.run_federated` on the same federation (an MLP 64-32-10; ``n_clients`` clients with a
Dirichlet(``alpha``) label skew, every client at least 5 samples; ``per_round`` sampled per round) and the same
local work (``hetero+``: FedAWARE's system heterogeneity, epochs 2-5 and batch sizes drawn per client and round;
``steps10``: ten steps of batch 10). With ``flower=True`` the rounds run over Flower's gRPC on this machine
(:func:`gradiv_lib.flower.run_local_federation`), which must give the simulator's parameters.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_WORK", "run"]

#: The local-work settings by name (arguments of :class:`gradiv_lib.federated.LocalWork`, without the lr).
LOCAL_WORK: dict[str, dict[str, Any]] = {"hetero+": dict(batch_size=(5, None), epochs=(2, 5)),
                                         "steps10": dict(batch_size=10, steps=10)}


def run(*, servers: Sequence[str] = ("fedavg", "fedaware"), rounds: int = 30, n_clients: int = 100,
        per_round: int = 10, alpha: float = 0.3, local_work: str = "hetero+", lr: float = 0.05,
        seeds: Sequence[int] | None = None, flower: bool = False, out: str | Path | None = None,
        name: str | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run every server for ``rounds`` rounds and save ``federated/<name>``; returns the path and the payload."""
    import numpy as np
    from tqdm.auto import tqdm

    from .. import data as gdata
    from .. import federated as fed
    from .. import models, results

    if local_work not in LOCAL_WORK:
        raise ValueError(f"local_work must be one of {', '.join(LOCAL_WORK)}, got {local_work!r}")
    seeds = [0] if seeds is None else [int(s) for s in seeds]
    config = dict(data="digits", model="mlp 64-32-10", servers=list(servers), rounds=int(rounds), n_clients=n_clients,
                  per_round=per_round, alpha=alpha, min_size=5, local_work=local_work, lr=lr, seeds=seeds,
                  flower=flower)
    root = results.check_out(out)
    train, test = gdata.load_digits(seed=0)
    start = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(servers) * len(seeds) * rounds, desc="federated", unit="round", disable=not progress)
    for server in servers:
        for seed in seeds:
            part = gdata.partition_dirichlet(train.y, n_clients, alpha, seed=seed, min_size=5)
            work = fed.LocalWork(lr=lr, **LOCAL_WORK[local_work])
            federation = fed.Federation(models.mlp(64, 32, 2, 10, seed=seed), train, part, work, seed=seed)
            bar.set_postfix_str(f"{server} seed {seed}")
            if flower:
                from .. import flower as fl

                strategy = fl.make_strategy(server, federation, per_round=per_round, seed=seed)
                params, _ = fl.run_local_federation(federation, strategy, rounds)
                evaluation = federation.evaluate(params, test)
                record = {"round": [rounds], "test_accuracy": [evaluation.get("accuracy", float("nan"))],
                          "test_loss": [evaluation["loss"]]}
                bar.update(rounds)
            else:
                with tempfile.TemporaryDirectory() as tmp:   # one round per call, resumed from the checkpoint
                    ckpt = Path(tmp) / "run.pt"
                    for t in range(1, rounds + 1):
                        history = fed.run_federated(federation, server, t, per_round=per_round, test=test, seed=seed,
                                                    checkpoint=ckpt, checkpoint_every=1)
                        bar.update(1)
                keep = ("round", "test_accuracy", "test_loss", "train_loss", "train_accuracy", "diversity",
                        "weighted_diversity", "direction_norm")
                record = {k: np.round(np.asarray(history[k], dtype=float), 6).tolist() for k in keep if k in history}
            runs.setdefault(server, {})[str(seed)] = record
    bar.close()
    summary = {server: {"final_test_accuracy": float(np.median([r["test_accuracy"][-1] for r in by_seed.values()]))}
               for server, by_seed in runs.items()}
    seconds = time.perf_counter() - start
    path = results.save(f"federated/{name or 'digits_' + '_'.join(servers)}", {"runs": runs, "summary": summary},
                        config=config, seconds=seconds, device="cpu", root=root)
    return path, json.loads(path.read_text())
