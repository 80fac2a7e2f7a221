"""train(eval_every=k): step-granular evaluation, its exact step/sample accounting and the target found at it."""
from __future__ import annotations

import pytest
import torch

from gradiv_lib import models
from gradiv_lib.batching import AdaBatch
from gradiv_lib.data import synthetic_classification
from gradiv_lib.training import History, evaluate, train


@pytest.fixture(scope="module")
def blobs():
    data = synthetic_classification(250, 5, 3, seed=0, separation=4.0)
    return data.split(0.2, seed=0)          # 200 train, 50 test


def net(seed=0):
    return models.mlp(5, 16, 2, 3, seed=seed)


def params_of(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_step_and_sample_counts_with_a_ragged_last_batch():
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    test = (torch.randn(20, 5), torch.randint(0, 3, (20,)))
    # batches 16, 16, 16, 2 per epoch: steps 3, 6, 9, 12 fall at 48, 50 + 32, 100 + 16, 150 samples
    h = train(net(), (x, y), schedule=16, epochs=3, lr=0.1, test_data=test, eval_every=3, progress=False)
    assert h.eval_every == 3
    assert h.eval_steps == [3, 6, 9, 12] and h.eval_samples == [48, 82, 116, 150] and h.eval_epoch == [0, 1, 2, 2]
    assert len(h.eval_test_accuracy) == len(h.eval_test_loss) == len(h.eval_seconds) == 4
    assert all(a <= b for a, b in zip(h.eval_seconds, h.eval_seconds[1:])) and h.eval_seconds[-1] <= h.seconds[-1]
    # the count runs across batch-size changes: AdaBatch 16 -> 32 after epoch 0 (steps 16,16,16,2 | 32,18 | 32,18)
    h = train(net(), (x, y), schedule=AdaBatch(16, 32, resize_every=1), epochs=3, lr=0.1, test_data=test,
              eval_every=2, progress=False)
    assert h.batch_size == [16, 32, 32] and h.steps == [4, 6, 8]
    assert h.eval_steps == [2, 4, 6, 8] and h.eval_samples == [32, 50, 100, 150] and h.eval_epoch == [0, 0, 1, 2]


def test_evaluation_does_not_change_training_and_matches_epoch_end(blobs):
    train_data, test_data = blobs
    plain_model, eval_model = net(), net()
    plain = train(plain_model, train_data, schedule=16, epochs=3, lr=0.1, momentum=0.9, test_data=test_data,
                  progress=False)
    # 200 samples in batches of 16: 13 steps per epoch, so every 13th step is an epoch end
    fine = train(eval_model, train_data, schedule=16, epochs=3, lr=0.1, momentum=0.9, test_data=test_data,
                 eval_every=13, progress=False)
    assert torch.equal(params_of(plain_model), params_of(eval_model))
    assert fine.train_loss == plain.train_loss and fine.test_accuracy == plain.test_accuracy
    assert fine.eval_steps == plain.steps and fine.eval_test_accuracy == plain.test_accuracy
    assert fine.eval_test_loss == pytest.approx(plain.test_loss, rel=1e-6)
    assert evaluate(eval_model, test_data)[1] == fine.eval_test_accuracy[-1]


def test_target_is_found_at_the_step_granularity(blobs):
    train_data, test_data = blobs
    kwargs = dict(schedule=16, epochs=2, lr=0.05, test_data=test_data, progress=False)
    probe = train(net(), train_data, eval_every=1, **kwargs)
    within_first_epoch = probe.eval_test_accuracy[:12]            # steps 1..12, before the first epoch end (13)
    target = max(within_first_epoch)
    first = next(i for i, acc in enumerate(probe.eval_test_accuracy) if acc >= target)
    fine = train(net(), train_data, eval_every=1, target_accuracy=target, **kwargs)
    assert fine.steps_to_target == first + 1 == fine.eval_steps[first] and fine.steps_to_target <= 12
    assert fine.samples_to_target == 16 * (first + 1) and fine.epoch_to_target == 0
    assert fine.seconds_to_target == fine.eval_seconds[first]
    coarse = train(net(), train_data, target_accuracy=target, **kwargs)  # epoch ends only
    assert coarse.steps_to_target in (13, 26) and coarse.steps_to_target > fine.steps_to_target
    # every 5th step: the first of steps 5, 10, 13 (epoch end), 15, ... that reaches the target
    every5 = train(net(), train_data, eval_every=5, target_accuracy=target, **kwargs)
    points = sorted({*range(5, 27, 5), 13, 26})
    accuracy = {s: probe.eval_test_accuracy[s - 1] for s in points}
    expected = next((s for s in points if accuracy[s] >= target), None)
    assert every5.steps_to_target == expected


def test_history_round_trip_and_old_dicts(blobs):
    train_data, test_data = blobs
    h = train(net(), train_data, schedule=64, epochs=2, lr=0.1, test_data=test_data, eval_every=2, progress=False)
    assert History.from_dict(h.to_dict()) == h
    old = {k: v for k, v in h.to_dict().items() if not k.startswith("eval_")}   # a result saved before eval_every
    assert History.from_dict(old).eval_steps == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(eval_every=0), "eval_every must be an integer >= 1, got 0"),
    (dict(eval_every=2.5), "eval_every must be an integer >= 1, got 2.5"),
    (dict(eval_every=3, test_data=None), "eval_every=3 evaluates test_data between steps; pass test_data"),
])
def test_bad_eval_every(blobs, kwargs, match):
    train_data, test_data = blobs
    args = dict(schedule=8, epochs=1, lr=0.1, test_data=test_data, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        train(net(), train_data, **args)
