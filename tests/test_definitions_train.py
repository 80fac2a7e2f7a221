"""The BatchNorm-in-eval-mode measurement path of the training loop, pinned against a per-sample reference.

A model with train-mode BatchNorm is measured in a separate pass with BatchNorm in eval mode (running statistics),
in chunks whose batch-mean gradients are weighted by their sizes: the per-sample squared norms must be those of
the eval-mode model on each sample alone, the batch gradient that of the eval-mode batch-mean loss, and the
running statistics and the train mode must survive the pass.
"""
from __future__ import annotations

import torch
from torch import nn

from gradiv_lib.training import _measure_separately, _train_batch_norms

torch.set_num_threads(1)


def test_batchnorm_measured_in_eval_mode_by_hand():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64))
    model.train()
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))

    sq, grads = _measure_separately(model, loss_fn, x, y, params, "mean", chunk=4, batch_norms=_train_batch_norms(model))

    assert model.training and bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    model.eval()
    expected = []
    for i in range(10):
        gi = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        expected.append(sum(float(t.square().sum()) for t in gi))
    torch.testing.assert_close(sq, torch.tensor(expected, dtype=sq.dtype), rtol=1e-10, atol=1e-14)
    full = torch.autograd.grad(loss_fn(model(x), y), params)
    for a, b in zip(grads, full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # the train-mode gradient (batch statistics) is a different number: the eval path is not a no-op
    model.train()
    train_grad = torch.autograd.grad(loss_fn(model(x), y), params)
    assert not torch.allclose(train_grad[0], full[0])
