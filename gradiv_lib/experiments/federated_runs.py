"""Federated runs from the command line (``gradiv federated``, chapter 7): digits over Dirichlet-skewed clients.

Each server optimizer of :mod:`gradiv_lib.federated` named in ``servers`` runs
:func:`gradiv_lib.federated.run_federated` on the same federation (an MLP 64-32-10; ``n_clients`` clients with a
Dirichlet(``alpha``) label skew, every client at least 5 samples; ``per_round`` sampled per round) and the same
local work (``hetero+``: FedAWARE's system heterogeneity, epochs 2-5 and batch sizes drawn per client and round;
``steps10``: ten steps of batch 10). With ``flower=True`` the rounds run over Flower's gRPC on this machine
(:func:`gradiv_lib.flower.run_local_federation`), which must give the simulator's parameters.

:func:`sweep` (``gradiv federated --sweep``) is chapter 7's fair comparison: every server optimizer gets its own grid
of the same size (:data:`GRIDS`: the server learning rate times the method's own key hyperparameter, each grid
containing the official scripts' setting) in every *setting* of :data:`SETTINGS` — data (digits, MNIST-1D) ×
statistical heterogeneity (Dirichlet(0.1) label skew, two label-sorted shards per client) × system heterogeneity
(every client 5 steps of batch 20, or steps drawn from {1..9} and batch sizes from {8..32} per client and round: the
same mean work). The whole grid of one server runs as one stacked computation (:func:`run_grid`: every
configuration's sampled clients train together). The best configuration on the tuning seeds (mean final accuracy)
is then rerun on fresh seeds, which is what the book reports.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EDGE_PROBES", "GRIDS", "LOCAL_WORK", "SETTINGS", "probe_edges", "run", "run_grid", "sweep", "summarize_sweep"]

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



# =============================================================================================
# The tuning sweep of chapter 7 (gradiv federated --sweep)
# =============================================================================================

def _geom(lo: float, ratio: float, n: int) -> list[float]:
    return [float(f"{lo * ratio ** k:.4g}") for k in range(n)]


#: Each server's grid: the server learning rate ``lr`` times its own key hyperparameter, 12 configurations each;
#: every grid contains the official scripts' setting (FedAvg/FedProx/FedAvgM/FedAWARE lr 1, FedAvgM beta 0.7,
#: FedProx mu 0.1, FedAWARE alpha 0.3 (MNIST), FedYogi lr 0.01 with tau 1e-4 and v0 = 0).
GRIDS: dict[str, dict[str, list[float]]] = {
    "fedavg": {"lr": _geom(0.5, 2 ** (1 / 3), 12)},                   # 0.5 ... 6.35
    "fedavgm": {"lr": [0.5, 1.0, 2.0, 4.0], "beta": [0.5, 0.7, 0.9]},
    "fedprox": {"lr": [1.0, 2.0, 4.0, 5.657], "mu": [0.01, 0.1, 1.0]},
    "fedyogi": {"lr": [0.01, 0.03, 0.1, 0.3], "tau": [1e-4, 1e-3, 1e-2]},
    "fedaware": {"lr": [1.0, 2.0, 4.0, 8.0], "alpha": [0.3, 0.6, 0.9]},
}
#: Fixed arguments of each server (not tuned).
FIXED: dict[str, dict[str, float]] = {"fedyogi": {"v0": 0.0, "beta1": 0.9, "beta2": 0.99}}
#: The official scripts' configuration of each server (it is a point of its grid).
OFFICIAL: dict[str, dict[str, float]] = {"fedavg": {"lr": 1.0}, "fedavgm": {"lr": 1.0, "beta": 0.7},
                                         "fedprox": {"lr": 1.0, "mu": 0.1}, "fedyogi": {"lr": 0.01, "tau": 1e-4},
                                         "fedaware": {"lr": 1.0, "alpha": 0.3}}
#: The key hyperparameter of each server besides its learning rate.
KEY = {"fedavg": None, "fedavgm": "beta", "fedprox": "mu", "fedyogi": "tau", "fedaware": "alpha"}

#: The settings: data, statistical heterogeneity (split) and system heterogeneity (local work).
SPLITS = {"dirichlet": {"alpha": 0.1}, "shards": {"shards_per_client": 2}}
WORKS = {"equal": {"batch_size": 20, "steps": 5}, "hetero": {"batch_size": (8, 32), "steps": (1, 9)}}
DATASETS = {"digits": {"model": (64, 32, 2, 10), "lr": 0.05}, "mnist1d": {"model": (40, 64, 2, 10), "lr": 0.3}}
SETTINGS: tuple[str, ...] = tuple(f"{d}/{s}/{w}" for d in DATASETS for s in SPLITS for w in WORKS)

#: The book's sweep and the quick (CI) one.
SWEEP_BOOK: dict[str, Any] = dict(settings=list(SETTINGS), n_clients=20, per_round=5, rounds=100, eval_every=5,
                                  tune_seeds=[0, 1, 2], eval_seeds=[3, 4, 5], servers=list(GRIDS))
SWEEP_QUICK: dict[str, Any] = dict(settings=["digits/shards/hetero"], n_clients=20, per_round=5, rounds=30,
                                   eval_every=5, tune_seeds=[0], eval_seeds=[1], servers=list(GRIDS))


def grid_configs(server: str) -> list[dict[str, float]]:
    """The configurations of ``server``'s grid (learning rate varies fastest)."""
    import itertools

    grid = GRIDS[server]
    keys = [k for k in grid if k != "lr"]
    return [{"lr": lr, **dict(zip(keys, rest))} for rest in itertools.product(*(grid[k] for k in keys))
            for lr in grid["lr"]]


def _load(dataset: str):
    from .. import data as gdata

    if dataset == "digits":
        return gdata.load_digits(seed=0)
    if dataset == "mnist1d":
        return gdata.load_mnist1d(num_samples=5000, seed=42, channels=False)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def make_federation(setting: str, seed: int, n_clients: int = 20):
    """The federation of one setting ``"data/split/work"`` and seed (split, model init and local draws)."""
    from .. import data as gdata
    from .. import federated as fed
    from .. import models

    try:
        dataset, split, work = setting.split("/")
        spec, split_kw, work_kw = DATASETS[dataset], SPLITS[split], WORKS[work]
    except (ValueError, KeyError):
        raise ValueError(f"setting must be 'data/split/work' with data in {list(DATASETS)}, split in {list(SPLITS)}, "
                         f"work in {list(WORKS)}; got {setting!r}") from None
    train, test = _load(dataset)
    if split == "shards":
        part = gdata.partition_shards(train.y, n_clients, split_kw["shards_per_client"], seed=seed)
    else:
        part = gdata.partition_dirichlet(train.y, n_clients, split_kw["alpha"], seed=seed, min_size=10)
    local = fed.LocalWork(lr=spec["lr"], **work_kw)
    return fed.Federation(models.mlp(*spec["model"], seed=seed), train, part, local, seed=seed), test


def run_grid(federation, server: str, configs: Sequence[dict[str, float]], rounds: int, *, per_round: int,
             test, seed: int = 0, eval_every: int = 5, startup: bool | None = None) -> list[dict[str, Any]]:
    """Run one server optimizer with every configuration of ``configs`` on the same federation and seed, all at once.

    The same as :func:`gradiv_lib.federated.run_federated` for each configuration (same sampled clients, same local
    batches; ``tests/test_experiments.py`` checks it), but the sampled clients of *all* configurations train as one
    stacked computation (``G * m`` clients, each starting from its own configuration's global parameters), which is
    several times faster for a grid. A configuration whose local loss or update becomes non-finite is stopped and
    marked ``diverged`` (its later evaluations are ``None``) instead of stopping the others.

    Returns one record per configuration: ``round``, ``test_accuracy``, ``test_loss``, ``direction_norm`` (per
    evaluation), ``diverged`` (round or None).
    """
    import numpy as np
    import torch

    from .. import federated as fed

    N = federation.n_clients
    x0 = federation.initial_params()
    servers = [fed.make_server(server, x0, N, **{**FIXED.get(server, {}), **cfg}) for cfg in configs]
    G = len(servers)
    if startup is None:
        startup = server == "fedaware"
    sizes = np.asarray(federation.shard_sizes, dtype=np.float64)
    diverged: list[int | None] = [None] * G
    recs = [{"round": [], "test_accuracy": [], "test_loss": [], "direction_norm": []} for _ in range(G)]
    tx = test.x.to(federation.device, federation.spec.dtype)
    ty = test.y.to(federation.device)
    dtype = federation.spec.dtype
    for t in range(int(rounds)):
        clients = np.arange(N) if (startup and t == 0) else fed.sample_clients(N, per_round, t, seed)
        live = [g for g in range(G) if diverged[g] is None]
        if live:
            M = len(clients)
            plans = [federation.plan(int(c), t) for c in clients]
            X, Y, wts, active = federation.stacked_batches(plans)
            T = X.shape[0]
            wts = wts.repeat(1, len(live), 1)          # (T, L*M, B)
            active = active.repeat(1, len(live))       # (T, L*M)
            start = torch.stack([servers[g].params for g in live]).to(dtype).repeat_interleave(M, 0)  # (L*M, P)
            mu = torch.tensor([servers[g].prox_mu for g in live], dtype=dtype).repeat_interleave(M)[:, None]
            v = start.clone()
            bad = torch.zeros(len(live) * M, dtype=torch.bool)
            for s in range(T):
                leaf = v.detach().requires_grad_(True)
                xs = X[s].repeat(len(live), *([1] * (X.dim() - 2)))
                ys = Y[s].repeat(len(live), *([1] * (Y.dim() - 2)))
                out = federation._forward(leaf, xs)
                losses = (federation._per_sample_loss(out, ys) * wts[s]).sum(1)
                (g_,) = torch.autograd.grad(losses.sum(), leaf)
                with torch.no_grad():
                    bad |= ~torch.isfinite(losses)
                    g_ = torch.nan_to_num(g_ + mu * (v - start), nan=0.0, posinf=0.0, neginf=0.0)
                    v = v - federation.local.lr * active[s][:, None] * g_
            updates = (start - v).detach().reshape(len(live), M, -1)
            bad = bad.reshape(len(live), M).any(1) | ~torch.isfinite(updates).reshape(len(live), -1).all(1)
            for k, g in enumerate(live):
                if bool(bad[k]):
                    diverged[g] = t + 1
                    continue
                servers[g].aggregate(t, clients, updates[k], sizes[clients])
                if not bool(torch.isfinite(servers[g].params).all()):
                    diverged[g] = t + 1
        if (t + 1) % eval_every == 0 or t + 1 == rounds:
            live = [g for g in range(G) if diverged[g] is None]
            acc = loss = None
            if live:
                with torch.no_grad():
                    P = torch.stack([servers[g].params for g in live]).to(dtype)
                    out = federation._forward(P, tx.expand(len(live), *tx.shape))        # (L, n, C)
                    loss = torch.nn.functional.cross_entropy(out.transpose(1, 2), ty.expand(len(live), -1),
                                                             reduction="none").mean(1)
                    acc = (out.argmax(-1) == ty).to(torch.float64).mean(1)
            for g in range(G):
                rec = recs[g]
                rec["round"].append(t + 1)
                if g in live:
                    k = live.index(g)
                    rec["test_accuracy"].append(round(float(acc[k]), 6))
                    rec["test_loss"].append(round(float(loss[k]), 6))
                    rec["direction_norm"].append(round(float(servers[g].last_direction_norm), 6))
                else:
                    for key in ("test_accuracy", "test_loss", "direction_norm"):
                        rec[key].append(None)
    for g in range(G):
        recs[g]["diverged"] = diverged[g]
        recs[g]["config"] = dict(configs[g])
    return recs


def _scores(acc: Sequence[float | None]) -> dict[str, float | None]:
    """final (mean of the last 3 evaluations), auc (mean of all), jitter (std of the last 5); None if diverged."""
    import numpy as np

    if any(a is None for a in acc):
        return {"final": None, "auc": None, "jitter": None}
    a = np.asarray(acc, dtype=float)
    return {"final": round(float(a[-3:].mean()), 6), "auc": round(float(a.mean()), 6),
            "jitter": round(float(a[-5:].std()), 6)}


def _mean_final(entry: dict[str, Any]) -> float:
    vals = entry["final"]
    return float("-inf") if any(v is None for v in vals) else sum(vals) / len(vals)


def sweep(*, book: bool = False, settings: Sequence[str] | None = None, servers: Sequence[str] | None = None,
          rounds: int | None = None, tune_seeds: Sequence[int] | None = None, eval_seeds: Sequence[int] | None = None,
          out: str | Path | None = None, name: str | None = None,
          progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Chapter 7's tuning sweep; saves ``ch07/sweep`` (book) or ``ch07/sweep_quick`` and returns the path
    and the payload.

    For every setting and server: its whole grid on each tuning seed (:func:`run_grid`), the best configuration by
    mean final accuracy over the tuning seeds, and that configuration rerun on the fresh ``eval_seeds`` (the numbers
    the book reports, free of the selection's optimism).
    """
    from tqdm.auto import tqdm

    from .. import results

    cfg = dict(SWEEP_BOOK if book else SWEEP_QUICK)
    for key, value in (("settings", settings), ("servers", servers), ("rounds", rounds),
                       ("tune_seeds", tune_seeds), ("eval_seeds", eval_seeds)):
        if value is not None:
            cfg[key] = [int(v) for v in value] if key.endswith("seeds") else (list(value) if key in ("settings", "servers")
                                                                             else int(value))
    bad = [s for s in cfg["servers"] if s not in GRIDS]
    if bad:
        raise ValueError(f"servers must be among {', '.join(GRIDS)}, got {bad}")
    for setting in cfg["settings"]:
        if setting not in SETTINGS:
            raise ValueError(f"settings must be among {', '.join(SETTINGS)}, got {setting!r}")
    if not cfg["tune_seeds"] or not cfg["eval_seeds"]:
        raise ValueError("tune_seeds and eval_seeds must each name at least one seed")
    if set(cfg["tune_seeds"]) & set(cfg["eval_seeds"]):
        raise ValueError(f"eval_seeds {cfg['eval_seeds']} must differ from tune_seeds {cfg['tune_seeds']}")
    config = {**cfg, "grids": {s: GRIDS[s] for s in cfg["servers"]}, "fixed": FIXED, "official": OFFICIAL,
              "splits": SPLITS, "works": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in w.items()}
                                          for k, w in WORKS.items()},
              "datasets": {k: {"model": f"mlp {'-'.join(map(str, v['model'][:2]))}-{v['model'][3]}", "local_lr": v["lr"]}
                           for k, v in DATASETS.items()},
              "final": "mean test accuracy of the last 3 evaluations", "jitter": "std of the last 5 evaluations"}
    root = results.check_out(out)
    start = time.perf_counter()
    total = len(cfg["settings"]) * len(cfg["servers"]) * (len(cfg["tune_seeds"]) + len(cfg["eval_seeds"]))
    bar = tqdm(total=total, desc="federated sweep", unit="run", disable=not progress)
    grid_out: dict[str, Any] = {}
    best_out: dict[str, Any] = {}
    eval_out: dict[str, Any] = {}
    for setting in cfg["settings"]:
        grid_out[setting], best_out[setting], eval_out[setting] = {}, {}, {}
        feds = {seed: make_federation(setting, seed, cfg["n_clients"]) for seed in cfg["tune_seeds"]}
        for server in cfg["servers"]:
            configs = grid_configs(server)
            entries = [{"config": c, "final": [], "auc": [], "jitter": [], "diverged": []} for c in configs]
            for seed in cfg["tune_seeds"]:
                bar.set_postfix_str(f"{setting} {server} seed {seed}")
                federation, test = feds[seed]
                recs = run_grid(federation, server, configs, cfg["rounds"], per_round=cfg["per_round"], test=test,
                                seed=seed, eval_every=cfg["eval_every"])
                for e, r in zip(entries, recs):
                    sc = _scores(r["test_accuracy"])
                    for k in ("final", "auc", "jitter"):
                        e[k].append(sc[k])
                    e["diverged"].append(r["diverged"])
                bar.update(1)
            grid_out[setting][server] = entries
            best = max(range(len(entries)), key=lambda i: _mean_final(entries[i]))
            best_out[setting][server] = {"config": configs[best], "tune_final_mean": round(_mean_final(entries[best]), 6)}
            ev: dict[str, Any] = {"config": configs[best], "final": [], "auc": [], "jitter": [], "curves": {}}
            for seed in cfg["eval_seeds"]:
                bar.set_postfix_str(f"{setting} {server} best, seed {seed}")
                federation, test = make_federation(setting, seed, cfg["n_clients"])
                (rec,) = run_grid(federation, server, [configs[best]], cfg["rounds"], per_round=cfg["per_round"],
                                  test=test, seed=seed, eval_every=cfg["eval_every"])
                sc = _scores(rec["test_accuracy"])
                for k in ("final", "auc", "jitter"):
                    ev[k].append(sc[k])
                ev["round"] = rec["round"]
                ev["curves"][str(seed)] = {"test_accuracy": rec["test_accuracy"], "direction_norm": rec["direction_norm"]}
                bar.update(1)
            eval_out[setting][server] = ev
    bar.close()
    data = {"grid": grid_out, "best": best_out, "eval": eval_out}
    data["summary"] = summarize_sweep({"config": config, "data": data})
    seconds = time.perf_counter() - start
    path = results.save(f"ch07/{name or ('sweep' if book else 'sweep_quick')}", data, config=config,
                        seconds=seconds, device="cpu", root=root)
    return path, json.loads(path.read_text())


def summarize_sweep(payload: dict[str, Any], tolerance: float = 0.01) -> dict[str, Any]:
    """Per setting and server: the tuned configuration, its final accuracy on the fresh seeds (mean, min, max), the
    official configuration's mean final accuracy on the tuning seeds, and the sensitivity — the learning rates (at
    the best value of the key hyperparameter) and the share of the whole grid whose mean final accuracy on the
    tuning seeds is within ``tolerance`` of tuned FedAvg's or above."""
    import numpy as np

    data = payload["data"]
    out: dict[str, Any] = {}
    for setting, by_server in data["grid"].items():
        out[setting] = {}
        ref = _mean_final(max(by_server["fedavg"], key=_mean_final)) if "fedavg" in by_server else None
        for server, entries in by_server.items():
            best = data["best"][setting][server]["config"]
            ev = data["eval"][setting][server]
            finals = [f for f in ev["final"] if f is not None]
            row: dict[str, Any] = {
                "config": best,
                "final_mean": round(float(np.mean(finals)), 6) if finals else None,
                "final_min": round(float(np.min(finals)), 6) if finals else None,
                "final_max": round(float(np.max(finals)), 6) if finals else None,
                "jitter_mean": round(float(np.mean([j for j in ev["jitter"] if j is not None])), 6) if finals else None,
            }
            official = OFFICIAL.get(server)
            off = [e for e in entries if all(abs(e["config"].get(k, math.nan) - v) < 1e-12 for k, v in official.items())]
            row["official_tune_mean"] = round(_mean_final(off[0]), 6) if off else None
            if ref is not None:
                key = KEY[server]
                ok = [e for e in entries if _mean_final(e) >= ref - tolerance]
                line = [e for e in entries if key is None or e["config"][key] == best[key]]
                lrs = sorted(e["config"]["lr"] for e in line if _mean_final(e) >= ref - tolerance)
                row["match_share"] = round(len(ok) / len(entries), 6)
                row["match_lr"] = [lrs[0], lrs[-1]] if lrs else None
                row["match_lr_ratio"] = round(lrs[-1] / lrs[0], 6) if lrs else 0.0
            out[setting][server] = row
    return out


#: Configurations one step beyond the grids' edges (server rate or key hyperparameter), probed on two digits
#: settings where the sweep selected edge configurations (``gradiv federated --sweep --edges``).
EDGE_PROBES: dict[str, list[dict[str, float]]] = {
    "fedaware": [{"lr": 16.0, "alpha": 0.9}, {"lr": 16.0, "alpha": 0.6}, {"lr": 8.0, "alpha": 0.99}],
    "fedyogi": [{"lr": 1.0, "tau": 0.01}, {"lr": 0.3, "tau": 0.03}],
    "fedavgm": [{"lr": 8.0, "beta": 0.7}, {"lr": 1.0, "beta": 0.95}],
}
EDGE_SETTINGS: tuple[str, ...] = ("digits/shards/hetero", "digits/dirichlet/equal")


def probe_edges(*, out: str | Path | None = None, name: str | None = None,
                progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run :data:`EDGE_PROBES` on :data:`EDGE_SETTINGS` with the book sweep's tuning seeds and protocol; saves
    ``ch07/sweep_edges`` (per setting and server: each configuration's final accuracy per tuning seed)."""
    from tqdm.auto import tqdm

    from .. import results

    cfg = SWEEP_BOOK
    config = {"settings": list(EDGE_SETTINGS), "probes": EDGE_PROBES, "fixed": FIXED, "n_clients": cfg["n_clients"],
              "per_round": cfg["per_round"], "rounds": cfg["rounds"], "eval_every": cfg["eval_every"],
              "tune_seeds": cfg["tune_seeds"], "final": "mean test accuracy of the last 3 evaluations"}
    root = results.check_out(out)
    start = time.perf_counter()
    data: dict[str, Any] = {}
    bar = tqdm(total=len(EDGE_SETTINGS) * len(cfg["tune_seeds"]) * len(EDGE_PROBES), desc="edge probes", unit="run",
               disable=not progress)
    for setting in EDGE_SETTINGS:
        data[setting] = {s: [{"config": c, "final": []} for c in cs] for s, cs in EDGE_PROBES.items()}
        for seed in cfg["tune_seeds"]:
            federation, test = make_federation(setting, seed, cfg["n_clients"])
            for server, configs in EDGE_PROBES.items():
                recs = run_grid(federation, server, configs, cfg["rounds"], per_round=cfg["per_round"], test=test,
                                seed=seed, eval_every=cfg["eval_every"])
                for entry, rec in zip(data[setting][server], recs):
                    entry["final"].append(_scores(rec["test_accuracy"])["final"])
                bar.update(1)
    bar.close()
    path = results.save(f"ch07/{name or 'sweep_edges'}", data, config=config, seconds=time.perf_counter() - start,
                        device="cpu", root=root)
    return path, json.loads(path.read_text())
