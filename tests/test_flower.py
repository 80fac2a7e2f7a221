"""gradiv_lib.federated.flower on Flower's app API: a real deployment (a SuperLink, one SuperNode per client and
``flwr run``, separate processes on 127.0.0.1) and the in-process grid against the simulator (`run_federated`),
the clients' own shards, failures and input validation. Skipped without the `flower` extra."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from gradiv_lib import federated as fed  # noqa: E402
from gradiv_lib import flower as gf  # noqa: E402
from gradiv_lib.data import InMemoryData, load_digits, partition_dirichlet  # noqa: E402
from gradiv_lib.federated import flower as impl  # noqa: E402
from gradiv_lib.models import mlp  # noqa: E402

torch.set_num_threads(1)

N_CLIENTS, PER_ROUND, ROUNDS, SEED = 4, 2, 5, 1


@pytest.fixture(scope="module")
def digits() -> InMemoryData:
    train, _ = load_digits(seed=0, dtype=torch.float64)
    return InMemoryData(train.x[:400], train.y[:400])


def _federation(digits: InMemoryData, n_clients: int = N_CLIENTS) -> fed.Federation:
    part = partition_dirichlet(digits.y, n_clients, alpha=0.5, seed=0)
    return fed.Federation(mlp(64, 16, 2, 10, seed=0).double(), digits, part,
                          fed.LocalWork(lr=0.1, batch_size=(8, 32), steps=(2, 6)), seed=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_deployment_of_separate_processes_equals_simulator(digits, tmp_path):
    """FedAWARE on a SuperLink, three SuperNodes and flwr run (all separate processes on the loopback): the final
    parameters equal the simulator's to round-off; every client trained in a process of its own, from its own shard."""
    n, m, rounds = 3, 2, 2  # round 0 trains all three (FedAWARE's startup), round 1 two of them
    sim = fed.run_federated(_federation(digits, n), "fedaware", rounds, per_round=m, seed=SEED,
                            server_kwargs={"alpha": 0.5})
    strategy = gf.make_strategy("fedaware", _federation(digits, n), per_round=m, seed=SEED, alpha=0.5)
    start = time.perf_counter()
    params, info = gf.run_local_federation(_federation(digits, n), strategy, rounds, timeout=240, workdir=tmp_path)
    seconds = time.perf_counter() - start
    x0 = _federation(digits, n).initial_params().numpy()
    assert np.abs(sim["params"] - x0).max() > 1e-2  # the runs moved
    np.testing.assert_allclose(params.numpy(), sim["params"], rtol=0, atol=1e-12)
    assert [r[1] for r in strategy.rounds] == [np.flatnonzero(p).tolist() for p in sim["participants"]]
    for (_, _, w), ref in zip(strategy.rounds, sim["weights"]):
        np.testing.assert_allclose(w, ref, atol=1e-6)
    assert strategy.server.explored and strategy.rounds[0][1] == [0, 1, 2]  # FedAWARE's startup round
    # separate processes: the ServerApp, and one ClientApp process per client and round, none of them this one
    pids = [pid for _, by_client in info["clients"] for pid, _ in by_client.values()]
    assert len(set(pids)) == len(pids) == n + (rounds - 1) * m
    assert os.getpid() not in pids + [info["server_pid"]] and info["server_pid"] not in pids
    assert sorted(strategy.node_of) == [0, 1, 2] and len(set(strategy.node_of.values())) == 3
    # each SuperNode was told its partition; each shard file holds only that client's samples
    assert [c for c in info["commands"] if "flower-supernode" in c and f"partition-id=2 num-partitions={n}" in c]
    federation = _federation(digits, n)
    for i in range(n):
        blob = torch.load(tmp_path / f"client-{i}.pt", weights_only=False)
        assert torch.equal(blob["x"], federation.x[torch.from_numpy(federation.shards[i])])
    assert not [pid for pid in info["pids"] if _alive(pid)]  # every process stopped
    print(f"\nloopback deployment: {n} clients, {rounds} rounds in {seconds:.1f} s; max |flower - simulator| = "
          f"{np.abs(params.numpy() - sim['params']).max():.1e}")


@pytest.mark.parametrize("name, kwargs", [("fedavg", {}), ("fedaware", {"alpha": 0.5}), ("fedprox", {"mu": 0.1}),
                                          ("fedyogi", {})])
def test_in_process_grid_equals_simulator(digits, name, kwargs):
    sim = fed.run_federated(_federation(digits), name, ROUNDS, per_round=PER_ROUND, seed=SEED, server_kwargs=kwargs)
    strategy = gf.make_strategy(name, _federation(digits), per_round=PER_ROUND, seed=SEED, **kwargs)
    params, info = gf.run_in_process(_federation(digits), strategy, ROUNDS)
    x0 = _federation(digits).initial_params().numpy()
    assert np.abs(sim["params"] - x0).max() > 1e-2
    np.testing.assert_allclose(params.numpy(), sim["params"], rtol=0, atol=1e-12)
    assert len(strategy.rounds) == ROUNDS
    for r, (t, ids, w) in enumerate(strategy.rounds):
        assert t == r and ids == np.flatnonzero(sim["participants"][r]).tolist()
        np.testing.assert_allclose(w, sim["weights"][r], atol=1e-6)
    # LocalGrid's node ids are not the partition ids: the strategy learned the map (by query unless round 0 is all)
    assert strategy.node_of == {i: 1000 + i for i in range(N_CLIENTS)}
    if name == "fedaware":
        assert strategy.rounds[0][1] == list(range(N_CLIENTS)) and strategy.server.explored


def test_a_wrong_variant_differs(digits):
    """The comparison can fail: FedAvg over Flower is not FedAWARE in the simulator, nor another sampling seed."""
    sim = fed.run_federated(_federation(digits), "fedaware", ROUNDS, per_round=PER_ROUND, seed=SEED,
                            server_kwargs={"alpha": 0.5})
    for strategy in (gf.make_strategy("fedavg", _federation(digits), per_round=PER_ROUND, seed=SEED),
                     gf.make_strategy("fedaware", _federation(digits), per_round=PER_ROUND, seed=SEED + 1, alpha=0.5)):
        params, _ = gf.run_in_process(_federation(digits), strategy, ROUNDS)
        assert np.abs(params.numpy() - sim["params"]).max() > 1e-3


def _failing_app(bad: int):
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.query()(impl.client_query)

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == bad:
            raise RuntimeError("disk on fire")
        return impl.client_train(msg, context)

    return app


@pytest.mark.parametrize("accept", [False, True])
def test_a_failing_client_stops_the_run_or_is_left_out(digits, tmp_path, accept):
    federation = _federation(digits)
    server = fed.FedAvg(federation.initial_params(), N_CLIENTS)
    strategy = gf.GradivStrategy(server, per_round=N_CLIENTS, seed=SEED, accept_failures=accept)
    impl.write_deployment(tmp_path, federation, server, rounds=1, per_round=N_CLIENTS)
    grid = gf.LocalGrid(_failing_app(bad=2), N_CLIENTS, {"gradiv-dir": str(tmp_path)})
    with grid.identity():
        if not accept:
            with pytest.raises(RuntimeError, match=r"round 0: sampled clients \[2\] did not answer .*disk on fire"):
                strategy.run(grid, 1)
            return
        params, _ = strategy.run(grid, 1)
    assert strategy.rounds[0][1] == [0, 1, 3]
    up, _ = federation.local_updates(federation.initial_params(), [0, 1, 3], 0)
    n = torch.tensor([federation.shard_sizes[i] for i in (0, 1, 3)], dtype=torch.float64)
    np.testing.assert_allclose(params.numpy(), (federation.initial_params() - (n / n.sum()) @ up).numpy(), atol=1e-12)


def test_client_loads_only_its_shard(digits, tmp_path):
    federation = _federation(digits)
    server = fed.FedAvg(federation.initial_params(), N_CLIENTS)
    impl.write_deployment(tmp_path, federation, server, rounds=2, per_round=2)
    assert sorted(p.name for p in tmp_path.glob("client-*.pt")) == [f"client-{i}.pt" for i in range(N_CLIENTS)]
    assert (tmp_path / "app" / "pyproject.toml").read_text().count("gradiv_lib.federated.flower_app:") == 2
    client = gf.load_client(tmp_path, 3)
    assert client.n_clients == 1 and client.client_ids == [3] and client.num_partitions == N_CLIENTS
    sel = torch.from_numpy(federation.shards[3])
    assert torch.equal(client.x, federation.x[sel]) and torch.equal(client.y, federation.y[sel])
    x = federation.initial_params()
    np.testing.assert_allclose(client.local_updates(x, [0], 4)[0].numpy(), federation.local_updates(x, [3], 4)[0].numpy(),
                               rtol=0, atol=1e-14)


def test_deployment_commands():
    cmds = gf.deployment_commands("/data/fed", 2, port=9200, node_ports=[9301, 9302])
    names = [os.path.basename(c[0]) for c in cmds]
    assert names == ["flower-superlink", "flower-supernode", "flower-supernode", "flwr"]
    assert cmds[0][cmds[0].index("--port") + 1] == "9200"
    assert cmds[2][cmds[2].index("--node-config") + 1] == "partition-id=1 num-partitions=2"
    assert cmds[2][cmds[2].index("--superlink") + 1] == "127.0.0.1:9200"
    assert cmds[3][1:4] == ["run", "/data/fed/app", "gradiv"] and 'gradiv-dir="/data/fed"' in cmds[3]


def test_validation_messages(digits, tmp_path):
    federation = _federation(digits)
    server = fed.FedAvg(federation.initial_params(), N_CLIENTS)
    with pytest.raises(ValueError, match=r"per_round .* in \[1, 4\], got 5"):
        gf.GradivStrategy(server, per_round=5)
    with pytest.raises(TypeError, match="server must be a gradiv_lib.federated.Server"):
        gf.GradivStrategy("fedavg", per_round=2)
    with pytest.raises(ValueError, match="name must be one of"):
        gf.make_strategy("sgd", federation, per_round=2)
    other = fed.FedAvg(torch.zeros(federation.spec.size, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="for 3 clients, the federation has 4"):
        gf.run_local_federation(federation, gf.GradivStrategy(other, per_round=2), 1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        gf.run_in_process(federation, gf.GradivStrategy(server, per_round=2), 0)
    big = _federation(digits, 20)
    with pytest.raises(ValueError, match=r"one SuperNode process per client.* 20 clients, at most 16"):
        gf.run_local_federation(big, gf.make_strategy("fedavg", big, per_round=2), 1)
    bad_loss = fed.Federation(mlp(64, 16, 2, 10, seed=0).double(), digits, federation.shards, federation.local,
                              loss_fn=lambda out, y, reduction="none": (out.sum(1) - y) ** 2)
    with pytest.raises(ValueError, match="loss_fn .* cannot be pickled for the client processes"):
        impl.write_deployment(tmp_path, bad_loss, server, rounds=1, per_round=2)
    with pytest.raises(FileNotFoundError, match="no shard for partition 7"):
        gf.load_client(tmp_path, 7)
    from flwr.app import Context, RecordDict
    with pytest.raises(KeyError, match="partition-id=<i> num-partitions=<N>"):
        impl._client_of(Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    with pytest.raises(ValueError, match="run config's 'gradiv-dir' is empty"):
        impl.server_main(None, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gf.Nope  # noqa: B018


def test_missing_flwr_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(ImportError, match=r'pip install "gradiv_lib\[flower\]"'):
        gf.require_flwr()
