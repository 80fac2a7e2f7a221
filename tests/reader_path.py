"""The Colab/Binder reader's path, tested: a fresh venv with torch and exactly what a set-up cell installs.

A Colab runtime has torch, Jupyter's kernel machinery and IPython preinstalled; a notebook's first cell then
runs ``%pip install "gradiv_lib[EXTRAS] @ git+...@main"``. This script builds that environment from the
checkout (not the network URL): a new venv, torch at the version ``requirements.txt`` pins, ``ipykernel`` and
``nbclient`` (the Colab runtime's part), then ``pip install "<checkout>[EXTRAS]"`` -- a real, non-editable
install, so package data must ship and nothing can be read from the source tree. Versions are constrained
to ``requirements.txt``'s pins so the check is reproducible. Then it

1. checks that every module any notebook imports is installed in that venv (by each notebook's own
   extras), and that importing gradiv_lib there pulls in none of the optional packages;
2. executes notebooks from several chapters in it, each in its own folder, as a reader would.

Run: ``python tests/reader_path.py [--venv DIR] [--keep] [NOTEBOOK ...]`` (``make reader-path``).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One notebook from each of several chapters, chosen to cover stored results (ch04), figures and widgets.
DEFAULT_NOTEBOOKS = [
    "book/ch01_gradient_diversity/01_what_is_diversity.ipynb",
    "book/ch04_divebatch/03_explore_and_full_protocol.ipynb",
    "book/ch07_fedaware/01_min_norm.ipynb",
]
INSTALL = re.compile(r'%pip install -q "gradiv_lib(\[(?P<extras>[\w,]+)\])? @ git\+https://github\.com/gradiv/gradiv@main"')
# What a Colab runtime has before the set-up cell runs, besides torch.
RUNTIME = ["ipykernel", "nbclient", "nbformat"]


def notebooks() -> list[Path]:
    return sorted((ROOT / "book").rglob("*.ipynb"))


def code_cells(nb: Path) -> list[str]:
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def extras_of(nb: Path) -> list[str]:
    """The extras the notebook's set-up cell installs in Colab."""
    match = INSTALL.search(code_cells(nb)[0])
    if not match:
        raise SystemExit(f"{nb.relative_to(ROOT)}: the set-up cell has no Colab install line matching {INSTALL.pattern}")
    return sorted((match.group("extras") or "").split(",")) if match.group("extras") else []


def imported_modules(nb: Path) -> set[str]:
    """Top-level names of the modules a notebook imports (IPython magics and shell lines removed)."""
    names: set[str] = set()
    for source in code_cells(nb):
        lines = [line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
                 for line in source.splitlines()]
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def pins() -> dict[str, str]:
    """``name==version`` lines of requirements.txt."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_venv(venv: Path, extras: list[str]) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins().items()))
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    run(pip + [f"torch=={pins()['torch']}"] + RUNTIME)           # the Colab runtime
    # A real install from the checkout, built from a copy of what the package consists of (as pip does from a
    # URL), so the build leaves nothing in the checkout and cannot see files outside the package.
    source = venv / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "gradiv_lib", source / "gradiv_lib", ignore=shutil.ignore_patterns("__pycache__"))
    spec = f"{source}[{','.join(extras)}]" if extras else str(source)
    run(pip + ["--no-cache-dir", "--force-reinstall", "--no-deps", spec])
    run(pip + [spec])                                             # its dependencies, by the extras asked for
    return python


def check_imports(python: Path, nbs: list[Path]) -> None:
    """Every module a notebook imports is installed; ``import gradiv_lib`` imports no optional package."""
    wanted = sorted(set().union(*(imported_modules(nb) for nb in nbs)))
    probe = f"""
import importlib.util, json, sys
missing = [m for m in {wanted!r} if importlib.util.find_spec(m) is None]
import gradiv_lib
heavy = [m for m in ("matplotlib", "ipywidgets", "IPython", "sklearn", "scipy", "flwr", "myst_nb") if m in sys.modules]
where = gradiv_lib.__file__
print(json.dumps({{"missing": missing, "heavy": heavy, "where": where}}))
"""
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"modules the notebooks import: {', '.join(wanted)}")
    if report["missing"]:
        raise SystemExit(f"notebooks import modules their set-up cell does not install: {report['missing']}")
    if report["heavy"]:
        raise SystemExit(f"import gradiv_lib imported optional packages: {report['heavy']}")
    if report["where"].startswith(str(ROOT / "gradiv_lib")):
        raise SystemExit(f"the venv imports gradiv_lib from the checkout ({report['where']}), not from its install")


EXECUTE = """
import sys, time
import nbformat
from nbclient import NotebookClient
path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
start = time.perf_counter()
NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
print(f"{time.perf_counter() - start:.1f}")
"""


def execute(python: Path, nb: Path) -> float:
    """Execute ``nb`` with the venv's kernel, in the notebook's own folder, outside any source tree on sys.path."""
    out = subprocess.run([str(python), "-c", EXECUTE, str(nb), str(nb.parent)], capture_output=True, text=True,
                         cwd=nb.parent, env={"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(Path.home()),
                                             "MPLBACKEND": "Agg", "GRADIV_DEVICE": "cpu"})
    if out.returncode != 0:
        raise SystemExit(f"{nb.relative_to(ROOT)} failed in the reader's venv:\n{out.stderr[-6000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test the Colab/Binder reader's path in a fresh venv.")
    parser.add_argument("notebooks", nargs="*", help=f"notebooks to execute (default: {' '.join(DEFAULT_NOTEBOOKS)})")
    parser.add_argument("--venv", type=Path, default=ROOT / "_build" / "reader-venv", help="where to build the venv")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    all_nbs = notebooks()
    by_extras: dict[tuple[str, ...], list[Path]] = {}
    for nb in all_nbs:
        by_extras.setdefault(tuple(extras_of(nb)), []).append(nb)
    # The venv has what the plain [book] set-up cell installs; notebooks asking for more extras are checked
    # for the modules they import beyond those extras' own packages (gradiv_lib imports those lazily).
    base = min(by_extras, key=len)
    python = build_venv(args.venv, list(base))
    setup_seconds = time.perf_counter() - start
    check_imports(python, all_nbs)
    chosen = [ROOT / p for p in (args.notebooks or DEFAULT_NOTEBOOKS)]
    for nb in chosen:
        if tuple(extras_of(nb)) != base:
            raise SystemExit(f"{nb.relative_to(ROOT)} needs extras {extras_of(nb)}; the venv has {list(base)}")
        print(f"{nb.relative_to(ROOT)}: executed in {execute(python, nb):.1f} s", flush=True)
    print(f"reader path: venv with torch + gradiv_lib[{','.join(base)}] built in {setup_seconds:.0f} s, "
          f"{len(chosen)} notebooks executed, {len(all_nbs)} notebooks' imports checked; "
          f"{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
