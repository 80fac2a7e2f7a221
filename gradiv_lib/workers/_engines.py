"""Gradient engines of the stacked-replica simulator: M parameter vectors, M batches, M gradients.

All engines compute the same thing, ``grads[m] = ∇_w loss_fn(model_w(x[m]), y[m])`` at ``w = flat[m]``, and differ
only in how they batch the work (chapter 6 measures them; ``benchmarks/bench_workers.py`` times them):

* ``"bmm"``   — MLP families (``Sequential`` of ``Flatten``/``Linear``/elementwise activations): batched matrix
  products ``baddbmm`` over the stacked weights and one autograd backward;
* ``"vmap"``  — ``torch.func.vmap`` of ``functional_call`` over the stacked parameters, one autograd backward;
* ``"vmap_grad"`` — ``vmap(grad_and_value(...))``;
* ``"loop"``  — one ``functional_call`` and backward per worker (the reference way, always available).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vmap

from ..norms.rules import computes_its_class_formula
from ..stateless import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity)


class FlatSpec:
    """Where each trainable parameter of ``module`` lives in a flat vector of length ``P``.

    The order is ``module.named_parameters()`` (trainable ones only), the order of
    ``torch.nn.utils.parameters_to_vector(p for p in module.parameters() if p.requires_grad)``.
    """

    def __init__(self, module: nn.Module) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"model {type(module).__name__} has no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"all trainable parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"all trainable parameters must be on one device, got {sorted(map(str, devices))}")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)
        self.dtype = next(iter(dtypes))

    def flatten(self, module: nn.Module) -> Tensor:
        """The module's trainable parameters as one detached vector ``(P,)``."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` (``(P,)`` or ``(M, P)``) shaped like each parameter (leading ``M`` kept)."""
        lead = flat.shape[:-1]
        return [t.view((*lead, *s)) for t, s in zip(flat.split(self.numels, dim=-1), self.shapes)]  # a tuple: 0-d parameters too

    def as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: view}`` for ``functional_call``."""
        return dict(zip(self.names, self.views(flat)))

    def load_into(self, module: nn.Module, flat: Tensor) -> nn.Module:
        """Copy ``flat`` ``(P,)`` into ``module``'s parameters in place; returns ``module``."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, view in zip(self.names, self.views(flat)):
                params[name].copy_(view)
        return module


def per_worker_loss(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    """``(out (M, B, ...), y (M, B, ...)) -> (M,)``, each worker's loss; fast paths for the common mean losses."""
    if loss_fn is F.cross_entropy or (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None
                                      and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean"):
        def ce(out: Tensor, y: Tensor) -> Tensor:
            M, B = y.shape[:2]
            if y.dim() != 2 or out.dim() != 3:
                return vmap(F.cross_entropy)(out, y)
            return F.cross_entropy(out.reshape(M * B, -1), y.reshape(M * B), reduction="none").view(M, B).mean(1)
        return ce
    if loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        def mse(out: Tensor, y: Tensor) -> Tensor:
            M = out.shape[0]
            return F.mse_loss(out, y, reduction="none").reshape(M, -1).mean(1)
        return mse
    return vmap(loss_fn)


class Engine:
    """Base class: ``engine(flat, x, y) -> (grads (M, P), losses (M,))``."""

    name = "base"

    def __init__(self, module: nn.Module, loss_fn: LossFn, spec: FlatSpec) -> None:
        self.module, self.loss_fn, self.spec = module, loss_fn, spec

    def __call__(self, flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class LoopEngine(Engine):
    """One ``functional_call`` forward and autograd backward per worker."""

    name = "loop"

    def __call__(self, flat, x, y):
        M = flat.shape[0]
        grads = torch.empty_like(flat)
        losses = torch.empty(M, dtype=flat.dtype, device=flat.device)
        for m in range(M):
            leaves = [v.requires_grad_() for v in self.spec.views(flat[m].detach())]
            out = functional_call(self.module, dict(zip(self.spec.names, leaves)), (x[m],))
            loss = self.loss_fn(out, y[m])
            gs = torch.autograd.grad(loss, leaves)
            torch.cat([g.reshape(-1) for g in gs], out=grads[m])
            losses[m] = loss.detach()
        return grads, losses


class VmapEngine(Engine):
    """``vmap`` over the stacked parameters for the forward, one autograd backward of the summed losses."""

    name = "vmap"

    def __init__(self, module, loss_fn, spec):
        super().__init__(module, loss_fn, spec)
        self._forward = vmap(lambda p, xb: functional_call(module, p, (xb,)), randomness="different")
        self._losses = per_worker_loss(loss_fn)

    def __call__(self, flat, x, y):
        M = flat.shape[0]
        leaves = [v.requires_grad_() for v in self.spec.views(flat.detach())]
        out = self._forward(dict(zip(self.spec.names, leaves)), x)
        losses = self._losses(out, y)
        gs = torch.autograd.grad(losses.sum(), leaves)
        grads = torch.cat([g.reshape(M, -1) for g in gs], dim=1)
        return grads, losses.detach()


class VmapGradEngine(Engine):
    """``vmap(grad_and_value(loss))`` over the stacked parameters."""

    name = "vmap_grad"

    def __init__(self, module, loss_fn, spec):
        super().__init__(module, loss_fn, spec)

        def loss(p, xb, yb):
            return loss_fn(functional_call(module, p, (xb,)), yb)

        self._fn = vmap(grad_and_value(loss), randomness="different")

    def __call__(self, flat, x, y):
        M = flat.shape[0]
        gd, losses = self._fn(self.spec.as_dict(flat.detach()), x, y)
        grads = torch.cat([gd[n].reshape(M, -1) for n in self.spec.names], dim=1)
        return grads, losses.detach()


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _runs_more_than_its_class(module: nn.Module) -> bool:
    """Whether a call of ``module`` does more than its class's forward on its own parameters: forward or
    backward hooks (a user's output hook, torch.nn.utils.prune's masked weight), or what
    :func:`~gradiv_lib.norms.rules.computes_its_class_formula` rules out; the bmm engine, which reads the
    weights and applies the layers itself, would skip all of that."""
    return any(getattr(module, table, None) for table in _HOOK_TABLES) or not computes_its_class_formula(module)


def bmm_layers(module: nn.Module) -> list[nn.Module] | None:
    """The layers of an MLP-family ``Sequential`` (optional leading ``Flatten``, ``Linear``, elementwise
    activations), ``[module]`` for a single ``Linear`` (a linear model), or ``None`` when ``module`` is anything
    else."""
    if type(module) is nn.Linear:
        layers, containers = [module], ()
    elif type(module) is nn.Sequential:
        layers, containers = list(module), (module,)
    else:
        return None
    if any(_runs_more_than_its_class(m) for m in (*containers, *layers)):
        return None
    ok = False
    for i, layer in enumerate(layers):
        if type(layer) is nn.Flatten:
            if i != 0 or layer.start_dim != 1 or layer.end_dim != -1:
                return None
        elif type(layer) is nn.Linear:
            if not layer.weight.requires_grad or (layer.bias is not None and not layer.bias.requires_grad):
                return None
            ok = True
        elif not isinstance(layer, _ELEMENTWISE):
            return None
    return layers if ok else None


BmmPlan = list[tuple[str, int | None, int | None, nn.Module]]
"""One entry per layer of a :func:`bmm_layers` model: (``"linear"``, ``"flatten"`` or ``"act"``, index of the
weight in the flat spec, index of the bias or ``None``, the layer)."""


def bmm_plan(module: nn.Module, spec: FlatSpec) -> BmmPlan | None:
    """The layers of :func:`bmm_layers` with the places of their parameters in ``spec`` (``None`` where the model
    is not of that family): built once, read by :func:`bmm_forward` on every step."""
    layers = bmm_layers(module)
    if layers is None:
        return None
    names = {id(p): n for n, p in module.named_parameters()}
    index = {n: i for i, n in enumerate(spec.names)}
    plan: BmmPlan = []
    for layer in layers:
        if type(layer) is nn.Linear:
            bias = index[names[id(layer.bias)]] if layer.bias is not None else None
            plan.append(("linear", index[names[id(layer.weight)]], bias, layer))
        else:
            plan.append(("flatten" if type(layer) is nn.Flatten else "act", None, None, layer))
    return plan


def bmm_forward(plan: BmmPlan, views: list[Tensor], x: Tensor) -> Tensor:
    """The stacked forward pass ``(M, B, ...) -> (M, B, out)`` of a :func:`bmm_plan` model, the parameters given as
    ``spec.views`` of the ``(M, P)`` rows: ``baddbmm`` per Linear layer."""
    M, B = x.shape[:2]
    h = x
    for kind, w, b, layer in plan:
        if kind == "flatten":
            h = h.reshape(M, B, -1)
        elif kind == "linear":
            if h.dim() != 3:
                raise ValueError(f"bmm engine: Linear input must be (workers, batch, features), got {tuple(h.shape)}")
            W = views[w].transpose(1, 2)
            h = torch.baddbmm(views[b].unsqueeze(1), h, W) if b is not None else torch.bmm(h, W)
        else:
            h = layer(h)
    return h


class BmmEngine(Engine):
    """Stacked MLP with ``baddbmm``; inputs ``(M, B, d)`` (or images, with a leading ``Flatten``)."""

    name = "bmm"

    def __init__(self, module, loss_fn, spec):
        super().__init__(module, loss_fn, spec)
        plan = bmm_plan(module, spec)
        if plan is None:
            raise ValueError("the bmm engine needs an nn.Linear or an nn.Sequential of Flatten, Linear and elementwise activations")
        self._plan = plan
        self._losses = per_worker_loss(loss_fn)

    def __call__(self, flat, x, y):
        M = x.shape[0]
        leaves = [v.requires_grad_() for v in self.spec.views(flat.detach())]
        losses = self._losses(bmm_forward(self._plan, leaves, x), y)
        gs = torch.autograd.grad(losses.sum(), leaves)
        grads = torch.cat([g.reshape(M, -1) for g in gs], dim=1)
        return grads, losses.detach()


ENGINES: dict[str, type[Engine]] = {"bmm": BmmEngine, "vmap": VmapEngine, "vmap_grad": VmapGradEngine, "loop": LoopEngine}


class ChunkedEngine(Engine):
    """Run ``engine`` on ``chunk`` workers at a time. Batched kernels over many workers can fall out of cache (a
    ``vmap``-ed convolution becomes one grouped convolution over all workers); a few workers per call is often
    faster on CPU (``benchmarks/bench_workers.py``)."""

    def __init__(self, engine: Engine, chunk: int) -> None:
        super().__init__(engine.module, engine.loss_fn, engine.spec)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"worker_chunk must be an integer >= 1, got {chunk!r}")
        self.engine, self.chunk = engine, chunk
        self.name = engine.name

    def __call__(self, flat, x, y):
        M = flat.shape[0]
        if M <= self.chunk:
            return self.engine(flat, x, y)
        grads = torch.empty_like(flat)
        losses = torch.empty(M, dtype=flat.dtype, device=flat.device)
        for start in range(0, M, self.chunk):
            stop = min(start + self.chunk, M)
            grads[start:stop], losses[start:stop] = self.engine(flat[start:stop], x[start:stop], y[start:stop])
        return grads, losses


def make_engine(module: nn.Module, loss_fn: LossFn, spec: FlatSpec, name: str, chunk: int | None = None) -> Engine:
    """Engine ``name`` (one of :data:`ENGINES`), on ``chunk`` workers per call when given."""
    engine = ENGINES[name](module, loss_fn, spec)
    return engine if chunk is None or name == "loop" else ChunkedEngine(engine, chunk)


def sample_mixing_layers(module: nn.Module) -> list[str]:
    """Names of BatchNorm layers that would update running statistics (train mode, tracking on)."""
    return [name or type(m).__name__ for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


def forward_mixes_samples(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> bool:
    """Whether ``module``'s output for a sample depends on the other samples of its batch (BatchNorm without
    running statistics, ``x - x.mean(0)``): the model with ``params`` on the first three samples of ``x`` and on
    the first two, in eval mode (no dropout), compared on those two (``False`` with fewer than three samples or
    outputs that are not one tensor)."""
    if len(x) < 3:
        return False
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            three = functional_call(module, params, (x[:3],))
            two = functional_call(module, params, (x[:2],))
    finally:
        module.train(was_training)
    if not isinstance(three, Tensor) or not isinstance(two, Tensor) or three.shape[1:] != two.shape[1:]:
        return False
    tolerance = 1e-9 if three.dtype == torch.float64 else 1e-4
    return float((three[:2] - two).abs().max()) > tolerance * (float(two.abs().max()) + 1e-30)


def eligible_engines(module: nn.Module) -> list[str]:
    """Engines that can run ``module``: ``bmm`` for MLP families, then ``vmap``, ``vmap_grad``, ``loop``."""
    names = ["bmm"] if bmm_layers(module) is not None else []
    return names + ["vmap", "vmap_grad", "loop"]


def pick_engine(module: nn.Module, loss_fn: LossFn, spec: FlatSpec, flat: Tensor, x: Tensor, y: Tensor,
                candidates: list[str], repeats: int = 4) -> tuple[Engine, dict[str, float]]:
    """Time every candidate engine, on all workers at once and on chunks of 16, 8 and 4 workers, on this batch
    (interleaved, best of ``repeats`` after one warm-up: the minimum is the least disturbed by other load) and
    return the fastest whose gradients agree with the ``loop`` reference, with the timings in ms keyed
    ``"name"`` or ``"name/chunk"``. A candidate that raises (an operation ``vmap`` does not support, say) is
    skipped."""
    M = flat.shape[0]
    chunks = [None] + [c for c in (16, 8, 4) if c < M]
    engines: dict[str, Engine] = {}
    reference = LoopEngine(module, loss_fn, spec)
    tol = 1e-3 if flat.dtype in (torch.float16, torch.bfloat16) else (1e-4 if flat.dtype == torch.float32 else 1e-9)
    with torch.random.fork_rng(devices=[flat.device] if flat.device.type == "cuda" else []):
        ref_grads, _ = reference(flat, x, y)
        scale = ref_grads.abs().max().clamp_min(1e-30)
        for name in candidates:
            if name == "loop":
                engines["loop"] = reference
                continue
            try:
                base = ENGINES[name](module, loss_fn, spec)
                grads, _ = base(flat, x, y)
            except Exception:  # noqa: BLE001 - an engine that cannot run this model is simply not used
                continue
            if ((grads - ref_grads).abs().max() / scale).item() > tol and not _has_randomness(module):
                continue
            for chunk in chunks:
                engines[name if chunk is None else f"{name}/{chunk}"] = base if chunk is None else ChunkedEngine(base, chunk)
        times: dict[str, list[float]] = {n: [] for n in engines}
        for engine in engines.values():  # warm-up
            engine(flat, x, y)
        for _ in range(repeats):
            for key, engine in engines.items():
                _sync(flat)
                start = time.perf_counter()
                engine(flat, x, y)
                _sync(flat)
                times[key].append(time.perf_counter() - start)
    best_times = {n: 1e3 * min(t) for n, t in times.items()}
    best = min(best_times, key=best_times.get)
    return engines[best], best_times


def _has_randomness(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def _sync(t: Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def per_sample_grads(module: nn.Module, loss_fn: LossFn, spec: FlatSpec, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients ``(M, B, P)`` of every worker's batch (materialised: memory ``M·B·P``)."""

    def one(p, xi, yi):
        return loss_fn(functional_call(module, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    fn = vmap(vmap(grad(one), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
    gd = fn(spec.as_dict(flat.detach()), x, y)
    M, B = x.shape[:2]
    return torch.cat([gd[n].reshape(M, B, -1) for n in spec.names], dim=2)
