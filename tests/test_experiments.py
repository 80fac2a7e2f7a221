"""Experiments from the command line: quick modes run and write their JSON; the full protocol's config."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from gradiv_lib import batching, results
from gradiv_lib import cli
from gradiv_lib.experiments import divebatch, width


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_metadata(payload, seconds_positive=True):
    assert {"config", "seconds", "gradiv_lib", "machine", "date", "data"} <= set(payload)
    assert {"torch", "python", "device"} <= set(payload["machine"])
    assert payload["seconds"] >= 0 if not seconds_positive else payload["seconds"] > 0


def test_divebatch_quick_mode_writes_json(tmp_path):
    path, payload = divebatch.run(seeds=[0], methods=["sgd_small", "divebatch"], epochs=4, out=tmp_path,
                                  progress=False)
    assert path == tmp_path / "ch04" / "divebatch_digits.json" and path.exists()
    check_metadata(payload)
    assert payload["config"]["epochs"] == 4 and payload["config"]["methods"] == ["sgd_small", "divebatch"]
    assert payload == results.load("ch04/divebatch_digits", root=tmp_path)
    runs = payload["data"]["runs"]
    dive = runs["divebatch"]["0"]
    assert dive["batch_size"][:4] == [16] * 4 and len(dive["resizes"]) <= 1
    assert runs["sgd_small"]["0"]["steps"][-1] == 4 * math.ceil(1437 / 16)
    summary = payload["data"]["summary"]
    assert summary["sgd_small"]["total_steps"] == 4 * 90 and summary["divebatch"]["final_test_accuracy"] > 0.8


def test_width_quick_mode_writes_json(tmp_path):
    path, payload = width.run(seeds=[0], depths=[2, 6], batch_sizes=[4, 256], bound_seeds=[0, 1], out=tmp_path,
                              progress=False)
    assert path == tmp_path / "ch03" / "width_synthetic.json"
    check_metadata(payload)
    data = payload["data"]
    assert data["depths"] == [2, 6] and data["widths"] == [64, 21]
    assert set(data["bounds"]["2"]) == {"0", "1"}
    steps = data["steps"]["2"]["0"]
    assert len(steps) == 2 and steps[0] > steps[1]  # a bigger batch needs fewer steps
    assert data["summary"]["2"]["median_bound"] > data["summary"]["6"]["median_bound"]


def test_width_sweep_resumes_from_its_checkpoint(tmp_path):
    config = dict(width.PRESETS["synthetic"], depths=[2, 3], batch_sizes=[16, 256], seeds=[0], bound_seeds=[0])
    path = tmp_path / "sweep.json"
    first = width.sweep(config, checkpoint_path=path)
    saved = json.loads(path.read_text())
    assert saved["result"]["steps"] == first["steps"]
    saved["result"]["steps"]["2"]["0"] = [7, 7]            # a resumed sweep trusts what the checkpoint holds
    path.write_text(json.dumps(saved))
    assert width.sweep(config, checkpoint_path=path)["steps"]["2"]["0"] == [7, 7]
    with pytest.raises(ValueError, match="different configuration"):
        width.sweep(dict(config, max_steps=10), checkpoint_path=path)


def test_cli_quick_run_prints_where_it_wrote(tmp_path, capsys):
    rc = cli.main(["divebatch", "--out", str(tmp_path), "--seeds", "1", "--methods", "adabatch_linear",
                   "--epochs", "2", "--no-progress", "--name", "smoke"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"result written to {tmp_path / 'ch04' / 'smoke.json'}" in out and "adabatch_linear" in out
    payload = json.loads((tmp_path / "ch04" / "smoke.json").read_text())
    assert payload["config"]["seeds"] == [1]


def test_width_cli_quick_mode_is_small_and_named_quick(tmp_path, capsys):
    rc = cli.main(["width", "--out", str(tmp_path), "--no-progress", "--batch-sizes", "64", "256", "--max-steps", "300"])
    assert rc == 0
    payload = results.load("ch03/width_synthetic_quick", root=tmp_path)
    assert payload["config"]["seeds"] == cli.WIDTH_QUICK["seeds"] and payload["config"]["depths"] == [2, 6]
    assert payload["command"] == "gradiv width --batch-sizes 64 256 --max-steps 300"


def test_run_validates_arguments():
    with pytest.raises(ValueError, match="unknown settings \\['epoch'\\]"):
        divebatch.run(epoch=3)
    with pytest.raises(ValueError, match="unknown methods \\['sgd'\\]"):
        divebatch.run(methods=["sgd"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        width.run("mnist")
    with pytest.raises(ValueError, match="needs root"):
        divebatch.run("cifar10", full=True)


def test_full_protocol_matches_the_authors_configs():
    config = divebatch.CONFIGS["cifar10"]
    assert (config["epochs"], config["initial_batch_size"], config["max_batch_size"]) == (200, 128, 2048)
    assert (config["lr"], config["momentum"], config["weight_decay"], config["lr_scheduler"]) == (0.1, 0.9, 5e-4, "cosine")
    assert (config["delta"], config["resize_every"]) == (0.1, 20)
    schedule, lr = divebatch.make_schedule("divebatch_linear", config)
    assert isinstance(schedule, batching.DiveBatch) and schedule.lr_rule == "linear" and lr == 0.1
    assert (schedule.delta, schedule.resize_every, schedule.max_batch_size) == (0.1, 20, 2048)
    large, lr_large = divebatch.make_schedule("sgd_large", config)
    assert large.batch_size == 2048 and lr_large == pytest.approx(1.6)
    ada, _ = divebatch.make_schedule("adabatch_linear", config)
    assert (ada.factor, ada.resize_every, ada.lr_rule) == (2, 20, "linear")
    assert divebatch.CONFIGS["cifar100"]["delta"] == 0.01
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    step_decay = divebatch._lr_scheduler(divebatch.CONFIGS["cifar100"])(opt)
    assert isinstance(step_decay, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(step_decay.milestones) == [60, 120, 160] and step_decay.gamma == 0.2


def _fake_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
    (folder / "test_batch").write_bytes(pickle.dumps(test))


def test_full_mode_pipeline_and_resume_on_fake_cifar(tmp_path):
    """The --full path (ResNet-18 with BatchNorm, augmentation, checkpoints) end to end on 20 tiny images."""
    _fake_cifar10(tmp_path)
    kwargs = dict(full=True, root=tmp_path, seeds=[0], methods=["divebatch"], out=tmp_path,
                  checkpoint_dir=tmp_path / "ckpt", progress=False, epochs=2, initial_batch_size=4,
                  max_batch_size=16, resize_every=1, delta=0.5)
    path, payload = divebatch.run("cifar10", **kwargs)
    history = payload["data"]["runs"]["divebatch"]["0"]
    assert len(history["epoch"]) == 2 and math.isfinite(history["diversity"][0])
    assert (tmp_path / "ckpt" / "divebatch_seed0.pt").exists()
    _, again = divebatch.run("cifar10", **kwargs)  # finished: loaded from the checkpoint, not retrained
    assert repr(again["data"]["runs"]) == repr(payload["data"]["runs"])
