"""Per-sample squared gradient norms (gradiv_lib.norms) against torch.func per-sample gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradiv_lib.diversity import gradient_diversity
from gradiv_lib.norms import (
    DiversityMeter,
    PerSampleNormEngine,
    per_sample_sq_norms,
    per_sample_sq_norms_and_grad_sum,
)
from gradiv_lib.norms import fallback, rules

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


def reference(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample squared norms and ‖Σ g_i‖² from vmap(grad) of ℓ_i = loss_fn(sample i alone)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1).double()
    return flat.square().sum(1), flat.sum(0).square().sum()


def check(model: nn.Module, loss_fn, x: Tensor, y: Tensor, *, strategy: str = "auto") -> None:
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE[dtype]
    sq_norms, sq_norm_of_sum, _ = per_sample_sq_norms_and_grad_sum(model, loss_fn, x, y, sequence_strategy=strategy)
    expected, expected_sum = reference(model, loss_fn, x, y)
    assert sq_norms.dtype == dtype and sq_norms.shape == (x.shape[0],)
    torch.testing.assert_close(sq_norms.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    torch.testing.assert_close(sq_norm_of_sum, expected_sum, rtol=tol, atol=tol * float(expected.sum()))


def classes(batch: int, count: int = 3) -> Tensor:
    return torch.randint(0, count, (batch,))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one torch thread for the whole module (tests/conftest.py)."""


# --- Linear ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d_mse_and_cross_entropy(dtype: torch.dtype, bias: bool) -> None:
    model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)).to(dtype)
    x = torch.randn(7, 6, dtype=dtype)
    check(model, nn.MSELoss(), x, torch.randn(7, 3, dtype=dtype))
    check(model, nn.CrossEntropyLoss(), x, classes(7))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", ["gram", "materialize", "auto"])
def test_linear_on_sequences_each_branch(dtype: torch.dtype, strategy: str) -> None:
    model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 4)).to(dtype)
    x = torch.randn(6, 7, 5, dtype=dtype)
    check(model, nn.MSELoss(reduction="sum"), x, torch.randn(6, 7, 4, dtype=dtype), strategy=strategy)


def test_linear_on_4d_inputs() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(2 * 5 * 4, 2)).double()
    check(model, nn.CrossEntropyLoss(), torch.randn(4, 2, 5, 3, dtype=torch.float64), classes(4, 2))


def test_gram_and_materialize_agree_with_each_other_on_long_sequences() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten()).double()
    x, y = torch.randn(3, 40, 3, dtype=torch.float64), torch.randn(3, 80, dtype=torch.float64)
    gram = per_sample_sq_norms(model, nn.MSELoss(), x, y, sequence_strategy="gram")
    materialized = per_sample_sq_norms(model, nn.MSELoss(), x, y, sequence_strategy="materialize")
    torch.testing.assert_close(gram, materialized)


# --- convolutions -------------------------------------------------------------------------------

CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2, dilation=2, padding=2, bias=False),
    dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=3, groups=4, stride=2, dilation=2, bias=False),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="circular", stride=3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", CONV_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_conv1d(dtype: torch.dtype, options: dict) -> None:
    conv = nn.Conv1d(4, 8, **options)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).to(dtype)
    x = torch.randn(5, 4, 13, dtype=dtype)
    model(x)
    check(model, nn.CrossEntropyLoss(), x, classes(5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", CONV_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_conv2d(dtype: torch.dtype, options: dict) -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, **options), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(dtype)
    x = torch.randn(4, 4, 9, 11, dtype=dtype)
    model(x)
    check(model, nn.MSELoss(), x, torch.randn(4, 3, dtype=dtype))


def test_conv2d_rectangular_kernel_and_stride() -> None:
    model = nn.Sequential(nn.Conv2d(2, 6, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(3, 2, 8, 9, dtype=torch.float64)
    model(x)
    check(model, nn.CrossEntropyLoss(), x, classes(3, 2))


@pytest.mark.parametrize("method", ["gram", "im2col", "grouped_conv"])
@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), nn.Conv2d(4, 6, 3, dilation=2, padding="same", groups=2, bias=False)], ids=["1d", "2d"])
def test_every_conv_method_matches_reference(method: str, conv: nn.Module) -> None:
    conv = conv.double()
    x = torch.randn(5, 4, *([9] * (conv.weight.dim() - 2)), dtype=torch.float64)
    model = nn.Sequential(conv, nn.Flatten())
    y = torch.randn(5, model(x).shape[1], dtype=torch.float64)
    expected, _ = reference(model, nn.MSELoss(reduction="sum"), x, y)
    out = conv(x)
    g = 2 * (out - y.view_as(out)).detach()
    compute = {"gram": rules._conv_weight_sq_norms_gram, "im2col": rules._conv_weight_sq_norms_im2col, "grouped_conv": rules._conv_weight_sq_norms_grouped_conv}[method]
    torch.testing.assert_close(compute(conv, x, g), expected)


def test_unbatched_conv_input_is_refused() -> None:
    model = nn.Conv1d(2, 3, 3)
    with PerSampleNormEngine(model):
        with pytest.raises(ValueError, match=r"unbatched input of shape \(2, 7\)"):
            model(torch.randn(2, 7))


# --- embeddings and normalisation -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_with_repeated_indices_and_padding(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3)).to(dtype)
    ids = torch.tensor([[1, 1, 1, 2, 0], [3, 4, 3, 0, 0], [5, 5, 5, 5, 5], [0, 0, 0, 0, 1]])
    check(model, nn.CrossEntropyLoss(), ids, classes(4))


def test_embedding_one_token_per_sample() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)).double()
    check(model, nn.CrossEntropyLoss(), torch.tensor([0, 4, 4, 2]), classes(4, 2))


def test_embedding_scale_grad_by_freq_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Embedding '0' has scale_grad_by_freq=True"):
        PerSampleNormEngine(nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,normalized", [((6, 5), (5,)), ((6, 4, 5), (5,)), ((6, 3, 4, 5), (4, 5))])
def test_layer_norm(dtype: torch.dtype, shape: tuple, normalized: tuple) -> None:
    layer_norm = nn.LayerNorm(normalized)
    with torch.no_grad():
        layer_norm.weight.normal_()
        layer_norm.bias.normal_()
    model = nn.Sequential(layer_norm, nn.Flatten(), nn.LazyLinear(2)).to(dtype)
    x = torch.randn(*shape, dtype=dtype) * 2 + 1
    model(x)
    check(model, nn.CrossEntropyLoss(), x, classes(shape[0], 2))


def test_layer_norm_without_bias() -> None:
    model = nn.Sequential(nn.LayerNorm(5, bias=False), nn.Linear(5, 2)).double()
    check(model, nn.CrossEntropyLoss(), torch.randn(4, 5, dtype=torch.float64), classes(4, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 6, 7), (5, 6, 3, 4)])
def test_group_norm(dtype: torch.dtype, shape: tuple) -> None:
    group_norm = nn.GroupNorm(3, 6)
    with torch.no_grad():
        group_norm.weight.normal_()
        group_norm.bias.normal_()
    model = nn.Sequential(group_norm, nn.Flatten(), nn.LazyLinear(2)).to(dtype)
    x = torch.randn(*shape, dtype=dtype) * 3 - 1
    model(x)
    check(model, nn.CrossEntropyLoss(), x, classes(shape[0], 2))


def test_group_norm_with_frozen_weight_counts_bias_only() -> None:
    group_norm = nn.GroupNorm(2, 4)
    group_norm.weight.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), group_norm, nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    model(x)
    check(model, nn.CrossEntropyLoss(), x, classes(3, 2))


@pytest.mark.parametrize("layer,shape", [(nn.BatchNorm1d(4), (5, 4)), (nn.BatchNorm1d(4), (5, 4, 6)), (nn.BatchNorm2d(4), (5, 4, 3, 3))])
def test_batch_norm_in_eval_mode(layer: nn.Module, shape: tuple) -> None:
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2)).double()
    model(torch.randn(*shape, dtype=torch.float64) * 2 + 3)  # train-mode call: sets running statistics
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    model.eval()
    check(model, nn.CrossEntropyLoss(), torch.randn(*shape, dtype=torch.float64), classes(shape[0], 2))


@pytest.mark.parametrize("track_running_stats", [True, False])
def test_train_mode_batch_norm_raises_naming_the_layer(track_running_stats: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4, track_running_stats=track_running_stats)), nn.Linear(4, 2))
    if not track_running_stats:
        model.eval()  # without running statistics even eval mode normalises with batch statistics
    with pytest.raises(ValueError, match=r"BatchNorm layer '1\.0' \(BatchNorm1d\).*model\.eval\(\).*GroupNorm"):
        per_sample_sq_norms(model, nn.CrossEntropyLoss(), torch.randn(5, 3), classes(5, 2))


@pytest.mark.parametrize(
    "layer,shape",
    [(nn.Linear(3, 2), (4, 3)), (nn.Conv2d(2, 3, 3), (4, 2, 5, 5)), (nn.GroupNorm(2, 4), (4, 4, 3)), (nn.LayerNorm(3), (4, 3)), (nn.BatchNorm1d(3).eval(), (4, 3))],
)
def test_saved_forward_state_holds_no_autograd_graph(layer: nn.Module, shape: tuple) -> None:
    """A hook on a node that keeps a tensor whose grad_fn is that node is a reference cycle that
    leaks the graph (and its activations) every step."""
    x = torch.randn(*shape, requires_grad=True)
    saved = rules.LAYER_RULES[type(layer)].save(layer, x, layer(x))
    tensors = saved if isinstance(saved, tuple) else (saved,)
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)


def test_saved_activations_are_released_when_their_hook_fires() -> None:
    """Hooks live as long as the graph (until the user drops ``loss``); the activations they saved
    must not, or the meter would keep every layer input alive after the backward pass."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    outputs: list[Tensor] = []
    model[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    with DiversityMeter(model):
        loss = nn.CrossEntropyLoss()(model(torch.randn(5, 3)), classes(5, 2))
        hooks = list(outputs[0]._backward_hooks.values())
        assert hooks and all(hook._saved is not None for hook in hooks)
        loss.backward()
    assert all(hook._saved is None for hook in hooks)


# --- parameter sharing, freezing, mixed models -----------------------------------------------------


class LinearTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TiedLanguageModel(nn.Module):
    def __init__(self, vocabulary: int = 7, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocabulary)
        self.out.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.norm(self.embed(ids))).transpose(1, 2)  # [B, V, T] for cross-entropy


def test_same_linear_used_twice() -> None:
    check(LinearTwice().double(), nn.CrossEntropyLoss(), torch.randn(5, 4, dtype=torch.float64), classes(5, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_tied_to_output_weight(dtype: torch.dtype) -> None:
    ids = torch.tensor([[1, 2, 1, 3], [4, 4, 4, 0], [6, 5, 1, 2]])
    check(TiedLanguageModel().to(dtype), nn.CrossEntropyLoss(), ids, torch.randint(0, 7, (3, 4)))


def test_frozen_parameters_are_excluded() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    check(model, nn.CrossEntropyLoss(), torch.randn(6, 4, dtype=torch.float64), classes(6, 2))


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.L1Loss(reduction="sum"), nn.SmoothL1Loss(), nn.HuberLoss()])
def test_an_elementwise_loss_that_would_broadcast_outputs_against_targets_is_refused(loss_fn: nn.Module) -> None:
    """A (B, 1) output and (B,) targets broadcast to (B, B): every output is compared with every target, so
    the loss mixes the samples and every per-sample gradient is wrong; PyTorch only warns."""
    model, x = nn.Linear(3, 1).double(), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"got outputs of shape \(5, 1\) and targets of shape \(5,\).*y.view\(-1, 1\)"):
        per_sample_sq_norms(model, loss_fn, x, torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="would broadcast them"):
        gradient_diversity(model, loss_fn, x, torch.randn(5, dtype=torch.float64))
    y = torch.randn(5, 1, dtype=torch.float64)  # the same shape: measured, and equal to the definition
    torch.testing.assert_close(per_sample_sq_norms(model, loss_fn, x, y), reference(model, loss_fn, x, y)[0])


def test_model_without_trainable_parameters_is_refused() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"model \(Linear\) has no trainable parameters"):
        per_sample_sq_norms(model, nn.MSELoss(), torch.randn(2, 3), torch.randn(2, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_cnn_with_group_norm(dtype: torch.dtype) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 5),
    ).to(dtype)
    check(model, nn.CrossEntropyLoss(), torch.randn(6, 3, 8, 8, dtype=dtype), classes(6, 5))


def test_in_place_activations_after_hooked_layers() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(36, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)
    ).double()
    check(model, nn.CrossEntropyLoss(), torch.randn(4, 2, 5, 5, dtype=torch.float64), classes(4, 2))


class TinyTransformerBlock(nn.Module):
    """Embedding, LayerNorm, a token-mixing Linear over positions and a feed-forward block."""

    def __init__(self, vocabulary: int = 11, width: int = 6, length: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.norm1 = nn.LayerNorm(width)
        self.mix = nn.Linear(length, length)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        h = h + self.mix(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.down(torch.relu(self.up(self.norm2(h))))
        return self.head(h.mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", ["auto", "gram", "materialize"])
def test_small_transformer_block(dtype: torch.dtype, strategy: str) -> None:
    check(TinyTransformerBlock().to(dtype), nn.CrossEntropyLoss(), torch.randint(0, 11, (4, 5)), classes(4), strategy=strategy)


# --- the torch.func fallback -----------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha


class GatedBlock(nn.Module):
    """Own parameter plus a child Linear: the fallback handles the whole subtree."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x: Tensor, *, temperature: float = 1.0) -> Tensor:
        return self.inner(x) * torch.sigmoid(self.gate / temperature)


def test_unknown_layer_falls_back_with_one_warning() -> None:
    fallback._warned_layer_types.discard(Scale)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), classes(5, 2)
    with pytest.warns(UserWarning, match=r"no per-sample norm rule for layer type Scale") as record:
        check(model, nn.CrossEntropyLoss(), x, y)
    assert sum("Scale" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(model, nn.CrossEntropyLoss(), x, y)


def test_fallback_handles_a_subtree_with_keyword_arguments() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = GatedBlock()
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.block(x, temperature=2.0))

    with pytest.warns(UserWarning, match="GatedBlock"):
        fallback._warned_layer_types.discard(GatedBlock)
        check(Model().double(), nn.CrossEntropyLoss(), torch.randn(4, 4, dtype=torch.float64), classes(4, 2))


def test_fallback_for_multihead_attention_with_tuple_output() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.attention(x, x, x)
            return self.head(out.mean(1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(Attention().double(), nn.CrossEntropyLoss(), torch.randn(3, 5, 4, dtype=torch.float64), classes(3, 2))


def test_parameter_used_outside_its_module_is_reported() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(nn.functional.linear(x, self.a.weight))

    with pytest.raises(ValueError, match=r"parameters \['a.weight'\] received gradients"):
        per_sample_sq_norms(Leaky(), nn.CrossEntropyLoss(), torch.randn(4, 3), classes(4, 2))


def test_layer_that_is_not_batch_first_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Unflatten(1, (3, 1)), nn.Flatten(0, 1), nn.Linear(1, 2))
    with pytest.raises(ValueError, match=r"layer '3' \(Linear\) received a tensor of shape \(12, 1\).*batch has 4 samples"):
        per_sample_sq_norms(model, lambda out, y: out.sum(), torch.randn(4, 3), torch.zeros(4))


# --- loss reductions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64), reduction="sum"),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        lambda out, y: nn.functional.cross_entropy(out, y),
        lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum"),
        lambda out, y: (out.logsumexp(1) - out.gather(1, y[:, None]).squeeze(1)).mean(),
    ],
    ids=["sum", "weighted-sum", "mean-smoothing", "callable-mean", "callable-sum", "callable-manual"],
)
def test_loss_reductions_give_per_sample_loss_gradients(loss_fn) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    check(model, loss_fn, torch.randn(6, 4, dtype=torch.float64), classes(6))


def test_class_weighted_mean_cross_entropy_is_not_a_mean_over_samples() -> None:
    model = nn.Linear(4, 3).double()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="neither the sum .* nor the mean"):
        per_sample_sq_norms(model, loss_fn, torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 1]))


def test_sequence_cross_entropy_mean_over_tokens() -> None:
    model = TiedLanguageModel().double()
    ids, targets = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    check(model, nn.CrossEntropyLoss(), ids, targets)
    check(model, nn.CrossEntropyLoss(ignore_index=3), ids, torch.where(targets == 3, 2, targets))


def test_non_scalar_loss_is_refused() -> None:
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor .* got \(4,\)"):
        per_sample_sq_norms(nn.Linear(3, 2), nn.CrossEntropyLoss(reduction="none"), torch.randn(4, 3), classes(4, 2))


# --- validation ------------------------------------------------------------------------------------


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"inputs has batch size 0 \(shape \(0, 3\)\); a batch needs at least 1 sample"):
        per_sample_sq_norms(nn.Linear(3, 2), nn.MSELoss(), torch.randn(0, 3), torch.randn(0, 2))


def test_inputs_and_targets_must_have_the_same_batch() -> None:
    with pytest.raises(ValueError, match=r"targets has 5 samples .* but inputs has 4"):
        per_sample_sq_norms(nn.Linear(3, 2), nn.MSELoss(), torch.randn(4, 3), torch.randn(5, 2))


def test_inputs_must_be_tensors() -> None:
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        per_sample_sq_norms(nn.Linear(3, 2), nn.MSELoss(), [[1.0, 2.0, 3.0]], torch.randn(1, 2))


def test_non_finite_loss_is_refused() -> None:
    x = torch.randn(3, 3)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the loss is not finite \(nan\)"):
        per_sample_sq_norms(nn.Linear(3, 2), nn.MSELoss(), x, torch.randn(3, 2))


def test_non_finite_gradients_are_refused() -> None:
    model = nn.Linear(3, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)

    def root_loss(out: Tensor, y: Tensor) -> Tensor:  # d/dx sqrt|x| is infinite at 0
        return (out - y).abs().sqrt().sum()

    with pytest.raises(ValueError, match=r"non-finite per-sample gradient norms for samples \[0, 1\]"):
        per_sample_sq_norms(model, root_loss, torch.randn(2, 3), torch.zeros(2, 1))


def test_unknown_check_is_refused() -> None:
    with pytest.raises(ValueError, match=r"check must be one of \('first_call', 'every_call', 'off'\), got 'sometimes'"):
        PerSampleNormEngine(nn.Linear(3, 2), check="sometimes")


def test_lstm_batch_first_is_measured_not_refused() -> None:
    """Its h_n is (num_layers, B, H): the old shape check refused it with 'use batch_first=True'."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.lstm(x)[1][0][-1])

    model = Classifier().double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), classes(5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y)
    expected = torch.stack([
        sum(g.square().sum() for g in torch.autograd.grad(nn.CrossEntropyLoss()(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())))
        for i in range(5)
    ])
    torch.testing.assert_close(got, expected)


def test_unknown_sequence_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sequence_strategy must be one of \('auto', 'gram', 'materialize'\), got 'fast'"):
        per_sample_sq_norms(nn.Linear(3, 2), nn.MSELoss(), torch.randn(2, 3), torch.randn(2, 2), sequence_strategy="fast")


# --- function API side effects -----------------------------------------------------------------------


def test_function_api_works_under_no_grad() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), classes(5, 2)
    with torch.no_grad():
        inside = per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(inside, per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y))


def test_function_api_leaves_grad_untouched_and_returns_the_loss() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), classes(5, 2)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    sq_norms, _, loss = per_sample_sq_norms_and_grad_sum(model, nn.CrossEntropyLoss(), x, y)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None
    torch.testing.assert_close(loss, nn.CrossEntropyLoss()(model(x), y))
    torch.testing.assert_close(per_sample_sq_norms(model, nn.CrossEntropyLoss(), x, y), sq_norms)


# --- DiversityMeter ----------------------------------------------------------------------------------


def _meter_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_meter_leaves_grad_exactly_as_without_it(reduction: str) -> None:
    model = _meter_model()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), classes(6)
    criterion = nn.CrossEntropyLoss(reduction=reduction)
    criterion(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with DiversityMeter(model, loss_reduction=reduction) as meter:
        criterion(model(x), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
    reference_result = gradient_diversity(model, criterion, x, y)
    assert meter.result.n == 6
    assert meter.result.sum_sq_norms == pytest.approx(reference_result.sum_sq_norms, rel=1e-10)
    assert meter.result.sq_norm_of_sum == pytest.approx(reference_result.sq_norm_of_sum, rel=1e-10)
    expected_norms, _ = reference(model, criterion, x, y)
    torch.testing.assert_close(meter.sq_norms, expected_norms)


def test_meter_ignores_gradients_accumulated_before_its_backward_pass() -> None:
    model = _meter_model()
    criterion = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), classes(4)
    criterion(model(torch.randn(4, 2, 5, 5, dtype=torch.float64)), classes(4)).backward()  # stale grads
    with DiversityMeter(model) as meter:
        criterion(model(x), y).backward()
    assert meter.result.diversity == pytest.approx(gradient_diversity(model, criterion, x, y).diversity, rel=1e-10)


def test_meter_requires_exactly_one_backward_pass() -> None:
    model = _meter_model()
    criterion = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), classes(4)
    with DiversityMeter(model) as meter:
        pass
    with pytest.raises(RuntimeError, match="no gradient reached the model's trainable parameters"):
        meter.result
    with DiversityMeter(model) as meter:
        criterion(model(x), y).backward()
        criterion(model(x), y).backward()
    with pytest.raises(RuntimeError, match="2 backward passes reached the parameters"):
        meter.result


def test_meter_validates_loss_reduction() -> None:
    with pytest.raises(ValueError, match=r"loss_reduction must be one of \('mean', 'sum'\), got 'none'"):
        DiversityMeter(nn.Linear(2, 2), loss_reduction="none")


def test_meter_skips_no_grad_forward_passes() -> None:
    model = _meter_model()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), classes(4)
    with DiversityMeter(model) as meter:
        with torch.no_grad():
            model(torch.randn(7, 2, 5, 5, dtype=torch.float64))  # evaluation on another batch: ignored
        nn.CrossEntropyLoss()(model(x), y).backward()
    assert meter.result.n == 4


# --- property tests over random shapes --------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    positions=st.sampled_from([None, 1, 3]),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
    strategy=st.sampled_from(["auto", "gram", "materialize"]),
)
def test_linear_property(batch: int, positions: int | None, d_in: int, d_out: int, bias: bool, strategy: str) -> None:
    torch.manual_seed(batch * 100 + d_in * 10 + d_out)
    shape = (batch, d_in) if positions is None else (batch, positions, d_in)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias), nn.Flatten()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    check(model, nn.MSELoss(reduction="sum"), x, torch.randn(batch, model(x).shape[1], dtype=torch.float64), strategy=strategy)


@st.composite
def conv_configurations(draw: st.DrawFn) -> dict:
    groups, kernel, dilation, padding = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    smallest = max(1, dilation * (kernel - 1) + 1 - 2 * padding)
    return dict(
        in_channels=groups * draw(st.integers(1, 2)), out_channels=groups * draw(st.integers(1, 2)), kernel_size=kernel,
        stride=draw(st.integers(1, 3)), padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()),
        batch=draw(st.integers(1, 4)), size=draw(st.integers(smallest, smallest + 6)), two_d=draw(st.booleans()),
        strategy=draw(st.sampled_from(["auto", "gram", "materialize"])),
    )


@settings(max_examples=30, deadline=None)
@given(config=conv_configurations())
def test_conv_property(config: dict) -> None:
    torch.manual_seed(config["size"])
    batch, size, two_d, strategy = (config.pop(k) for k in ("batch", "size", "two_d", "strategy"))
    layer = (nn.Conv2d if two_d else nn.Conv1d)(**config).double()
    model = nn.Sequential(layer, nn.Flatten())
    x = torch.randn(batch, config["in_channels"], *([size] * (2 if two_d else 1)), dtype=torch.float64)
    y = torch.randn(batch, model(x).shape[1], dtype=torch.float64)
    check(model, nn.MSELoss(reduction="sum"), x, y, strategy=strategy)


@pytest.mark.parametrize("method", ["gram", "im2col", "grouped_conv"])
@pytest.mark.parametrize(
    "conv",
    [nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), nn.Conv2d(4, 6, 3, dilation=2, padding="same", groups=2), nn.Conv2d(3, 5, 2, padding=1)],
    ids=["1d-groups", "2d-groups-same", "2d"],
)
def test_every_conv_method_includes_a_trainable_bias(method: str, conv: nn.Module) -> None:
    """The conv methods fold the bias into the same computation (a row of ones / Gram + 1)."""
    conv = conv.double()
    x = torch.randn(5, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=torch.float64)
    model = nn.Sequential(conv, nn.Flatten())
    y = torch.randn(5, model(x).shape[1], dtype=torch.float64)
    expected, _ = reference(model, nn.MSELoss(reduction="sum"), x, y)
    g = 2 * (conv(x) - y.view_as(conv(x))).detach()
    compute = {"gram": rules._conv_sq_norms_gram, "im2col": rules._conv_sq_norms_im2col, "grouped_conv": rules._conv_sq_norms_grouped_conv}[method]
    torch.testing.assert_close(compute(conv, x, g, True), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv1d(3, 5, 4, dilation=2, padding=3, bias=False),
        nn.Conv1d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
        nn.Conv1d(1, 3, 5, stride=3),
        nn.Conv1d(6, 6, 2, stride=2, dilation=3, groups=3, padding=2, padding_mode="circular"),
    ],
    ids=["stride-groups", "dilation-nobias", "same-reflect", "stride3", "circular-groups"],
)
def test_conv1d_shifted_gram_matches_the_per_sample_loop(conv: nn.Module) -> None:
    """Patch Gram = sum of shifted windows of the channel Gram of the padded input (no im2col)."""
    conv = conv.double()
    x = torch.randn(5, conv.in_channels, 17, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    params = [p for p in conv.parameters()]
    expected = torch.stack([
        sum(t.square().sum() for t in torch.autograd.grad(conv(x[i : i + 1]), params, g[i : i + 1])) for i in range(5)
    ])
    got = rules._conv1d_sq_norms_shifted_gram(conv, x, g, conv.bias is not None)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    for strategy in ("auto", "gram"):
        torch.testing.assert_close(rules._conv_sq_norms(conv, x, g, strategy), expected, rtol=1e-9, atol=1e-12)
