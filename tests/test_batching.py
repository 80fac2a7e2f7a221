"""Batch-size schedules: the rules exactly as specified, state, validation messages."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from gradiv_lib import batching, models
from gradiv_lib.batching import AdaBatch, DiveBatch, FixedBatch, NoiseScaleBatch
from gradiv_lib.diversity import TwoBatchNoiseScale, diversity_from_grads, gradient_diversity
from gradiv_lib.norms import DiversityMeter


def run_epoch(schedule, epoch, batches_of_grads):
    """Feed per-sample gradient batches ([n, d] tensors) to a schedule for one epoch."""
    schedule.begin_epoch(epoch)
    for g in batches_of_grads:
        if schedule.needs_diversity or schedule.needs_grad:
            schedule.observe(n=len(g), grad=g.mean(0), sq_norms=g.square().sum(1), grad_reduction="mean")
        else:
            schedule.observe(n=len(g))
    return schedule.end_epoch(epoch)


def grads_with_bound(bound: float, n: int = 100, d: int = 400, seed: int = 0) -> torch.Tensor:
    """n per-sample gradients whose B_S = n * Delta is close to ``bound`` (mean + orthogonal noise)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise -= noise.mean(0)
    mean = torch.zeros(d, dtype=torch.float64)
    mean[0] = 1.0
    # B_S = n * (n|m|^2 + sum|noise|^2) / (n^2 |m|^2) = 1 + sum|noise|^2 / (n |m|^2)
    noise *= math.sqrt((bound - 1) * n / float(noise.square().sum()))
    return mean + noise


# --------------------------------------------------------------------------------------------
# Fixed and AdaBatch
# --------------------------------------------------------------------------------------------


def test_fixed_never_changes():
    s = FixedBatch(8).bind(100)
    for epoch in range(5):
        assert run_epoch(s, epoch, [torch.ones(8, 3)]) is None
        assert not s.needs_diversity and not s.needs_grad
    assert s.batch_size == 8 and s.lr_scale == 1.0


def test_adabatch_doubling_times_and_lr_rules():
    s = AdaBatch(4, 32, resize_every=3, lr_rule="linear").bind(100)
    sizes, scales = [], []
    for epoch in range(12):
        s.begin_epoch(epoch)
        sizes.append(s.batch_size)
        scales.append(s.lr_scale)
        s.end_epoch(epoch)
    assert sizes == [4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32]
    assert scales == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8]
    assert [r.epoch for r in s.resizes] == [2, 5, 8]


def test_adabatch_lands_on_max_and_lr_factor_cap():
    s = AdaBatch(4, 20, resize_every=1, lr_rule="linear").bind(100)
    out = [run_epoch(s, e, []) for e in range(4)]
    assert [r.new_batch_size for r in out[:3]] == [8, 16, 20] and out[3] is None
    assert out[2].lr_factor == pytest.approx(20 / 16)
    fixed = AdaBatch(4, 32, resize_every=1, lr_factor=0.75).bind(100)
    for e in range(3):
        run_epoch(fixed, e, [])
    assert fixed.lr_scale == pytest.approx(0.75**3) and fixed.batch_size == 32
    capped = AdaBatch(4, 64, resize_every=1, lr_rule="linear", lr_cap=3.0).bind(100)
    for e in range(4):
        run_epoch(capped, e, [])
    assert capped.lr_scale == 3.0 and capped.batch_size == 64
    sq = AdaBatch(4, 16, resize_every=1, lr_rule="sqrt").bind(100)
    run_epoch(sq, 0, [])
    assert sq.lr_scale == pytest.approx(math.sqrt(2))


# --------------------------------------------------------------------------------------------
# DiveBatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound, expected", [(30.0, 15), (300.0, 64), (6.0, 4)])
def test_divebatch_rule_clamps_and_never_shrinks(bound, expected):
    g = grads_with_bound(bound)
    assert diversity_from_grads(g).batch_size_bound == pytest.approx(bound)
    s = DiveBatch(4, 64, delta=0.5, resize_every=2).bind(100)
    assert run_epoch(s, 0, [g[:40], g[40:]]) is None and not s.measurements  # epoch 0 measures nothing
    s.begin_epoch(1)
    assert s.needs_diversity
    for part in (g[:32], g[32:64], g[64:96], g[96:]):  # ragged last batch of 4
        s.observe(n=len(part), grad=part.mean(0), sq_norms=part.square().sum(1))
    resize = s.end_epoch(1)
    assert s.batch_size == expected
    assert s.last_measurement.batch_size_bound == pytest.approx(bound, rel=1e-9)
    if expected == 4:
        assert resize is None  # floor(0.5 * 6) = 3 < 4: never shrinks
    else:
        assert resize.old_batch_size == 4 and resize.new_batch_size == expected
        assert resize.estimate == pytest.approx(bound)


def test_divebatch_min_batch_size_and_measurement_stops_at_max():
    s = DiveBatch(4, 64, delta=0.1, resize_every=1, min_batch_size=16).bind(100)
    run_epoch(s, 0, [grads_with_bound(30.0)])  # 0.1 * 30 = 3 -> lifted to B_min = 16
    assert s.batch_size == 16
    run_epoch(s, 1, [grads_with_bound(5000.0)])
    assert s.batch_size == 64
    s.begin_epoch(2)
    assert not s.needs_diversity  # at B_max nothing is measured any more
    s.observe(n=10)  # no grad needed
    assert s.end_epoch(2) is None


def test_divebatch_cancelling_gradients_go_to_max():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    s = DiveBatch(1, 2, delta=0.1, resize_every=1).bind(2)
    assert run_epoch(s, 0, [g]).new_batch_size == 2


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 15 / 4), ("sqrt", math.sqrt(15 / 4))])
def test_divebatch_lr_rules(rule, factor):
    s = DiveBatch(4, 64, delta=0.5, resize_every=1, lr_rule=rule).bind(100)
    resize = run_epoch(s, 0, [grads_with_bound(30.0)])
    assert resize.new_batch_size == 15
    assert s.lr_scale == pytest.approx(factor) and resize.lr_factor == pytest.approx(factor)


def test_divebatch_lr_cap():
    s = DiveBatch(4, 64, delta=0.5, resize_every=1, lr_rule="linear", lr_cap=2.0).bind(100)
    resize = run_epoch(s, 0, [grads_with_bound(30.0)])
    assert s.lr_scale == 2.0 and resize.lr_factor == 2.0
    run_epoch(s, 1, [grads_with_bound(101.0)])  # 15 -> 50 would be x3.3 more: stays at the cap
    assert s.batch_size == 50 and s.lr_scale == 2.0


def test_divebatch_equals_full_data_diversity_for_a_fixed_model():
    """Δ̂ accumulated over an epoch of batches at fixed weights is the full-data Δ; B = floor(δ N Δ)."""
    torch.manual_seed(0)
    x, y = torch.randn(203, 6, dtype=torch.float64), torch.randint(0, 3, (203,))
    model = models.mlp(6, 16, 2, 3, seed=0).double()
    loss_fn = nn.CrossEntropyLoss()
    exact = gradient_diversity(model, loss_fn, x, y)
    s = DiveBatch(8, 200, delta=0.25, resize_every=1).bind(203)
    s.begin_epoch(0)
    params = list(model.parameters())
    for start in range(0, 203, 8):  # ragged last batch of 3; the model never moves
        xb, yb = x[start:start + 8], y[start:start + 8]
        model.zero_grad()
        with DiversityMeter(model) as meter:
            loss_fn(model(xb), yb).backward()
        s.observe(n=len(xb), grad=[p.grad for p in params], sq_norms=meter.sq_norms)
    s.end_epoch(0)
    assert s.last_measurement.diversity == pytest.approx(exact.diversity, rel=1e-10)
    target = 0.25 * exact.batch_size_bound
    assert abs(target - round(target)) > 1e-6  # not on a floor boundary: the exact batch size is well defined
    expected = min(max(math.floor(target), 8), 200)
    assert s.batch_size == expected and s.batch_size > 8


def test_divebatch_observe_needs_measurements():
    s = DiveBatch(4, 64, resize_every=1).bind(100)
    s.begin_epoch(0)
    with pytest.raises(ValueError, match="needs grad="):
        s.observe(n=4)
    with pytest.raises(ValueError, match="None entries"):
        s.observe(n=4, grad=[None, torch.ones(2)], sq_norms=torch.ones(4))


# --------------------------------------------------------------------------------------------
# Noise-scale rule
# --------------------------------------------------------------------------------------------


def test_noise_scale_rule_matches_two_batch_estimator():
    gen = torch.Generator().manual_seed(1)
    s = NoiseScaleBatch(4, 256, delta=0.5, resize_every=1, window=3, beta=0.5).bind(1000)
    ref = TwoBatchNoiseScale(beta=0.5, population_size=1000)   # the schedule corrects for its N = 1000
    s.begin_epoch(0)
    batches = [torch.randn(4, 5, generator=gen, dtype=torch.float64) + 1.0 for _ in range(7)]
    batches.append(torch.randn(2, 5, generator=gen, dtype=torch.float64))  # ragged: skipped
    for b in batches:
        s.observe(n=len(b), grad=b.mean(0))
    for i in range(0, 6, 3):  # two full windows; the 7th batch is an unfinished window
        means = [b.mean(0) for b in batches[i:i + 3]]
        ref.update(sum(float(m.square().sum()) for m in means) / 3, float(torch.stack(means).mean(0).square().sum()), 4, 12)
    resize = s.end_epoch(0)
    assert s.estimator.updates == 2
    assert s.estimator.b_simple == pytest.approx(ref.b_simple)
    assert s.batch_size == min(max(math.floor(0.5 * ref.b_simple), 4), 256)
    if resize is not None:
        assert resize.estimate == pytest.approx(ref.b_simple)


def test_noise_scale_state_round_trip():
    s = NoiseScaleBatch(4, 256, resize_every=1, window=2).bind(1000)
    s.begin_epoch(0)
    for _ in range(4):
        s.observe(n=4, grad=torch.randn(5, dtype=torch.float64) + 1)
    s.end_epoch(0)
    t = NoiseScaleBatch(4, 256, resize_every=1, window=2).bind(1000)
    t.load_state_dict(s.state_dict())
    assert t.estimator.b_simple == s.estimator.b_simple and t.batch_size == s.batch_size


# --------------------------------------------------------------------------------------------
# State and validation
# --------------------------------------------------------------------------------------------


def test_state_dict_survives_weights_only_load():
    s = DiveBatch(4, 64, delta=0.5, resize_every=1, lr_rule="sqrt").bind(100)
    run_epoch(s, 0, [grads_with_bound(30.0)])
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    t = DiveBatch(4, 64, delta=0.5, resize_every=1, lr_rule="sqrt").bind(100)
    t.load_state_dict(torch.load(buffer, weights_only=True))
    assert (t.batch_size, t.lr_scale, t.resizes, t.epoch) == (s.batch_size, s.lr_scale, s.resizes, s.epoch)
    assert t.last_measurement == s.last_measurement
    with pytest.raises(ValueError, match="not 'adabatch'"):
        AdaBatch(4, 64).load_state_dict(s.state_dict())


@pytest.mark.parametrize("make, match", [
    (lambda: FixedBatch(0), r"batch_size must be in \[1, N\], got 0"),
    (lambda: FixedBatch(2.0), "batch_size must be an int"),
    (lambda: FixedBatch(101).bind(100), r"batch_size must be in \[1, N = 100\], got 101"),
    (lambda: DiveBatch(4, 200).bind(100), r"max_batch_size must be in \[1, N = 100\], got 200"),
    (lambda: DiveBatch(64, 32), "batch_size must be <= max_batch_size = 32, got 64"),
    (lambda: DiveBatch(4, 64, delta=0), "delta must be a finite number > 0, got 0"),
    (lambda: DiveBatch(4, 64, delta=-0.1), "delta must be a finite number > 0, got -0.1"),
    (lambda: DiveBatch(4, 64, lr_rule="cubic"),
     r"lr_rule must be one of 'none', 'linear', 'sqrt' \(or 'ratio' with rule='cifar100_ratio'\); got 'cubic'"),
    (lambda: DiveBatch(4, 64, rule="cifar100"), "rule must be one of 'cifar10', 'cifar100_ratio'; got 'cifar100'"),
    (lambda: DiveBatch(4, 64, rule="cifar100_ratio", delta=0.01), r"delta is not used by rule='cifar100_ratio'.*got delta=0.01"),
    (lambda: DiveBatch(4, 64, lr_rule="ratio"), r"lr_rule='ratio' .* belongs to rule='cifar100_ratio', not rule='cifar10'"),
    (lambda: batching.cifar100_code_lr(0.1, 0, 128, 1.0), "batch_size must be an integer >= 1, got 0"),
    (lambda: batching.cifar100_code_lr(0.1, 256, 128, 0.0), "step_factor must be a finite number > 0, got 0.0"),
    (lambda: batching.cifar100_code_lr_scheduler((120, 60)), r"milestones must be strictly increasing, got \[120, 60\]"),
    (lambda: batching.cifar100_code_lr_scheduler(gamma=2.0), r"gamma must be in \(0, 1\], got 2.0"),
    (lambda: DiveBatch(4, 64, lr_cap=0.5), "lr_cap .* must be >= 1, got 0.5"),
    (lambda: DiveBatch(4, 64, resize_every=0), "resize_every must be an integer >= 1, got 0"),
    (lambda: DiveBatch(4, 64, min_batch_size=128), "min_batch_size must be <= max_batch_size = 64, got 128"),
    (lambda: AdaBatch(4, 64, factor=1), "factor must be an integer >= 2, got 1"),
    (lambda: AdaBatch(4, 64, lr_rule="linear", lr_factor=0.75), "either lr_factor"),
    (lambda: NoiseScaleBatch(4, 64, window=1), "window must be an integer >= 2"),
    (lambda: batching.lr_multiplier("quadratic", 1, 2), "lr_rule must be one of"),
    (lambda: batching.lr_multiplier("linear", 0, 2), "old_batch_size must be an integer >= 1, got 0"),
    (lambda: batching.lr_multiplier("linear", 2, 0), "new_batch_size must be an integer >= 1, got 0"),
    (lambda: batching.cifar100_code_lr(0.0, 256, 128, 1.0), "base_lr must be a finite number > 0, got 0.0"),
    (lambda: batching.cifar100_code_lr(0.1, 256, 0, 1.0), "initial_batch_size must be an integer >= 1, got 0"),
    (lambda: batching.cifar100_code_lr_scheduler(()), r"milestones must be a non-empty sequence of epochs, got \(\)"),
    (lambda: batching.cifar100_code_lr_scheduler("60"), "milestones must be a non-empty sequence of epochs, got '60'"),
    (lambda: batching.cifar100_code_lr_scheduler((0, 60)), "milestones must be an integer >= 1, got 0"),
    (lambda: batching.cifar100_code_lr_scheduler(gamma=0.0), "gamma must be a finite number > 0, got 0.0"),
])
def test_bad_input_messages(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_observe_names_what_a_measuring_schedule_is_missing():
    dive = DiveBatch(4, 64, delta=0.5, resize_every=1).bind(100)
    dive.begin_epoch(0)
    for missing in ({"grad": None, "sq_norms": torch.ones(4)}, {"grad": torch.ones(3), "sq_norms": None}):
        with pytest.raises(ValueError, match=r"DiveBatch measures in epoch 0: observe\(\) needs grad= .* and sq_norms= "):
            dive.observe(n=4, **missing)
    noise = NoiseScaleBatch(4, 256, resize_every=1, window=2).bind(1000)
    noise.begin_epoch(0)
    with pytest.raises(ValueError, match=r"NoiseScaleBatch.observe\(\) needs grad= \(the batch gradient"):
        noise.observe(n=4)
    with pytest.raises(ValueError, match="grad_reduction must be 'mean' or 'sum', got 'max'"):
        noise.observe(n=4, grad=torch.ones(3), grad_reduction="max")
    with pytest.raises(ValueError, match="grad contains inf or nan"):
        noise.observe(n=4, grad=torch.tensor([1.0, math.nan]))


def test_cifar100_code_lr_scheduler_accepts_gamma_one():
    """gamma in (0, 1]: 1 keeps the rate (a run without step decay)."""
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    scheduler = batching.cifar100_code_lr_scheduler((1,), gamma=1.0)(optimizer)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_end_epoch_must_match_begin_epoch():
    s = FixedBatch(4)
    s.begin_epoch(0)
    with pytest.raises(ValueError, match="does not match begin_epoch"):
        s.end_epoch(1)


def test_cifar100_code_lr_scheduler_in_the_training_loop_gives_the_code_rates():
    """train() with lr_rule="linear" and MultiStepLR(γ²) runs at η0 (B/B0) γ^(2k) in every epoch, k = milestones passed."""
    from gradiv_lib.training import train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.5 * torch.randn(64, 1, generator=g)
    model = nn.Linear(5, 1)
    schedule = DiveBatch(2, 32, delta=1.0, resize_every=2, lr_rule="linear")
    milestones, gamma, lr0 = (3, 5), 0.5, 0.01
    h = train(model, (x, y), schedule=schedule, epochs=7, lr=lr0, loss_fn=nn.MSELoss(),
              lr_scheduler=batching.cifar100_code_lr_scheduler(milestones, gamma), progress=False)
    assert len(set(h.batch_size)) > 1  # the batch grew: the rescale is exercised
    for epoch, (lr, b) in enumerate(zip(h.lr, h.batch_size)):
        k = sum(m <= epoch for m in milestones)  # scheduler steps taken before this epoch: `epoch`
        assert lr == pytest.approx(batching.cifar100_code_lr(lr0, b, 2, gamma ** k), rel=1e-12)


def test_cifar100_config_uses_the_final_cifar100_rule():
    from gradiv_lib.experiments import divebatch

    config = divebatch.CONFIGS["cifar100"]
    schedule, lr = divebatch.make_schedule("divebatch_linear", config)
    assert (schedule.rule, schedule.delta, schedule.resize_every, schedule.lr_rule, lr) == ("cifar10", 0.01, 20, "linear", 0.1)
