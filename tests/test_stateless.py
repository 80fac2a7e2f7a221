"""gradiv_lib.stateless: calling a module with other tensors, without torch.func.functional_call's corruption of
a module registered under two names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.func import functional_call as torch_functional_call

from gradiv_lib.norms import DiversityMeter
from gradiv_lib.sharpness import flat_gradient, hessian_top_eigenvalue
from gradiv_lib.stateless import functional_call, reparametrized


class Aliased(nn.Module):
    """One Linear registered under two names (``self.b = self.a``), applied twice, and a root parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.head = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b(self.a(x).tanh()).tanh()) / self.temperature


class Tied(nn.Module):
    """A Parameter shared by two different modules (decoder weight = encoder weight, transposed use)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight
        self.register_buffer("shift", torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(self.enc(x).tanh()) + self.shift


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _parameter_objects(model: nn.Module) -> list[tuple[str, int, type]]:
    return [(name, id(p), type(p)) for name, p in model.named_parameters(remove_duplicate=False)]


def test_torch_functional_call_corrupts_a_module_registered_under_two_names() -> None:
    """The reason for this module (torch 2.13): afterwards the model holds plain tensors where its Parameters were.
    If a later torch fixes it, this test says so, and the workaround can go."""
    model = Aliased().double()
    torch_functional_call(model, _params(model), (torch.randn(2, 4, dtype=torch.float64),))
    assert type(model.a.weight) is not nn.Parameter


@pytest.mark.parametrize("transform", ["plain", "grad", "vmap_grad"])
def test_the_model_keeps_its_parameters_and_the_values_match(transform: str) -> None:
    torch.manual_seed(0)
    model = Aliased().double()
    before = _parameter_objects(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    theta = {name: p + 0.1 for name, p in _params(model).items()}

    def loss(p: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(model, p, (xb,)).square().sum()

    if transform == "plain":
        got = functional_call(model, theta, (x,))
        reference = Aliased().double()
        reference.load_state_dict({**theta, "b.weight": theta["a.weight"], "b.bias": theta["a.bias"]})
        torch.testing.assert_close(got, reference(x))
    elif transform == "grad":
        g = grad(loss)(theta, x)
        live = {name: t.clone().requires_grad_() for name, t in theta.items()}
        expected = torch.autograd.grad(loss(live, x), list(live.values()))
        for name, e in zip(live, expected):
            torch.testing.assert_close(g[name], e)
    else:
        per_sample = vmap(grad(loss), in_dims=(None, 0))(theta, x.unsqueeze(1))
        for i in range(3):
            one = grad(loss)(theta, x[i:i + 1])
            for name in theta:
                torch.testing.assert_close(per_sample[name][i], one[name])
    assert _parameter_objects(model) == before


def test_a_parameter_tied_across_modules_is_replaced_in_both_and_buffers_too() -> None:
    """As torch's tie_weights=True: the tensor given for enc.weight is used by dec too (one name in
    named_parameters, two slots)."""
    model = Tied().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    w, shift = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    got = functional_call(model, {"enc.weight": w, "shift": shift}, (x,))
    torch.testing.assert_close(got, (x @ w.t()).tanh() @ w.t() + shift)
    assert model.dec.weight is model.enc.weight and type(model.enc.weight) is nn.Parameter
    assert not model.shift.any()
    # a sequence of dicts, as torch's (params, buffers)
    torch.testing.assert_close(functional_call(model, ({"enc.weight": w}, {"shift": shift}), (x,)), got)


def test_the_originals_are_restored_when_the_call_raises() -> None:
    model = Aliased().double()
    before = _parameter_objects(model)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        functional_call(model, _params(model), (torch.randn(2, 5, dtype=torch.float64),))
    assert _parameter_objects(model) == before
    with pytest.raises(KeyError, match="'a.scale' is neither a parameter nor a buffer of Aliased"):
        with reparametrized(model, {"a.scale": torch.ones(())}):
            pass
    no_bias = nn.Linear(4, 4, bias=False)
    with pytest.raises(KeyError, match="'bias' of Linear is None, so it cannot be replaced"):
        functional_call(no_bias, {"bias": torch.zeros(4)}, (torch.randn(2, 4),))
    assert no_bias.bias is None


def test_the_meter_leaves_a_model_with_an_aliased_module_intact_and_measures_it() -> None:
    """The root has a parameter of its own, so the torch.func fallback recomputes the whole model. Through torch's
    functional_call that replaced the model's Parameters by plain tensors: the optimizer's Parameters were no
    longer the model's, and the next measurement refused the model as changed."""
    torch.manual_seed(0)
    model = Aliased().double()
    before = _parameter_objects(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = []
    for i in range(6):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append(sum(p.grad.double().square().sum() for p in model.parameters()))
    meter = DiversityMeter(model)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with meter:
            F.cross_entropy(model(x), y).backward()
        torch.testing.assert_close(meter.sq_norms, torch.stack(expected), rtol=1e-10, atol=1e-12)
        assert _parameter_objects(model) == before


def test_sharpness_leaves_a_model_with_an_aliased_module_intact() -> None:
    torch.manual_seed(0)
    model = Aliased().double()
    before = _parameter_objects(model)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    g = flat_gradient(model, loss_fn, x, y)
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    hessian_top_eigenvalue(model, loss_fn, x, y, iters=3)
    assert _parameter_objects(model) == before


def test_the_simulator_on_a_model_with_an_aliased_module_and_a_scalar_parameter() -> None:
    """Both failed before: the 0-d temperature made FlatSpec.views call view() with no sizes (a TypeError in every
    backend of the simulator, in sharpness and in the federation), and the aliased module came out of
    functional_call as plain tensors. The stacked backends now equal the loop, and the model keeps its Parameters."""
    from gradiv_lib.workers.algorithms import DSGD, SGD
    from gradiv_lib.workers.simulator import Simulator
    from gradiv_lib.workers.topology import ring

    torch.manual_seed(0)
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    params = {}
    for backend in ("loop", "vmap", "vmap_grad"):
        torch.manual_seed(1)
        model = Aliased().double()
        before = _parameter_objects(model)
        sim = Simulator(model, (x, y), DSGD(ring(4)), SGD(0.3), batch_size=8, backend=backend)
        sim.run(4, record_every=0)
        assert set(sim.evaluate()) >= {"loss", "accuracy"}
        params[backend] = sim.params
        assert _parameter_objects(model) == before
    for backend in ("vmap", "vmap_grad"):
        torch.testing.assert_close(params[backend], params["loop"], rtol=1e-10, atol=1e-12)
    assert not torch.equal(params["loop"][:, -1], torch.ones(4, dtype=torch.float64))  # the temperature trained


class Keyworded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        return self.fc(x) * scale


def test_keyword_arguments_and_a_single_tensor_for_args() -> None:
    """As torch's: ``args`` may be one tensor instead of a tuple, and ``kwargs`` reach the forward."""
    model = Keyworded().double()
    x = torch.randn(2, 4, dtype=torch.float64)
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = (x @ w.t() + b) * 3.0
    torch.testing.assert_close(functional_call(model, {"fc.weight": w, "fc.bias": b}, x, {"scale": 3.0}), expected)
    torch.testing.assert_close(functional_call(model, {"fc.weight": w, "fc.bias": b}, (x,), {"scale": 3.0}), expected)


def test_tensors_not_named_keep_their_values() -> None:
    """Only the named tensors are replaced; the others (here a bias-free layer's None slot too) stay the module's."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    got = functional_call(model, {"2.weight": w}, (x,))
    torch.testing.assert_close(got, torch.tanh(x @ model[0].weight.t()) @ w.t() + model[2].bias)
    assert type(model[2].weight) is nn.Parameter and model[0].bias is None
