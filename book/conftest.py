"""Keep what nbval executes, so the book build does not execute every notebook a second time.

When ``GRADIV_EXECUTED_DIR`` is set, every notebook whose cells all pass under ``pytest --nbval-lax`` is
written, with the outputs nbval collected, to ``$GRADIV_EXECUTED_DIR/<path>.ipynb``.
``tests/cache_executed_notebooks.py`` then files them in the book's jupyter-cache, where
``jupyter-book build`` (``execute_notebooks: cache``) finds them by the hash of their code.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest

_EXECUTED_DIR = os.environ.get("GRADIV_EXECUTED_DIR")
_outputs: dict[Path, dict[int, list]] = defaultdict(dict)
_failed: set[Path] = set()
_ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not _EXECUTED_DIR or not hasattr(item, "cell") or call.when != "call":
        return
    notebook = Path(str(item.fspath)).resolve()
    report = outcome.get_result()
    if report.failed:
        _failed.add(notebook)
    elif item.test_outputs is not None:
        _outputs[notebook][item.cell_num] = [nbformat.from_dict(dict(o)) for o in item.test_outputs]


def pytest_sessionfinish(session, exitstatus):
    if not _EXECUTED_DIR:
        return
    for notebook, cells in _outputs.items():
        if notebook in _failed:
            continue
        nb = nbformat.read(notebook, as_version=4)
        code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
        for number, cell in enumerate(code_cells):   # nbval numbers the code cells from 0
            if number not in cells:                   # a cell that did not run: keep nothing of this notebook
                break
            cell.outputs = cells[number]
            cell.execution_count = number + 1
            for output in cell.outputs:
                if output.output_type == "execute_result":
                    output.execution_count = number + 1
        else:
            target = Path(_EXECUTED_DIR) / notebook.relative_to(_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, target)


NOTEBOOK_SECONDS = 60
"""The book's target for one notebook's cells on a 2-core CPU (README, "Conventions")."""


def notebook_seconds(reports) -> dict[str, float]:
    """Seconds of cell execution per notebook, from nbval's test reports (the kernel's start not counted)."""
    totals: dict[str, float] = defaultdict(float)
    for report in reports:
        if getattr(report, "when", None) == "call" and "::Cell " in getattr(report, "nodeid", ""):
            totals[report.nodeid.split("::")[0]] += report.duration
    return dict(totals)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The slowest notebooks, against the 60 s target: a report, not a test (with several workers each
    notebook shares the cores with another, so these are upper bounds)."""
    totals = notebook_seconds(r for reports in terminalreporter.stats.values() for r in reports)
    if not totals:
        return
    workers = getattr(config.option, "numprocesses", None) or 1
    terminalreporter.section(f"notebook times (cells; {workers} worker(s); target under {NOTEBOOK_SECONDS} s each)")
    for path, seconds in sorted(totals.items(), key=lambda item: -item[1])[:6]:
        flag = f"  over {NOTEBOOK_SECONDS} s" if seconds > NOTEBOOK_SECONDS else ""
        terminalreporter.write_line(f"{seconds:6.1f} s  {path}{flag}")
