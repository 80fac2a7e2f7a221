"""Small JSON results of long runs (experiments, benchmarks): where they go, what they record, how to read them.

**A run writes under the current directory**, ``./gradiv-results/<name>.json``, or under the folder given as
``root`` (the command line's ``--out DIR``); it never writes into the installed package. **Shipped results** — the
ones the book's pages plot — are read-only package data under ``gradiv_lib/_results/`` and are read with
:func:`load` through :mod:`importlib.resources`, so a page works in a clone, in CI, on Binder and after
``pip install``. They are made by ``gradiv regenerate`` (``make results``) from a clean checkout, and a test refuses
any that lacks its history.

Every result records its history (:func:`provenance`): the exact command line (``argv``) and the ``gradiv``
command that reproduces it, the full configuration, the library version, the git commit of the library's checkout,
whether that tree had uncommitted changes (``git_dirty``), the module that produced it (``producer``), the torch
and Python versions, the device and machine, the date and the seconds the run took.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

#: Where shipped results live inside the package (``gradiv_lib/_results/<name>.json``); read-only for runs.
RESULTS_DIR = Path(__file__).resolve().parent / "_results"

#: Default output folder of a run, relative to the current directory.
DEFAULT_OUT = "gradiv-results"

#: Paths of a checkout that do not make it "dirty": where results are written.
_RESULT_PATHS = ("gradiv_lib/_results/", "gradiv-results/")

#: The ``gradiv ...`` command of the running command-line invocation (set by :mod:`gradiv_lib.cli`; a script that
#: ``gradiv bench`` starts receives it as ``$GRADIV_COMMAND``).
_command: str | None = None
_git_cache: dict[str, Any] | None = None


class OutputError(ValueError):
    """The output folder cannot hold results (it is a file, or it cannot be written)."""


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or name.endswith(".json"):
        raise ValueError(f"name must be a relative path like 'benchmarks/norms_cpu' without .json, got {name!r}")
    return name


def default_root() -> Path:
    """``./gradiv-results`` under the current directory: where a run writes unless told otherwise."""
    return Path.cwd() / DEFAULT_OUT


def check_out(root: str | Path | None) -> Path:
    """The folder a run will write into (``root`` or :func:`default_root`), checked before any work starts.

    Raises :class:`OutputError` when it, or the nearest existing folder above it, is a file or is not writable.
    """
    path = Path(root).expanduser() if root is not None else default_root()
    check_writable_folder(path, "--out")
    return path


def check_writable_folder(path: Path, what: str) -> None:
    """Create ``path`` if missing and make sure a file can be written there (``what`` names it in the
    error), so that a long run does not find out at its first write; raises :class:`OutputError`."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"is below the file {probe}"
        raise OutputError(f"{what} {path} {where}; give a folder (it is created if missing)")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write into {probe} (permission denied); give a writable folder")
    try:  # the checks above cannot see everything (root ignores permissions, /proc, a read-only mount): try it
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OutputError(f"{what} {path}: cannot write there ({error.strerror or error}); give a writable folder") from None


NUMERICS_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Environment that pins torch's CPU kernels to the AVX2 instruction set on x86-64: torch's own vectorised kernels
(``ATEN_CPU_CAPABILITY``), MKL's matrix products in conditional-numerical-reproducibility mode (``MKL_CBWR``) and
oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``). With it a machine with AVX-512 and one without run the same
kernels, so a training run should give the same bits on both (at the same thread count) instead of drifting apart
(checked so far on a processor without AVX-512 only); ``gradiv regenerate`` sets it for the shipped results and
their check."""


def machine_info(device: Any = None) -> dict[str, Any]:
    """Versions, processor, core count, torch threads and (if CUDA) the GPU name."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    pinned = {name: os.environ[name] for name in NUMERICS_ENV if name in os.environ}
    if pinned:   # kernels pinned to one instruction set (gradiv regenerate does, for results that must match bit for bit)
        info["numerics"] = pinned
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():   # a data-parallel run
        info["processes"] = torch.distributed.get_world_size()
        info["backend"] = torch.distributed.get_backend()
    return info


SAME_MACHINE_KEYS = ("processor", "cpu_capability", "numerics", "torch", "python", "torch_threads")
"""What decides a float computation's last bits on the CPU: the processor model, torch's instruction set, pinned
kernels (or none), the torch and Python versions and the thread count."""


def same_machine(result: dict[str, Any]) -> bool:
    """Whether this process computes as the one that made ``result`` did (:data:`SAME_MACHINE_KEYS` of
    :func:`machine_info` equal; a result that does not record one of them counts as another machine). Then a rerun of
    the same command and seed gives the same bits; otherwise the last bits differ, and a long training run drifts
    (a chaotic one, such as DiveBatch's batch-size decisions, ends like another seed)."""
    here, there = machine_info(), result.get("machine", {})
    return all(key in there or key == "numerics" for key in SAME_MACHINE_KEYS) and all(
        here.get(key) == there.get(key) for key in SAME_MACHINE_KEYS)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def repo_root() -> Path | None:
    """The root of the git checkout that holds this library (``None`` when installed outside one)."""
    package = Path(__file__).resolve().parent
    top = _git("rev-parse", "--show-toplevel", cwd=package)
    if not top:
        return None
    root = Path(top.strip()).resolve()
    # an installed copy inside some other repository is not a checkout of the library
    if (root / "gradiv_lib").resolve() != package:
        return None
    return root


def git_state(refresh: bool = False) -> dict[str, Any]:
    """``{"commit", "dirty", "changes"}`` of the library's checkout, computed once per process (the code a run
    imports is the code of its first look): ``dirty`` is ``git status --porcelain`` minus the result folders;
    all ``None`` outside a checkout."""
    global _git_cache
    if _git_cache is not None and not refresh:
        return _git_cache
    root = repo_root()
    state: dict[str, Any] = {"commit": None, "dirty": None, "changes": []}
    if root is not None:
        commit = _git("rev-parse", "HEAD", cwd=root)
        status = _git("status", "--porcelain", "--untracked-files=all", cwd=root)
        if commit:
            state["commit"] = commit.strip()
        if status is not None:
            changes = [line[3:] for line in status.splitlines()
                       if line[3:] and not line[3:].strip('"').startswith(_RESULT_PATHS)]
            state["dirty"] = bool(changes)
            state["changes"] = changes[:20]
    _git_cache = state
    return state


def _producer(frame_depth: int) -> str | None:
    """The file of the function that called :func:`save`, relative to the checkout root (or the package)."""
    try:
        filename = Path(sys._getframe(frame_depth).f_code.co_filename).resolve()
    except (ValueError, AttributeError):
        return None
    for base in (repo_root(), Path(__file__).resolve().parents[1]):
        if base is not None:
            try:
                return filename.relative_to(base).as_posix()
            except ValueError:
                continue
    return filename.name


def provenance(*, producer: str | None = None) -> dict[str, Any]:
    """What :func:`save` records about where a result came from (besides config, machine and timing)."""
    state = git_state()
    return {
        "command": _command or os.environ.get("GRADIV_COMMAND") or "python " + shlex.join(sys.argv),
        "argv": list(getattr(sys, "orig_argv", sys.argv)),
        "producer": producer,
        "gradiv_lib": _version(),
        "git_commit": state["commit"],
        "git_dirty": state["dirty"],
    }


def save(name: str, data: dict[str, Any], *, config: dict[str, Any], seconds: float, device: Any = None,
         root: str | Path | None = None, producer: str | None = None) -> Path:
    """Write ``data`` with its configuration and provenance to ``<root>/<name>.json`` atomically (a temporary file,
    then a rename) and return the path.

    ``root`` defaults to ``./gradiv-results`` under the current directory (never the package); ``producer`` (the
    module that made the result, relative to the checkout) defaults to the file of the caller.
    """
    path = check_out(root) / f"{_check_name(name)}.json"
    payload = {
        "name": name,
        **provenance(producer=producer or _producer(2)),
        "config": config,
        "seconds": round(float(seconds), 3),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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
    import torch

    _replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp))


def shipped() -> list[str]:
    """Names of the results shipped with the package (``benchmarks/norms_cpu``, ``ch04/divebatch_digits``, ...)."""
    names: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".json") and not child.name.startswith("."):
                names.append(prefix + child.name[:-5])

    base = resources.files("gradiv_lib").joinpath("_results")
    if base.is_dir():
        walk(base, "")
    return sorted(names)


def load(name: str, *, root: str | Path | None = None) -> dict[str, Any]:
    """Read a result saved by :func:`save`: a shipped one (read-only package data, through
    :mod:`importlib.resources`) unless ``root`` names the folder a run wrote into (its ``--out``)."""
    _check_name(name)
    if root is not None:
        path = Path(root) / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no result {name!r} at {path}")
        return json.loads(path.read_text())
    resource = resources.files("gradiv_lib").joinpath("_results", *f"{name}.json".split("/"))
    if not resource.is_file():
        raise FileNotFoundError(f"no result {name!r} shipped with gradiv_lib; available: {shipped()}")
    return json.loads(resource.read_text())


def _version() -> str:
    from . import __version__

    return __version__
