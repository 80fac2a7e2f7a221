"""gradiv_lib.flower: real Flower runs (gRPC server and clients on 127.0.0.1) against the simulator
(`run_federated`), and input validation. Skipped without the `flower` extra."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from gradiv_lib import federated as fed  # noqa: E402
from gradiv_lib import flower as gf  # noqa: E402
from gradiv_lib.data import InMemoryData, load_digits, partition_dirichlet  # noqa: E402
from gradiv_lib.models import mlp  # noqa: E402

torch.set_num_threads(1)

N_CLIENTS, PER_ROUND, ROUNDS, SEED = 4, 2, 5, 1


@pytest.fixture(scope="module")
def digits() -> InMemoryData:
    train, _ = load_digits(seed=0, dtype=torch.float64)
    return InMemoryData(train.x[:400], train.y[:400])


def _federation(digits: InMemoryData) -> fed.Federation:
    part = partition_dirichlet(digits.y, N_CLIENTS, alpha=0.5, seed=0)
    return fed.Federation(mlp(64, 16, 2, 10, seed=0).double(), digits, part,
                          fed.LocalWork(lr=0.1, batch_size=(8, 32), steps=(2, 6)), seed=0)


def _flower_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gradiv-flower")]


@pytest.mark.parametrize("name, kwargs", [("fedavg", {}), ("fedaware", {"alpha": 0.5}), ("fedprox", {"mu": 0.1})])
def test_flower_run_equals_simulator(digits, name, kwargs):
    sim = fed.run_federated(_federation(digits), name, ROUNDS, per_round=PER_ROUND, seed=SEED, server_kwargs=kwargs)
    strategy = gf.make_strategy(name, _federation(digits), per_round=PER_ROUND, seed=SEED, **kwargs)
    params, history = gf.run_local_federation(_federation(digits), strategy, ROUNDS, timeout=60)
    x0 = _federation(digits).initial_params().numpy()
    assert np.abs(sim["params"] - x0).max() > 1e-2  # the runs moved
    np.testing.assert_allclose(params.numpy(), sim["params"], rtol=0, atol=1e-12)
    # the same clients every round, and the same aggregation weights (FedAWARE: min-norm weights over all N)
    assert len(strategy.rounds) == ROUNDS
    for r, (t, ids, w) in enumerate(strategy.rounds):
        assert t == r
        assert ids == np.flatnonzero(sim["participants"][r]).tolist()
        np.testing.assert_allclose(w, sim["weights"][r], atol=1e-6)
    if name == "fedaware":
        assert strategy.rounds[0][1] == list(range(N_CLIENTS))  # startup round
        assert strategy.server.explored
    assert [m[0] for m in history.metrics_distributed_fit["clients"]] == list(range(1, ROUNDS + 1))
    assert not _flower_threads()  # server and client threads torn down


def test_evaluate_fn_and_client_evaluate(digits):
    seen = []

    def evaluate_fn(rnd, params):
        seen.append(rnd)
        return float(params.norm()), {"round": rnd}

    federation = _federation(digits)
    strategy = gf.GradivStrategy(lambda: fed.FedAvg(federation.initial_params(), N_CLIENTS), per_round=PER_ROUND,
                                 seed=SEED, evaluate_fn=evaluate_fn)
    params, history = gf.run_local_federation(federation, strategy, 2, timeout=60)
    assert seen == [0, 1, 2]
    assert history.losses_centralized[-1][1] == pytest.approx(float(params.norm()))
    client = gf.GradivClient(federation, 1)
    loss, n, metrics = client.evaluate([params.numpy()], {})
    sel = torch.from_numpy(federation.shards[1])
    ref = federation.evaluate(params, (federation.x[sel], federation.y[sel]))
    assert n == len(sel) and loss == pytest.approx(ref["loss"]) and metrics["accuracy"] == pytest.approx(ref["accuracy"])


def test_client_fit_is_the_simulators_local_work(digits):
    federation = _federation(digits)
    x = federation.initial_params()
    client = gf.GradivClient(federation, 2, backend="loop")
    (xi,), n, metrics = client.fit([x.numpy()], {"round": 3})
    up, info = federation.local_updates(x, [2], 3, backend="loop")
    np.testing.assert_array_equal(xi, (x - up[0]).numpy())
    assert n == federation.shard_sizes[2] and metrics["gradiv_client_id"] == 2
    assert metrics["steps"] == info["steps"][0]
    assert client.get_properties({}) == {"gradiv_client_id": 2, "n_samples": federation.shard_sizes[2]}


def test_validation_messages(digits):
    federation = _federation(digits)
    server = fed.FedAvg(federation.initial_params(), N_CLIENTS)
    with pytest.raises(ValueError, match=r"per_round .* in \[1, 4\], got 5"):
        gf.GradivStrategy(server, per_round=5)
    with pytest.raises(TypeError, match="server must be a gradiv_lib.federated.Server"):
        gf.GradivStrategy("fedavg", per_round=2)
    with pytest.raises(ValueError, match=r"client_id must be an integer in \[0, 3\], got 4"):
        gf.GradivClient(federation, 4)
    with pytest.raises(ValueError, match="received 3 parameters"):
        gf.GradivClient(federation, 0).fit([np.zeros(3)], {"round": 0})
    with pytest.raises(ValueError, match="name must be one of"):
        gf.make_strategy("sgd", federation, per_round=2)
    other = fed.FedAvg(torch.zeros(federation.spec.size, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="for 3 clients, the federation has 4"):
        gf.run_local_federation(federation, gf.GradivStrategy(other, per_round=2), 1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        gf.run_local_federation(federation, gf.GradivStrategy(server, per_round=2), 0)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gf.Nope  # noqa: B018


def test_missing_flwr_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(ImportError, match=r'pip install "gradiv_lib\[flower\]"'):
        gf.require_flwr()
