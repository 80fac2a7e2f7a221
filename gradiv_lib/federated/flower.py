r"""The server optimizers of :mod:`gradiv_lib.federated` deployed on Flower's app API (chapter 7.4).

An optional extra: ``pip install "gradiv_lib[flower]"`` (Flower 1.x, ``flwr``; written against 1.42). Importing
this module works without Flower; the names below import ``flwr`` on first use and raise an :class:`ImportError`
that says how to install it.

A Flower deployment is a *SuperLink* (the server side: it holds the run and relays messages), one *SuperNode* per
client, and a Flower App (a ``ServerApp`` and a ``ClientApp``) that ``flwr run`` submits to the SuperLink, which then
starts the ``ServerApp`` in a process of its own while every SuperNode starts the ``ClientApp`` for each message it
receives. The pieces here:

* :class:`GradivStrategy` — a ``flwr.serverapp.strategy.Strategy`` (the Message API) whose ``aggregate_train``
  hands the clients' pseudo-gradients :math:`\Delta_i = x^t - x_i` to a :class:`gradiv_lib.federated.Server`
  (``FedAvg``, ``FedAWARE``, ...) and returns its new global parameters. ``configure_train`` samples the clients
  itself with :func:`~gradiv_lib.federated.sample_clients` (all clients in round 0 with ``startup``), so a Flower run
  visits the same clients in the same rounds as :func:`~gradiv_lib.federated.run_federated`. Flower addresses
  SuperNodes by node id, the federation by partition id: the strategy learns which node holds which partition from
  the clients' replies (a ``query`` message when the first round does not sample every client).
  :func:`make_strategy` builds one.
* :func:`write_deployment` — the files every process reads: ``client-<i>.pt`` per client (**only that client's
  shard**, the model, the local work and the seed), ``server.pt`` (the server optimizer and the sampling rule) and the
  Flower App ``app/pyproject.toml`` whose components are :data:`gradiv_lib.federated.flower_app.server_app` and
  ``client_app``.
* :func:`load_client` — what the ``ClientApp`` does with a message: read ``partition-id`` from the SuperNode's node
  config, load only ``client-<partition-id>.pt`` into a one-client :class:`~gradiv_lib.federated.Federation`
  (``client_ids=[i]``, so it draws exactly what client :math:`i` draws in the simulator) and run its local work.
* :func:`run_local_federation` — a real deployment on this machine: ``flower-superlink``, one ``flower-supernode``
  per client and ``flwr run``, all separate processes talking HTTP on ``127.0.0.1`` (free ports), each SuperNode
  with ``--node-config "partition-id=i num-partitions=N"``; returns the final parameters.
  :func:`deployment_commands` gives the same commands to type by hand.
* :func:`run_in_process` — the same strategy, messages and client code with every node in this process
  (:class:`LocalGrid`, a Flower ``Grid``): seconds instead of a minute, for tests and the book. Flower's own
  simulation engine (``flwr.simulation``) needs Ray (``flwr[simulation]``), which this package does not install.

With the same federation, server, seed and sampling the final parameters equal those of
:func:`~gradiv_lib.federated.run_federated` up to rounding (a client's update crosses the wire as its parameters
:math:`x_i` and the server recomputes :math:`x^t - x_i`; one client trains alone instead of stacked with the others).

Parameters travel as one flat vector (``Federation.spec`` order, the model's dtype) in an ``ArrayRecord``. The
``.pt`` files are pickles (the model is a ``torch.nn.Module``): load only files this module wrote. Flower's
telemetry is switched off (``FLWR_TELEMETRY_ENABLED=0``) unless the environment already sets it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import _is_int
from .servers import SERVERS, FedAWARE, Server, make_server
from .simulation import Federation, sample_clients

__all__ = ["GradivStrategy", "LocalGrid", "make_strategy", "fedavg_strategy", "fedaware_strategy", "write_deployment",
           "load_client", "run_local_federation", "run_in_process", "deployment_commands", "require_flwr",
           "MAX_LOCAL_CLIENTS", "APP_COMPONENTS"]

_INSTALL = 'gradiv_lib.flower needs Flower (flwr 1.x): pip install "gradiv_lib[flower]"'
_CLASSES: dict[str, type] = {}

#: Most clients :func:`run_local_federation` starts (each is a SuperNode process plus one process per message).
MAX_LOCAL_CLIENTS = 16

#: The Flower App's components (``module:attribute``), as written into ``app/pyproject.toml``.
APP_COMPONENTS = {"serverapp": "gradiv_lib.federated.flower_app:server_app",
                  "clientapp": "gradiv_lib.federated.flower_app:client_app"}

#: Run-config key of the deployment folder (``flwr run ... --run-config 'gradiv-dir="..."'``).
DIR_KEY = "gradiv-dir"


def require_flwr():
    """Import and return ``flwr`` (telemetry off unless set), or raise an ImportError saying how to install it."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        import flwr
        from flwr.serverapp.strategy import Strategy  # noqa: F401
        from flwr.clientapp import ClientApp  # noqa: F401
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    major = int(str(flwr.__version__).split(".")[0])
    if major != 1:
        raise ImportError(f"{_INSTALL}; found flwr {flwr.__version__}, this module needs 1.x")
    return flwr


def __getattr__(name: str) -> Any:
    if name in ("GradivStrategy", "LocalGrid"):
        if not _CLASSES:
            _build_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =============================================================================================
# Files: what each process loads
# =============================================================================================


def _check_federation(federation: Any) -> Federation:
    if not isinstance(federation, Federation):
        raise TypeError(f"federation must be a Federation, got {type(federation).__name__}")
    return federation


_PYPROJECT = """\
# The Flower App of gradiv_lib (written by gradiv_lib.federated.flower.write_deployment): its components live in
# the installed gradiv_lib, so this bundle is only this file. Run it with
#   flwr run {app} <connection> --run-config 'gradiv-dir="<deployment folder>"' --stream
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "gradiv-federated"
version = "1.0.0"
description = "gradiv_lib's server optimizers (FedAvg ... FedAWARE) as a Flower App"
license = "MIT"
dependencies = ["flwr>=1.42,<2", "gradiv_lib[flower]"]

[tool.flwr.app]
publisher = "gradiv"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
gradiv-dir = ""
"""


def write_app(directory: str | Path) -> Path:
    """Write the Flower App (``pyproject.toml`` naming :data:`APP_COMPONENTS`) into ``directory``; returns it."""
    app = Path(directory)
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(_PYPROJECT.format(app=app, **APP_COMPONENTS))
    return app


def write_deployment(directory: str | Path, federation: Federation, server: Server, *, rounds: int, per_round: int,
                     seed: int = 0, startup: bool | None = None, timeout: float = 300.0,
                     accept_failures: bool = False) -> Path:
    """Write the deployment folder: ``client-<i>.pt`` (client :math:`i`'s shard only, the model, the local work,
    the loss and the seed), ``server.pt`` (the server optimizer, ``rounds``, ``per_round``, ``seed``, ``startup``,
    the per-round ``timeout`` in seconds) and the Flower App ``app/``. Returns the folder."""
    _check_federation(federation)
    if not isinstance(server, Server):
        raise TypeError(f"server must be a gradiv_lib.federated.Server, got {type(server).__name__}")
    if server.n_clients != federation.n_clients or server.params.numel() != federation.spec.size:
        raise ValueError(f"server is for {server.n_clients} clients x {server.params.numel()} parameters, the "
                         f"federation has {federation.n_clients} x {federation.spec.size}")
    if not _is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    try:
        pickle.dumps(federation.loss_fn)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the federation's loss_fn {federation.loss_fn!r} cannot be pickled for the client processes; "
                         "use a module-level function such as torch.nn.functional.cross_entropy") from e
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    module = copy.deepcopy(federation.module).cpu()
    for i, shard in enumerate(federation.shards):
        sel = torch.from_numpy(shard).to(federation.x.device)
        torch.save({"partition_id": i, "num_partitions": federation.n_clients, "module": module,
                    "x": federation.x[sel].cpu(), "y": federation.y[sel].cpu(), "local": federation.local,
                    "loss_fn": federation.loss_fn, "seed": federation.seed}, out / f"client-{i}.pt")
    torch.save({"server": server, "rounds": int(rounds), "per_round": int(per_round), "seed": int(seed),
                "startup": isinstance(server, FedAWARE) if startup is None else bool(startup),
                "timeout": float(timeout), "accept_failures": bool(accept_failures)}, out / "server.pt")
    write_app(out / "app")
    return out


_CLIENT_CACHE: dict[tuple[str, int, int], Federation] = {}


def load_client(directory: str | Path, partition_id: int) -> Federation:
    """The one-client :class:`~gradiv_lib.federated.Federation` of ``client-<partition_id>.pt`` in ``directory``:
    that client's shard only, seeded as client ``partition_id`` (``client_ids=[partition_id]``)."""
    if not _is_int(partition_id) or partition_id < 0:
        raise ValueError(f"partition_id must be a non-negative integer, got {partition_id!r}")
    path = Path(directory) / f"client-{int(partition_id)}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no shard for partition {partition_id}: {path} does not exist (write it with "
                                "gradiv_lib.federated.flower.write_deployment)")
    key = (str(path.resolve()), path.stat().st_mtime_ns, int(partition_id))
    if key not in _CLIENT_CACHE:
        blob = torch.load(path, weights_only=False)  # our own pickle: the model is an nn.Module
        if blob["partition_id"] != partition_id:
            raise ValueError(f"{path} holds partition {blob['partition_id']}, not {partition_id}")
        n = len(blob["y"])
        fed = Federation(blob["module"], (blob["x"], blob["y"]), [torch.arange(n)], blob["local"],
                         loss_fn=blob["loss_fn"], seed=blob["seed"], client_ids=[int(partition_id)])
        fed.num_partitions = int(blob["num_partitions"])  # N of the whole federation
        if len(_CLIENT_CACHE) >= 64:
            _CLIENT_CACHE.clear()
        _CLIENT_CACHE[key] = fed
    return _CLIENT_CACHE[key]


# =============================================================================================
# The ClientApp's and the ServerApp's functions (registered in gradiv_lib.federated.flower_app)
# =============================================================================================


def _flat(record: Any) -> np.ndarray:
    arrays = record.to_numpy_ndarrays()
    if len(arrays) != 1 or np.ndim(arrays[0]) != 1:
        raise ValueError(f"expected the parameters as one flat vector, got {len(arrays)} arrays of shapes "
                         f"{[np.shape(a) for a in arrays]}")
    return np.asarray(arrays[0])


def _node_setting(context: Any, key: str) -> Any:
    if key in context.node_config:
        return context.node_config[key]
    if key in context.run_config:
        return context.run_config[key]
    raise KeyError(f"the SuperNode's node config has no {key!r}: start it with "
                   f"--node-config \"partition-id=<i> num-partitions=<N>\" (got {dict(context.node_config)})")


def _client_of(context: Any) -> tuple[Federation, int]:
    pid = int(_node_setting(context, "partition-id"))
    directory = _node_setting(context, DIR_KEY)
    if not directory:
        raise ValueError(f"the run config's {DIR_KEY!r} is empty: pass --run-config '{DIR_KEY}=\"<folder>\"' to flwr run")
    fed = load_client(directory, pid)
    n_parts = int(context.node_config.get("num-partitions", fed.num_partitions))
    if n_parts != fed.num_partitions:
        raise ValueError(f"the SuperNode says num-partitions={n_parts}, the deployment has {fed.num_partitions} clients")
    return fed, pid


def client_query(msg: Any, context: Any) -> Any:
    """``query`` handler of the ClientApp: reply with this node's ``partition-id`` and shard size."""
    from flwr.app import Message, MetricRecord, RecordDict
    fed, pid = _client_of(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-examples": fed.shard_sizes[0],
                                                        "pid": os.getpid()})}), reply_to=msg)


def client_train(msg: Any, context: Any) -> Any:
    """``train`` handler of the ClientApp: the simulator's local work of this node's client in the round the server
    sends (``config["round"]``, ``config["prox-mu"]``); replies with :math:`x_i = x^t - \\Delta_i`."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    fed, pid = _client_of(context)
    config = msg.content["config"]
    if "round" not in config:
        raise ValueError("the train message's config must hold the gradiv 'round' (GradivStrategy sends it)")
    flat = _flat(msg.content["arrays"])
    if flat.shape != (fed.spec.size,):
        raise ValueError(f"client {pid} received {flat.shape[0]} parameters, its model has {fed.spec.size}")
    x = torch.from_numpy(flat.copy()).to(fed.device, fed.spec.dtype)
    up, info = fed.local_updates(x, [0], int(config["round"]), prox_mu=float(config.get("prox-mu", 0.0)))
    metrics = MetricRecord({"partition-id": pid, "num-examples": fed.shard_sizes[0], "steps": int(info["steps"][0]),
                            "batch-size": int(info["batch_size"][0]), "loss": float(info["loss"][0]),
                            "pid": os.getpid()})
    return Message(RecordDict({"arrays": ArrayRecord([(x - up[0]).detach().cpu().numpy()]), "metrics": metrics}),
                   reply_to=msg)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def server_main(grid: Any, context: Any) -> None:
    """The ServerApp's main: load ``server.pt`` from the run config's ``gradiv-dir``, run the rounds with
    :class:`GradivStrategy`, save ``result.pt`` (or ``error.txt`` with the traceback)."""
    where = str(context.run_config.get(DIR_KEY, ""))
    if not where:
        raise ValueError(f"the run config's {DIR_KEY!r} is empty: pass --run-config '{DIR_KEY}=\"<folder>\"' to flwr run")
    directory = Path(where)
    try:
        if not (directory / "server.pt").is_file():
            raise FileNotFoundError(f"run config {DIR_KEY}={str(directory)!r} holds no server.pt")
        spec = torch.load(directory / "server.pt", weights_only=False)  # our own pickle (the Server object)
        start = time.perf_counter()
        strategy = __getattr__("GradivStrategy")(spec["server"], per_round=spec["per_round"], seed=spec["seed"],
                                                 startup=spec["startup"], connect_timeout=spec["timeout"],
                                                 accept_failures=spec["accept_failures"])
        params, _ = strategy.run(grid, spec["rounds"], timeout=spec["timeout"])
        _save_atomic({"params": params, "server_state": strategy.server.state_dict(), "rounds": strategy.rounds,
                      "clients": strategy.client_log, "node_of": strategy.node_of, "server_pid": os.getpid(),
                      "seconds": time.perf_counter() - start}, directory / "result.pt")
    except BaseException:
        if directory.is_dir():
            (directory / "error.txt").write_text(traceback.format_exc())
        raise


# =============================================================================================
# Strategy and in-process grid (need flwr: built on first use)
# =============================================================================================


def _build_classes() -> None:
    require_flwr()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy

    class GradivStrategy(Strategy):
        r"""Flower strategy (Message API) that delegates aggregation to a :class:`gradiv_lib.federated.Server`.

        Parameters
        ----------
        server : Server or callable
            The server optimizer (it holds the global parameters and its state), or a zero-argument callable
            returning one.
        per_round : int
            :math:`m`, clients per round (:func:`~gradiv_lib.federated.sample_clients` with ``seed``).
        seed : int
            Sampling seed (the same as ``run_federated``'s ``seed``).
        startup : bool, optional
            Sample all clients in round 0; default True for FedAWARE, as in ``run_federated``.
        connect_timeout : float
            Seconds to wait for all :math:`N` SuperNodes to connect (then ``RuntimeError``).
        accept_failures : bool
            False (default): a sampled client that fails or does not answer within the round's timeout stops the
            run with ``RuntimeError``; True: the server aggregates the clients that answered.

        Each SuperNode's ClientApp says which federation client it is (``partition-id`` in its replies). Flower
        round :math:`r` is gradiv round :math:`r-1`; clients receive ``{"round": r - 1, "prox-mu": server.prox_mu}``.
        After every round ``rounds`` holds ``(round, client ids, aggregation weights (N,))`` and ``client_log``
        ``(round, {client id: (process id, steps)})``.
        """

        def __init__(self, server: Server | Callable[[], Server], *, per_round: int, seed: int = 0,
                     startup: bool | None = None, connect_timeout: float = 120.0,
                     accept_failures: bool = False) -> None:
            super().__init__()
            if not isinstance(server, Server) and callable(server):
                server = server()
            if not isinstance(server, Server):
                raise TypeError(f"server must be a gradiv_lib.federated.Server or a callable returning one, "
                                f"got {type(server).__name__}")
            N = server.n_clients
            if not _is_int(per_round) or not 1 <= per_round <= N:
                raise ValueError(f"per_round (clients per round) must be an integer in [1, {N}], got {per_round!r}")
            if not _is_int(seed) or seed < 0:
                raise ValueError(f"seed must be a non-negative int, got {seed!r}")
            if not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0:
                raise ValueError(f"connect_timeout must be a number of seconds > 0, got {connect_timeout!r}")
            self.server = server
            self.per_round, self.seed = int(per_round), int(seed)
            self.startup = isinstance(server, FedAWARE) if startup is None else bool(startup)
            self.connect_timeout = float(connect_timeout)
            self.accept_failures = bool(accept_failures)
            self.rounds: list[tuple[int, list[int], np.ndarray]] = []
            self.client_log: list[tuple[int, dict[int, tuple[int, int]]]] = []
            self.node_of: dict[int, int] = {}

        def __repr__(self) -> str:
            return f"GradivStrategy({self.server!r}, per_round={self.per_round}, seed={self.seed}, startup={self.startup})"

        def summary(self) -> None:  # noqa: D102
            return None

        def clients_of_round(self, t: int) -> np.ndarray:
            """The federation clients sampled in gradiv round ``t`` (0-based)."""
            N = self.server.n_clients
            return np.arange(N) if (self.startup and t == 0) else sample_clients(N, self.per_round, t, self.seed)

        def _arrays(self):
            return ArrayRecord([self.server.params.detach().cpu().numpy()])

        def _wait_for_nodes(self, grid) -> list[int]:
            N = self.server.n_clients
            deadline = time.monotonic() + self.connect_timeout
            while len(nodes := sorted(grid.get_node_ids())) < N:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(nodes)} of the federation's {N} SuperNodes connected within "
                                       f"connect_timeout={self.connect_timeout} s")
                time.sleep(0.2)
            if len(nodes) > N:
                raise RuntimeError(f"{len(nodes)} SuperNodes are connected, the federation has {N} clients")
            return nodes

        def _learn(self, pid: Any, node: int) -> None:
            N = self.server.n_clients
            if not _is_int(pid) or not 0 <= pid < N:
                raise RuntimeError(f"SuperNode {node} reported partition-id {pid!r}, not one in [0, {N - 1}]")
            if self.node_of.get(int(pid), node) != node:
                raise RuntimeError(f"SuperNodes {self.node_of[int(pid)]} and {node} both hold partition {pid}")
            self.node_of[int(pid)] = node

        def _discover(self, grid, server_round: int) -> None:
            nodes = self._wait_for_nodes(grid)
            unknown = [n for n in nodes if n not in self.node_of.values()]
            if not unknown:
                return
            msgs = [Message(RecordDict({"config": ConfigRecord({"round": server_round - 1})}), dst_node_id=n,
                            message_type="query", group_id=str(server_round)) for n in unknown]
            for reply in grid.send_and_receive(msgs, timeout=self.connect_timeout):
                if reply.has_error():
                    raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} failed to say its partition: "
                                       f"{reply.error.reason}")
                self._learn(reply.content["metrics"]["partition-id"], reply.metadata.src_node_id)
            missing = sorted(set(range(self.server.n_clients)) - set(self.node_of))
            if missing:
                raise RuntimeError(f"no SuperNode holds partitions {missing}")

        def configure_train(self, server_round, arrays, config, grid):  # noqa: D102
            t = server_round - 1
            clients = self.clients_of_round(t).tolist()
            content = RecordDict({"arrays": self._arrays(),
                                  "config": ConfigRecord({"round": t, "prox-mu": float(self.server.prox_mu)})})
            if len(clients) == self.server.n_clients and len(self.node_of) < len(clients):
                nodes = self._wait_for_nodes(grid)  # every client trains: the replies say who is who
            else:
                self._discover(grid, server_round)
                nodes = [self.node_of[i] for i in clients]
            self._expected = (t, clients)
            return [Message(content, dst_node_id=n, message_type="train", group_id=str(server_round)) for n in nodes]

        def aggregate_train(self, server_round, replies):  # noqa: D102
            t, expected = self._expected
            rows, failures = [], []
            for reply in replies:
                if reply.has_error():
                    failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                    continue
                m = reply.content["metrics"]
                self._learn(m["partition-id"], reply.metadata.src_node_id)
                rows.append((int(m["partition-id"]), _flat(reply.content["arrays"]), float(m["num-examples"]),
                             int(m["pid"]), int(m["steps"])))
            rows.sort(key=lambda r: r[0])
            ids = [r[0] for r in rows]
            missing = sorted(set(expected) - set(ids))
            if ids and not set(ids) <= set(expected):
                raise RuntimeError(f"round {t}: replies from clients {ids}, sampled {expected}")
            if (missing or failures) and (not self.accept_failures or not rows):
                raise RuntimeError(f"round {t}: sampled clients {missing} did not answer"
                                   + (f" ({'; '.join(failures)})" if failures else "")
                                   + ("" if rows else "; no client answered"))
            x = self.server.params
            local = torch.from_numpy(np.stack([r[1] for r in rows])).to(x)
            if local.shape[1] != x.numel():
                raise ValueError(f"clients returned {local.shape[1]} parameters, the server holds {x.numel()}")
            self.server.aggregate(t, ids, x.unsqueeze(0) - local, [r[2] for r in rows])
            self.rounds.append((t, ids, self.server.last_weights.numpy().copy()))
            self.client_log.append((t, {r[0]: (r[3], r[4]) for r in rows}))
            metrics = {"clients": len(ids), "failures": len(failures) + len(missing),
                       "direction-norm": float(self.server.last_direction_norm)}
            return self._arrays(), MetricRecord(metrics)

        def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
            return []

        def aggregate_evaluate(self, server_round, replies):  # noqa: D102
            return None

        def run(self, grid, rounds: int, *, timeout: float = 300.0) -> tuple[Tensor, Any]:
            """Flower's ``Strategy.start`` for ``rounds`` rounds from the server's parameters; returns the final
            parameters (flat tensor) and Flower's ``Result``."""
            if not _is_int(rounds) or rounds < 1:
                raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
            result = self.start(grid, self._arrays(), num_rounds=int(rounds), timeout=float(timeout))
            return self.server.params.detach().clone(), result

    class LocalGrid(Grid):
        """A Flower ``Grid`` whose nodes are this process: node ``i`` runs ``client_app`` with node config
        ``{"partition-id": i, "num-partitions": N}`` and the run config ``{"gradiv-dir": directory}``. The same
        strategy, messages and ClientApp as a deployment, without processes or network (nor Flower's own
        simulation engine, which needs Ray)."""

        def __init__(self, client_app: Any, n_nodes: int, run_config: dict[str, Any]) -> None:
            if not _is_int(n_nodes) or n_nodes < 1:
                raise ValueError(f"n_nodes must be an integer >= 1, got {n_nodes!r}")
            self.client_app, self.n_nodes, self.run_config = client_app, int(n_nodes), dict(run_config)
            self.node_ids = [1000 + i for i in range(self.n_nodes)]  # not the partition ids: the strategy must learn them
            self._replies: dict[int, Message] = {}
            self._next = 0
            self._run = None

        def set_run(self, run):  # noqa: D102
            self._run = run

        @property
        def run(self):  # noqa: D102
            return self._run

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

        def get_node_ids(self):  # noqa: D102
            return list(self.node_ids)

        def push_messages(self, messages):  # noqa: D102
            ids = []
            for msg in messages:
                i = self.node_ids.index(msg.metadata.dst_node_id)
                context = Context(run_id=0, node_id=msg.metadata.dst_node_id,
                                  node_config={"partition-id": i, "num-partitions": self.n_nodes},
                                  state=RecordDict(), run_config=self.run_config)
                self._next += 1
                msg.metadata.__dict__["_message_id"] = str(self._next)
                try:
                    reply = self.client_app(msg, context)
                except Exception as e:  # noqa: BLE001 - a failed client is an error reply, as in a deployment
                    from flwr.app import Error
                    reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
                self._replies[self._next] = reply
                ids.append(str(self._next))
            return ids

        def pull_messages(self, message_ids):  # noqa: D102
            return [self._replies.pop(int(i)) for i in message_ids if int(i) in self._replies]

        def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
            return self.pull_messages(self.push_messages(messages))

        @contextlib.contextmanager
        def identity(self):
            """Flower's task identity of this process (run 0, the server node) while the strategy runs: a deployed
            ServerApp process has it set by Flower."""
            from flwr.supercore.task_identity import TaskIdentity
            saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 0, 0, 0
            try:
                yield self
            finally:
                TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

    GradivStrategy.__module__ = LocalGrid.__module__ = __name__
    _CLASSES.update(GradivStrategy=GradivStrategy, LocalGrid=LocalGrid)


def make_strategy(name: str, federation: Federation, *, per_round: int, seed: int = 0, startup: bool | None = None,
                  **server_kwargs: Any):
    """:class:`GradivStrategy` around the server ``name`` (one of :data:`~gradiv_lib.federated.SERVERS`) started
    from ``federation.initial_params()``; ``server_kwargs`` go to the server (``lr``, ``alpha``, ...)."""
    _check_federation(federation)
    if name not in SERVERS:
        raise ValueError(f"name must be one of {SERVERS}, got {name!r}")
    server = make_server(name, federation.initial_params(), federation.n_clients, **server_kwargs)
    return __getattr__("GradivStrategy")(server, per_round=per_round, seed=seed, startup=startup)


def fedavg_strategy(federation: Federation, *, per_round: int, seed: int = 0, lr: float = 1.0):
    """Flower strategy running :class:`gradiv_lib.federated.FedAvg`."""
    return make_strategy("fedavg", federation, per_round=per_round, seed=seed, lr=lr)


def fedaware_strategy(federation: Federation, *, per_round: int, seed: int = 0, alpha: float = 0.5, lr: float = 1.0,
                      unseen: str = "fedavg", startup: bool = True):
    """Flower strategy running :class:`gradiv_lib.federated.FedAWARE` (all clients in round 0 by default)."""
    return make_strategy("fedaware", federation, per_round=per_round, seed=seed, startup=startup, alpha=alpha,
                         lr=lr, unseen=unseen)


def _check_run(federation: Any, strategy: Any, rounds: Any) -> None:
    _check_federation(federation)
    GS = __getattr__("GradivStrategy")
    if not isinstance(strategy, GS):
        raise TypeError(f"strategy must be a GradivStrategy, got {type(strategy).__name__}")
    if strategy.server.n_clients != federation.n_clients:
        raise ValueError(f"strategy's server is for {strategy.server.n_clients} clients, the federation has "
                         f"{federation.n_clients}")
    if not _is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")


def run_in_process(federation: Federation, strategy: Any, rounds: int, *, directory: str | Path | None = None,
                   quiet: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """Run ``strategy`` for ``rounds`` rounds with every node in this process (:class:`LocalGrid`): the deployment
    files, the ClientApp and the messages of :func:`run_local_federation`, without processes. Returns
    ``(params, info)``; ``strategy.rounds`` records the clients and weights of every round. ``quiet`` silences
    Flower's INFO log for the run."""
    require_flwr()
    _check_run(federation, strategy, rounds)
    from .flower_app import client_app

    with tempfile.TemporaryDirectory(prefix="gradiv-flower-") as tmp:
        where = Path(directory) if directory is not None else Path(tmp)
        write_deployment(where, federation, strategy.server, rounds=rounds, per_round=strategy.per_round,
                         seed=strategy.seed, startup=strategy.startup)
        grid = __getattr__("LocalGrid")(client_app, federation.n_clients, {DIR_KEY: str(where)})
        start = time.perf_counter()
        logger = logging.getLogger("flwr")
        level = logger.level
        if quiet:
            logger.setLevel(logging.WARNING)
        try:
            with grid.identity():
                params, result = strategy.run(grid, rounds)
        finally:
            logger.setLevel(level)
        return params, {"result": result, "seconds": time.perf_counter() - start}


# =============================================================================================
# A real deployment on this machine: SuperLink, SuperNodes and flwr run as separate processes
# =============================================================================================


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def deployment_commands(directory: str | Path, n_clients: int, *, port: int = 9092, node_ports: Sequence[int] | None = None,
                        host: str = "127.0.0.1", connection: str = "gradiv") -> list[list[str]]:
    """The commands of a deployment on ``host``: ``flower-superlink``, one ``flower-supernode`` per client (its
    ``partition-id`` in ``--node-config``; each needs its own ``--port`` for the ClientApp's runtime API) and
    ``flwr run`` of the Flower App in ``directory/app`` with ``gradiv-dir`` pointing at ``directory``. ``flwr run``
    finds the SuperLink through the connection ``connection`` of the Flower configuration
    (``$FLWR_HOME/config.toml``: ``[superlink.gradiv] address = "127.0.0.1:9092", insecure = true``)."""
    if not _is_int(n_clients) or n_clients < 1:
        raise ValueError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    node_ports = list(node_ports) if node_ports is not None else [port + 10 + i for i in range(n_clients)]
    if len(node_ports) != n_clients:
        raise ValueError(f"node_ports must give {n_clients} ports, got {len(node_ports)}")
    directory = Path(directory)
    link = [_bin("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    nodes = [[_bin("flower-supernode"), "--insecure", "--superlink", f"{host}:{port}", "--host", host, "--port",
              str(q), "--node-config", f"partition-id={i} num-partitions={n_clients}"] for i, q in enumerate(node_ports)]
    run = [_bin("flwr"), "run", str(directory / "app"), connection, "--run-config",
           f"{DIR_KEY}={json.dumps(str(directory))}", "--stream"]  # a TOML string
    return [link, *nodes, run]


def _connection_toml(connection: str, host: str, port: int) -> str:
    return (f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\naddress = "{host}:{port}"\n'
            "insecure = true\n")


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}:\n{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not listen on {host}:{port} in time:\n{_tail(log)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every started process group (each Popen has its own session: the SuperExec and App processes the
    Flower processes start live in it), then SIGKILL what is left after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group: children that outlived their parent too
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(2)


def run_local_federation(federation: Federation, strategy: Any, rounds: int, *, host: str = "127.0.0.1",
                         timeout: float = 300.0, workdir: str | Path | None = None, keep: bool = False,
                         quiet: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """A real Flower deployment on this machine for ``rounds`` rounds of ``strategy`` (a :class:`GradivStrategy`).

    Writes the deployment folder (:func:`write_deployment`: one shard file per client, the server, the Flower App)
    and starts, each as a separate process in its own session, with :func:`deployment_commands`: a
    ``flower-superlink`` on ``host`` (a free port), one ``flower-supernode`` per client with
    ``--node-config "partition-id=i num-partitions=N"`` and ``flwr run ... --stream``. The SuperLink starts the
    ServerApp process (:func:`server_main`); every SuperNode starts a ClientApp process for each message, which
    loads only its own shard. Flower's configuration (``FLWR_HOME``) lives in the folder too; the processes run with
    one torch thread each and without Flower's telemetry and update check (no network look-ups).

    Returns ``(params, info)``: the final global parameters (flat tensor) and ``info`` with ``"rounds"`` (clients
    and weights per round), ``"clients"`` (per round, each client's process id and local steps), ``"server_pid"``,
    ``"seconds"``, ``"commands"`` and ``"pids"`` (of the processes started here, all ended). ``strategy.server`` is updated to the final state and ``strategy.rounds`` to the
    run's rounds. Raises ``TimeoutError`` past ``timeout`` seconds (also the limit of each round) and
    ``RuntimeError`` (with the tail of the processes' logs) when the run fails; every process is stopped in all cases.
    The folder is ``workdir`` (kept) or a temporary one (removed unless ``keep``). ``quiet`` is accepted for
    compatibility (the processes always log into files in the folder's ``logs/``).
    """
    require_flwr()
    if os.name != "posix":
        raise NotImplementedError("run_local_federation manages its processes as POSIX sessions (Linux, macOS); on "
                                  f"{os.name!r} start the commands of deployment_commands by hand")
    _check_run(federation, strategy, rounds)
    if federation.n_clients > MAX_LOCAL_CLIENTS:
        raise ValueError(f"run_local_federation starts one SuperNode process per client (and one process per message); "
                         f"the federation has {federation.n_clients} clients, at most {MAX_LOCAL_CLIENTS} are allowed "
                         "here: use fewer clients, or run_in_process / run_federated for large federations")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="gradiv-flower-")
        where = Path(tmp)
    else:
        where = Path(workdir)
        where.mkdir(parents=True, exist_ok=True)
        for stale in ("result.pt", "error.txt"):
            (where / stale).unlink(missing_ok=True)
    where = where.resolve()
    N = federation.n_clients
    write_deployment(where, federation, strategy.server, rounds=rounds, per_round=strategy.per_round,
                     seed=strategy.seed, startup=strategy.startup, timeout=float(timeout),
                     accept_failures=strategy.accept_failures)
    home, logs = where / "flwr-home", where / "logs"
    home.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    port = _free_port(host)
    node_ports = [_free_port(host) for _ in range(N)]
    (home / "config.toml").write_text(_connection_toml("gradiv", host, port))
    commands = deployment_commands(where, N, port=port, node_ports=node_ports, host=host)
    root = str(Path(__file__).resolve().parents[2])  # the gradiv_lib in use, for the App processes
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED=os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
               FLWR_DISABLE_UPDATE_CHECK=os.environ.get("FLWR_DISABLE_UPDATE_CHECK", "1"))  # no network look-ups
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    deadline = time.monotonic() + float(timeout)

    def launch(cmd: list[str], name: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed by the child's exit / GC
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=str(where), start_new_session=True)
        out.close()
        procs.append(p)
        return p

    try:
        link = launch(commands[0], "superlink")
        _wait_port(host, port, link, logs / "superlink.log", deadline)
        for i in range(N):
            launch(commands[1 + i], f"supernode-{i}")
        runner = launch(commands[-1], "flwr-run")
        result_file, error_file = where / "result.pt", where / "error.txt"
        while not result_file.exists():
            if error_file.exists():
                raise RuntimeError(f"the ServerApp failed:\n{error_file.read_text()}")
            if runner.poll() is not None and not result_file.exists():
                time.sleep(0.5)  # the result may be on its way
                if not result_file.exists() and not error_file.exists():
                    raise RuntimeError(f"flwr run ended (code {runner.returncode}) without a result:\n"
                                       f"{_tail(logs / 'flwr-run.log')}\n--- superlink:\n{_tail(logs / 'superlink.log')}")
                continue
            for p in procs[:-1]:
                if p.poll() is not None:
                    raise RuntimeError(f"{Path(p.args[0]).name} exited early with code {p.returncode}:\n"
                                       f"{_tail(logs / ('superlink.log' if p is link else f'supernode-{procs.index(p) - 1}.log'))}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Flower run did not finish within timeout={timeout} s; flwr run:\n"
                                   f"{_tail(logs / 'flwr-run.log')}\n--- superlink:\n{_tail(logs / 'superlink.log')}")
            time.sleep(0.2)
        res = torch.load(result_file, weights_only=False)
        try:  # let the run end by itself (the ServerApp process exits, flwr run's log stream closes)
            runner.wait(max(min(15.0, deadline - time.monotonic()), 0.1))
        except subprocess.TimeoutExpired:
            pass
    finally:
        _stop(procs)
        if tmp is not None and not keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    strategy.server.load_state_dict(res["server_state"])
    strategy.rounds = list(res["rounds"])
    strategy.client_log = list(res["clients"])
    strategy.node_of = dict(res["node_of"])
    info = {"rounds": res["rounds"], "clients": res["clients"], "server_pid": res["server_pid"],
            "seconds": time.perf_counter() - start, "server_seconds": res["seconds"],
            "commands": [shlex.join(c) for c in commands], "pids": [p.pid for p in procs], "workdir": str(where) if (tmp is None or keep) else None}
    return res["params"].detach().clone(), info
