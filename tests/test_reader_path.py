"""Static checks of the reader's paths (Colab, Binder, Thebe); tests/reader_path.py runs the real venv."""
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import reader_path  # noqa: E402

# What each extra brings, by the top-level module names a notebook imports.
PROVIDES = {
    "": {"gradiv_lib", "torch", "numpy", "tqdm"},
    "book": {"matplotlib", "ipywidgets", "sklearn", "scipy", "mnist1d", "IPython"},
    "flower": {"flwr"},
}
NOTEBOOKS = reader_path.notebooks()


def test_magics_are_skipped_and_imports_found(tmp_path):
    import json

    nb = tmp_path / "x.ipynb"
    cell = 'import sys\nif True:\n    %pip install -q "gradiv_lib[book,flower] @ git+https://github.com/gradiv/gradiv@main"\n'
    nb.write_text(json.dumps({"cells": [
        {"cell_type": "code", "source": [cell]},
        {"cell_type": "code", "source": ["from scipy.optimize import brentq\n", "import a.b as c, d\n", "!ls\n"]},
        {"cell_type": "markdown", "source": ["import nothing"]}]}))
    assert reader_path.imported_modules(nb) == {"sys", "scipy", "a", "d"}
    assert reader_path.extras_of(nb) == ["book", "flower"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_imports_only_what_its_setup_cell_installs(nb):
    allowed = set(sys.stdlib_module_names) | PROVIDES[""]
    for extra in reader_path.extras_of(nb):
        allowed |= PROVIDES[extra]
    extra_modules = reader_path.imported_modules(nb) - allowed
    assert not extra_modules, f"{nb.name} imports {extra_modules}, which its Colab set-up cell does not install"


def _pins(path):
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_binder_installs_the_readers_set_at_the_pinned_versions():
    binder = _pins(ROOT / ".binder" / "requirements.txt")
    pinned = _pins(ROOT / "requirements.txt")
    assert binder and all(pinned.get(name) == version for name, version in binder.items()), (binder, pinned)
    text = (ROOT / ".binder" / "requirements.txt").read_text()
    assert re.search(r"^-e \.\[book,flower\]$", text, re.M)
    for tool in ("pytest", "nbval", "jupyter-book", "hypothesis", "pytest-xdist"):
        assert tool not in binder, f"Binder installs the test/CI tool {tool}"
    assert "-r ../requirements.txt" not in text


def test_pyproject_core_is_light_and_extras_cover_the_book():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert core == {"torch", "numpy", "tqdm"}
    book = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in project["optional-dependencies"]["book"]}
    assert book == {"matplotlib", "ipywidgets", "scikit-learn", "scipy", "mnist1d"}
    assert any(d.startswith("flwr") for d in project["optional-dependencies"]["flower"])


def test_thebe_live_code_uses_the_binder_environment():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["launch_buttons"]["thebe"] is True
    assert config["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    assert config["repository"]["url"] == "https://github.com/gradiv/gradiv" and config["repository"]["branch"] == "main"
    assert (ROOT / ".binder" / "requirements.txt").is_file()
