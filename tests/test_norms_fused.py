"""The meter's steady-state paths (issue 13, item 6) against torch.func, in float64.

* Fused weight gradients (``gradiv_lib/norms/fused.py``): after the checked first call, the weight
  gradient of a convolution or of a Linear layer on sequences is the sum of the per-sample gradients the
  meter forms anyway. Its norms must equal ``vmap(grad)``'s, its ``.grad`` autograd's (to rounding), its
  input gradient autograd's, and every geometry (stride, dilation, groups, rectangular kernels, no bias,
  frozen bias, in-place ReLU after it, batch chunks, a layer called twice, extra sequence axes, the
  batch on axis 1 inside the model) must stay exact; a 2-D Linear layer is never fused.
* Reading ``.grad`` at the end of the backward pass (``grad_source="backward"``): gradients accumulated
  before, clipping after the backward pass, hooks acting on ``.grad``, two backward passes,
  ``torch.autograd.grad`` and ``backward(inputs=...)`` are each either right or refused.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradiv_lib.norms import DiversityMeter, fused

TOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one torch thread for the whole module (tests/conftest.py)."""


def reference(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """‖∇ℓ_i‖² and ‖Σ_i ∇ℓ_i‖² of the per-sample cross-entropies, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1).double()
    return flat.square().sum(1), float(flat.sum(0).square().sum())


def autograd_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def step(meter: DiversityMeter, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    model.zero_grad(set_to_none=True)
    with meter:
        nn.functional.cross_entropy(model(x), y).backward()
    return meter.sq_norms, meter.result.sq_norm_of_sum


def check_measured_calls(model: nn.Module, shape: tuple[int, ...], *, batch: int = 6, calls: int = 3) -> None:
    """On every one of ``calls`` measured steps: norms and ‖Σ g‖² equal vmap(grad)'s, ``.grad`` autograd's."""
    x, y = torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))
    expected, expected_sum = reference(model, x, y)
    expected_grads = autograd_grads(model, x, y)
    meter = DiversityMeter(model)
    for _ in range(calls):
        sq_norms, of_sum = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
        assert of_sum == pytest.approx(expected_sum, rel=TOL)
        for p, g in zip(model.parameters(), expected_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


@pytest.fixture(params=fused.FUSED_METHODS)
def fused_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts backward passes through FusedWeightGrad (so a test knows the fused path really ran), with the
    timed decision forced to fuse (on these tiny layers the clock may prefer either path), by each fused
    method in turn (a Linear layer has only ``"gemm"``)."""
    forced = request.param
    monkeypatch.setattr(fused, "_fused_wins", lambda fused, hooks: True)
    monkeypatch.setattr(fused, "_fastest_fused", lambda seconds: forced if forced in seconds else "gemm")
    calls: list[int] = []
    original = fused.FusedWeightGrad.backward

    def counting(ctx, grad_output):
        calls.append(1)
        assert ctx.method == (forced if isinstance(ctx.module, (nn.Conv1d, nn.Conv2d)) else "gemm")
        return original(ctx, grad_output)

    monkeypatch.setattr(fused.FusedWeightGrad, "backward", staticmethod(counting))
    return calls


CONV_CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (3, 9)),
    "conv1d_stride2_dilation2_nobias": (lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2, bias=False), (3, 11)),
    "conv2d_rect_kernel_stride": (lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 7, 5)),
    "conv2d_groups2_dilation2": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (4, 6, 6)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 5, 1), (3, 4, 4)),
}


def _conv_model(case: str) -> tuple[nn.Module, tuple[int, ...]]:
    make, shape = CONV_CASES[case]
    torch.manual_seed(0)
    first = make()
    # the second layer takes the first's channels: its input gradient flows through a fused layer
    second = type(first)(first.out_channels, 5, 3, padding=1)
    model = nn.Sequential(first, nn.ReLU(inplace=True), second, nn.Tanh(), nn.Flatten())
    with torch.no_grad():
        features = model(torch.zeros(1, *shape)).shape[1]
    model.append(nn.Linear(features, 3))
    return model.double(), shape


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_fused_convolutions_match_torch_func_on_later_calls(case: str, fused_calls: list[int]) -> None:
    check_measured_calls(*_conv_model(case))
    assert len(fused_calls) == 4  # two conv layers, on the two unchecked calls


class SequenceNet(nn.Module):
    """Two Linear layers on sequences (fusable) and a 2-D head (never fused). ``time_first``: the first
    layer sees ``[T, B, d]`` (its batch on axis 1, so it is left to the hooks)."""

    def __init__(self, bias: bool = True, time_first: bool = False) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 5, bias=bias), nn.Linear(5, 6), nn.Linear(6, 3)
        self.time_first = time_first

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x.transpose(0, 1)).transpose(0, 1) if self.time_first else self.first(x)
        h = self.second(torch.relu_(h))
        return self.head(torch.tanh(h).flatten(1, -2).mean(1))


SEQUENCE_CASES = {  # model, input shape per sample, fused backward passes on the two unchecked calls
    "sequence": (lambda: SequenceNet(), (3, 4), 4),
    "sequence_no_bias_two_axes": (lambda: SequenceNet(bias=False), (2, 3, 4), 4),
    "sequence_batch_on_axis_1_inside": (lambda: SequenceNet(time_first=True), (3, 4), 2),
}


@pytest.mark.parametrize("case", sorted(SEQUENCE_CASES))
def test_fused_sequence_linear_layers_match_torch_func_on_later_calls(case: str, fused_calls: list[int]) -> None:
    make, shape, fused_passes = SEQUENCE_CASES[case]
    torch.manual_seed(5)
    check_measured_calls(make().double(), shape)
    assert len(fused_calls) == fused_passes


def test_a_2d_linear_layer_is_never_fused(fused_calls: list[int]) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    meter = DiversityMeter(model)
    for _ in range(3):
        step(meter, model, x, y)
    assert not fused_calls
    assert all(not any(fused.fused_decision(m).values()) for m in model if isinstance(m, nn.Linear))


def test_fused_path_is_not_a_no_op_a_dropped_bias_row_is_caught(monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]) -> None:
    """A plausible wrong variant of either fused method (per-sample gradients without the bias row, or
    per-sample bias gradients of zero) gives other norms, once the checked first call has chosen it."""
    model, shape = _conv_model("conv1d")
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected, _ = reference(model, x, y)
    meter = DiversityMeter(model)
    step(meter, model, x, y)
    original, grouped = fused.per_sample_weight_grads, fused._grouped_conv_grads
    monkeypatch.setattr(fused, "per_sample_weight_grads", lambda m, a, g, bias: original(m, a, g, False) if bias else original(m, a, g, bias))
    monkeypatch.setattr(fused, "_grouped_conv_grads", lambda m, a, g, bias: (lambda w, b: (w, b if b is None else torch.zeros_like(b)))(*grouped(m, a, g, bias)))
    with pytest.raises(Exception) as caught:  # wrong norms, or a shape error in the bias split: never the right number
        sq_norms, _ = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
    assert fused_calls and caught.type in (AssertionError, RuntimeError), caught.exconly()


@pytest.mark.parametrize("kind", ["conv", "sequence"])
def test_fused_input_gradient_is_autograds(kind: str, fused_calls: list[int]) -> None:
    torch.manual_seed(7)
    model, shape = _conv_model("conv2d_rect_kernel_stride") if kind == "conv" else (SequenceNet().double(), (3, 4))
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    leaf = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(leaf), y).backward()
    expected = leaf.grad.clone()
    meter = DiversityMeter(model)
    for _ in range(2):
        leaf.grad = None
        model.zero_grad(set_to_none=True)
        with meter:
            nn.functional.cross_entropy(model(leaf), y).backward()
        meter.result  # the first result passes the checks; the second call is fused
    assert fused_calls
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("case", "elements"), [("conv2d_groups2_dilation2", 600), ("conv1d_stride2_dilation2_nobias", 100)])
def test_fused_batch_chunks_are_exact(case: str, elements: int, monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]) -> None:
    """Several batch chunks per layer under both fused methods, with and without a bias. Elements per sample,
    im2col + GEMM and grouped convolution: 19·(6 + 36·2) = 1482, 55·(5 + 36) = 2255 and 19·6 + 4·36 = 258,
    55·5 + 6·36 = 491 in the first case (chunks of 600: one, one, two and one sample); 9·(4 + 6) = 90,
    12·(5 + 3) = 96 and 9·4 + 3·11 = 69, 12·5 + 4·6 = 84 in the second (chunks of 100: one sample each)."""
    from gradiv_lib.norms.engine import _FusedReport

    later_chunks: list[int] = []
    original = _FusedReport.__call__
    monkeypatch.setattr(fused, "_CACHE_CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(_FusedReport, "__call__", lambda report, grads, start: later_chunks.append(start) or original(report, grads, start))
    check_measured_calls(*_conv_model(case), batch=7, calls=2)
    assert len(fused_calls) == 2
    assert sum(start > 0 for start in later_chunks) >= 2 + 6, "both fused layers should have seen several chunks"


def test_fused_sequence_batch_chunks_are_exact(monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]) -> None:
    # 2 samples per chunk in the first layer ((4 + 1)·(5 + 3) = 40 elements per sample), 1 in the second
    monkeypatch.setattr(fused, "_CACHE_CHUNK_ELEMENTS", 100)
    torch.manual_seed(8)
    check_measured_calls(SequenceNet().double(), (3, 4), batch=7, calls=2)
    assert fused_calls


class MaybeTwice(nn.Module):
    """One layer applied once or twice (``twice``): its per-sample gradient is the sum over its uses;
    ``pool`` turns its output into the head's input."""

    def __init__(self, layer: nn.Module, head: nn.Module, pool: Callable[[Tensor], Tensor], twice: bool) -> None:
        super().__init__()
        self.layer, self.head, self.pool, self.twice = layer, head, pool, twice

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.layer(x))
        if self.twice:
            h = torch.tanh(self.layer(h))
        return self.head(self.pool(h))


def maybe_twice_conv(bias: bool = True) -> MaybeTwice:
    conv = nn.Conv1d(3, 3, 3, padding=1, bias=bias)
    return MaybeTwice(conv, nn.Linear(3 * 8, 2), lambda h: h.flatten(1), twice=True)


def test_a_convolution_called_twice_sums_per_sample_gradients_over_its_uses() -> None:
    torch.manual_seed(1)
    model = maybe_twice_conv().double()
    x, y = torch.randn(5, 3, 8, dtype=torch.float64), torch.randint(0, 2, (5,))
    expected, expected_sum = reference(model, x, y)
    meter = DiversityMeter(model)
    for _ in range(3):
        sq_norms, of_sum = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
        assert of_sum == pytest.approx(expected_sum, rel=TOL)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_a_fused_first_use_of_a_layer_used_twice_hands_over_its_per_sample_gradients(
    bias: bool, chunked: bool, monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]
) -> None:
    """Checked and fused with one use; then (same input signature) a forward pass that uses it twice: the
    fused first use must give its per-sample gradients (weight, and bias when the layer has one), to be
    summed with the second use's; ``chunked``: formed in batch chunks (concatenated for the hand-over)."""
    if chunked:  # im2col + GEMM: 10·(3 + 8) = 110 elements per sample, grouped: 10·3 + 24 = 54: 1-2 per chunk
        monkeypatch.setattr(fused, "_CACHE_CHUNK_ELEMENTS", 120)
    torch.manual_seed(1)
    model = maybe_twice_conv(bias).double()
    x, y = torch.randn(5, 3, 8, dtype=torch.float64), torch.randint(0, 2, (5,))
    model.twice = False
    meter = DiversityMeter(model)
    for _ in range(2):
        step(meter, model, x, y)
    model.twice = True
    expected, expected_sum = reference(model, x, y)
    fused_calls.clear()
    sq_norms, of_sum = step(meter, model, x, y)
    assert fused_calls
    torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
    assert of_sum == pytest.approx(expected_sum, rel=TOL)


def test_exact_grad_keeps_autograds_gradient_bit_for_bit(fused_calls: list[int]) -> None:
    model, shape = _conv_model("conv2d_groups2_dilation2")
    model = model.float()
    x, y = torch.randn(6, *shape), torch.randint(0, 3, (6,))
    expected = autograd_grads(model, x, y)
    meter = DiversityMeter(model, exact_grad=True)
    for _ in range(3):
        step(meter, model, x, y)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
    assert not fused_calls


def test_second_derivatives_through_a_fused_convolution_raise(fused_calls: list[int]) -> None:
    model, shape = _conv_model("conv1d")  # fusing forced: left to the clock, the layer may keep the hooks
    x, y = torch.randn(4, *shape, dtype=torch.float64), torch.randint(0, 3, (4,))
    meter = DiversityMeter(model)
    step(meter, model, x, y)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        with meter:
            loss = nn.functional.cross_entropy(model(x), y)
            (g,) = torch.autograd.grad(loss, [model[0].weight], create_graph=True)
            g.square().sum().backward()


def test_fused_path_is_skipped_under_reflect_padding_and_half_precision(fused_calls: list[int]) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(18, 2)).double()
    x, y = torch.randn(5, 2, 6, dtype=torch.float64), torch.randint(0, 2, (5,))
    expected, _ = reference(model, x, y)
    meter = DiversityMeter(model)
    for _ in range(2):
        sq_norms, _ = step(meter, model, x, y)
    torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
    assert not fused_calls


# --- reading .grad at the end of the backward pass -------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(n: int = 7) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


def test_clipping_inside_the_measurement_does_not_change_the_result() -> None:
    """The gradient is read when the backward pass ends, before the user's code modifies .grad."""
    model, (x, y) = _mlp(), _batch()
    expected, expected_sum = reference(model, x, y)
    meter = DiversityMeter(model)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with meter:
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        assert meter.result.sq_norm_of_sum == pytest.approx(expected_sum, rel=TOL)
        torch.testing.assert_close(meter.sq_norms, expected, rtol=TOL, atol=0.0)


def test_gradients_already_in_grad_use_the_parameter_hooks() -> None:
    model, (x, y) = _mlp(), _batch()
    _, expected_sum = reference(model, x, y)
    meter = DiversityMeter(model)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[:3]), y[:3]).backward()  # an earlier micro-batch
        with meter:
            nn.functional.cross_entropy(model(x), y).backward()
        assert meter._engine._parameter_handles == []  # removed after the measurement
        assert meter.result.sq_norm_of_sum == pytest.approx(expected_sum, rel=TOL)


def test_a_hook_that_consumes_grad_after_accumulation_uses_the_parameter_hooks() -> None:
    """Optimizer-in-backward style: a post-accumulate hook empties .grad; reading it would see nothing."""
    model, (x, y) = _mlp(), _batch()
    _, expected_sum = reference(model, x, y)
    handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()]
    meter = DiversityMeter(model)
    for _ in range(2):
        with meter:
            nn.functional.cross_entropy(model(x), y).backward()
        assert meter.result.sq_norm_of_sum == pytest.approx(expected_sum, rel=TOL)
    for handle in handles:
        handle.remove()


def test_two_backward_passes_in_one_measurement_are_refused() -> None:
    model, (x, y) = _mlp(), _batch()
    meter = DiversityMeter(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with meter:
            nn.functional.cross_entropy(model(x), y).backward()
        meter.result
    model.zero_grad(set_to_none=True)
    with meter:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
    with pytest.raises(RuntimeError, match="2 backward passes"):
        meter.result
    model.zero_grad(set_to_none=True)
    with meter:
        nn.functional.cross_entropy(model(x[:3]), y[:3]).backward()
        nn.functional.cross_entropy(model(x[3:6]), y[3:6]).backward()
    with pytest.raises(RuntimeError, match="backward passes"):
        meter.result


def test_autograd_grad_inside_the_meter_is_refused_with_the_way_out() -> None:
    model, (x, y) = _mlp(), _batch()
    meter = DiversityMeter(model)
    with meter:
        torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    with pytest.raises(RuntimeError, match="per_sample_sq_norms"):
        meter.result


def test_backward_restricted_to_some_parameters_is_refused() -> None:
    model, (x, y) = _mlp(), _batch()
    meter = DiversityMeter(model)
    for accumulate in (False, True):  # reading .grad, and the parameter hooks
        model.zero_grad(set_to_none=True)
        if accumulate:
            nn.functional.cross_entropy(model(x), y).backward()
        with meter:
            nn.functional.cross_entropy(model(x), y).backward(inputs=[model[0].weight])
        with pytest.raises(ValueError, match="no gradient"):
            meter.result


def test_the_timed_decision_keeps_the_hook_path_when_it_is_faster(monkeypatch: pytest.MonkeyPatch, fused_calls: list[int]) -> None:
    monkeypatch.setattr(fused, "_fused_wins", lambda fused, hooks: False)
    model, shape = _conv_model("conv1d")
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected, _ = reference(model, x, y)
    meter = DiversityMeter(model)
    for _ in range(3):
        sq_norms, _ = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
    assert not fused_calls
    assert set(fused.fused_decision(model[0]).values()) == {False}


def test_parameters_frozen_after_building_are_left_out_and_unfrozen_ones_are_refused() -> None:
    model, (x, y) = _mlp(), _batch()
    meter = DiversityMeter(model)
    step(meter, model, x, y)
    model[0].weight.requires_grad_(False)  # frozen after building: its gradient is simply not measured
    expected, expected_sum = reference(model, x, y)
    sq_norms, of_sum = step(meter, model, x, y)
    torch.testing.assert_close(sq_norms, expected, rtol=TOL, atol=0.0)
    assert of_sum == pytest.approx(expected_sum, rel=TOL)
    model[0].weight.requires_grad_(True)
    frozen_first = _mlp()
    frozen_first[0].requires_grad_(False)
    late = DiversityMeter(frozen_first)
    frozen_first[0].requires_grad_(True)  # unfrozen after building: the meter would leave it out
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] were frozen .* Build a new meter"):
        step(late, frozen_first, x, y)


def test_the_timed_decision_times_the_fused_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """decide() must time the real fused work: made slow, it loses against autograd's weight gradient."""
    import time

    original = fused.summed_per_sample_grads

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "summed_per_sample_grads", slow)
    model, shape = _conv_model("conv1d")
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    step(DiversityMeter(model), model, x, y)
    assert set(fused.fused_decision(model[0]).values()) == {False}


class ConvOnly(nn.Module):
    """Convolutions only (the logits are a spatial mean): every layer with parameters is fused, so the
    fused path alone must trigger the end-of-backward read of .grad."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x))).mean((2, 3))


def test_a_network_of_fused_convolutions_only(fused_calls: list[int]) -> None:
    torch.manual_seed(4)
    check_measured_calls(ConvOnly().double(), (2, 6, 6), batch=5)
    assert len(fused_calls) == 4


def test_fused_decision_of_a_layer_never_timed_is_empty() -> None:
    assert fused.fused_decision(nn.Linear(2, 2)) == {}


@pytest.mark.parametrize("bias", [True, False])
def test_a_fused_sequence_linear_layer_then_used_twice_hands_over_its_per_sample_gradients(bias: bool, fused_calls: list[int]) -> None:
    """Checked and fused with one use; then a forward pass that uses it twice (the per-sample gradients of
    the fused use, split into weight and bias, are summed with the second use's)."""
    torch.manual_seed(9)
    model = MaybeTwice(nn.Linear(4, 4, bias=bias), nn.Linear(4, 3), lambda h: h.mean(1), twice=False).double()
    check_measured_calls(model, (3, 4))
    assert len(fused_calls) == 2
    model.twice = True
    fused_calls.clear()
    check_measured_calls(model, (3, 4), calls=1)  # same input signature: no new check, the first use is fused
    assert fused_calls


def test_the_timed_decision_runs_each_paths_real_work_and_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """decide() with a scripted clock: every candidate it times does its path's real work (the hooks'
    norms and autograd's weight and bias gradients; each fused method's summed per-sample gradients),
    the faster fused method is weighed against the hooks, and a tie keeps the hooks."""
    from gradiv_lib.norms import rules

    torch.manual_seed(9)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x, g = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randn(5, 4, 6, 6, dtype=torch.float64)
    per_sample = [torch.autograd.grad(conv(x[i : i + 1]), (conv.weight, conv.bias), g[i : i + 1]) for i in range(5)]
    expected_norms = torch.stack([w.square().sum() + b.square().sum() for w, b in per_sample])
    expected_weight, expected_bias = sum(w for w, _ in per_sample), sum(b for _, b in per_sample)
    rules._conv_sq_norms(conv, x, g, "auto")  # the checked call's rule: chooses the hooks' norm method
    ran: dict[str, object] = {}
    timings: dict[str, float] = {}

    def scripted(candidates, device, rounds):
        ran.update({name: run() for name, run in candidates.items()})
        return dict(timings), dict(ran)

    formed: list[str] = []
    for name in ("per_sample_weight_grads", "_grouped_conv_grads"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *args, _name=name, _original=original, **kwargs: formed.append(_name) or _original(*args, **kwargs))
    monkeypatch.setattr(fused, "time_interleaved", scripted)
    cases = [
        ({"hooks": 3.0, "gemm": 2.0, "grouped_conv": 1.0}, "grouped_conv"),
        ({"hooks": 3.0, "gemm": 1.0, "grouped_conv": 2.0}, "gemm"),
        ({"hooks": 1.0, "gemm": 1.0, "grouped_conv": 2.0}, False),  # a tie keeps autograd's own gradient
        ({"hooks": 0.5, "gemm": 1.0, "grouped_conv": 2.0}, False),
    ]
    for scripted_timings, decision in cases:
        timings.clear(), timings.update(scripted_timings), ran.clear(), formed.clear()
        fused._decisions.pop(conv, None)
        fused.decide(conv, x, g, "auto")
        assert list(fused.fused_decision(conv).values()) == [decision]
        assert set(ran) == {"hooks", "gemm", "grouped_conv"}
        assert sorted(formed) == ["_grouped_conv_grads", "per_sample_weight_grads"]  # each method its own way
        norms, (grad_input, weight, bias) = ran["hooks"]
        assert grad_input is None  # the hooks path is timed on the work fusing replaces, not the input gradient
        torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0.0)
        for got_weight, got_bias in (ran["gemm"], ran["grouped_conv"], (weight, bias)):
            torch.testing.assert_close(got_weight, expected_weight, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_bias, expected_bias, rtol=1e-10, atol=1e-12)


def test_a_batch_size_never_timed_is_left_to_the_hooks(fused_calls: list[int]) -> None:
    """Fusing follows the timing of each shape: after the checked calls at B = 6, a batch of 4 (same input
    signature, so no new check) is not fused, and is still exact."""
    model, shape = _conv_model("conv1d")
    meter = DiversityMeter(model)
    for batch in (6, 6, 4):
        x, y = torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))
        fused_calls.clear()
        sq_norms, _ = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), reference(model, x, y)[0], rtol=TOL, atol=0.0)
    assert not fused_calls
    assert all(key[0][0] == 6 for key in fused.fused_decision(model[0]))


def test_the_timed_decision_of_a_sequence_linear_layer_runs_the_real_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a Linear layer on sequences: its only fused method, and the hooks' norms with autograd's
    weight and bias gradients."""
    torch.manual_seed(10)
    layer = nn.Linear(4, 3).double()
    x, g = torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(5, 6, 3, dtype=torch.float64)
    per_sample = [torch.autograd.grad(layer(x[i]), (layer.weight, layer.bias), g[i]) for i in range(5)]
    expected_norms = torch.stack([w.square().sum() + b.square().sum() for w, b in per_sample])
    expected_weight, expected_bias = sum(w for w, _ in per_sample), sum(b for _, b in per_sample)
    ran: dict[str, object] = {}

    def scripted(candidates, device, rounds):
        ran.update({name: run() for name, run in candidates.items()})
        return {"hooks": 2.0, "gemm": 1.0}, dict(ran)

    monkeypatch.setattr(fused, "time_interleaved", scripted)
    fused.decide(layer, x, g, "auto")
    assert set(ran) == {"hooks", "gemm"} and list(fused.fused_decision(layer).values()) == ["gemm"]
    norms, weight, bias = ran["hooks"]
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0.0)
    for got_weight, got_bias in (ran["gemm"], (weight, bias)):
        torch.testing.assert_close(got_weight, expected_weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_bias, expected_bias, rtol=1e-10, atol=1e-12)


def test_a_users_hook_on_a_fused_layers_output_keeps_firing_with_autograds_gradient(fused_calls: list[int]) -> None:
    """A tensor hook the user puts on a convolution's output from a forward hook must see every backward
    pass, with the gradient it sees without the meter. The meter's forward hook runs first (prepended), so
    the user's hook is put on the fused layer's output, and both convolutions are fused."""
    model, shape = _conv_model("conv2d_1x1")
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected, _ = reference(model, x, y)
    seen: list[Tensor] = []

    def watch(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if output.requires_grad:  # not in the meter's probe, which runs without autograd
            output.register_hook(seen.append)

    model[0].register_forward_hook(watch)
    model.zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(model(x), y).backward()
    unmeasured = seen.pop()
    meter = DiversityMeter(model)
    for calls in range(1, 4):
        sq_norms, _ = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
        assert len(seen) == calls
        torch.testing.assert_close(seen[-1], unmeasured, rtol=1e-12, atol=0.0)
    assert len(fused_calls) == 4  # both convolutions, on the two unchecked calls


@pytest.mark.parametrize("options", [{"check": "every_call"}, {"exact_grad": True}])
def test_a_meter_that_checks_every_call_or_keeps_autograds_gradient_never_fuses(options: dict, fused_calls: list[int]) -> None:
    """Fusing is decided per layer and shape, but a meter that runs the gradient-sum check on every call
    (which the fused path would bypass) or that promises autograd's own gradient must not use it, even
    once another meter on the same model has decided to fuse."""
    model, shape = _conv_model("conv1d")
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    fusing = DiversityMeter(model)
    for _ in range(2):
        step(fusing, model, x, y)
    assert fused_calls, "the default meter fuses these layers"
    fused_calls.clear()
    meter = DiversityMeter(model, **options)
    expected, _ = reference(model, x, y)
    expected_grads = autograd_grads(model, x, y)
    for _ in range(2):
        sq_norms, _ = step(meter, model, x, y)
        torch.testing.assert_close(sq_norms.double(), expected, rtol=TOL, atol=0.0)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected_grads))
    assert not fused_calls
