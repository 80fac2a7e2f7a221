"""Plasticity metrics: task accuracy, effective rank of features, dormant (dead) units, hidden features and
the exact top singular value of every weight.

Chapter 8: measured along the stream in section 8.1 (``book/ch08_plasticity/01_loss_of_plasticity``, the links
"σ_max grows → features collapse → units die → diversity falls") and tabulated per method in 8.2. The plasticity
probe (accuracy reachable on a new task from the current weights) trains, so it lives in
:mod:`gradiv_lib.plasticity.continual`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import InMemoryData, Task
from ._checks import _check_model, _check_number

__all__ = ["dormant_fraction", "effective_rank", "hidden_features", "sigma_max", "task_accuracy"]


def task_accuracy(model: nn.Module, data: Task | InMemoryData | tuple[Tensor, Tensor], *, split: str = "train") -> float:
    """Accuracy of ``model`` on a task's ``split`` (``"train"`` or ``"test"``) or on data, in eval mode."""
    from ..training import evaluate

    if isinstance(data, Task):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = data.train if split == "train" else data.test
        if data is None:
            raise ValueError("the task has no test set; use split='train'")
    return evaluate(model, data)[1]


def effective_rank(features: Tensor, method: str = "entropy", delta: float = 0.01) -> float:
    """Effective rank of a feature matrix ``(n_samples, n_features)`` from its singular values
    :math:`s_1\\ge s_2\\ge\\dots`.

    * ``"entropy"`` (Roy & Vetterli): :math:`\\exp(-\\sum_i p_i\\log p_i)`, :math:`p_i=s_i/\\sum_j s_j`;
    * ``"srank"`` (Kumar et al. 2021; Lyle et al.): the smallest :math:`k` with
      :math:`\\sum_{i\\le k}s_i\\ge(1-\\delta)\\sum_i s_i`.

    Both equal :math:`r` for :math:`r` equal non-zero singular values; zero features give 0.
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or features.numel() == 0:
        raise ValueError(f"features must be a non-empty 2-D tensor (samples, features), got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if method not in ("entropy", "srank"):
        raise ValueError(f"method must be 'entropy' or 'srank', got {method!r}")
    _check_number(delta, "delta", maximum=1.0)
    s = torch.linalg.svdvals(features.detach().to(torch.float64))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    if method == "entropy":
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))
    return float(int((torch.cumsum(p, 0) < 1 - delta - 1e-12).sum()) + 1)


def dormant_fraction(activations: Tensor, tau: float = 0.0) -> float:
    """Fraction of :math:`\\tau`-dormant units (Sokar et al., 2023) in ``activations`` ``(n_samples, units)``.

    Unit :math:`i` is dormant when :math:`s_i=\\mathbb E|h_i|\\,/\\,\\tfrac1H\\sum_j\\mathbb E|h_j|\\le\\tau`;
    ``tau=0`` counts dead units (zero on every sample). If every unit is zero, all are dormant.
    """
    if not isinstance(activations, Tensor) or activations.dim() != 2 or activations.numel() == 0:
        raise ValueError(f"activations must be a non-empty 2-D tensor (samples, units), got "
                         f"{tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__}")
    _check_number(tau, "tau")
    mean_abs = activations.detach().abs().to(torch.float64).mean(0)
    avg = mean_abs.mean()
    if avg == 0:
        return 1.0
    return float(((mean_abs / avg) <= tau).double().mean())


_ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU)


@torch.no_grad()
def hidden_features(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Outputs of every activation module (ReLU, tanh, ...) of ``model`` on ``x``, in forward order, in
    eval mode: the hidden features of an :func:`gradiv_lib.models.mlp`."""
    _check_model(model)
    outs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().flatten(1)))
             for m in model.modules() if isinstance(m, _ACTIVATION_TYPES)]
    if not hooks:
        raise ValueError("model has no activation module (nn.ReLU, nn.Tanh, ...) whose outputs could be read")
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return outs


@torch.no_grad()
def sigma_max(model: nn.Module) -> dict[str, float]:
    """Exact top singular value of every weight (parameters with >= 2 dims, viewed ``(out, -1)``)."""
    _check_model(model)
    return {n: float(torch.linalg.matrix_norm(p.detach().reshape(p.shape[0], -1).to(torch.float64), 2))
            for n, p in model.named_parameters() if p.dim() >= 2}
