"""benchmarks/gpu_check.py: without CUDA it says so and exits 0; with --allow-cpu its smoke version runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_without_cuda_it_exits_with_a_message(no_cuda: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _load().main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device is available" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.json").exists()


def test_cpu_smoke_version_runs_every_stage(no_cuda: None, tmp_path: Path) -> None:
    assert _load().main(["--out", str(tmp_path), "--allow-cpu"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["smoke"]
    assert report["harness"]["returncode"] == 0 and "1 passed" in report["harness"]["summary"]
    assert report["training"]["seconds"] > 0 and report["simulator"]["seconds"] > 0
    names = [b["name"] for b in report["benchmarks"]]
    assert names == ["resnet18_cifar_groupnorm", "resnet18_cifar_batchnorm_eval", "transformer_encoder_block"]
    for bench in report["benchmarks"]:
        methods = bench["methods"]
        assert methods["plain_step"]["ratio_to_plain"] == 1.0
        # float32; the meter's fused convolutions round in another order than the functional hook path
        assert methods["gradiv_meter"]["max_rel_diff_vs_gradiv"] < 1e-5
        assert methods["vmap_grad"]["max_rel_diff_vs_gradiv"] < 1e-3
        for other in ("backpack_batch_l2", "opacus_grad_sample"):
            entry = methods[other]
            assert "skipped" in entry or "failed" in entry or entry["max_rel_diff_vs_gradiv"] < 1e-3
