"""The training loop: accounting, resizes, optimizer state, resume, targets, bad input."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from gradiv_lib import models
from gradiv_lib.batching import AdaBatch, DiveBatch, FixedBatch, NoiseScaleBatch
from gradiv_lib.data import InMemoryData, synthetic_classification
from gradiv_lib.diversity import gradient_diversity
from gradiv_lib.training import History, evaluate, train


@pytest.fixture(scope="module")
def blobs():
    data = synthetic_classification(250, 5, 3, seed=0, separation=4.0)
    return data.split(0.2, seed=0)


def net(seed=0, dropout=False):
    model = models.mlp(5, 16, 2, 3, seed=seed)
    if dropout:
        model = nn.Sequential(*model[:3], nn.Dropout(0.2), *model[3:])
    return model


def params_of(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_steps_and_samples_with_a_ragged_last_batch():
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    h = train(net(), (x, y), schedule=16, epochs=3, lr=0.1, progress=False)
    assert h.steps == [4, 8, 12] and h.samples == [50, 100, 150] and h.batch_size == [16, 16, 16]
    h = train(net(), (x, y), schedule=16, epochs=2, lr=0.1, drop_last=True, progress=False)
    assert h.steps == [3, 6] and h.samples == [48, 96]
    assert len(h.seconds) == 2 and 0 < h.seconds[0] <= h.seconds[1]


def test_batch_size_changes_take_effect_the_next_epoch(blobs):
    train_data, _ = blobs
    h = train(net(), train_data, schedule=AdaBatch(8, 32, resize_every=1, lr_rule="linear"), epochs=4, lr=0.05,
              progress=False)
    assert h.batch_size == [8, 16, 32, 32]
    assert h.steps == [25, 25 + 13, 25 + 13 + 7, 25 + 13 + 7 + 7]  # 200 samples
    assert h.lr == pytest.approx([0.05, 0.1, 0.2, 0.2]) and h.lr_scale == [1, 2, 4, 4]
    assert [r["epoch"] for r in h.resizes] == [0, 1]


def reference_run(train_data, sizes, lr, momentum, rebuild_at_resize=False, seed=0):
    """The loop train() promises, written out: same batches, one SGD optimizer."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch, b in enumerate(sizes):
            if rebuild_at_resize and epoch and b != sizes[epoch - 1]:
                opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            for xb, yb in train_data.batches(b, generator=gen):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
    return params_of(model)


def test_momentum_buffers_survive_a_resize(blobs):
    train_data, _ = blobs
    model = net()
    buffers = {}

    def grab(epoch, m, history):
        buffers[epoch] = opt.state[next(iter(m.parameters()))]["momentum_buffer"]

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    h = train(model, train_data, schedule=AdaBatch(8, 32, resize_every=1), epochs=3, optimizer=opt,
              on_epoch_end=grab, progress=False)
    assert h.batch_size == [8, 16, 32]
    assert buffers[0] is buffers[1] is buffers[2]  # the same optimizer state object throughout
    expected = reference_run(train_data, [8, 16, 32], 0.05, 0.9)
    assert torch.allclose(params_of(model), expected, atol=1e-6)
    rebuilt = reference_run(train_data, [8, 16, 32], 0.05, 0.9, rebuild_at_resize=True)
    assert not torch.allclose(rebuilt, expected, atol=1e-4)  # the check can tell a reset apart


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("make_schedule", [
    lambda: DiveBatch(8, 64, delta=0.2, resize_every=2, lr_rule="sqrt"),
    lambda: NoiseScaleBatch(8, 64, delta=0.5, resize_every=1, window=2),
])
def test_resume_gives_identical_history(blobs, tmp_path, make_schedule):
    train_data, test_data = blobs
    kwargs = dict(epochs=4, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_scheduler="cosine", test_data=test_data,
                  target_accuracy=0.5, seed=3, progress=False)
    straight_model = net(dropout=True)
    straight = train(straight_model, train_data, schedule=make_schedule(), **kwargs)

    def stop_after_two(epoch, model, history):
        if epoch == 1:
            raise Interrupt

    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        train(net(dropout=True), train_data, schedule=make_schedule(), checkpoint_path=path,
              on_epoch_end=stop_after_two, **kwargs)
    resumed_model = net(seed=99, dropout=True)  # a fresh process: other weights until the checkpoint loads
    resumed = train(resumed_model, train_data, schedule=make_schedule(), checkpoint_path=path, **kwargs)
    a, b = straight.to_dict(), resumed.to_dict()
    a.pop("seconds"), b.pop("seconds")
    a.pop("seconds_to_target"), b.pop("seconds_to_target")
    assert repr(a) == repr(b)  # exact, with nan == nan
    assert torch.equal(params_of(straight_model), params_of(resumed_model))
    # a finished checkpoint returns its history without training again
    again = train(net(dropout=True), train_data, schedule=make_schedule(), checkpoint_path=path, **kwargs)
    assert repr(again.to_dict()) == repr(resumed.to_dict())


def test_checkpoint_from_another_run_is_refused(blobs, tmp_path):
    train_data, _ = blobs
    path = tmp_path / "run.pt"
    train(net(), train_data, schedule=8, epochs=1, lr=0.1, checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match=r"different run \(epochs = 1 there, 2 here\)"):
        train(net(), train_data, schedule=8, epochs=2, lr=0.1, checkpoint_path=path, progress=False)


def test_an_unusable_checkpoint_path_is_refused_before_training(blobs, tmp_path):
    train_data, _ = blobs
    epochs_run = []

    def record(epoch, model, history):
        epochs_run.append(epoch)

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(tmp_path, r"is a folder; give a file in it, e.g. .*run.pt"), (afile / "run.pt", r"folder .*afile is a file")]
    if os.path.isdir("/proc/self"):  # a folder that cannot be created, even by root (CI)
        cases.append((Path("/proc/gradiv-out/run.pt"), r"folder /proc/gradiv-out: cannot write there"))
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            train(net(), train_data, schedule=8, epochs=2, lr=0.1, checkpoint_path=path, on_epoch_end=record, progress=False)
    assert epochs_run == []  # refused before the first epoch, not at its end
    path = tmp_path / "new" / "run.pt"  # a missing folder is created
    train(net(), train_data, schedule=8, epochs=1, lr=0.1, checkpoint_path=path, progress=False)
    assert path.is_file()


def test_regression_targets_that_would_broadcast_are_refused_before_training():
    """MSE (the default for float targets) on a (B, 1) output and (B,) targets compares every output with
    every target: train() refused nothing and trained on the (B, B) loss, evaluate() reported it."""
    x, y = torch.randn(40, 4), torch.randn(40)
    epochs_run = []
    with pytest.raises(ValueError, match=r"MSELoss got outputs of shape \(8, 1\) and targets of shape \(8,\)"):
        train(nn.Linear(4, 1), (x, y), schedule=8, epochs=2, lr=0.1, progress=False,
              on_epoch_end=lambda epoch, model, history: epochs_run.append(epoch))
    assert epochs_run == []
    with pytest.raises(ValueError, match=r"MSELoss got outputs of shape \(40, 1\) and targets of shape \(40,\)"):
        evaluate(nn.Linear(4, 1), (x, y))
    h = train(nn.Linear(4, 1), (x, y[:, None]), schedule=8, epochs=1, lr=0.1, measure_diversity=True, progress=False)
    assert math.isfinite(h.train_loss[0]) and h.diversity[0] > 0
    # class labels in the wrong form fall to the default MSE: the message says what they look like
    with pytest.raises(ValueError, match=r"\(8, 3\) and targets of shape \(8, 1\): it would broadcast the targets to "
                                         r"\(8, 3\), comparing each target with several outputs.*integer targets look like class labels"):
        train(nn.Linear(4, 3), (x, torch.randint(0, 3, (40, 1))), schedule=8, epochs=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match=r"they do not broadcast.*pass y.long\(\)"):
        train(nn.Linear(4, 3), (x, torch.randint(0, 3, (40,)).float()), schedule=8, epochs=1, lr=0.1, progress=False)


def test_target_accuracy_bookkeeping(blobs):
    train_data, test_data = blobs
    h = train(net(), train_data, schedule=8, epochs=6, lr=0.1, test_data=test_data, target_accuracy=0.9,
              progress=False)
    first = next(i for i, acc in enumerate(h.test_accuracy) if acc >= 0.9)
    assert h.reached_target and h.epoch_to_target == first
    assert h.steps_to_target == h.steps[first] and h.samples_to_target == h.samples[first]
    assert h.seconds_to_target == h.seconds[first]
    stopped = train(net(), train_data, schedule=8, epochs=6, lr=0.1, test_data=test_data, target_accuracy=0.9,
                    stop_at_target=True, progress=False)
    assert len(stopped) == first + 1 and stopped.steps_to_target == h.steps_to_target
    never = train(net(), train_data, schedule=8, epochs=1, lr=1e-4, target_accuracy=1.0, target_on="train",
                  progress=False)
    assert not never.reached_target and never.steps_to_target is None


def test_divebatch_in_train_measures_full_data_diversity_at_fixed_weights(blobs):
    """With lr = 0 the model never moves: the epoch Δ̂ is the full-data Δ and B = floor(δ N Δ)."""
    train_data, _ = blobs
    model = net()
    train(model, train_data, schedule=8, epochs=2, lr=0.1, progress=False)  # B_S grows as the loss falls
    exact = gradient_diversity(model, nn.CrossEntropyLoss(), train_data.x, train_data.y)
    assert 0.3 * exact.batch_size_bound > 17
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = train(model, train_data, schedule=DiveBatch(16, 200, delta=0.3, resize_every=1), epochs=2, optimizer=opt,
              progress=False)
    assert h.diversity[0] == pytest.approx(exact.diversity, rel=1e-4)
    assert h.batch_size_bound[0] == pytest.approx(exact.batch_size_bound, rel=1e-4)
    assert abs(h.batch_size[1] - min(math.floor(0.3 * exact.batch_size_bound), 200)) <= 1
    chunked = train(model, train_data, schedule=DiveBatch(16, 200, delta=0.3, resize_every=1), epochs=1,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.0), measure_batch_size=5, progress=False)
    assert chunked.diversity[0] == pytest.approx(h.diversity[0], rel=1e-5)  # separate pass in chunks of 5


def test_linear_lr_rescale_reaches_param_groups_and_persists_through_cosine(blobs):
    train_data, _ = blobs
    h = train(net(), train_data, schedule=AdaBatch(8, 16, resize_every=2, lr_rule="linear"), epochs=4, lr=0.1,
              lr_scheduler="cosine", progress=False)
    cosine = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert h.lr == pytest.approx([cosine[0], cosine[1], 2 * cosine[2], 2 * cosine[3]])


def test_batchnorm_models_are_measured_in_eval_mode():
    data = InMemoryData(torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,)))
    model = models.cnn(1, 4, 2, 3, image_size=8, norm="batch", seed=0)
    h = train(model, data, schedule=DiveBatch(8, 40, delta=0.5, resize_every=1), epochs=2, lr=0.05,
              progress=False)
    assert math.isfinite(h.diversity[0]) and h.batch_size[1] >= 8
    assert all(m.training for m in model.modules())
    assert float(model[1].running_mean.abs().sum()) > 0  # the training passes still update BN statistics


def test_measure_diversity_every_epoch_and_evaluate(blobs):
    train_data, test_data = blobs
    model = net()
    h = train(model, train_data, schedule=FixedBatch(25), epochs=2, lr=0.1, measure_diversity=True,
              test_data=test_data, progress=False)
    assert all(d > 0 for d in h.diversity) and h.batch_size_bound[0] == pytest.approx(200 * h.diversity[0])
    loss, acc = evaluate(model, test_data)
    assert loss == pytest.approx(h.test_loss[-1]) and acc == h.test_accuracy[-1]
    assert repr(History.from_dict(h.to_dict()).to_dict()) == repr(h.to_dict())


def test_nonfinite_loss(blobs):
    train_data, _ = blobs
    with pytest.raises(FloatingPointError, match=r"non-finite .* epoch 0 .* lower the learning rate"):
        train(net(), train_data, schedule=8, epochs=3, lr=1e30, progress=False)
    h = train(net(), train_data, schedule=8, epochs=3, lr=1e30, on_nonfinite="stop", progress=False)
    assert h.diverged and len(h) == 1


@pytest.mark.parametrize("measure", [False, True])
@pytest.mark.parametrize("schedule", ["fixed", "divebatch", "noise_scale"])
def test_a_nonfinite_step_in_a_measured_epoch_follows_on_nonfinite(schedule: str, measure: bool) -> None:
    """An inf input makes one step's loss nan in epoch 0. Whether the loop (measure_diversity) or the
    schedule measures that epoch, on_nonfinite decides: "raise" names the epoch, "stop" records the
    divergence (the measurements once refused the nan themselves, with a ValueError either way)."""
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    x[7, 2] = math.inf
    schedules = {"fixed": lambda: 8, "divebatch": lambda: DiveBatch(8, 48, resize_every=1),
                 "noise_scale": lambda: NoiseScaleBatch(8, 48, window=2)}
    with pytest.raises(FloatingPointError, match=r"non-finite \(nan\) in epoch 0"):
        train(net(), (x, y), schedule=schedules[schedule](), epochs=2, lr=0.1, measure_diversity=measure, progress=False)
    h = train(net(), (x, y), schedule=schedules[schedule](), epochs=2, lr=0.1, measure_diversity=measure,
              on_nonfinite="stop", progress=False)
    assert h.diverged and len(h) == 1 and math.isnan(h.train_loss[0]) and math.isnan(h.diversity[0])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(schedule=500), ValueError, r"batch_size must be in \[1, N = 200\], got 500"),
    (dict(schedule=DiveBatch(8, 400)), ValueError, r"max_batch_size must be in \[1, N = 200\], got 400"),
    (dict(schedule="big"), TypeError, "schedule must be"),
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0 with optimizer='sgd', got 0.0"),
    (dict(lr=None), ValueError, "lr must be a finite number > 0"),
    (dict(optimizer="lbfgs"), ValueError, "optimizer must be one of 'sgd', 'adam', 'adamw'"),
    (dict(epochs=0), ValueError, "epochs must be an integer >= 1, got 0"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\), got 1.5"),
    (dict(target_accuracy=1.5), ValueError, r"target_accuracy must be in \(0, 1\], got 1.5"),
    (dict(target_accuracy=0.9), ValueError, "needs test_data"),
    (dict(stop_at_target=True), ValueError, "stop_at_target=True needs target_accuracy"),
    (dict(lr_scheduler="linear"), ValueError, "lr_scheduler must be one of"),
    (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite must be one of"),
    (dict(loss_fn=nn.CrossEntropyLoss(reduction="none")), ValueError, "reduction 'mean' or 'sum'"),
])
def test_bad_input_messages(blobs, kwargs, error, match):
    train_data, _ = blobs
    args = dict(schedule=8, epochs=1, lr=0.1, progress=False) | kwargs
    with pytest.raises(error, match=match):
        train(net(), train_data, **args)


def test_optimizer_instance_and_lr_conflict(blobs):
    train_data, _ = blobs
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="set them in the optimizer itself"):
        train(model, train_data, schedule=8, epochs=1, lr=0.1, optimizer=opt, progress=False)
    with pytest.raises(TypeError, match=r"InMemoryData, an \(x, y\) pair of tensors or a map-style torch Dataset"):
        train(model, [1, 2, 3], schedule=8, epochs=1, optimizer=opt, progress=False)


def test_measuring_meter_follows_parameters_frozen_and_unfrozen_between_epochs(blobs):
    """train() keeps one meter across epochs while the trainable parameters stay the same, and builds a new
    one when on_epoch_end changes them: with lr = 0 each epoch's Δ must be the full-data Δ of the parameters
    trainable in that epoch. A meter kept after unfreezing refuses to measure (it planned without them)."""
    train_data, _ = blobs
    model = net()
    loss = nn.CrossEntropyLoss()
    all_params = gradient_diversity(model, loss, train_data.x, train_data.y)
    model[1].requires_grad_(False)  # the first Linear layer
    head_only = gradient_diversity(model, loss, train_data.x, train_data.y)

    def toggle(epoch, model, history):
        model[1].requires_grad_(epoch % 2 == 0)  # unfrozen after epoch 0, frozen after epoch 1

    h = train(model, train_data, schedule=8, epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
              measure_diversity=True, on_epoch_end=toggle, progress=False)
    assert h.diversity[0] == pytest.approx(head_only.diversity, rel=1e-4)
    assert h.diversity[1] == pytest.approx(all_params.diversity, rel=1e-4)
    assert h.diversity[2] == pytest.approx(head_only.diversity, rel=1e-4)
    assert abs(head_only.diversity / all_params.diversity - 1) > 1e-3  # the two sets give different numbers


@pytest.mark.parametrize("change", ["add_frozen_layer", "prune"])
def test_measuring_meter_follows_layers_added_or_pruned_between_epochs(blobs, change):
    """on_epoch_end adds a frozen layer (the trainable parameters stay the same, which is all train() compared:
    the kept meter then refused the changed model mid-run) or prunes one (weight renamed weight_orig): a new
    meter is built, and the run ends bit for bit where the unmeasured run does."""
    import torch.nn.utils.prune as prune

    train_data, _ = blobs

    def grow_or_prune(epoch, model, history):
        if epoch != 0:
            return
        if change == "prune":
            prune.l1_unstructured(model[1], "weight", amount=0.5)
        else:
            torch.manual_seed(5)
            extra = nn.Linear(model[1].out_features, model[1].out_features).requires_grad_(False)
            model[2] = nn.Sequential(model[2], extra)

    runs = []
    for measure in (True, False):
        model = net()
        history = train(model, train_data, schedule=8, epochs=3, lr=0.1, measure_diversity=measure,
                        on_epoch_end=grow_or_prune, progress=False)
        runs.append((model, history))
    (measured, history), (plain, _) = runs
    assert all(math.isfinite(d) for d in history.diversity)
    for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_measuring_changes_no_weight_bit_for_bit_with_convolutions(monkeypatch):
    """train(measure_diversity=True) keeps autograd's weight gradients (the meter's exact_grad=True): the
    same run with and without the measurement ends with identical weights, convolutions included (with the
    meter's timed choice forced to fuse, so the default meter would change the last bits)."""
    from gradiv_lib.norms import fused

    monkeypatch.setattr(fused, "_fused_wins", lambda fused, hooks: True)
    x, y = torch.randn(64, 1, 40), torch.randint(0, 3, (64,))

    def conv_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 38, 3))

    measured, plain = conv_net(), conv_net()
    train(measured, (x, y), schedule=16, epochs=3, lr=0.1, measure_diversity=True, progress=False)
    train(plain, (x, y), schedule=16, epochs=3, lr=0.1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(measured.parameters(), plain.parameters()))
