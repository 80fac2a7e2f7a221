"""Small JSON results of long runs (experiments, benchmarks), shipped with the library.

A long run (a GPU experiment, a benchmark) calls :func:`save`; the book's pages call :func:`load`, which
finds the file as package data, so it works in a clone, in CI, on Binder and on Colab after ``pip install``.
Every result carries the metadata needed to judge it: the config, library, torch and Python versions, the
device and machine, the git commit, the date and the seconds the run took.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

#: Where results live inside the package (``gradiv_lib/_results/<name>.json``).
RESULTS_DIR = Path(__file__).resolve().parent / "_results"


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or name.endswith(".json"):
        raise ValueError(f"name must be a relative path like 'benchmarks/norms_cpu' without .json, got {name!r}")
    return name


def machine_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions, processor, core count, torch threads and (if CUDA) the GPU name."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save(name: str, data: dict[str, Any], *, config: dict[str, Any], seconds: float,
         device: str | torch.device | None = None, root: Path | None = None) -> Path:
    """Write ``data`` with its metadata to ``<root>/<name>.json`` atomically (a temporary file, then a rename)."""
    path = (root or RESULTS_DIR) / f"{_check_name(name)}.json"
    payload = {
        "name": name,
        "config": config,
        "seconds": round(float(seconds), 3),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "gradiv_lib": _version(),
        "machine": machine_info(device),
        "data": data,
    }
    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped package data must be readable by all

    _replace_atomically(path, write_json)
    return path


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``: readers see
    the old file or the new one, never half of one, and an interrupted write leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (a temporary file, then a rename), so an interrupted run never leaves a
    truncated checkpoint. Store plain tensors and containers: checkpoints are read back with
    ``torch.load(..., weights_only=True)``."""
    _replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp))


def load(name: str, *, root: Path | None = None) -> dict[str, Any]:
    """Read a result saved by :func:`save` (from the installed package unless ``root`` is given)."""
    _check_name(name)
    if root is not None:
        path = Path(root) / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no result {name!r} at {path}")
        return json.loads(path.read_text())
    resource = resources.files("gradiv_lib").joinpath("_results", *f"{name}.json".split("/"))
    if not resource.is_file():
        available = sorted(p.relative_to(RESULTS_DIR).with_suffix("").as_posix() for p in RESULTS_DIR.rglob("*.json"))
        raise FileNotFoundError(f"no result {name!r} shipped with gradiv_lib; available: {available}")
    return json.loads(resource.read_text())


def _version() -> str:
    from . import __version__

    return __version__
