"""train() on two gloo processes is the single-process run of the same global batches.

Each process takes its slice of every global batch; the gradients, the loss and the per-sample squared norms are
all-reduced, so the batch sizes DiveBatch chooses, the measured diversities and the final parameters must equal the
one-process run's to round-off (float64). The data sizes leave ragged last batches, one of a single sample (one
process gets an empty slice).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from gradiv_lib import models
from gradiv_lib.batching import AdaBatch, DiveBatch
from gradiv_lib.data import synthetic_classification
from gradiv_lib.training import train
from gradiv_lib.workers import spawn

torch.set_num_threads(1)


def _problem():
    data = synthetic_classification(241, 6, 3, seed=1, separation=1.0).to(dtype=torch.float64)
    train_data, test_data = data.split(0.165, seed=0)   # 201 training samples: 201 = 25·8 + 1
    return train_data, test_data


def _jitter(x, generator):
    """An augmentation drawn from the run's generator: applied to the global batch, the same draws everywhere."""
    return x + 0.1 * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _runs():
    """Two configurations: DiveBatch with a mean loss measured in the backward pass; AdaBatch with a summed loss,
    measured in a separate chunked pass (measure_batch_size), with weight decay and an augmentation."""
    return {
        "divebatch": dict(schedule=lambda: DiveBatch(8, 64, delta=0.05, resize_every=2), loss_fn=None,
                          extra=dict(momentum=0.9, lr=0.1)),
        "adabatch_sum": dict(schedule=lambda: AdaBatch(8, 32, resize_every=2, lr_rule="sqrt"),
                             loss_fn=lambda: nn.CrossEntropyLoss(reduction="sum"),
                             extra=dict(momentum=0.5, lr=0.01, weight_decay=1e-3, measure_batch_size=5,
                                        transform=_jitter)),
    }


def _train(name: str, seed: int = 0, **options):
    spec = _runs()[name]
    train_data, test_data = _problem()
    model = models.mlp(6, 12, 2, 3, seed=0).double()
    history = train(model, train_data, schedule=spec["schedule"](), epochs=6, test_data=test_data, seed=seed,
                    loss_fn=None if spec["loss_fn"] is None else spec["loss_fn"](), measure_diversity=True,
                    progress=False, **spec["extra"], **options)
    return history, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank: int, world: int, out_dir: str) -> None:
    for name in _runs():
        history, params = _train(name)
        torch.save({"history": history.to_dict(), "params": params}, os.path.join(out_dir, f"{name}_{rank}.pt"))
    # interrupted after epoch 2 and resumed: every process reads process 0's checkpoint
    checkpoint = os.path.join(out_dir, "divebatch.ckpt")

    def stop(epoch, model, history):
        if epoch == 2:
            raise KeyboardInterrupt

    try:
        _train("divebatch", checkpoint_path=checkpoint, on_epoch_end=stop)
    except KeyboardInterrupt:
        pass
    history, params = _train("divebatch", checkpoint_path=checkpoint)
    torch.save({"history": history.to_dict(), "params": params}, os.path.join(out_dir, f"resumed_{rank}.pt"))
    try:  # a wrong use: each process with its own seed would train on overlapping slices
        _train("divebatch", seed=rank)
    except ValueError as error:
        with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
            f.write(str(error))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One launch of two gloo processes (starting them is most of the cost) for all the tests here."""
    out = tmp_path_factory.mktemp("ddp")
    spawn(_worker, 2, args=(str(out),), timeout=180)
    return out


def test_two_gloo_processes_match_the_single_process_run(two_processes) -> None:
    tmp_path = two_processes
    assert len(_problem()[0]) == 201          # batches of 8 leave a last batch of one sample: one empty slice
    for name in _runs():
        single, params = _train(name)
        assert len(single.resizes) >= 2, "the run must change the batch size to test the agreement"
        for rank in (0, 1):
            saved = torch.load(tmp_path / f"{name}_{rank}.pt", weights_only=True)
            h = saved["history"]
            assert h["batch_size"] == single.batch_size, name
            assert h["steps"] == single.steps and h["samples"] == single.samples
            assert len(h["resizes"]) == len(single.resizes)
            for mine, ref in zip(h["resizes"], single.resizes):
                assert mine.keys() == ref.keys()
                for key, value in ref.items():       # batch sizes, lr multipliers, N·Δ̂ estimates (None for AdaBatch)
                    assert mine[key] == (None if value is None else pytest.approx(value, rel=1e-9)), (name, key)
            assert h["diversity"] == pytest.approx(single.diversity, rel=1e-9)   # Δ̂ of the global batches
            assert h["lr"] == pytest.approx(single.lr, rel=1e-12)
            for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
                assert h[key] == pytest.approx(getattr(single, key), rel=1e-9, abs=1e-12), (name, key)
            torch.testing.assert_close(saved["params"], params, rtol=1e-10, atol=1e-12)


def test_an_interrupted_run_resumes_on_every_process_from_process_0s_checkpoint(two_processes) -> None:
    uninterrupted = torch.load(two_processes / "divebatch_0.pt", weights_only=True)
    for rank in (0, 1):
        resumed = torch.load(two_processes / f"resumed_{rank}.pt", weights_only=True)
        for key in ("batch_size", "diversity", "train_loss", "test_accuracy", "resizes"):
            assert resumed["history"][key] == uninterrupted["history"][key], key
        torch.testing.assert_close(resumed["params"], uninterrupted["params"], rtol=0, atol=0)


def test_processes_with_different_seeds_are_refused(two_processes) -> None:
    for rank in (0, 1):
        message = (two_processes / f"error_{rank}.txt").read_text()
        assert message.startswith("train() on 2 processes: seed differs between processes (process 0: 0, process 1: 1)")


def test_the_books_torchrun_command_is_the_one_process_run(tmp_path) -> None:
    """`torchrun --nproc-per-node 2 -m gradiv_lib divebatch ...` (gloo on CPU) writes the one-process result."""
    import json
    import subprocess
    import sys

    from gradiv_lib import cli
    from gradiv_lib.workers import free_port

    options = ["divebatch", "--epochs", "2", "--resize-every", "1", "--seeds", "0", "--methods", "divebatch",
               "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "gradiv_lib", *options, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("result written to") == 1 and "2 processes" in proc.stdout      # process 0 reports
    assert cli.main([*options, "--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / w / "ch04" / "divebatch_digits.json").read_text()) for w in ("two", "one"))
    assert two["machine"]["processes"] == 2 and two["machine"]["backend"] == "gloo" and "processes" not in one["machine"]
    h2, h1 = two["data"]["runs"]["divebatch"]["0"], one["data"]["runs"]["divebatch"]["0"]
    assert h2["batch_size"] == h1["batch_size"] and len(h1["resizes"]) >= 1
    assert h2["diversity"] == pytest.approx(h1["diversity"], rel=1e-4)          # float32: round-off of the sums
    assert h2["test_accuracy"] == pytest.approx(h1["test_accuracy"], abs=2 / 360)


def test_wrong_launches_say_what_to_do(monkeypatch, tmp_path, capsys) -> None:
    import gradiv_lib.training.distributed as parallel
    from gradiv_lib import cli

    # --nproc starts gloo processes on the CPU; a GPU run is launched by torchrun, one process per GPU
    monkeypatch.setattr(cli, "_resolve_device", lambda name: torch.device("cuda"))
    assert cli.main(["divebatch", "--nproc", "2", "--out", str(tmp_path)]) == 1
    assert "torchrun --standalone --nproc-per-node 2 -m gradiv_lib divebatch --device cuda" in capsys.readouterr().err
    # nccl needs the model and data on the process's GPU
    monkeypatch.setattr(parallel.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(parallel.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match=r"nccl backend needs CUDA tensors, but device is cpu; pass device="):
        parallel.DataParallel(torch.device("cpu"))
