"""The tuned MNIST-1D comparison of chapter 4: splits, per-method learning rates, selection rule, evaluation step."""
from __future__ import annotations

import math

import pytest
import torch

from gradiv_lib import batching
from gradiv_lib.experiments import divebatch


def test_splits_are_disjoint_and_sized_as_configured():
    config = dict(divebatch.CONFIGS["mnist1d"], n_samples=200, n_train=100, n_validation=60, n_test=40)
    train, val, test = divebatch.mnist1d_splits(config)
    assert (len(train), len(val), len(test)) == (100, 60, 40)
    assert train.x.shape[1:] == (1, 40) and val.info["split"] == "validation" and test.info["split"] == "test"
    rows = torch.cat([train.x, val.x, test.x]).flatten(1)
    assert len(torch.unique(rows, dim=0)) == 200                 # no sample in two splits
    with pytest.raises(ValueError, match="must equal n_samples"):
        divebatch.mnist1d_splits(dict(config, n_test=50))


def test_each_method_uses_its_own_learning_rate():
    config = divebatch.CONFIGS["mnist1d"]
    schedule, lr = divebatch.make_schedule("sgd_large", config, 0.4)
    assert isinstance(schedule, batching.FixedBatch) and schedule.batch_size == 1024 and lr == 0.4  # no rescaling
    schedule, lr = divebatch.make_schedule("divebatch_delta0.1", config, 0.025)
    assert schedule.delta == 0.1 and lr == 0.025
    assert divebatch.make_schedule("divebatch", config, 0.025)[0].delta == config["delta"] == 0.01
    with pytest.raises(ValueError, match="has no shared lr"):
        divebatch.make_schedule("sgd_small", config)
    digits = divebatch.CONFIGS["digits"]
    assert divebatch.make_schedule("sgd_large", digits)[1] == pytest.approx(0.05 * 512 / 16)   # linear scaling


def test_eval_every_is_one_large_step_per_eval_every_small_steps():
    config = divebatch.CONFIGS["mnist1d"]
    assert divebatch.eval_every_for("sgd_small", config) == 5 and divebatch.eval_every_for("divebatch", config) == 5
    assert divebatch.eval_every_for("sgd_large", config) == 1                     # 5 * 32 / 1024 rounds down to 0 -> 1
    assert divebatch.eval_every_for("sgd_large", dict(config, eval_every=64)) == 2
    assert divebatch.eval_every_for("sgd_small", dict(config, eval_every=None)) is None


def test_selection_takes_the_best_median_validation_accuracy_and_the_smaller_rate_on_ties():
    row = lambda *accs: {str(s): {"final_validation_accuracy": a} for s, a in enumerate(accs)}
    grid = {"a": {"0.1": row(0.9, 0.2, 0.2), "0.2": row(0.5, 0.6, 0.55)},    # mean would pick 0.1; median picks 0.2
            "b": {"0.4": row(0.7, 0.7, 0.7), "0.2": row(0.7, 0.7, 0.7)}}     # a tie: the smaller rate
    assert divebatch.pick_learning_rates(grid) == {"a": 0.2, "b": 0.2}


def test_tuned_run_writes_grid_choice_and_histories(tmp_path):
    torch.set_num_threads(1)
    path, payload = divebatch.run("mnist1d", seeds=[0], methods=["sgd_large"], epochs=1, out=tmp_path, progress=False)
    assert path == tmp_path / "ch04" / "divebatch_mnist1d.json"
    data = payload["data"]
    assert set(data["grid"]["sgd_large"]) == {repr(lr) for lr in divebatch.CONFIGS["mnist1d"]["lr_grid"]["sgd_large"]}
    chosen = data["chosen_lr"]["sgd_large"]
    scores = {float(lr): rows["0"]["final_validation_accuracy"] for lr, rows in data["grid"]["sgd_large"].items()}
    assert scores[chosen] == max(scores.values())
    h = data["runs"]["sgd_large"]["0"]
    assert h["steps"] == [4] and h["eval_steps"] == [1, 2, 3, 4] and h["eval_samples"] == [1024, 2048, 3072, 4000]
    assert data["n_train"] == 4000 and data["n_validation"] == data["n_test"] == 2000
    assert math.isinf(data["summary"]["sgd_large"]["steps_to_target"])          # 4 steps do not reach 90 %
    with pytest.raises(ValueError, match="no learning-rate grid"):
        divebatch.run("mnist1d", methods=["divebatch_linear"], out=tmp_path, progress=False)
