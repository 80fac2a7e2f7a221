"""The stacked-replica simulator against a Python loop over K model copies, backends, sampling, diagnostics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradiv_lib.data import InMemoryData, partition_dirichlet, partition_iid
from gradiv_lib.diversity import diversity_from_grads
from gradiv_lib.models import cnn, mlp
from gradiv_lib.sharpness import flat_gradient
from gradiv_lib.workers import (
    DSGD,
    SGD,
    LocalSGD,
    MinibatchSGD,
    ShardSampler,
    Simulator,
    complete,
    diversity_variants,
    exponential,
    one_peer_exponential,
    ring,
)
from gradiv_lib.workers._engines import eligible_engines

torch.set_num_threads(1)


def _data(n: int = 96, d: int = 6, classes: int = 3, seed: int = 0, dtype=torch.float64) -> InMemoryData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return InMemoryData(x, y % classes)


def _model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    return mlp(6, 8, 2, 3, seed=seed).to(dtype)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(flat.clone(), model.parameters())


def _reference(model, data, algorithm, opt: SGD, partition, batch_size, steps, seed=0):
    """The reference-code way: K model copies, K torch.optim.SGD, Python loops."""
    K = len(partition)
    models = [copy.deepcopy(model) for _ in range(K)]
    optims = [torch.optim.SGD(m.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                              nesterov=opt.nesterov) for m in models]
    sampler = ShardSampler(partition, batch_size, seed=seed)
    sizes = torch.tensor([len(p) for p in partition], dtype=torch.float64)
    q = sizes / sizes.sum()
    for t in range(steps):
        idx = sampler.indices(t, t + 1)[0]
        for j, m in enumerate(models):
            optims[j].zero_grad()
            loss = F.cross_entropy(m(data.x[idx[j]]), data.y[idx[j]])
            if isinstance(algorithm, LocalSGD) and algorithm.scheme == "scaled_gradients":
                loss = loss * K * q[j]
            loss.backward()
        if isinstance(algorithm, MinibatchSGD):
            mean = [torch.stack([list(m.parameters())[i].grad for m in models]).mean(0) for i in range(len(list(model.parameters())))]
            for m in models:
                for p, g in zip(m.parameters(), mean):
                    p.grad = g.clone()
        if isinstance(algorithm, DSGD):
            W = algorithm.topology.matrix(t)
            snap = [_flat(m) for m in models]
            for j, m in enumerate(models):
                _set_flat(m, sum(W[j, k] * snap[k] for k in range(K)))
        for j in range(K):
            if isinstance(algorithm, LocalSGD) and not isinstance(algorithm.local_steps, int):
                if t % algorithm.round_length >= algorithm.local_steps[j]:
                    continue
            optims[j].step()
        if isinstance(algorithm, LocalSGD) and (t + 1) % algorithm.round_length == 0:
            flats = torch.stack([_flat(m) for m in models])
            if algorithm.topology is not None:
                avg = algorithm.topology.matrix((t + 1) // algorithm.round_length - 1) @ flats
            elif algorithm.scheme == "scaled_gradients":
                avg = flats.mean(0).expand_as(flats)
            else:
                avg = (q @ flats).expand_as(flats)
            for j, m in enumerate(models):
                _set_flat(m, avg[j])
    return torch.stack([_flat(m) for m in models])


CASES = [
    ("csgd", MinibatchSGD(), SGD(0.3, momentum=0.9, weight_decay=1e-3)),
    ("local", LocalSGD(3), SGD(0.3, momentum=0.5, weight_decay=1e-3, nesterov=True)),
    ("local_hetero_steps", LocalSGD((1, 3, 2, 3)), SGD(0.3, momentum=0.9)),
    ("local_scaled", LocalSGD(2, scheme="scaled_gradients"), SGD(0.2)),
    ("local_gossip", LocalSGD(2, topology=ring(4)), SGD(0.3)),
    ("dsgd_ring", DSGD(ring(4)), SGD(0.3, momentum=0.9)),
    ("dsgd_exponential", DSGD(exponential(4)), SGD(0.3)),
    ("dsgd_one_peer", DSGD(one_peer_exponential(4)), SGD(0.3, momentum=0.5)),
]


@pytest.mark.parametrize("name,algorithm,opt", CASES, ids=[c[0] for c in CASES])
def test_simulator_equals_a_loop_over_model_copies(name, algorithm, opt) -> None:
    data = _data()
    partition = partition_dirichlet(data.y, 4, alpha=1.0, seed=1, min_size=8) if "local" in name else partition_iid(len(data), 4)
    model = _model()
    sim = Simulator(model, data, algorithm, opt, partition=partition, batch_size=8, backend="vmap")
    sim.run(9, record_every=0)
    ref = _reference(model, data, algorithm, opt, partition, 8, 9)
    torch.testing.assert_close(sim.params, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["bmm", "vmap", "vmap_grad", "loop"])
def test_backends_agree_on_an_mlp(backend: str) -> None:
    data = _data()
    ref = Simulator(_model(), data, DSGD(ring(4)), SGD(0.3, momentum=0.9), batch_size=8, backend="loop")
    ref.run(6, record_every=0)
    sim = Simulator(_model(), data, DSGD(ring(4)), SGD(0.3, momentum=0.9), batch_size=8, backend=backend)
    sim.run(6, record_every=0)
    assert sim.backend == backend
    torch.testing.assert_close(sim.params, ref.params, rtol=1e-10, atol=1e-12)


def test_worker_chunks_give_the_same_result() -> None:
    data = _data(n=160)
    runs = []
    for backend, chunk in (("vmap", None), ("vmap", 3), ("bmm", 4), ("vmap_grad", 7), ("loop", 2)):
        sim = Simulator(_model(), data, DSGD(ring(10)), SGD(0.3, momentum=0.9), batch_size=8, backend=backend, worker_chunk=chunk)
        sim.run(3, record_every=0)
        assert sim.worker_chunk == chunk
        runs.append(sim.params)
    for params in runs[1:]:
        torch.testing.assert_close(params, runs[0], rtol=1e-10, atol=1e-12)
    auto = Simulator(_model(), data, DSGD(ring(10)), SGD(0.3, momentum=0.9), batch_size=8)
    auto.run(3, record_every=0)
    torch.testing.assert_close(auto.params, runs[0], rtol=1e-10, atol=1e-12)
    assert any("/" in key for key in auto.engine_timings) and auto.backend in ("bmm", "vmap", "vmap_grad", "loop")
    with pytest.raises(ValueError, match="worker_chunk must be an integer >= 1"):
        Simulator(_model(), data, DSGD(ring(10)), SGD(0.3), batch_size=8, backend="vmap", worker_chunk=0)
    with pytest.raises(ValueError, match="backend='auto' chooses the chunk itself"):
        Simulator(_model(), data, DSGD(ring(10)), SGD(0.3), batch_size=8, worker_chunk=4)


def test_cnn_backends_agree_and_bmm_is_refused() -> None:
    g = torch.Generator().manual_seed(0)
    data = InMemoryData(torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))
    model = cnn(1, 4, 2, 3, image_size=8, seed=0).double()
    runs = {}
    for backend in ("vmap", "vmap_grad", "loop", "auto"):
        sim = Simulator(model, data, LocalSGD(2), SGD(0.1), n_workers=2, batch_size=4, backend=backend)
        sim.run(3, record_every=0)
        runs[backend] = sim.params
    for backend in ("vmap_grad", "loop", "auto"):
        torch.testing.assert_close(runs[backend], runs["vmap"], rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="backend 'bmm' cannot run Sequential"):
        Simulator(model, data, LocalSGD(2), SGD(0.1), n_workers=2, batch_size=4, backend="bmm")


class LastLSTMState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(1, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(-1))
        return self.head(out[:, -1])


def test_an_explicit_backend_that_cannot_batch_the_model_names_the_others() -> None:
    """vmap has no batching rule for the fused LSTM kernel: PyTorch's bare RuntimeError became a ValueError naming
    the backends that run it; 'auto' skips vmap and agrees with the loop."""
    data, model = _data(), LastLSTMState().double()
    sim = Simulator(model, data, MinibatchSGD(), SGD(0.1), n_workers=2, batch_size=4, backend="vmap")
    with pytest.raises(ValueError, match=r"backend 'vmap' failed on LastLSTMState at its first step: .*\['vmap_grad', 'loop'\].*'auto'"):
        sim.step()
    runs = {}
    for backend in ("auto", "loop"):
        sim = Simulator(model, data, MinibatchSGD(), SGD(0.1), n_workers=2, batch_size=4, backend=backend)
        sim.run(3, record_every=0)
        runs[backend] = sim.params
    torch.testing.assert_close(runs["auto"], runs["loop"], rtol=1e-9, atol=1e-11)


def test_batchnorm_in_training_mode_is_refused_with_the_fix() -> None:
    data = _data()
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match=r"BatchNorm.*\(1\).*GroupNorm.*eval\(\).*track_running_stats=False"):
        Simulator(model, data, MinibatchSGD(), SGD(0.1), n_workers=2)
    Simulator(model.eval(), data, MinibatchSGD(), SGD(0.1), n_workers=2, batch_size=8).run(2)
    free = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3)).double()
    a = Simulator(free, data, MinibatchSGD(), SGD(0.1), n_workers=2, batch_size=8, backend="vmap")
    b = Simulator(free, data, MinibatchSGD(), SGD(0.1), n_workers=2, batch_size=8, backend="loop")
    a.run(3), b.run(3)
    torch.testing.assert_close(a.params, b.params)


def test_dense_and_sparse_gossip_agree() -> None:
    data = _data(n=256)
    runs = []
    for mixing in ("dense", "sparse"):
        sim = Simulator(_model(), data, DSGD(ring(32)), SGD(0.3), batch_size=4, mixing=mixing, backend="bmm")
        sim.run(4, record_every=0)
        runs.append(sim.params)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-12)


def test_gossip_keeps_the_average_and_csgd_keeps_consensus() -> None:
    data = _data()
    sim = Simulator(_model(), data, DSGD(exponential(4)), SGD(0.3), batch_size=8)
    sim.run(3)
    before = sim.params.mean(0).clone()
    sim.step()
    torch.testing.assert_close(sim.params.mean(0), before - 0.3 * sim.last_grads.mean(0))
    assert sim.consensus_distance() > 0
    c = Simulator(_model(), data, MinibatchSGD(), SGD(0.3, momentum=0.9), n_workers=4, batch_size=8)
    history = c.run(5)
    assert c.consensus_distance() == 0.0 and (history["consensus"] == 0).all()
    local = Simulator(_model(), data, LocalSGD(3), SGD(0.3), n_workers=4, batch_size=8)
    history = local.run(6)
    assert history["consensus"][2] < 1e-25 and history["consensus"][5] < 1e-25 and history["consensus"][3] > 0


def test_local_sgd_with_one_step_is_minibatch_sgd() -> None:
    data = _data()
    a = Simulator(_model(), data, LocalSGD(1), SGD(0.3), n_workers=4, batch_size=8)
    b = Simulator(_model(), data, MinibatchSGD(), SGD(0.3), n_workers=4, batch_size=8)
    a.run(5), b.run(5)
    torch.testing.assert_close(a.params, b.params)


def test_sampler_epochs_chunks_and_replacement() -> None:
    partition = [torch.arange(0, 10), torch.arange(10, 17)]
    s = ShardSampler(partition, 3, seed=4)
    idx = s.indices(0, 6)
    assert idx.shape == (6, 2, 3)
    first_epoch = idx[:3, 0].flatten()
    assert len(set(first_epoch.tolist())) == 9 and set(first_epoch.tolist()) <= set(range(10))
    assert set(idx[:2, 1].flatten().tolist()) <= set(range(10, 17)) and len(set(idx[:2, 1].flatten().tolist())) == 6
    torch.testing.assert_close(torch.cat([s.indices(0, 4), s.indices(4, 6)]), idx)
    torch.testing.assert_close(s.indices(2, 5, workers=[1])[:, 0], s.worker_indices(1, 2, 5))
    torch.testing.assert_close(ShardSampler(partition, 3, seed=4).indices(0, 6), idx)
    r = ShardSampler(partition, 3, seed=4, sampling="replacement").indices(1020, 1030)
    assert r.shape == (10, 2, 3) and set(r[:, 1].flatten().tolist()) <= set(range(10, 17))
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than worker 1's shard \(7 samples\)"):
        ShardSampler(partition, 8)
    with pytest.raises(ValueError, match="partition\\[1\\] is empty"):
        ShardSampler([torch.arange(3), torch.arange(0)], 1)
    with pytest.raises(ValueError, match="sampling must be one of"):
        ShardSampler(partition, 2, sampling="bootstrap")


def test_resume_from_a_checkpoint(tmp_path) -> None:
    data = _data()
    straight = Simulator(_model(), data, DSGD(ring(4)), SGD(0.3, momentum=0.9), batch_size=8)
    straight.run(12, record_every=0)
    first = Simulator(_model(), data, DSGD(ring(4)), SGD(0.3, momentum=0.9), batch_size=8)
    first.run(5, record_every=0)
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    second = Simulator(_model(), data, DSGD(ring(4)), SGD(0.3, momentum=0.9), batch_size=8)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    second.run(7, record_every=0)
    torch.testing.assert_close(second.params, straight.params)
    other = Simulator(_model(), data, DSGD(ring(4)), SGD(0.3), batch_size=8)
    with pytest.raises(ValueError, match="momentum"):
        other.load_state_dict(first.state_dict())


def test_diversity_variants() -> None:
    same = torch.ones(4, 5)
    v = diversity_variants(same)
    assert v["yin"] == pytest.approx(0.25) and v["weighted"] == pytest.approx(1.0) and v["rms_ratio"] == pytest.approx(1.0)
    ortho = torch.eye(4)
    v = diversity_variants(ortho)
    assert v["yin"] == pytest.approx(1.0) and v["weighted"] == pytest.approx(4.0) and v["rms_ratio"] == pytest.approx(2.0)
    g = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    v = diversity_variants(g)
    assert v["weighted"] == pytest.approx(6 * v["yin"]) and v["rms_ratio"] ** 2 == pytest.approx(v["weighted"])
    q = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    expected = (q * g.square().sum(1)).sum() / (q[:, None] * g).sum(0).square().sum()
    assert diversity_variants(g, q)["weighted"] == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="weights must be 6 non-negative numbers summing to 1"):
        diversity_variants(g, [0.5, 0.5])
    with pytest.raises(ValueError, match="inf or nan"):
        diversity_variants(torch.tensor([[float("inf")]]))


def test_full_gradients_per_sample_diversity_and_evaluate() -> None:
    data = _data()
    partition = partition_dirichlet(data.y, 3, alpha=1.0, seed=2, min_size=8)
    sim = Simulator(_model(), data, LocalSGD(2), SGD(0.3), partition=partition, batch_size=8)
    sim.run(3, record_every=0)
    grads = sim.full_gradients()
    for j in range(3):
        shard = partition[j]
        ref = flat_gradient(sim.model(j), F.cross_entropy, data.x[shard], data.y[shard])
        torch.testing.assert_close(grads[j], ref)
    at_avg = sim.full_gradients("average")
    ref = flat_gradient(sim.model(), F.cross_entropy, data.x[partition[1]], data.y[partition[1]])
    torch.testing.assert_close(at_avg[1], ref)
    variants = sim.worker_diversity()
    assert variants["weighted"] >= 1.0 - 1e-9
    results = sim.per_sample_diversity()
    x, y = sim._batch(sim.step_count)
    model0 = sim.model(0)
    per_sample = []
    for i in range(8):
        model0.zero_grad()
        F.cross_entropy(model0(x[0, i:i + 1]), y[0, i:i + 1]).backward()
        per_sample.append(torch.cat([p.grad.reshape(-1) for p in model0.parameters()]))
    assert results[0].diversity == pytest.approx(diversity_from_grads(torch.stack(per_sample)).diversity, rel=1e-9)
    ev = sim.evaluate(data)
    with torch.no_grad():
        out = sim.model()(data.x)
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(out, data.y)))
    assert ev["accuracy"] == pytest.approx(float((out.argmax(1) == data.y).double().mean()))


def test_history_and_callback() -> None:
    sim = Simulator(_model(), _data(), DSGD(ring(4)), SGD(0.3), batch_size=8)
    h = sim.run(10, record_every=5, callback=lambda s: {"acc": s.evaluate()["accuracy"]})
    assert list(h["step"]) == [5, 10] and set(h) == {"step", "loss", "consensus", "acc"}
    empty = sim.run(3, record_every=0)
    assert all(len(v) == 0 for v in empty.values()) and sim.step_count == 13
    with pytest.raises(TypeError, match="callback must return a dict"):
        sim.run(5, record_every=5, callback=lambda s: 1.0)


def test_validation_messages() -> None:
    data = _data()
    with pytest.raises(ValueError, match="topology 'ring' has 4 workers but there are 8"):
        Simulator(_model(), data, DSGD(ring(4)), SGD(0.1), n_workers=8, batch_size=4)
    with pytest.raises(ValueError, match="partition has 2 shards but n_workers = 3"):
        Simulator(_model(), data, MinibatchSGD(), SGD(0.1), n_workers=3, partition=partition_iid(96, 2))
    with pytest.raises(ValueError, match="give n_workers"):
        Simulator(_model(), data, MinibatchSGD(), SGD(0.1))
    with pytest.raises(ValueError, match="local_steps gives 3 values but there are 4 workers"):
        Simulator(_model(), data, LocalSGD((1, 2, 3)), SGD(0.1), n_workers=4, batch_size=4)
    with pytest.raises(ValueError, match="batch_size=40 is larger than worker"):
        Simulator(_model(), data, MinibatchSGD(), SGD(0.1), n_workers=4, batch_size=40)
    with pytest.raises(ValueError, match="backend must be one of"):
        Simulator(_model(), data, MinibatchSGD(), SGD(0.1), n_workers=2, backend="jit")
    with pytest.raises(ValueError, match="indices outside"):
        Simulator(_model(), data, MinibatchSGD(), SGD(0.1), partition=[torch.arange(10), torch.arange(90, 100)])
    with pytest.raises(TypeError, match="algorithm must be"):
        Simulator(_model(), data, "dsgd", SGD(0.1), n_workers=2)
    with pytest.raises(TypeError, match="topology must be a Topology"):
        DSGD("ring")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        SGD(0.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        SGD(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="local_steps must be >= 1"):
        LocalSGD(0)
    with pytest.raises(ValueError, match="weights must be non-negative and sum to 1"):
        LocalSGD(2, weights=(0.5, 0.6))
    with pytest.raises(ValueError, match="scheme must be"):
        LocalSGD(2, scheme="fednova")
    with pytest.raises(ValueError, match="leave weights and scheme at their defaults"):
        LocalSGD(2, scheme="scaled_gradients", topology=ring(4))
    bad = InMemoryData(data.x.clone(), data.y)
    bad.x[5, 0] = float("nan")
    sim = Simulator(_model(), bad, MinibatchSGD(), SGD(0.1), n_workers=1, batch_size=96)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        sim.step()
    with pytest.raises(ValueError, match=r"worker must be an integer in \[0, 0\]"):
        sim.model(3)


def test_workers_can_start_from_different_models() -> None:
    data = _data()
    models = [_model(seed=s) for s in range(3)]
    sim = Simulator(models, data, DSGD(ring(3)), SGD(0.3), batch_size=8, backend="vmap")
    for j, m in enumerate(models):
        torch.testing.assert_close(sim.params[j], _flat(m))
    assert sim.consensus_distance() > 0
    before = sim.params.mean(0).clone()
    sim.step()
    torch.testing.assert_close(sim.params.mean(0), before - 0.3 * sim.last_grads.mean(0))
    idx = sim.sampler.indices(0, 1)[0]
    for j, m in enumerate(models):                     # each worker's gradient is taken at its own model
        m.zero_grad()
        F.cross_entropy(m(data.x[idx[j]]), data.y[idx[j]]).backward()
        torch.testing.assert_close(sim.last_grads[j], torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    with pytest.raises(ValueError, match="model holds 3 modules but n_workers = 4"):
        Simulator(models, data, MinibatchSGD(), SGD(0.1), n_workers=4)
    with pytest.raises(ValueError, match=r"model\[1\] does not have the architecture of model\[0\]"):
        Simulator([_model(), mlp(6, 9, 2, 3).double()], data, MinibatchSGD(), SGD(0.1))
    with pytest.raises(ValueError, match="empty sequence"):
        Simulator([], data, MinibatchSGD(), SGD(0.1), n_workers=2)


def test_float32_default_and_a_float_learning_rate() -> None:
    data = _data(dtype=torch.float32)
    sim = Simulator(mlp(6, 8, 2, 3, seed=0), data, DSGD(complete(2)), 0.1, batch_size=8)
    sim.run(3)
    assert sim.params.dtype == torch.float32 and sim.optimizer == SGD(0.1)
    assert "Simulator(" in repr(sim)


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.L1Loss()])
def test_regression_targets_that_would_broadcast_are_refused(loss_fn):
    """(K·B, 1) outputs against (K·B,) targets broadcast to a square: the auto and loop engines trained on it."""
    x, y = torch.randn(32, 4), torch.randn(32)
    with pytest.raises(ValueError, match=r"got outputs of shape \(2, 1\) and targets of shape \(2,\)"):
        Simulator(nn.Linear(4, 1), (x, y), MinibatchSGD(), 0.1, n_workers=2, batch_size=8, loss_fn=loss_fn)
    sim = Simulator(nn.Linear(4, 1), (x, y[:, None]), MinibatchSGD(), 0.1, n_workers=2, batch_size=8, loss_fn=loss_fn)
    assert torch.isfinite(torch.as_tensor(sim.run(2)["loss"])).all()



def test_per_sample_diversity_refuses_a_model_that_mixes_the_samples_of_a_batch() -> None:
    """BatchNorm without running statistics: vmap over single samples normalised each sample by itself, and Δ
    came out of gradients that are not the model's."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(), nn.Linear(8, 3)).double()
    sim = Simulator(model.eval(), _data(), MinibatchSGD(), SGD(0.1), n_workers=2, batch_size=8)
    with pytest.raises(ValueError, match=r"depends on the other samples of its batch .* worker_diversity\(\)"):
        sim.per_sample_diversity()
    sim.worker_diversity()  # whole-batch gradients: defined


def _mlp_that_does_more_than_its_layers(kind: str) -> nn.Module:
    import types

    model = _model()
    linear = next(m for m in model if isinstance(m, nn.Linear))
    if kind == "output_hook":
        linear.register_forward_hook(lambda module, args, out: 3 * out)
    else:  # an instance forward (bound, so that it follows a copy of the model)
        linear.forward = types.MethodType(lambda self, x: F.linear(x, 2 * self.weight, self.bias), linear)
    return model


@pytest.mark.parametrize("kind", ["output_hook", "instance_forward"])
def test_the_bmm_engine_refuses_layers_that_do_more_than_their_class(kind: str) -> None:
    """bmm reads the weights and applies the layers itself: a user's output hook or a replaced forward was skipped,
    in one check 0.31 off the loop's parameters after five steps (0.09 off in the federation's stacked clients), silently."""
    data = _data()
    with pytest.raises(ValueError, match="backend 'bmm' cannot run Sequential"):
        Simulator(_mlp_that_does_more_than_its_layers(kind), data, DSGD(ring(4)), SGD(0.3), batch_size=8, backend="bmm")
    runs = {}
    for backend in ("auto", "loop"):
        sim = Simulator(_mlp_that_does_more_than_its_layers(kind), data, DSGD(ring(4)), SGD(0.3), batch_size=8, backend=backend)
        sim.run(5, record_every=0)
        runs[backend] = sim.params
    torch.testing.assert_close(runs["auto"], runs["loop"], rtol=1e-9, atol=1e-11)


def test_epoch_sampling_is_its_definition_and_the_permutation_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker j's batches in epoch e are ``default_rng([seed, j, e]).permutation(len(shard))`` cut into batches, whether
    the permutation is drawn or memoised; the memo evicts its oldest arrays beyond its limit and hands out read-only
    ones (a caller that wrote into one would change every later run's batches)."""
    import numpy as np

    from gradiv_lib.workers import algorithms

    memo = algorithms._PermutationMemo(limit=64 * 10)  # shards of up to 10 samples, 64 x 10 indices in all
    monkeypatch.setattr(algorithms, "_epoch_permutation", memo)
    partition = [torch.arange(0, 10), torch.arange(10, 17)]
    sampler = ShardSampler(partition, 3, seed=4)
    for _ in range(2):  # drawn, then (the same steps) read from the memo
        idx = sampler.indices(0, 300)
        for worker, shard in enumerate(partition):
            nb = len(shard) // 3
            for step in (0, 1, 7, 150, 299):
                perm = np.random.default_rng([4, worker, step // nb]).permutation(len(shard))
                expected = shard[torch.from_numpy(perm[(step % nb) * 3:(step % nb + 1) * 3])]
                assert torch.equal(idx[step, worker], expected), (worker, step)
    assert 0 < memo.size <= memo.limit and memo.size == sum(len(a) for a in memo._arrays.values())
    assert all(not a.flags.writeable for a in memo._arrays.values())
    assert len(memo(0, 0, 0, 11)) == 11 and (0, 0, 0, 11) not in memo._arrays  # larger shards are not kept


def test_a_linear_model_runs_on_the_bmm_engine() -> None:
    """A bare ``nn.Linear`` (a linear model) is an MLP of one layer: the bmm engine runs it, with or without a bias,
    and agrees with vmap and the loop."""
    g = torch.Generator().manual_seed(0)
    data = InMemoryData(torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64))
    for bias in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(5, 2, bias=bias).double()
        assert eligible_engines(model)[0] == "bmm"
        runs = {}
        for backend in ("bmm", "vmap", "loop"):
            sim = Simulator(copy.deepcopy(model), data, LocalSGD(2), SGD(0.1), n_workers=4, batch_size=5,
                            loss_fn=F.mse_loss, backend=backend)
            sim.run(6, record_every=0)
            runs[backend] = sim.params
        for backend in ("vmap", "loop"):
            torch.testing.assert_close(runs["bmm"], runs[backend], rtol=1e-12, atol=1e-14)
