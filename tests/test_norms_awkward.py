"""Awkward held-out models: the engine must give the torch.func norms or raise, never a silent wrong number."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_norms_harness import assert_norms_close, reference_sq_norms
from torch import Tensor, nn

from gradiv_lib.diversity import gradient_diversity
from gradiv_lib.norms import DiversityMeter, PerSampleNormEngine, per_sample_sq_norms, per_sample_sq_norms_and_grad_sum

B = 4


@pytest.fixture(autouse=True)
def _quiet() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallback's one-time notice
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one torch thread for the whole module (tests/conftest.py)."""


def check(model: nn.Module, x: Tensor, y: Tensor, *, loop: bool = False, reduction: str = "mean", **options: object) -> None:
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    got, _, _ = per_sample_sq_norms_and_grad_sum(model, loss_fn, x, y, **options)
    assert_norms_close(got, reference_sq_norms(model, loss_fn, x, y, loop=loop), 1e-6)


def check_function_and_meter(model: nn.Module, x: Tensor, y: Tensor, check_mode: str, *, loop: bool = False) -> None:
    """The function and two calls of one meter, all equal to torch.func's norms (to 1e-10), with ``check_mode``."""
    loss_fn = nn.CrossEntropyLoss()
    expected = reference_sq_norms(model, loss_fn, x, y, loop=loop)
    assert_norms_close(per_sample_sq_norms(model, loss_fn, x, y, check=check_mode), expected, 1e-10)
    check_meter_calls(model, (x,), y, expected, check_mode)


def check_meter_calls(model: nn.Module, args: tuple[Tensor, ...], y: Tensor, expected: Tensor, check_mode: str, calls: int = 2) -> DiversityMeter:
    """``calls`` measurements of one meter around ``cross_entropy(model(*args), y)``, each equal to ``expected``."""
    meter = DiversityMeter(model, check=check_mode)
    for _ in range(calls):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(*args), y).backward()
        assert_norms_close(meter.sq_norms, expected, 1e-10)
    return meter


class MatmulTiedLM(nn.Module):
    """Output head ``h @ embed.weight.T``: the second use of the embedding never reaches a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, ids: Tensor) -> Tensor:
        return (self.norm(self.embed(ids)) @ self.embed.weight.T).mean(1)


class SeqFirstAttention(nn.Module):
    """Batch-first model running nn.MultiheadAttention(batch_first=False) on a (T, B, E) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.attention = nn.MultiheadAttention(4, 2)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).transpose(0, 1)  # (T, B, E)
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0])
        return self.head(h.mean(0))


class LSTMClassifier(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(9, 3)
        self.lstm = nn.LSTM(3, 5, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids if self.batch_first else ids.T)
        _, (h_n, _) = self.lstm(h)
        return self.head(h_n[-1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.position = nn.Embedding(B, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.head(self.encoder(self.embed(ids) + self.position(positions)).mean(1))


class BroadcastPositions(Encoder):
    """Positions looked up once, (T, D), and broadcast over the batch: per-sample gradients of the
    position table are lost before any hook sees them."""

    def forward(self, ids: Tensor) -> Tensor:
        positions = self.position(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.encoder(self.embed(ids) + positions).mean(1))


class FunctionalReuse(nn.Module):
    """``a.weight`` used by its module and again through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)) + F.linear(x, self.a.weight))


class Centre(nn.Module):
    """A custom layer that subtracts the batch mean: it mixes samples."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0)) * self.scale


class NoisyInEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x) + 0.1 * torch.randn(x.shape[0], 3, dtype=x.dtype))


def classes(count: int = 3) -> Tensor:
    return torch.randint(0, count, (B,))


# --- right --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_internal_sequence_first_attention_with_T_equal_B(reduction: str) -> None:
    check(SeqFirstAttention().double(), torch.randn(B, B, 3, dtype=torch.float64), classes(), reduction=reduction)


def test_meter_on_internal_sequence_first_attention() -> None:
    model = SeqFirstAttention().double()
    criterion = nn.CrossEntropyLoss()
    for _ in range(3):
        x, y = torch.randn(B, B, 3, dtype=torch.float64), classes()
        with DiversityMeter(model, loss_reduction="mean") as meter:
            criterion(model(x), y).backward()
        assert_norms_close(meter.sq_norms, reference_sq_norms(model, criterion, x, y), 1e-6)
        assert meter.result.diversity == pytest.approx(gradient_diversity(model, criterion, x, y).diversity, rel=1e-9)
        model.zero_grad()


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_classifier(batch_first: bool) -> None:
    check(LSTMClassifier(batch_first).double(), torch.randint(0, 9, (B, B)), classes(), loop=True)


def test_transformer_encoder() -> None:
    check(Encoder().double(), torch.randint(0, 11, (B, B)), classes())


# --- loud ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["function", "meter"])
def test_embedding_reused_as_output_head_by_matmul_is_refused(entry: str) -> None:
    """Both entry points: the function (gradients read by parameter hooks) and the meter (gradients read
    from .grad when the backward pass ends, where the check compares against a copy of .grad)."""
    model, x, y = MatmulTiedLM().double(), torch.randint(0, 7, (B, 5)), classes(7)
    with pytest.raises(ValueError, match=r"parameter 'embed\.weight' received a gradient that the per-sample hooks do not explain.*x @ embed\.weight\.T"):
        if entry == "function":
            per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y)
        else:
            model.zero_grad(set_to_none=True)
            with DiversityMeter(model) as meter:
                nn.functional.cross_entropy(model(x), y).backward()
            meter.result


class AttentionWeightReused(nn.Module):
    """The attention's output projection weight used again through F.linear, outside the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        attended = self.attention(h, h, h, need_weights=False)[0]
        return self.head((attended + F.linear(h, self.attention.out_proj.weight)).mean(1))


def test_an_attention_weight_also_used_outside_the_layer_is_refused() -> None:
    """The attention rule hands its per-sample gradient sums to the first call's gradient check too."""
    with pytest.raises(ValueError, match=r"parameter 'attention\.out_proj\.weight' received a gradient"):
        per_sample_sq_norms(AttentionWeightReused().double(), nn.CrossEntropyLoss(), torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))


def test_parameter_also_used_through_a_functional_call_is_refused() -> None:
    with pytest.raises(ValueError, match=r"parameter 'a\.weight' received a gradient"):
        per_sample_sq_norms(FunctionalReuse().double(), nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


def test_positions_broadcast_over_the_batch_are_refused() -> None:
    with pytest.raises(ValueError, match=r"layer 'position' \(Embedding\): its input is the same for every sample.*expand"):
        per_sample_sq_norms(BroadcastPositions().double(), nn.CrossEntropyLoss(), torch.randint(0, 11, (B, B)), classes())


def test_custom_layer_that_mixes_samples_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Centre(), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match=r"layer '1' \(Centre\): its output 0 changes .* mixes samples"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


def test_noise_drawn_in_eval_mode_is_reported_with_the_way_out() -> None:
    model = NoisyInEval().double()
    with pytest.raises(ValueError, match=r"layer 'b' \(Linear\): its input changes .* mixes samples.*check='off'"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


def test_without_the_probe_an_ambiguous_batch_axis_is_refused() -> None:
    model = SeqFirstAttention().double()
    with pytest.raises(ValueError, match=r"layer '\w+' \(\w+\): its output has shape \(4, 4, 4\), with several axes of size B = 4"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), torch.randn(B, B, 3, dtype=torch.float64), classes(), check="off")


def test_batch_on_a_norm_layers_channel_axis_is_refused() -> None:
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(B).eval()
            self.head = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:  # samples on the channel axis: (1, B, L)
            return self.head(self.norm(x.unsqueeze(0)).squeeze(0))

    with pytest.raises(ValueError, match=r"layer 'norm' \(BatchNorm1d\) sees the samples along axis 1.*needs them along one of the first 1 axes"):
        per_sample_sq_norms(Swapped().double(), nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


# --- cost: the checks run once per model and input signature ----------------------------------------------


def test_probe_and_gradient_check_run_on_the_first_call_only() -> None:
    model = SeqFirstAttention().double()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    criterion = nn.CrossEntropyLoss()
    for step in range(3):
        engine = PerSampleNormEngine(model)
        with engine:
            criterion(model(torch.randn(B, B, 3, dtype=torch.float64)), classes()).backward()
        engine.sq_norms()
        assert engine._verify == (step == 0)
        model.zero_grad()
    # three measured steps, plus the probe's forward passes once: three in eval mode, two in the model's training mode
    assert len(calls) == 3 + 3 + 2
    engine = PerSampleNormEngine(model, check="every_call")
    with engine:
        criterion(model(torch.randn(B, B, 3, dtype=torch.float64)), classes()).backward()
    assert len(calls) == 8 + 1 + 5 and engine._verify  # one more step, probed again
    model.eval()
    engine = PerSampleNormEngine(model, check="every_call")
    with engine:
        criterion(model(torch.randn(B, B, 3, dtype=torch.float64)), classes()).backward()
    assert len(calls) == 14 + 1 + 3  # in eval mode, no training-mode pair


# --- declared loss reduction ---------------------------------------------------------------------------------


def test_meter_warns_when_a_summed_cross_entropy_is_declared_a_mean() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with DiversityMeter(model, loss_reduction="mean") as meter:
            nn.CrossEntropyLoss()(model(x), y).backward()
        meter.result  # a true mean: no warning
    with DiversityMeter(model, loss_reduction="mean") as meter:
        nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    with pytest.warns(UserWarning, match=r"loss is probably a sum over samples .* declare loss_reduction='sum'"):
        meter.result


@pytest.mark.parametrize("weighting", ["class_weights", "ignore_index"])
def test_meter_on_a_mean_that_is_not_over_samples_measures_the_terms_of_that_mean(weighting: str) -> None:
    """The documented behaviour (meter.py): a class-weighted or ``ignore_index`` "mean" divides by Σ w_{y_j}
    (or the targets kept), so the meter measures ℓ̃_i = B w_{y_i} ℓ_i / Σ_j w_{y_j}, not the unweighted ℓ_i,
    and the function, which sees the loss, refuses it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 1, 0])
    if weighting == "class_weights":
        w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        loss_fn, weights = nn.CrossEntropyLoss(weight=w), w[y]
    else:
        loss_fn, weights = nn.CrossEntropyLoss(ignore_index=2), (y != 2).double()
    unweighted = reference_sq_norms(model, nn.CrossEntropyLoss(), x, y)
    with DiversityMeter(model, loss_reduction="mean") as meter:
        loss_fn(model(x), y).backward()
    assert_norms_close(meter.sq_norms, (6 * weights / weights.sum()) ** 2 * unweighted, 1e-12)
    assert float((meter.sq_norms - unweighted).abs().max()) > 0.1 * float(unweighted.max())  # not the unweighted ℓ_i
    with pytest.raises(ValueError, match="neither the sum .* nor the mean"):
        per_sample_sq_norms(model, loss_fn, x, y)


class CellLoop(nn.Module):
    """An LSTMCell stepped over time: on the CPU its h = o·tanh(c) is computed from its other output c."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.LSTMCell(3, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = c = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class DependentOutputs(nn.Module):
    """A layer (no rule: the torch.func fallback) whose second output is computed from its first."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.weight, self.same = nn.Parameter(torch.randn(3, 5)), same

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.tanh(x @ self.weight)
        return (a, a) if self.same else (a, a * a)


class UsesBothOutputs(nn.Module):
    def __init__(self, same: bool) -> None:
        super().__init__()
        self.layer, self.head = DependentOutputs(same), nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat(self.layer(x), 1))


@pytest.mark.parametrize("check_mode", ["first_call", "off"])
@pytest.mark.parametrize("case", ["lstm_cell_loop", "second_from_first", "same_tensor_twice"])
def test_a_layer_whose_outputs_depend_on_each_other(case: str, check_mode: str) -> None:
    """The gradient reaching an output used inside the layer too includes the inner path; measured on
    copies of the outputs, each gets the outside uses' gradient only (once refused, or silently wrong
    with check='off')."""
    if case == "lstm_cell_loop":
        model, x = CellLoop().double(), torch.randn(B, 3, 3, dtype=torch.float64)
    else:
        model, x = UsesBothOutputs(case == "same_tensor_twice").double(), torch.randn(B, 3, dtype=torch.float64)
    check_function_and_meter(model, x, classes(), check_mode, loop=case == "lstm_cell_loop")


class PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        lengths = torch.tensor([4, 3, 4, 2])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_a_packed_sequence_is_refused_with_the_padded_way_out() -> None:
    x = torch.randn(B, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 'rnn' \(GRU\) was called on a PackedSequence.*padded batch"):
        per_sample_sq_norms(PackedGRU().double(), nn.CrossEntropyLoss(), x, classes())


class SplitCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([torch.tanh(self.layer(part)) for part in x.split(2)]))


def test_a_layer_called_on_slices_of_the_batch_is_refused_with_the_way_out() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer' \(Linear\) received a tensor of shape \(2, 3\).*nor split over several calls"):
        per_sample_sq_norms(SplitCalls().double(), nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


def test_meter_divides_out_a_grad_scalers_scale() -> None:
    """scaler.scale(loss).backward() carries S·L: without grad_scaler the norms are S² too large (Δ is not)
    and the summed-loss check fired on a true mean; with it they equal the unscaled step's."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    with DiversityMeter(model) as meter:
        nn.CrossEntropyLoss()(model(x), y).backward()
    plain = meter.result
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "loss is probably a sum" warning
        with DiversityMeter(model, grad_scaler=scaler) as meter:
            scaler.scale(nn.CrossEntropyLoss()(model(x), y)).backward()
        scaled = meter.result
    assert scaled.sum_sq_norms == pytest.approx(plain.sum_sq_norms, rel=1e-5)
    assert scaled.sq_norm_of_sum == pytest.approx(plain.sq_norm_of_sum, rel=1e-5)
    with DiversityMeter(model) as meter:
        scaler.scale(nn.CrossEntropyLoss()(model(x), y)).backward()
    assert meter.result.sum_sq_norms == pytest.approx(1024.0**2 * plain.sum_sq_norms, rel=1e-5)
    assert meter.result.diversity == pytest.approx(plain.diversity, rel=1e-5)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        DiversityMeter(model, grad_scaler=1024.0)


class Stateful(nn.Module):
    """A forward pass that updates buffers: a step counter, an EMA of its inputs (in place) and a queue of
    features (replaced), as in MoCo-style memories."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(3))
        self.register_buffer("queue", torch.zeros(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        self.queue = torch.cat([self.queue[1:], x.detach().mean(0, keepdim=True)])
        return self.head(torch.tanh(self.layer(x)))


def test_the_probes_extra_forward_passes_leave_the_models_buffers_as_one_pass_does() -> None:
    """The first measured call probes the batch axes with three more forward passes; they advanced the
    counter to 4 and moved the EMA and the queue three more times, silently."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    measured, plain = Stateful().double(), Stateful().double()
    plain.load_state_dict(measured.state_dict())
    with DiversityMeter(measured) as meter:
        nn.CrossEntropyLoss()(measured(x), y).backward()
    plain(x)
    assert float(measured.calls) == 1.0
    torch.testing.assert_close(measured.ema, plain.ema, rtol=0, atol=0)
    torch.testing.assert_close(measured.queue, plain.queue, rtol=0, atol=0)
    assert bool(torch.isfinite(meter.sq_norms).all())
    stateful = Stateful().double()
    per_sample_sq_norms(stateful, nn.CrossEntropyLoss(), x, y)
    assert float(stateful.calls) == 1.0


class ShrinksItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.layer.weight.mul_(0.999)
        return self.layer(x)


def test_a_forward_pass_that_changes_a_parameter_in_place_is_refused_by_the_probe() -> None:
    """Each probe pass saw other weights (it was reported as mixing samples) and the change cannot be undone."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"forward pass changes parameters \['layer.weight'\] in place.*check='off'"):
        per_sample_sq_norms(ShrinksItsWeight().double(), nn.CrossEntropyLoss(), x, y)
    per_sample_sq_norms(ShrinksItsWeight().double(), nn.CrossEntropyLoss(), x, y, check="off")  # the way out


class GRUHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _with_user_hook(case: str) -> tuple[nn.Module, Tensor, bool]:
    if case.startswith("fallback"):
        model, x = GRUHead().double(), torch.randn(6, 5, 3, dtype=torch.float64)
        if case == "fallback_pre_hook":
            model.rnn.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
        else:
            model.rnn.register_forward_hook(lambda module, args, out: (out[0] * 2 + 0.5, out[1]))
        return model, x, True
    model, x = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double(), torch.randn(6, 3, dtype=torch.float64)
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    model[0].register_forward_hook(lambda module, args, out: out.tanh())
    return model, x, False


@pytest.mark.parametrize("check_mode", ["first_call", "off"])
@pytest.mark.parametrize("case", ["rule_layer_hooks", "fallback_pre_hook", "fallback_output_hook"])
def test_a_users_forward_hooks_on_a_measured_layer(case: str, check_mode: str) -> None:
    """A user's forward hook that replaces a layer's output ran before the engine's, which then took the
    gradient at the replacement; the fallback's recomputation applied the layer's own pre-hooks and hooks
    a second time. The first two cases were refused with the check on and silently wrong with check='off';
    the third is what prepending the engine's hook alone would have broken."""
    model, x, loop = _with_user_hook(case)
    check_function_and_meter(model, x, torch.randint(0, 3, (6,)), check_mode, loop=loop)


def test_gradient_check_tolerates_cancelling_samples_at_a_minimum() -> None:
    """Two samples with opposite gradients: ∇L is rounding noise, the per-sample norms are not."""
    model = nn.Linear(3, 1, bias=False)
    x = torch.randn(1, 3).repeat(2, 1)
    with torch.no_grad():
        prediction = model(x[:1])
    y = torch.cat([prediction - 1.0, prediction + 1.0])
    sq_norms, sq_norm_of_sum, _ = per_sample_sq_norms_and_grad_sum(model, nn.MSELoss(reduction="sum"), x, y, check="every_call")
    torch.testing.assert_close(sq_norms, (2 * x).square().sum(1))
    assert float(sq_norm_of_sum) < 1e-8 * float(sq_norms.sum())


class InPlaceAfterSequenceLinear(nn.Module):
    """``F.linear`` on [B, T, d] returns a view of its 2-D product; an in-place op on it (``relu_``, ``+=``)
    re-bases the view and drops hooks registered on it (once refused as "used outside its module")."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.first(x), inplace=True)
        h = self.second(h)
        h += 1.0
        return self.head(torch.tanh(h).mean(1))


def test_in_place_ops_on_a_sequence_linear_output() -> None:
    model = InPlaceAfterSequenceLinear().double()
    x, y = torch.randn(B, 5, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    check(model, x, y)
    expected = reference_sq_norms(model, nn.CrossEntropyLoss(), x, y)
    meter = DiversityMeter(model, exact_grad=True)  # the hooks on every call (no fused layers)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x), y).backward()
        assert_norms_close(meter.sq_norms, expected, 1e-6)


class ViewOutput(nn.Module):
    """A layer without a rule (the torch.func fallback) whose output is a view of its product."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5))

    def forward(self, x: Tensor) -> Tensor:
        return (x.reshape(-1, 4) @ self.weight).view(x.shape[0], -1, 5)


def test_an_in_place_op_that_drops_a_fallback_layers_hook_is_named() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.custom, self.head = ViewOutput(), nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.custom(x)
            h.relu_()
            return self.head(h.mean(1))

    model = Net().double()
    x, y = torch.randn(B, 3, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    with pytest.raises(ValueError, match=r"'custom' \(ViewOutput\) ran in the forward pass .* in-place operation"):
        with DiversityMeter(model) as meter:
            F.cross_entropy(model(x), y).backward()
        meter.result


class ScaleWithSide(nn.Module):
    """A layer without a rule and two outputs, the scaled input and a side output that the loss may ignore."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scaled = x * self.scale
        return scaled, scaled.square().sum(1)


class SideIgnored(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.custom, self.head = nn.Linear(3, 3), ScaleWithSide(), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        main, _ = self.custom(torch.tanh(self.a(x)))
        return self.head(main)


@pytest.mark.parametrize("check_mode", ["first_call", "off"])
def test_a_fallback_layers_output_that_gets_no_gradient(check_mode: str) -> None:
    """Without the probe (check='off') the fallback reads the batch axis of each output from its shape,
    only for the outputs that received a gradient."""
    check(SideIgnored().double(), torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)), check=check_mode)


def test_layers_called_one_by_one_inside_the_meter() -> None:
    """The model's layers called directly instead of the model: the batch size comes from the first
    layer's input, and each axis from the shapes (B = 5 is no other axis's size)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    criterion = nn.CrossEntropyLoss()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with DiversityMeter(model) as meter:
            h = x
            for layer in model:
                h = layer(h)
            criterion(h, y).backward()
        assert_norms_close(meter.sq_norms, reference_sq_norms(model, criterion, x, y), 1e-6)


class RollAcrossBatch(nn.Module):
    """A layer without a rule whose output mixes samples in a way no axis explains (a roll along the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + x.roll(1, 0)


def test_a_fallback_layers_output_that_mixes_samples_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), RollAcrossBatch()).double()
    with pytest.raises(ValueError, match=r"layer '1' \(RollAcrossBatch\): its output 0 changes .* mixes samples"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


class MixesBetweenLayers(nn.Module):
    """Per-sample layers with a functional op between them that mixes samples yet is equivariant to any
    permutation of the batch, so a permutation alone cannot expose it."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.mix, self.a, self.b = mix, nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.mix == "centre":
            h = h - h.mean(0, keepdim=True)
        elif self.mix == "softmax_over_batch":
            h = h * torch.softmax(h, 0)
        elif self.mix == "roll":
            h = h + 0.5 * h.roll(1, 0)
        out = self.b(h)
        return out - out.mean(0, keepdim=True) if self.mix == "centre_output" else out


@pytest.mark.parametrize("mix", ["centre", "softmax_over_batch", "roll"])
def test_functional_ops_that_mix_samples_between_layers_are_refused(mix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the probe's sample-replacement run sees these: without it the norms came out 20-70 % off
    vmap(grad)'s with no error (the roll probe sees an equivariant tensor, and the gradient-sum check
    passes because the per-sample terms still add up to the batch gradient)."""
    from gradiv_lib.norms import batch_axes

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"layer 'b' \(Linear\): its input changes .* one sample is replaced, so it mixes samples"):
        per_sample_sq_norms(MixesBetweenLayers(mix).double(), nn.CrossEntropyLoss(), x, y)
    monkeypatch.setattr(batch_axes, "replaced_inputs", lambda args, kwargs, batch_size: None)
    per_sample_sq_norms(MixesBetweenLayers(mix).double(), nn.CrossEntropyLoss(), x, y)  # silent without it


def test_mixing_after_the_last_layer_is_refused_on_every_call() -> None:
    """No layer sees the mixing, the model's output does; the probe runs once, the refusal on every call."""
    model = MixesBetweenLayers("centre_output").double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    meter = DiversityMeter(model)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"the output of MixesBetweenLayers \(leaf 0 of its flattened output\) .* mixes samples"):
            with meter:
                F.cross_entropy(model(x), y).backward()


def test_identical_samples_leave_the_replacement_run_out() -> None:
    """Every sample the same: nothing to replace, so no third run, and per-sample models are measured."""
    from gradiv_lib.norms import batch_axes

    x = torch.randn(1, 3, dtype=torch.float64).expand(4, 3)
    assert batch_axes.replaced_inputs((x,), {}, 4) is None
    replaced, _ = batch_axes.replaced_inputs((torch.stack([x[0], x[0], x[0] + 1, x[0]]),), {}, 4)
    assert torch.equal(replaced[0][0], x[0] + 1) and torch.equal(replaced[0][1:], torch.stack([x[0], x[0] + 1, x[0]]))
    check(MixesBetweenLayers("none").double(), x.clone(), torch.randint(0, 3, (4,)))


class Checkpointed(nn.Module):
    """A middle layer under activation checkpointing: its forward pass runs again during the backward pass."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant  # None: no checkpointing (the reference: torch.func cannot trace it)
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        middle = lambda t: torch.tanh(self.b(t))  # noqa: E731
        h = middle(h) if self.use_reentrant is None else torch.utils.checkpoint.checkpoint(middle, h, use_reentrant=self.use_reentrant)
        return self.c(h)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(use_reentrant: bool) -> None:
    model = Checkpointed(use_reentrant).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    model.use_reentrant = None
    expected = reference_sq_norms(model, nn.CrossEntropyLoss(), x, y)
    model.use_reentrant = use_reentrant
    meter = DiversityMeter(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x), y).backward()
        assert_norms_close(meter.sq_norms, expected, 1e-6)


def test_a_weight_norm_parametrization() -> None:
    """The Linear layer's weight is computed from two parameters of its parametrization (the fallback)."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    check(model, torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))


def test_a_batch_first_tensor_in_a_sequence_first_encoder_layer_is_refused() -> None:
    """(B, T, E) handed to a batch_first=False TransformerEncoderLayer attends across the batch."""

    class Misused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.encoder, self.head = nn.Linear(3, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.encoder(self.embed(x)).mean(1))

    with pytest.raises(ValueError, match=r"layer 'encoder\.self_attn' \(MultiheadAttention\): its output 0 changes .* mixes samples"):
        per_sample_sq_norms(Misused().double(), nn.CrossEntropyLoss(), torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))


# --- the probe's helpers, on their definitions ----------------------------------------------------------------


def test_probe_inputs_change_batch_first_tensors_only() -> None:
    """Rolled and replaced inputs: every tensor whose axis 0 has size B (1-D ones too) changes, other leaves
    (numbers, 0-d tensors, tensors of another length) are passed through; the replacement takes the first
    sample that differs from sample 0 (here sample 1)."""
    from gradiv_lib.norms import batch_axes

    a, b = torch.zeros(3), torch.ones(3)
    x = torch.stack([a, b, a, a])
    lengths, scale, other = torch.tensor([5, 6, 7, 8]), torch.tensor(2.0), torch.arange(3)
    args, kwargs = (x,), {"lengths": lengths, "scale": scale, "other": other, "n": 3}
    (rx,), rk = batch_axes.rolled_inputs(args, kwargs, 4)
    assert torch.equal(rx, x.roll(1, 0)) and torch.equal(rk["lengths"], lengths.roll(1, 0))
    assert rk["scale"] is scale and rk["other"] is other and rk["n"] == 3
    (px,), pk = batch_axes.replaced_inputs(args, kwargs, 4)
    assert torch.equal(px, torch.stack([b, b, a, a])) and torch.equal(pk["lengths"], torch.tensor([6, 6, 7, 8]))
    assert pk["scale"] is scale and pk["other"] is other and pk["n"] == 3
    assert torch.equal(x, torch.stack([a, b, a, a])) and torch.equal(lengths, torch.tensor([5, 6, 7, 8]))  # not in place


def test_resolve_on_its_definition() -> None:
    """Per tensor: the axis that rolls with the samples; MIXED if the shape changes between runs, if it changes
    under the roll in a way no axis explains (a cumulative sum along the batch), or if replacing one sample
    changes another sample's slice or a tensor that the roll showed to be shared; None without an axis of size B."""
    from gradiv_lib.norms.batch_axes import MIXED, fingerprint, resolve

    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    rolled, replaced = x.roll(1, 0), torch.cat([x[1:2], x[1:]])
    f = lambda t: fingerprint(t, 4)  # noqa: E731
    assert resolve(f(x), f(rolled), f(replaced)) == 0
    assert resolve(f(x.T), f(rolled.T), f(replaced.T)) == 1
    assert resolve(f(x.cumsum(0)), f(rolled.cumsum(0))) == MIXED
    assert resolve(f(x), f(rolled.T)) == MIXED  # the axis of size B moved between the runs
    assert resolve(f(torch.randn(3, 5)), f(torch.randn(3, 5))) is None
    positions = torch.randn(5, 4, dtype=torch.float64)  # shared and data-independent, with an axis of size B
    assert resolve(f(positions), f(positions.clone()), f(positions.clone())) is None
    assert resolve(f(positions), f(positions.clone()), f(positions + 1)) == MIXED  # shared, yet a sample changed it
    centred = x - x.mean(0)
    assert resolve(f(centred), f(rolled - rolled.mean(0)), f(replaced - replaced.mean(0))) == MIXED
    stats = torch.stack([x.mean(0), x.std(0), x.amax(0), x.amin(0)], 1)  # [3, 4]: statistics, not samples
    stats_replaced = torch.stack([replaced.mean(0), replaced.std(0), replaced.amax(0), replaced.amin(0)], 1)
    assert resolve(f(stats), f(stats.clone()), f(stats_replaced)) == MIXED


def test_an_all_zero_activation_is_not_mixing() -> None:
    """A zero-initialised layer makes the next layer's input exactly zero for every sample: the probe's
    comparisons must call equal zeros equal (not 'changed', which would refuse the model)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    check(model, torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))


class MaskedMean(nn.Module):
    """Called with a keyword argument (a per-sample mask over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor, *, mask: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x)) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def test_a_model_called_with_keyword_arguments_and_changing_lengths() -> None:
    """The probe passes the keyword arguments on (rolled and replaced with the batch), and a new sequence
    length is a new signature (probed anew)."""
    torch.manual_seed(0)
    model = MaskedMean().double()
    meter = DiversityMeter(model)
    for length in (4, 6, 4):
        x, y = torch.randn(5, length, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
        mask = (torch.rand(5, length) < 0.7).double()
        mask[:, 0] = 1.0
        expected = []
        for i in range(5):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + 1], mask=mask[i : i + 1]), y[i : i + 1]).backward()
            expected.append(sum(p.grad.square().sum() for p in model.parameters()))
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x, mask=mask), y).backward()
        assert_norms_close(meter.sq_norms, torch.stack(expected), 1e-9)


class TwiceAndOutside(nn.Module):
    """A Linear layer called twice (its per-sample gradients are materialised and summed over the uses)
    whose weight is also used once more outside it, through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.layer(torch.tanh(self.layer(x))))
        return self.head(h + 0.5 * F.linear(x, self.layer.weight))


def test_a_layer_used_twice_and_outside_its_module_is_refused() -> None:
    """The gradient-sum check covers materialised (used-twice) layers too: the implied Σ_i g_i must be the
    sum of the summed per-sample gradients, so the unseen third use is named."""
    model, x = TwiceAndOutside().double(), torch.randn(B, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"parameter 'layer\.weight' received a gradient that the per-sample hooks do not explain"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, classes())


class SameModuleTwoNames(nn.Module):
    """One Linear module registered under two names at two depths (``first`` and ``block.0``; an alias
    at the same depth is deduplicated by ``named_children`` already), called once."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.block = nn.Sequential(self.first)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.first(x)))


def test_a_module_registered_under_two_names_is_measured_once() -> None:
    """The plan visits each module once: a second _Layer for the alias would record every call twice (its
    per-sample gradient counted twice, the squared norm four times)."""
    check(SameModuleTwoNames().double(), torch.randn(B, 3, dtype=torch.float64), classes())


class SmallOutsideUse(nn.Module):
    """A Linear weight used once more outside its module, with a small weight: the unexplained part of its
    gradient is about 1e-3 of the gradient, far above float64 rounding and below half precision's 5e-2."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(x)) + 1e-3 * F.linear(x, self.layer.weight))


def test_a_small_unseen_use_is_refused_at_the_float64_tolerance() -> None:
    """The gradient-sum check's tolerance follows the dtype (1e-7 in float64), so a 1e-3 unexplained part is
    named; the loose half-precision tolerance would let it through."""
    model, x = SmallOutsideUse().double(), torch.randn(B, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"parameter 'layer\.weight' received a gradient .* \(tolerance 1e-07"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, classes())


class CalledTwice(nn.Module):
    """A layer without a rule (so the torch.func fallback measures it) called twice: its per-sample
    gradients are summed over both calls before squaring."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FallbackTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.shared, self.head = nn.Linear(3, 4), CalledTwice(), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(self.first(x))))))


def test_a_fallback_layer_called_twice_sums_its_per_sample_gradients() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's one-time notice
        check(FallbackTwice().double(), torch.randn(B, 3, dtype=torch.float64), classes())


class KeywordCalls(nn.Module):
    """Rule layers called with their input as a keyword, ``layer(input=x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.conv, self.head = nn.Linear(5, 4), nn.Conv1d(1, 2, 3), nn.Linear(4 + 2 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        features = [torch.tanh(self.a(input=x)), self.conv(input=x.unsqueeze(1)).flatten(1)]
        return self.head(input=torch.cat(features, 1))


@pytest.mark.parametrize("check_mode", ["first_call", "off"])
def test_rule_layers_called_with_their_input_as_a_keyword(check_mode: str) -> None:
    """The rule hooks read the input from the keyword too (they raised IndexError on ``args[0]``)."""
    check_function_and_meter(KeywordCalls().double(), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)), check_mode)


def test_a_torchscript_submodule_with_parameters_is_refused_by_name() -> None:
    model = nn.Sequential(torch.jit.script(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"module '0' is a TorchScript module .* Measure the eager module"):
        DiversityMeter(model)
    for p in model[0].parameters():  # frozen: nothing to hook there
        p.requires_grad_(False)
    DiversityMeter(model)


class SpectralConv(nn.Module):
    """A parametrised layer (no rule: the fallback) whose forward updates buffers before using them:
    spectral_norm's power iteration refines u and v in training mode, then divides by uᵀWv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv1d(2, 3, 3))
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).mean(2))


def test_a_fallback_layer_that_updates_its_buffers_in_its_forward_is_recomputed_from_their_old_values() -> None:
    """The recomputation ran the power iteration a second time, from the updated u and v: the norms came out
    1e-5 off (float64) from the second step on, silently. The training state is the unmeasured run's."""
    x, y = torch.randn(6, 2, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    measured = SpectralConv().double()
    plain = SpectralConv().double()
    plain.load_state_dict(measured.state_dict())
    check_measured_training_is_plain_training(measured, plain, x, y)


def check_measured_training_is_plain_training(measured: nn.Module, plain: nn.Module, x: Tensor, y: Tensor) -> None:
    """Three SGD steps of two copies, one inside a meter: its norms equal torch.func's at every step (taken before
    the step: a forward that updates buffers changes them), and both copies end bit for bit the same."""
    loss_fn = nn.CrossEntropyLoss()
    meter = DiversityMeter(measured)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (measured, plain)]
    for _ in range(3):
        expected = reference_sq_norms(measured, loss_fn, x, y)
        for model, optimizer in zip((measured, plain), optimizers):
            optimizer.zero_grad(set_to_none=True)
            with meter if model is measured else contextlib.nullcontext():
                loss_fn(model(x), y).backward()
            optimizer.step()
        assert_norms_close(meter.sq_norms, expected, 1e-10)
        for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), name


class ParameterListMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4, 3))])

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weights[0]) @ self.weights[1]


def test_a_parameter_list_used_by_its_parents_forward_is_refused_with_the_way_out() -> None:
    """No hook runs (the ParameterList is never called), yet .grad is filled: named as parameters used outside
    their module, not as 'no gradient reached the parameters'."""
    model = ParameterListMatmul().double()
    with pytest.raises(ValueError, match=r"parameters \['weights.0', 'weights.1'\] received gradients.* nn.ParameterList"):
        with DiversityMeter(model) as meter:
            F.cross_entropy(model(torch.randn(5, 3, dtype=torch.float64)), torch.randint(0, 3, (5,))).backward()
        meter.sq_norms


def _changes() -> dict[str, object]:
    def replace_head(model: nn.Sequential) -> None:
        model[2] = nn.Linear(4, 3).double()

    def reassign_weight(model: nn.Sequential) -> None:
        model[2].weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def add_layer(model: nn.Sequential) -> None:
        model.append(nn.Linear(3, 3).double())

    def insert_batch_norm(model: nn.Sequential) -> None:
        model[1] = nn.BatchNorm1d(4, affine=False).double()

    return {"replace_head": replace_head, "reassign_weight": reassign_weight, "add_layer": add_layer,
            "insert_batch_norm": insert_batch_norm}


@pytest.mark.parametrize("change", list(_changes()))
def test_a_model_changed_after_the_meter_was_built_is_refused(change: str) -> None:
    """The new parameters had no hooks: Δ left them out, 50-70 % off, with no error."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    meter = DiversityMeter(model).hold()  # held hooks too (what train() does)
    with meter:
        F.cross_entropy(model(x), y).backward()
    _changes()[change](model)
    model.zero_grad(set_to_none=True)
    named = {"replace_head": r"added \['2.weight', '2.bias'\]; removed \['2.weight', '2.bias'\]",
             "reassign_weight": r"added \['2.weight'\]; removed \['2.weight'\]",
             "add_layer": r"added \['3.weight', '3.bias'\] \(", "insert_batch_norm": r"added \['1 \(BatchNorm\)'\] \("}[change]
    with pytest.raises(ValueError, match=rf"the model changed after this meter was built: {named}.*build a new meter"):
        with meter:
            F.cross_entropy(model(x), y).backward()


def test_swapping_a_parameter_free_module_keeps_the_meter_right() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    meter = DiversityMeter(model)
    for activation in (nn.Tanh(), nn.ReLU(), nn.GELU()):
        model[1] = activation
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x), y).backward()
        assert_norms_close(meter.sq_norms, reference_sq_norms(model, nn.CrossEntropyLoss(), x, y), 1e-10)


def test_a_gradient_penalty_is_refused_as_a_second_backward_pass() -> None:
    """autograd.grad(create_graph=True), then backward(): was reported as 'no gradient reached the parameters'."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"2 backward passes .* a gradient penalty"):
        with DiversityMeter(model) as meter:
            loss = F.cross_entropy(model(x), torch.randint(0, 3, (6,)))
            (input_grad,) = torch.autograd.grad(loss, x, create_graph=True)
            (loss + input_grad.square().sum()).backward()
        meter.sq_norms


class PrunableNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.conv, self.head = nn.Linear(5, 4), nn.Conv1d(1, 2, 3), nn.Linear(4 + 2 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([torch.tanh(self.a(x)), self.conv(x.unsqueeze(1)).flatten(1)], 1))


def _reparametrised(kind: str) -> nn.Module:
    """Layers whose weight a forward pre-hook computes from other parameters."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = PrunableNet()
    if kind == "pruned":
        prune.l1_unstructured(model.a, "weight", amount=0.5)
        prune.random_unstructured(model.conv, "weight", amount=0.5)
    elif kind == "legacy_weight_norm":
        torch.nn.utils.weight_norm(model.a)
    elif kind == "legacy_spectral_norm":
        torch.nn.utils.spectral_norm(model.conv)
    return model.double()


@pytest.mark.parametrize("kind", ["pruned", "legacy_weight_norm", "legacy_spectral_norm"])
def test_layers_whose_weight_a_pre_hook_computes_from_other_parameters(kind: str) -> None:
    """The rules took the computed weight for the parameter: pruning and the legacy weight_norm raised KeyError
    ('weight_orig', 'weight_g'); the legacy spectral_norm gave norms 3-20 % off, silently. Such layers now take
    the fallback, whose recomputation keeps the weight-computing pre-hook (and puts back the weight it sets)."""
    model = _reparametrised(kind)
    x, y, loss_fn = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss()
    # each forward of the spectral norm in training mode refines u and v: the reference is taken before each call
    expected = reference_sq_norms(model, loss_fn, x, y)
    assert_norms_close(per_sample_sq_norms(model, loss_fn, x, y), expected, 1e-10)
    meter = DiversityMeter(model)
    for _ in range(2):
        expected = reference_sq_norms(model, loss_fn, x, y)
        model.zero_grad(set_to_none=True)
        with meter:
            loss_fn(model(x), y).backward()
        assert_norms_close(meter.sq_norms, expected, 1e-10)
    for module in model.modules():  # the attribute the hook sets is the model's own, not a torch.func wrapper
        if "weight" in module.__dict__:
            assert not torch._C._functorch.is_functorch_wrapped_tensor(module.__dict__["weight"])


def test_a_legacy_spectral_norm_trains_as_without_the_meter() -> None:
    """Its power iteration updates u and v in a pre-hook, before the engine's buffer snapshot unless that runs first."""
    measured, plain = _reparametrised("legacy_spectral_norm"), _reparametrised("legacy_spectral_norm")
    check_measured_training_is_plain_training(measured, plain, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))


def test_pruning_after_the_meter_was_built_is_refused() -> None:
    import torch.nn.utils.prune as prune

    model = PrunableNet().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    meter = DiversityMeter(model)
    with meter:
        F.cross_entropy(model(x), y).backward()
    prune.l1_unstructured(model.a, "weight", amount=0.5)  # the same Parameter, renamed weight_orig
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"added \['a.weight_orig'\]; removed \['a.weight'\] .* pruned"):
        with meter:
            F.cross_entropy(model(x), y).backward()


class TransposedTie(nn.Module):
    """``head``'s weight is ``a.weight.T``, set by a forward pre-hook after ``del head.weight`` (weight tying
    across shapes): the gradient of that use reaches ``a.weight`` outside every hook."""

    def __init__(self, head_bias: bool) -> None:
        super().__init__()
        self.a, self.head, self.out = nn.Linear(5, 4), nn.Linear(4, 5, bias=head_bias), nn.Linear(5, 3)
        del self.head.weight
        self.head.register_forward_pre_hook(lambda module, args: setattr(module, "weight", self.a.weight.t()))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.head(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("head_bias", [True, False])
@pytest.mark.parametrize("check_mode", ["first_call", "off"])
def test_a_weight_computed_from_another_layers_parameter_is_refused(check_mode: str, head_bias: bool) -> None:
    """The gradient check refused it as a use outside the module; with check='off' the norms were 0.06 off (of
    3.5), silently. The computed weight is now refused after the layer's forward, whatever ``check`` says."""
    model = TransposedTie(head_bias).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\) uses a weight that is not one of its parameters.*parametriz"):
        with DiversityMeter(model, check=check_mode):
            F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="uses a weight that is not one of its parameters"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y, check=check_mode)


def test_a_weight_computed_from_frozen_parameters_or_inside_a_fallback_layer_is_measured() -> None:
    """Not refused where it is right: a computed weight that needs no gradient, and one computed inside a
    module that the torch.func fallback recomputes as a whole (a parameter of its own)."""
    frozen = TransposedTie(True).double()
    frozen.a.weight.requires_grad_(False)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_function_and_meter(frozen, x, y, "off")

    class Owner(nn.Module):  # the raw weight is the root's own parameter: the root is a fallback layer
        def __init__(self) -> None:
            super().__init__()
            self.raw, self.head, self.out = nn.Parameter(torch.randn(4, 5)), nn.Linear(5, 4), nn.Linear(4, 3)
            del self.head.weight
            self.head.register_forward_pre_hook(lambda module, args: setattr(module, "weight", 2 * self.raw))

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.tanh(self.head(x)))

    check_function_and_meter(Owner().double(), x, y, "off")


class ReplacedForward(nn.Module):
    """A Linear whose instance forward was replaced (a patch, a monkey-patched adapter): the rule's formula is
    not the layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(5, 4), nn.Linear(4, 3)
        layer = self.a
        self.a.forward = lambda x: F.linear(x, 2 * layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(x)))


@pytest.mark.parametrize("check_mode", ["first_call", "off"])
def test_a_layer_whose_instance_forward_was_replaced_takes_the_fallback(check_mode: str) -> None:
    """Refused by the gradient check, and with check='off' 1.6 (absolute) off, silently."""
    check_function_and_meter(ReplacedForward().double(), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)), check_mode)


class Symmetric(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


def test_a_parametrised_layer_measured_under_parametrize_cached() -> None:
    """Under parametrize.cached() the fallback's recomputation read the weight cached from the real parameters,
    so the per-sample gradients of those parameters came out zero: 40 % off, silently, once the model's first
    call (without the cache) had passed the gradient check."""
    import torch.nn.utils.parametrize as parametrize

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    x, y, loss_fn = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss()
    expected = reference_sq_norms(model, loss_fn, x, y)
    meter = DiversityMeter(model)
    for cached in (False, True, True):
        model.zero_grad(set_to_none=True)
        with parametrize.cached() if cached else contextlib.nullcontext(), meter:
            loss_fn(model(x), y).backward()
        assert_norms_close(meter.sq_norms, expected, 1e-10)
    with parametrize.cached():
        assert_norms_close(per_sample_sq_norms(model, loss_fn, x, y, check="off"), expected, 1e-10)


class CentreBatch(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("meter_after", ["same", "new"])
def test_a_parameter_free_module_swapped_for_one_that_mixes_samples_is_probed_again(meter_after: str) -> None:
    """The probe's layout (and its passed gradient check) was cached per model and call signature, so after a
    verified call an activation swapped for x - x.mean(0) was measured silently, by the same meter or a new one."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    meter = DiversityMeter(model)
    with meter:
        F.cross_entropy(model(x), y).backward()
    model[1] = CentreBatch()
    meter = meter if meter_after == "same" else DiversityMeter(model)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\): its input changes .* mixes samples") as refused:
        with meter:
            F.cross_entropy(model(x), y).backward()
    assert "training mode only" not in str(refused.value)  # it mixes in eval mode too


class CentreBatchWhenTraining(nn.Module):
    """Mixes samples in training mode only (a batch-centring layer of the user's with its own mode)."""

    def forward(self, h: Tensor) -> Tensor:
        return h - h.mean(0, keepdim=True) if self.training else h


class MixupWhenTraining(nn.Module):
    """Manifold mixup inside the model: each sample mixed with the next one while training."""

    def forward(self, h: Tensor) -> Tensor:
        return 0.7 * h + 0.3 * h.roll(1, 0) if self.training else h


@pytest.mark.parametrize("mixer", [CentreBatchWhenTraining, MixupWhenTraining])
@pytest.mark.parametrize("check_mode", ["first_call", "every_call"])
def test_a_module_that_mixes_samples_in_training_mode_only_is_refused(mixer: type[nn.Module], check_mode: str) -> None:
    """The probe ran in eval mode only, where these modules are the identity: in training mode the meter
    measured them silently (the per-sample gradients of a mixed batch are undefined). A training-mode pair of
    runs (the batch and one sample replaced, one RNG state) now finds them; in eval mode they are measured."""
    model = nn.Sequential(nn.Linear(5, 4), mixer(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\): its input .* mixes samples.* training mode only"):
        with DiversityMeter(model, check=check_mode):
            F.cross_entropy(model(x), y).backward()
    model.eval()
    check_function_and_meter(model, x, y, check_mode)


class ScaledCentreWhenTraining(nn.Module):
    """A layer with a parameter (so the fallback handles it) whose output mixes samples while training."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, h: Tensor) -> Tensor:
        h = h * self.scale
        return h - h.mean(0, keepdim=True) if self.training else h


@pytest.mark.parametrize("where", ["a layer's output", "the model's output"])
def test_mixing_in_training_mode_at_a_layers_output_or_after_the_last_layer_is_refused(where: str) -> None:
    """The training-mode pair marks layer outputs and the model's output too, not only layer inputs."""
    if where == "a layer's output":
        model, match = nn.Sequential(nn.Linear(5, 4), ScaledCentreWhenTraining()), r"layer '1' \(ScaledCentreWhenTraining\): its output"
    else:
        model, match = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), MixupWhenTraining()), r"the output of Sequential"
    model = model.double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=match + ".*training mode only"):
        with DiversityMeter(model):
            F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("meter_after", ["same", "new"])
def test_one_submodule_switched_to_a_mode_that_mixes_samples_is_probed_again(meter_after: str) -> None:
    """The cached layout was keyed by the root's mode only: after a checked call with the model in eval mode,
    one submodule put in training mode was measured from the cached layout. Every module's mode is in the key."""
    model = nn.Sequential(nn.Linear(5, 4), CentreBatchWhenTraining(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    meter = DiversityMeter(model)
    with meter:
        F.cross_entropy(model(x), y).backward()
    model[1].train()
    meter = meter if meter_after == "same" else DiversityMeter(model)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="training mode only"):
        with meter:
            F.cross_entropy(model(x), y).backward()


class DropoutEverywhere(nn.Module):
    """Training-mode noise tied to batch positions (nn.Dropout, F.dropout, stochastic depth per sample), and a
    BatchNorm in eval mode inside a model in training mode: samples stay independent."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.b, self.head = nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 8), nn.Linear(8, 3)
        self.norm = nn.BatchNorm1d(8).eval()

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.tanh(self.a(x)))
        keep = (torch.rand(x.shape[0], 1, dtype=x.dtype) > 0.2).to(x.dtype) if self.training else 1.0
        h = h + keep * F.dropout(torch.tanh(self.b(h)), 0.2, self.training)
        return self.head(self.norm(h))


class StepScale(nn.Module):
    """Counts its training-mode calls in a buffer that the forward's autograd graph saves (h * step)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.ones((), dtype=torch.float64))

    def forward(self, h: Tensor) -> Tensor:
        if self.training:
            self.step.add_(1)
        return h * self.step


def test_the_training_mode_probe_leaves_buffers_that_autograd_saved_alone() -> None:
    """The training-mode pair updated such a buffer in place (and put it back in place), so the measured backward
    pass raised PyTorch's 'modified by an inplace operation'. Its passes now run on copies of the buffers: the
    counter moves once per measured step, and the norms are those of check='off' on an identical model."""
    import copy

    checked = nn.Sequential(nn.Linear(5, 4), StepScale(), nn.Tanh(), nn.Linear(4, 3)).double()
    unchecked = copy.deepcopy(checked)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for step in (2.0, 3.0):
        results = []
        for model, check_mode in ((checked, "every_call"), (unchecked, "off")):
            with DiversityMeter(model, check=check_mode) as meter:
                F.cross_entropy(model(x), y).backward()
            results.append(meter.sq_norms)
            assert model[1].step.item() == step
        assert torch.equal(*results)


def test_dropout_and_stochastic_depth_in_training_mode_are_not_taken_for_mixing() -> None:
    """The training-mode pair draws the same masks for both runs, so position-tied noise is not mixing; and the
    probe's passes leave the RNG alone: the checked pass draws the masks an unmeasured pass draws, and its norms
    are those of check='off'."""
    model = DropoutEverywhere().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for _ in range(2):
        state = torch.get_rng_state()
        checked = DiversityMeter(model, check="every_call")
        model.zero_grad(set_to_none=True)
        with checked:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        torch.set_rng_state(state)
        unchecked = DiversityMeter(model, check="off")
        model.zero_grad(set_to_none=True)
        with unchecked:
            F.cross_entropy(model(x), y).backward()
        torch.set_rng_state(state)
        with torch.no_grad():
            assert torch.equal(F.cross_entropy(model(x), y), loss.detach())
        assert torch.equal(checked.sq_norms, unchecked.sq_norms)


class DropoutInsideFallbackLayers(nn.Module):
    """An LSTM's dropout between its layers, or attention dropout with the attention weights used: random draws
    inside layers that only the torch.func fallback covers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.embed, self.head = kind, nn.Linear(3, 4), nn.Linear(4, 3)
        self.inner = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True) if kind == "attention" else nn.LSTM(4, 4, 2, dropout=0.5, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        if self.kind == "attention":
            h, weights = self.inner(h, h, h)
            h = h * (1 + weights.sum(-1, keepdim=True))
        else:
            h = self.inner(h)[0]
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["attention", "lstm"])
@pytest.mark.parametrize("check_mode", ["first_call", "off"])
def test_a_fallback_layer_that_draws_random_numbers_is_refused(kind: str, check_mode: str) -> None:
    """The fallback recomputed such a layer with other random draws: the gradient check refused it as a use
    outside the module, and with check='off' the norms were wrong silently. Refused by name now; in eval mode
    (no dropout drawn) the layer is measured exactly. (Attention dropout alone is redrawn: see below.)"""
    model = DropoutInsideFallbackLayers(kind).double()
    x, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer 'inner' \((MultiheadAttention|LSTM)\) draws random numbers in its forward.*eval mode"):
        with DiversityMeter(model, check=check_mode):
            F.cross_entropy(model(x), y).backward()
    model.eval()
    check_function_and_meter(model, x, y, check_mode, loop=kind == "lstm")  # vmap has no rule for the fused LSTM


def same_draws_reference(model: nn.Module, inputs: tuple[Tensor, ...], y: Tensor, seed: int) -> Tensor:
    """‖∇_w ℓ_i‖² through one forward pass of the whole batch from RNG seed ``seed`` (so with the dropout masks the
    measured pass draws), by one ``torch.autograd.grad`` per sample's loss."""
    torch.manual_seed(seed)
    losses = F.cross_entropy(model(*inputs), y, reduction="none")
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms.append(sum(g.double().square().sum() for g in grads if g is not None))
    return torch.stack(norms)


def check_against_same_draws(model: nn.Module, inputs: tuple[Tensor, ...], y: Tensor, check_mode: str, steps: int,
                             tolerance: float = 1e-9, after_step: Callable[[], None] = lambda: None) -> None:
    """One meter over ``steps`` training steps, each from seed ``step`` (new dropout masks every step), against
    :func:`same_draws_reference`; ``after_step`` runs after each measurement (extra assertions)."""
    meter = DiversityMeter(model, check=check_mode)
    for step in range(steps):
        expected = same_draws_reference(model, inputs, y, seed=step)
        torch.manual_seed(step)
        with meter:
            F.cross_entropy(model(*inputs), y).backward()
        after_step()
        assert_norms_close(meter.sq_norms, expected, tolerance, f"{check_mode} step {step}")
        model.zero_grad()


class AttentionWithDropout(nn.Module):
    """Multi-head attention with dropout on its weights while training: batch first or not (then the model
    transposes around it), self- or cross-attention (other key and value widths), ``need_weights`` either way,
    the layer called once or twice (its parameters then have two uses)."""

    def __init__(self, batch_first: bool, cross: bool, need_weights: bool, twice: bool) -> None:
        super().__init__()
        self.batch_first, self.cross, self.need_weights, self.twice = batch_first, cross, need_weights, twice
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.memory = nn.Linear(3, 5) if cross else None
        extra = {"kdim": 5, "vdim": 5} if cross else {}
        self.attention = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=batch_first, **extra)

    def attend(self, q: Tensor, kv: Tensor) -> Tensor:
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out = self.attention(q, kv, kv, need_weights=self.need_weights)[0]
        return out if self.batch_first else out.transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        kv = torch.tanh(self.memory(x)) if self.cross else h
        h = self.attend(h, kv)
        if self.twice and not self.cross:
            h = self.attend(torch.tanh(h), torch.tanh(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("check_mode", ["first_call", "every_call", "off"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("variant", ["batch_first", "sequence_first", "cross", "twice"])
def test_attention_dropout_while_training_is_measured_with_the_same_masks(variant: str, need_weights: bool, check_mode: str) -> None:
    """nn.MultiheadAttention(dropout > 0) in training mode (nn.TransformerEncoderLayer's default) was refused: the
    rule recomputed the attention without the mask. It now draws the mask again from the generators' states saved
    before the layer's forward. Reference: the per-sample gradients through one forward pass of the batch with the
    same seed; three steps, each with new masks."""
    torch.manual_seed(0)
    model = AttentionWithDropout(variant != "sequence_first", variant == "cross", need_weights, variant == "twice").double()
    x, y = torch.randn(6, 7, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_against_same_draws(model, (x,), y, check_mode, steps=3)


class MaskedAttention(nn.Module):
    """Attention with masks made from the samples themselves (a padding mask from the keys' first feature, never the
    first key) or shared by all samples (a causal 2-D mask, or ``is_causal`` with it), boolean or additive."""

    def __init__(self, padding: str, shared: str, dropout: float, need_weights: bool, batch_first: bool, cross: bool) -> None:
        super().__init__()
        self.padding, self.shared, self.need_weights, self.batch_first, self.cross = padding, shared, need_weights, batch_first, cross
        self.embed, self.memory, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)
        self.attention = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=batch_first)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        q = torch.tanh(self.embed(x))
        source = m if self.cross else x
        kv = torch.tanh(self.memory(m)) if self.cross else q
        padding = shared = None
        if self.padding != "none":
            padding = source[:, :, 0] > 0.7
            padding[:, 0] = False
            if self.padding == "additive":
                padding = torch.zeros(padding.shape, dtype=x.dtype).masked_fill(padding, float("-inf"))
        if self.shared != "none":
            shared = torch.triu(torch.ones(q.shape[1], kv.shape[1], dtype=torch.bool), 1)
            if self.padding == "additive":
                shared = torch.zeros(shared.shape, dtype=x.dtype).masked_fill(shared, float("-inf"))
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out = self.attention(q, kv, kv, key_padding_mask=padding, attn_mask=shared, need_weights=self.need_weights,
                             is_causal=self.shared == "causal")[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


MASKED_ATTENTION = [
    (padding, shared, layout)
    for padding, shared in [("boolean", "none"), ("additive", "none"), ("none", "mask"), ("boolean", "mask"), ("additive", "mask"),
                            ("none", "causal"), ("boolean", "causal")]
    for layout in ["self_batch_first", "self_sequence_first", "cross_batch_first", "cross_sequence_first"]
    if not (shared == "causal" and layout.startswith("cross"))  # a causal mask is for self-attention
]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("padding,shared,layout", MASKED_ATTENTION)
def test_masked_attention_is_measured_by_the_batched_rule(padding: str, shared: str, dropout: float, need_weights: bool, layout: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention with a padding mask or a shared mask went to the torch.func fallback (and with dropout while training
    it was refused). The batched rule now merges the masks as torch does and covers every such call, with dropout
    drawn again; the reference is one forward pass of the batch per step, differentiated sample by sample."""
    from gradiv_lib.norms import rules_attention

    calls: list[int] = []
    original = rules_attention.attention_grads
    monkeypatch.setattr(rules_attention, "attention_grads", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = MaskedAttention(padding, shared, dropout, need_weights, layout.endswith("batch_first"), layout.startswith("cross")).double()
    x, m, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randn(6, 7, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    def rule_was_used() -> None:
        assert calls, "the batched rule was not used"
        calls.clear()

    for check_mode in ["first_call", "off"]:
        calls.clear()
        check_against_same_draws(model, (x, m), y, check_mode, steps=2, after_step=rule_was_used)


class AttentionCallForms(nn.Module):
    """Calls of attention the batched rule must read as torch does: the padding mask passed by position, and
    ``is_causal=True`` with an ``attn_mask`` that is not causal (torch then ignores the mask and attends causally)."""

    def __init__(self, form: str, dropout: float) -> None:
        super().__init__()
        self.form, self.embed, self.head = form, nn.Linear(3, 4), nn.Linear(4, 3)
        self.attention = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        if self.form == "positional_padding":
            padding = x[:, :, 0] > 0.7
            padding[:, 0] = False
            out = self.attention(h, h, h, padding, need_weights=False)[0]
        else:
            out = self.attention(h, h, h, attn_mask=torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype), need_weights=False,
                                 is_causal=True)[0]
        return self.head(out.mean(1))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("form", ["positional_padding", "causal_hint"])
def test_attention_call_forms_are_read_as_torch_reads_them(form: str, dropout: float) -> None:
    """Mutation survivors: a padding mask passed by position, or the ``is_causal`` hint, ignored by the rule, gave
    other norms (with check='off', silently)."""
    torch.manual_seed(0)
    model = AttentionCallForms(form, dropout).double()
    x, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_against_same_draws(model, (x,), y, "off", steps=2)


def test_attention_dropout_in_bfloat16_and_a_per_sample_3d_mask_are_refused() -> None:
    """What the batched rule does not cover is refused, not measured wrong: attention dropout in bfloat16 (the mask
    would be drawn on another dtype) and a 3-D ``attn_mask`` of B·H rows (the batch merged with the heads)."""
    model = AttentionWithDropout(True, False, False, False).to(torch.bfloat16)
    x, y = torch.randn(6, 7, 3, dtype=torch.bfloat16), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer 'attention' \(MultiheadAttention\) draws random numbers"):
        with DiversityMeter(model, check="off"):
            F.cross_entropy(model(x).float(), y).backward()

    class PerSampleMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attention, self.head = nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.embed(x))
            mask = torch.zeros(x.shape[0] * 2, x.shape[1], x.shape[1], dtype=x.dtype)
            mask[:, :, -1] = float("-inf")
            return self.head(self.attention(h, h, h, attn_mask=mask)[0].mean(1))

    model = PerSampleMask().double()
    with pytest.raises(ValueError, match=r"fallback failed for module 'attention'"):
        with DiversityMeter(model, check="off"):
            F.cross_entropy(model(x.double()), y).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_transformer_encoder_with_its_default_dropout_is_measured(dtype: torch.dtype) -> None:
    """The standard nn.TransformerEncoder (two layers, dropout=0.1 by default) in training mode, float32 and
    float64, under the default check and a second, unchecked call."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.encoder(x)[:, 0])

    model = Encoder().to(dtype)
    x, y = torch.randn(6, 5, 8, dtype=dtype), torch.randint(0, 3, (6,))
    check_against_same_draws(model, (x,), y, "first_call", steps=2, tolerance=1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("fault", ["state_not_restored", "output_differs", "draws_end_elsewhere"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_a_redrawn_attention_mask_that_differs_is_refused(need_weights: bool, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right or loud: if the recomputation drew its mask from another state (the generators not put back), the check
    of the recomputed output and of the generators' final states raises instead of returning norms for another mask.
    Each half of the check alone raises too: an output off by 1e-6 of its scale with the same draws, or the same
    output with the generators ending elsewhere."""
    from gradiv_lib.norms import rules_attention

    if fault == "state_not_restored":
        monkeypatch.setattr(rules_attention, "_set_rng", lambda states, devices: None)
    elif fault == "output_differs":
        core = rules_attention._core
        monkeypatch.setattr(rules_attention, "_core", lambda *a, **k: core(*a, **k) * (1 + 1e-6))
    else:
        core = rules_attention._core  # the same output, then one more draw: the generators end elsewhere
        monkeypatch.setattr(rules_attention, "_core", lambda *a, **k: (core(*a, **k), torch.rand(1))[0])
    model = AttentionWithDropout(True, False, need_weights, False).double()
    x, y = torch.randn(6, 7, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"dropout=0.3 while training: redrawing its dropout mask .* did not reproduce"):
        with DiversityMeter(model, check="off"):
            F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("training", [False, True])
def test_the_probe_on_cuda_inputs_keeps_its_model_state(training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA inputs the probe's loop over the devices' RNG states rebound the name of its saved model state, so
    its clean-up raised AttributeError ('Tensor' object has no attribute 'restore'): every measurement with the
    default check failed on a GPU. Run here on CPU with the CUDA generator calls stubbed (no GPU was lent)."""
    from gradiv_lib.norms import batch_axes

    cuda_states: dict[int, Tensor] = {0: torch.zeros(16, dtype=torch.uint8)}
    monkeypatch.setattr(batch_axes, "cuda_devices", lambda args: [0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: cuda_states[device].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: cuda_states.__setitem__(device, state.clone()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fallback layer's generator check reads them too
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.0), nn.Tanh(), nn.PReLU(), nn.Linear(4, 3)).double().train(training)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with DiversityMeter(model) as meter:
        F.cross_entropy(model(x), y).backward()
    assert_norms_close(meter.sq_norms, reference_sq_norms(model, nn.CrossEntropyLoss(), x, y), 1e-10)
    cuda_states[0] = torch.ones(16, dtype=torch.uint8)  # a draw on the (stubbed) device inside the fallback layer
    prelu = model[3]
    prelu.forward = lambda h: (cuda_states.__setitem__(0, torch.full((16,), 2, dtype=torch.uint8)), F.prelu(h, prelu.weight))[1]
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"layer '3' \(PReLU\) draws random numbers"):
        with DiversityMeter(model, check="off"):
            F.cross_entropy(model(x), y).backward()


def test_a_measurement_without_a_backward_pass_after_accumulated_gradients() -> None:
    """.grad already holds gradients (the meter then hooks every parameter) and no backward pass runs: 'no
    gradient reached', not the refusal of parameters used outside their modules, which reads .grad only when it
    was empty before the pass."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    meter = DiversityMeter(model)
    with meter:
        model(x)
    with pytest.raises(RuntimeError, match="no gradient reached the model's trainable parameters"):
        meter.sq_norms


class ScaledBilinear(nn.Module):
    """A layer without a rule (the torch.func fallback measures it)."""

    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(4, 4, 3)

    def forward(self, h: Tensor) -> Tensor:
        return self.bilinear(h, h.tanh())


@pytest.mark.parametrize("layer", ["rule", "fused", "fallback"])
@pytest.mark.parametrize("held", [False, True])
def test_a_backward_pass_after_the_measurement_through_its_retained_graph_is_not_counted(layer: str, held: bool) -> None:
    """loss.backward(retain_graph=True) inside ``with meter:`` and another pass through that graph after it (a
    second loss of a GAN or multi-task step): the layers' hooks stay on the retained graph and counted the later
    pass as a second pass of the finished measurement, which reading it then refused ("2 backward passes")."""
    if layer == "fused":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 3)).double()
        x = torch.randn(6, 2, 8, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), ScaledBilinear() if layer == "fallback" else nn.Linear(4, 3)).double()
        x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    expected = reference_sq_norms(model, loss_fn, x, y)
    meter = DiversityMeter(model)
    if held:
        meter.hold()
    for _ in range(3):  # the first call checked, the next ones on the fast paths (fused layers from the second)
        model.zero_grad(set_to_none=True)
        with meter:
            loss = loss_fn(model(x), y)
            loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)  # outside the measurement
        assert_norms_close(meter.sq_norms, expected, 1e-10)
        assert meter.result.n == 6
    # a pass through that graph inside the next measurement is still refused: .grad then holds both passes
    model.zero_grad(set_to_none=True)
    with meter:
        loss_fn(model(x), y).backward()
        loss.backward()
    with pytest.raises(RuntimeError, match="2 backward passes"):
        meter.result
    meter.release()


class CentresWhenAsked(nn.Module):
    """A keyword argument decides whether the model mixes samples (x - x.mean(0) between its layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor, centre: bool = False, scale: Tensor | None = None) -> Tensor:
        h = self.a(x).tanh()
        if scale is not None:
            h = h * scale
        return self.b(h - h.mean(0, keepdim=True) if centre else h)


def test_a_keyword_argument_is_part_of_the_cached_layouts_key() -> None:
    """A verified layout is cached per call signature; a call with another keyword argument (here one that makes
    the model mix samples) must be probed again, not measured from the layout of the call without it."""
    model = CentresWhenAsked().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    meter = DiversityMeter(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x, centre=False), y).backward()
        assert_norms_close(meter.sq_norms, reference_sq_norms(model, nn.CrossEntropyLoss(), x, y), 1e-10)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"layer 'b' \(Linear\): its input changes .* mixes samples"):
        with meter:
            F.cross_entropy(model(x, centre=True), y).backward()
    # tensors passed by keyword are measured too (scale broadcast from a 0-d tensor)
    scale = torch.tensor(0.5, dtype=torch.float64)
    expected = reference_sq_norms(nn.Sequential(model.a, nn.Tanh(), ScaleBy(0.5), model.b), nn.CrossEntropyLoss(), x, y)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x, scale=scale), y).backward()
        assert_norms_close(meter.sq_norms, expected, 1e-10)


class ScaleBy(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, h: Tensor) -> Tensor:
        return h * self.factor


class TimeConditioned(nn.Module):
    """forward(t, x) with a 0-d time first (an ODE right-hand side, a diffusion step): the batch is x's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x) * t))


@pytest.mark.parametrize("check_mode", ["first_call", "off"])
def test_a_zero_dimensional_tensor_before_the_batch_in_the_models_arguments(check_mode: str) -> None:
    """The batch size is read from the first tensor argument with a dimension; a 0-d one before it (a time) has none."""
    model = TimeConditioned().double()
    t = torch.tensor(0.7, dtype=torch.float64)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = reference_sq_norms(nn.Sequential(model.a, ScaleBy(0.7), nn.Tanh(), model.b), nn.CrossEntropyLoss(), x, y)
    assert check_meter_calls(model, (t, x), y, expected, check_mode).result.n == 6


def test_two_backward_passes_are_refused_when_grad_already_held_a_gradient() -> None:
    """With .grad filled before the measurement (accumulation) the meter counts passes by parameter hooks, not by
    reading .grad at the end: two passes are refused there too."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()  # .grad holds an earlier gradient
    meter = DiversityMeter(model)
    for passes in ("retained graph", "two micro-batches"):
        with meter:
            if passes == "retained graph":
                loss = F.cross_entropy(model(x), y)
                loss.backward(retain_graph=True)
                loss.backward()
            else:
                F.cross_entropy(model(x[:3]), y[:3]).backward()
                F.cross_entropy(model(x[3:]), y[3:]).backward()
        with pytest.raises(RuntimeError, match="2 backward passes"):
            meter.result


class SharedTableHead(nn.Module):
    """A Linear applied to a table with no batch axis (computed once, then broadcast to every sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(7, 6))
        self.proj = nn.Linear(6, 3)
        self.a = nn.Linear(5, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) @ self.proj(self.table)


def test_a_rule_layer_whose_output_has_no_batch_axis_is_refused_without_a_probe() -> None:
    """With check='off' the batch axis comes from shapes: a Linear on a (7, 6) table in a batch of 6 sees B among its
    input's sizes, but its output (7, 3) has none: one value for all samples, refused by name."""
    model = SharedTableHead().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer 'proj' \(Linear\): its output is the same for every sample"):
        with DiversityMeter(model, check="off") as meter:
            F.cross_entropy(model(x), y).backward()
        meter.sq_norms


def test_a_layer_output_that_a_users_hook_mixes_is_refused() -> None:
    """A forward hook of the user's that centres a Linear's output over the batch. The meter's own hook runs first
    and sees the output before the user's hook mixes it, so the refusal names the next layer's input, where the
    mixed samples arrive."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].register_forward_hook(lambda module, args, out: out - out.mean(0, keepdim=True))
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\): its input changes .* mixes samples"):
        with DiversityMeter(model):
            F.cross_entropy(model(x), y).backward()


class ScaledInput(nn.Module):
    """forward(scale, x) or forward(x, scale): a scale vector shared by all samples beside the batch."""

    def __init__(self, scale_first: bool) -> None:
        super().__init__()
        self.scale_first = scale_first
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        scale, x = (first, second) if self.scale_first else (second, first)
        return self.b(torch.tanh(self.a(x * scale)))


@pytest.mark.parametrize("check_mode", ["first_call", "every_call", "off"])
@pytest.mark.parametrize("batch", [6, 3])
def test_an_unbatched_tensor_argument_before_the_batch_is_named_in_the_refusal(check_mode: str, batch: int) -> None:
    """The meter reads the batch from dimension 0 of the model's tensor arguments. A scale vector of 5 passed before
    a batch of 6 set B = 5, and the refusal blamed a layer ("no axis of size 5", or mixed samples) with no word of
    the argument. The refusal now names the arguments' first dimensions and the way out; with the batch first, the
    model is measured."""
    model = ScaledInput(scale_first=True).double()
    scale = torch.rand(5, dtype=torch.float64) + 0.5
    x, y = torch.randn(batch, 5, dtype=torch.float64), torch.randint(0, 5, (batch,))
    with pytest.raises(ValueError, match=rf"first dimensions \[5, {batch}\]: the meter reads the samples along "
                                         r"dimension 0 of every tensor argument, and took B = 5 .* attribute or buffer"):
        with DiversityMeter(model, check=check_mode) as meter:
            F.cross_entropy(model(scale, x), y).backward()
        meter.sq_norms
    model.scale_first = False
    expected = reference_sq_norms(nn.Sequential(ScaleBy(1.0), model.a, nn.Tanh(), model.b), nn.CrossEntropyLoss(), x * scale, y)
    check_meter_calls(model, (x, scale), y, expected, check_mode)


class SharedProjection(nn.Module):
    """A shared ``[d, d]`` matrix passed as an argument: with a batch of ``d`` samples it has B rows by coincidence.
    ``after_last``: applied after the last layer (the model's output mixes), else between the two layers."""

    def __init__(self, after_last: bool) -> None:
        super().__init__()
        self.a, self.b, self.after_last = nn.Linear(6, 6), nn.Linear(6, 6), after_last

    def forward(self, x: Tensor, projection: Tensor) -> Tensor:
        if self.after_last:
            return self.b(torch.tanh(self.a(x))) @ projection
        return self.b(torch.tanh(self.a(x)) @ projection)


@pytest.mark.parametrize("after_last", [False, True])
@pytest.mark.parametrize("check_mode", ["first_call", "every_call"])
def test_an_unbatched_argument_with_b_rows_is_named_in_the_refusal(check_mode: str, after_last: bool) -> None:
    """A shared 6x6 matrix passed with a batch of 6 is permuted by the probe with the samples, which looks like
    mixing: the refusal named only the mixing (a wrong cause). It now says that both arguments have 6 rows, that
    the meter took each as batched, and the way out; passed as an attribute, the same model is measured."""
    torch.manual_seed(0)
    model = SharedProjection(after_last).double()
    x, projection = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (6,))
    with pytest.raises(ValueError, match=r"mixes samples.*The model's two tensor arguments both have 6 rows, and the "
                                         r"meter took each as one row per sample .* attribute or buffer of the model"):
        with DiversityMeter(model, check=check_mode) as meter:
            F.cross_entropy(model(x, projection), y).backward()
        meter.sq_norms

    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.register_buffer("projection", projection)

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x, self.projection)

    wrapped = WithBuffer()
    expected = reference_sq_norms(wrapped, nn.CrossEntropyLoss(), x, y, loop=True)
    check_meter_calls(wrapped, (x,), y, expected, check_mode)


class SlightLeak(nn.Module):
    """A weight used by its Linear and, scaled by ``eps``, outside it (x @ W.T): a gradient the hooks do not see."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.fc, self.eps = nn.Linear(5, 3), eps

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.eps * (x @ self.fc.weight.t())


def test_the_gradient_check_scales_with_the_root_of_the_per_sample_norms() -> None:
    """The check's scale is ‖∇L‖ + (Σ_i ‖g_i‖²)^½ (rounding grows with the per-sample gradients). With large inputs
    the per-sample gradients are large: a scale growing like Σ_i ‖g_i‖² instead let a use outside the module that
    changes the gradient by 1e-5 of its norm pass as rounding. In float64 it is refused; 1e-8 passes as rounding."""
    torch.manual_seed(0)
    x, y = 100 * torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = SlightLeak(1e-5).double()
    with pytest.raises(ValueError, match="differs from the autograd gradient by 1e-05 of its norm"):
        with DiversityMeter(model, loss_reduction="sum") as meter:
            F.cross_entropy(model(x), y, reduction="sum").backward()
        meter.sq_norms
    model = SlightLeak(1e-8).double()
    with DiversityMeter(model, loss_reduction="sum") as meter:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    assert meter.sq_norms.shape == (64,)


class ScaledShared(nn.Module):
    """A custom module with a parameter of its own (measured by the torch.func fallback) around a Linear that the
    model also calls directly."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear, self.scale = linear, nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h) * self.scale


class SharedInsideFallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.scaled = ScaledShared(self.shared)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.scaled(self.shared(x).tanh()).tanh())


@pytest.mark.parametrize("check_mode", ["first_call", "every_call", "off"])
@pytest.mark.parametrize("exact_grad", [False, True])
def test_a_layer_called_directly_and_inside_a_fallback_layer_is_counted_once_per_use(check_mode: str, exact_grad: bool) -> None:
    """The Linear's own hooks recorded its call inside the fallback module too, whose recomputation differentiates
    that call again: the inner use counted twice. With the check on, the gradient check refused the model ("a
    gradient the per-sample hooks do not explain"); with check='off' the norms were wrong (twice the right ones
    here). A layer's calls inside a fallback layer that encloses it are now left to the fallback."""
    torch.manual_seed(0)
    model = SharedInsideFallback().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = []
    for i in range(6):  # a loop over samples: torch.func's functional_call mishandles the twice-registered Linear
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append(sum(p.grad.square().sum() for p in model.parameters()))
    meter = DiversityMeter(model, check=check_mode, exact_grad=exact_grad)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x), y).backward()
        assert_norms_close(meter.sq_norms, torch.stack(expected), 1e-10)
    assert_norms_close(per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y, check=check_mode), torch.stack(expected), 1e-10)
