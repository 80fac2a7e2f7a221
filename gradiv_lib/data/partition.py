"""Client and worker partitions: IID, Dirichlet label skew, label shards (ch. 5–7)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .core import _as_labels, _check_positive_int


# --------------------------------------------------------------------------------------------
# Client partitions
# --------------------------------------------------------------------------------------------


def _check_clients(n_samples: int, n_clients: int) -> None:
    _check_positive_int(n_clients, "n_clients")
    if n_clients > n_samples:
        raise ValueError(
            f"n_clients={n_clients} is more than the number of samples ({n_samples}); every "
            f"client needs at least one sample, so use n_clients <= {n_samples}"
        )


def partition_iid(n_samples: int, n_clients: int, seed: int = 0) -> list[Tensor]:
    """Split ``range(n_samples)`` uniformly at random into ``n_clients`` parts.

    Part sizes differ by at most one. Returns a list of sorted ``LongTensor`` index arrays whose
    union is exactly ``range(n_samples)``.
    """
    _check_positive_int(n_samples, "n_samples")
    _check_clients(n_samples, n_clients)
    perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in torch.tensor_split(perm, n_clients)]


def partition_dirichlet(
    labels: Tensor | Sequence[int] | np.ndarray,
    n_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[Tensor]:
    r"""Label-skewed partition by per-class Dirichlet proportions.

    For every class :math:`k`, draw :math:`p_k\sim\mathrm{Dir}_J(\alpha\mathbf 1)` over the
    :math:`J` clients and deal the (shuffled) samples of class :math:`k` out in those
    proportions. Small :math:`\alpha` gives each client few classes; :math:`\alpha\to\infty`
    tends to IID. This is the "hetero-dir" / "noniid-labeldir" split of Yurochkin et al. (2019),
    Hsu et al. (2019) and NIID-Bench / FedLab, including their balancing step: a client that
    already holds more than :math:`N/J` samples gets no share of later classes. The whole draw
    is repeated until every client has at least ``min_size`` samples, at most ``max_tries``
    times.

    Parameters
    ----------
    labels : 1-D integer tensor or sequence
        Class label of every sample.
    n_clients : int
        Number of clients :math:`J`.
    alpha : float
        Concentration :math:`\alpha > 0`.
    seed : int
        Seed (NumPy generator): the same seed gives the same partition.
    min_size : int
        Smallest allowed client, ``0 <= min_size <= N / n_clients`` (0 accepts empty clients
        and never re-draws).
    max_tries : int
        Bound on the number of re-draws.

    Returns
    -------
    list of LongTensor
        Sorted sample indices of each client; together exactly ``range(N)``.

    Raises
    ------
    RuntimeError
        When no draw in ``max_tries`` gives every client ``min_size`` samples.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_clients(n, n_clients)
    if not (isinstance(alpha, (int, float, np.number)) and 0 < float(alpha) < math.inf):
        raise ValueError(
            f"alpha must be a finite number > 0 (Dirichlet concentration), got {alpha}"
        )
    _check_positive_int(min_size, "min_size", minimum=0)
    _check_positive_int(max_tries, "max_tries")
    if min_size * n_clients > n:
        raise ValueError(
            f"min_size={min_size} is impossible for {n_clients} clients and {n} samples; use "
            f"min_size <= {n // n_clients}"
        )
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    classes = np.unique(labels_np)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for k in classes:
            members = rng.permutation(np.flatnonzero(labels_np == k))
            proportions = rng.dirichlet(np.full(n_clients, float(alpha)))
            proportions = proportions * (sizes < n / n_clients)
            total = proportions.sum()
            proportions = proportions / total if total > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(proportions) * len(members)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(chunks))).long() for chunks in parts]
    raise RuntimeError(
        f"no Dirichlet draw in max_tries={max_tries} gave every one of {n_clients} clients at "
        f"least min_size={min_size} samples (alpha={alpha}); lower min_size or n_clients, raise "
        f"alpha or max_tries"
    )


def partition_shards(
    labels: Tensor | Sequence[int] | np.ndarray,
    n_clients: int,
    shards_per_client: int,
    seed: int = 0,
) -> list[Tensor]:
    """Pathological non-IID split of McMahan et al. (2017): label-sorted shards.

    Sort the samples by label (random order within a class), cut the sorted list into
    ``n_clients * shards_per_client`` contiguous shards of equal size (sizes differ by at most
    one when it does not divide), and give each client ``shards_per_client`` shards chosen at
    random. A client then sees at most ``shards_per_client`` labels when every class size is a
    multiple of the shard size (MNIST: 200 shards of 300); otherwise a shard can straddle two
    classes and a client may see up to ``2 * shards_per_client`` labels.

    Returns
    -------
    list of LongTensor
        Sorted sample indices of each client; together exactly ``range(N)``.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_clients(n, n_clients)
    _check_positive_int(shards_per_client, "shards_per_client")
    n_shards = n_clients * shards_per_client
    if n_shards > n:
        raise ValueError(
            f"n_clients * shards_per_client = {n_clients} * {shards_per_client} = {n_shards} "
            f"shards is more than the {n} samples; every shard needs at least one sample"
        )
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n, generator=generator)
    by_label = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    shards = torch.tensor_split(by_label, n_shards)
    assignment = torch.randperm(n_shards, generator=generator).reshape(n_clients, shards_per_client)
    return [torch.cat([shards[s] for s in row.tolist()]).sort().values for row in assignment]


