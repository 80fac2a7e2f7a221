"""Tests of gradiv_lib.models: shapes, parameter counts, fixed-budget families, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradiv_lib.models import (
    ACTIVATIONS,
    FamilyMember,
    cnn,
    cnn1d,
    count_parameters,
    deep_linear,
    fixed_budget_family,
    mlp,
    parameters_for_width,
    resnet18_cifar,
    width_for_budget,
)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------ MLP, deep linear, CNN


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_mlp_shapes_depth_and_activation(depth: int) -> None:
    model = mlp(64, 32, depth, 10, activation="tanh")
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # images are flattened
    assert len(_linears(model)) == depth
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == depth - 1
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_deep_linear_has_no_activation_no_bias_and_fan_in_init() -> None:
    model = deep_linear(400, 300, 3, 5, seed=0)
    assert all(isinstance(m, (nn.Sequential, nn.Flatten, nn.Linear)) for m in model.modules())
    assert all(layer.bias is None for layer in _linears(model))
    std = _linears(model)[1].weight.std().item()
    assert std == pytest.approx(300**-0.5, rel=0.05)
    x = torch.randn(3, 400)
    product = torch.eye(400)
    for layer in _linears(model):
        product = layer.weight @ product
    assert torch.allclose(model(x), x @ product.T, atol=1e-4)


def test_he_init_and_seed_reproducibility_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mlp(500, 400, 2, 3, init="he", seed=7)
    b = mlp(500, 400, 2, 3, init="he", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert _linears(a)[0].weight.std().item() == pytest.approx((2 / 500) ** 0.5, rel=0.05)
    assert torch.count_nonzero(_linears(a)[0].bias) == 0


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_cnn_shapes_for_digits_and_cifar(norm: str) -> None:
    digits_net = cnn(1, 8, 3, 10, image_size=8, norm=norm)
    assert digits_net(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    cifar_net = cnn(3, 16, 6, 100, image_size=32, norm=norm)
    features = cifar_net[:-3](torch.randn(2, 3, 32, 32))  # before pooling and classifier
    assert features.shape == (2, 16, 4, 4)  # three halvings 32 → 4
    assert cifar_net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_cnn1d_halves_the_length_and_flattens() -> None:
    net = cnn1d(1, 8, 3, 10, length=40, kernel_size=5, seed=0)
    x = torch.randn(4, 1, 40)
    assert net[:-2](x).shape == (4, 8, 5)            # 40 -> 20 -> 10 -> 5
    assert net(x).shape == (4, 10)
    # parameters: conv 1*8*5+8, two convs 8*8*5+8, classifier 8*5*10+10
    assert count_parameters(net) == (8 * 5 + 8) + 2 * (8 * 8 * 5 + 8) + (8 * 5 * 10 + 10)
    odd = cnn1d(2, 4, 2, 3, length=41, kernel_size=3)
    assert odd[:-2](torch.randn(1, 2, 41)).shape == (1, 4, 11)   # ceil(41/2) = 21, ceil(21/2) = 11
    assert torch.equal(cnn1d(1, 8, 3, 10, 40, seed=0)[0].weight, net[0].weight)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        cnn1d(1, 8, 3, 10, 40, kernel_size=4)
    with pytest.raises(ValueError, match="length must be an integer >= 1, got 0"):
        cnn1d(1, 8, 3, 10, 0)


def test_builders_validate_arguments_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="width must be an integer >= 1, got 0"):
        mlp(4, 0, 2, 2)
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        cnn(3, 8, 0, 10, 32)
    with pytest.raises(ValueError, match="activation must be one of") as error:
        mlp(4, 4, 2, 2, activation="swish")
    assert all(name in str(error.value) for name in ACTIVATIONS)
    with pytest.raises(ValueError, match="norm must be one of 'group', 'batch', 'none'"):
        cnn(3, 8, 2, 10, 32, norm="layer")
    with pytest.raises(ValueError, match="norm must be one of 'batch', 'group'"):
        resnet18_cifar(norm="none")
    with pytest.raises(ValueError, match="width_multiplier must be a finite number > 0"):
        resnet18_cifar(width_multiplier=0)


# ------------------------------------------------------------------ parameter counts and budgets


@pytest.mark.parametrize("kind", ["mlp", "deep_linear", "cnn"])
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("width", [1, 7, 20])
def test_parameter_formula_matches_built_models(kind: str, depth: int, width: int) -> None:
    if kind == "cnn":
        for norm in ("group", "batch", "none"):
            model = cnn(3, width, depth, 10, image_size=16, norm=norm)
            assert parameters_for_width(kind, 3, 10, depth, width, norm=norm) == count_parameters(
                model
            )
    else:
        for bias in (True, False):
            builder = mlp if kind == "mlp" else deep_linear
            model = builder(12, width, depth, 5, bias=bias)
            assert parameters_for_width(kind, 12, 5, depth, width, bias=bias) == count_parameters(
                model
            )


@pytest.mark.parametrize("kind", ["mlp", "deep_linear", "cnn"])
@pytest.mark.parametrize("budget", [3_000, 20_000, 1_000_000])
def test_width_for_budget_is_the_closest_width(kind: str, budget: int) -> None:
    for depth in (2, 3, 6):
        width = width_for_budget(kind, 32, 10, depth, budget)
        gap = abs(parameters_for_width(kind, 32, 10, depth, width) - budget)
        for neighbour in (width - 1, width + 1):
            if neighbour >= 1:
                assert gap <= abs(parameters_for_width(kind, 32, 10, depth, neighbour) - budget)


def test_width_for_budget_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="depth=1 has no hidden layer"):
        width_for_budget("mlp", 10, 2, 1, 1000)
    with pytest.raises(ValueError, match="budget=10 is below"):
        width_for_budget("mlp", 10, 2, 3, 10)
    with pytest.raises(ValueError, match="kind must be one of 'mlp', 'deep_linear', 'cnn'"):
        width_for_budget("resnet", 10, 2, 3, 1000)


def test_fixed_budget_family_matches_budget_and_trades_width_for_depth() -> None:
    family = fixed_budget_family([2, 3, 4, 6], 2560, 32, 8, kind="deep_linear", seed=0)
    assert [(m.depth, m.width, m.n_params) for m in family] == [
        (2, 64, 2560),
        (3, 34, 2516),
        (4, 27, 2538),
        (6, 21, 2604),
    ]  # the chapter-3 table of the research notes
    depth, width, model, n_params = family[0]
    assert isinstance(family[0], FamilyMember) and (depth, width) == (2, 64)
    assert count_parameters(model) == n_params
    for kind, kwargs in (("mlp", {}), ("cnn", {"image_size": 32})):
        members = fixed_budget_family(
            [1, 2, 4, 8] if kind == "cnn" else [2, 4, 8],
            50_000,
            3 if kind == "cnn" else 64,
            10,
            kind=kind,
            **kwargs,
        )
        assert all(abs(m.n_params - 50_000) <= 0.05 * 50_000 for m in members)
        widths = [m.width for m in members]
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_fixed_budget_family_refuses_a_member_far_from_the_budget() -> None:
    with pytest.raises(ValueError, match="depth=12"):
        fixed_budget_family([2, 12], 200, 4, 2, kind="mlp")
    with pytest.raises(ValueError, match="image_size"):
        fixed_budget_family([2], 5000, 3, 10, kind="cnn")


# ------------------------------------------------------------------ ResNet-18


def test_resnet18_cifar_has_the_standard_parameter_count() -> None:
    model = resnet18_cifar(num_classes=10, width_multiplier=1.0)
    assert count_parameters(model) == 11_173_962
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.stem.kernel_size == (3, 3) and model.stem.stride == (1, 1)


def test_resnet18_width_multiplier_group_norm_and_shapes() -> None:
    small = resnet18_cifar(num_classes=100, width_multiplier=0.25, norm="group", seed=0)
    assert [stage[0].conv1.out_channels for stage in small.stages] == [16, 32, 64, 128]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 100)  # Tiny-ImageNet size
    assert count_parameters(small) < count_parameters(resnet18_cifar(100, 0.5, "group"))


def test_group_norm_keeps_samples_independent_and_train_batch_norm_does_not() -> None:
    """Why the docs ask for GroupNorm (or eval-mode BatchNorm) for per-sample gradients."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    group = resnet18_cifar(width_multiplier=0.125, norm="group", seed=0).train()
    assert torch.allclose(group(x)[:1], group(x[:1]), atol=1e-5)
    batch = resnet18_cifar(width_multiplier=0.125, norm="batch", seed=0).train()
    assert not torch.allclose(batch(x)[:2], batch(x[:2]), atol=1e-3)
    batch.eval()
    assert torch.allclose(batch(x)[:1], batch(x[:1]), atol=1e-5)


def test_count_parameters_trainable_only_and_shared_weights() -> None:
    model = mlp(4, 3, 2, 2)
    _linears(model)[0].weight.requires_grad_(False)
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    assert count_parameters(model, trainable_only=True) == 3 + 3 * 2 + 2
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, shared)) == 12
