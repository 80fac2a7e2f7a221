"""One prepared GPU check of the per-sample-norm engine: correctness on CUDA, then cost.

Derived in chapter 2 of the book (book/ch02_computing_fast).

1. the norms harness (``tests/test_norms_harness.py``) on CUDA in every dtype it lists (float64,
   float32, bfloat16, float16, autocast), each case against ``torch.func``;
2. a short :func:`gradiv_lib.train.train` run with ``measure_diversity=True`` and a few steps of the
   stacked worker simulator (:class:`gradiv_lib.workers.Simulator`), both on CUDA;
3. per-sample squared norms for a CIFAR ResNet-18 (``gradiv_lib.models.resnet18_cifar``, GroupNorm
   so per-sample gradients exist in training mode) on CIFAR-shaped synthetic data at B = 128, and for
   a transformer encoder block, timed against a plain training step, BackPACK ``BatchL2Grad`` and
   Opacus ``GradSampleModule`` (when importable and able to handle the model) and ``vmap(grad)``,
   with peak memory (``torch.cuda.max_memory_allocated``) and agreement with the engine.

Everything lands in ``OUT/gpu_check.json``. Without CUDA the script exits with a message (status 0);
``--allow-cpu`` runs a tiny version of the same code paths on the CPU (what the test suite does)::

    python benchmarks/gpu_check.py --out DIR [--allow-cpu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradiv_lib import models  # noqa: E402
from gradiv_lib.norms import DiversityMeter, per_sample_sq_norms  # noqa: E402


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``step`` after one warm-up call, and its peak memory in MiB (CUDA only)."""
    step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


# --- 1. the harness ---------------------------------------------------------------------------------


def run_harness(device: torch.device, smoke: bool, timeout: float = 420.0) -> dict:
    """pytest on the harness with GRADIV_NORMS_DEVICES set to this device (a small subset in smoke mode)."""
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_norms_harness.py"), "-q", "-p", "no:cacheprovider"]
    if smoke:
        command += ["-k", "test_layer_against_torch_func and lstm_seq_first and float64"]
    env = {**os.environ, "GRADIV_NORMS_DEVICES": device.type, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        return {"returncode": "timeout", "summary": f"harness did not finish in {timeout} s", "seconds": time.perf_counter() - start,
                "output_tail": (expired.stdout or b"")[-4000:].decode(errors="replace") if isinstance(expired.stdout, bytes) else str(expired.stdout)[-4000:]}
    lines = completed.stdout.strip().splitlines()
    return {"returncode": completed.returncode, "summary": lines[-1] if lines else "", "seconds": time.perf_counter() - start,
            "output_tail": "\n".join(lines[-40:]) + completed.stderr[-2000:]}


# --- 2. training loop and simulator -------------------------------------------------------------------


def run_training(device: torch.device, smoke: bool) -> dict:
    from gradiv_lib.train import train

    n, size = (32, 8) if smoke else (2048, 32)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    model = models.resnet18_cifar(10, width_multiplier=0.0625 if smoke else 0.5, norm="group", seed=0)
    start = time.perf_counter()
    history = train(model, (x, y), schedule=16 if smoke else 128, epochs=1, lr=0.05, measure_diversity=True, device=device, progress=False)
    record = history if isinstance(history, dict) else getattr(history, "__dict__", {})
    return {"seconds": time.perf_counter() - start, "fields": sorted(str(k) for k in record)[:20]}


def run_simulator(device: torch.device, smoke: bool) -> dict:
    from gradiv_lib.workers import DSGD, SGD, Simulator, ring

    n = 256 if smoke else 4096
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 16, generator=generator), torch.randint(0, 4, (n,), generator=generator)
    model = models.mlp(16, 32, 2, 4, seed=0)
    simulator = Simulator(model, (x, y), DSGD(ring(4 if smoke else 16)), SGD(0.1), batch_size=8, device=device)
    start = time.perf_counter()
    simulator.run(5 if smoke else 200, record_every=5 if smoke else 50)
    return {"seconds": time.perf_counter() - start, "consensus_distance": float(simulator.consensus_distance())}


# --- 3. benchmarks ------------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Token embedding + one pre-norm transformer encoder layer + mean-pooled classifier."""

    def __init__(self, vocabulary: int, width: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.block(self.embed(ids)).mean(1))


def _vmap_norms(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**buffers, **p}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())


def _backpack_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    extended = extend(model)  # first-order extensions need no converter for residual connections
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def step() -> Tensor:
        extended.zero_grad()
        with backpack(BatchL2Grad()):
            loss_fn(extended(x), y).backward()
        missing = [name for name, p in extended.named_parameters() if not hasattr(p, "batch_l2")]
        if missing:
            raise NotImplementedError(f"BackPACK computed no batch_l2 for {missing[:3]} (a layer type it does not support)")
        return sum(p.batch_l2 for p in extended.parameters())

    return step


def _opacus_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def step() -> Tensor:
        wrapped.zero_grad()
        loss_fn(wrapped(x), y).backward()
        total = sum(p.grad_sample.reshape(x.shape[0], -1).square().sum(1) for p in model.parameters())
        for p in model.parameters():
            p.grad_sample = None
        return total

    return step


def benchmark(name: str, build: Callable[[], nn.Module], make_batch: Callable[[], tuple[Tensor, Tensor]], device: torch.device, repeats: int) -> dict:
    """Median time and peak memory of each method, relative to the plain step, plus agreement."""
    import copy

    x, y = make_batch()
    x, y = x.to(device), y.to(device)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model = build().to(device)
    reference = per_sample_sq_norms(model, loss_fn, x, y).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def plain() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()

    def meter() -> Tensor:
        optimizer.zero_grad()
        with DiversityMeter(model, loss_reduction="sum") as m:
            loss_fn(model(x), y).backward()
        return m.sq_norms

    methods: dict[str, Callable[[], object]] = {"plain_step": plain, "gradiv_meter": meter, "vmap_grad": lambda: _vmap_norms(model, loss_fn, x, y)}
    for label, factory in (("backpack_batch_l2", _backpack_step), ("opacus_grad_sample", _opacus_step)):
        try:
            methods[label] = factory(copy.deepcopy(model), x, y)
        except Exception as error:  # not installed, or the model has a layer it does not support
            methods[label] = f"unavailable: {type(error).__name__}: {error}"[:300]
    results: dict[str, dict] = {}
    for label, step in methods.items():
        if isinstance(step, str):
            results[label] = {"skipped": step}
            continue
        try:
            seconds, peak = _timed(step, device, repeats)
            entry: dict = {"median_s": seconds, "peak_mib": peak}
            value = step()
            if isinstance(value, Tensor):
                entry["max_rel_diff_vs_gradiv"] = float(((value.double() - reference).abs() / reference.abs().max()).max())
            results[label] = entry
        except Exception as error:
            results[label] = {"failed": f"{type(error).__name__}: {error}"[:300]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results["plain_step"].get("median_s")
    for entry in results.values():
        if base and "median_s" in entry:
            entry["ratio_to_plain"] = entry["median_s"] / base
    return {"name": name, "batch": int(x.shape[0]), "parameters": sum(p.numel() for p in model.parameters()), "methods": results}


def run_benchmarks(device: torch.device, smoke: bool, repeats: int) -> list[dict]:
    batch, size, width = (4, 8, 0.125) if smoke else (128, 32, 1.0)
    generator = torch.Generator().manual_seed(0)

    def cifar() -> tuple[Tensor, Tensor]:
        return torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, 10, (batch,), generator=generator)

    vocabulary, length, model_width = (50, 6, 16) if smoke else (1000, 128, 256)

    def tokens() -> tuple[Tensor, Tensor]:
        return torch.randint(0, vocabulary, (batch, length), generator=generator), torch.randint(0, 10, (batch,), generator=generator)

    def batch_norm_eval() -> nn.Module:  # BackPACK supports BatchNorm in eval mode, not GroupNorm
        return models.resnet18_cifar(10, width_multiplier=width, norm="batch", seed=0).eval()

    return [
        benchmark("resnet18_cifar_groupnorm", lambda: models.resnet18_cifar(10, width_multiplier=width, norm="group", seed=0), cifar, device, repeats),
        benchmark("resnet18_cifar_batchnorm_eval", batch_norm_eval, cifar, device, repeats),
        benchmark("transformer_encoder_block", lambda: EncoderBlock(vocabulary, model_width, 4), tokens, device, repeats),
    ]


# --- main -----------------------------------------------------------------------------------------------------


def _environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for package in ("backpack", "opacus"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "installed")
        except ImportError:
            info[package] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        info["commit"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run a tiny CPU smoke version instead of exiting")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per method (default 20)")
    parser.add_argument("--skip-harness", action="store_true", help="do not run the harness (benchmarks only)")
    parser.add_argument("--harness-timeout", type=float, default=420.0, help="seconds allowed for the harness (default 420)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if torch.cuda.is_available():
        device, smoke = torch.device("cuda"), False
    elif args.allow_cpu:
        device, smoke = torch.device("cpu"), True
        print("gpu_check: no CUDA device; running the tiny CPU smoke version (--allow-cpu)")
    else:
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a machine with a GPU, or pass --allow-cpu for the CPU smoke version.")
        return 0
    repeats = 1 if smoke else args.repeats
    if smoke:
        torch.set_num_threads(1)  # tiny tensors on a possibly shared CPU
    report: dict = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(), "smoke": smoke, "environment": _environment(device)}
    ok = True
    stages = [("harness", lambda: run_harness(device, smoke, args.harness_timeout))] if not args.skip_harness else []
    stages += [
        ("training", lambda: run_training(device, smoke)),
        ("simulator", lambda: run_simulator(device, smoke)),
        ("benchmarks", lambda: run_benchmarks(device, smoke, repeats)),
    ]
    for stage, run in stages:
        print(f"gpu_check: {stage} ...", flush=True)
        try:
            report[stage] = run()
        except Exception:
            report[stage] = {"error": traceback.format_exc()[-3000:]}
            ok = False
        if stage == "harness" and report[stage].get("returncode"):
            ok = False
        print(f"gpu_check: {stage}: {json.dumps(report[stage], default=str)[:600]}", flush=True)
    report["ok"] = ok
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2, default=str))
    temporary.replace(path)
    print(f"gpu_check: wrote {path} (ok={ok})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
