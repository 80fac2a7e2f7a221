"""The torch.distributed runner: real gloo processes on 127.0.0.1 reach the simulator's parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gradiv_lib.data import partition_dirichlet
from gradiv_lib.workers import DSGD, SGD, DistributedWorker, LocalSGD, MinibatchSGD, Simulator, free_port, ring, spawn
from gradiv_lib.workers.distributed import build_parser, build_run, main

torch.set_num_threads(1)

ARGV = ["--steps", "12", "--dtype", "float64", "--width", "16", "--batch-size", "8", "--record-every", "6"]


def _configs(world: int):
    """Three algorithms on one shared set-up: D-SGD with momentum, local SGD on unequal shards, C-SGD."""
    run = build_run(build_parser().parse_args(ARGV), world)
    unequal = partition_dirichlet(run["train"].y, world, alpha=1.0, seed=3, min_size=8)
    return run, [
        ("dsgd", DSGD(ring(world)), SGD(0.3, momentum=0.9), run["partition"]),
        ("local", LocalSGD(3), SGD(0.3, momentum=0.5, weight_decay=1e-3), unequal),
        ("csgd", MinibatchSGD(), SGD(0.3), run["partition"]),
    ]


def _distributed_worker(rank: int, world: int, out_dir: str) -> None:
    run, configs = _configs(world)
    for name, algorithm, opt, partition in configs:
        worker = DistributedWorker(run["model"], run["train"], algorithm, opt, partition=partition, batch_size=8, seed=0)
        history = worker.run(12, record_every=6)
        params = worker.gather_params()
        if rank == 0:
            torch.save({"params": params, "consensus": torch.tensor(history["consensus"])}, os.path.join(out_dir, f"{name}.pt"))


def _sleeper(rank: int, world: int) -> None:
    time.sleep(60)


def test_gloo_processes_reach_the_simulators_parameters(tmp_path) -> None:
    world = 3
    spawn(_distributed_worker, world, args=(str(tmp_path),), timeout=240)
    run, configs = _configs(world)
    for name, algorithm, opt, partition in configs:
        sim = Simulator(run["model"], run["train"], algorithm, opt, partition=partition, batch_size=8, seed=0)
        history = sim.run(12, record_every=6)
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert saved["params"].dtype == torch.float64
        torch.testing.assert_close(saved["params"], sim.params, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(saved["consensus"], torch.tensor(history["consensus"]), rtol=1e-8, atol=1e-20)


def test_torchrun_command_line_matches_the_simulator_in_float32(tmp_path) -> None:
    out = tmp_path / "run.json"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "gradiv_lib.workers",
           "--algorithm", "dsgd", "--topology", "ring", "--steps", "20", "--width", "16", "--momentum", "0.9",
           "--compare", "--out", str(out), "--record-every", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 workers (gloo), dsgd on a ring, 20 steps" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["n_workers"] == 2 and summary["history"]["step"] == [10, 20]
    assert summary["max_abs_diff_vs_simulator"] <= 1e-5 * max(1.0, summary["max_abs_param"])
    assert 0 <= summary["test_accuracy"] <= 1


def test_spawn_times_out_and_cleans_up() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 4 s"):
        spawn(_sleeper, 1, timeout=4)
    assert time.monotonic() - start < 40


def test_errors_without_a_process_group(capsys, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert main(["--steps", "1"]) == 2
    assert "torchrun --standalone --nproc-per-node K" in capsys.readouterr().err
    run = build_run(build_parser().parse_args(ARGV), 2)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        DistributedWorker(run["model"], run["train"], MinibatchSGD(), SGD(0.1))
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        spawn(_sleeper, 0)
    assert 0 < free_port() < 65536
