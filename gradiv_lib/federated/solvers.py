r"""The min-norm element of a convex hull: FedAWARE's (and MGDA's) aggregation weights (chapter 7.1).

:func:`min_norm_solve` minimises :math:`\lambda^\top G\lambda` over the simplex for a Gram matrix :math:`G`
(Wolfe's min-norm-point algorithm by default; plain and away-step Frank–Wolfe; ``"official"``, the clipped
Frank–Wolfe of FedAWARE's code); :func:`min_norm_weights` does it for a stack of vectors, optionally normalised to
unit rows as FedAWARE does. Chapter 7.1 (``book/ch07_fedaware/01_min_norm``) compares the solvers;
:class:`~gradiv_lib.federated.FedAWARE` calls them every round.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import _check_real, _is_int

__all__ = ["MIN_NORM_METHODS", "OFFICIAL_MAX_ITER", "OFFICIAL_STOP_CRIT", "min_norm_solve", "min_norm_weights"]


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


def _check_gram(G: np.ndarray) -> None:
    """Two necessary conditions of a positive semi-definite (Gram) matrix, O(n²): a non-negative diagonal and
    Cauchy–Schwarz, |G_ij| ≤ √(G_ii G_jj), to rounding. The solvers assume a convex objective: only then is
    their stopping gap a certificate, f(λ) - f* ≤ 2·gap."""
    diagonal = np.diag(G)
    scale = max(float(np.abs(diagonal).max()), 1e-300)
    if float(diagonal.min()) < -1e-12 * scale:
        i = int(np.argmin(diagonal))
        raise ValueError(f"gram is not a Gram matrix: G[{i}, {i}] = {diagonal[i]:.6g} < 0 (a squared norm); pass G = V Vᵀ of the vectors")
    bound = np.sqrt(np.outer(np.maximum(diagonal, 0), np.maximum(diagonal, 0)))
    excess = np.abs(G) - bound * (1 + 1e-6) - 1e-12 * scale  # 1e-6: a float32 Gram of equal vectors passes
    if float(excess.max()) > 0:
        i, j = np.unravel_index(int(np.argmax(excess)), G.shape)
        raise ValueError(
            f"gram is not a Gram matrix (not positive semi-definite): |G[{i}, {j}]| = {abs(G[i, j]):.6g} exceeds "
            f"sqrt(G[{i}, {i}] G[{j}, {j}]) = {bound[i, j]:.6g}; pass G = V Vᵀ of the vectors"
        )


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
    G = 0.5 * (G + G.T)  # the same objective λᵀGλ
    _check_gram(G)
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
