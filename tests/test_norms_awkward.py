"""Awkward held-out models: the engine must give the torch.func norms or raise, never a silent wrong number."""

from __future__ import annotations

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


def test_embedding_reused_as_output_head_by_matmul_is_refused() -> None:
    with pytest.raises(ValueError, match=r"parameter 'embed\.weight' received a gradient that the per-sample hooks do not explain.*x @ embed\.weight\.T"):
        per_sample_sq_norms(MatmulTiedLM().double(), nn.CrossEntropyLoss(), torch.randint(0, 7, (B, 5)), classes(7))


def test_parameter_also_used_through_a_functional_call_is_refused() -> None:
    with pytest.raises(ValueError, match=r"parameter 'a\.weight' received a gradient"):
        per_sample_sq_norms(FunctionalReuse().double(), nn.CrossEntropyLoss(), torch.randn(B, 3, dtype=torch.float64), classes())


def test_positions_broadcast_over_the_batch_are_refused() -> None:
    with pytest.raises(ValueError, match=r"layer 'position' \(Embedding\): its input is the same for every sample.*expand"):
        per_sample_sq_norms(BroadcastPositions().double(), nn.CrossEntropyLoss(), torch.randint(0, 11, (B, B)), classes())


def test_custom_layer_that_mixes_samples_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Centre(), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match=r"parameter '1\.scale' received a gradient.*mixes samples"):
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
    assert len(calls) == 3 + 2  # three measured steps, plus the probe's two forward passes once
    engine = PerSampleNormEngine(model, check="every_call")
    with engine:
        criterion(model(torch.randn(B, B, 3, dtype=torch.float64)), classes()).backward()
    assert len(calls) == 6 + 2 and engine._verify


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
