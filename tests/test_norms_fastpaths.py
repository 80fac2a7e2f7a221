"""The per-step fast paths of gradiv_lib.norms (issue 13, item 6) against torch.func, in float64.

After the first measurement of a model has passed its checks, later measurements take cheaper paths:
Linear layers hand over row-norm factors that the engine combines for all layers at once, convolutions
reuse the method chosen for their shapes, a training loop keeps the hooks registered across steps
(``DiversityMeter.hold``), and the epoch accumulator adds gradients in place. Each test compares a
*later* measurement (where the fast path runs) with per-sample gradients from ``vmap(grad)``, and
includes a case where a plausible wrong variant gives a different number.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradiv_lib.diversity import EpochDiversityAccumulator
from gradiv_lib.norms import DiversityMeter, rules

TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one torch thread for the whole module (tests/conftest.py)."""


def reference(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """‖∇ℓ_i‖² and ‖Σ_i ∇ℓ_i‖² for the cross-entropy of sample i alone, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1).double()
    return flat.square().sum(1), float(flat.sum(0).square().sum())


def metered(meter: DiversityMeter, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float, float]:
    model.zero_grad(set_to_none=True)
    with meter:
        nn.functional.cross_entropy(model(x), y).backward()
    return meter.sq_norms, meter.result.sum_sq_norms, meter.result.sq_norm_of_sum


def assert_close(got: Tensor, expected: Tensor) -> None:
    scale = float(expected.abs().max())
    assert float((got.double() - expected).abs().max()) <= TOL * scale


def mlp(bias_first: bool = True, bias_last: bool = False) -> nn.Module:
    return nn.Sequential(nn.Linear(7, 6, bias=bias_first), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=bias_last)).double()


@pytest.mark.parametrize("check", ["first_call", "off"])
def test_linear_factors_on_later_steps_match_torch_func(check: str) -> None:
    """Mixed bias / no-bias layers: (‖a‖² + c)‖δ‖² summed over layers with c per layer. A wrong constant
    (c = 1 for every layer, or c = 0) changes the numbers, which the first two asserts show."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randint(0, 3, (9,))
    meter = DiversityMeter(model, check=check)
    expected, expected_sum = reference(model, x, y)
    for _ in range(3):  # first call (checks) and two later calls (the factor path)
        sq_norms, total, of_sum = metered(meter, model, x, y)
        assert_close(sq_norms, expected)
        assert total == pytest.approx(float(expected.sum()), rel=TOL)
        assert of_sum == pytest.approx(expected_sum, rel=TOL)
    factors = meter._engine._factor_parts
    assert len(factors) == 3, "the later calls should have taken the factor path for all three layers"
    assert [c for _, _, c in factors] == [0.0, 1.0, 1.0]  # backward order: last layer (no bias) first
    # the per-layer constant matters: c = 1 for every layer (a bias assumed everywhere) is wrong
    wrong = sum((u.square() + 1.0) * v.square() for u, v, _ in factors)
    assert float((wrong - expected).abs().max()) > 1e-3 * float(expected.abs().max())


def test_frozen_weight_and_frozen_bias_take_the_right_path() -> None:
    torch.manual_seed(1)
    model = mlp(bias_last=True)
    model[0].weight.requires_grad_(False)  # bias only: no factors for this layer
    model[4].bias.requires_grad_(False)  # weight only: c = 0
    x, y = torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 3, (6,))
    meter = DiversityMeter(model)
    expected, expected_sum = reference(model, x, y)
    for _ in range(3):
        sq_norms, _, of_sum = metered(meter, model, x, y)
        assert_close(sq_norms, expected)
        assert of_sum == pytest.approx(expected_sum, rel=TOL)


def test_conv_plan_is_reused_and_exact_on_later_steps() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(3, 3)
    ).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    meter = DiversityMeter(model, exact_grad=True)  # the hook rules (the fused path plans nothing)
    expected, expected_sum = reference(model, x, y)
    for _ in range(3):
        sq_norms, _, of_sum = metered(meter, model, x, y)
        assert_close(sq_norms, expected)
        assert of_sum == pytest.approx(expected_sum, rel=TOL)
    plans = rules._conv_plans.get(model[0])
    assert plans and all(len(plan) == 3 for plan in plans.values())
    planned = len(plans)
    # the cached plan is keyed by shape: another batch size is planned (and exact) on its own
    x2, y2 = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    expected2, _ = reference(model, x2, y2)
    assert_close(metered(meter, model, x2, y2)[0], expected2)
    assert len(rules._conv_plans[model[0]]) == planned + 1


def test_held_meter_ignores_passes_between_measurements_and_releases() -> None:
    """hold(): hooks stay registered; forward/backward passes outside ``with`` are not recorded (else the
    next result would add their norms), and release() removes every hook."""
    torch.manual_seed(3)
    model = mlp()
    x, y = torch.randn(8, 7, dtype=torch.float64), torch.randint(0, 3, (8,))
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    meter = DiversityMeter(model).hold()
    expected, expected_sum = reference(model, x, y)
    for _ in range(3):
        other = torch.randn(4, 7, dtype=torch.float64)
        nn.functional.cross_entropy(model(other), torch.randint(0, 3, (4,))).backward()  # outside: ignored
        sq_norms, _, of_sum = metered(meter, model, x, y)
        assert_close(sq_norms, expected)
        assert of_sum == pytest.approx(expected_sum, rel=TOL)
    assert sum(len(m._forward_hooks) for m in model.modules()) > 0
    meter.release()
    meter.release()  # idempotent
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert all(not p._backward_hooks for p in model.parameters())
    sq_norms, _, _ = metered(meter, model, x, y)  # after release, a plain with-block registers and removes its own
    assert_close(sq_norms, expected)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_accumulator_in_place_sum_matches_float64_concatenation() -> None:
    """The per-parameter in-place float64 sum equals the old concatenate-then-add, with the mean scale
    applied per batch (a wrong variant, scaling once by the total n, differs for ragged batches)."""
    torch.manual_seed(4)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    batches = [([torch.randn(s) for s in shapes], n) for n in (5, 5, 2)]
    accumulator = EpochDiversityAccumulator()
    reference_sum = torch.zeros(sum(math.prod(s) for s in shapes), dtype=torch.float64)
    for grads, n in batches:
        accumulator.update(torch.rand(n), grads, n, grad_reduction="mean")
        reference_sum += torch.cat([g.reshape(-1) for g in grads]).double() * n
    assert accumulator.result.sq_norm_of_sum == pytest.approx(float(reference_sum.square().sum()), rel=1e-12)
    wrong = sum(torch.cat([g.reshape(-1) for g in grads]).double() for grads, _ in batches) * 12 / 3
    assert float(wrong.square().sum()) != pytest.approx(accumulator.result.sq_norm_of_sum, rel=1e-6)
    # a single tensor and a list of the same entries are one layout
    single = EpochDiversityAccumulator()
    single.update(1.0, torch.ones(4), 1)
    single.update(1.0, [torch.ones(2), torch.ones(2)], 1)
    assert single.result.sq_norm_of_sum == 16.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_accumulator_refuses_non_finite_gradients_and_keeps_its_state(bad: float) -> None:
    accumulator = EpochDiversityAccumulator()
    accumulator.update(1.0, [torch.ones(2), torch.ones(3)], 1)
    with pytest.raises(ValueError, match="grad contains inf or nan"):
        accumulator.update(1.0, [torch.ones(2), torch.tensor([1.0, bad, 1.0])], 1)
    assert accumulator.result.sq_norm_of_sum == 5.0 and accumulator.n == 1


def test_accumulator_finite_check_survives_an_overflowing_l1_norm() -> None:
    """float16 entries whose L1 norm overflows (> 65504) are finite: no false refusal."""
    accumulator = EpochDiversityAccumulator()
    accumulator.update(1.0, torch.full((4,), 60000.0, dtype=torch.float16), 1)
    assert accumulator.result.sq_norm_of_sum == pytest.approx(4 * 60000.0**2)


@pytest.mark.parametrize("values", [[1.0, math.nan], [1.0, math.inf], [1.0, -0.5]])
def test_sum_of_sq_norms_refuses_bad_entries(values: list[float]) -> None:
    with pytest.raises(ValueError, match="sq_norms must be finite and >= 0"):
        EpochDiversityAccumulator().update(torch.tensor(values), torch.ones(2), 2)


def test_race_at_one_thread_counts_this_threads_cpu_time_not_waiting(one_thread) -> None:
    """On one CPU thread the autotuner times with thread CPU time: a candidate that only waits (as if
    other jobs held the core) does not lose to one that computes longer. A wall clock would pick 'busy'."""
    import time

    from gradiv_lib.norms import fastest

    key = ("fastpaths", "clock")
    fastest._winners.pop(key, None)
    value = torch.ones(2)

    def waits() -> Tensor:
        time.sleep(0.02)
        return value

    def busy() -> Tensor:
        sum(range(200000))
        return value.clone()

    assert torch.get_num_threads() == 1
    fastest.run_fastest(key, {"busy": busy, "waits": waits}, torch.device("cpu"))
    assert fastest.winner_of(key) == "waits"
    fastest._winners.pop(key, None)


def test_later_calls_give_the_first_calls_numbers_bit_for_bit_in_float32() -> None:
    """The fast paths keep each layer's arithmetic and the order of the sum over layers, so a checked
    first call and an unchecked later call agree exactly (float32, conv + linear layers interleaved)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Unflatten(1, (2, 4)), nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(12, 4, bias=False))
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    meter = DiversityMeter(model, exact_grad=True)
    first, _, first_sum = metered(meter, model, x, y)
    first = first.clone()
    for _ in range(2):
        later, _, later_sum = metered(meter, model, x, y)
        assert torch.equal(later, first) and later_sum == first_sum
    assert len(meter._engine._factor_parts) == 2
    # the default fused convolution: its per-sample norms are the same arithmetic; the summed .grad
    # (and so ‖Σ∇ℓ_i‖²) differs only by the order of float32 rounding
    fused = DiversityMeter(model)
    metered(fused, model, x, y)
    later, _, later_sum = metered(fused, model, x, y)
    assert torch.equal(later, first) and later_sum == pytest.approx(first_sum, rel=1e-6)


def test_the_race_shuffles_its_order_every_round_reproducibly() -> None:
    """``fastest.time_interleaved`` runs every candidate once per round in an order drawn afresh each
    round (seeded): with a fixed order each candidate would always follow the same one, and what ran
    just before a step changes its time. Every candidate's result is the one of its last run."""
    from gradiv_lib.norms import fastest

    def orders(rounds: int) -> list[list[str]]:
        calls: list[str] = []
        candidates = {name: (lambda name=name: calls.append(name) or name) for name in "abcd"}
        timings, results = fastest.time_interleaved(candidates, torch.device("cpu"), rounds)
        assert set(timings) == set(candidates) and all(t >= 0 for t in timings.values())
        assert list(results.items()) == [(name, name) for name in candidates]  # in the candidates' order
        return [calls[r * 4 : (r + 1) * 4] for r in range(rounds)]

    runs = orders(30)
    assert all(sorted(order) == list("abcd") for order in runs)
    assert len({order[order.index("b") - 1] for order in runs if order[0] != "b"}) == 3
    assert runs == orders(30)


def test_an_mlp_whose_layers_all_give_factors_keeps_the_first_calls_numbers_bit_for_bit() -> None:
    """Every layer gives row-norm factors, so later calls sum the stacked factor matrix directly (no
    unbind and restack): the same float32 numbers as the checked first call, and Δ's parts match
    vmap(grad) to float32 rounding."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 8, bias=False), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(11, 7), torch.randint(0, 3, (11,))
    meter = DiversityMeter(model)
    first, first_total, first_sum = metered(meter, model, x, y)
    first = first.clone()
    for _ in range(2):
        later, total, of_sum = metered(meter, model, x, y)
        assert torch.equal(later, first) and total == first_total and of_sum == first_sum
    assert len(meter._engine._factor_parts) == 3 and meter._engine._factor_matrix() is not None
    expected, expected_sum = reference(model.double(), x.double(), y)
    assert float((first.double() - expected).abs().max()) <= 1e-5 * float(expected.max())
    assert first_sum == pytest.approx(expected_sum, rel=1e-5)


class SparseEmbeddingHead(nn.Module):
    """A sparse-gradient embedding (float32) under a float64 head: ‖Σ_i ∇ℓ_i‖² adds a sparse gradient's
    stored values and gradients of two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 3).double()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embedding(tokens).double())


@pytest.mark.parametrize("repeated_token", [False, True])
def test_sq_norm_of_sum_from_a_sparse_gradient_and_two_dtypes(repeated_token: bool) -> None:
    """‖Σ_i ∇ℓ_i‖² equals the dense reference: the sparse .grad is coalesced first (a token used by two
    samples has two stored rows that must be added before squaring), and the float32 and float64 parts
    are added in float64."""
    torch.manual_seed(7)
    model = SparseEmbeddingHead()
    tokens = torch.tensor([1, 4, 4, 7] if repeated_token else [1, 4, 6, 7])
    y = torch.tensor([0, 2, 1, 2])
    meter = DiversityMeter(model)
    for _ in range(2):
        _, total, of_sum = metered(meter, model, tokens, y)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(tokens), y, reduction="sum").backward()
        dense = [p.grad.to_dense().double() for p in model.parameters()]
        expected_sum = sum(float(g.square().sum()) for g in dense)
        assert of_sum == pytest.approx(expected_sum, rel=1e-6)
    if repeated_token:  # squaring the uncoalesced rows separately would give a different number
        grad = model.embedding.weight.grad
        uncoalesced = float(grad._values().double().square().sum()) + float(dense[1].square().sum()) + float(dense[2].square().sum())
        assert abs(uncoalesced - expected_sum) > 1e-3 * expected_sum


def test_a_meter_without_the_sum_measures_the_same_per_sample_norms_and_refuses_result() -> None:
    """``sq_norm_of_sum=False`` (``train()``'s meter): the per-sample norms are those of the default
    meter, no gradient is read for ‖Σ∇ℓ_i‖², and asking for Δ raises instead of returning a number
    without its denominator."""
    torch.manual_seed(8)
    model = mlp()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randint(0, 3, (9,))
    full, per_sample_only = DiversityMeter(model), DiversityMeter(model, sq_norm_of_sum=False)
    expected, _ = reference(model, x, y)
    for _ in range(2):
        with_sum, _, _ = metered(full, model, x, y)
        model.zero_grad(set_to_none=True)
        with per_sample_only:
            nn.functional.cross_entropy(model(x), y).backward()
        assert torch.equal(per_sample_only.sq_norms, with_sum)
        assert_close(per_sample_only.sq_norms, expected)
        assert per_sample_only._engine._grad_sq_norms == [] and len(full._engine._grad_sq_norms) == len(list(model.parameters()))
        with pytest.raises(RuntimeError, match="sq_norm_of_sum=False"):
            per_sample_only.result
        with pytest.raises(RuntimeError, match="measure_sum=False"):
            per_sample_only._engine.grad_sum_sq_norm()
    with pytest.raises(TypeError, match="sq_norm_of_sum must be a bool, got 'no'"):
        DiversityMeter(model, sq_norm_of_sum="no")


def test_the_squared_norm_of_a_long_float32_gradient_is_summed_accurately() -> None:
    """‖g‖² of a 4·10⁶-entry float32 gradient to 5e-6 of the float64 value: one float32 dot (or norm
    reduction) along the whole length is off by 2e-5 (2e-4) here; the chunked dots added in float64 are not."""
    from gradiv_lib.norms.engine import _DOT_CHUNK, _squared_norm

    generator = torch.Generator().manual_seed(9)
    grad = torch.randn(2000, 2000, generator=generator) * 0.01 + 0.003
    assert grad.numel() > 4 * _DOT_CHUNK
    exact = float(grad.double().square().sum())
    assert float(_squared_norm(grad)) == pytest.approx(exact, rel=5e-6)
    short = grad[:100]  # one dot below the chunk length, in the gradient's dtype
    got = _squared_norm(short)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(short.double().square().sum()), rel=1e-5)
    half = (grad[:10] * 30000).half()  # squares above float16's range: computed in float32
    assert math.isfinite(float(_squared_norm(half)))
    assert float(_squared_norm(half)) == pytest.approx(float(half.double().square().sum()), rel=1e-5)


@pytest.mark.parametrize("multi_tensor", [False, True])
def test_squared_norms_of_a_mixed_set_of_gradients(multi_tensor: bool) -> None:
    """Both ways of reading ‖g‖² at the end of the backward pass (BLAS dots on the CPU; one multi-tensor
    kernel elsewhere, run here on CPU tensors) give every gradient's squared norm: float32, float64, float16
    and an uncoalesced sparse gradient with a repeated row."""
    from gradiv_lib.norms.engine import _squared_norms

    generator = torch.Generator().manual_seed(11)
    sparse = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), torch.randn(3, 2, generator=generator), (5, 2), check_invariants=True)
    grads = [torch.randn(7, 3, generator=generator), torch.randn(4, dtype=torch.float64, generator=generator),
             (torch.randn(6, generator=generator) * 300).half(), sparse]
    got = _squared_norms(grads, multi_tensor=multi_tensor)
    assert len(got) == len(grads)
    expected = sorted(float(g.to_dense().double().square().sum()) for g in grads)
    assert sorted(float(n) for n in got) == pytest.approx(expected, rel=1e-5)
