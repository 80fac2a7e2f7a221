"""Chapter 3's MNIST-1D width sweep: the learning-rate rule, the geometric check schedule, B_S along training."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradiv_lib import data as gdata
from gradiv_lib import models
from gradiv_lib.diversity import gradient_diversity
from gradiv_lib.experiments import width

pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_rates_scale_with_the_square_root_of_the_batch():
    config = dict(lrs=[0.1, 0.4], lr_scaling="sqrt", lr_reference_batch=64)
    assert width.learning_rates(config, 256) == pytest.approx([0.2, 0.8])      # sqrt(4) = 2, not 4 (linear)
    assert width.learning_rates(config, 16) == pytest.approx([0.05, 0.2])
    assert width.learning_rates(dict(config, lr_scaling="linear"), 256) == pytest.approx([0.4, 1.6])
    assert width.learning_rates(dict(lrs=[0.1, 0.4]), 256) == [0.1, 0.4]     # no rule: the same grid everywhere
    assert width.learning_rates(dict(config, lr_scaling=None), 256) == [0.1, 0.4]


def test_learning_rates_reject_unknown_rules_and_references():
    with pytest.raises(ValueError, match="lr_scaling must be None, 'sqrt' or 'linear', got 'cubic'"):
        width.learning_rates(dict(lrs=[0.1], lr_scaling="cubic", lr_reference_batch=64), 16)
    with pytest.raises(ValueError, match="needs lr_reference_batch, an integer >= 1; got 0"):
        width.learning_rates(dict(lrs=[0.1], lr_scaling="sqrt", lr_reference_batch=0), 16)


def test_check_schedule_is_geometric_and_ends_at_max_steps():
    assert width.check_schedule(30, check_ratio=1.5) == [1, 2, 3, 5, 8, 12, 18, 27, 30]
    assert width.check_schedule(12, check_every=4) == [4, 8, 12]
    assert width.check_schedule(10, check_every=3) == [3, 6, 9]                # the old rule, unchanged
    steps = width.check_schedule(10_000, check_ratio=1.05)
    assert all(b / a <= 1.05 + 1 / a for a, b in zip(steps, steps[1:]))      # 5 % resolution
    assert len(steps) < 200
    for bad in (1.0, 0.5, math.inf, True):
        with pytest.raises(ValueError, match="check_ratio must be a finite number > 1"):
            width.check_schedule(10, check_ratio=bad)
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1, got 0"):
        width.check_schedule(0)


def test_steps_to_target_with_a_geometric_schedule_reports_the_first_checked_step():
    data = gdata.synthetic_regression(256, 8, outputs=2, seed=0)
    model = models.deep_linear(8, 16, 2, 2, seed=0)
    kwargs = dict(loss_fn=width.half_squared_error, target_value=0.05, max_steps=400, seed=3)
    every, lr = width.steps_to_target(model, data, 32, [0.05], **kwargs)
    geometric, lr_g = width.steps_to_target(model, data, 32, [0.05], check_ratio=1.3, **kwargs)
    schedule = width.check_schedule(400, check_ratio=1.3)
    assert every <= 400 and lr == lr_g == pytest.approx(0.05)
    assert geometric == min(s for s in schedule if s >= every)               # same trajectory, coarser checks
    assert geometric > every                                                 # (a case where the schedules differ)


def _tiny_mnist1d():
    train, _ = gdata.load_mnist1d(200, channels=False)
    return train


def test_load_problem_mnist1d_is_flat_for_mlps():
    train, loss_fn = width.load_problem(width.PRESETS["mnist1d"])
    assert tuple(train.x.shape) == (4000, 40) and train.y.dtype == torch.long and isinstance(loss_fn, nn.CrossEntropyLoss)


def test_mnist1d_preset_is_a_fixed_budget_family():
    config = width.PRESETS["mnist1d"]
    family = width.build_family(config, seed=0)
    assert [m.depth for m in family] == config["depths"]
    widths = [m.width for m in family]
    assert widths == sorted(widths, reverse=True)                             # deeper members are narrower
    assert all(abs(m.n_params - config["budget"]) <= 0.05 * config["budget"] for m in family)
    assert config["diversity_batch"] in config["batch_sizes"]


def test_diversity_along_training_records_b_s_at_the_first_check_past_each_level():
    data = _tiny_mnist1d()
    model = models.mlp(40, 32, 2, 10, init="he", seed=0)
    before = copy.deepcopy(model.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    rows = width.diversity_along_training(model, data, 16, 0.2, [0.5, 0.3], loss_fn=loss_fn, max_steps=300,
                                          check_ratio=1.2, seed=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the model is not trained
    assert rows[0]["level"] == 0 and rows[0]["step"] == 0
    assert rows[0]["bound"] == pytest.approx(gradient_diversity(model, loss_fn, data.x, data.y).batch_size_bound)
    assert [r["level"] for r in rows[1:]] == [0.3, 0.5]
    # replay plain SGD with the same index stream and compare at every checked step
    schedule = set(width.check_schedule(300, check_ratio=1.2))
    net = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    first_step, bound_at = {}, {}
    for step in range(1, rows[-1]["step"] + 1):
        index = torch.randint(len(data), (16,), generator=generator)
        net.zero_grad()
        loss_fn(net(data.x[index]), data.y[index]).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.2 * p.grad
        if step in schedule:
            accuracy = float((net(data.x).argmax(-1) == data.y).double().mean())
            for level in (0.3, 0.5):
                if accuracy >= level and level not in first_step:
                    first_step[level] = step
                    bound_at[level] = gradient_diversity(net, loss_fn, data.x, data.y).batch_size_bound
    for row in rows[1:]:
        assert row["step"] == first_step[row["level"]] and row["accuracy"] >= row["level"]
        assert row["bound"] == pytest.approx(bound_at[row["level"]], rel=1e-4)


def test_diversity_along_training_rejects_bad_input():
    data = _tiny_mnist1d()
    model = models.mlp(40, 8, 2, 10, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="levels must be a non-empty list of accuracies in \\(0, 1\\]"):
        width.diversity_along_training(model, data, 16, 0.1, [1.5], loss_fn=loss_fn)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1"):
        width.diversity_along_training(model, data, 16, -1, [0.5], loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, N\] = \[1, 160\], got 0"):
        width.diversity_along_training(model, data, 0, 0.1, [0.5], loss_fn=loss_fn)


def test_sweep_needs_the_diversity_batch_among_the_batch_sizes():
    config = dict(width.PRESETS["mnist1d"], batch_sizes=[16, 256])
    with pytest.raises(ValueError, match=r"diversity_batch must be one of batch_sizes \[16, 256\], got 64"):
        width.sweep(config)


def test_summary_reports_b_s_at_levels_every_seed_reached():
    result = {"depths": [2], "bounds": {"2": {"0": 5.0}}, "fits": {},
              "along": {"2": {"0": [{"level": 0.0, "bound": 5.0}, {"level": 0.3, "bound": 10.0},
                                    {"level": 0.5, "bound": 40.0}],
                              "1": [{"level": 0.0, "bound": 7.0}, {"level": 0.3, "bound": 30.0}]}}}
    summary = width.summarize(result)["2"]
    assert summary["median_bound_at_accuracy"] == {"0.3": 20.0}                # 0.5 was reached by one seed only


def test_cli_runs_the_mnist1d_sweep_in_quick_mode(tmp_path, capsys):
    from gradiv_lib import cli, results

    rc = cli.main(["width", "--dataset", "mnist1d", "--out", str(tmp_path), "--no-progress", "--depths", "2",
                   "--batch-sizes", "64", "256", "--max-steps", "300"])
    assert rc == 0 and "width on mnist1d (quick mode)" in capsys.readouterr().out
    payload = results.load("ch03/width_mnist1d_quick", root=tmp_path)
    data = payload["data"]
    assert payload["config"]["dataset"] == "mnist1d" and data["widths"] == [490]
    assert data["lrs_by_batch"][1] == pytest.approx([2 * lr for lr in width.PRESETS["mnist1d"]["lrs"]])
    steps = data["steps"]["2"]["0"]
    assert all(s <= 300 for s in steps) and steps[0] > steps[1]
    rows = data["along"]["2"]["0"]
    assert [r["level"] for r in rows] == [0.0, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert rows[-1]["step"] <= 300 and set(data["summary"]["2"]["median_bound_at_accuracy"]) == {"0.2", "0.3", "0.4",
                                                                                                  "0.5", "0.6"}
