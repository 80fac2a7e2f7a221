"""Many workers: topologies, the stacked-replica simulator and the ``torch.distributed`` runner (chapters 5–6).

The same algorithm objects (:class:`MinibatchSGD`, :class:`LocalSGD`, :class:`DSGD` with an :class:`SGD`
optimizer) run in one process on stacked parameters (:class:`Simulator`) or on one process per worker
(:class:`DistributedWorker`, launched by ``torchrun --nproc-per-node K -m gradiv_lib.workers ...``); for the same
seed and data split both reach the same parameters.
"""
from .algorithms import DSGD, SAMPLING, SGD, LocalSGD, MinibatchSGD, ShardSampler
from .distributed import DistributedWorker, free_port, spawn
from .simulator import BACKENDS, MIXING, Simulator, diversity_variants
from .topology import (
    TOPOLOGIES,
    Topology,
    check_doubly_stochastic,
    complete,
    consensus_factor,
    exponential,
    grid,
    make_topology,
    metropolis_hastings_weights,
    one_peer_exponential,
    random_graph,
    ring,
    shuffled,
    spectral_gap,
    star,
    torus,
    uniform_weights,
)

__all__ = [
    "BACKENDS", "DSGD", "DistributedWorker", "LocalSGD", "MIXING", "MinibatchSGD", "SAMPLING", "SGD", "ShardSampler",
    "Simulator", "TOPOLOGIES", "Topology", "check_doubly_stochastic", "complete", "consensus_factor", "diversity_variants", "exponential",
    "free_port", "grid", "make_topology", "metropolis_hastings_weights", "one_peer_exponential", "random_graph", "ring",
    "shuffled", "spawn", "spectral_gap", "star", "torus", "uniform_weights",
]
