r"""Clients and rounds: the local work, the stacked federation of clients and the round loop (chapter 7).

:class:`LocalWork` says what a client does in a round (local SGD with epochs or steps and a batch size drawn per
client and round: system heterogeneity); :class:`Federation` holds :math:`N` clients' shards and runs many
clients' local SGD at once as stacked tensors; :func:`sample_clients` and :func:`run_federated` run the rounds
against a server of :mod:`.servers` and record a :class:`FederatedHistory`. Chapters 7.2–7.3 run everything
through :func:`run_federated`; chapter 7.4 checks that a Flower deployment gives the same parameters.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ..data import InMemoryData
from ..norms.loss_scale import check_loss_shapes_on
from ..results import save_checkpoint
from ..stateless import functional_call
from ..workers._engines import FlatSpec, bmm_forward, bmm_plan, forward_mixes_samples, sample_mixing_layers
from ..workers.simulator import diversity_variants
from ._checks import _check_real, _is_int
from .servers import SERVERS, FedAWARE, Server, make_server
from .solvers import _normalize_rows

__all__ = ["LocalWork", "Federation", "sample_clients", "FederatedHistory", "run_federated"]


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
    client_ids : sequence of int, optional
        The clients' ids in the seeding rule (default ``0 .. N-1``): client ``j`` of this federation draws from
        ``default_rng([seed, t, client_ids[j]])``. A Flower client holds a one-client federation of its own shard
        with ``client_ids=[i]`` and then draws exactly what client ``i`` draws in the full federation.
    """

    def __init__(self, model: nn.Module, data: InMemoryData | tuple[Tensor, Tensor], partition: Sequence[Tensor],
                 local: LocalWork | None = None, *, loss_fn: Callable[..., Tensor] = F.cross_entropy, seed: int = 0,
                 device: str | torch.device | None = None, client_ids: Sequence[int] | None = None) -> None:
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
        targets = self.y[:2].to(self.spec.dtype) if self.y.dtype.is_floating_point else self.y[:2]
        check_loss_shapes_on(loss_fn, self.module, self.x[:2], targets)  # (B, 1) outputs against (B,) targets
        self.shards = shards
        self.local = local
        self.loss_fn = loss_fn
        self.seed = int(seed)
        if client_ids is None:
            self.client_ids = list(range(len(shards)))
        else:
            ids = list(client_ids) if isinstance(client_ids, (list, tuple, range, np.ndarray)) else None
            if (ids is None or len(ids) != len(shards) or not all(_is_int(i) and i >= 0 for i in ids)
                    or len(set(int(i) for i in ids)) != len(ids)):
                raise ValueError(f"client_ids must be {len(shards)} distinct non-negative integers (one per partition), "
                                 f"got {client_ids!r}")
            self.client_ids = [int(i) for i in ids]
        self._bmm = bmm_plan(self.module, self.spec)
        self._vforward = vmap(lambda p, xb: functional_call(self.module, p, (xb,)), randomness="different")
        # the stacked backend pads the clients' batches to one size, which such a model would see
        self._mixes_samples = forward_mixes_samples(self.module, self.spec.as_dict(self.initial_params()), self.x)
        self._stacked_ran = False

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
        rng = np.random.default_rng([self.seed, int(round), self.client_ids[int(client)]])
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
        views = self.spec.views(flat)
        if self._bmm is None:
            return self._vforward(dict(zip(self.spec.names, views)), x)
        return bmm_forward(self._bmm, views, x)

    def _stacked_forward(self, flat: Tensor, x: Tensor) -> Tensor:
        if self._stacked_ran:
            return self._forward(flat, x)
        try:
            out = self._forward(flat, x)
        except Exception as error:  # vmap cannot batch the model (a fused LSTM kernel): name the way out
            raise ValueError(
                f"the stacked backend cannot run {type(self.module).__name__} ({type(error).__name__}: {error}); "
                "use backend='loop' (one model per client)"
            ) from error
        self._stacked_ran = True
        return out

    def _per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        M, B = y.shape[:2]
        loss = self.loss_fn(out.reshape(M * B, *out.shape[2:]), y.reshape(M * B, *y.shape[2:]).to(
            out.dtype if y.dtype.is_floating_point else y.dtype), reduction="none")
        return loss.reshape(M, B, -1).mean(-1)

    def stacked_batches(self, plans: Sequence[tuple[np.ndarray, dict[str, int]]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The clients' local batches of :meth:`plan` padded into one stack: inputs ``X`` ``(T, M, B, ...)`` and
        labels ``Y`` ``(T, M, B)`` for ``T`` = the most local steps and ``B`` = the largest batch, the weights
        ``1/b`` of each real sample in its step's mean (0 on padding) ``(T, M, B)``, and ``active`` ``(T, M)``,
        1 where client ``m`` takes a step ``t`` (clients with fewer steps idle at the end)."""
        M = len(plans)
        T = max(p[0].shape[0] for p in plans)
        Bmax = max(p[0].shape[1] for p in plans)
        idx = np.full((T, M, Bmax), -1, dtype=np.int64)
        for j, (rows, _) in enumerate(plans):
            idx[: rows.shape[0], j, : rows.shape[1]] = rows
        idx_t = torch.from_numpy(idx).to(self.device)
        valid = idx_t >= 0
        counts = valid.sum(-1, keepdim=True)
        wts = valid.to(self.spec.dtype) / counts.clamp_min(1).to(self.spec.dtype)
        active = (counts.squeeze(-1) > 0).to(self.spec.dtype)
        return self.x[idx_t.clamp_min(0)], self.y[idx_t.clamp_min(0)], wts, active

    def local_updates(self, params: Tensor, clients: Sequence[int] | Tensor, round: int, *, prox_mu: float = 0.0,
                      backend: str = "stacked") -> tuple[Tensor, dict[str, Any]]:
        r"""Run every client in ``clients`` from the global ``params`` ``(P,)`` and return the pseudo-gradients
        :math:`\Delta_i = x - x_i` ``(m, P)`` and ``info`` (``"steps"``, ``"batch_size"`` per client, ``"loss"``:
        the mean loss of each client's first batch, at the global parameters).

        ``backend="stacked"`` runs all clients at once (batched forward/backward over stacked parameters, the
        shorter clients masked; a model whose output for a sample depends on the rest of its batch, such as
        BatchNorm without running statistics, is refused, since the padding would change it); ``"loop"`` is the
        reference: one model copy and ``torch.optim.SGD`` per client.
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
        if self._mixes_samples:
            raise ValueError(
                f"{type(self.module).__name__}'s output for a sample depends on the other samples of its batch (BatchNorm "
                "without running statistics, or an operation across the batch), and the stacked backend pads the "
                "clients' batches to one size, which would change it; use backend='loop' (one model per client, exact), "
                "or per-sample normalisation (GroupNorm, LayerNorm, BatchNorm in eval mode)"
            )
        M = len(clients)
        X, Y, wts, active = self.stacked_batches(plans)
        T = X.shape[0]
        v = x0.unsqueeze(0).repeat(M, 1)
        first_loss = None
        for t in range(T):
            leaf = v.detach().requires_grad_(True)
            out = self._stacked_forward(leaf, X[t])
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
