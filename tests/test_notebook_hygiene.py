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


# ---- sources that render: no control characters, no broken LaTeX ---------------------------------------

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")   # all but \t and \n: a lost backslash (\a, \b, \r, \f, \v)
MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$([^$]+?)\$", re.S)
# Commands whose first letter a lost escape eats: "\rVert" -> CR + "Vert", "\rangle", "\right", "\rho", "\beta" ...
ORPHANS = re.compile(r"(?m)^(Vert|angle|ight|ho|eta|lpha|ar|rac|imes|ext|orall|abla|ot|ewline)\b")


def latex_problems(text: str) -> list[str]:
    """What is wrong with the math of a markdown source: control characters, unbalanced braces,
    unmatched \\left/\\right or \\begin/\\end, and the remnants of a command whose backslash was lost."""
    problems = [f"control character {m.group()!r} at offset {m.start()}" for m in CONTROL.finditer(text)]
    prose = "\n".join(_prose_lines(text))
    prose = re.sub(r"`[^`\n]*`", "", prose)                  # inline code is not math
    for m in MATH.finditer(prose):
        math = m.group(1) or m.group(2)
        plain = re.sub(r"\\[\\{}]", "", math)                 # escaped braces and \\ line breaks
        if plain.count("{") != plain.count("}"):
            problems.append(f"unbalanced braces in ${math.strip()[:60]}$")
        if len(re.findall(r"\\left\b", math)) != len(re.findall(r"\\right\b", math)):
            problems.append(f"\\left without \\right in ${math.strip()[:60]}$")
        if re.findall(r"\\begin\{(\w+\*?)\}", math) != re.findall(r"\\begin\{(\w+\*?)\}", math) or \
                sorted(re.findall(r"\\begin\{(\w+\*?)\}", math)) != sorted(re.findall(r"\\end\{(\w+\*?)\}", math)):
            problems.append(f"\\begin/\\end mismatch in ${math.strip()[:60]}$")
        if ORPHANS.search(math):
            problems.append(f"a command that lost its backslash in ${math.strip()[:60]}$")
    return problems


def test_latex_problems_are_found() -> None:
    assert latex_problems(r"fine: $\lVert d\rVert$ and $$\begin{aligned}a&=\left(b\right)\end{aligned}$$ and `$x{`") == []
    assert latex_problems("lost: $\\lVert d\rVert$")                 # "\r" became a carriage return
    assert latex_problems("lost: $\\lVert d\nVert$")                 # ... or a line break
    assert latex_problems("bell: $\alpha$")
    assert latex_problems(r"$\frac{a}{b$")
    assert latex_problems(r"$\left(a$")
    assert latex_problems(r"$$\begin{aligned}a\end{align}$$")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_sources_have_no_control_characters_or_broken_latex(nb: Path) -> None:
    for i, cell in enumerate(_load(nb)["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            problems = latex_problems(source)
        else:
            problems = [f"control character {m.group()!r}" for m in CONTROL.finditer(source)]
        assert not problems, f"{nb.name} cell {i}: {problems}"


@pytest.mark.parametrize("page", sorted((ROOT / "book").rglob("*.md")), ids=lambda p: p.name)
def test_markdown_pages_have_no_broken_latex(page: Path) -> None:
    assert not latex_problems(page.read_text(encoding="utf-8")), page
