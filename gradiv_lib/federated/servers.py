r"""Server optimizers: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi and FedAWARE (chapter 7).

Every server holds the global parameters and applies one round with
``server.aggregate(round, client_ids, client_updates, client_weights)`` (pseudo-gradients
:math:`\Delta_i = x^t - x_i`); :func:`make_server` builds one by name (:data:`SERVERS`). Chapter 7.1 contrasts
FedAvg's and FedAWARE's directions on toy vectors; chapters 7.2–7.3 run them all on digits through
:func:`~gradiv_lib.federated.run_federated`; chapter 7.4 runs the same objects behind a Flower strategy.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import _check_real, _is_int
from .solvers import MIN_NORM_METHODS, _normalize_rows, min_norm_solve

__all__ = ["SERVERS", "Server", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAWARE", "make_server"]

#: Server optimizer names accepted by :func:`make_server` and :func:`run_federated`.
SERVERS: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedaware")


class Server:
    """Base class of the server optimizers: holds the global parameters ``params`` ``(P,)``.

    After :meth:`aggregate`, ``last_weights`` ``(N,)`` holds the weight each client's update received this round
    (zeros for clients that did not contribute) and ``last_direction_norm`` the norm of the applied direction.

    Parameters
    ----------
    params : Tensor
        Initial global parameters (flat, ``(P,)``); the server keeps its own copy.
    n_clients : int
        :math:`N`, the number of clients (servers with per-client state need it).
    lr : float
        Server learning rate :math:`\\eta_g > 0`.
    """

    name = "server"
    #: Proximal coefficient the clients add to their loss (FedProx); 0 for the others.
    prox_mu: float = 0.0

    def __init__(self, params: Tensor, n_clients: int, lr: float = 1.0) -> None:
        if not isinstance(params, Tensor) or params.dim() != 1 or params.numel() == 0 or not params.dtype.is_floating_point:
            raise ValueError(f"params must be a non-empty flat floating tensor (P,), got {getattr(params, 'shape', type(params).__name__)}")
        if not bool(torch.isfinite(params).all()):
            raise ValueError("params contains inf or nan")
        if not _is_int(n_clients) or n_clients < 1:
            raise ValueError(f"n_clients must be an integer >= 1, got {n_clients!r}")
        self.lr = _check_real(lr, "lr", 0.0, lo_open=True)
        self.params = params.detach().clone()
        self.n_clients = int(n_clients)
        self.last_weights = torch.zeros(self.n_clients, dtype=torch.float64)
        self.last_direction_norm = float("nan")

    # -- validation shared by every server
    def _check(self, client_ids: Any, client_updates: Tensor, client_weights: Any) -> tuple[Tensor, Tensor, Tensor]:
        ids = torch.as_tensor(client_ids).long().flatten().cpu()
        if ids.numel() == 0:
            raise ValueError("client_ids is empty: aggregate needs at least one client's update")
        if int(ids.min()) < 0 or int(ids.max()) >= self.n_clients:
            raise ValueError(f"client_ids must lie in [0, {self.n_clients - 1}], got {ids.tolist()}")
        if len(set(ids.tolist())) != ids.numel():
            raise ValueError(f"client_ids must be distinct, got {ids.tolist()}")
        if not isinstance(client_updates, Tensor) or client_updates.shape != (ids.numel(), self.params.numel()):
            raise ValueError(f"client_updates must be a tensor ({ids.numel()}, {self.params.numel()}) (one pseudo-gradient "
                             f"x - x_i per client), got {getattr(client_updates, 'shape', type(client_updates).__name__)}")
        if not bool(torch.isfinite(client_updates).all()):
            raise ValueError("client_updates contains inf or nan")
        w = torch.as_tensor(client_weights, dtype=torch.float64).flatten().cpu()
        if w.numel() != ids.numel() or bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
            raise ValueError(f"client_weights must be {ids.numel()} finite non-negative numbers with a positive sum "
                             f"(e.g. the clients' sample counts), got {w.tolist()}")
        return ids, client_updates.to(self.params), w / w.sum()

    def _weighted_mean(self, ids: Tensor, updates: Tensor, p: Tensor) -> Tensor:
        self.last_weights = torch.zeros(self.n_clients, dtype=torch.float64)
        self.last_weights[ids] = p
        return p.to(updates) @ updates

    def aggregate(self, round: int, client_ids: Sequence[int] | Tensor, client_updates: Tensor,
                  client_weights: Sequence[float] | Tensor) -> Tensor:
        """Apply one round: ``client_updates`` ``(m, P)`` are the pseudo-gradients :math:`x - x_i` of the clients
        ``client_ids`` (distinct, in ``[0, N)``), ``client_weights`` their (unnormalised) weights, e.g. sample
        counts. Returns the new global parameters (also stored in ``params``)."""
        raise NotImplementedError

    def _step(self, direction: Tensor) -> Tensor:
        self.last_direction_norm = float(direction.double().norm())
        self.params = self.params - self.lr * direction
        return self.params

    def state_dict(self) -> dict[str, Any]:
        """Global parameters and optimizer state (tensors, numbers); ``torch.save`` it, load with ``weights_only``."""
        return {"name": self.name, "params": self.params.clone(), "n_clients": self.n_clients, "lr": self.lr,
                **{k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._extra_state().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of a server of the same kind and size."""
        if not isinstance(state, dict) or state.get("name") != self.name:
            raise ValueError(f"state is not a {self.name!r} server state (got name {state.get('name') if isinstance(state, dict) else None!r})")
        if state["n_clients"] != self.n_clients or state["params"].shape != self.params.shape:
            raise ValueError(f"state holds {state['n_clients']} clients x {tuple(state['params'].shape)} parameters, "
                             f"this server {self.n_clients} x {tuple(self.params.shape)}")
        self.params = state["params"].to(self.params).clone()
        self._load_extra({k: v for k, v in state.items() if k not in ("name", "params", "n_clients", "lr")})

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.n_clients}, P={self.params.numel()}, lr={self.lr})"


class FedAvg(Server):
    r"""FedAvg (McMahan et al. 2017): :math:`x\leftarrow x-\eta_g\sum_{i\in S}p_i\Delta_i`, :math:`p_i\propto n_i`."""

    name = "fedavg"

    def aggregate(self, round, client_ids, client_updates, client_weights):  # noqa: D102
        ids, up, p = self._check(client_ids, client_updates, client_weights)
        return self._step(self._weighted_mean(ids, up, p))


class FedProx(FedAvg):
    r"""FedProx (Li et al. 2020): FedAvg on the server; clients minimise
    :math:`f_i(w)+\frac\mu2\lVert w-x^t\rVert^2` (``mu`` :math:`\ge 0`, 0.1 in FedAWARE's MNIST scripts)."""

    name = "fedprox"

    def __init__(self, params: Tensor, n_clients: int, lr: float = 1.0, mu: float = 0.1) -> None:
        super().__init__(params, n_clients, lr)
        self.prox_mu = _check_real(mu, "mu", 0.0)

    def __repr__(self) -> str:
        return f"FedProx(N={self.n_clients}, P={self.params.numel()}, lr={self.lr}, mu={self.prox_mu})"


class FedAvgM(Server):
    r"""FedAvg with server momentum (Hsu et al. 2019): :math:`v\leftarrow\beta v+\bar\Delta`,
    :math:`x\leftarrow x-\eta_g v` (``beta`` in ``[0, 1)``, 0.7 in FedAWARE's scripts)."""

    name = "fedavgm"

    def __init__(self, params: Tensor, n_clients: int, lr: float = 1.0, beta: float = 0.7) -> None:
        super().__init__(params, n_clients, lr)
        self.beta = _check_real(beta, "beta", 0.0, 1.0)
        self.velocity = torch.zeros_like(self.params)

    def aggregate(self, round, client_ids, client_updates, client_weights):  # noqa: D102
        ids, up, p = self._check(client_ids, client_updates, client_weights)
        self.velocity = self.beta * self.velocity + self._weighted_mean(ids, up, p)
        return self._step(self.velocity)

    def _extra_state(self):
        return {"velocity": self.velocity, "beta": self.beta}

    def _load_extra(self, state):
        self.velocity = state["velocity"].to(self.params).clone()


class FedAdam(Server):
    r"""FedAdam (Reddi et al. 2021) on the averaged pseudo-gradient :math:`\bar\Delta`:
    :math:`m\leftarrow\beta_1m+(1-\beta_1)\bar\Delta`, :math:`v\leftarrow\beta_2v+(1-\beta_2)\bar\Delta^2`,
    :math:`x\leftarrow x-\eta_g\,m/(\sqrt v+\tau)` (no bias correction, :math:`v_0=\tau^2`, as in the paper)."""

    name = "fedadam"

    def __init__(self, params: Tensor, n_clients: int, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(params, n_clients, lr)
        self.beta1 = _check_real(beta1, "beta1", 0.0, 1.0)
        self.beta2 = _check_real(beta2, "beta2", 0.0, 1.0)
        self.tau = _check_real(tau, "tau", 0.0, lo_open=True)
        self.m = torch.zeros_like(self.params)
        self.v = torch.full_like(self.params, self.tau ** 2)

    def _second_moment(self, g2: Tensor) -> Tensor:
        return self.beta2 * self.v + (1 - self.beta2) * g2

    def aggregate(self, round, client_ids, client_updates, client_weights):  # noqa: D102
        ids, up, p = self._check(client_ids, client_updates, client_weights)
        g = self._weighted_mean(ids, up, p)
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self._second_moment(g * g)
        return self._step(self.m / (self.v.sqrt() + self.tau))

    def _extra_state(self):
        return {"m": self.m, "v": self.v}

    def _load_extra(self, state):
        self.m, self.v = state["m"].to(self.params).clone(), state["v"].to(self.params).clone()


class FedYogi(FedAdam):
    r"""FedYogi (Reddi et al. 2021): FedAdam with :math:`v\leftarrow v-(1-\beta_2)\bar\Delta^2\operatorname{sign}(v-\bar\Delta^2)`
    (FedAWARE's scripts: :math:`\eta_g = 0.01`, :math:`\beta_1=0.9`, :math:`\beta_2=0.99`, :math:`\tau=10^{-4}`)."""

    name = "fedyogi"

    def _second_moment(self, g2: Tensor) -> Tensor:
        return self.v - (1 - self.beta2) * g2 * torch.sign(self.v - g2)


class FedAWARE(Server):
    r"""FedAWARE (Zeng et al. 2025), the server update of the official code (``Server_MomentumGradientCache``).

    Every round, for the sampled clients only, :math:`m_i\leftarrow(1-\alpha)m_i+\alpha\Delta_i` (memories start
    at zero; unsampled clients keep a stale :math:`m_i`). Once every client has been sampled at least once:
    :math:`u_i=m_i/\lVert m_i\rVert` (a zero row stays zero), :math:`\lambda^\star` = :func:`min_norm_weights` of
    the :math:`u_i` over **all** :math:`N` clients, :math:`d=\sum_i\lambda^\star_iu_i` (:math:`\lVert d\rVert\le 1`)
    and :math:`x\leftarrow x-\eta_g d`. Before that (``explored`` is False) the step is FedAvg over the sampled
    clients (weights :math:`n_i` renormalised over :math:`S_t`). Sampling all clients in the first round
    (``startup`` in :func:`run_federated`, the code's "zero-error momentum initialization") makes every later round
    a FedAWARE round.

    Parameters
    ----------
    alpha : float
        Memory weight :math:`\alpha\in(0, 1]` (0.3 MNIST/FMNIST, 0.5 CIFAR, 0.99 AGNews in the official scripts).
    lr : float
        :math:`\eta_g` (1 in every official script).
    unseen : ``"fedavg"`` or ``"include"``
        ``"fedavg"`` (the official rule above); ``"include"`` solves over all memories from the first round, zero
        rows included — the pitfall, kept to show what happens: :math:`\lambda^\star` collapses onto a zero row
        and :math:`d\approx0`.
    method, max_iter, tol : optional
        The min-norm solver of :func:`min_norm_solve`: ``"wolfe"`` (default, the exact minimiser) or
        ``"official"`` (the official code's clipped Frank–Wolfe, 1000 steps, stop at
        :math:`\lVert\Delta\lambda\rVert_1<10^{-5}`, never warm-started) to reproduce the paper.
    warm_start : bool
        Start the solver from last round's weights (not with ``method="official"``).
    """

    name = "fedaware"

    def __init__(self, params: Tensor, n_clients: int, lr: float = 1.0, alpha: float = 0.5, unseen: str = "fedavg",
                 method: str = "wolfe", max_iter: int | None = None, tol: float | None = None,
                 warm_start: bool = True) -> None:
        super().__init__(params, n_clients, lr)
        self.alpha = _check_real(alpha, "alpha", 0.0, 1.0, lo_open=True, hi_open=False)
        if unseen not in ("fedavg", "include"):
            raise ValueError(f"unseen must be 'fedavg' (the official rule) or 'include', got {unseen!r}")
        self.unseen = unseen
        if method not in MIN_NORM_METHODS:
            raise ValueError(f"method must be one of {MIN_NORM_METHODS}, got {method!r}")
        self.method, self.max_iter, self.tol, self.warm_start = method, max_iter, tol, bool(warm_start)
        self.lam: Tensor | None = None
        self.memory = torch.zeros(self.n_clients, self.params.numel(), dtype=self.params.dtype, device=self.params.device)
        self.seen = torch.zeros(self.n_clients, dtype=torch.bool)
        self.last_solver: dict[str, float] = {}

    @property
    def explored(self) -> bool:
        """Whether every client has been sampled at least once."""
        return bool(self.seen.all())

    def aggregate(self, round, client_ids, client_updates, client_weights):  # noqa: D102
        ids, up, p = self._check(client_ids, client_updates, client_weights)
        self.memory[ids] = (1 - self.alpha) * self.memory[ids] + self.alpha * up
        self.seen[ids] = True
        if not self.explored and self.unseen == "fedavg":
            self.last_solver = {}
            return self._step(self._weighted_mean(ids, up, p))
        U = _normalize_rows(self.memory.double())
        init = self.lam if (self.warm_start and self.lam is not None and self.method != "official") else None
        lam, info = min_norm_solve(U @ U.T, method=self.method, max_iter=self.max_iter, tol=self.tol, init=init)
        self.last_solver = info
        lam_t = torch.from_numpy(lam)
        self.lam = lam_t.clone()
        self.last_weights = lam_t.clone()
        return self._step((lam_t.to(U) @ U).to(self.params))

    def _extra_state(self):
        return {"memory": self.memory, "seen": self.seen, "alpha": self.alpha,
                "lam": torch.full((0,), 0.0) if self.lam is None else self.lam}

    def _load_extra(self, state):
        self.memory = state["memory"].to(self.params).clone()
        self.seen = state["seen"].clone().bool()
        self.lam = state["lam"].clone() if state["lam"].numel() else None

    def __repr__(self) -> str:
        return f"FedAWARE(N={self.n_clients}, P={self.params.numel()}, lr={self.lr}, alpha={self.alpha}, explored={self.explored})"


_SERVER_CLASSES: dict[str, type[Server]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM,
                                            "fedadam": FedAdam, "fedyogi": FedYogi, "fedaware": FedAWARE}


def make_server(name: str, params: Tensor, n_clients: int, **kwargs: Any) -> Server:
    """The server optimizer ``name`` (one of :data:`SERVERS`) with keyword hyper-parameters."""
    if name not in _SERVER_CLASSES:
        raise ValueError(f"server must be one of {SERVERS}, got {name!r}")
    return _SERVER_CLASSES[name](params, n_clients, **kwargs)
