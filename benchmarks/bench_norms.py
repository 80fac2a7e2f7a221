"""Cost of per-sample gradient norms (gradient diversity Δ) relative to a plain training step.

Derived in chapter 2 of the book (book/ch02_computing_fast).

Every method computes Δ = Σ‖∇ℓ_i‖² / ‖Σ∇ℓ_i‖² of the same batch with the same weights and ends its
timed region with Δ as a Python float; the baseline is ``zero_grad`` + forward + mean loss + backward.
Methods run interleaved (one repetition of each, in rotating order, per round) and the table
reports median times and median/median ratios. Peak memory is measured per method in a fresh
process: peak RSS (VmHWM, reset after setup) minus RSS after building the model and batch.

Usage::

    python benchmarks/bench_norms.py [--quick] [--threads 1] [--name benchmarks/norms_cpu] [--out ROOT]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradiv_lib import results
from gradiv_lib.diversity import gradient_diversity
from gradiv_lib.norms import DiversityMeter

Step = Callable[[], float]
EXPENSIVE = {"vmap_grad", "loop", "opacus_grad_sample"}
"""Methods timed in fewer rounds (they materialise B×P floats or run B backward passes)."""
LOOP_SAMPLES = 16
"""The per-sample loop runs this many samples and is extrapolated linearly to the batch."""
NOISE_LIMIT, MAX_ATTEMPTS = 1.15, 3
"""A configuration is re-timed (up to MAX_ATTEMPTS, keeping the quietest) while the plain step's
median exceeds its minimum by more than NOISE_LIMIT: a sign that other jobs shared the cores."""


# --- models -------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


class MeanPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def sequence_model() -> nn.Module:
    """Embedding + LayerNorm + a feed-forward block on sequences (T = 64), mean-pooled classifier."""
    return nn.Sequential(
        nn.Embedding(1000, 128), nn.LayerNorm(128), nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 128),
        MeanPool(), nn.Linear(128, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "mlp_784-512-512-10": (mlp, lambda b: torch.randn(b, 784)),
    "cnn_3-32-64_gn_32x32": (cnn, lambda b: torch.randn(b, 3, 32, 32)),
    "seq_emb-ln-ffn_T64": (sequence_model, lambda b: torch.randint(0, 1000, (b, 64))),
}


# --- methods ------------------------------------------------------------------------------------


def _criterion() -> nn.Module:
    return nn.CrossEntropyLoss()


def plain_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    criterion = _criterion()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        return math.nan

    return step


def meter_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    criterion, meter = _criterion(), DiversityMeter(model, loss_reduction="mean")

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with meter:
            criterion(model(x), y).backward()
        return meter.result.diversity

    return step


def function_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    criterion = _criterion()
    return lambda: gradient_diversity(model, criterion, x, y).diversity


def vmap_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    criterion = _criterion()

    def sample_loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return criterion(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    def step() -> float:
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
        total = sum(g.reshape(g.shape[0], -1).square().sum() for g in grads.values())
        of_sum = sum(g.sum(0).square().sum() for g in grads.values())
        return float(total / of_sum)

    return step


def loop_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """Per-sample backward passes over the first LOOP_SAMPLES samples (Δ only when that is the batch)."""
    criterion, count = _criterion(), min(LOOP_SAMPLES, x.shape[0])
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        total, grad_sum = 0.0, [torch.zeros_like(p) for p in params]
        for i in range(count):
            grads = torch.autograd.grad(criterion(model(x[i : i + 1]), y[i : i + 1]), params)
            total += float(sum(g.square().sum() for g in grads))
            torch._foreach_add_(grad_sum, grads)
        return total / float(sum(g.square().sum() for g in grad_sum)) if count == x.shape[0] else math.nan

    return step


def backpack_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model, criterion = extend(model), extend(_criterion())
    owners = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False) if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        with backpack(BatchL2Grad()):
            loss.backward()
        unsupported = sorted({owners[id(p)] for p in params if not hasattr(p, "batch_l2")})
        if unsupported:
            raise NotImplementedError(f"BackPACK BatchL2Grad has no rule for {', '.join(unsupported)}")
        # mean loss: batch_l2 holds ‖∇ℓ_i / B‖², .grad is Σ∇ℓ_i / B — the B² cancels in Δ
        total = sum(p.batch_l2.sum() for p in params)
        return float(total / sum(p.grad.square().sum() for p in params))

    return step


def opacus_ghost_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """Opacus ghost clipping, first backward only (norms of ∇ℓ_i: Opacus rescales a mean loss by B)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped, criterion, batch = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", use_ghost_clipping=True), _criterion(), x.shape[0]
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def step() -> float:
        wrapped.zero_grad(set_to_none=True)
        criterion(wrapped(x), y).backward()
        total = wrapped.get_norm_sample().square().sum()
        return float(total / (batch**2 * sum(p.grad.square().sum() for p in params)))

    return step


def opacus_grad_sample_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """Opacus hooks mode: materialised per-sample gradients ``p.grad_sample`` (of ∇ℓ_i)."""
    from opacus import GradSampleModule

    wrapped, criterion = GradSampleModule(model, loss_reduction="mean"), _criterion()
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def step() -> float:
        wrapped.zero_grad(set_to_none=True)
        criterion(wrapped(x), y).backward()
        total = sum(p.grad_sample.reshape(p.grad_sample.shape[0], -1).square().sum() for p in params)
        return float(total / sum(p.grad_sample.sum(0).square().sum() for p in params))

    return step


METHODS: dict[str, Callable[[nn.Module, Tensor, Tensor], Step]] = {
    "plain": plain_step,
    "gradiv_meter": meter_step,
    "gradiv_function": function_step,
    "backpack_batch_l2": backpack_step,
    "opacus_ghost": opacus_ghost_step,
    "opacus_grad_sample": opacus_grad_sample_step,
    "vmap_grad": vmap_step,
    "loop": loop_step,
}


def build(model_name: str, batch_size: int, method: str) -> Step:
    """The method's step on a fresh copy of the seeded model and batch."""
    factory, make_inputs = MODELS[model_name]
    torch.manual_seed(0)
    model, x = factory(), make_inputs(batch_size)
    y = torch.randint(0, 10, (batch_size,))
    return METHODS[method](copy.deepcopy(model), x, y)


# --- measurement --------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe_memory(model_name: str, batch_size: int, method: str) -> dict[str, float]:
    """Steady-state peak RSS of ``method`` above the RSS after setup (run in a fresh process).

    One warm-up step (which also runs gradiv's one-time autotuning), then the peak (VmHWM) is reset by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0) and two more steps are measured; memory the
    warm-up left allocated still counts, import-time peaks do not.
    """
    step = build(model_name, batch_size, method)
    before = _status_mb("VmRSS")
    step()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    step()
    step()
    return {"peak_extra_rss_mb": _status_mb("VmHWM") - before, "setup_rss_mb": before}


def memory_in_fresh_process(model_name: str, batch_size: int, method: str, threads: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--probe-memory", model_name, str(batch_size), method, "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"peak_extra_rss_mb": math.nan}
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_methods(steps: dict[str, Step], rounds: int, expensive_rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm up, record Δ, then time the methods interleaved in rotating order."""
    diversity = {}
    for name, step in steps.items():
        diversity[name] = step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in EXPENSIVE and r >= expensive_rounds:
                continue
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times, diversity


def available(method: str, model_name: str, batch_size: int) -> tuple[Step | None, str]:
    """The step, or ``None`` with the reason it cannot run (not installed, unsupported layer)."""
    try:
        step = build(model_name, batch_size, method)
        step()
        return step, ""
    except ImportError as error:
        return None, f"not installed ({error.name})"
    except Exception as error:  # a library that does not support a layer: report, don't crash
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def machine_info(threads: int) -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),
        "note": "2-vCPU VM possibly shared with other jobs; ratios are medians of interleaved repetitions",
    }


def run(quick: bool, threads: int, memory: bool) -> dict[str, object]:
    batch_sizes = (32, 128) if quick else (32, 128, 512)
    info = machine_info(threads)
    results = []
    for model_name in MODELS:
        for batch_size in batch_sizes:
            steps, skipped = {}, {}
            for method in METHODS:
                step, reason = available(method, model_name, batch_size)
                if step is None:
                    skipped[method] = reason
                else:
                    steps[method] = step
            plain_ms = 1e3 * statistics.median([_time_once(steps["plain"]) for _ in range(3)])
            rounds = max(5, min(60, int(6000 / max(plain_ms, 1e-3)))) if not quick else 5
            attempts = []
            for _ in range(MAX_ATTEMPTS):
                attempts.append(time_methods(steps, rounds, expensive_rounds=3 if quick else 5))
                if _noise(attempts[-1][0]) <= NOISE_LIMIT:
                    break
            times, diversity = min(attempts, key=lambda attempt: _noise(attempt[0]))
            plain_median = statistics.median(times["plain"])
            reference = diversity["gradiv_meter"]
            for method in METHODS:
                row: dict[str, object] = {"model": model_name, "batch_size": batch_size, "method": method}
                if method in skipped:
                    row["skipped"] = skipped[method]
                    results.append(row)
                    continue
                scale = batch_size / min(LOOP_SAMPLES, batch_size) if method == "loop" else 1.0
                median = statistics.median(times[method]) * scale
                row |= {
                    "median_ms": 1e3 * median,
                    "min_ms": 1e3 * min(times[method]) * scale,
                    "repetitions": len(times[method]),
                    "ratio_to_plain": median / plain_median,
                    "ratio_of_minima": min(times[method]) * scale / min(times["plain"]),
                    "diversity": diversity[method],
                    "attempts": len(attempts),
                    "plain_median_over_min": _noise(times),
                    "diversity_rel_diff_to_gradiv": abs(diversity[method] - reference) / reference if method != "plain" else None,
                }
                if method == "loop" and scale != 1.0:
                    row["note"] = f"ran {LOOP_SAMPLES} of {batch_size} samples, time extrapolated x{scale:g}; no Δ"
                if memory and (not quick or method in ("plain", "gradiv_meter")):
                    row |= memory_in_fresh_process(model_name, batch_size, method, threads)
                results.append(row)
            _print_rows([r for r in results if r["model"] == model_name and r["batch_size"] == batch_size])
    info["load_average_end"] = os.getloadavg()
    return {"machine": info, "config": {"quick": quick, "batch_sizes": batch_sizes, "methods": list(METHODS), "loop_samples": LOOP_SAMPLES}, "results": results}


def _noise(times: dict[str, list[float]]) -> float:
    return statistics.median(times["plain"]) / min(times["plain"])


def _time_once(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _print_rows(rows: list[dict[str, object]]) -> None:
    plain = next(r for r in rows if r["method"] == "plain")
    plain_memory = plain.get("peak_extra_rss_mb")
    print(f"\n{rows[0]['model']}  B={rows[0]['batch_size']}  plain {plain['median_ms']:.2f} ms")
    print(f"  {'method':<20} {'median ms':>10} {'ratio':>7} {'min ratio':>9} {'Δ rel.diff':>11} {'peak MB':>9} {'mem ratio':>9}")
    for row in rows:
        if "skipped" in row:
            print(f"  {row['method']:<20} skipped: {row['skipped']}")
            continue
        diff = row["diversity_rel_diff_to_gradiv"]
        memory = row.get("peak_extra_rss_mb")
        memory_ratio = memory / plain_memory if memory is not None and plain_memory else None
        print(
            f"  {row['method']:<20} {row['median_ms']:>10.2f} {row['ratio_to_plain']:>7.2f} {row['ratio_of_minima']:>9.2f} "
            f"{'' if diff is None or math.isnan(diff) else f'{diff:.1e}':>11} "
            f"{'' if memory is None else f'{memory:.0f}':>9} {'' if memory_ratio is None else f'{memory_ratio:.2f}':>9}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B in {32, 128}, 5 rounds, memory only for plain and gradiv")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: the cores may be shared)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory probes")
    parser.add_argument("--name", default="benchmarks/norms_cpu",
                        help="result name; saved with gradiv_lib.results.save (the book loads benchmarks/norms_cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="root folder of the result (default: the package's _results, which the book reads)")
    parser.add_argument("--probe-memory", nargs=3, metavar=("MODEL", "B", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe_memory:
        model_name, batch_size, method = args.probe_memory
        print(json.dumps(probe_memory(model_name, int(batch_size), method)))
        return
    start = time.perf_counter()
    payload = run(args.quick, args.threads, memory=not args.no_memory)
    path = results.save(args.name, {"rows": payload["results"], "machine": payload["machine"]},
                        config=payload["config"], seconds=time.perf_counter() - start, root=args.out)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
