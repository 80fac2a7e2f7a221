r"""The server optimizers of :mod:`gradiv_lib.federated` deployed on Flower (chapter 7).

An optional extra: ``pip install "gradiv_lib[flower]"`` (Flower 1.x, ``flwr``). Importing this module works
without Flower; the names below import ``flwr`` on first use and raise an :class:`ImportError` that says how to
install it.

* :class:`GradivStrategy` — a ``flwr.server.strategy.Strategy`` whose ``aggregate_fit`` hands the clients' pseudo-
  gradients :math:`\Delta_i = x^t - x_i` to a :class:`gradiv_lib.federated.Server` (``FedAvg``, ``FedAWARE``, ...)
  and returns its new global parameters. ``configure_fit`` samples the clients itself with
  :func:`gradiv_lib.federated.sample_clients` (all clients in round 0 with ``startup``), so a Flower run visits
  the same clients in the same rounds as :func:`gradiv_lib.federated.run_federated`; Flower's own random sampling
  is not used. :func:`fedavg_strategy`, :func:`fedaware_strategy` and :func:`make_strategy` build it.
* :class:`GradivClient` — a ``flwr.client.NumPyClient`` for client :math:`i` of a
  :class:`gradiv_lib.federated.Federation`: ``fit`` runs exactly the simulator's local work
  (:meth:`Federation.local_updates` of that one client, seeded by ``(seed, round, i)``) and returns
  :math:`x_i = x^t - \Delta_i`.
* :func:`run_local_federation` — a real Flower run on one machine: Flower's gRPC server on ``127.0.0.1`` (a free
  port) and one Flower client per federation client, each in a thread; returns the final global parameters.

With the same federation, server, seed and sampling the final parameters equal those of
:func:`~gradiv_lib.federated.run_federated` up to rounding (the update crosses the wire as :math:`x_i` and is
recomputed as :math:`x^t - x_i`; one client trains alone instead of stacked with the others).

Parameters travel as one flat vector (``Federation.spec`` order, the model's dtype). Flower's telemetry is switched
off (``FLWR_TELEMETRY_ENABLED=0``) unless the environment already sets it.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .federated import SERVERS, FedAWARE, Federation, Server, _is_int, make_server, sample_clients

__all__ = ["GradivStrategy", "GradivClient", "make_strategy", "fedavg_strategy", "fedaware_strategy",
           "run_local_federation", "require_flwr"]

_INSTALL = 'gradiv_lib.flower needs Flower (flwr 1.x): pip install "gradiv_lib[flower]"'
_CLASSES: dict[str, type] = {}


def require_flwr():
    """Import and return ``flwr`` (telemetry off unless set), or raise an ImportError saying how to install it."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        import flwr
        from flwr.server.strategy import Strategy  # noqa: F401
        from flwr.client import NumPyClient  # noqa: F401
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    major = int(str(flwr.__version__).split(".")[0])
    if major != 1:
        raise ImportError(f"{_INSTALL}; found flwr {flwr.__version__}, this module needs 1.x")
    return flwr


def __getattr__(name: str) -> Any:
    if name in ("GradivStrategy", "GradivClient"):
        if not _CLASSES:
            _build_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flat(parameters: Any) -> np.ndarray:
    from flwr.common import parameters_to_ndarrays
    arrays = parameters_to_ndarrays(parameters) if not isinstance(parameters, list) else parameters
    if len(arrays) != 1 or np.ndim(arrays[0]) != 1:
        raise ValueError(f"expected the parameters as one flat vector, got {len(arrays)} arrays of shapes "
                         f"{[np.shape(a) for a in arrays]}")
    return np.asarray(arrays[0])


def _build_classes() -> None:
    require_flwr()
    from flwr.client import NumPyClient
    from flwr.common import FitIns, GetPropertiesIns, ndarrays_to_parameters
    from flwr.server.strategy import Strategy

    class GradivStrategy(Strategy):
        r"""Flower strategy that delegates aggregation to a :class:`gradiv_lib.federated.Server`.

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
        evaluate_fn : callable, optional
            ``evaluate_fn(round, params) -> (loss, metrics)`` or None, called by Flower after every round (and
            at round 0) on the server; ``params`` is the flat global tensor.
        connect_timeout : float
            Seconds to wait, each round, for all :math:`N` clients to be connected (then ``RuntimeError``).
        accept_failures : bool
            If False, a round with a failed client is dropped (the global parameters stay); if True (default)
            the server aggregates the clients that answered.

        The Flower clients must say which federation client they are: ``get_properties`` returns
        ``{"gradiv_client_id": i}`` (:class:`GradivClient` does). Flower round :math:`r` is gradiv round
        :math:`r-1`; clients receive ``{"round": r - 1, "prox_mu": server.prox_mu}`` in the fit config. After
        every round ``rounds`` holds ``(round, client ids, aggregation weights (N,))``.
        """

        def __init__(self, server: Server | Callable[[], Server], *, per_round: int, seed: int = 0,
                     startup: bool | None = None, evaluate_fn: Callable[[int, Tensor], Any] | None = None,
                     connect_timeout: float = 60.0, accept_failures: bool = True) -> None:
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
            if evaluate_fn is not None and not callable(evaluate_fn):
                raise TypeError(f"evaluate_fn must be callable or None, got {type(evaluate_fn).__name__}")
            if not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0:
                raise ValueError(f"connect_timeout must be a number of seconds > 0, got {connect_timeout!r}")
            self.server = server
            self.per_round, self.seed = int(per_round), int(seed)
            self.startup = isinstance(server, FedAWARE) if startup is None else bool(startup)
            self.evaluate_fn = evaluate_fn
            self.connect_timeout = float(connect_timeout)
            self.accept_failures = bool(accept_failures)
            self.rounds: list[tuple[int, list[int], np.ndarray]] = []
            self._ids: dict[str, int] = {}

        def __repr__(self) -> str:
            return f"GradivStrategy({self.server!r}, per_round={self.per_round}, seed={self.seed}, startup={self.startup})"

        def _params(self):
            return ndarrays_to_parameters([self.server.params.detach().cpu().numpy()])

        def initialize_parameters(self, client_manager):  # noqa: D102
            return self._params()

        def clients_of_round(self, t: int) -> np.ndarray:
            """The federation clients sampled in gradiv round ``t`` (0-based)."""
            N = self.server.n_clients
            return np.arange(N) if (self.startup and t == 0) else sample_clients(N, self.per_round, t, self.seed)

        def _resolve(self, client_manager, server_round: int) -> dict[int, Any]:
            N = self.server.n_clients
            if not client_manager.wait_for(N, timeout=self.connect_timeout):
                raise RuntimeError(f"only {client_manager.num_available()} of the federation's {N} clients connected "
                                   f"within connect_timeout={self.connect_timeout} s")
            proxies = client_manager.all()
            self._ids = {cid: i for cid, i in self._ids.items() if cid in proxies}
            for cid, proxy in proxies.items():
                if cid not in self._ids:
                    res = proxy.get_properties(GetPropertiesIns(config={}), timeout=self.connect_timeout,
                                               group_id=server_round)
                    gid = res.properties.get("gradiv_client_id")
                    if not _is_int(gid) or not 0 <= gid < N:
                        raise RuntimeError(f"Flower client {cid} did not report a gradiv_client_id in [0, {N - 1}] "
                                           f"(got {gid!r}); use gradiv_lib.flower.GradivClient")
                    self._ids[cid] = int(gid)
            by_id: dict[int, Any] = {}
            for cid, gid in self._ids.items():
                if gid in by_id:
                    raise RuntimeError(f"two Flower clients claim gradiv_client_id {gid}")
                by_id[gid] = proxies[cid]
            return by_id

        def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
            t = server_round - 1
            proxies = self._resolve(client_manager, server_round)
            missing = [i for i in self.clients_of_round(t).tolist() if i not in proxies]
            if missing:
                raise RuntimeError(f"round {t}: sampled clients {missing} are not connected")
            ins = FitIns(self._params(), {"round": t, "prox_mu": float(self.server.prox_mu)})
            return [(proxies[i], ins) for i in self.clients_of_round(t).tolist()]

        def aggregate_fit(self, server_round, results, failures):  # noqa: D102
            t = server_round - 1
            if not results or (failures and not self.accept_failures):
                return None, {"failures": len(failures)}
            rows = []
            for proxy, res in results:
                gid = self._ids.get(proxy.cid, res.metrics.get("gradiv_client_id"))
                rows.append((int(gid), _flat(res.parameters), res.num_examples))
            rows.sort(key=lambda r: r[0])
            ids = [r[0] for r in rows]
            x = self.server.params
            local = torch.from_numpy(np.stack([r[1] for r in rows])).to(x)
            if local.shape[1] != x.numel():
                raise ValueError(f"clients returned {local.shape[1]} parameters, the server holds {x.numel()}")
            self.server.aggregate(t, ids, x.unsqueeze(0) - local, [float(r[2]) for r in rows])
            self.rounds.append((t, ids, self.server.last_weights.numpy().copy()))
            metrics = {"clients": len(ids), "failures": len(failures),
                       "direction_norm": float(self.server.last_direction_norm)}
            if isinstance(self.server, FedAWARE):
                metrics["explored"] = self.server.explored
            return self._params(), metrics

        def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
            return []

        def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
            return None, {}

        def evaluate(self, server_round, parameters):  # noqa: D102
            if self.evaluate_fn is None:
                return None
            return self.evaluate_fn(server_round, self.server.params.detach().clone())

    class GradivClient(NumPyClient):
        """Flower client ``client_id`` of a :class:`~gradiv_lib.federated.Federation`: ``fit`` is the simulator's
        local work of that client in the round the server sends (``config["round"]``); ``evaluate`` reports loss
        and accuracy on the client's shard. ``backend`` as in :meth:`Federation.local_updates`."""

        def __init__(self, federation: Federation, client_id: int, backend: str = "stacked") -> None:
            if not isinstance(federation, Federation):
                raise TypeError(f"federation must be a Federation, got {type(federation).__name__}")
            if not _is_int(client_id) or not 0 <= client_id < federation.n_clients:
                raise ValueError(f"client_id must be an integer in [0, {federation.n_clients - 1}], got {client_id!r}")
            if backend not in ("stacked", "loop"):
                raise ValueError(f"backend must be 'stacked' or 'loop', got {backend!r}")
            self.federation, self.client_id, self.backend = federation, int(client_id), backend

        def _x(self, parameters) -> Tensor:
            flat = _flat(parameters)
            P = self.federation.spec.size
            if flat.shape != (P,):
                raise ValueError(f"client {self.client_id} received {flat.shape[0]} parameters, its model has {P}")
            return torch.from_numpy(flat.copy()).to(self.federation.device, self.federation.spec.dtype)

        def get_properties(self, config):  # noqa: D102
            return {"gradiv_client_id": self.client_id, "n_samples": self.federation.shard_sizes[self.client_id]}

        def get_parameters(self, config):  # noqa: D102
            return [self.federation.initial_params().detach().cpu().numpy()]

        def fit(self, parameters, config):  # noqa: D102
            if "round" not in config:
                raise ValueError("fit config must hold the gradiv 'round' (GradivStrategy sends it)")
            x = self._x(parameters)
            up, info = self.federation.local_updates(x, [self.client_id], int(config["round"]),
                                                     prox_mu=float(config.get("prox_mu", 0.0)), backend=self.backend)
            metrics = {"gradiv_client_id": self.client_id, "steps": int(info["steps"][0]),
                       "batch_size": int(info["batch_size"][0]), "loss": float(info["loss"][0])}
            return [(x - up[0]).detach().cpu().numpy()], self.federation.shard_sizes[self.client_id], metrics

        def evaluate(self, parameters, config):  # noqa: D102
            fed = self.federation
            sel = torch.from_numpy(fed.shards[self.client_id]).to(fed.device)
            res = fed.evaluate(self._x(parameters), (fed.x[sel], fed.y[sel]))
            return float(res["loss"]), len(sel), {k: float(v) for k, v in res.items() if k != "loss"}

    GradivStrategy.__module__ = GradivClient.__module__ = __name__
    _CLASSES.update(GradivStrategy=GradivStrategy, GradivClient=GradivClient)


def make_strategy(name: str, federation: Federation, *, per_round: int, seed: int = 0, startup: bool | None = None,
                  **server_kwargs: Any):
    """:class:`GradivStrategy` around the server ``name`` (one of :data:`~gradiv_lib.federated.SERVERS`) started
    from ``federation.initial_params()``; ``server_kwargs`` go to the server (``lr``, ``alpha``, ...)."""
    if not isinstance(federation, Federation):
        raise TypeError(f"federation must be a Federation, got {type(federation).__name__}")
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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_local_federation(federation: Federation, strategy: Any, rounds: int, *, host: str = "127.0.0.1",
                         port: int | None = None, timeout: float = 120.0, backend: str = "stacked",
                         quiet: bool = True) -> tuple[Tensor, Any]:
    """A real Flower run on this machine: Flower's gRPC server (``flwr``'s legacy "grpc-bidi" Fleet API) on
    ``host:port`` (a free port by default) and one :class:`GradivClient` per federation client, each connected
    over gRPC from its own thread, for ``rounds`` rounds of ``strategy`` (a :class:`GradivStrategy`).

    Returns ``(params, history)``: the final global parameters (flat tensor) and Flower's ``History``. Raises
    ``TimeoutError`` when the run takes longer than ``timeout`` seconds (each round is also bounded by it);
    the gRPC server is stopped and the client threads are joined in every case. ``quiet`` silences Flower's
    INFO logs (its deprecation notices included) for the run.
    """
    require_flwr()
    import logging

    from flwr.compat.client.app import start_client
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.server import Server as FlowerServer
    from flwr.server.server import run_fl
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

    if not isinstance(federation, Federation):
        raise TypeError(f"federation must be a Federation, got {type(federation).__name__}")
    GS = __getattr__("GradivStrategy")
    if not isinstance(strategy, GS):
        raise TypeError(f"strategy must be a GradivStrategy, got {type(strategy).__name__}")
    if strategy.server.n_clients != federation.n_clients:
        raise ValueError(f"strategy's server is for {strategy.server.n_clients} clients, the federation has "
                         f"{federation.n_clients}")
    if not _is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    port = _free_port(host) if port is None else port
    address = f"{host}:{port}"
    logger = logging.getLogger("flwr")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    strategy.connect_timeout = min(strategy.connect_timeout, float(timeout))
    manager = SimpleClientManager()
    fl_server = FlowerServer(client_manager=manager, strategy=strategy)
    grpc_server = start_grpc_server(client_manager=manager, server_address=address)
    errors: list[BaseException] = []
    threads = []
    result: dict[str, Any] = {}

    def client_main(i: int) -> None:
        try:
            start_client(server_address=address, client=GradivClientCls(federation, i, backend).to_client(),
                         insecure=True, max_retries=20, max_wait_time=float(timeout))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    def server_main() -> None:
        try:
            result["history"] = run_fl(fl_server, ServerConfig(num_rounds=int(rounds), round_timeout=float(timeout)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    GradivClientCls = __getattr__("GradivClient")
    try:
        srv = threading.Thread(target=server_main, name="gradiv-flower-server", daemon=True)
        srv.start()
        for i in range(federation.n_clients):
            th = threading.Thread(target=client_main, args=(i,), name=f"gradiv-flower-client-{i}", daemon=True)
            th.start()
            threads.append(th)
        deadline = time.monotonic() + float(timeout)
        srv.join(max(deadline - time.monotonic(), 0.0))
        if srv.is_alive():
            raise TimeoutError(f"the Flower run did not finish within timeout={timeout} s")
        if errors:
            raise RuntimeError(f"the Flower run failed: {errors[0]!r}") from errors[0]
    finally:
        grpc_server.stop(grace=None).wait(5)
        for th in threads:
            th.join(5)
        logger.setLevel(level)
    return strategy.server.params.detach().clone(), result["history"]
