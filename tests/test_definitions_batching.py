"""Definitions of the batch-size schedules and learning-rate rules, pinned by hand computation.

Every case is chosen so that a plausible wrong variant of the rule (round or ceil instead of floor, the
number of batches instead of the number of samples, an off-by-one in the measurement epoch, sqrt instead
of linear, a missing clamp) gives a different number. Comparisons are exact.
"""
from __future__ import annotations

import math

import pytest
import torch

from gradiv_lib.batching import AdaBatch, DiveBatch, FixedBatch, NoiseScaleBatch, cifar100_code_lr, lr_multiplier


def _epoch(schedule, epoch, batches):
    """One epoch of per-sample gradient batches ([n, d] float64), batch-mean gradients as the loop passes them."""
    schedule.begin_epoch(epoch)
    for g in batches:
        if schedule.needs_diversity or schedule.needs_grad:
            schedule.observe(n=len(g), grad=g.mean(0), sq_norms=g.square().sum(1))
        else:
            schedule.observe(n=len(g))
    return schedule.end_epoch(epoch)


def _grads_bound_10() -> torch.Tensor:
    """10 per-sample gradients (1, ±3): sum of squares 100, squared norm of the sum 100, so B_S = N·Δ = 10 exactly."""
    g = torch.ones(10, 2, dtype=torch.float64)
    g[:5, 1], g[5:, 1] = 3.0, -3.0
    return g


def test_lr_multiplier_definitions():
    # 4 -> 9: linear 9/4, sqrt 3/2; the inverse (4/9) or the square (81/16) would differ
    assert lr_multiplier("none", 4, 9) == 1.0
    assert lr_multiplier("linear", 4, 9) == 2.25
    assert lr_multiplier("sqrt", 4, 9) == 1.5


def test_fixed_batch_is_constant():
    s = FixedBatch(3).bind(10)
    for e in range(3):
        assert _epoch(s, e, [_grads_bound_10()[:3]]) is None
    assert (s.batch_size, s.lr_scale, s.resizes) == (3, 1.0, [])


def test_adabatch_factor_three_lands_on_max_with_linear_lr():
    # factor 3: 2 -> 6 -> 18 -> 20 (the last step lands on B_max); linear lr: 3, 9, 9 * 20/18 = 10
    s = AdaBatch(2, 20, factor=3, resize_every=2, lr_rule="linear").bind(100)
    seen = []
    for e in range(9):
        r = _epoch(s, e, [])
        seen.append((s.batch_size, s.lr_scale))
        if r is not None:
            assert r.epoch in (1, 3, 5)
    assert [r.epoch for r in s.resizes] == [1, 3, 5]  # after epochs e with (e+1) % 2 == 0
    assert [r.new_batch_size for r in s.resizes] == [6, 18, 20]
    assert [r.new_lr_scale for r in s.resizes] == pytest.approx([3.0, 9.0, 10.0], rel=1e-15)
    assert s.resizes[2].lr_factor == pytest.approx(20 / 18, rel=1e-15)
    assert seen[-1] == (20, pytest.approx(10.0, rel=1e-15))


def test_adabatch_fixed_lr_factor_multiplies_per_resize():
    s = AdaBatch(2, 16, resize_every=1, lr_factor=0.75).bind(100)
    for e in range(4):
        _epoch(s, e, [])
    assert [r.new_batch_size for r in s.resizes] == [4, 8, 16]
    assert s.lr_scale == 0.75 ** 3  # the factor, not a rule of the batch ratio


def test_divebatch_rule_is_floor_of_delta_times_n_delta_hat():
    """B_S = 10 exactly; δ = 0.75 gives 7.5: floor 7 (round and ceil give 8)."""
    s = DiveBatch(1, 10, delta=0.75, resize_every=1, lr_rule="linear").bind(10)
    g = _grads_bound_10()
    r = _epoch(s, 0, [g[:4], g[4:8], g[8:]])  # three batches: N is 10 samples, not 3 batches
    assert s.last_measurement.batch_size_bound == 10.0
    assert s.last_measurement.diversity == 1.0
    assert r.new_batch_size == 7 and r.estimate == 10.0
    assert r.new_lr_scale == 7.0  # linear rule: 7 / 1


def test_divebatch_sqrt_rule_and_cap():
    s = DiveBatch(1, 10, delta=0.75, resize_every=1, lr_rule="sqrt").bind(10)
    _epoch(s, 0, [_grads_bound_10()])
    assert s.lr_scale == math.sqrt(7)
    capped = DiveBatch(1, 10, delta=0.75, resize_every=1, lr_rule="linear", lr_cap=2.5).bind(10)
    _epoch(capped, 0, [_grads_bound_10()])
    assert capped.batch_size == 7 and capped.lr_scale == 2.5


def test_divebatch_never_shrinks_and_clamps():
    # current B = 8 > floor(7.5) = 7: stays at 8 (no resize)
    s = DiveBatch(8, 10, delta=0.75, resize_every=1).bind(10)
    assert _epoch(s, 0, [_grads_bound_10()]) is None and s.batch_size == 8
    # δ B_S = 12 > B_max = 9: clamped to 9
    s = DiveBatch(1, 9, delta=1.2, resize_every=1).bind(10)
    assert _epoch(s, 0, [_grads_bound_10()]).new_batch_size == 9
    # floor(0.25 * 10) = 2 < B_min = 5: lifted to 5
    s = DiveBatch(1, 10, delta=0.25, resize_every=1, min_batch_size=5).bind(10)
    assert _epoch(s, 0, [_grads_bound_10()]).new_batch_size == 5


def test_divebatch_measures_in_the_epoch_that_ends_each_period():
    s = DiveBatch(1, 10, delta=0.75, resize_every=3).bind(10)
    needs = []
    for e in range(6):
        s.begin_epoch(e)
        needs.append(s.needs_diversity)
        if s.needs_diversity:
            g = _grads_bound_10()
            s.observe(n=10, grad=g.mean(0), sq_norms=g.square().sum(1))
        s.end_epoch(e)
    assert needs == [False, False, True, False, False, True]
    assert [e for e, _ in s.measurements] == [2, 5]
    assert s.batch_size == 7


def test_divebatch_sum_reduction_is_not_rescaled_twice():
    s = DiveBatch(1, 10, delta=0.75, resize_every=1).bind(10)
    g = _grads_bound_10()
    s.begin_epoch(0)
    s.observe(n=10, grad=g.sum(0), sq_norms=g.square().sum(1), grad_reduction="sum")
    s.end_epoch(0)
    assert s.last_measurement.batch_size_bound == 10.0 and s.batch_size == 7


def _grads_with_diversity(diversity: float, n: int) -> torch.Tensor:
    """n (even) per-sample gradients (1, ±b) with b² = nΔ - 1: sum of squares n·nΔ, squared norm of the sum n², so Δ̂ = Δ."""
    g = torch.ones(n, 2, dtype=torch.float64)
    b = math.sqrt(n * diversity - 1)
    g[: n // 2, 1], g[n // 2:, 1] = b, -b
    return g


def _run(schedule, diversities, n):
    """Epochs 0, 1, ...; each measurement epoch sees the next Δ̂ of ``diversities``. Returns (B, lr_scale) after each."""
    todo, seen, epoch = list(diversities), [], 0
    while todo:
        schedule.begin_epoch(epoch)
        if schedule.needs_diversity:
            g = _grads_with_diversity(todo.pop(0), n)
            schedule.observe(n=n, grad=g.mean(0), sq_norms=g.square().sum(1))
        else:
            schedule.observe(n=n)
        if schedule.end_epoch(epoch) is not None or schedule.measurements and schedule.measurements[-1][0] == epoch:
            seen.append((schedule.batch_size, schedule.lr_scale))
        epoch += 1
    return seen


def test_divebatch_cifar10_rule_by_hand_on_cifar_sizes():
    """CIFAR-10 script: B' = min(max(int(δ N Δ̂), B), B_max), lr × B'/B (N = 50 000, δ = 0.1, 128 → 2048, every 20 epochs).

    Δ̂ = 0.02: δNΔ̂ = 100 < 128, stays (lr ×1); 0.05123: 256.15 → 256 (lr ×2); 0.10003: 500.15 → 500
    (lr ×500/256); 0.5: 2500 → 2048 (lr ×2048/500). The ratio rule would never move (all Δ̂ < 1), rounding
    would give 257 after 256.7, and without the never-shrink max the first step would go to 100.
    """
    s = DiveBatch(128, 2048, delta=0.1, resize_every=20, lr_rule="linear").bind(50_000)
    seen = _run(s, [0.02, 0.05123, 0.10003, 0.5], 50_000)
    assert [b for b, _ in seen] == [128, 256, 500, 2048]
    assert [lr for _, lr in seen] == pytest.approx([1.0, 2.0, 500 / 128, 16.0], rel=1e-12)
    assert [e for e, _ in s.measurements] == [19, 39, 59, 79]
    # the final CIFAR-100 script: the same rule with δ = 0.01 on its logged Δ̂ 3.5506, then 5.0
    s = DiveBatch(128, 2048, delta=0.01, resize_every=20, lr_rule="linear").bind(50_000)
    assert _run(s, [3.5506, 5.0], 50_000) == [(1775, pytest.approx(1775 / 128, rel=1e-12)), (2048, pytest.approx(16.0))]


def test_divebatch_cifar100_ratio_rule_reproduces_the_authors_logs():
    """Early CIFAR-100 script (commit 7605f00): B' = min(int(B · max(Δ̂, 1)), B_max), its lr × max(Δ̂, 1).

    Its logs (ResNet-18, B 128 → 2048): with a resize every 10 epochs, Δ̂ = 4.9654 then 3.5506 give
    128 → int(635.57) = 635 → min(2254.6, 2048) = 2048 (a true ratio Δ̂_new/Δ̂_old < 1 would keep 635,
    rounding would give 636); every epoch, Δ̂ = 0.0935, 7.8004, 1.2259, 2.1806 give 128, 998, 1223, 2048
    (a true ratio would stay at 998). The learning rate is multiplied by Δ̂ itself: 4.9654 · 3.5506 = 17.630...,
    not 2048/128 = 16.
    """
    s = DiveBatch(128, 2048, rule="cifar100_ratio", resize_every=10, lr_rule="ratio").bind(2048)
    seen = _run(s, [4.9654, 3.5506], 2048)
    assert [b for b, _ in seen] == [635, 2048]
    assert [lr for _, lr in seen] == pytest.approx([4.9654, 4.9654 * 3.5506], rel=1e-12)
    assert [e for e, _ in s.measurements] == [9, 19]
    s = DiveBatch(128, 2048, rule="cifar100_ratio", resize_every=1, lr_rule="linear").bind(2048)
    seen = _run(s, [0.0935, 7.8004, 1.2259, 2.1806], 2048)
    assert [b for b, _ in seen] == [128, 998, 1223, 2048]
    assert seen[-1][1] == pytest.approx(16.0, rel=1e-12)  # linear: the batch ratio, 2048/128
    assert s.delta is None


def test_cifar100_code_lr_by_hand():
    """Final CIFAR-100 script with --adaptive_lr: η = η0 (B/B0) s², s = 0.2^k after k of the milestones 60, 120, 160.

    B = 1775 after epoch 20, 2048 after epoch 40: epoch 21 runs at 0.1 · 1775/128 = 1.38671875; epoch 61 at
    0.1 · 16 · 0.2² = 0.064 (the CIFAR-10 script's once-applied factor would give 0.32); epoch 121 at
    0.1 · 16 · 0.04² = 0.00256; epoch 161 at 0.1 · 16 · 0.04³ = 0.0001024.
    """
    assert cifar100_code_lr(0.1, 128, 128, 1.0) == 0.1
    assert cifar100_code_lr(0.1, 1775, 128, 1.0) == pytest.approx(1.38671875, rel=1e-15)
    assert cifar100_code_lr(0.1, 2048, 128, 0.2) == pytest.approx(0.064, rel=1e-12)
    assert cifar100_code_lr(0.1, 2048, 128, 0.2 ** 2) == pytest.approx(0.00256, rel=1e-12)
    assert cifar100_code_lr(0.1, 2048, 128, 0.2 ** 3) == pytest.approx(0.0001024, rel=1e-12)


# The schedule corrects for batches drawn without replacement from its N = 1000 samples: c_B = (N - B) / (B (N - 1)).
# Small = 10 (B = 2), big = 9 (B = 4): tr Σ = (10 - 9)/(c_2 - c_4), |G|^2 = (c_2·9 - c_4·10)/(c_2 - c_4), so
# B_simple = 1 / (9 c_2 - 10 c_4) = 0.49925... (with McCandlish's 1/B it would be exactly 0.5).
B_SIMPLE_1000 = 1 / (9 * (998 / (2 * 999)) - 10 * (996 / (4 * 999)))


def test_noise_scale_rule_by_hand():
    """Window of two batches of B = 2 with batch-mean gradients (3, 1), (3, -1): small = 10, big = 9,
    B_simple = B_SIMPLE_1000 = 0.49925; δ = 35: 17.47 -> floor 17 (round/ceil: 18)."""
    s = NoiseScaleBatch(2, 64, delta=35.0, resize_every=1, window=2, beta=0.0).bind(1000)
    s.begin_epoch(0)
    s.observe(n=2, grad=torch.tensor([3.0, 1.0], dtype=torch.float64))
    s.observe(n=1, grad=torch.tensor([100.0, 100.0], dtype=torch.float64))  # ragged batch: ignored
    s.observe(n=2, grad=torch.tensor([3.0, -1.0], dtype=torch.float64))
    r = s.end_epoch(0)
    assert s.estimator.updates == 1
    assert s.estimator.b_simple == pytest.approx(B_SIMPLE_1000, rel=1e-12) and B_SIMPLE_1000 != pytest.approx(0.5)
    assert r.estimate == pytest.approx(B_SIMPLE_1000, rel=1e-12) and r.new_batch_size == 17
    assert s.estimates == [(0, pytest.approx(B_SIMPLE_1000, rel=1e-12))]


def test_noise_scale_sum_reduction_divides_by_n():
    s = NoiseScaleBatch(2, 64, delta=35.0, resize_every=1, window=2, beta=0.0).bind(1000)
    s.begin_epoch(0)
    for v in ([6.0, 2.0], [6.0, -2.0]):  # sums over 2 samples = 2 x the means above
        s.observe(n=2, grad=torch.tensor(v, dtype=torch.float64), grad_reduction="sum")
    s.end_epoch(0)
    assert s.estimator.b_simple == pytest.approx(B_SIMPLE_1000, rel=1e-12) and s.batch_size == 17


def test_noise_scale_window_restarts_every_epoch():
    s = NoiseScaleBatch(2, 64, delta=35.0, resize_every=2, window=2, beta=0.0).bind(1000)
    s.begin_epoch(0)
    s.observe(n=2, grad=torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert s.end_epoch(0) is None  # (0 + 1) % 2 != 0
    s.begin_epoch(1)
    s.observe(n=2, grad=torch.tensor([3.0, -1.0], dtype=torch.float64))
    assert s.end_epoch(1) is None and s.estimator.updates == 0  # the half window of epoch 0 was dropped


def test_noise_scale_resizes_only_at_the_end_of_a_period():
    s = NoiseScaleBatch(2, 64, delta=35.0, resize_every=2, window=2, beta=0.0).bind(1000)
    for e in range(2):
        s.begin_epoch(e)
        for v in ([3.0, 1.0], [3.0, -1.0]):
            s.observe(n=2, grad=torch.tensor(v, dtype=torch.float64))
        r = s.end_epoch(e)
        assert (r is None) == (e == 0)
    assert r.epoch == 1 and r.new_batch_size == 17 and s.estimates == [(1, pytest.approx(B_SIMPLE_1000, rel=1e-12))]


def test_divebatch_resize_records_its_epoch_and_needs_a_measured_batch():
    s = DiveBatch(1, 10, delta=0.75, resize_every=2).bind(10)
    _epoch(s, 0, [_grads_bound_10()])
    r = _epoch(s, 1, [_grads_bound_10()])
    assert r.epoch == 1 and s.resizes == [r] and r.old_lr_scale == 1.0 and r.new_lr_scale == 1.0
    s = DiveBatch(1, 10, delta=0.75, resize_every=1).bind(10)
    s.begin_epoch(0)
    with pytest.raises(RuntimeError, match="received no batch"):
        s.end_epoch(0)


def test_noise_scale_sum_reduction_across_a_resize():
    """B_simple is scale-free within one batch size, so the 1/n of grad_reduction="sum" only shows when the EMA
    mixes two batch sizes: sum and mean inputs must give the same estimator state after a resize."""
    states = []
    for reduction in ("mean", "sum"):
        s = NoiseScaleBatch(2, 64, delta=35.0, resize_every=1, window=2, beta=0.5).bind(1000)
        for e, rows in enumerate(([[3.0, 1.0], [3.0, -1.0]], [[1.0, 2.0], [2.0, 1.0]])):
            s.begin_epoch(e)
            for v in rows:
                g = torch.tensor(v, dtype=torch.float64)
                s.observe(n=s.batch_size, grad=g * s.batch_size if reduction == "sum" else g, grad_reduction=reduction)
            s.end_epoch(e)
        states.append((s.estimator.b_simple, s.batch_size, list(s.estimates)))
    assert len(states[0][2]) == 2 and states[0] == states[1]


def test_noise_scale_min_batch_size_and_state_round_trip():
    s = NoiseScaleBatch(2, 64, delta=1.0, resize_every=1, window=2, beta=0.0, min_batch_size=20).bind(1000)
    s.begin_epoch(0)
    for v in ([3.0, 1.0], [3.0, -1.0]):
        s.observe(n=2, grad=torch.tensor(v, dtype=torch.float64))
    assert s.end_epoch(0).new_batch_size == 20  # floor(1 * 0.5) = 0 -> never shrinks -> lifted to B_min
    t = NoiseScaleBatch(2, 64, delta=1.0, resize_every=1, window=2, beta=0.0, min_batch_size=20).bind(1000)
    t.load_state_dict(s.state_dict())
    assert t.estimates == [(0, pytest.approx(B_SIMPLE_1000))] and t.batch_size == 20
    assert t.estimator.b_simple == pytest.approx(B_SIMPLE_1000)


def test_no_epoch_before_begin_epoch():
    s = DiveBatch(1, 10, resize_every=2).bind(10)
    assert s.epoch == -1 and not s.needs_diversity
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got True"):
        s.begin_epoch(True)
