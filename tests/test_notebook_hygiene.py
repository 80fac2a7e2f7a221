"""Notebook hygiene: what the book's conventions promise about every committed notebook."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").rglob("*.ipynb"))
NOTEBOOKS = [nb for nb in NOTEBOOKS if ".ipynb_checkpoints" not in nb.parts]
IDS = [str(nb.relative_to(ROOT)) for nb in NOTEBOOKS]


def _toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.add(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return files


def _prose_lines(markdown: str) -> list[str]:
    """The lines of a markdown cell outside fenced code blocks (a `# comment` in code is no heading)."""
    lines, fence = [], None
    for line in markdown.splitlines():
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~"):
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            lines.append(line)
    return lines


def test_prose_lines_skip_code_fences() -> None:
    text = "# Title\n\n```python\n# a comment\n```\n\n~~~\n# another\n~~~\nmore"
    assert _prose_lines(text) == ["# Title", "", "", "more"]


def _load(nb: Path) -> dict:
    return json.loads(nb.read_text(encoding="utf-8"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "book/ holds no notebooks"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(nb: Path) -> None:
    for i, cell in enumerate(_load(nb)["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{nb.name} cell {i} has stored outputs: strip them"
            assert cell.get("execution_count") is None, f"{nb.name} cell {i} has an execution count"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_kernelspec_is_python3(nb: Path) -> None:
    spec = _load(nb)["metadata"].get("kernelspec", {})
    assert spec.get("name") == "python3", f"{nb.name}: kernelspec {spec!r}, want name 'python3'"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_listed_in_toc(nb: Path) -> None:
    stem = nb.relative_to(ROOT).with_suffix("").as_posix()
    assert stem in _toc_files(), f"{stem} is not in _toc.yml"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_setup_cell_first(nb: Path) -> None:
    code = [c for c in _load(nb)["cells"] if c["cell_type"] == "code"]
    assert code, f"{nb.name} has no code cell"
    first = code[0]
    source = "".join(first["source"])
    assert '"google.colab" in sys.modules' in source, f"{nb.name}: first code cell must guard the Colab install"
    assert re.search(r'%pip install -q "gradiv_lib\[book(,\w+)*\] @ git\+https://github.com/gradiv/gradiv@main"', source), (
        f"{nb.name}: the Colab install must take the [book] extra and pin the branch the launch buttons use (main)")
    assert "gl.setup_book(" in source, f"{nb.name}: first code cell must call gl.setup_book()"
    assert "hide-cell" in first.get("metadata", {}).get("tags", []), f"{nb.name}: setup cell must be tagged hide-cell"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_one_title_and_hidden_checks(nb: Path) -> None:
    cells = _load(nb)["cells"]
    titles = [line for c in cells if c["cell_type"] == "markdown" for line in _prose_lines("".join(c["source"]))
              if line.startswith("# ")]
    assert len(titles) == 1, f"{nb.name}: want exactly one H1 (the page title), found {titles}"
    checks = [c for c in cells if c["cell_type"] == "code" and "remove-cell" in c.get("metadata", {}).get("tags", [])
              and "assert" in "".join(c["source"])]
    assert checks, f"{nb.name}: no hidden check cell (tag remove-cell with an assert)"


def test_config_traps_handled() -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["only_build_toc_files"] is True
    assert config["execute"]["execute_notebooks"] == "cache"
    assert config["execute"]["raise_on_error"] is True
    assert config["repository"]["branch"] == "main"
    assert config["sphinx"]["recursive_update"] is True
    assert {"amsmath", "dollarmath", "colon_fence"} <= set(config["parse"]["myst_enable_extensions"])
    assert config["launch_buttons"]["colab_url"] and config["launch_buttons"]["binderhub_url"]
