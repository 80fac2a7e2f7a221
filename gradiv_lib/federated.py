r"""Federated learning under hybrid heterogeneity: clients, server optimizers and FedAWARE (chapter 7).

:math:`N` clients hold shards of the data (IID, Dirichlet label skew or label-sorted shards, from
:mod:`gradiv_lib.data`). Each round :math:`t` the server samples :math:`m` of them; client :math:`i` starts from the
global parameters :math:`x^t`, runs local SGD with its own number of epochs or steps and its own batch size
(*system heterogeneity*, drawn per client per round) and returns the pseudo-gradient

.. math:: \Delta_i = x^t - x_i^{t,\text{final}}.

All sampled clients' local SGD runs as stacked tensors ``(m, P)`` (:class:`Federation`): one batched
forward/backward per local step for every client at once, variable batch sizes as per-sample weights and variable
step counts as a 0/1 mask. A Python loop over model copies (``backend="loop"``) is kept only as the reference.

Server optimizers share one interface, ``server.aggregate(round, client_ids, client_updates, client_weights)``
returning the new global parameters, with ``state_dict``/``load_state_dict``:

* :class:`FedAvg` — :math:`x \leftarrow x - \eta_g\sum_{i\in S}p_i\Delta_i`, :math:`p_i = n_i/\sum_{j\in S}n_j`;
* :class:`FedProx` — FedAvg on the server, a proximal term :math:`\frac\mu2\lVert w - x^t\rVert^2` in the
  clients' loss (:attr:`Server.prox_mu`, applied by :class:`Federation`);
* :class:`FedAvgM` — server momentum :math:`v\leftarrow\beta v + \bar\Delta`, :math:`x\leftarrow x-\eta_g v`;
* :class:`FedAdam`, :class:`FedYogi` — adaptive server optimizers of Reddi et al. (2021) on :math:`\bar\Delta`;
* :class:`FedAWARE` — Zeng et al. (2025): a memory of every client's update
  :math:`m_i\leftarrow(1-\alpha)m_i+\alpha\Delta_i` (sampled clients only), normalised
  :math:`u_i = m_i/\lVert m_i\rVert`, min-norm weights
  :math:`\lambda^\star=\arg\min_{\lambda\in\Delta_N}\lVert\sum_i\lambda_iu_i\rVert^2` (:func:`min_norm_weights`,
  Frank–Wolfe with exact line search) and :math:`x\leftarrow x-\eta_g\sum_i\lambda^\star_iu_i`. Until every client
  has been sampled once the step is FedAvg over the sampled clients (the memories still update), as in the
  official code: a never-sampled client has :math:`m_i = 0`, which would pull :math:`\lambda^\star` onto it and
  stop training (:math:`d\approx 0`).

For unit vectors the min-norm weights maximise the weighted gradient diversity
:math:`\sum_i\lambda_i\lVert u_i\rVert^2/\lVert\sum_i\lambda_iu_i\rVert^2 = 1/\lVert\sum_i\lambda_iu_i\rVert^2`.

:func:`run_federated` runs the rounds and records accuracy, loss, the gradient diversity of the client updates
and the aggregation weights; it can checkpoint and resume (everything random is a function of the seed, the round
and the client).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .results import save_checkpoint
from .data import InMemoryData
from .workers._engines import FlatSpec, bmm_layers, sample_mixing_layers
from .workers.simulator import diversity_variants

__all__ = [
    "SERVERS", "LocalWork", "Federation", "Server", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAWARE",
    "make_server", "min_norm_weights", "min_norm_solve", "MIN_NORM_METHODS", "sample_clients", "run_federated", "FederatedHistory",
]

#: Server optimizer names accepted by :func:`make_server` and :func:`run_federated`.
SERVERS: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedaware")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_real(value: Any, name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = True) -> float:
    v = float(value) if _is_real(value) else float("nan")
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


# =============================================================================================
# Min-norm element of the convex hull (MGDA / FedAWARE weights)
# =============================================================================================


#: Min-norm solvers of :func:`min_norm_solve`.
MIN_NORM_METHODS: tuple[str, ...] = ("wolfe", "away", "fw", "official")

#: The official solver's constants (``MinNormSolver`` of FedAWARE's ``min_norm_solvers.py``, from
#: isl-org/MultiObjectiveOptimization): iteration cap and stop on :math:`\lVert\Delta\lambda\rVert_1`.
OFFICIAL_MAX_ITER = 1000
OFFICIAL_STOP_CRIT = 1e-5


def _official_from2(v1v1: float, v1v2: float, v2v2: float) -> tuple[float, float]:
    r"""The official two-point rule: weight ``c`` of :math:`x_1` in :math:`\min_c\lVert cx_1+(1-c)x_2\rVert^2`
    and its cost, with the boundary cases clipped to 0.999 / 0.001 (not 1 / 0)."""
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _official(G: np.ndarray, max_iter: int, stop: float) -> tuple[np.ndarray, dict[str, float]]:
    n = G.shape[0]
    lam = np.zeros(n)
    it = 0
    if n == 1:
        lam[0] = 1.0
    else:
        dmin, best = math.inf, (0, 1, 0.5)
        for i in range(n):  # best pair, first one wins ties (strict <), as in _min_norm_2d
            for j in range(i + 1, n):
                c, d = _official_from2(G[i, i], G[i, j], G[j, j])
                if d < dmin:
                    dmin, best = d, (i, j, c)
        i, j, c = best
        lam[i], lam[j] = c, 1 - c
        if n >= 3:  # n = 2: the pair is the answer
            while it < max_iter:
                Gl = G @ lam
                t = int(np.argmin(Gl))
                nc, _ = _official_from2(float(lam @ Gl), float(lam @ G[:, t]), float(G[t, t]))
                new = nc * lam
                new[t] += 1 - nc
                if np.abs(new - lam).sum() < stop:
                    break  # the official code returns the point *before* this last step
                lam = new
                it += 1
    return lam, {"iterations": it, "gap": max(float(lam @ G @ lam - (G @ lam).min()), 0.0), "objective": float(lam @ G @ lam)}


def min_norm_solve(gram: Tensor | np.ndarray, *, method: str = "wolfe", max_iter: int | None = None,
                   tol: float | None = None,
                   init: np.ndarray | Tensor | None = None) -> tuple[np.ndarray, dict[str, float]]:
    r"""Minimise :math:`f(\lambda)=\lambda^\top G\lambda` over the simplex by Frank–Wolfe with exact line search.

    ``method``:

    * ``"official"`` — exactly the solver of FedAWARE's official code (``MinNormSolver.find_min_norm_element_FW``):
      start at the best pair by the two-point rule with the boundary weights clipped to 0.999 / 0.001, then
      Frank–Wolfe steps :math:`\lambda\leftarrow c\lambda + (1-c)e_t` with :math:`c` from the same clipped
      two-point rule (so even a step that cannot descend moves 0.001 towards :math:`e_t`), stopping when
      :math:`\lVert\Delta\lambda\rVert_1 <` ``tol`` (default :data:`OFFICIAL_STOP_CRIT` = 1e-5, returning the point
      before that step) or after ``max_iter`` steps (default :data:`OFFICIAL_MAX_ITER` = 1000); no warm start.
      It is an approximation (weights never reach exactly 0 or 1 at the first steps); use it to reproduce the paper;
    * ``"fw"`` — plain Frank–Wolfe with the *exact* (unclipped) line search and the gap stop below;
    * ``"away"`` — Frank–Wolfe with away steps (linear convergence, but slow when :math:`G` is ill conditioned);
    * ``"wolfe"`` (default) — Wolfe's min-norm-point algorithm (1976): the same Frank–Wolfe vertex choice, then a
      *fully corrective* step, the exact minimiser of :math:`f` over the affine hull of the current support,
      followed back into the simplex by exact line search (dropping vertices); it terminates after finitely many
      steps and is the fastest by far (tens of iterations where ``"away"`` needs thousands).

    Start at the best pair of vertices (the closed-form two-point solution over all pairs, or the best vertex) or
    at ``init`` (a warm start, e.g. last round's weights), then at every iteration move towards the vertex
    :math:`e_t`, :math:`t = \arg\min_i (G\lambda)_i`, with the exact step
    :math:`\gamma = \operatorname{clip}\big((a-b)/(a-2b+c), 0, 1\big)`, :math:`a=\lambda^\top G\lambda`,
    :math:`b=(G\lambda)_t`, :math:`c = G_{tt}` (the official two-point rule without its 0.999/0.001 clipping). Plain
    Frank–Wolfe converges like :math:`O(1/k)` and crawls when the optimum lies inside a face; with ``away_steps``
    an away step (away from the worst vertex of the support, also with exact line search) is taken whenever it
    promises more descent, which converges linearly on the simplex.

    Stops when the Frank–Wolfe gap :math:`\mathrm{gap}=\lambda^\top G\lambda - \min_i(G\lambda)_i` — a certificate,
    :math:`f(\lambda)-f^\star\le 2\,\mathrm{gap}` — is at most ``tol`` :math:`\cdot f(\lambda)` (relative) or
    :math:`10^{-15}`, or after ``max_iter`` iterations.

    Returns
    -------
    (lam, info)
        ``lam`` float64 array ``(n,)`` on the simplex; ``info`` with ``"iterations"``, ``"gap"`` (at ``lam``) and
        ``"objective"``.
    """
    official = method == "official"
    if max_iter is None:
        max_iter = OFFICIAL_MAX_ITER if official else 10000
    if tol is None:
        tol = OFFICIAL_STOP_CRIT if official else 1e-6
    G = gram.detach().cpu().double().numpy() if isinstance(gram, Tensor) else np.asarray(gram, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"gram must be a square (n, n) matrix with n >= 1, got shape {G.shape}")
    if not np.isfinite(G).all():
        raise ValueError("gram contains inf or nan")
    if not _is_int(max_iter) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    _check_real(tol, "tol", 0.0)
    if method not in MIN_NORM_METHODS:
        raise ValueError(f"method must be one of {MIN_NORM_METHODS}, got {method!r}")
    G = 0.5 * (G + G.T)
    n = G.shape[0]
    if method == "wolfe":
        return _wolfe(G, max_iter, tol, init)
    if official:
        if init is not None:
            raise ValueError("method='official' has no warm start (the official solver always starts at the best pair); "
                             "pass init=None")
        return _official(G, max_iter, tol)
    away_steps = method == "away"
    if init is not None:
        lam = (init.detach().cpu().double().numpy() if isinstance(init, Tensor) else np.asarray(init, dtype=np.float64)).copy()
        if lam.shape != (n,) or not np.isfinite(lam).all() or (lam < 0).any() or abs(lam.sum() - 1) > 1e-6:
            raise ValueError(f"init must be {n} non-negative numbers summing to 1 (a point of the simplex)")
        lam /= lam.sum()
    elif n == 1:
        lam = np.ones(1)
    else:
        # best pair: gamma e_i + (1 - gamma) e_j, gamma = (G_jj - G_ij) / (G_ii + G_jj - 2 G_ij)
        lam = np.zeros(n)
        d = np.diag(G)
        denom = d[:, None] + d[None, :] - 2 * G
        with np.errstate(divide="ignore", invalid="ignore"):
            gam = np.where(denom > 1e-15, (d[None, :] - G) / denom, 1.0)
        gam = np.clip(gam, 0.0, 1.0)
        val = gam ** 2 * d[:, None] + (1 - gam) ** 2 * d[None, :] + 2 * gam * (1 - gam) * G
        np.fill_diagonal(val, np.inf)
        i, j = np.unravel_index(int(np.argmin(val)), val.shape)
        if val[i, j] <= d.min():
            lam[i], lam[j] = gam[i, j], 1 - gam[i, j]
        else:
            lam[int(np.argmin(d))] = 1.0
    Gl = G @ lam
    diag = np.diag(G).copy()
    it = 0
    while True:
        f = float(lam @ Gl)
        t = int(Gl.argmin())
        gap = f - float(Gl[t])
        if gap <= tol * f or gap <= 1e-15 or it >= max_iter:
            break
        it += 1
        s = -1
        if away_steps:
            s = int(np.where(lam > 0, Gl, -np.inf).argmax())
            if not (f - float(Gl[s]) < -gap and lam[s] < 1.0):  # away slope f - Gl_s vs FW slope Gl_t - f = -gap
                s = -1
        if s < 0:  # Frank-Wolfe step towards e_t
            b, c = float(Gl[t]), diag[t]
            curv = f - 2 * b + c
            gamma = 1.0 if curv <= 1e-18 else min((f - b) / curv, 1.0)
            lam *= 1 - gamma
            lam[t] += gamma
            Gl *= 1 - gamma
            Gl += gamma * G[:, t]
        else:  # away step: lam + gamma (lam - e_s), gamma <= lam_s / (1 - lam_s)
            b, c = float(Gl[s]), diag[s]
            gmax = lam[s] / (1 - lam[s])
            curv = f - 2 * b + c
            gamma = gmax if curv <= 1e-18 else min((b - f) / curv, gmax)
            lam *= 1 + gamma
            lam[s] -= gamma
            if gamma >= gmax:
                lam[s] = 0.0
            Gl *= 1 + gamma
            Gl -= gamma * G[:, s]
    lam = np.clip(lam, 0.0, None)
    lam /= lam.sum()
    return lam, {"iterations": it, "gap": max(float(lam @ G @ lam - (G @ lam).min()), 0.0), "objective": float(lam @ G @ lam)}


def _wolfe(G: np.ndarray, max_iter: int, tol: float, init: Any) -> tuple[np.ndarray, dict[str, float]]:
    n = G.shape[0]
    lam = np.zeros(n)
    if init is not None:
        lam0 = init.detach().cpu().double().numpy() if isinstance(init, Tensor) else np.asarray(init, dtype=np.float64)
        if lam0.shape != (n,) or not np.isfinite(lam0).all() or (lam0 < 0).any() or abs(lam0.sum() - 1) > 1e-6:
            raise ValueError(f"init must be {n} non-negative numbers summing to 1 (a point of the simplex)")
        # warm start from the best vertex of the old support (Wolfe's corrals need affinely independent supports)
        support = np.flatnonzero(lam0 > 0)
        lam[support[np.argmin(np.diag(G)[support])]] = 1.0
    else:
        lam[int(np.argmin(np.diag(G)))] = 1.0
    it = 0
    while True:
        Gl = G @ lam
        f = float(lam @ Gl)
        t = int(Gl.argmin())
        gap = f - float(Gl[t])
        if gap <= tol * f or gap <= 1e-15 or it >= max_iter or lam[t] > 0 and gap <= 1e-12:
            break
        it += 1
        lam_new = lam.copy()
        support = np.flatnonzero(lam_new > 0).tolist() + [t]
        for _ in range(n + 1):  # minor cycles: affine minimiser, then back into the simplex
            S = np.asarray(support)
            k = len(S)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k] = G[np.ix_(S, S)]
            kkt[:k, k] = kkt[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            try:
                alpha = np.linalg.solve(kkt, rhs)[:k]
                if not np.isfinite(alpha).all() or abs(alpha.sum() - 1) > 1e-8:
                    raise np.linalg.LinAlgError
            except np.linalg.LinAlgError:  # affinely dependent support: least squares
                alpha = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
            if (alpha > 1e-14).all():
                lam_new[:] = 0.0
                lam_new[S] = alpha
                break
            cur = lam_new[S]
            neg = alpha <= 1e-14
            theta = np.min(cur[neg] / (cur[neg] - alpha[neg]))
            cur = np.clip(cur + theta * (alpha - cur), 0.0, None)
            lam_new[:] = 0.0
            lam_new[S] = cur
            support = [i for i in S.tolist() if lam_new[i] > 1e-14]
            if len(support) == 1:
                lam_new[:] = 0.0
                lam_new[support[0]] = 1.0
                break
        lam_new /= lam_new.sum()
        if float(lam_new @ G @ lam_new) >= f - 1e-16 * max(f, 1.0):  # no progress: numerical floor
            break
        lam = lam_new
    return lam, {"iterations": it, "gap": max(float(lam @ G @ lam - (G @ lam).min()), 0.0), "objective": float(lam @ G @ lam)}


def min_norm_weights(vectors: Tensor | None = None, *, gram: Tensor | None = None, normalize: bool = False,
                     method: str = "wolfe", max_iter: int | None = None, tol: float | None = None) -> Tensor:
    r"""Weights :math:`\lambda^\star\in\Delta_n` of the min-norm point :math:`\sum_i\lambda_iv_i` of the convex hull
    of ``vectors`` ``(n, ...)`` (or of the Gram matrix ``gram``), by :func:`min_norm_solve`.

    With ``normalize=True`` the rows are first scaled to unit norm (a zero row stays zero), as FedAWARE does; then
    :math:`\lambda^\star` maximises the weighted gradient diversity
    :math:`\sum_i\lambda_i\lVert u_i\rVert^2/\lVert\sum_i\lambda_iu_i\rVert^2 = 1/\lVert\sum_i\lambda_iu_i\rVert^2`.
    KKT: :math:`\langle v_i, d^\star\rangle\ge\lVert d^\star\rVert^2` for every :math:`i`, with equality on the
    support, so :math:`d^\star` has a non-negative inner product with every vector (a common descent direction).

    Returns a float64 tensor ``(n,)`` on the simplex.
    """
    if (vectors is None) == (gram is None):
        raise ValueError("give exactly one of vectors (n, ...) or gram (n, n)")
    if vectors is not None:
        if not isinstance(vectors, Tensor) or vectors.dim() < 1 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be a tensor (n, ...) with n >= 1, got {getattr(vectors, 'shape', type(vectors).__name__)}")
        V = vectors.reshape(vectors.shape[0], -1).double()
        if not bool(torch.isfinite(V).all()):
            raise ValueError("vectors contains inf or nan")
        if normalize:
            V = _normalize_rows(V)
        gram = V @ V.T
    elif normalize:
        raise ValueError("normalize=True needs vectors, not a Gram matrix")
    lam, _ = min_norm_solve(gram, method=method, max_iter=max_iter, tol=tol)
    return torch.from_numpy(lam)


def _normalize_rows(V: Tensor) -> Tensor:
    norms = V.norm(dim=1, keepdim=True)
    return V / torch.where(norms > 0, norms, torch.ones_like(norms))


# =============================================================================================
# Server optimizers
# =============================================================================================


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
    :math:`x\leftarrow x-\eta_g\,m/(\sqrt v+\tau)` (no bias correction).

    ``v0`` is the initial second moment :math:`v_0` (every coordinate): ``None`` (default) is :math:`\tau^2`, as in
    Reddi et al.'s paper; FedAWARE's official FedOpt baseline starts at :math:`v_0 = 0` (with :math:`\tau=10^{-4}`),
    which makes the first step sign-like, :math:`\eta_g(1-\beta_1)/\sqrt{1-\beta_2}` per coordinate."""

    name = "fedadam"

    def __init__(self, params: Tensor, n_clients: int, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, v0: float | None = None) -> None:
        super().__init__(params, n_clients, lr)
        self.beta1 = _check_real(beta1, "beta1", 0.0, 1.0)
        self.beta2 = _check_real(beta2, "beta2", 0.0, 1.0)
        self.tau = _check_real(tau, "tau", 0.0, lo_open=True)
        self.v0 = self.tau ** 2 if v0 is None else _check_real(v0, "v0", 0.0)
        self.m = torch.zeros_like(self.params)
        self.v = torch.full_like(self.params, self.v0)

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
    (FedAWARE's scripts: :math:`\eta_g = 0.01`, :math:`\beta_1=0.9`, :math:`\beta_2=0.99`, :math:`\tau=10^{-4}`,
    :math:`v_0 = 0`: pass ``tau=1e-4, v0=0.0``)."""

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


# =============================================================================================
# Clients
# =============================================================================================


def _check_range(value: Any, name: str, allow_none_hi: bool = False) -> tuple[int, int | None]:
    if _is_int(value):
        if value < 1:
            raise ValueError(f"{name} must be an integer >= 1 or a (low, high) range, got {value!r}")
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and _is_int(value[0]) and (
            _is_int(value[1]) or (allow_none_hi and value[1] is None)):
        lo, hi = int(value[0]), (None if value[1] is None else int(value[1]))
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"{name} range must satisfy 1 <= low <= high, got {value!r}")
        return lo, hi
    what = "(low, high or None)" if allow_none_hi else "(low, high)"
    raise ValueError(f"{name} must be an integer >= 1 or a {what} pair of integers, got {value!r}")


@dataclass(frozen=True)
class LocalWork:
    """What a client does in a round: local SGD with (possibly random) epochs or steps and batch size.

    Ranges ``(low, high)`` are drawn uniformly (inclusive) per client per round — system heterogeneity. The
    official FedAWARE "+" setting is ``epochs=(2, 5), batch_size=(10, None)`` (``None``: the client's
    :math:`n_i - 1`).

    Parameters
    ----------
    lr : float
        Local learning rate (> 0).
    batch_size : int or (int, int or None)
        Samples per local step (clipped to the client's shard size).
    epochs : int or (int, int)
        Passes over the shard (batches are consecutive slices of a fresh permutation; the last one may be
        smaller). Ignored when ``steps`` is given.
    steps : int or (int, int), optional
        A fixed number of local steps instead of epochs (batches continue through successive epochs).
    """

    lr: float = 0.05
    batch_size: int | tuple[int, int | None] = 16
    epochs: int | tuple[int, int] = 1
    steps: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _check_real(self.lr, "lr", 0.0, lo_open=True)
        _check_range(self.batch_size, "batch_size", allow_none_hi=True)
        _check_range(self.epochs, "epochs")
        if self.steps is not None:
            _check_range(self.steps, "steps")

    def draw(self, rng: np.random.Generator, shard_size: int) -> tuple[int, int, int | None]:
        """``(batch_size, epochs, steps or None)`` of one client in one round."""
        lo, hi = _check_range(self.batch_size, "batch_size", allow_none_hi=True)
        hi = max(shard_size - 1, 1) if hi is None else hi
        lo, hi = min(lo, shard_size), min(max(hi, lo), shard_size)
        b = int(rng.integers(lo, hi + 1))
        e_lo, e_hi = _check_range(self.epochs, "epochs")
        e = int(rng.integers(e_lo, e_hi + 1))
        s = None
        if self.steps is not None:
            s_lo, s_hi = _check_range(self.steps, "steps")
            s = int(rng.integers(s_lo, s_hi + 1))
        return b, e, s


class Federation:
    r""":math:`N` clients with shards of ``data`` and a ``model`` architecture; runs local SGD of many clients at once.

    Parameters
    ----------
    model : nn.Module
        The architecture and the initial global parameters (:meth:`initial_params`). Its forward must not mix
        samples (no train-mode BatchNorm).
    data : InMemoryData or (x, y)
        Training set.
    partition : list of LongTensor
        Each client's sample indices (:func:`gradiv_lib.data.partition_iid`, ``partition_dirichlet``,
        ``partition_shards``).
    local : LocalWork
        The clients' local work (system heterogeneity).
    loss_fn : callable
        ``loss_fn(outputs, targets, reduction="none")`` must give per-sample losses (``F.cross_entropy``,
        ``F.mse_loss``); clients minimise their batch mean.
    seed : int
        Seed of every random choice: client ``i`` in round ``t`` draws from ``default_rng([seed, t, i])``.
    device : str or torch.device, optional
        Where the data and the stacked parameters live (default: the model's device).
    """

    def __init__(self, model: nn.Module, data: InMemoryData | tuple[Tensor, Tensor], partition: Sequence[Tensor],
                 local: LocalWork | None = None, *, loss_fn: Callable[..., Tensor] = F.cross_entropy, seed: int = 0,
                 device: str | torch.device | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        mixing = sample_mixing_layers(model)
        if mixing:
            raise ValueError(f"model has BatchNorm layers in training mode ({', '.join(mixing)}); clients cannot be "
                             "stacked with them: use GroupNorm, model.eval() or track_running_stats=False")
        if isinstance(data, (tuple, list)) and len(data) == 2:
            data = InMemoryData(data[0], data[1])
        if not isinstance(data, InMemoryData):
            raise TypeError(f"data must be InMemoryData or an (x, y) pair, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError("data is empty")
        local = LocalWork() if local is None else local
        if not isinstance(local, LocalWork):
            raise TypeError(f"local must be a LocalWork, got {type(local).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(partition, (list, tuple)) or not partition:
            raise ValueError(f"partition must be a non-empty list of index tensors (one per client), got {type(partition).__name__}")
        if len(partition) > len(data):
            raise ValueError(f"partition has {len(partition)} clients but the data only {len(data)} samples; "
                             f"use at most {len(data)} clients")
        shards = []
        for j, part in enumerate(partition):
            idx = torch.as_tensor(part)
            if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise ValueError(f"partition[{j}] must be a 1-D tensor of integer indices, got shape {tuple(idx.shape)} dtype {idx.dtype}")
            if idx.numel() == 0:
                raise ValueError(f"partition[{j}] is empty: every client needs at least one sample")
            if int(idx.min()) < 0 or int(idx.max()) >= len(data):
                raise ValueError(f"partition[{j}] holds indices outside [0, {len(data) - 1}]")
            shards.append(idx.long().cpu().numpy())
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.module = copy.deepcopy(model).to(self.device)
        self.spec = FlatSpec(self.module)
        self.x = data.x.to(self.device, dtype=self.spec.dtype) if data.x.dtype.is_floating_point else data.x.to(self.device)
        self.y = data.y.to(self.device)
        self.shards = shards
        self.local = local
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self._bmm = bmm_layers(self.module)
        self._vforward = vmap(lambda p, xb: functional_call(self.module, p, (xb,)), randomness="different")

    @property
    def n_clients(self) -> int:
        """:math:`N`."""
        return len(self.shards)

    @property
    def shard_sizes(self) -> list[int]:
        """:math:`n_i`, samples of each client."""
        return [len(s) for s in self.shards]

    def initial_params(self) -> Tensor:
        """The model's parameters as a flat vector ``(P,)``."""
        return self.spec.flatten(self.module).to(self.device)

    def plan(self, client: int, round: int) -> tuple[np.ndarray, dict[str, int]]:
        """Sample indices of ``client``'s local batches in ``round``: ``(steps, batch_size)`` with ``-1`` padding
        (a smaller last batch of an epoch), and the drawn ``{"batch_size", "epochs", "steps"}``."""
        shard = self.shards[client]
        n = len(shard)
        rng = np.random.default_rng([self.seed, int(round), int(client)])
        B, E, S = self.local.draw(rng, n)
        nb = -(-n // B)
        total = E * nb if S is None else S
        rows, epoch = [], 0
        while sum(len(r) for r in rows) < total:
            perm = np.full(nb * B, -1, dtype=np.int64)
            perm[:n] = shard[rng.permutation(n)]
            rows.append(perm.reshape(nb, B))
            epoch += 1
        idx = np.concatenate(rows)[:total]
        return idx, {"batch_size": B, "epochs": epoch, "steps": total}

    def _forward(self, flat: Tensor, x: Tensor) -> Tensor:
        M, B = x.shape[:2]
        views = self.spec.views(flat)
        if self._bmm is None:
            return self._vforward(dict(zip(self.spec.names, views)), x)
        index = {n: i for i, n in enumerate(self.spec.names)}
        names = {id(p): n for n, p in self.module.named_parameters()}
        h = x
        for layer in self._bmm:
            if type(layer) is nn.Flatten:
                h = h.reshape(M, B, -1)
            elif type(layer) is nn.Linear:
                W = views[index[names[id(layer.weight)]]].transpose(1, 2)
                if layer.bias is not None:
                    h = torch.baddbmm(views[index[names[id(layer.bias)]]].unsqueeze(1), h, W)
                else:
                    h = torch.bmm(h, W)
            else:
                h = layer(h)
        return h

    def _per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        M, B = y.shape[:2]
        loss = self.loss_fn(out.reshape(M * B, *out.shape[2:]), y.reshape(M * B, *y.shape[2:]).to(
            out.dtype if y.dtype.is_floating_point else y.dtype), reduction="none")
        return loss.reshape(M, B, -1).mean(-1)

    def local_updates(self, params: Tensor, clients: Sequence[int] | Tensor, round: int, *, prox_mu: float = 0.0,
                      backend: str = "stacked") -> tuple[Tensor, dict[str, Any]]:
        r"""Run every client in ``clients`` from the global ``params`` ``(P,)`` and return the pseudo-gradients
        :math:`\Delta_i = x - x_i` ``(m, P)`` and ``info`` (``"steps"``, ``"batch_size"`` per client, ``"loss"``:
        the mean loss of each client's first batch, at the global parameters).

        ``backend="stacked"`` runs all clients at once (batched forward/backward over stacked parameters, the
        shorter clients masked); ``"loop"`` is the reference: one model copy and ``torch.optim.SGD`` per client.
        ``prox_mu`` adds FedProx's :math:`\frac\mu2\lVert w-x\rVert^2` to every client's loss.
        """
        clients = [int(c) for c in torch.as_tensor(clients).flatten().tolist()]
        if not clients:
            raise ValueError("clients is empty")
        if min(clients) < 0 or max(clients) >= self.n_clients:
            raise ValueError(f"clients must lie in [0, {self.n_clients - 1}], got {clients}")
        if backend not in ("stacked", "loop"):
            raise ValueError(f"backend must be 'stacked' or 'loop', got {backend!r}")
        mu = _check_real(prox_mu, "prox_mu", 0.0)
        if not isinstance(params, Tensor) or params.shape != (self.spec.size,):
            raise ValueError(f"params must be a flat tensor ({self.spec.size},), got {getattr(params, 'shape', None)}")
        x0 = params.detach().to(self.device, self.spec.dtype)
        plans = [self.plan(c, round) for c in clients]
        info = {"steps": [p[1]["steps"] for p in plans], "batch_size": [p[1]["batch_size"] for p in plans]}
        lr = float(self.local.lr)
        if backend == "loop":
            return self._loop(x0, plans, lr, mu, info)
        M = len(clients)
        T = max(p[0].shape[0] for p in plans)
        Bmax = max(p[0].shape[1] for p in plans)
        idx = np.full((T, M, Bmax), -1, dtype=np.int64)
        for j, (rows, _) in enumerate(plans):
            idx[: rows.shape[0], j, : rows.shape[1]] = rows
        idx_t = torch.from_numpy(idx).to(self.device)
        valid = (idx_t >= 0)
        counts = valid.sum(-1, keepdim=True)
        wts = (valid.to(self.spec.dtype) / counts.clamp_min(1).to(self.spec.dtype))
        active = (counts.squeeze(-1) > 0).to(self.spec.dtype)  # (T, M)
        X = self.x[idx_t.clamp_min(0)]
        Y = self.y[idx_t.clamp_min(0)]
        v = x0.unsqueeze(0).repeat(M, 1)
        first_loss = None
        for t in range(T):
            leaf = v.detach().requires_grad_(True)
            out = self._forward(leaf, X[t])
            losses = (self._per_sample_loss(out, Y[t]) * wts[t]).sum(1)
            (g,) = torch.autograd.grad(losses.sum(), leaf)
            if not bool(torch.isfinite(losses).all()):
                raise FloatingPointError(f"non-finite local loss in round {round} on clients "
                                         f"{[clients[j] for j in torch.nonzero(~torch.isfinite(losses)).flatten().tolist()]}: lower lr ({lr})")
            if first_loss is None:
                first_loss = losses.detach()
            with torch.no_grad():
                if mu:
                    g = g + mu * (v - x0)
                v = v - lr * active[t][:, None] * g
        info["loss"] = first_loss.cpu().tolist()
        return (x0.unsqueeze(0) - v).detach(), info

    def _loop(self, x0: Tensor, plans, lr: float, mu: float, info: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        updates, losses = [], []
        for rows, _ in plans:
            model = self.spec.load_into(copy.deepcopy(self.module), x0)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            anchor = [p.detach().clone() for p in model.parameters()]
            for t, row in enumerate(rows):
                sel = torch.from_numpy(row[row >= 0]).to(self.device)
                out = model(self.x[sel])
                loss = self.loss_fn(out, self.y[sel], reduction="none").reshape(len(sel), -1).mean(-1).mean()
                if t == 0:
                    losses.append(float(loss.detach()))
                if mu:
                    loss = loss + 0.5 * mu * sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))
                opt.zero_grad()
                loss.backward()
                opt.step()
            updates.append(x0 - self.spec.flatten(model).to(x0))
        info["loss"] = losses
        return torch.stack(updates), info

    @torch.no_grad()
    def evaluate(self, params: Tensor, data: InMemoryData | tuple[Tensor, Tensor] | None = None,
                 batch_size: int = 4096) -> dict[str, float]:
        """Mean loss and (class labels) accuracy of the model with flat ``params`` on ``data`` (default: the
        training set)."""
        if data is None:
            x, y = self.x, self.y
        else:
            if isinstance(data, (tuple, list)):
                data = InMemoryData(data[0], data[1])
            if len(data) == 0:
                raise ValueError("data is empty")
            x = data.x.to(self.device, dtype=self.spec.dtype) if data.x.dtype.is_floating_point else data.x.to(self.device)
            y = data.y.to(self.device)
        p = self.spec.as_dict(params.to(self.device, self.spec.dtype))
        total, correct = 0.0, 0
        for s in range(0, len(x), batch_size):
            out = functional_call(self.module, p, (x[s:s + batch_size],))
            yb = y[s:s + batch_size]
            total += float(self.loss_fn(out, yb.to(out.dtype) if yb.dtype.is_floating_point else yb)) * len(yb)
            if not yb.dtype.is_floating_point and out.dim() == 2:
                correct += int((out.argmax(1) == yb).sum())
        res = {"loss": total / len(x)}
        if not y.dtype.is_floating_point:
            res["accuracy"] = correct / len(x)
        return res

    def __repr__(self) -> str:
        return f"Federation(N={self.n_clients}, P={self.spec.size}, {self.local})"


# =============================================================================================
# Rounds
# =============================================================================================


def sample_clients(n_clients: int, per_round: int, round: int, seed: int = 0) -> np.ndarray:
    """``per_round`` distinct clients of ``n_clients``, uniformly, sorted; a pure function of ``(seed, round)``."""
    if not _is_int(n_clients) or n_clients < 1:
        raise ValueError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    if not _is_int(per_round) or not 1 <= per_round <= n_clients:
        raise ValueError(f"per_round (clients sampled per round) must be an integer in [1, {n_clients}], got {per_round!r}")
    rng = np.random.default_rng([int(seed), int(round), 7919])
    return np.sort(rng.choice(n_clients, size=int(per_round), replace=False))


class FederatedHistory(dict):
    """What :func:`run_federated` records, a ``dict`` of NumPy arrays (one row per recorded round).

    Keys: ``round``; ``test_accuracy``, ``test_loss`` (when a test set is given), ``train_loss``,
    ``train_accuracy``; ``diversity`` (Yin's :math:`\\Delta` of the round's client updates), ``rms_ratio``
    (:math:`\\sqrt{m\\Delta}`, FedAWARE's logged metric), ``weighted_diversity`` (at the aggregation weights, over
    the clients that received weight), ``direction_norm`` (norm of the applied server direction), ``weights``
    ``(rounds, N)`` (each client's aggregation weight), ``participants`` ``(rounds, N)`` 0/1, ``local_steps`` ``(rounds, N)``
    (0 for clients that did not train); ``params``, the final global parameters ``(P,)``.
    """

    @property
    def final_accuracy(self) -> float:
        """Test accuracy at the last recorded round."""
        return float(self["test_accuracy"][-1])


def run_federated(federation: Federation, server: str | Server, rounds: int, *, per_round: int,
                  test: InMemoryData | tuple[Tensor, Tensor] | None = None, seed: int = 0, eval_every: int = 1,
                  startup: bool | None = None, checkpoint: str | Path | None = None, checkpoint_every: int = 10,
                  server_kwargs: dict[str, Any] | None = None, backend: str = "stacked") -> FederatedHistory:
    """Run ``rounds`` rounds of federated training and return the :class:`FederatedHistory`.

    Parameters
    ----------
    federation : Federation
        Clients, data and local work.
    server : str or Server
        A name of :data:`SERVERS` (built from ``federation.initial_params()`` with ``server_kwargs``) or a server.
    rounds : int
        Communication rounds (>= 1).
    per_round : int
        :math:`m`, clients sampled per round, in ``[1, N]`` (:func:`sample_clients` with ``seed``).
    test : InMemoryData, optional
        Held-out data for ``test_accuracy`` / ``test_loss``.
    eval_every : int
        Evaluate every this many rounds (and after the last).
    startup : bool, optional
        Sample **all** clients in round 0 (FedAWARE's ``-startup 1``); default True for FedAWARE, False otherwise.
    checkpoint : path, optional
        Save the server, the round and the history there every ``checkpoint_every`` rounds (atomically) and
        resume from it when it exists (``torch.load(weights_only=True)``); results are identical to an
        uninterrupted run.
    backend : ``"stacked"`` or ``"loop"``
        How clients train (:meth:`Federation.local_updates`).
    """
    if not isinstance(federation, Federation):
        raise TypeError(f"federation must be a Federation, got {type(federation).__name__}")
    N = federation.n_clients
    if not _is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not _is_int(per_round) or not 1 <= per_round <= N:
        raise ValueError(f"per_round (participating clients per round) must be an integer in [1, {N}] "
                         f"(N = {N} clients), got {per_round!r}")
    if not _is_int(eval_every) or eval_every < 1:
        raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    if not _is_int(checkpoint_every) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if isinstance(server, str):
        server = make_server(server, federation.initial_params(), N, **(server_kwargs or {}))
    elif not isinstance(server, Server):
        raise TypeError(f"server must be one of {SERVERS} or a Server, got {type(server).__name__}")
    elif server_kwargs:
        raise ValueError("server_kwargs only apply when server is given by name")
    if server.n_clients != N or server.params.numel() != federation.spec.size:
        raise ValueError(f"server is for {server.n_clients} clients x {server.params.numel()} parameters, the federation has "
                         f"{N} x {federation.spec.size}")
    if startup is None:
        startup = isinstance(server, FedAWARE)
    sizes = np.asarray(federation.shard_sizes, dtype=np.float64)
    hist: dict[str, list] = {k: [] for k in ("round", "test_accuracy", "test_loss", "train_loss", "train_accuracy",
                                             "diversity", "rms_ratio", "weighted_diversity", "direction_norm",
                                             "weights", "participants", "local_steps")}
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        if state.get("server", {}).get("name") != server.name:
            raise ValueError(f"checkpoint {ckpt} holds a {state.get('server', {}).get('name')!r} run, not {server.name!r}")
        server.load_state_dict(state["server"])
        start = int(state["round"])
        hist = {k: list(v) for k, v in state["history"].items()}
    for t in range(start, int(rounds)):
        clients = np.arange(N) if (startup and t == 0) else sample_clients(N, per_round, t, seed)
        updates, info = federation.local_updates(server.params, clients, t, prox_mu=server.prox_mu, backend=backend)
        server.aggregate(t, clients, updates, sizes[clients])
        if (t + 1) % eval_every == 0 or t + 1 == rounds:
            hist["round"].append(t + 1)
            if test is not None:
                ev = federation.evaluate(server.params, test)
                hist["test_loss"].append(ev["loss"])
                hist["test_accuracy"].append(ev.get("accuracy", float("nan")))
            ev = federation.evaluate(server.params)
            hist["train_loss"].append(ev["loss"])
            hist["train_accuracy"].append(ev.get("accuracy", float("nan")))
            dv = diversity_variants(updates)
            hist["diversity"].append(dv["yin"])
            hist["rms_ratio"].append(dv["rms_ratio"])
            w = server.last_weights
            support = torch.nonzero(w > 1e-12).flatten()
            mem = server.memory[support] if isinstance(server, FedAWARE) and server.explored else None
            if mem is not None:
                vecs = _normalize_rows(mem.double())
            else:
                pos = {c: k for k, c in enumerate(clients.tolist())}
                vecs = updates[[pos[int(c)] for c in support.tolist()]].double()
            q = w[support] / w[support].sum()
            hist["weighted_diversity"].append(diversity_variants(vecs, q)["weighted"])
            hist["direction_norm"].append(server.last_direction_norm)
            hist["weights"].append(w.float().clone())
            part = torch.zeros(N)
            part[torch.as_tensor(clients)] = 1.0
            hist["participants"].append(part)
            steps = torch.zeros(N)
            steps[torch.as_tensor(clients)] = torch.tensor(info["steps"], dtype=torch.float32)
            hist["local_steps"].append(steps)
        if ckpt is not None and ((t + 1) % checkpoint_every == 0 or t + 1 == rounds):
            save_checkpoint({"round": t + 1, "server": server.state_dict(), "history": hist}, ckpt)
    out = FederatedHistory()
    for k, v in hist.items():
        if k in ("weights", "participants", "local_steps"):
            out[k] = torch.stack(v).numpy() if v else np.zeros((0, N))
        elif v or k != "test_accuracy":
            out[k] = np.asarray(v, dtype=np.float64)
    if test is None:
        out.pop("test_accuracy", None)
        out.pop("test_loss", None)
    out["params"] = server.params.detach().cpu().numpy()
    return out
