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

Modules, one idea each: :mod:`.solvers` (the min-norm weights, chapter 7.1), :mod:`.servers` (the server
optimizers, chapters 7.1–7.4), :mod:`.simulation` (clients, the stacked federation and the rounds, chapters
7.2–7.4); everything is importable from :mod:`gradiv_lib.federated`. The Flower deployment of the same servers
(chapter 7.4, the ``[flower]`` extra) is :mod:`.flower` with its Flower App in :mod:`.flower_app`; they are not
imported here.
"""

from __future__ import annotations

from ._checks import _is_int  # noqa: F401 - kept importable from here (it was before the split)
from .servers import SERVERS, FedAdam, FedAvg, FedAvgM, FedAWARE, FedProx, FedYogi, Server, make_server
from .simulation import FederatedHistory, Federation, LocalWork, run_federated, sample_clients
from .solvers import MIN_NORM_METHODS, OFFICIAL_MAX_ITER, OFFICIAL_STOP_CRIT, min_norm_solve, min_norm_weights  # noqa: F401

__all__ = [
    "SERVERS", "LocalWork", "Federation", "Server", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAWARE",
    "make_server", "min_norm_weights", "min_norm_solve", "MIN_NORM_METHODS", "sample_clients", "run_federated", "FederatedHistory",
]
